"""The HTML report's figures are drawn once for each state of a store's results, kept in
its meta table, and read back by the next report, which then imports neither pandas nor
matplotlib; a store the report cannot write to still gets its report."""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys

import pytest
from conftest import RULE_FIXTURES, run_cli

from analyzer import htmlreport
from analyzer.report import finding_records
from analyzer.storeread import REPORT_FIGURES, open_reader

pytestmark = pytest.mark.xdist_group("html_report")


def _render(db: str) -> str:
    with open_reader(db) as reader:
        records = finding_records(reader)
    return re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", "(when)", htmlreport.render(db, records))


def _images(html: str) -> list[str]:
    return re.findall(r'src="data:image/png;base64,([^"]+)"', html)


def _kept(db: str) -> str | None:
    with sqlite3.connect(db) as conn:
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (REPORT_FIGURES,)).fetchone()
    return row[0] if row else None


def test_a_second_report_on_the_same_results_reads_the_figures_back(demo_db, monkeypatch):
    drawn = []
    real_draw = htmlreport._draw
    monkeypatch.setattr(htmlreport, "_draw", lambda db: drawn.append(db) or real_draw(db))
    first = _render(demo_db)
    assert len(drawn) == 1 and len(_images(first)) == 5
    assert _kept(demo_db) is not None
    second = _render(demo_db)
    assert len(drawn) == 1  # not drawn again
    assert second == first  # the same report, figures included
    # a command that reads the store's state does not read the kept figures as settings
    done = run_cli("findings", "--db", demo_db, "-f", "json")
    assert done.returncode == 0, done.stderr


def test_new_results_draw_the_figures_again(demo_db, monkeypatch):
    drawn = []
    real_draw = htmlreport._draw
    monkeypatch.setattr(htmlreport, "_draw", lambda db: drawn.append(db) or real_draw(db))
    before = _images(_render(demo_db))
    assert (
        run_cli("import-har", str(RULE_FIXTURES / "md-307-post-to-get.har"), "--db", demo_db).returncode == 0
    )
    assert run_cli("analyze", "--db", demo_db).returncode == 0
    after = _images(_render(demo_db))
    assert len(drawn) == 2
    assert after != before  # one more finding, chain and client: other figures


def test_the_report_from_kept_figures_imports_neither_pandas_nor_matplotlib(demo_db, tmp_path):
    out = tmp_path / "r.html"
    assert run_cli("findings", "--db", demo_db, "-f", "html", "-o", str(out)).returncode == 0
    probe = (
        "import sys\n"
        "from analyzer.__main__ import main\n"
        f"sys.argv = ['redirect-audit', 'findings', '--db', {demo_db!r}, '-f', 'html', '-o', {str(out)!r}]\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('pandas', 'matplotlib') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout
    assert len(_images(out.read_text())) == 5


def test_a_store_locked_by_a_writer_still_gets_its_report_and_keeps_no_figures(demo_db):
    writer = sqlite3.connect(demo_db, timeout=5)
    writer.execute("BEGIN IMMEDIATE")  # a recorder mid-transaction: the figures cannot be kept now
    try:
        html = _render(demo_db)
    finally:
        writer.rollback()
        writer.close()
    assert len(_images(html)) == 5
    assert _kept(demo_db) is None


def test_kept_figures_that_cannot_be_read_are_drawn_again(demo_db):
    with sqlite3.connect(demo_db) as conn:
        conn.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (REPORT_FIGURES, "{not json"))
    assert len(_images(_render(demo_db))) == 5
    assert _kept(demo_db).startswith('{"key"')


def test_a_har_without_a_browser_names_its_clients_by_the_creator_not_nan(tmp_path):
    """pandas reads a missing browser as NaN, which is truthy: the frames named such clients 'nan'."""
    from analyzer import frames

    db = str(tmp_path / "c.db")
    assert (
        run_cli("import-har", str(RULE_FIXTURES / "cc-authorization-other-host.har"), "--db", db).returncode
        == 0
    )
    assert run_cli("analyze", "--db", db).returncode == 0
    names = set(frames.hops(db)["client_name"])
    assert names == {"redirect-audit fixtures 1"}, names
    html = _render(db)
    assert ">nan<" not in html


def test_on_postgresql_the_figures_are_kept_and_read_back_too(pg_cluster, monkeypatch):
    from conftest import DEMO

    url = pg_cluster.new_database()
    assert run_cli("import-har", *map(str, DEMO), "--db", url).returncode == 0
    assert run_cli("analyze", "--db", url).returncode == 0
    drawn = []
    real_draw = htmlreport._draw
    monkeypatch.setattr(htmlreport, "_draw", lambda db: drawn.append(db) or real_draw(db))
    first = _render(url)
    second = _render(url)
    assert len(drawn) == 1 and second == first and len(_images(first)) == 5
