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
    for path in sorted(
        [*ROOT.glob("analyzer/**/*.py"), *ROOT.glob("addons/**/*.py"), *ROOT.glob("plugin/**/*.py")]
    ):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            found = IGNORE.search(line)
            if found and (not found[1] or not found[2].strip().lstrip("#").strip()):
                bare.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert bare == []


def test_mypy_is_strict_on_every_module():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    assert config["strict"] is True and sorted(config["files"]) == [
        "addons",
        "analyzer",
        "plugin/pytest_redirect_audit",
    ]


def test_the_pytest_plugin_needs_only_pytest_and_the_standard_library():
    """pytest-redirect-audit goes into users' test environments: it must constrain nothing
    there. Every module it imports is the standard library's, pytest's, its own, or a client
    library it patches once the tests have imported it; it runs on the oldest Python it
    claims; its distribution requires pytest alone."""
    import ast

    plugin = tomllib.loads((ROOT / "plugin" / "pyproject.toml").read_text())["project"]
    assert plugin["dependencies"] == ["pytest>=7.0"]
    oldest = tuple(int(n) for n in plugin["requires-python"].removeprefix(">=").split("."))
    allowed = set(sys.stdlib_module_names) | {
        "pytest",
        "_pytest",
        "pytest_redirect_audit",
        "httpx",
        "aiohttp",
    }
    imported: dict[str, set[str]] = {}
    sources = sorted((ROOT / "plugin" / "pytest_redirect_audit").glob("*.py"))
    assert len(sources) >= 4
    for path in sources:
        tree = ast.parse(path.read_text(), feature_version=oldest)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                imported.setdefault(name.split(".")[0], set()).add(path.name)
    assert set(imported) - allowed == set(), imported
    # never redirect-audit itself, even where it is installed alongside: it runs as a child
    assert "analyzer" not in imported and "addons" not in imported
