from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import pgcluster
import pytest
import warmcli
from hypothesis import settings

from analyzer.store import Store, open_store

# Generated cases: the default profile is sized for every run of the suite; a longer hunt
# is `pytest tests/test_fuzz.py --hypothesis-profile=deep` (also ten mutants per kind of
# damage per seed file in the mutation fuzzing).
settings.register_profile("ci", max_examples=200, deadline=None, print_blob=True)
settings.register_profile("deep", max_examples=2000, deadline=None, print_blob=True)
settings.load_profile("ci")

# redirect-audit's own tests only: the third-party suites under tests/thirdparty are run by
# tests/test_thirdparty_suites.py, each in its own directory with its own settings.
collect_ignore = ["thirdparty"]

# The suite starts hundreds of Python processes (the command line, mitmdump, pytester runs).
# Where the environment says not to write bytecode (CI images often do), each of them would
# compile every module it imports from source again: the children may write it.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)

ROOT = Path(__file__).resolve().parent.parent
# Real HAR files from public projects, kept in the repository with their sources and
# licences (tests/corpus/NOTICE.md); REDIRECT_AUDIT_CORPUS points at another copy.
CORPUS = Path(os.environ.get("REDIRECT_AUDIT_CORPUS") or Path(__file__).parent / "corpus" / "har")
RULE_FIXTURES = Path(__file__).parent / "fixtures" / "rules"


def corpus_files() -> list[Path]:
    """Every HAR of the real corpus, then every rule fixture."""
    return sorted((CORPUS / "good").glob("*.har")) + sorted(RULE_FIXTURES.glob("*.har"))


def corpus_store(db: Path) -> Store:
    """A new store at `db` holding corpus_files(), imported in this process (left open)."""
    from analyzer.ingest.har import import_har

    store = open_store(str(db))
    for path in corpus_files():
        import_har(store, path, workers=0)
    return store


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by them
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests on the session's PostgreSQL server are marked `postgresql` (and `slow`), whether
    they ask for the server or run once per engine through the `store`/`db_path` fixtures."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        on_postgresql = "pg_cluster" in item.fixturenames or (
            callspec is not None and "postgresql" in callspec.params.values()
        )
        if on_postgresql:
            item.add_marker(pytest.mark.postgresql)
        if on_postgresql or item.get_closest_marker("browser"):
            item.add_marker(pytest.mark.slow)
    # The longest single tests start first: started last, one would keep a worker busy while
    # the others have run out of work (the suite is CPU-bound on two cores).
    items.sort(key=lambda item: item.module is None or item.module.__name__ not in LONGEST_FIRST)


LONGEST_FIRST = ("test_thirdparty_suites", "test_fleet")


def pytest_collection_finish(session: pytest.Session) -> None:
    """Under `--dist loadgroup`, a test of an xdist group carries its group in its id, or the
    group's servers would start on every worker (as with pytest 9.2 and pytest-xdist 3.8)."""
    config = session.config
    if not (hasattr(config, "workerinput") and config.getoption("loadgroup", False)):
        return
    for item in session.items:
        if item.get_closest_marker("xdist_group") and "@" not in item.nodeid:
            raise pytest.UsageError(
                f"pytest-xdist did not group {item.nodeid}: this pytest and pytest-xdist disagree "
                "on node ids (see the pytest pin in pyproject.toml)"
            )


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def pg_cluster():
    """A throwaway PostgreSQL server for the whole session (tests/pgcluster.py). Missing
    binaries skip the PostgreSQL half of the tests with the reason, and fail under CI=true."""
    why = pgcluster.missing()
    if why is not None:
        if in_ci():
            pytest.fail(why)
        pytest.skip(why)
    cluster = pgcluster.Cluster()
    yield cluster
    cluster.stop()


ENGINES = ("sqlite", "postgresql")


def new_store_url(request, tmp_path: Path, name: str) -> str:
    """Where a test's store goes on the engine it runs on: a SQLite path in tmp_path, or a
    database on the session's PostgreSQL server with no rows (tests/pgcluster.py: the
    store's schema may be made already, as `open_store` would make it)."""
    if request.param == "sqlite":
        return str(tmp_path / name)
    cluster = request.getfixturevalue("pg_cluster")
    url = cluster.new_store_database()
    request.addfinalizer(lambda: cluster.recycle(url, keep_schema=True))
    return url


@pytest.fixture(params=ENGINES)
def store(request, tmp_path):
    """An open store, once on SQLite and once on PostgreSQL."""
    s = open_store(new_store_url(request, tmp_path, "t.db"))
    yield s
    s.close()


@pytest.fixture(params=ENGINES)
def db_path(request, tmp_path) -> str:
    """A --db for a new store (a path on SQLite, a URL on PostgreSQL): the test runs on both."""
    return new_store_url(request, tmp_path, "cli.db")


@pytest.fixture
def sqlite_path(tmp_path) -> str:
    """A --db on SQLite only, for tests about the file itself (permissions, WAL, locks)."""
    return str(tmp_path / "cli.db")


def run_cli(
    *args: str,
    env: dict | None = None,
    input: str | None = None,
    cwd: Path | str = ROOT,
    timeout: float = 120,
    stdout: int | None = None,
) -> subprocess.CompletedProcess:
    """The real console entry point in a child process, as a user runs it (stdin closed
    unless `input` is given; `stdout`, a descriptor to write to instead of a pipe read here).
    The child starts warm (tests/warmcli.py: forked from a process that has done the
    imports); REDIRECT_AUDIT_TEST_COLD=1 starts each from scratch."""
    environment = {**os.environ, **(env or {})}
    warm = warmcli.server()
    if warm is not None:
        return warm.run(list(args), environment, str(cwd), input, timeout, stdout)
    return subprocess.run(
        [sys.executable, "-m", "analyzer", *args],
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE if stdout is None else stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=timeout,
        env=environment,
        cwd=cwd,
    )


def start_python(code: str, *args: str, cwd: Path | str = ROOT) -> warmcli.WarmProcess | subprocess.Popen:
    """`python -c CODE ARGS` started now (warm where it can be), its output kept for communicate()."""
    warm = warmcli.server()
    if warm is not None:
        return warm.start("python", list(args), cwd=cwd, code=code)
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def start_cli(*args: str, cwd: Path | str = ROOT) -> warmcli.WarmProcess | subprocess.Popen:
    """The command line started now, not waited for (see run_cli)."""
    warm = warmcli.server()
    if warm is not None:
        return warm.start("analyzer", list(args), cwd=cwd)
    return subprocess.Popen(
        [sys.executable, "-m", "analyzer", *args],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_until(condition: Callable[[], object], timeout: float = 30.0, every: float = 0.05) -> bool:
    """Poll `condition` until it holds (True) or `timeout` seconds have passed (False):
    what a test waits for, instead of a sleep long enough on a quiet machine."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(every)


def require_program(name: str, how: str) -> str:
    """The path of a program a test drives. Missing, the test is skipped with how to get it,
    except under CI=true, where a missing program is a failure: CI must never pass by skipping."""
    found = shutil.which(name)
    if found:
        return found
    message = f"{name} is not installed: {how}"
    if in_ci():
        pytest.fail(message)
    pytest.skip(message)


def corpus_facts() -> dict:
    return json.loads((CORPUS / "facts.json").read_text())


def require_corpus() -> None:
    if not (CORPUS / "facts.json").exists():
        pytest.fail(f"HAR corpus not found at {CORPUS} (set REDIRECT_AUDIT_CORPUS)")


DEMO = [
    Path(str(p))
    for p in sorted(resources.files("analyzer").joinpath("demo").iterdir(), key=lambda p: p.name)
    if p.name.endswith(".har")
]


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


@pytest.fixture
def upstream():
    """A plain-HTTP loopback upstream (tests/upstream.py) for one test."""
    from upstream import Upstream

    server = Upstream()
    yield server
    server.close()
