"""`findings --format html`: one self-contained HTML file that leads with what matters.

A summary first (findings by severity, chains, clients, captures and their time span),
then every finding ordered by severity and rule, each with its hop on one line, the
message, the fix and the whole chain behind a disclosure; then the rules that found
nothing, in one line; then the figures. Filters (severity, rule, client, host) and
sortable columns are a few lines of inline script; the figures are PNGs in data URIs and
the styles are inline, so the file can be mailed or attached to a ticket and opens
anywhere, offline. Without script, every finding is shown in its order.

The findings, chains and summary are read with plain SQL. The figures need pandas and
matplotlib (about a second to import, and as much to draw), so they are drawn once for
each state of the store's results and kept in its meta table (`report_figures`): the
next report on the same results reads them back and imports neither.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import sqlite3
import warnings
from collections import Counter
from collections.abc import Callable
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path, PurePath
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup, escape

from analyzer import __version__
from analyzer.clientnames import client_name
from analyzer.detectors import RULES, RULES_BY_SLUG
from analyzer.report import (
    Record,
    body_text,
    capture_records,
    chain_records,
    header_lines,
    hop_text,
    where_chains,
)
from analyzer.storeread import (
    ANALYSIS_OPTIONS,
    ANALYZED_GENERATION,
    GENERATION,
    REPORT_FIGURES,
    Reader,
    open_reader,
    resolve_db_url,
    sqlite_file,
    url_shown,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SEVERITIES = ("high", "medium", "low", "info")
RANK = {s: i for i, s in enumerate(SEVERITIES)}


def _png(fig: Figure, title: str) -> Record:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # constrained layout gives up on a figure too small for its labels and says so on
        # stderr; the figure is still drawn, and a report is no place for the noise
        warnings.filterwarnings("ignore", message="constrained_layout not applied")
        fig.savefig(buffer, format="png", dpi=96)
    width, height = (int(v * 96) for v in fig.get_size_inches())
    return {
        "title": title,
        "png": base64.b64encode(buffer.getvalue()).decode(),
        "width": width,
        "height": height,
    }


LONG_PIECE = 40  # a piece longer than this (an encoded URL in a parameter) may break anywhere


def breakable(text: object) -> Markup:
    """Escaped text that wraps at spaces and after `/`, `?` and `&` (URLs), nowhere else: each
    piece between those points is kept whole (a browser would also break after `-`), unless
    it is too long for any line."""
    out = []
    for token in re.split(r"(\s+)", str(text)):
        if not token or token.isspace():
            out.append(str(escape(token)))
            continue
        pieces = [p for p in re.split(r"(?<=[/?&])", token) if p]
        out.append(
            "<wbr>".join(
                f'<span class="{"nb" if len(p) <= LONG_PIECE else "long"}">{escape(p)}</span>' for p in pieces
            )
        )
    return Markup("".join(out))


def pointer(capture: Record) -> tuple[str, str]:
    """(`file.har#12`, the full path) for a HAR entry; (`flow 3f2a…`, source) for a flow."""
    path = capture.get("file") or capture.get("source") or "?"
    if capture.get("entry_index") is not None:
        return (
            f"{PurePath(path).name}#{capture['entry_index']}",
            f"{path}, entry {capture['entry_index']} (0-based)",
        )
    flow = str(capture.get("flow_id") or "")
    return f"{PurePath(path).name} flow {flow[:8]}", f"{path}, flow {flow}"


def _host(url: str | None) -> str:
    return (urlsplit(url).hostname or "") if url else ""


HOPS_SQL = """
SELECT h.chain_id, h.status, h.to_exchange_id, a.method, b.method, a.url_norm,
       COALESCE(b.url_norm, a.location_resolved), a.user_agent, c.creator, c.browser, c.source
FROM hops h JOIN exchanges a ON a.id = h.from_exchange_id
LEFT JOIN exchanges b ON b.id = h.to_exchange_id
JOIN captures c ON c.id = a.capture_id
{where}
ORDER BY h.chain_id, h.idx
"""


def _chains(reader: Reader, chain_ids: set[int]) -> tuple[dict[int, list[str]], dict[int, str]]:
    """The findings' chains hop by hop, one line per hop; and the client each is named by."""
    lines: dict[int, list[str]] = {}
    names: dict[int, str] = {}
    for query in where_chains(HOPS_SQL, "h.chain_id", sorted(chain_ids)):
        for (
            chain,
            status,
            target,
            before,
            after,
            from_url,
            to_url,
            agent,
            creator,
            browser,
            source,
        ) in reader.rows(query):
            if target is not None:
                follow = f"{after} {to_url}"
            else:
                follow = f"not followed (Location {to_url})" if to_url else "not followed"
            lines.setdefault(chain, []).append(f"{before} {from_url} → {status} → {follow}")
            names[chain] = client_name(agent, creator, browser, source)
    return lines, names


def _client(r: Record) -> str | None:
    """The client's readable name without the test (the filter groups a client's tests)."""
    name = r.get("client_name")
    test = r.get("test")
    if name and test and name.endswith(f" · {test}"):
        return str(name[: -len(test) - 3])
    return name


def _hop_details(reader: Reader, chain_ids: set[int], lines: dict[int, list[str]]) -> dict[int, list[Record]]:
    """Each chain's hops for the report's disclosure: the hop's line, and behind it the
    bodies and the headers as `chains -v` shows them, evidence marked."""
    out: dict[int, list[Record]] = {}
    for chain in chain_records(reader, headers=True, chain_ids=chain_ids):
        shown = lines.get(chain["chain_id"], [])
        out[chain["chain_id"]] = [
            {
                "line": shown[hop["hop"]] if hop["hop"] < len(shown) else "",
                "bodies": [body_text(hop["from"]["body"])]
                + ([f"follow-up {body_text(hop['to']['body'])}"] if hop["to"] else []),
                "changes": hop["changes"],
                "headers": header_lines(hop),
            }
            for hop in chain["hops"]
        ]
    return out


def _findings(records: list[Record], reader: Reader) -> list[Record]:
    wanted = {r["chain_id"] for r in records if r["chain_id"] is not None}
    chains, names = _chains(reader, wanted)
    hops = _hop_details(reader, wanted, chains)
    rows = []
    for r in records:
        rule = RULES_BY_SLUG.get(r["rule"])
        short, full = pointer(r["capture"])
        rows.append(
            {
                **r,
                "hop_line": hop_text(r),
                "fix": rule.fix if rule else "",
                "client_name": _client(r) or names.get(r["chain_id"], r["client"]),
                "host": _host(r["from_url"]),
                "pointer": short,
                "pointer_title": full,
                # sorts shop.har#9 before shop.har#12
                "pointer_key": re.sub(r"\d+", lambda m: m[0].zfill(10), short),
                "chain": hops.get(r["chain_id"], []),
            }
        )
    rows.sort(key=lambda f: (RANK.get(f["severity"], 9), f["rule_id"], -f["confidence"], f["finding_id"]))
    return rows


def _summary(reader: Reader, records: list[Record]) -> Record:
    captures = capture_records(reader)
    for c in captures:
        c["name"] = PurePath(c["file"]).name if c["file"] else c["source"]
    starts = [c["first_at"] for c in captures if c["first_at"]]
    ends = [c["last_at"] for c in captures if c["last_at"]]
    counts = Counter(r["severity"] for r in records)
    agents = reader.rows(
        "SELECT DISTINCT a.user_agent, c.creator, c.browser, c.source FROM hops h "
        "JOIN exchanges a ON a.id = h.from_exchange_id JOIN captures c ON c.id = a.capture_id"
    )
    return {
        "counts": [(s, counts[s]) for s in SEVERITIES],
        "findings": len(records),
        "chains": reader.value("SELECT COUNT(DISTINCT chain_id) FROM hops") or 0,
        "clients": len({client_name(*row) for row in agents}),
        "exchanges": sum(c["exchanges"] or 0 for c in captures),
        "captures": captures,
        "span": (min(starts)[:16].replace("T", " "), max(ends or starts)[:16].replace("T", " "))
        if starts
        else None,
    }


# What the figures are drawn from: the results, the exchanges and the code that draws them.
FIGURE_SOURCES = ("plots.py", "frames.py", "htmlreport.py")


def _results_key(reader: Reader) -> str:
    """Changes whenever what the figures show can have changed."""
    meta = reader.rows(
        "SELECT key, value FROM meta WHERE key IN (:a, :b, :c) ORDER BY key",
        a=GENERATION,
        b=ANALYZED_GENERATION,
        c=ANALYSIS_OPTIONS,
    )
    counts = reader.rows(
        "SELECT (SELECT COUNT(*) FROM findings), (SELECT MAX(id) FROM findings), "
        "(SELECT COUNT(*) FROM hops), (SELECT MAX(id) FROM chains), (SELECT MAX(id) FROM captures)"
    )
    code = hashlib.sha256()
    for name in FIGURE_SOURCES:
        code.update((Path(__file__).parent / name).read_bytes())
    return json.dumps([__version__, code.hexdigest(), meta, counts], default=list)


def _figures(db: str | None, reader: Reader) -> tuple[list[Record], list[str]]:
    """The figures that have something to show, as PNGs, and the titles of those that do not:
    drawn once for each state of the results and kept in the store (see the module doc)."""
    key = _results_key(reader)
    kept = reader.value("SELECT value FROM meta WHERE key = :k", k=REPORT_FIGURES)
    if kept:
        try:
            cached = json.loads(kept)
            if cached["key"] == key:
                return cached["figures"], cached["undrawn"]
        except (ValueError, KeyError, TypeError):
            pass  # unreadable: drawn again, and replaced
    figures, undrawn = _draw(db)
    _keep(db, json.dumps({"key": key, "figures": figures, "undrawn": undrawn}))
    return figures, undrawn


def _draw(db: str | None) -> tuple[list[Record], list[str]]:
    from analyzer import frames, plots  # pandas and matplotlib: only here

    hops, chains = frames.hops(db), frames.chains(db)
    findings_frame, temporary = frames.findings(db), frames.temporary_redirects(db)
    wanted: list[tuple[str, bool, Callable[[], Figure]]] = [  # (title, has something to draw, how to draw it)
        (
            "Findings by rule and severity",
            not findings_frame.empty,
            lambda: plots.findings_by_rule(findings_frame),
        ),
        (
            "What each client did on each kind of redirect (RFC 9110 / Fetch)",
            not hops.empty,
            lambda: plots.conformance_heatmap(hops),
        ),
        (
            "Redirects between origins (grey: same origin, orange: cross-origin, light blue: HTTP to "
            "HTTPS on one host, red: HTTPS to HTTP)",
            not hops.empty,
            lambda: plots.redirect_graph(hops),
        ),
        ("Temporary redirects over time", not temporary.empty, lambda: plots.temporary_timeline(temporary)),
        ("Hops per chain", not chains.empty, lambda: plots.chain_lengths(chains)),
    ]
    figures = [_png(draw(), title) for title, has_data, draw in wanted if has_data]
    return figures, [title for title, has_data, _ in wanted if not has_data]


def _keep(db: str | None, value: str) -> None:
    """Keep the drawn figures in the store's meta table. A store this process cannot write
    to now (read-only, or a writer holding SQLite's lock past a moment) keeps none: the
    next report draws them again."""
    url = resolve_db_url(db)
    path = sqlite_file(url)
    try:
        if path is not None:
            with closing(
                sqlite3.connect(f"{path.resolve().as_uri()}?mode=rw", uri=True, timeout=0.5)
            ) as conn:
                with conn:
                    conn.execute(
                        "INSERT INTO meta (key, value) VALUES (?, ?) "
                        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                        (REPORT_FIGURES, value),
                    )
            return
        from analyzer.store import make_engine, set_meta

        engine = make_engine(url)
        try:
            with engine.begin() as conn:
                set_meta(conn, REPORT_FIGURES, value)
        finally:
            engine.dispose()
    except Exception:
        return


def render(db: str | None, records: list[Record]) -> str:
    with open_reader(db) as reader, reader.snapshot():
        found = _findings(records, reader)
        summary = _summary(reader, records)
        figures, undrawn = _figures(db, reader)
    fired = {f["rule"] for f in found}
    env = Environment(
        loader=PackageLoader("analyzer", "templates"), autoescape=select_autoescape(["html", "j2"])
    )
    env.filters["breakable"] = breakable
    return env.get_template("report.html.j2").render(
        store=url_shown(resolve_db_url(db)),
        generated=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        summary=summary,
        findings=found,
        choices={
            "severity": [s for s in SEVERITIES if any(f["severity"] == s for f in found)],
            "rule": sorted({f["rule"] for f in found}),
            "client": sorted({f["client_name"] for f in found}),
            "host": sorted({f["host"] for f in found if f["host"]}),
        },
        quiet=[r for r in RULES if r.slug not in fired],
        figures=figures,
        undrawn=undrawn,
    )
