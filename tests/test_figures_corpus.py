"""Every figure and the HTML report on every real HAR of the corpus and on the demo: no
warning, and no text drawn outside the figure (labels clipped at the edge, dates cut off)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from conftest import CORPUS, DEMO

from analyzer import frames, plots
from analyzer.analysis import analyze
from analyzer.htmlreport import render
from analyzer.ingest import import_har
from analyzer.report import finding_records
from analyzer.store import open_store
from analyzer.storeread import open_reader

pytestmark = pytest.mark.slow

HARS = sorted((CORPUS / "good").glob("*.har"))


def figures(db: str) -> dict:
    hops = frames.hops(db)
    return {
        "findings_by_rule": plots.findings_by_rule(frames.findings(db)),
        "chain_lengths": plots.chain_lengths(frames.chains(db)),
        "redirect_graph": plots.redirect_graph(hops),
        "temporary_timeline": plots.temporary_timeline(frames.temporary_redirects(db)),
        "conformance_heatmap": plots.conformance_heatmap(hops),
    }


def judge(files: list[Path], tmp_path: Path) -> None:
    db = str(tmp_path / "figures.db")
    store = open_store(db)
    try:
        for path in files:
            import_har(store, path)
        analyze(store, keep=True)
    finally:
        store.close()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name, fig in figures(db).items():
            fig.set_dpi(96)  # the report's; the box below is measured at the figure's dpi
            fig.savefig(tmp_path / f"{name}.png", dpi=96)
            box = fig.get_tightbbox()
            width, height = fig.get_size_inches()
            assert box.x0 >= -0.02 and box.y0 >= -0.02, f"{name}: text left of or below the figure: {box}"
            assert box.x1 <= width + 0.02 and box.y1 <= height + 0.02, f"{name}: text past the figure: {box}"
        reader = open_reader(db)
        try:
            records = finding_records(reader)
        finally:
            reader.close()
        html = render(db, records)
    assert [str(w.message) for w in caught] == []
    # a figure with nothing to show is named in one line instead of drawn empty
    empty = [frames.findings(db).empty, *[frames.hops(db).empty] * 2, frames.temporary_redirects(db).empty]
    empty.append(frames.chains(db).empty)
    assert html.count("data:image/png") == 5 - sum(empty)
    assert ('id="undrawn"' in html) == any(empty)


@pytest.mark.parametrize("path", HARS, ids=[p.stem for p in HARS])
def test_figures_and_report_hold_up_on_a_real_har(path, tmp_path):
    judge([path], tmp_path)


def test_figures_and_report_hold_up_on_the_demo(tmp_path):
    judge(DEMO, tmp_path)


def test_there_is_a_corpus_to_check():
    assert len(HARS) >= 30
