"""`findings --format html`: one self-contained HTML file with the plots and a table per rule.

The figures are PNGs embedded as data URIs and the styles are inline, so the file can
be mailed or attached to a ticket and opens anywhere, offline, with no script at all.
"""

from __future__ import annotations

import base64
import io
from collections import Counter
from datetime import UTC, datetime

from jinja2 import Environment, PackageLoader, select_autoescape
from matplotlib.figure import Figure

from analyzer import frames, plots
from analyzer.detectors import RULES
from analyzer.report import hop_text
from analyzer.storeread import url_shown

SEVERITIES = ("high", "medium", "low", "info")


def _png(fig: Figure, title: str) -> dict:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=96)
    width, height = (int(v * 96) for v in fig.get_size_inches())
    return {
        "title": title,
        "png": base64.b64encode(buffer.getvalue()).decode(),
        "width": width,
        "height": height,
    }


def _pointer(capture: dict) -> str:
    if capture.get("entry_index") is not None:
        return f"{capture.get('file')} entry {capture['entry_index']}"
    return f"{capture.get('source')} flow {capture.get('flow_id')}"


def render(db: str | None, records: list[dict]) -> str:
    hops = frames.hops(db)
    chains = frames.chains(db)
    figures = [
        _png(plots.findings_by_rule(frames.findings(db)), "Findings by rule and severity"),
        _png(plots.chain_lengths(chains), "Chain length distribution"),
        _png(
            plots.redirect_graph(hops), "Redirects between hosts (orange: cross-origin, red: HTTPS to HTTP)"
        ),
        _png(plots.temporary_timeline(frames.temporary_redirects(db)), "Temporary redirects over time"),
        _png(plots.conformance_heatmap(hops), "Client conformance by status and method"),
    ]
    by_rule = {rule.slug: [] for rule in RULES}
    for r in records:
        by_rule.setdefault(r["rule"], []).append(
            {**r, "pointer": _pointer(r["capture"]), "follow": hop_text(r).split(" → ", 1)[1]}
        )
    rules = [
        {
            "id": rule.id,
            "slug": rule.slug,
            "summary": rule.summary,
            "doc": rule.doc,
            "findings": by_rule[rule.slug],
        }
        for rule in RULES
    ]
    counts = Counter(r["severity"] for r in records)
    env = Environment(
        loader=PackageLoader("analyzer", "templates"), autoescape=select_autoescape(["html", "j2"])
    )
    exchanges = frames.exchanges(db, columns=("id",))
    return env.get_template("report.html.j2").render(
        store=url_shown(frames.resolve_db_url(db)),
        generated=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        exchanges=len(exchanges),
        chains=len(chains),
        figures=figures,
        rules=rules,
        counts=[(s, counts[s]) for s in SEVERITIES if counts[s]],
    )
