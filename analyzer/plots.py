"""matplotlib figures over `analyzer.frames` DataFrames; each function returns a Figure.

    findings_by_rule(findings)              stacked bars: findings per rule, by severity
    chain_lengths(chains)                   histogram of hops per chain
    redirect_graph(hops)                    host -> host graph, edge width = hops; cross-origin
                                            and HTTPS -> HTTP edges highlighted
    temporary_timeline(temporary_redirects) first to last sighting per source -> target,
                                            with the stale threshold drawn
    conformance_heatmap(hops)               client x (status, method): followed as specified /
                                            deviated / not followed

They build Figure objects directly (no pyplot state), so they work headless, in
reports and inside notebooks alike: `fig.savefig(...)`, or let Jupyter display it.
"""

from __future__ import annotations

import math
from typing import Any

import matplotlib.dates as mdates
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.axis import Axis
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, Patch, Rectangle
from matplotlib.ticker import MaxNLocator

from analyzer.detectors.base import DEFAULT_STALE_AFTER_DAYS
from analyzer.text import printable

SEVERITIES = ["high", "medium", "low", "info"]
# Okabe-Ito, as in the HTML report: told apart with any colour vision
SEVERITY_COLORS = {"high": "#d55e00", "medium": "#e69f00", "low": "#0072b2", "info": "#bbbbbb"}


def shorten(text: str, width: int = 42) -> str:
    """`text` cut in the middle to `width` characters: `shop.example…/v1/payments`. The host
    and the end of a path say the most; the middle of a long URL says the least."""
    text = printable(text)
    if len(text) <= width:
        return text
    head = (width - 1) // 2
    return text[:head] + "…" + text[len(text) - (width - 1 - head) :]


def unique_labels(texts: list[str], width: int = 42) -> list[str]:
    """Shortened labels, made distinct: two that shorten alike keep more of their end,
    and any still alike are numbered."""
    labels = [shorten(t, width) for t in texts]
    seen: dict[str, int] = {}
    for i, (label, text) in enumerate(zip(labels, texts, strict=True)):
        if labels.count(label) > 1 and len(printable(text)) > width:
            labels[i] = "…" + printable(text)[-(width - 1) :]
    for i, label in enumerate(labels):
        seen[label] = seen.get(label, 0) + 1
        if labels.count(label) > 1:
            labels[i] = f"{label} ({seen[label]})"
    return labels


def _url_label(url: str, width: int) -> str:
    """host/path of a URL, its query as `?…`: tracking parameters say nothing in a label."""
    rest = str(url).split("://", 1)[-1]
    path, query = rest.split("?", 1) if "?" in rest else (rest, "")
    return shorten(path + ("?…" if query else ""), width)


def origin_label(origin: object) -> str:
    """An origin as shown in a figure: the scheme kept (http and https of one host are two
    origins), the default port dropped; a redirect with no usable Location has no target."""
    if not isinstance(origin, str) or not origin:
        return "(no target)"
    return origin.removesuffix(":443") if origin.startswith("https://") else origin.removesuffix(":80")


def _figure(size: tuple[float, float], title: str) -> tuple[Figure, Axes]:
    fig = Figure(figsize=size, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title)
    return fig, ax


def _empty(fig: Figure, ax: Axes, text: str) -> Figure:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.set_axis_off()
    return fig


def findings_by_rule(findings: pd.DataFrame) -> Figure:
    if findings.empty:
        fig, ax = _figure((8, 3), "Findings by rule and severity")
        return _empty(fig, ax, "no findings")
    table = findings.assign(
        severity=findings["severity"].astype(str), label=findings["rule_id"] + " " + findings["rule"]
    ).pivot_table(index="label", columns="severity", values="message", aggfunc="count", fill_value=0)
    fig, ax = _figure((8, 1.4 + 0.42 * len(table)), "Findings by rule and severity")
    bottom = np.zeros(len(table))
    for severity in SEVERITIES:
        if severity in table:
            ax.barh(
                table.index,
                table[severity],
                left=bottom,
                height=0.6,
                color=SEVERITY_COLORS[severity],
                label=severity,
            )
            bottom += table[severity].to_numpy()
    ax.set_xlabel("findings")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.invert_yaxis()
    ax.legend(title="severity", loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    return fig


LENGTH_CAP = 25  # chains longer than this share one bar; Fetch gives up after 20 redirects


def chain_lengths(chains: pd.DataFrame) -> Figure:
    """How many chains have 1, 2, ... hops: an integer axis from 1 to the longest (at least
    5, so one length reads as one bar among the lengths that did not occur), lengths past
    LENGTH_CAP in one last bar, a log scale when counts differ by more than 50 times. A
    bar per length, not per hop: a 20,000-hop chain is one bar, drawn at once."""
    fig, ax = _figure((6, 4), "Hops per chain")
    if chains.empty:
        return _empty(fig, ax, "no chains")
    longest = int(chains["hops"].max())
    lengths = chains["hops"].astype(int).clip(upper=LENGTH_CAP + 1)
    counts = lengths.value_counts().sort_index()
    positions = range(1, max(min(longest, LENGTH_CAP + 1), 5) + 1)
    bars = ax.bar(counts.index, counts.to_numpy(), color="#0072b2", edgecolor="white", width=0.7)
    ax.bar_label(bars, fontsize=8)
    ax.set_xticks(list(positions), [str(n) if n <= LENGTH_CAP else f">{LENGTH_CAP}" for n in positions])
    ax.tick_params(axis="x", labelsize=8 if len(positions) > 15 else 10)
    ax.set_xlim(0.4, positions[-1] + 0.6)
    if counts.max() > 50 * counts.min():
        ax.set_yscale("log")
    ax.margins(y=0.15)
    ax.set_xlabel("hops per chain" + (f" (longest: {longest})" if longest > LENGTH_CAP else ""))
    ax.set_ylabel("chains")
    if ax.get_yscale() == "linear":
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    return fig


OTHER = "other origins"


def redirect_graph(hops: pd.DataFrame, max_hosts: int = 16, max_edges: int = 60) -> Figure:
    """Origins (scheme, host, port) as nodes on a circle, the busiest `max_hosts` by hops;
    the rest share one node, so the graph stays legible at any number of hosts."""
    fig, ax = _figure((10, 6.5), "Redirects between origins")
    if hops.empty:
        return _empty(fig, ax, "no redirects")
    hosts, edges = _origin_edges(hops, max_hosts)
    if len(edges) > max_edges:  # the busiest links; a hairball of rare ones hides them
        ax.set_title(f"Redirects between origins (the {max_edges} busiest of {len(edges)} links)")
        edges = edges.nlargest(max_edges, "count", keep="first")
    angle = {h: math.pi / 2 - 2 * math.pi * i / len(hosts) for i, h in enumerate(hosts)}
    pos = {h: (math.cos(a), math.sin(a)) for h, a in angle.items()}
    top = edges["count"].max()
    for row in edges.itertuples():
        _edge(ax, pos, row, 1 + 6 * row.count / top)
    _nodes(ax, pos)
    ax.legend(
        handles=[Patch(color=color, label=label) for label, color in EDGE_COLORS.items()],
        loc="upper left",
        bbox_to_anchor=(0, -0.02),
        ncols=4,
        fontsize=9,
    )
    ax.set_xlim(-2.1, 2.1)
    ax.set_ylim(-1.35, 1.35)
    ax.set_aspect("equal")
    ax.set_axis_off()
    return fig


EDGE_COLORS = {
    "same origin": "#7f8c8d",
    "cross-origin": "#e69f00",
    "HTTP -> HTTPS, same host": "#56b4e9",
    "HTTPS -> HTTP": "#d55e00",
}


def _origin_edges(hops: pd.DataFrame, max_hosts: int) -> tuple[list[str], pd.DataFrame]:
    """The origins busiest first (past `max_hosts`, one "N other origins" node) and the
    links between them: count, any cross-origin hop, any HTTPS -> HTTP hop."""
    frame = hops.assign(src=hops["from_origin"].map(origin_label), dst=hops["to_origin"].map(origin_label))
    weight = pd.concat([frame["src"], frame["dst"]]).value_counts()
    kept = set(weight.index[:max_hosts])
    if len(weight) > len(kept):
        other = f"{len(weight) - len(kept)} {OTHER}"
        frame["src"] = frame["src"].where(frame["src"].isin(kept), other)
        frame["dst"] = frame["dst"].where(frame["dst"].isin(kept), other)
    edges = (
        frame.groupby(["src", "dst"])
        .agg(count=("hop", "size"), cross=("cross_origin", "any"), downgrade=("https_to_http", "any"))
        .reset_index()
    )
    return list(pd.concat([frame["src"], frame["dst"]]).value_counts().index), edges


def _nodes(ax: Axes, pos: dict[str, tuple[float, float]]) -> None:
    """Each origin as a dot, its label pointing away from the circle's centre."""
    for host, label in zip(pos, unique_labels(list(pos), 34), strict=True):
        x, y = pos[host]
        ax.plot(x, y, "o", color="#2c3e50", markersize=9)
        ax.annotate(
            label,
            (x, y),
            xytext=(8 * x, 8 * y),
            textcoords="offset points",
            ha="left" if x > 0.05 else ("right" if x < -0.05 else "center"),
            va="bottom" if y > 0.05 else ("top" if y < -0.05 else "center"),
            fontsize=9,
        )


def _is_upgrade(src: str, dst: str) -> bool:
    """http://host -> https://host (default ports): HSTS or a server's upgrade, not a new host."""
    return src.startswith("http://") and dst == "https://" + src.removeprefix("http://")


def _edge(ax: Axes, pos: dict[str, tuple[float, float]], row: Any, width: float) -> None:
    if row.downgrade:
        color = EDGE_COLORS["HTTPS -> HTTP"]
    elif _is_upgrade(row.src, row.dst):
        color = EDGE_COLORS["HTTP -> HTTPS, same host"]
    else:
        color = EDGE_COLORS["cross-origin" if row.cross else "same origin"]
    if row.src == row.dst:
        x, y = pos[row.src]
        start, end, style = (x, y), (x * 1.001, y * 1.001), "arc3,rad=3"
    else:
        start, end, style = pos[row.src], pos[row.dst], "arc3,rad=0.15"
    ax.add_patch(
        FancyArrowPatch(
            start,
            end,
            connectionstyle=style,
            arrowstyle="-|>",
            mutation_scale=14,
            linewidth=width,
            color=color,
            shrinkA=12 if row.src != row.dst else 0,
            shrinkB=12 if row.src != row.dst else 0,
        )
    )


def date_axis(axis: Axis) -> None:
    """Date ticks for any span, from milliseconds to centuries, with no warning.

    AutoDateLocator takes the coarsest unit with at least `minticks` ticks, then the first
    of that unit's intervals giving at most `maxticks`. Its default `minticks` of 5 with
    fewer `maxticks` leaves gaps: 3.4 to 4.4 years fall below 5 yearly ticks and above
    6-monthly x 7, and it warns. With `minticks` 3 every unit hands over to the next finer
    one before that one runs out of intervals (3 years = 36 months <= 6 x 7; 3 months
    <= 14 days x 7; 3 days <= 12 hours x 7; 3 hours and 3 minutes <= 30 x 7).
    """
    locator = mdates.AutoDateLocator(minticks=3, maxticks=8)  # type: ignore[no-untyped-call]  # matplotlib.dates is unannotated
    axis.set_major_locator(locator)
    axis.set_major_formatter(mdates.ConciseDateFormatter(locator))  # type: ignore[no-untyped-call]  # as above


def temporary_timeline(
    temporary: pd.DataFrame, stale_after_days: float = DEFAULT_STALE_AFTER_DAYS, max_rows: int = 40
) -> Figure:
    rows = temporary.sort_values("first_seen").tail(max_rows)
    fig, ax = _figure(
        (10, 1.8 + 0.32 * max(len(rows), 1)),
        f"Temporary redirects over time (stale after {stale_after_days:g} days)",
    )
    if rows.empty:
        return _empty(fig, ax, "no temporary redirects")
    labels = unique_labels(
        [
            f"{_url_label(s, 34)} → {_url_label(t, 34)}"
            for s, t in zip(rows["source"], rows["target"], strict=True)
        ],
        72,
    )
    first = rows["first_seen"].dt.tz_convert(None)
    last = rows["last_seen"].dt.tz_convert(None)
    y = np.arange(len(rows))
    colors = [STALE if stale else FRESH for stale in rows["stale"]]
    ax.hlines(y, first, last, colors=colors, linewidth=4)
    ax.scatter(first, y, color=colors, s=18, zorder=3)
    ax.scatter(last, y, color=colors, s=18, zorder=3)
    deadline = first + pd.Timedelta(days=stale_after_days)
    threshold = ax.scatter(deadline, y, marker="|", s=160, color="#2c3e50", zorder=4, label="stale threshold")
    ax.set_yticks(y, labels, fontsize=7)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    date_axis(ax.xaxis)
    ax.margins(x=0.05)
    ax.legend(
        handles=[Patch(color=FRESH, label="within threshold"), Patch(color=STALE, label="stale"), threshold],
        loc="upper left",
        bbox_to_anchor=(0, -0.08),
        ncols=3,
        fontsize=8,
    )
    return fig


# Okabe-Ito colours, told apart with any colour vision; "deviated" is also hatched.
VERDICT_STYLE = {  # the verdicts of analyzer.detectors.verdict
    "as specified": ("#0072b2", ""),
    "allowed": ("#56b4e9", ""),
    "allowed, body lost": ("#f0e442", ""),
    "deviated": ("#d55e00", "////"),
    "not followed": ("#bbbbbb", ".."),
}
FRESH, STALE = "#0072b2", "#d55e00"


def conformance_heatmap(hops: pd.DataFrame) -> Figure:
    """Client x (status, method): the worst verdict of that client's hops, the same verdict as
    the rules give (POST -> GET on 301/302 is "allowed, body lost", which RA101 reports low)."""
    if hops.empty:
        fig, ax = _figure((10, 3), "Client conformance (RFC 9110 / Fetch) by redirect status and method")
        return _empty(fig, ax, "no redirects")
    order = list(VERDICT_STYLE)
    frame = hops.assign(
        case=hops["status"].astype(int).astype(str) + " " + hops["method_before"].astype(str),
        code=hops["verdict"].astype(str).map({v: i for i, v in enumerate(order)}),
    )
    grid = frame.pivot_table(index="client_name", columns="case", values="code", aggfunc=_worst)
    grid = grid.reindex(columns=sorted(grid.columns, key=lambda c: (int(c.split()[0]), c.split()[1])))
    rows, cols = grid.shape
    fig, ax = _figure((max(6.0, 2.5 + 0.45 * cols + 2.2), 1.9 + 0.38 * rows), "")
    # over the whole figure: centred over a grid of one or two columns, it would run off the page
    fig.suptitle("Client conformance (RFC 9110 / Fetch) by redirect status and method")
    for (r, c), code in np.ndenumerate(grid.to_numpy(dtype=float)):
        if not np.isnan(code):
            color, hatch = VERDICT_STYLE[order[int(code)]]
            ax.add_patch(
                Rectangle(
                    (c - 0.5, r - 0.5), 1, 1, facecolor=color, hatch=hatch, edgecolor="white", linewidth=1.5
                )
            )
    ax.set_xlim(-0.5, cols - 0.5)
    ax.set_ylim(rows - 0.5, -0.5)
    ax.set_xticks(range(cols), [printable(c) for c in grid.columns], rotation=90, fontsize=7)
    ax.set_yticks(range(rows), unique_labels([str(r) for r in grid.index], 28), fontsize=8)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    ax.legend(
        handles=[
            Patch(facecolor=c, hatch=h, edgecolor="white", label=v) for v, (c, h) in VERDICT_STYLE.items()
        ],
        loc="upper left",
        bbox_to_anchor=(1.01, 1),
        fontsize=8,
    )
    return fig


def _worst(codes: pd.Series) -> float:
    """The worst verdict of a cell, in analyzer.detectors.verdict's order."""
    from analyzer.detectors.verdict import VERDICT_ORDER

    order = list(VERDICT_STYLE)
    values = set(codes.dropna().astype(int))
    for verdict in VERDICT_ORDER:
        if order.index(verdict) in values:
            return float(order.index(verdict))
    return float("nan")
