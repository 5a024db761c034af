"""Layers point one way (pyproject's import-linter contract); analysis never needs mitmproxy."""

from __future__ import annotations

import shutil
import subprocess
import sys

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
