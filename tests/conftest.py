from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from analyzer.store import open_store

ROOT = Path(__file__).resolve().parent.parent
CORPUS = Path(os.environ.get("REDIRECT_AUDIT_CORPUS", ROOT.parent / "shared" / "corpus" / "har"))
RULE_FIXTURES = Path(__file__).parent / "fixtures" / "rules"


@pytest.fixture
def store(tmp_path):
    s = open_store(str(tmp_path / "t.db"))
    yield s
    s.close()


@pytest.fixture
def db_path(tmp_path) -> str:
    return str(tmp_path / "cli.db")


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real console entry point in a child process, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "analyzer.cli", *args],
        capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})}, cwd=ROOT,
    )


def corpus_facts() -> dict:
    return json.loads((CORPUS / "facts.json").read_text())


def require_corpus() -> None:
    if not (CORPUS / "facts.json").exists():
        pytest.fail(f"HAR corpus not found at {CORPUS} (set REDIRECT_AUDIT_CORPUS)")
