"""What a recording saw and what it could not: the end-of-run summary of `run` and the plugin.

A recording that stored nothing is not an all-clear. The summary says how many exchanges
were stored from which clients (by product and version, with the label they came under),
which TLS handshakes a client refused (it does not trust the recorder's CA, so nothing it
sent over them was seen), which tests ran with the proxy variables removed, and which
runtimes started without sending anything; when nothing was recorded, it says why that
may be. pandas-free: `run` and the plugin import it at the end of every session.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from sqlalchemy import func, select

from analyzer.clientnames import label_words, product
from analyzer.store import Store
from analyzer.store import exchanges as ex_t
from analyzer.text import counted as noun_count

SHOWN = 4  # hosts, clients or tests named in one line; the rest are counted


@dataclass(frozen=True)
class ClientSeen:
    client: str  # the label or address it was recorded under (what --client takes)
    name: str  # its product and version, and its label in words: "requests 2.32 (pytest gw0)"
    exchanges: int


def clients_seen(
    store: Store,
    *,
    capture_ids: Iterable[int] | None = None,
    clients: Iterable[str] | None = None,
    prefixes: Iterable[str] = (),
) -> list[ClientSeen]:
    """The clients whose exchanges a recording stored, most traffic first, by readable name.
    Chosen by capture (a `run`), or by client label and address prefix (a pytest session)."""
    query = select(ex_t.c.client, ex_t.c.user_agent, func.count()).group_by(ex_t.c.client, ex_t.c.user_agent)
    if capture_ids is not None:
        query = query.where(ex_t.c.capture_id.in_(list(capture_ids)))
    if clients is not None:
        from sqlalchemy import or_

        query = query.where(
            or_(
                ex_t.c.client.in_(list(clients)),
                *(ex_t.c.client.startswith(p, autoescape=True) for p in prefixes),
            )
        )
    named: dict[str, int] = {}
    first: dict[str, str] = {}
    with store.begin() as conn:
        for client, agent, count in conn.execute(query):
            words = label_words(client)
            name = f"{product(agent)} ({words})" if words else product(agent)
            named[name] = named.get(name, 0) + count
            first.setdefault(name, client)
    return sorted(
        (ClientSeen(first[n], n, c) for n, c in named.items()), key=lambda s: (-s.exchanges, s.name)
    )


def by_name(items: Mapping[str, int], unit: str = "") -> str:
    """'a (3), b (1) and 2 more' for the SHOWN commonest."""
    ranked = sorted(items.items(), key=lambda kv: (-kv[1], kv[0]))
    shown = ", ".join(f"{k} ({v}{unit})" for k, v in ranked[:SHOWN])
    rest = len(ranked) - SHOWN
    return f"{shown} and {rest} more" if rest > 0 else shown


def recorded_line(seen: list[ClientSeen]) -> str:
    total = sum(s.exchanges for s in seen)
    if not total:
        return "recorded nothing: no HTTP(S) exchange went through the recorder"
    clients = by_name({s.name: s.exchanges for s in seen})
    return f"recorded {noun_count(total, 'exchange')} from {noun_count(len(seen), 'client')}: {clients}"


def tls_lines(refused: Mapping[str, int], upstream: Mapping[str, int]) -> list[str]:
    lines = []
    if refused:
        lines.append(
            f"{noun_count(sum(refused.values()), 'TLS handshake')} refused by a client that does not trust the "
            f"recorder's CA, so what it sent there was not seen: {by_name(refused)}"
        )
    if upstream:
        lines.append(
            f"{noun_count(sum(upstream.values()), 'TLS handshake')} with an upstream server failed (its certificate "
            f"was not trusted; the client's connection was closed; --upstream-ca FILE trusts a test "
            f"server's own CA): {by_name(upstream)}"
        )
    return lines


def unproxied_line(tests: list[str]) -> str:
    shown = ", ".join(tests[:SHOWN]) + (f" and {len(tests) - SHOWN} more" if len(tests) > SHOWN else "")
    return (
        f"{noun_count(len(tests), 'test')} ran with the proxy variables removed (a fixture or the test cleared "
        f"them), so their HTTP traffic was not recorded: {shown}"
    )


def runtimes_line(reports: list[dict[str, object]]) -> str | None:
    """The runtimes that reported as they exited (a process the Node preload reached, a
    pytest session), and those that sent nothing through the recorder:
    'node 20.20.2: 3 process(es), 1 sent nothing (npm-cli.js)'."""
    if not reports:
        return None
    by_runtime: dict[str, list[dict[str, object]]] = {}
    for report in reports:
        by_runtime.setdefault(str(report.get("runtime", "unknown")), []).append(report)
    parts = []
    for runtime, processes in sorted(by_runtime.items()):
        silent = [p for p in processes if p.get("tunnels") == 0]  # pytest's report has no count
        text = f"{runtime}: {len(processes)} process(es)"
        if silent:
            scripts = sorted({str(p.get("script") or "?") for p in silent})
            shown = ", ".join(scripts[:SHOWN]) + (
                f" and {len(scripts) - SHOWN} more" if len(scripts) > SHOWN else ""
            )
            text += f", {len(silent)} sent nothing ({shown})"
        parts.append(text)
    return "runtimes seen starting: " + "; ".join(parts)


def empty_reasons(
    *, refused: Mapping[str, int], unproxied: int, pytest: bool, transparent: bool = False
) -> list[str]:
    """Why a recording may have seen nothing, the likeliest first."""
    reasons = []
    if unproxied:
        reasons.append(f"{noun_count(unproxied, 'test')} ran with the proxy variables removed")
    if refused:
        reasons.append(
            f"{noun_count(sum(refused.values()), 'TLS handshake')} were refused: a client pinned its own CA bundle"
        )
    if transparent:  # every TCP connection reached the recorder: nothing depended on the client
        reasons.append("its clients spoke only HTTP/3 (QUIC, over UDP), which is not redirected")
    elif pytest:
        reasons.append(
            "the tests' HTTP clients do not read the proxy variables (aiohttp without "
            "trust_env=True, a client given proxies= or a transport of its own); "
            "`redirect-audit run --transparent` records them without their cooperation"
        )
    else:
        reasons.append(
            "the command cleared the proxy variables, or its clients do not read them "
            "(Go's net/http never proxies loopback; aiohttp needs trust_env=True); "
            "`run --transparent` records them without their cooperation"
        )
    reasons.append("it sent no HTTP(S) traffic at all")
    return reasons
