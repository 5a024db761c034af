"""`findings --format html`: one self-contained HTML file that leads with what matters.

A summary first (findings by severity, chains, clients, captures and their time span),
then every finding ordered by severity and rule, each with its hop on one line, the
message, the fix and the whole chain behind a disclosure; then the rules that found
nothing, in one line; then the figures. Filters (severity, rule, client, host) and
sortable columns are a few lines of inline script; the figures are PNGs in data URIs and
the styles are inline, so the file can be mailed or attached to a ticket and opens
anywhere, offline. Without script, every finding is shown in its order.
"""

from __future__ import annotations

import base64
import io
import re
import warnings
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import PurePath
from urllib.parse import urlsplit

import pandas as pd
from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup, escape
from matplotlib.figure import Figure

from analyzer import frames, plots
from analyzer.detectors import RULES, RULES_BY_SLUG
from analyzer.report import Record, capture_records, hop_text
from analyzer.storeread import open_reader, resolve_db_url, url_shown

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


def _chains(hops: pd.DataFrame) -> dict[int, list[str]]:
    """Every chain hop by hop, one line per hop."""
    out: dict[int, list[str]] = {}
    for row in hops.sort_values(["chain_id", "hop"]).itertuples():
        if row.followed:
            follow = f"{row.method_after} {row.to_url}"
        else:
            follow = (
                f"not followed (Location {row.to_url})" if isinstance(row.to_url, str) else "not followed"
            )
        out.setdefault(int(row.chain_id), []).append(
            f"{row.method_before} {row.from_url} → {row.status} → {follow}"
        )
    return out


def _client(r: Record) -> str | None:
    """The client's readable name without the test (the filter groups a client's tests)."""
    name = r.get("client_name")
    test = r.get("test")
    if name and test and name.endswith(f" · {test}"):
        return str(name[: -len(test) - 3])
    return name


def _findings(records: list[Record], hops: pd.DataFrame) -> list[Record]:
    names = dict(zip(hops["chain_id"].astype(int), hops["client_name"].astype(str), strict=False))
    chains = _chains(hops)
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
                "chain": chains.get(r["chain_id"], []),
            }
        )
    rows.sort(key=lambda f: (RANK.get(f["severity"], 9), f["rule_id"], -f["confidence"], f["finding_id"]))
    return rows


def _summary(db: str | None, records: list[Record], hops: pd.DataFrame, chains: pd.DataFrame) -> Record:
    reader = open_reader(db)
    try:
        captures = capture_records(reader)
    finally:
        reader.close()
    for c in captures:
        c["name"] = PurePath(c["file"]).name if c["file"] else c["source"]
    starts = [c["first_at"] for c in captures if c["first_at"]]
    ends = [c["last_at"] for c in captures if c["last_at"]]
    counts = Counter(r["severity"] for r in records)
    return {
        "counts": [(s, counts[s]) for s in SEVERITIES],
        "findings": len(records),
        "chains": len(chains),
        "clients": hops["client_name"].nunique() if len(hops) else 0,
        "exchanges": sum(c["exchanges"] or 0 for c in captures),
        "captures": captures,
        "span": (min(starts)[:16].replace("T", " "), max(ends or starts)[:16].replace("T", " "))
        if starts
        else None,
    }


def _figures(db: str | None, hops: pd.DataFrame, chains: pd.DataFrame) -> tuple[list[Record], list[str]]:
    """The figures that have something to show, as PNGs, and the titles of those that do not."""
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


def render(db: str | None, records: list[Record]) -> str:
    hops = frames.hops(db)
    chains = frames.chains(db)
    found = _findings(records, hops)
    fired = {f["rule"] for f in found}
    figures, undrawn = _figures(db, hops, chains)
    env = Environment(
        loader=PackageLoader("analyzer", "templates"), autoescape=select_autoescape(["html", "j2"])
    )
    env.filters["breakable"] = breakable
    return env.get_template("report.html.j2").render(
        store=url_shown(resolve_db_url(db)),
        generated=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        summary=_summary(db, records, hops, chains),
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
