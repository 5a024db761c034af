"""Reading results back out of the store as records, and rendering them.

Records are plain dicts in the JSON contract of design.md; the terminal renderers
(rich table, rich tree) and the JSON/JSONL writers all start from them.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.tree import Tree
from sqlalchemy import select
from sqlalchemy.engine import Connection
from sqlalchemy.orm import aliased

from analyzer.model import Severity
from analyzer.store import captures, chains, exchanges, findings, hops

SEVERITY_STYLE = {"high": "bold red", "medium": "yellow", "low": "cyan", "info": "dim"}


def iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def capture_pointer(source: str, path: str | None, seq: int, flow_id: str | None) -> dict:
    """Where an exchange came from: HAR file + 0-based entry index, or a flow id."""
    if source == "har":
        return {"source": "har", "file": path, "entry_index": seq}
    return {"source": source, "file": path, "flow_id": flow_id}


def finding_records(conn: Connection, min_severity: Severity = Severity.INFO) -> list[dict]:
    a, b = aliased(exchanges), aliased(exchanges)
    stmt = (
        select(findings, a.c.status, a.c.method.label("m0"), b.c.method.label("m1"), a.c.url.label("u0"),
               b.c.url.label("u1"), a.c.location_resolved, b.c.client, b.c.seq, b.c.flow_id, captures.c.source, captures.c.path)
        .join(a, a.c.id == findings.c.from_exchange_id)
        .join(b, b.c.id == findings.c.to_exchange_id)
        .join(captures, captures.c.id == b.c.capture_id)
        .where(findings.c.severity_rank >= int(min_severity))
        .order_by(findings.c.id)
    )
    return [_finding_record(row._mapping) for row in conn.execute(stmt)]


def _finding_record(r) -> dict:
    about_redirect = r["from_exchange_id"] == r["to_exchange_id"] and r["location_resolved"] is not None
    return {
        "rule": r["rule"], "rule_id": r["rule_id"], "severity": r["severity"], "confidence": r["confidence"],
        "message": r["message"], "chain_id": r["chain_id"], "hop": r["hop"], "status": r["status"],
        "method_before": r["m0"], "method_after": None if about_redirect else r["m1"], "from_url": r["u0"],
        "to_url": r["location_resolved"] if about_redirect else r["u1"],
        "client": r["client"], "observed_at": iso(r["observed_at"]), "evidence": json.loads(r["evidence"]),
        "fingerprint": r["fingerprint"],
        "capture": capture_pointer(r["source"], r["path"], r["seq"], r["flow_id"]),
    }


EXCHANGE_FIELDS = ("id", "method", "url", "status", "started_at", "req_body_len", "req_body_sha256",
                   "req_content_type", "location", "synthetic", "seq", "flow_id", "client", "error")


def chain_records(conn: Connection, url_substring: str | None = None) -> list[dict]:
    """Every chain hop by hop; with url_substring, only chains where some URL contains it."""
    ex_cols = [exchanges.c[n] for n in EXCHANGE_FIELDS] + [captures.c.source, captures.c.path]
    rows = conn.execute(
        select(*ex_cols).join(captures, captures.c.id == exchanges.c.capture_id).where(
            exchanges.c.id.in_(select(hops.c.from_exchange_id)) | exchanges.c.id.in_(select(hops.c.to_exchange_id))
        )
    )
    by_id = {row.id: _exchange_record(row._mapping) for row in rows}
    out: dict[int, dict] = {}
    for c in conn.execute(select(chains).order_by(chains.c.id)):
        out[c.id] = {"chain_id": c.id, "client": c.client, "end": c.end_reason, "started_at": iso(c.started_at),
                     "hops": []}
    for h in conn.execute(select(hops).order_by(hops.c.chain_id, hops.c.idx)):
        source, target = by_id[h.from_exchange_id], by_id.get(h.to_exchange_id)
        out[h.chain_id]["hops"].append({
            "hop": h.idx, "status": h.status, "link": h.link, "confidence": h.confidence,
            "from": source, "to": target, "changes": hop_changes(source, target),
        })
    records = list(out.values())
    if url_substring:
        records = [c for c in records if any(url_substring in u for u in _urls(c))]
    return records


def _urls(chain: dict) -> Iterator[str]:
    for hop in chain["hops"]:
        yield hop["from"]["url"]
        if hop["to"]:
            yield hop["to"]["url"]


def _exchange_record(r) -> dict:
    return {
        "id": r["id"], "method": r["method"], "url": r["url"], "status": r["status"],
        "started_at": iso(r["started_at"]), "location": r["location"], "synthetic": bool(r["synthetic"]),
        "error": r["error"],
        "body": {"length": r["req_body_len"], "sha256": r["req_body_sha256"], "content_type": r["req_content_type"]},
        "capture": capture_pointer(r["source"], r["path"], r["seq"], r["flow_id"]),
    }


def hop_changes(source: dict, target: dict | None) -> list[str]:
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


def write_json(records: list[dict], out) -> None:
    json.dump(records, out, indent=2, ensure_ascii=False)
    out.write("\n")


def write_jsonl(records: Iterable[dict], out) -> None:
    for record in records:
        out.write(json.dumps(record, ensure_ascii=False) + "\n")


def print_findings_table(records: list[dict], console: Console) -> None:
    """One block per finding: severity and rule, the hop, then what happened."""
    if not records:
        console.print("No findings.")
        return
    for r in records:
        where = f"chain {r['chain_id']} hop {r['hop']}" if r["chain_id"] is not None else "no chain"
        style = SEVERITY_STYLE[r["severity"]]
        console.print(
            f"[{style}]{r['severity'].upper():<6}[/] [bold]{r['rule']}[/] ({r['rule_id']}) · {where} · "
            f"confidence {r['confidence']:.2f} · {escape(_pointer_text(r['capture']))}"
        )
        hop = f"{r['method_before']} {r['from_url']} → {r['status']} → {r['method_after'] or 'Location'} {r['to_url']}"
        console.print(f"       {escape(hop)}", style="dim", highlight=False)
        console.print(f"       {escape(r['message'])}", highlight=False)
    counts = Counter(r["severity"] for r in records)
    summary = ", ".join(f"{counts[s]} {s}" for s in ("high", "medium", "low", "info") if counts[s])
    console.print(f"\n{len(records)} finding(s): {summary}")


def _pointer_text(capture: dict) -> str:
    name = (capture.get("file") or "").rsplit("/", 1)[-1]
    if capture["source"] == "har":
        return f"{name}#{capture['entry_index']}"
    return f"{capture['source']}:{capture.get('flow_id')}"


def print_chain_trees(records: list[dict], console: Console) -> None:
    if not records:
        console.print("No chains.")
        return
    for chain in records:
        tree = Tree(f"[bold]chain {chain['chain_id']}[/] · {chain['client']} · {chain['started_at']} · "
                    f"{len(chain['hops'])} hop(s) · ends: {chain['end']}")
        for hop in chain["hops"]:
            src = hop["from"]
            node = tree.add(f"{src['method']} {src['url']} → [bold]{hop['status']}[/]"
                            + (" (browser-internal)" if src["synthetic"] else "") + f"  {_body_text(src['body'])}")
            target = hop["to"]
            if target is None:
                node.add(f"[red]{chain['end']}[/]" + (f": Location {src['location']}" if src["location"] else ""))
                continue
            node.add(f"→ {target['method']} {target['url']} · {target['status'] or target['error']}  "
                     f"{_body_text(target['body'])} · linked {hop['link']} ({hop['confidence']:.2f})")
            for change in hop["changes"]:
                node.add(f"[yellow]! {change}[/]")
        console.print(tree)


def _body_text(body: dict) -> str:
    if body["length"] is None:
        return "[dim]body: not captured[/]"
    if body["length"] == 0:
        return "[dim]body: empty[/]"
    digest = (body["sha256"] or "?")[:12]
    return f"[dim]body: {body['length']} B sha256:{digest} {body['content_type'] or ''}[/]"


def print_conformance_table(rows: list[dict], console: Console) -> None:
    """frames.clients() as one table per client: what it did on each redirect next to the spec."""
    if not rows:
        console.print("No redirect hops in the store (import a capture, then run `redirect-audit analyze`).")
        return
    by_client: dict[str, list[dict]] = {}
    for row in rows:
        by_client.setdefault(row["client_name"], []).append(row)
    for name, cases in by_client.items():
        table = Table(title=f"{escape(name)}: what it did (spec: RFC 9110 / Fetch)", title_justify="left",
                      header_style="bold")
        for column in ("case", "seen", "method", "body", "body hdrs", "creds x-origin", "verdict"):
            table.add_column(column, overflow="fold")
        for r in cases:
            style = {"deviated": "red", "not followed": "yellow"}.get(r["verdict"], "green")
            table.add_row(
                f"{r['status']} {r['method']}", f"{r['followed']}/{r['hops']}",
                _against(r["did_method"], r["should_method"], r["followed"]),
                _against(r["did_body"], r["should_body"], r["followed"]),
                str(r["body_headers_kept"]) if r["body_headers_kept"] else "-",
                f"{r['credentials_cross_origin']}/{r['cross_origin_hops']}" if r["cross_origin_hops"] else "-",
                f"[{style}]{r['verdict']}[/]",
            )
        console.print(table)
        fired = sorted({rule for r in cases for rule in r["rules"]})
        if fired:
            console.print(f"  rules fired: {', '.join(fired)}", highlight=False)
    deviating = sorted({r["client_name"] for r in rows if r["verdict"] == "deviated"})
    console.print(f"{len(by_client)} client(s), {len(rows)} (status, method) case(s); "
                  f"deviating: {', '.join(deviating) if deviating else 'none'}", highlight=False)
    console.print("seen: followed/hops · creds x-origin: follow-ups that carried a credential to a new origin"
                  " / follow-ups to a new origin", style="dim", highlight=False)


def _against(did: str, should: str, followed: int) -> str:
    """'GET' when the client did what the spec says, else 'did [spec: should]'."""
    if not followed:
        return "[yellow]not followed[/]"
    if did == should or (should == "dropped" and did == "not captured"):
        return escape(did)
    return f"[red]{escape(did)}[/] [dim]\\[spec: {escape(should)}][/]"
