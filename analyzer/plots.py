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

import numpy as np
import pandas as pd
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, Patch

from analyzer.detectors.base import DEFAULT_STALE_AFTER_DAYS
from analyzer.text import printable

SEVERITIES = ["high", "medium", "low", "info"]
SEVERITY_COLORS = {"high": "#c0392b", "medium": "#e67e22", "low": "#2e86c1", "info": "#95a5a6"}
VERDICTS = ["as specified", "deviated", "not followed"]
VERDICT_COLORS = ["#27ae60", "#c0392b", "#bdc3c7"]


def _figure(size: tuple[float, float], title: str):
    fig = Figure(figsize=size, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title)
    return fig, ax


def _empty(fig: Figure, ax, text: str) -> Figure:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.set_axis_off()
    return fig


def findings_by_rule(findings: pd.DataFrame) -> Figure:
    fig, ax = _figure((8, 4), "Findings by rule and severity")
    if findings.empty:
        return _empty(fig, ax, "no findings")
    table = findings.assign(
        severity=findings["severity"].astype(str), label=findings["rule_id"] + " " + findings["rule"]
    ).pivot_table(index="label", columns="severity", values="message", aggfunc="count", fill_value=0)
    bottom = np.zeros(len(table))
    for severity in SEVERITIES:
        if severity in table:
            ax.barh(
                table.index, table[severity], left=bottom, color=SEVERITY_COLORS[severity], label=severity
            )
            bottom += table[severity].to_numpy()
    ax.set_xlabel("findings")
    ax.invert_yaxis()
    ax.legend(title="severity", loc="lower right")
    return fig


LENGTH_CAP = 25  # chains longer than this share one bar; Fetch gives up after 20 redirects


def chain_lengths(chains: pd.DataFrame) -> Figure:
    """How many chains have 1, 2, ... hops: one bar per length that occurs, lengths past
    LENGTH_CAP in one last bar, a log scale when counts differ by more than 50 times. A
    bar per length, not per hop: a 20,000-hop chain is one bar, drawn at once."""
    fig, ax = _figure((6, 4), "Chain length")
    if chains.empty:
        return _empty(fig, ax, "no chains")
    lengths = chains["hops"].astype(int).clip(upper=LENGTH_CAP + 1)
    counts = lengths.value_counts().sort_index()
    labels = [str(n) if n <= LENGTH_CAP else f">{LENGTH_CAP}" for n in counts.index]
    ax.bar(range(len(counts)), counts.to_numpy(), color="#2e86c1", edgecolor="white")
    ax.set_xticks(range(len(counts)), labels)
    if counts.max() > 50 * counts.min():
        ax.set_yscale("log")
    ax.set_xlabel(
        "hops per chain"
        + (f" (longest: {int(chains['hops'].max())})" if counts.index[-1] > LENGTH_CAP else "")
    )
    ax.set_ylabel("chains")
    return fig


def redirect_graph(hops: pd.DataFrame, max_hosts: int = 30) -> Figure:
    fig, ax = _figure((8, 8), "Redirects between hosts")
    if hops.empty:
        return _empty(fig, ax, "no redirects")
    frame = hops.assign(src=hops["from_origin"].astype(str), dst=hops["to_origin"].astype(str))
    edges = (
        frame.groupby(["src", "dst"])
        .agg(count=("hop", "size"), cross=("cross_origin", "any"), downgrade=("https_to_http", "any"))
        .reset_index()
    )
    weight = (
        pd.concat([edges.groupby("src")["count"].sum(), edges.groupby("dst")["count"].sum()])
        .groupby(level=0)
        .sum()
    )
    hosts = list(weight.sort_values(ascending=False).index[:max_hosts])
    edges = edges[edges["src"].isin(hosts) & edges["dst"].isin(hosts)]
    angle = {h: 2 * math.pi * i / len(hosts) for i, h in enumerate(hosts)}
    pos = {h: (math.cos(a), math.sin(a)) for h, a in angle.items()}
    top = edges["count"].max()
    for row in edges.itertuples():
        color = "#c0392b" if row.downgrade else ("#e67e22" if row.cross else "#7f8c8d")
        width = 1 + 6 * row.count / top
        if row.src == row.dst:
            x, y = pos[row.src]
            ax.add_patch(
                FancyArrowPatch(
                    (x, y),
                    (x * 1.001, y * 1.001),
                    connectionstyle="arc3,rad=3",
                    arrowstyle="-|>",
                    mutation_scale=12,
                    linewidth=width,
                    color=color,
                )
            )
        else:
            ax.add_patch(
                FancyArrowPatch(
                    pos[row.src],
                    pos[row.dst],
                    connectionstyle="arc3,rad=0.15",
                    arrowstyle="-|>",
                    mutation_scale=14,
                    linewidth=width,
                    color=color,
                    shrinkA=12,
                    shrinkB=12,
                )
            )
    for host, (x, y) in pos.items():
        ax.plot(x, y, "o", color="#2c3e50", markersize=9)
        ax.annotate(
            printable(host.split("://")[-1]),
            (x, y),
            xytext=(8 * x, 8 * y),
            textcoords="offset points",
            ha="left" if x >= 0 else "right",
            va="center",
            fontsize=8,
        )
    ax.legend(
        handles=[
            Patch(color="#7f8c8d", label="same origin"),
            Patch(color="#e67e22", label="cross-origin"),
            Patch(color="#c0392b", label="HTTPS -> HTTP"),
        ],
        loc="lower left",
        fontsize=8,
    )
    ax.set_xlim(-1.6, 1.6)
    ax.set_ylim(-1.4, 1.4)
    ax.set_aspect("equal")
    ax.set_axis_off()
    return fig


def temporary_timeline(
    temporary: pd.DataFrame, stale_after_days: float = DEFAULT_STALE_AFTER_DAYS, max_rows: int = 40
) -> Figure:
    rows = temporary.sort_values("first_seen").tail(max_rows)
    fig, ax = _figure(
        (9, 1.5 + 0.35 * max(len(rows), 1)),
        f"Temporary redirects over time (stale after {stale_after_days:g} days)",
    )
    if rows.empty:
        return _empty(fig, ax, "no temporary redirects")
    labels = [
        printable(f"{s.split('://')[-1]} -> {t.split('://')[-1]}")
        for s, t in zip(rows["source"], rows["target"], strict=False)
    ]
    first = rows["first_seen"].dt.tz_convert(None)
    last = rows["last_seen"].dt.tz_convert(None)
    y = np.arange(len(rows))
    colors = ["#c0392b" if stale else "#2e86c1" for stale in rows["stale"]]
    ax.hlines(y, first, last, colors=colors, linewidth=4)
    ax.scatter(first, y, color=colors, s=18, zorder=3)
    ax.scatter(last, y, color=colors, s=18, zorder=3)
    deadline = first + pd.Timedelta(days=stale_after_days)
    ax.scatter(deadline, y, marker="|", s=160, color="#2c3e50", zorder=4, label="stale threshold")
    ax.set_yticks(y, labels, fontsize=7)
    ax.invert_yaxis()
    ax.legend(
        handles=[
            Patch(color="#2e86c1", label="within threshold"),
            Patch(color="#c0392b", label="stale"),
            ax.collections[-1],
        ],
        loc="lower right",
        fontsize=8,
    )
    fig.autofmt_xdate()
    return fig


def conformance_heatmap(hops: pd.DataFrame) -> Figure:
    fig, ax = _figure((10, 4), "Client conformance (RFC 9110 / Fetch) by redirect status and method")
    if hops.empty:
        return _empty(fig, ax, "no redirects")
    frame = hops.assign(
        case=hops["status"].astype(int).astype(str) + " " + hops["method_before"].astype(str),
        code=hops["verdict"].map({v: i for i, v in enumerate(VERDICTS)}),
    )
    # A cell shows the worst verdict seen for that client and case.
    grid = frame.pivot_table(index="client_name", columns="case", values="code", aggfunc=_worst)
    grid = grid.reindex(columns=sorted(grid.columns, key=lambda c: (int(c.split()[0]), c.split()[1])))
    masked = np.ma.masked_invalid(grid.to_numpy(dtype=float))
    ax.imshow(masked, cmap=ListedColormap(VERDICT_COLORS), vmin=-0.5, vmax=2.5, aspect="auto")
    ax.set_xticks(range(grid.shape[1]), [printable(c) for c in grid.columns], rotation=90, fontsize=7)
    ax.set_yticks(range(grid.shape[0]), [printable(r) for r in grid.index], fontsize=8)
    ax.legend(
        handles=[Patch(color=c, label=v) for v, c in zip(VERDICTS, VERDICT_COLORS, strict=False)],
        loc="upper left",
        bbox_to_anchor=(1.01, 1),
        fontsize=8,
    )
    return fig


def _worst(codes: pd.Series) -> float:
    """deviated beats not followed beats as specified."""
    values = set(codes.dropna().astype(int))
    for code in (1, 2, 0):
        if code in values:
            return float(code)
    return float("nan")
