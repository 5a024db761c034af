"""`chains` draws each chain as a tree: written as plain text into a file or a pipe (rich's
rendering of a thousand chains took a second), through rich with colour; both say the same
words, and text from a capture that looks like markup is shown as it is."""

from __future__ import annotations

import json
import re

from conftest import RULE_FIXTURES, run_cli

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def test_the_plain_and_the_coloured_tree_say_the_same(tmp_path):
    har = json.loads((RULE_FIXTURES / "md-307-post-to-get.har").read_text())
    for entry in har["log"]["entries"]:  # a capture's text that rich would read as markup
        entry["request"]["url"] = entry["request"]["url"] + "?q=[red]x[/]"
    path = tmp_path / "markup.har"
    path.write_text(json.dumps(har))
    db = str(tmp_path / "m.db")
    assert run_cli("import-har", str(path), "--db", db).returncode == 0
    plain = run_cli("chains", "--db", db)
    coloured = run_cli("chains", "--db", db, env={"FORCE_COLOR": "1"})
    assert plain.returncode == coloured.returncode == 0, plain.stderr + coloured.stderr
    assert "\x1b[" in coloured.stdout and "\x1b[" not in plain.stdout
    assert ANSI.sub("", coloured.stdout) == plain.stdout
    lines = plain.stdout.splitlines()
    assert lines[0].startswith("chain ") and lines[1].startswith("└── ")
    assert lines[2].startswith("    └── not-followed") and "?q=[red]x[/]" in lines[1]
