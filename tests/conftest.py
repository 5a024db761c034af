from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

from analyzer.store import open_store

ROOT = Path(__file__).resolve().parent.parent
# Real HAR files from public projects, kept in the repository with their sources and
# licences (tests/corpus/NOTICE.md); REDIRECT_AUDIT_CORPUS points at another copy.
CORPUS = Path(os.environ.get("REDIRECT_AUDIT_CORPUS") or Path(__file__).parent / "corpus" / "har")
RULE_FIXTURES = Path(__file__).parent / "fixtures" / "rules"


@pytest.fixture
def store(tmp_path):
    s = open_store(str(tmp_path / "t.db"))
    yield s
    s.close()


@pytest.fixture
def db_path(tmp_path) -> str:
    return str(tmp_path / "cli.db")


def run_cli(*args: str, env: dict | None = None, input: str | None = None, cwd: Path | str = ROOT,
            timeout: float = 120) -> subprocess.CompletedProcess:
    """The real console entry point in a child process, as a user runs it (stdin closed
    unless `input` is given)."""
    return subprocess.run(
        [sys.executable, "-m", "analyzer", *args], input=input, stdin=None if input is not None else subprocess.DEVNULL,
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}, cwd=cwd,
    )


def require_program(name: str, how: str) -> str:
    """The path of a program a test drives. Missing, the test is skipped with how to get it,
    except under CI=true, where a missing program is a failure: CI must never pass by skipping."""
    found = shutil.which(name)
    if found:
        return found
    message = f"{name} is not installed: {how}"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)


def corpus_facts() -> dict:
    return json.loads((CORPUS / "facts.json").read_text())


def require_corpus() -> None:
    if not (CORPUS / "facts.json").exists():
        pytest.fail(f"HAR corpus not found at {CORPUS} (set REDIRECT_AUDIT_CORPUS)")


DEMO = [Path(str(p)) for p in sorted(resources.files("analyzer").joinpath("demo").iterdir(), key=lambda p: p.name)
        if p.name.endswith(".har")]


@pytest.fixture
def demo_db(tmp_path) -> str:
    """The bundled demo capture, imported and analyzed through the CLI from copies in tmp_path."""
    db = str(tmp_path / "demo.db")
    har_copies = []
    for har in DEMO:  # copies, so the test owns the files the results point at
        shutil.copy(har, tmp_path / har.name)
        har_copies.append(str(tmp_path / har.name))
    assert run_cli("import-har", *har_copies, "--db", db).returncode == 0
    assert run_cli("analyze", "--db", db).returncode == 0
    return db
