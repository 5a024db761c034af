"""Recording changes no test's outcome, on a suite nobody here wrote: httpx 0.28.1's own
client tests (tests/thirdparty/httpx, BSD-3-Clause), against its own uvicorn server on
loopback, with its autouse fixture that clears the proxy variables before every test and
its tests of proxy settings read from the environment. The same tests run three times:
without redirect-audit, with the plugin (`--redirect-audit=DB`), and under
`redirect-audit run -- pytest`; every test must end the same way in all three, and the
two recorded runs must hold each test's exchanges under that test's own label. The suite
runs in an environment of its own requirements, as its developers have it, into which
only the light plugin is installed (no redirect-audit there: it is found on PATH).
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import ROOT, run_cli
from lightenv import LightEnv, pinned, tool_on_path

pytestmark = pytest.mark.slow

SUITE = Path(__file__).parent / "thirdparty" / "httpx"
# Its async client tests over a real server (asyncio and trio) and its tests of proxy
# variables read from the environment; not the tests marked `network` (they resolve
# public names).
SELECTION = (
    "tests/client/test_async_client.py",
    "tests/client/test_proxies.py",
    "-m",
    "not network",
    "-k",
    "async_client or environ",
)


def pytest_args(python: Path, junit: Path) -> list[str]:
    return [str(python), "-m", "pytest", "-c", "pytest.ini", "-p", "no:cacheprovider", "-q",
            f"--junitxml={junit}", *SELECTION]  # fmt: skip


def outcomes(junit: Path) -> dict[str, str]:
    """Each test's outcome from pytest's JUnit XML, by node id: passed, failed, error or skipped."""
    found: dict[str, str] = {}
    for case in ET.parse(junit).iter("testcase"):
        name = f"{str(case.get('classname')).replace('.', '/')}.py::{case.get('name')}"
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        found[name] = {"failure": "failed", "error": "error", "skipped": "skipped"}.get(
            kinds[0] if kinds else "", "passed"
        )
    return found


def recorded(db: Path) -> tuple[dict[str, int], dict[str, str]]:
    """Exchanges per test (nodeid) and each test's outcome, as the store has them."""
    with sqlite3.connect(db) as conn:
        per_test = dict(
            conn.execute(
                "SELECT t.nodeid, count(e.id) FROM test_runs t JOIN exchanges e ON e.client = t.client "
                "GROUP BY t.nodeid"
            )
        )
        stored_outcomes = dict(conn.execute("SELECT nodeid, outcome FROM test_runs"))
    return per_test, stored_outcomes


# httpx's test requirements, at the versions this project's environment has (uv's cache)
HTTPX_SUITE_NEEDS = ("pytest", "httpx", "h2", "anyio", "trio", "trustme", "uvicorn", "sniffio", "socksio")


def test_httpx_s_own_tests_end_the_same_with_and_without_recording(tmp_path):
    # The suite's own environment, as its developers have it: its requirements, no redirect-audit.
    env = LightEnv(tmp_path / "venv")
    env.install(*pinned(*HTTPX_SUITE_NEEDS))
    before = env.freeze()
    plain = subprocess.run(
        pytest_args(env.python, tmp_path / "without.xml"),
        cwd=SUITE,
        capture_output=True,
        text=True,
        timeout=300,
    )
    without = outcomes(tmp_path / "without.xml")
    # the suite ran for real: its server answered, most tests passed
    assert len(without) >= 80 and list(without.values()).count("passed") >= 80, plain.stdout[-3000:]

    # The plugin goes in as the README says; it adds itself and changes nothing else there,
    # and brings neither mitmproxy nor redirect-audit (found on PATH, installed apart).
    env.install_plugin()
    assert env.freeze() - before == {f"pytest-redirect-audit @ file://{ROOT / 'plugin'}"}, (
        env.freeze() ^ before
    )
    assert before - env.freeze() == set()
    checked = env.check()
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert not env.importable("analyzer") and not env.importable("mitmproxy")

    plugin_db = tmp_path / "plugin.db"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    with_plugin = subprocess.run(
        [*pytest_args(env.python, tmp_path / "plugin.xml"), f"--redirect-audit={plugin_db}"],
        cwd=SUITE,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TMPDIR": str(scratch), "PATH": tool_on_path(tmp_path / "bin")},
    )
    # the recorder's CA bundle, truststore and log went with the session
    assert not [p.name for p in scratch.iterdir() if p.name.startswith("redirect-audit")]
    assert with_plugin.returncode == plain.returncode, with_plugin.stdout[-3000:]
    # same tests collected, and each ends the same: passed, failed, skipped alike
    assert outcomes(tmp_path / "plugin.xml") == without

    # Under `run`, the plugin there finds the redirect-audit that runs the tests.
    run_db = tmp_path / "run.db"
    under_run = run_cli(
        "run",
        "--db",
        str(run_db),
        "--",
        *pytest_args(env.python, tmp_path / "run.xml"),
        cwd=SUITE,
        timeout=300,
    )
    assert outcomes(tmp_path / "run.xml") == without, under_run.stdout[-3000:] + under_run.stderr

    # What was recorded: the same tests sent traffic in both recorded runs, each test's
    # exchanges under its own label, and the store's outcomes are pytest's.
    for db, result in ((plugin_db, with_plugin.stdout), (run_db, under_run.stderr)):
        per_test, stored = recorded(db)
        talking = {nodeid for nodeid, n in per_test.items() if n}
        assert len(talking) >= 30, (db, per_test)
        assert any("test_async_client.py::test_get[trio]" in t for t in talking), talking
        assert any("test_async_client.py::test_get[asyncio]" in t for t in talking), talking
        assert stored == without, result[-3000:]
        assert "recorded" in result and "httpx 0.28" in result, result[-3000:]
    assert recorded(plugin_db)[0] == recorded(run_db)[0]
