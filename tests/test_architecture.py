"""Layers point one way (pyproject's import-linter contract); analysis never needs mitmproxy."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib

from conftest import ROOT


def test_layers_hold():
    lint = shutil.which("lint-imports")
    assert lint, "import-linter is a dev dependency"
    done = subprocess.run([lint], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_analysis_runs_without_mitmproxy():
    code = (
        "import sys; sys.modules['mitmproxy'] = None\n"
        "import analyzer.cli, analyzer.analysis, analyzer.report\n"
        "print('ok')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.stdout.strip() == "ok", done.stderr


IGNORE = re.compile(r"#\s*type:\s*ignore(\[[^\]]*\])?(.*)$")


def test_every_type_ignore_names_its_code_and_says_why():
    """mypy runs strict on every module; where a line must be exempt, it says which error
    and why, on the same line."""
    bare = []
    for path in sorted([*ROOT.glob("analyzer/**/*.py"), *ROOT.glob("addons/**/*.py")]):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            found = IGNORE.search(line)
            if found and (not found[1] or not found[2].strip().lstrip("#").strip()):
                bare.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert bare == []


def test_mypy_is_strict_on_every_module():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    assert config["strict"] is True and sorted(config["files"]) == ["addons", "analyzer"]
