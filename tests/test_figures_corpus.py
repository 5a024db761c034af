"""Every figure and the HTML report on every real HAR of the corpus and on the demo: no
warning, and no text drawn outside the figure (labels clipped at the edge, dates cut off)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
from conftest import CORPUS, DEMO
from matplotlib.figure import Figure

from analyzer import frames, htmlreport, plots
from analyzer.analysis import analyze
from analyzer.ingest import import_har
from analyzer.report import finding_records
from analyzer.store import open_store
from analyzer.storeread import open_reader

pytestmark = pytest.mark.slow

HARS = sorted((CORPUS / "good").glob("*.har"))


def empty_figures(db: str) -> dict:
    """The figures for which the store has nothing to show (the report names them instead
    of drawing them; a notebook still draws them, with a line saying so)."""
    hops, findings, chains, temporary = (
        frames.hops(db),
        frames.findings(db),
        frames.chains(db),
        frames.temporary_redirects(db),
    )
    return {
        name: draw
        for name, data, draw in (
            ("findings_by_rule", findings, lambda: plots.findings_by_rule(findings)),
            ("chain_lengths", chains, lambda: plots.chain_lengths(chains)),
            ("redirect_graph", hops, lambda: plots.redirect_graph(hops)),
            ("temporary_timeline", temporary, lambda: plots.temporary_timeline(temporary)),
            ("conformance_heatmap", hops, lambda: plots.conformance_heatmap(hops)),
        )
        if data.empty
    }


def check_inside(name: str, fig: Figure, tmp_path: Path) -> None:
    fig.set_dpi(96)  # the report's; the box below is measured at the figure's dpi
    fig.savefig(tmp_path / f"{re.sub(r'\W+', '-', name)[:40]}.png", dpi=96)
    box = fig.get_tightbbox()
    width, height = fig.get_size_inches()
    assert box.x0 >= -0.02 and box.y0 >= -0.02, f"{name}: text left of or below the figure: {box}"
    assert box.x1 <= width + 0.02 and box.y1 <= height + 0.02, f"{name}: text past the figure: {box}"


def judge(files: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each figure is drawn once: those the report draws are checked as it draws them."""
    db = str(tmp_path / "figures.db")
    store = open_store(db)
    try:
        for path in files:
            import_har(store, path)
        analyze(store, keep=True)
    finally:
        store.close()
    drawn: list[str] = []
    to_png = htmlreport._png

    def checked(fig: Figure, title: str) -> dict:
        check_inside(title, fig, tmp_path)
        drawn.append(title)
        return to_png(fig, title)

    monkeypatch.setattr(htmlreport, "_png", checked)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reader = open_reader(db)
        try:
            records = finding_records(reader)
        finally:
            reader.close()
        html = htmlreport.render(db, records)
        empty = empty_figures(db)
        for name, draw in empty.items():
            check_inside(name, draw(), tmp_path)
    assert [str(w.message) for w in caught] == []
    # a figure with nothing to show is named in one line instead of drawn empty
    assert html.count("data:image/png") == len(drawn) == 5 - len(empty)
    assert ('id="undrawn"' in html) == bool(empty)


@pytest.mark.parametrize("path", HARS, ids=[p.stem for p in HARS])
def test_figures_and_report_hold_up_on_a_real_har(path, tmp_path, monkeypatch):
    judge([path], tmp_path, monkeypatch)


def test_figures_and_report_hold_up_on_the_demo(tmp_path, monkeypatch):
    judge(DEMO, tmp_path, monkeypatch)


def test_there_is_a_corpus_to_check():
    assert len(HARS) >= 30
