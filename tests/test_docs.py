"""The README is a user guide a newcomer reads in minutes; its links and the docs' links lead
somewhere; every command the CLI has is in its table."""

from __future__ import annotations

import os
import re

import click
import pytest
from conftest import ROOT, run_cli

from analyzer.cli import cli

PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(path) -> set[str]:
    """GitHub's heading anchors: lower-case, punctuation dropped, spaces to hyphens."""
    out = set()
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


def test_the_readme_stays_a_short_user_guide():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 15_000
    assert readme.index("## Set-up on a fresh machine") < readme.index("## Quick start")
    assert "uv run redirect-audit demo" in readme and "uv run pytest" in readme
    for jargon in ("union-find", "A/A", "link window", "logical target", "cutter"):
        assert jargon not in readme, jargon


def test_every_command_is_in_the_readme_table():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Command line", 1)[1].split("\n\n", 2)[1]
    ctx = click.Context(cli)
    for name in cli.list_commands(ctx):
        if not cli.get_command(ctx, name).hidden:
            assert f"`{name}" in table or f", `{name}" in table, f"{name} missing from the README's table"


def test_every_relative_link_and_anchor_exists():
    for page in PAGES:
        for target in LINK.findall(page.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            assert dest.exists(), f"{page.name}: link to missing {target}"
            if anchor and dest.suffix == ".md":
                assert anchor in anchors(dest), f"{page.name}: no heading #{anchor} in {dest.name}"


# ---- what the README claims, checked against what the code does ---------------------------


def section(text: str, heading: str) -> str:
    return text.split(heading, 1)[1].split("\n#", 1)[0]


def table_rows(text: str) -> list[list[str]]:
    """A markdown table's body rows, cell by cell (the header and rule rows left out)."""
    rows = [line.strip().strip("|").split(" | ") for line in text.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row] for row in rows[2:]]


def test_the_readme_quotes_the_latest_figure_of_every_target():
    """docs/benchmarks.md's "Against the targets" has one row per target the benchmarks
    print (benchmarks/targets.py), with that target, and says whether its latest figure
    meets it; the README's Performance table quotes each row's figure and target word for
    word, in the same order."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from targets import TARGETS

    docs = table_rows(section((ROOT / "docs" / "benchmarks.md").read_text(), "## Against the targets"))
    readme = table_rows(section((ROOT / "README.md").read_text(), "## Performance"))
    assert [row[0] for row in docs] == [t.what for t in TARGETS.values()]
    for (what, latest, target, met, measured), wanted in zip(docs, TARGETS.values(), strict=True):
        assert target == wanted.text(), what
        number = re.match(rf"([\d,.]+) ?{re.escape(wanted.unit)}(?=[ ;,)]|$)", latest)
        assert number, f"{what}: the latest figure {latest!r} does not start with a number in {wanted.unit}"
        assert met == ("yes" if wanted.met(float(number[1].replace(",", ""))) else "no"), what
        assert wanted.script.split()[0] in measured and re.search(r"20\d\d-\d\d-\d\d", measured), measured
    assert readme == [row[:3] for row in docs]


def test_the_proxy_banner_and_the_readme_set_both_spellings_of_the_proxy_variables(tmp_path):
    """curl reads only the lower-case http_proxy; other clients read the upper case."""
    from analyzer.proxy import ProxyPlan

    banner = ProxyPlan(db_url=f"sqlite:///{tmp_path / 'x.db'}", confdir=tmp_path).banner()
    block = section((ROOT / "README.md").read_text(), "### A long-running proxy")
    for text in (banner, block):
        for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
            assert f"{name}=" in text, f"{name} not set in:\n{text}"


@pytest.mark.slow
def test_the_notebook_command_names_the_store_that_demo_makes(tmp_path):
    notebook = section((ROOT / "README.md").read_text(), "### A notebook")
    store = re.search(r"REDIRECT_AUDIT_DB=\$PWD/(\S+) uv run", notebook)
    assert store, notebook
    assert run_cli("demo", cwd=tmp_path).returncode == 0
    assert (tmp_path / store[1]).is_file(), f"`demo` made {sorted(p.name for p in tmp_path.iterdir())}"


def _formats(command: click.Command) -> list[str | None]:
    for param in command.params:
        if "--format" in getattr(param, "opts", ()) and isinstance(param.type, click.Choice):
            return list(param.type.choices)
    return [None]


@pytest.mark.slow
def test_a_reader_that_went_away_gives_141_for_every_command_and_format(demo_db):
    """The README's exit status 141 (`| head`): the reader closes the pipe before anything
    is written, so every writer meets a closed pipe, whatever renders the output."""
    ctx = click.Context(cli)
    runs = []
    for name in ("findings", "chains", "clients", "captures", "check", "rules"):
        for fmt in _formats(cli.get_command(ctx, name)):
            args = [
                name,
                *(["--format", fmt] if fmt else []),
                *([] if name == "rules" else ["--db", demo_db]),
            ]
            if name == "check":
                args += ["--fail-on", "info"]
            runs.append(args)
    assert len(runs) >= 14
    failures = []
    for args in runs:
        read, write = os.pipe()
        os.close(read)
        try:
            done = run_cli(*args, stdout=write)
        finally:
            os.close(write)
        if done.returncode != 141 or done.stderr:
            failures.append((args, done.returncode, done.stderr[-300:]))
    assert failures == []
