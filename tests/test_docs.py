"""The README is a user guide a newcomer reads in minutes; its links and the docs' links lead
somewhere; every command the CLI has is in its table."""

from __future__ import annotations

import re

import click
from conftest import ROOT

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
