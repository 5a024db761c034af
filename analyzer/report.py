"""Reading results back out of the store as records, and rendering them.

Records are plain dicts in the JSON contract of design.md; the terminal renderers
(rich table, rich tree) and the JSON/JSONL writers all start from them.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import IO, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from analyzer.clientnames import readable
from analyzer.model import Severity
from analyzer.storeread import Reader, Row
from analyzer.text import counted, json_terminal_safe, printable

# One finding, chain or hop as the JSON contract has it (design.md).
Record = dict[str, Any]

SEVERITY_STYLE = {"high": "bold red", "medium": "yellow", "low": "cyan", "info": "dim"}


def iso(ts: float | None) -> str | None:
    """ISO 8601 in UTC; None for a moment no calendar date of years 1-9999 can say (a
    capture may hold any number: it is kept as given in the store)."""
    if ts is None:
        return None
    try:
        return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")
    except (OverflowError, ValueError, OSError):
        return None


def capture_pointer(source: str, path: str | None, seq: int, flow_id: str | None) -> Record:
    """Where an exchange came from: HAR file + 0-based entry index, or a flow id."""
    if source == "har":
        return {"source": "har", "file": path, "entry_index": seq}
    return {"source": source, "file": path, "flow_id": flow_id}


FINDINGS_SQL = """
SELECT f.id, f.rule, f.rule_id, f.severity, f.confidence, f.message, f.chain_id, f.hop, f.observed_at, f.evidence,
       f.fingerprint, f.third_party, a.status, a.method, a.url, a.location, a.location_resolved, h.chain_id, t.method, t.url,
       b.method, b.url, b.client, b.seq, b.flow_id, c.source, c.path, b.capture_id, a.user_agent, c.browser,
       c.creator,
       (SELECT r.nodeid FROM test_runs r
        WHERE (r.client = a.client OR substr(a.client, 1, length(r.recorder) + 7) = 'proxy:' || r.recorder || '/')
          AND r.started_at <= a.started_at AND (r.ended_at IS NULL OR a.started_at <= r.ended_at)
        ORDER BY r.started_at DESC LIMIT 1)
FROM findings f
JOIN exchanges a ON a.id = f.from_exchange_id
JOIN exchanges b ON b.id = f.to_exchange_id
JOIN captures c ON c.id = b.capture_id
LEFT JOIN hops h ON h.chain_id = f.chain_id AND h.idx = f.hop
LEFT JOIN exchanges t ON t.id = h.to_exchange_id
WHERE f.severity_rank >= :floor {capture}
ORDER BY COALESCE(f.observed_at, 0), b.capture_id, b.seq, f.rule_id, f.id
"""


def finding_records(
    reader: Reader,
    min_severity: Severity = Severity.INFO,
    *,
    capture_id: int | None = None,
    clients: tuple[str, str] | None = None,
) -> list[Record]:
    """Every finding at or above a severity, in the JSON contract of design.md; only those
    about exchanges of one capture, or of clients `(label, recorder)`, when given."""
    where, params = "", dict[str, object]()
    if capture_id is not None:
        where, params = "AND b.capture_id = :capture", {"capture": capture_id}
    if clients is not None:  # one client (a label), and the clients a recorder knows by address
        label, recorder = clients
        where += " AND (f.client = :label OR substr(f.client, 1, :plen) = :prefix)"
        params.update(label=label, plen=len(recorder) + 7, prefix=f"proxy:{recorder}/")
    return [
        _finding_record(row)
        for row in reader.rows(FINDINGS_SQL.format(capture=where), floor=int(min_severity), **params)
    ]


def _finding_record(row: Row) -> Record:
    (
        finding_id,
        rule,
        rule_id,
        severity,
        confidence,
        message,
        chain_id,
        hop,
        observed_at,
        evidence,
        fingerprint,
        third_party,
        status,
        m0,
        u0,
        raw_location,
        location,
        hop_chain,
        t_method,
        t_url,
        b_method,
        b_url,
        client,
        seq,
        flow_id,
        source,
        path,
        capture_id,
        user_agent,
        browser,
        creator,
        test,
    ) = row
    if hop_chain is None:  # not about a redirect hop (a write repeated without a chain)
        followed, m1, u1 = None, b_method, b_url
    elif t_url is not None:  # the hop's follow-up, whichever exchange the finding points at
        followed, m1, u1 = True, t_method, t_url
    else:  # a redirect nobody followed: where it pointed, and no method after
        followed, m1, u1 = False, None, location
    return {
        "finding_id": finding_id,
        "rule": rule,
        "rule_id": rule_id,
        "severity": severity,
        "confidence": confidence,
        "message": message,
        "chain_id": chain_id,
        "hop": hop,
        "status": status,
        "followed": followed,
        "method_before": m0,
        "method_after": m1,
        "from_url": u0,
        "to_url": u1,
        "location": raw_location,
        "client": client,
        "client_name": readable(client, user_agent, test, browser=browser, creator=creator),
        "observed_at": iso(observed_at),
        "evidence": json.loads(evidence),
        "fingerprint": fingerprint,
        "third_party": None if third_party is None else bool(third_party),
        "capture": capture_pointer(source, path, seq, flow_id),
        "capture_id": capture_id,
        # the test during which the hop happened, when the pytest plugin recorded the run
        "test": test,
    }


def third_party_redirects(reader: Reader) -> tuple[int, int]:
    """(hops, chains) of the chains between third parties of their browser page."""
    hops, chains = reader.rows("SELECT COALESCE(SUM(hops), 0), COUNT(*) FROM chains WHERE third_party")[0]
    return int(hops or 0), int(chains or 0)


def hop_text(r: Record) -> str:
    """A finding's hop in one line: `POST https://a/x → 307 → POST https://b/x`, or
    `→ 307 → not followed (Location https://b/x)` for a redirect nobody followed; a
    finding on no hop (a write repeated directly) shows its request and answer."""
    if r["followed"] is None:
        return f"{r['method_before']} {r['from_url']} → {r['status']}"
    if r["followed"] is False:
        if r["to_url"]:
            where = f"Location {r['to_url']}"
        elif r.get("location"):
            where = f"Location {r['location']}, which cannot be resolved"
        else:
            where = "no Location"
        return f"{r['method_before']} {r['from_url']} → {r['status']} → not followed ({where})"
    return f"{r['method_before']} {r['from_url']} → {r['status']} → {r['method_after']} {r['to_url']}"


EXCHANGE_FIELDS = (
    "id",
    "method",
    "url",
    "status",
    "started_at",
    "req_body_len",
    "req_body_sha256",
    "req_content_type",
    "location",
    "synthetic",
    "seq",
    "flow_id",
    "client",
    "error",
    "user_agent",
)
_EXCHANGE_SELECT = (
    ", ".join(f"e.{name}" for name in EXCHANGE_FIELDS) + ", c.source, c.path, c.browser, c.creator"
)


def chain_records(
    reader: Reader,
    url_substring: str | None = None,
    headers: bool = False,
    chain_ids: Iterable[int] | None = None,
) -> list[Record]:
    """Every chain hop by hop; with url_substring, only chains where some URL contains it;
    with chain_ids, only those chains (read by id, not filtered after reading them all).
    With `headers`, each exchange's request and response headers as stored (secret values
    are keyed fingerprints, `hmac:...`), each hop's header changes from the request to its
    follow-up, and the headers its findings name as their evidence."""
    with reader.snapshot():  # an analysis committing between the queries would leave hops dangling
        return _chain_records(reader, url_substring, headers, chain_ids)


CHAIN_CHUNK = 500


def where_chains(sql: str, column: str, chain_ids: list[int] | None, also: str = "") -> Iterator[str]:
    """`sql` with its `{where}` made of `also` and, given chain_ids, `column` in them: once
    per chunk of ids (integers, written into the text; a chunk keeps under every driver's
    limits on parameters and statement length)."""

    def where(*conditions: str) -> str:
        present = [c for c in conditions if c]
        return " WHERE " + " AND ".join(present) if present else ""

    if chain_ids is None:
        yield sql.format(where=where(also))
        return
    for start in range(0, len(chain_ids), CHAIN_CHUNK):
        ids = ",".join(str(int(i)) for i in chain_ids[start : start + CHAIN_CHUNK])
        yield sql.format(where=where(also, f"{column} IN ({ids})"))


def _chain_records(
    reader: Reader, url_substring: str | None, headers: bool = False, chain_ids: Iterable[int] | None = None
) -> list[Record]:
    wanted = None if chain_ids is None else sorted(set(chain_ids))
    by_id = {}
    cols = _EXCHANGE_SELECT + (", e.request_headers, e.response_headers" if headers else "")
    for side in ("from_exchange_id", "to_exchange_id"):
        sql = (
            f"SELECT {cols} FROM hops h JOIN exchanges e ON e.id = h.{side} "
            "JOIN captures c ON c.id = e.capture_id{where}"
        )
        for row in (row for query in where_chains(sql, "h.chain_id", wanted) for row in reader.rows(query)):
            record = _exchange_record(row)
            if headers:
                request, response = row[-2:]
                record["request_headers"] = json.loads(request) if request else None
                record["response_headers"] = json.loads(response) if response else None
            by_id[row[0]] = record
    evidence: dict[tuple[int, int], list[tuple[str, str, set[str]]]] = {}
    if headers:
        sql = "SELECT chain_id, hop, rule_id, rule, evidence FROM findings{where} ORDER BY id"
        queries = where_chains(sql, "chain_id", wanted, also="chain_id IS NOT NULL")
        for chain_id, hop, rule_id, rule, found in (row for query in queries for row in reader.rows(query)):
            evidence.setdefault((chain_id, hop), []).append((rule_id, rule, _evidence_headers(found)))
    out: dict[int, Record] = {}
    chain_sql = (
        "SELECT c.id, c.client, c.end_reason, c.started_at, c.third_party, "
        "COALESCE(r.started_at, -1), r.capture_id, r.seq FROM chains c "
        "JOIN exchanges r ON r.id = c.root_exchange_id{where}"
    )
    chain_rows = [row for query in where_chains(chain_sql, "c.id", wanted) for row in reader.rows(query)]
    chain_rows.sort(key=lambda row: (row[5], row[6], row[7]))
    for chain_id, client, end, started, third_party, *_order in chain_rows:
        out[chain_id] = {
            "chain_id": chain_id,
            "client": client,
            "client_name": None,  # the root request's, below
            "end": end,
            "started_at": iso(started),
            "third_party": None if third_party is None else bool(third_party),
            "hops": [],
        }
    hop_sql = (
        "SELECT chain_id, idx, from_exchange_id, to_exchange_id, status, link, confidence FROM hops{where}"
    )
    hop_rows = [row for query in where_chains(hop_sql, "chain_id", wanted) for row in reader.rows(query)]
    hop_rows.sort(key=lambda row: (row[0], row[1]))
    for chain_id, idx, source_id, target_id, status, link, confidence in hop_rows:
        source, target = by_id[source_id], by_id.get(target_id)
        if idx == 0:
            out[chain_id]["client_name"] = source["client_name"]
        out[chain_id]["hops"].append(
            {
                "hop": idx,
                "status": status,
                "followed": target is not None,
                "link": link,
                "confidence": confidence,
                "from": source,
                "to": target,
                "changes": hop_changes(source, target),
            }
        )
        if headers:
            out[chain_id]["hops"][-1]["header_changes"] = header_changes(
                source.get("request_headers"), target.get("request_headers") if target else None
            )
            out[chain_id]["hops"][-1]["evidence"] = [
                {"rule_id": rule_id, "rule": rule, "headers": sorted(names)}
                for rule_id, rule, names in evidence.get((chain_id, idx), ())
            ]
    records = list(out.values())
    if url_substring:
        records = [c for c in records if any(url_substring in u for u in _urls(c))]
    return records


def _evidence_headers(text: str | None) -> set[str]:
    """The header names a finding's evidence gives (lower case)."""
    found = json.loads(text) if text else {}
    names = set()
    for key in ("header", "headers_kept"):  # RA105/RA115's credential; RA107's body headers
        value = found.get(key) if isinstance(found, dict) else None
        for name in [value] if isinstance(value, str) else value if isinstance(value, list) else []:
            if isinstance(name, str):
                names.add(name.split("=", 1)[0].lower())
    return names


def header_changes(before: list[list[str]] | None, after: list[list[str]] | None) -> list[Record]:
    """A request's headers against its follow-up's, by name (case-insensitive), in the
    request's order then the follow-up's: `+` only on the follow-up, `-` only on the
    request, `~` one value each and they differ. Unchanged headers are left out; neither
    side's headers stored (a HAR without them): nothing."""
    if before is None or after is None:
        return []
    sent: dict[str, list[tuple[str, str]]] = {}
    got: dict[str, list[tuple[str, str]]] = {}
    for into, pairs in ((sent, before), (got, after)):
        for name, value in pairs:
            into.setdefault(name.lower(), []).append((name, value))
    out: list[Record] = []
    for key in [*sent, *(k for k in got if k not in sent)]:
        a, b = sent.get(key, []), got.get(key, [])
        if [v for _, v in a] == [v for _, v in b]:
            continue
        if len(a) == 1 and len(b) == 1:
            out.append({"change": "~", "name": b[0][0], "before": a[0][1], "after": b[0][1]})
            continue
        out += _unmatched("-", a, b) + _unmatched("+", b, a)
    return out


def _unmatched(change: str, these: list[tuple[str, str]], others: list[tuple[str, str]]) -> list[Record]:
    """`these` headers whose value `others` does not have as often (repeated values count)."""
    spare = Counter(value for _, value in others)
    out: list[Record] = []
    for name, value in these:
        if spare[value]:
            spare[value] -= 1
        else:
            out.append({"change": change, "name": name, "value": value})
    return out


CAPTURES_SQL = """
SELECT c.id, c.source, c.path, c.creator, c.imported_at, c.entries, c.warnings,
       COUNT(e.id), MIN(e.started_at), MAX(e.started_at), c.damage
FROM captures c LEFT JOIN exchanges e ON e.capture_id = c.id
GROUP BY c.id, c.source, c.path, c.creator, c.imported_at, c.entries, c.warnings, c.damage
ORDER BY c.id
"""


def capture_records(reader: Reader) -> list[Record]:
    """What the store holds, capture by capture: where from, how much, over what time."""
    return [
        {
            "capture_id": cid,
            "source": source,
            "file": path,
            "creator": creator,
            "imported_at": iso(imported),
            "exchanges": count,
            "warnings": warnings,
            "first_at": iso(first),
            "last_at": iso(last),
            "damage": damage,  # a file cut off or damaged part way: where, and what was kept
        }
        for cid, source, path, creator, imported, _entries, warnings, count, first, last, damage in reader.rows(
            CAPTURES_SQL
        )
    ]


def _urls(chain: Record) -> Iterator[str]:
    for hop in chain["hops"]:
        yield hop["from"]["url"]
        if hop["to"]:
            yield hop["to"]["url"]


def _exchange_record(row: Row) -> Record:
    r = dict(zip((*EXCHANGE_FIELDS, "source", "path", "browser", "creator"), row, strict=False))
    return {
        "id": r["id"],
        "client_name": readable(r["client"], r["user_agent"], browser=r["browser"], creator=r["creator"]),
        "method": r["method"],
        "url": r["url"],
        "status": r["status"],
        "started_at": iso(r["started_at"]),
        "location": r["location"],
        "synthetic": bool(r["synthetic"]),
        "error": r["error"],
        "body": {
            "length": r["req_body_len"],
            "sha256": r["req_body_sha256"],
            "content_type": r["req_content_type"],
        },
        "capture": capture_pointer(r["source"], r["path"], r["seq"], r["flow_id"]),
    }


def hop_changes(source: Record, target: Record | None) -> list[str]:
    """What differs between a request and its follow-up, in words."""
    if target is None:
        return []
    changes = []
    b0, b1 = source["body"], target["body"]
    if source["method"] != target["method"]:
        changes.append(f"method {source['method']} -> {target['method']}")
        if target["method"] in ("GET", "HEAD"):
            if b0["length"] and b1["length"] == 0:
                changes.append("body removed with the switch to GET (expected)")
            return changes
    if b0["length"] and b1["length"] is None:
        changes.append("body not captured on follow-up")
    elif b0["length"] and not b1["length"]:
        changes.append(f"body dropped ({b0['length']} bytes)")
    elif b0["sha256"] and b1["sha256"] and b0["sha256"] != b1["sha256"] and b1["length"]:
        changes.append(f"body changed ({b0['length']} -> {b1['length']} bytes)")
    if b0["content_type"] and b0["content_type"] != b1["content_type"]:
        changes.append(f"content-type {b0['content_type']} -> {b1['content_type'] or 'none'}")
    return changes


# ---- rendering --------------------------------------------------------------


def write_json(records: object, out: IO[str]) -> None:
    out.write(json_terminal_safe(json.dumps(records, indent=2, ensure_ascii=False)) + "\n")


def write_jsonl(records: Iterable[Record], out: IO[str]) -> None:
    for record in records:
        out.write(json_terminal_safe(json.dumps(record, ensure_ascii=False)) + "\n")


def print_findings_table(records: list[Record], console: Console, scope: str = "") -> None:
    """One block per finding: severity and rule, the hop, then what happened. `scope` says
    what was looked at (" in 120 exchange(s)"), so that an empty answer is never mistaken
    for an all-clear about something else."""
    if not records:
        console.print(f"No findings{scope}.", markup=False)
        return
    styled = _Style(plain=False)
    for r in records:
        for line in finding_lines(r, styled):
            console.print(line, highlight=False)
    active = [r for r in records if not r.get("suppressed")]
    counts = Counter(r["severity"] for r in active)
    summary = ", ".join(f"{counts[s]} {s}" for s in ("high", "medium", "low", "info") if counts[s])
    listed = len(records) - len(active)
    console.print(
        f"\n{counted(len(active), 'finding')}"
        + (f": {summary}" if summary else "")
        + (f" ({listed} suppressed, listed)" if listed else "")
    )


def finding_lines(r: Record, st: _Style | None = None) -> list[str]:
    """A finding as the terminal table shows it: severity, rule, where and how sure, then
    the hop and what happened (plain text unless `st` styles it)."""
    st = st or _Style(plain=True)
    where = f"chain {r['chain_id']} hop {r['hop']}" if r["chain_id"] is not None else "no chain"
    style = "dim" if r.get("suppressed") else SEVERITY_STYLE[r["severity"]]
    named = f" · {st.text(r['client_name'])}" if r.get("client_name") else ""
    lines = [
        f"{st.styled(style, f'{r["severity"].upper():<6}')} {st.bold(r['rule'])} ({r['rule_id']}) · {where} · "
        f"confidence {r['confidence']:.2f} · {st.text(_pointer_text(r['capture']))}{named}",
        st.dim(f"       {hop_text(r)}"),
        f"       {st.text(r['message'])}",
    ]
    if r.get("suppressed"):
        lines.append(st.dim(f"       suppressed: {r['suppressed']}"))
    return lines


def print_capture_table(records: list[Record], console: Console, store: str) -> None:
    """`captures`: one row per capture."""
    if not records:
        console.print(f"{store} holds no captures.", markup=False)
        return
    table = Table(title=f"captures in {escape(store)}", title_justify="left", header_style="bold")
    for column in ("id", "source", "file", "exchanges", "from", "to", "imported at"):
        table.add_column(column, overflow="fold")

    def moment(text: str | None) -> str:
        return text[:19].replace("T", " ") if text else "-"

    for r in records:
        table.add_row(
            str(r["capture_id"]),
            r["source"],
            _shown(r["file"] or r["creator"] or "-"),
            str(r["exchanges"]),
            moment(r["first_at"]),
            moment(r["last_at"]),
            moment(r["imported_at"]),
        )
    console.print(table)
    total = sum(r["exchanges"] for r in records)
    console.print(f"{counted(len(records), 'capture')}, {counted(total, 'exchange')}", markup=False)
    for r in records:
        if r.get("damage"):
            console.print(f"capture {r['capture_id']} is damaged: {r['damage']}", markup=False)


def _pointer_text(capture: Record) -> str:
    name = (capture.get("file") or "").rsplit("/", 1)[-1]
    if capture["source"] == "har":
        return f"{name}#{capture['entry_index']}"
    return f"{capture['source']}:{capture.get('flow_id')}"


def print_chain_trees(records: list[Record], console: Console, verbose: bool = False) -> None:
    """Each chain as a tree; `verbose` (records read with headers): every hop's request
    headers against its follow-up's (`+` added, `-` dropped, `~` changed), the redirect's
    response headers, and the headers a finding names marked with it."""
    if not records:
        console.print("No chains.")
        return
    # Into a file or a pipe without colour the lines are written as they are: rich parses
    # and renders every line (a second for a thousand chains) to the same text.
    plain = console.color_system is None and not console.is_terminal
    st = _Style(plain)
    for chain in records:
        hops: list[tuple[str, list[str]]] = []
        for hop in chain["hops"]:
            src = hop["from"]
            label = (
                f"{st.text(src['method'])} {st.text(src['url'])} → {st.bold(hop['status'])}"
                + (" (browser-internal)" if src["synthetic"] else "")
                + f"  {st.dim(body_text(src['body']))}"
            )
            target = hop["to"]
            if target is None:
                end = st.red(chain["end"]) + (
                    f": Location {st.text(src['location'])}" if src["location"] else ""
                )
                hops.append((label, [end, *(_header_leaves(hop, st) if verbose else [])]))
                continue
            followed = (
                f"→ {st.text(target['method'])} {st.text(target['url'])} · "
                f"{target['status'] or st.text(target['error'])}  "
                f"{st.dim(body_text(target['body']))} · linked {hop['link']} ({hop['confidence']:.2f})"
            )
            leaves = [followed, *(st.yellow(f"! {change}") for change in hop["changes"])]
            hops.append((label, leaves + (_header_leaves(hop, st) if verbose else [])))
        root = (
            f"{st.bold(f'chain {chain["chain_id"]}')} · {st.text(chain['client_name'] or chain['client'])} · "
            f"{st.dim(chain['client'])} · {chain['started_at']} · "
            f"{counted(len(chain['hops']), 'hop')} · ends: {chain['end']}"
        )
        lines = tree_lines(root, hops)
        if plain:
            console.file.write("\n".join(lines) + "\n")
        else:
            console.print("\n".join(lines))


class _Style:
    """Text from a capture, and styles, as rich markup (control characters escaped, markup
    inert) or as plain text."""

    def __init__(self, plain: bool) -> None:
        self.plain = plain

    def text(self, value: object) -> str:
        return printable(value) if self.plain else _shown(value)

    def styled(self, style: str, value: object) -> str:
        return self.text(value) if self.plain else f"[{style}]{_shown(value)}[/]"

    def bold(self, value: object) -> str:
        return self.styled("bold", value)

    def dim(self, value: object) -> str:
        return self.styled("dim", value)

    def red(self, value: object) -> str:
        return self.styled("red", value)

    def yellow(self, value: object) -> str:
        return self.styled("yellow", value)


def _header_leaves(hop: Record, st: _Style) -> list[str]:
    """The hop's headers as tree leaves for `chains -v`: headings dim, a header a finding
    names in bold and marked with the finding."""
    leaves = []
    for kind, text, flagged in header_lines(hop):
        if kind == "header":
            leaves.append(st.bold(f"{text}   <- {', '.join(flagged)}") if flagged else st.text(text))
        else:
            leaves.append(st.dim(text))
    return leaves


HeaderLine = tuple[str, str, list[str]]


def header_lines(hop: Record) -> list[HeaderLine]:
    """A hop's headers, line by line, as `chains -v` and the HTML report show them: the
    request's against its follow-up's (`+` added, `-` dropped, `~` changed), then the
    redirect's response. Each line is (kind, text, findings): kind `heading` or `note`
    for words about the headers, `header` for one header as `<mark> <name>: <value>`;
    findings are the `RA115 credential-dropped` whose evidence names that header."""
    named: dict[str, list[str]] = {}
    for found in hop.get("evidence") or ():
        for name in found["headers"]:
            named.setdefault(name, []).append(f"{found['rule_id']} {found['rule']}")

    def line(mark: str, name: str, text: str) -> HeaderLine:
        return ("header", f"{mark} {name}: {text}", named.get(name.lower(), []))

    src, target = hop["from"], hop["to"]
    sent = src.get("request_headers")
    out: list[HeaderLine] = []
    if sent is None:
        out.append(("note", "request headers: not captured", []))
    elif not sent and not hop.get("header_changes"):
        out.append(("note", "request headers: none", []))
    else:
        changed = {c["name"].lower() for c in hop.get("header_changes") or ()}
        follow = (
            "" if target is None else " (the follow-up's where they differ: + added, - dropped, ~ changed)"
        )
        out.append(("heading", f"request headers{follow}:", []))
        out += [line(" ", name, _value(value)) for name, value in sent if name.lower() not in changed]
        for c in hop.get("header_changes") or ():
            if c["change"] == "~":
                out.append(line("~", c["name"], f"{_value(c['before'])} -> {_value(c['after'])}"))
            else:
                out.append(line(c["change"], c["name"], _value(c["value"])))
        if target is not None and target.get("request_headers") is None:
            out.append(("note", "(the follow-up's request headers were not captured)", []))
    answered = src.get("response_headers")
    if answered:
        out.append(("heading", f"response headers of the {hop['status']}:", []))
        out += [line(" ", name, _value(value)) for name, value in answered]
    return out


def _value(value: str) -> str:
    """A stored header value; a secret one is a keyed fingerprint, and says so."""
    return f"{value} (keyed fingerprint)" if "hmac:" in value else value


def tree_lines(root: str, children: list[tuple[str, list[str]]]) -> list[str]:
    """A two-level tree drawn with rich's guides, one string per line: a thousand chains
    print in a tenth of the time rich's Tree takes (a long line wraps without the guides)."""
    lines = [root]
    for i, (label, leaves) in enumerate(children):
        last = i == len(children) - 1
        lines.append(("└── " if last else "├── ") + label)
        indent = "    " if last else "│   "
        lines.extend(
            indent + ("└── " if j == len(leaves) - 1 else "├── ") + leaf for j, leaf in enumerate(leaves)
        )
    return lines


def body_text(body: Record) -> str:
    if body["length"] is None:
        return "body: not captured"
    if body["length"] == 0:
        return "body: empty"
    digest = (body["sha256"] or "?")[:12]
    return f"body: {body['length']} B digest:{digest} {printable(body['content_type'] or '')}"


def _shown(text: object) -> str:
    """Text from a capture for a rich console: control characters escaped, markup inert."""
    return escape(printable(text))


def print_conformance_table(rows: list[Record], console: Console) -> None:
    """frames.clients() as one table per client: what it did on each redirect next to the spec."""
    if not rows:
        console.print("No redirect hops in the store (import a capture, then run `redirect-audit analyze`).")
        return
    by_client: dict[str, list[Record]] = {}
    for row in rows:
        by_client.setdefault(row["client_name"], []).append(row)
    for name, cases in by_client.items():
        table = Table(
            title=f"{_shown(name)}: what it did (spec: RFC 9110 / Fetch)",
            title_justify="left",
            header_style="bold",
        )
        for column in (
            "case",
            "seen",
            "method",
            "body",
            "body hdrs",
            "creds x-origin",
            "auth same-origin",
            "auth x-origin",
            "verdict",
        ):
            table.add_column(column, overflow="fold")
        for r in cases:
            style = {
                "deviated": "red",
                "not followed": "yellow",
                "allowed, body lost": "yellow",
                "allowed": "cyan",
            }.get(r["verdict"], "green")
            table.add_row(
                f"{r['status']} {_shown(r['method'])}",
                f"{r['followed']}/{r['hops']}",
                _against(r["did_method"], r["should_method"], r["followed"]),
                _against(r["did_body"], r["should_body"], r["followed"]),
                str(r["body_headers_kept"]) if r["body_headers_kept"] else "-",
                f"{r['credentials_cross_origin']}/{r['cross_origin_hops']}"
                if r["cross_origin_hops"]
                else "-",
                _auth_against(r.get("auth_same_origin", "-"), "kept"),
                _auth_against(r.get("auth_cross_origin", "-"), "dropped"),
                f"[{style}]{r['verdict']}[/]",
            )
        console.print(table)
        fired = sorted({rule for r in cases for rule in r["rules"]})
        if fired:
            console.print(f"  rules fired: {', '.join(fired)}", highlight=False)
    deviating = sorted({r["client_name"] for r in rows if r["verdict"] == "deviated"})
    console.print(
        f"{counted(len(by_client), 'client')}, {counted(len(rows), '(status, method) case')}; "
        f"deviating: {_shown(', '.join(deviating)) if deviating else 'none'}",
        highlight=False,
    )
    console.print(
        "seen: followed/hops · creds x-origin: follow-ups that carried a credential to a new origin"
        " / follow-ups to a new origin · auth: what the client did with Authorization or an API key"
        " (Fetch: kept on the same origin, dropped on another)",
        style="dim",
        highlight=False,
    )


def _auth_against(did: str, should: str) -> str:
    """A tally of kept/dropped/... against what Fetch does; '-' when no follow-up had one."""
    if did == "-":
        return "-"
    return _shown(did) if did == should else f"[red]{_shown(did)}[/] [dim]\\[Fetch: {should}][/]"


def _against(did: str, should: str, followed: int) -> str:
    """'GET' when the client did what the spec says, else 'did [spec: should]'."""
    if not followed:
        return "[yellow]not followed[/]"
    if did == should or (should == "dropped" and did == "not captured"):
        return _shown(did)
    return f"[red]{_shown(did)}[/] [dim]\\[spec: {_shown(should)}][/]"
