"""The pytest plugin, driven through pytester on a sample suite: requests and httpx against
a loopback upstream, one test per misbehaviour and clean tests, serially and under
pytest-xdist. Every finding must land on the test that caused it; --redirect-audit-fail-on
must fail exactly those tests; the fixture must see its own test's traffic and no other's.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
import warmcli
from conftest import run_cli
from upstream import Upstream

pytestmark = pytest.mark.slow

pytest_plugins = ["pytester"]

SUITE = """
import os, time
import httpx, requests

UP = os.environ["UPSTREAM"]


def test_clean():
    assert requests.get(f"{UP}/r/301/clean").json()["method"] == "GET"


def test_post_302_becomes_get():
    # requests follows a 302 after POST with GET: legal, and the body is gone (low)
    assert requests.post(f"{UP}/r/302/pay", data=b"amount=1").json()["method"] == "GET"


def test_sdk_changes_method_on_307():
    # a hand-rolled SDK that follows a 307 itself, with the wrong method (high)
    with httpx.Client() as client:
        answer = client.post(f"{UP}/r/307/order", content=b"{}")
        assert answer.status_code == 307
        client.get(f"{UP}{answer.headers['location']}")


def test_httpx_keeps_the_307():
    with httpx.Client(follow_redirects=True) as client:
        assert client.post(f"{UP}/r/307/kept", content=b"x").json()["method"] == "POST"


def test_fixture_sees_its_own(redirect_audit):
    requests.post(f"{UP}/r/302/own", data=b"a=1")
    time.sleep(0.3)  # under -n 2, the other worker's tests run meanwhile
    found = redirect_audit.findings()
    assert [(f["rule"], f["from_url"].rsplit("/", 1)[1]) for f in found] == [("method-downgrade", "own")], found
    chains = redirect_audit.chains()
    assert [c["hops"][0]["from"]["url"].rsplit("/", 1)[1] for c in chains] == ["own"]
    redirect_audit.assert_no_findings(min_severity="medium")
    with __import__("pytest").raises(AssertionError) as failed:
        redirect_audit.assert_no_findings(min_severity="low")
    lines = str(failed.value).splitlines()
    assert lines[0] == "redirect-audit: 1 finding at or above low during this test:", lines
    assert lines[1].startswith("LOW    method-downgrade (RA101) · chain "), lines
    assert lines[2].startswith("       POST http://") and "/r/302/own → 302 → GET" in lines[2], lines
    assert lines[3].startswith("       302 after POST was followed with GET"), lines
    assert lines[4].startswith("       the chain: ") and " chains --db " in lines[4], lines


def test_own_proxy_authorization(redirect_audit):
    # a header of the test's own, that the recorder's label must never replace or take off
    sent = "Basic dXNlcjpwYXNz"
    seen = requests.get(f"{UP}/echo/own-auth", headers={"Proxy-Authorization": sent}).json()
    assert seen["headers"].get("Proxy-Authorization") == sent, seen


def test_fixture_clean(redirect_audit):
    requests.get(f"{UP}/r/308/fine")
    redirect_audit.assert_no_findings(min_severity="info")
    assert len(redirect_audit.chains()) == 1
"""

CULPRITS = {
    "test_post_302_becomes_get": ("low", "/r/302/pay"),
    "test_sdk_changes_method_on_307": ("high", "/r/307/order"),
    "test_fixture_sees_its_own": ("low", "/r/302/own"),
}


@pytest.fixture
def upstream(monkeypatch, tmp_path):
    server = Upstream()
    monkeypatch.setenv("UPSTREAM", server.origin)
    monkeypatch.setenv("REDIRECT_AUDIT_CONFDIR", str(tmp_path / "conf"))
    yield server
    server.close()


@pytest.fixture
def suite(pytester, upstream):
    pytester.makepyfile(test_sample=SUITE)
    return pytester


class SampleSuite:
    """The sample suite in a directory of its own with one upstream for the module, run as
    pytester runs a suite (a subprocess, no cache); runs against it share URLs, so their
    findings share fingerprints (a baseline from one holds for the next)."""

    def __init__(self, where: Path) -> None:
        self.where = where
        (where / "test_sample.py").write_text(SUITE)
        self.server = Upstream()
        self.runs = 0

    def run(self, *args: str) -> pytest.RunResult:
        self.runs += 1
        env = {"UPSTREAM": self.server.origin, "REDIRECT_AUDIT_CONFDIR": str(self.where / "conf")}
        return run_pytest(self.where, *args, "-p", "no:cacheprovider", env=env)


PYTEST = "import sys, pytest; sys.exit(pytest.main(sys.argv[1:]))"


def run_pytest(
    where: pytest.Pytester | Path, *args: str, timeout: float = 300, env: dict | None = None
) -> pytest.RunResult:
    """pytest in a child process, as pytester's runpytest_subprocess runs it (its own
    basetemp, the environment of the moment), started warm where it can be: the plugin's
    recorder then forks warm too (tests/warmcli.py)."""
    path = where.path if isinstance(where, pytest.Pytester) else where
    basetemp = Path(tempfile.mkdtemp(prefix="runpytest-", dir=path))
    argv = [*args, f"--basetemp={basetemp}"]
    environment = {**os.environ, **(env or {})}
    environment.pop("PYTEST_ADDOPTS", None)
    started = time.monotonic()
    warm = warmcli.server()
    if warm is not None:
        done = warm.run_python(PYTEST, argv, environment, str(path), timeout)
    else:
        done = subprocess.run(
            [sys.executable, "-c", PYTEST, *argv],
            cwd=path,
            env=environment,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    return pytest.RunResult(
        done.returncode, done.stdout.splitlines(), done.stderr.splitlines(), time.monotonic() - started
    )


# the tests that read the shared run: one worker runs them all, so the suite runs once
SHARED = pytest.mark.xdist_group("sample_suite")


@pytest.fixture(scope="module")
def sample_suite(tmp_path_factory) -> Iterator[SampleSuite]:
    suite = SampleSuite(tmp_path_factory.mktemp("sample-suite"))
    yield suite
    suite.server.close()


@pytest.fixture(scope="module")
def serial_run(sample_suite) -> tuple[pytest.RunResult, str]:
    """The sample suite run once serially with `--redirect-audit-fail-on=high`; several tests
    read its outcome and its store."""
    db = str(sample_suite.where / "suite.db")
    return sample_suite.run(f"--redirect-audit={db}", "--redirect-audit-fail-on=high"), db


def findings_by_test(db: str) -> dict[str, list[tuple]]:
    done = run_cli("findings", "-f", "json", "--db", db)
    assert done.returncode == 0, done.stderr
    out: dict[str, list[tuple]] = {}
    for f in json.loads(done.stdout):
        out.setdefault(f["test"], []).append((f["severity"], f["from_url"].split("/", 3)[3]))
    return out


def expected_by_test() -> dict[str, list[tuple]]:
    return {f"test_sample.py::{name}": [(sev, path.lstrip("/"))] for name, (sev, path) in CULPRITS.items()}


@SHARED
@pytest.mark.parametrize(
    "workers, mode", [(0, "in-process"), (2, "in-process"), (0, "proxy")], ids=["serial", "xdist-2", "proxy"]
)
def test_each_finding_is_put_on_the_test_that_caused_it(request, tmp_path, workers, mode):
    """The same findings on the same tests whether the clients are recorded in process or
    through the proxy: the rules cannot tell the two paths apart."""
    if workers or mode != "in-process":
        suite = request.getfixturevalue("suite")
        db = str(tmp_path / "suite.db")
        args = ["--redirect-audit=" + db, "--redirect-audit-fail-on=high", "-p", "no:cacheprovider"]
        args += [f"--redirect-audit-mode={mode}", "-n", str(workers)]
        result = run_pytest(suite, *args, timeout=300)
    else:
        result, db = request.getfixturevalue("serial_run")
    result.assert_outcomes(passed=6, failed=1)
    out = result.stdout.str()
    # the failing test is the one with the high finding, failed with the finding in its report
    assert "FAILED (redirect-audit) test_sample.py::test_sdk_changes_method_on_307 - redi" in out
    assert "redirect-audit: 1 new finding at or above high during this test:" in out
    assert "HIGH RA101 method-downgrade: POST http://127.0.0.1" in out and "/r/307/order → 307 → GET" in out
    if not workers:  # the progress line: the test only the gate failed (xdist's has no file name)
        progress = re.search(r"^test_sample\.py ([.FG]+)", out, re.M)
        assert progress and sorted(progress[1]) == ["."] * 6 + ["G"], out[:2000]
    # after the summary, on the controller
    gate = out.split(" redirect-audit: tests failed by the gate ", 1)[1]
    assert gate.splitlines()[1:3] == [
        "1 test passed on its own and failed only by the gate (new findings under "
        "--redirect-audit-fail-on, or a marker's expected rule that did not fire):",
        "  test_sample.py::test_sdk_changes_method_on_307",
    ]
    assert findings_by_test(db) == expected_by_test()
    # the summary: findings grouped by test, each hop in one line, the command for its chain
    summary = out.split("redirect-audit ====", 1)[1]
    for name, (severity, path) in CULPRITS.items():
        assert f"test_sample.py::{name}: 1 finding" in summary
        assert f"{severity.upper():<6} RA101 method-downgrade: POST " in summary and path in summary
    assert "test_clean" not in summary and "test_fixture_clean" not in summary
    assert f"redirect-audit chains --db {db} --chain " in summary
    assert f"3 findings in 3 tests; store: {db}" in summary
    line = next(line for line in summary.splitlines() if line.startswith("recorded "))
    assert re.fullmatch(r"recorded 1\d exchanges? from [2-4] clients?: .+", line), line
    named = set(re.findall(r"(requests|httpx) \d+\.\d+ \(pytest (\w+)\)", line))
    assert {lib for lib, _ in named} == {"requests", "httpx"}, line
    assert {worker for _, worker in named} <= ({"gw0", "gw1"} if workers else {"main"}), line
    assert "TLS handshake" not in summary and "proxy variables removed" not in summary
    with sqlite3.connect(db) as conn:
        runs = conn.execute(
            "SELECT nodeid, worker, client, outcome FROM test_runs ORDER BY nodeid"
        ).fetchall()
        clients = {c for (c,) in conn.execute("SELECT DISTINCT client FROM exchanges")}
    assert [(n.split("::")[1], o) for n, _, _, o in runs] == sorted(
        [
            ("test_clean", "passed"),
            ("test_fixture_clean", "passed"),
            ("test_fixture_sees_its_own", "passed"),
            ("test_httpx_keeps_the_307", "passed"),
            ("test_own_proxy_authorization", "passed"),
            ("test_post_302_becomes_get", "passed"),
            ("test_sdk_changes_method_on_307", "failed"),
        ]
    )
    workers_seen = {w for _, w, _, _ in runs}
    assert workers_seen == ({"gw0", "gw1"} if workers else {"main"})
    assert (
        clients == {c for _, _, c, _ in runs} and len(clients) == 7
    )  # each test's traffic under its own label
    assert all(re.fullmatch(f"pytest-{w}-[0-9a-f]{{8}}-t[0-9]+", c) for _, w, c, _ in runs)
    chain = run_cli("chains", "--db", db, "--chain", "1")
    assert chain.returncode == 0 and "/r/301/clean" in chain.stdout


@SHARED
def test_sarif_and_junit_name_the_test(serial_run):
    _, db = serial_run
    sarif = json.loads(run_cli("findings", "-f", "sarif", "--db", db).stdout)
    tests = sorted(r["properties"]["test"] for r in sarif["runs"][0]["results"])
    assert tests == sorted(f"test_sample.py::{name}" for name in CULPRITS)
    junit = ET.fromstring(run_cli("findings", "-f", "junit", "--db", db).stdout)
    named = {p.get("value") for p in junit.iter("property") if p.get("name") == "test"}
    assert named == {f"test_sample.py::{name}" for name in CULPRITS}
    failure = next(f for f in junit.iter("failure") if "/r/307/order" in f.text)
    assert "test: test_sample.py::test_sdk_changes_method_on_307" in failure.text


@SHARED
def test_a_baseline_keeps_known_findings_from_failing_tests(sample_suite, serial_run, tmp_path):
    _, db = serial_run  # the first run, against the same upstream as the runs below
    baseline = tmp_path / "known.json"
    assert run_cli("check", "--db", db, "--write-baseline", str(baseline)).returncode == 0
    again = sample_suite.run(
        f"--redirect-audit={tmp_path / 'second.db'}",
        "--redirect-audit-fail-on=low",
        f"--redirect-audit-baseline={baseline}",
    )
    again.assert_outcomes(passed=7)
    fresh = sample_suite.run(f"--redirect-audit={tmp_path / 'third.db'}", "--redirect-audit-fail-on=low")
    fresh.assert_outcomes(passed=4, failed=3)  # without it, every test with a low finding fails
    bad = sample_suite.run("--redirect-audit", "--redirect-audit-baseline=" + str(tmp_path / "none.json"))
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    assert (
        "--redirect-audit-baseline: " in bad.stderr.str()
        and "none.json: cannot read baseline" in bad.stderr.str()
    )


def test_off_unless_asked_for_and_the_fixture_says_how(suite):
    suite.makepyfile(test_needs="def test_needs(redirect_audit):\n    redirect_audit.findings()\n")
    result = run_pytest(suite, "-p", "no:cacheprovider", "test_needs.py", "test_sample.py", timeout=300)
    result.assert_outcomes(passed=4, errors=4)  # the three fixture tests and test_needs say why
    out = result.stdout.str()
    assert out.count("the redirect_audit fixture needs the recorder: run pytest with --redirect-audit") >= 3
    assert "= redirect-audit =" not in out  # no recorder, no summary


def test_the_ini_switch_and_a_test_path_after_the_flag(suite, tmp_path):
    suite.makeini("[pytest]\nredirect_audit = true\nredirect_audit_db = " + str(tmp_path / "ini.db") + "\n")
    result = run_pytest(suite, "-p", "no:cacheprovider", "-k", "clean", timeout=300)
    result.assert_outcomes(passed=2, deselected=5)
    assert f"No findings in this session's traffic (store: {tmp_path / 'ini.db'})." in result.stdout.str()
    suite.makeini("[pytest]\n")
    path_after = run_pytest(
        suite, "-p", "no:cacheprovider", "--redirect-audit", "test_sample.py", "-k", "post_302", timeout=300
    )
    path_after.assert_outcomes(passed=1, deselected=6)
    assert "test_sample.py::test_post_302_becomes_get: 1 finding" in path_after.stdout.str()
    assert "store: a fresh store, " in path_after.stdout.str()


PYTEST_UNDER_RUN = (sys.executable, "-m", "pytest", "-p", "no:cacheprovider")


ENV_SUITE = """
import json, os, subprocess, sys, threading, urllib.request
from wsgiref.simple_server import make_server


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps(sorted(k for k in environ if k.upper() in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"))).encode()]


def test_no_proxy_variable_reaches_the_server_or_the_process():
    server = make_server("127.0.0.1", 0, app)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        seen = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/").read())
        assert seen == [], seen  # HTTP_PROXY in a WSGI environ reads as a `Proxy` request header
        assert not [k for k in os.environ if k.lower() in ("http_proxy", "https_proxy", "all_proxy")]
        # nothing of ours reads as a proxy to urllib, which takes any *_proxy variable for one
        assert [s for s in urllib.request.getproxies() if "redirect" in s] == [], urllib.request.getproxies()
        child = subprocess.run(
            [sys.executable, "-c", "import os; print(os.environ.get('HTTP_PROXY', ''))"],
            capture_output=True, text=True,
        )
        assert child.stdout.startswith("http://127.0.0.1:"), child.stdout  # subprocesses: through run's proxy
    finally:
        server.shutdown()
"""


def test_under_run_what_loaded_before_the_plugin_keeps_no_proxy_variable(pytester, tmp_path):
    """`run` puts its proxy variables in pytest's environment; the plugin records pytest's
    own clients in process and takes them out, but a plugin loaded before it may have
    snapshot the environment already: wsgiref's handlers copy os.environ into every
    request's WSGI environ (pytest-httpbin imports them at load), so requests' own suite
    saw HTTP_PROXY in its test server and one test changed outcome. The snapshot is
    scrubbed too; subprocesses still get the variables."""
    pytester.makepyfile(early="import wsgiref.simple_server  # loaded before redirect-audit's plugin\n")
    pytester.makepyfile(test_env=ENV_SUITE)
    done = run_cli(
        "run", "--db", str(tmp_path / "run.db"), "--", *PYTEST_UNDER_RUN, "-p", "early", "test_env.py",
        cwd=pytester.path, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    assert "1 passed" in done.stdout
    assert "recorded 1 exchange from 1 client: urllib" in done.stderr


def test_under_redirect_audit_run_each_test_is_its_own_client(suite, tmp_path):
    """`redirect-audit run -- pytest`, the plugin not asked for: one recorder (run's), one
    store, each test under its own label (two tests are never one client's duplicate
    write), the findings on their tests, run's gate and summary on top; pytest's own
    output has no section of ours."""
    db = tmp_path / "outer.db"
    done = run_cli(
        "run",
        "--db",
        str(db),
        "--fail-on",
        "high",
        "--",
        *PYTEST_UNDER_RUN,
        "test_sample.py",
        cwd=suite.path,
        timeout=300,
    )
    assert done.returncode == 90, (
        done.stdout + done.stderr
    )  # pytest passed; run's gate failed on the high finding
    assert "7 passed" in done.stdout
    assert "= redirect-audit =" not in done.stdout  # run sums up, not the plugin
    assert "NEW high RA101 method-downgrade" in done.stderr
    assert re.search(
        r"recorded 1\d exchanges? from \d clients?: requests 2\.\d+ \(pytest main\)", done.stderr
    )
    assert re.search(
        r"runtimes seen starting: pytest [\d.]+ \(Python 3\.\d+\.\d+\): 1 process\(es\)", done.stderr
    )
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM captures").fetchone() == (1,)  # run's recorder only
        labels = {c for (c,) in conn.execute("SELECT DISTINCT client FROM exchanges")}
    assert len(labels) == 7 and all(label.startswith("pytest-main-") for label in labels)  # one per test
    assert findings_by_test(str(db)) == expected_by_test()
    # a suite that clears the proxy variables, its clients through the proxy, under xdist:
    # run names its tests (each worker's note reaches the controller, which tells run) and
    # does not pass
    suite.makepyfile(test_scrub=SCRUBBING_SUITE)
    scrubbed = run_cli(
        "run",
        "--",
        *PYTEST_UNDER_RUN,
        "--redirect-audit-mode=proxy",
        "-n",
        "2",
        "test_scrub.py",
        cwd=suite.path,
        timeout=300,
    )
    assert scrubbed.returncode == 2, scrubbed.stdout + scrubbed.stderr
    assert "2 passed" in scrubbed.stdout
    assert (
        "2 tests ran with the proxy variables removed (a fixture or the test cleared them), so their "
        "HTTP traffic was not recorded: test_scrub.py::test_get, test_scrub.py::test_post"
    ) in scrubbed.stderr
    assert "  - 2 tests ran with the proxy variables removed" in scrubbed.stderr


def test_a_postgresql_store_gets_the_same_attribution(suite, pg_cluster):
    url = pg_cluster.new_database()
    result = run_pytest(suite, f"--redirect-audit={url}", "-p", "no:cacheprovider", timeout=300)
    result.assert_outcomes(passed=7)
    assert findings_by_test(url) == expected_by_test()
    assert "3 findings in 3 tests; store: postgresql" in result.stdout.str()


SCRUBBING_SUITE = '''
import os, pytest, requests

UP = os.environ["UPSTREAM"]


@pytest.fixture(autouse=True)
def no_proxies(monkeypatch):
    """As the test suites of many HTTP libraries do: no proxy from the environment."""
    for name in list(os.environ):
        if name.lower() in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
            monkeypatch.delenv(name)


def test_post():
    assert requests.post(f"{UP}/r/302/pay", data=b"a=1").status_code == 200


def test_get():
    assert requests.get(f"{UP}/r/301/x").status_code == 200
'''


def test_a_suite_that_clears_the_proxy_variables_is_recorded_in_process(pytester, upstream):
    """A suite whose fixture deletes every proxy variable: recorded all the same, since the
    test process's clients are recorded where they run. With the proxy instead
    (--redirect-audit-mode=proxy) it records nothing: the session says so, names the
    tests that ran without the variables, and exits 2 unless told that is fine."""
    pytester.makepyfile(test_scrub=SCRUBBING_SUITE)
    recorded = run_pytest(pytester, "--redirect-audit", "-p", "no:cacheprovider", timeout=300)
    recorded.assert_outcomes(passed=2)
    assert recorded.ret == 0
    out = recorded.stdout.str()
    assert re.search(r"recorded 4 exchanges? from 1 clients?: requests 2\.\d+ \(pytest main\) \(4\)", out), (
        out
    )
    assert "test_scrub.py::test_post: 1 finding" in out and "proxy variables removed" not in out
    proxied = run_pytest(
        pytester, "--redirect-audit", "--redirect-audit-mode=proxy", "-p", "no:cacheprovider", timeout=300
    )
    proxied.assert_outcomes(passed=2)  # the tests themselves pass
    assert proxied.ret == 2
    out = proxied.stdout.str()
    assert "No findings" not in out
    assert "recorded nothing: no HTTP(S) exchange went through the recorder" in out
    unproxied = (
        "2 tests ran with the proxy variables removed (a fixture or the test cleared them), so "
        "their HTTP traffic was not recorded: test_scrub.py::test_get, test_scrub.py::test_post"
    )
    assert unproxied in out
    assert "so this is not an all-clear" in out and "- 2 tests ran with the proxy variables removed" in out
    assert "The session exits 2; --redirect-audit-allow-empty accepts a session that records nothing." in out
    empty = run_pytest(
        pytester,
        "--redirect-audit",
        "--redirect-audit-allow-empty",
        "-p",
        "no:cacheprovider",
        "-k",
        "nothing",
        timeout=300,
    )
    assert empty.ret == pytest.ExitCode.NO_TESTS_COLLECTED  # pytest's own status stands
    assert "recorded nothing" in empty.stdout.str() and "The session passes;" in empty.stdout.str()


FAITHFUL_SUITE = """
import os, socket, ssl, threading
import httpx, pytest, requests

UP = os.environ["UPSTREAM"]
TLS_UP, PINNED = os.environ["TLS_UPSTREAM"], os.environ["PINNED_CA"]


def test_no_proxy_in_the_environment():
    assert not any(k.lower().endswith("_proxy") for k in os.environ)


def test_pinned_ca_bundle():
    # the client trusts its own CA alone: a recorder in the path would be refused
    assert requests.get(f"{TLS_UP}/r/302/pinned", verify=PINNED).json()["method"] == "GET"


def test_unreachable_host_raises_the_client_s_own_error():
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{UP}/r/302/gone?to=http://127.0.0.1:1/gone")


def test_malformed_response_raises_the_client_s_own_error():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def answer():
        conn, _ = server.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 abc nonsense\\r\\n\\r\\n")
        conn.close()

    threading.Thread(target=answer, daemon=True).start()
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(f"http://127.0.0.1:{server.getsockname()[1]}/bad")
    server.close()


def test_own_proxy_authorization_header():
    sent = "Basic dXNlcjpwYXNz"
    assert requests.get(f"{UP}/echo/auth", headers={"Proxy-Authorization": sent}).json()["headers"]["Proxy-Authorization"] == sent


def test_a_subprocess_client():
    # the subprocesses a test starts go through the recorder proxy, under the test's label
    import subprocess, sys
    code = f"import urllib.request; print(urllib.request.urlopen('{UP}/r/301/child').status)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "200"


async def _async_post():
    async with httpx.AsyncClient(follow_redirects=True) as client:
        return (await client.post(f"{UP}/r/307/async", content=b"x=1")).json()["method"]


def test_httpx_async():
    import asyncio

    assert asyncio.run(_async_post()) == "POST"


def test_aiohttp_without_trust_env():
    # aiohttp reads no proxy variable unless trust_env=True: recorded all the same
    import asyncio, aiohttp

    async def post():
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{UP}/r/302/aio", data=b"a=1") as answer:
                return (await answer.json())["method"]

    assert asyncio.run(post()) == "GET"
"""


def test_recording_in_process_changes_no_test_s_outcome(pytester, upstream, tmp_path):
    """Tests that a recorder proxy in the path would change (no proxy variable expected, a
    pinned CA bundle, an unreachable host, a malformed response, a Proxy-Authorization of
    the test's own): the same outcome per test with the plugin as without, and each hop
    the clients sent recorded (httpx's async client, aiohttp, a subprocess too)."""
    from upstream import self_signed_context

    secure = Upstream(tls=self_signed_context(tmp_path))
    try:
        pytester.makepyfile(test_faithful=FAITHFUL_SUITE)
        env = {"TLS_UPSTREAM": secure.origin, "PINNED_CA": str(tmp_path / "upstream-cert.pem")}
        for name, value in env.items():
            os.environ[name] = value
        try:
            args = ["-p", "no:cacheprovider", "-rA"]
            without = run_pytest(pytester, *args, timeout=300)
            db = tmp_path / "faithful.db"
            with_plugin = run_pytest(pytester, *args, f"--redirect-audit={db}", timeout=300)
        finally:
            for name in env:
                del os.environ[name]
    finally:
        secure.close()

    def outcomes(result: pytest.RunResult) -> dict[str, str]:
        return dict(
            (line.split()[1], line.split()[0])
            for line in result.outlines
            if line.split()[:1] in (["PASSED"], ["FAILED"], ["ERROR"])
        )

    assert outcomes(without) == outcomes(with_plugin), with_plugin.stdout.str()
    assert set(outcomes(without).values()) == {"PASSED"} and len(outcomes(without)) == 8, without.stdout.str()
    chains = json.loads(run_cli("chains", "-f", "json", "--db", str(db)).stdout)
    hops = {
        (h["from"]["url"].split("/", 3)[3], h["status"], (h["to"] or {}).get("method"))
        for c in chains
        for h in c["hops"]
    }
    assert {
        ("r/302/pinned", 302, "GET"),
        ("r/307/async", 307, "POST"),
        ("r/301/child", 301, "GET"),
    } <= hops, hops
    with sqlite3.connect(db) as conn:  # the child's exchanges carry its test's label, as the test's own do
        labels = dict(
            conn.execute("SELECT url, client FROM exchanges WHERE url LIKE '%/child' OR url LIKE '%/async'")
        )
    assert len(set(labels.values())) == 2 and all(
        re.fullmatch(r"pytest-main-[0-9a-f]{8}-t\d+", c) for c in labels.values()
    )
    bodies = {  # what each client sent on the follow-ups that keep the method: the same bytes
        h["from"]["url"].rsplit("/", 1)[1]: (h["from"]["body"]["length"], h["to"]["body"]["length"])
        for c in chains
        for h in c["hops"]
        if h["status"] == 307
    }
    assert bodies == {"async": (3, 3)}, bodies
    gone = [h for c in chains for h in c["hops"] if "gone" in h["from"]["url"]]
    assert (
        gone
        and gone[0]["to"]["url"] == "http://127.0.0.1:1/gone"
        and "Connection refused" in gone[0]["to"]["error"]
    )


def test_the_test_process_imports_nothing_of_the_tool(pytester, upstream):
    """redirect-audit installed where the tests run (as here) is still run as a child: the
    test process imports neither mitmproxy nor SQLAlchemy nor the store, so a suite whose
    warnings are errors (httpx's own) never meets their import-time deprecation warnings,
    during a test or after."""
    pytester.makeini("[pytest]\nfilterwarnings =\n    error\n")
    pytester.makepyfile(
        test_strict="""
import os, sys, urllib.request

def test_first():
    assert urllib.request.urlopen(os.environ["UPSTREAM"] + "/r/302/strict", data=b"a=1").status == 200

def test_nothing_of_the_tool_here(redirect_audit):
    assert [f["rule_id"] for f in redirect_audit.findings()] == []  # a question asked mid-session
    loaded = sorted(m for m in ("mitmproxy", "sqlalchemy", "analyzer", "pandas") if m in sys.modules)
    assert loaded == [], loaded
"""
    )
    # started cold (not forked from the warm harness, which has all of it loaded already)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--redirect-audit", "-p", "no:cacheprovider", "-p", "no:xdist"],
        cwd=pytester.path,
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"},
    )
    out = done.stdout
    assert done.returncode == 0 and "2 passed" in out, out + done.stderr
    assert "Warning" not in out, out
    assert "test_strict.py::test_first: 1 finding" in out, out


MARKED_SUITE = """
import os, pytest, requests

UP = os.environ["UPSTREAM"]


@pytest.mark.redirect_audit(expect=["RA101"])
def test_expected_downgrade():
    requests.post(f"{UP}/r/302/expected", data=b"a=1")


@pytest.mark.redirect_audit(expect=["method-downgrade"])
def test_expected_but_it_did_not_happen():
    requests.get(f"{UP}/r/301/clean-expect")


@pytest.mark.redirect_audit(ignore="RA101")
def test_ignored():
    requests.post(f"{UP}/r/302/ignored", data=b"a=1")


def test_by_the_configuration():
    requests.post(f"{UP}/r/302/by-config", data=b"a=1")


def test_unmarked():
    requests.post(f"{UP}/r/302/unmarked", data=b"a=1")


def test_broken_and_downgraded():
    requests.post(f"{UP}/r/302/broken", data=b"a=1")
    assert False, "the test's own failure"


@pytest.mark.redirect_audit(expect=["RA999"])
def test_a_marker_naming_no_rule():
    pass
"""


def test_marked_expectations_and_the_project_configuration(pytester, upstream):
    """fail-on comes from pyproject.toml; an expected finding passes, an expected one that
    did not happen fails, an ignored one and one the configuration's per-URL ignores
    cover pass; the rest fail as before. The marker is known to --strict-markers even
    with the plugin off."""
    pytester.makepyfile(test_marked=MARKED_SUITE)
    pytester.makefile(
        ".toml",
        pyproject='[tool.redirect-audit]\nfail-on = "low"\n\n'
        '[tool.redirect-audit.per-url-ignores]\n"*/r/302/by-config" = ["RA101"]\n',
    )
    done = run_pytest(pytester, "--redirect-audit", "--strict-markers", "-p", "no:cacheprovider", "-rf", "-v")
    out = done.stdout.str()
    assert f"Configuration: {pytester.path / 'pyproject.toml'}" in out  # -v names the file used
    done.assert_outcomes(passed=3, failed=4)
    for name in ("test_expected_downgrade", "test_ignored", "test_by_the_configuration"):
        assert f"test_marked.py::{name} PASSED" in out
    assert "FAILED (redirect-audit) test_marked.py::test_unmarked" in out
    # a test only the gate failed is told apart from one that failed on its own as well
    assert "test_marked.py::test_unmarked FAILED (redirect-audit)" in out
    assert "test_marked.py::test_broken_and_downgraded FAILED" in out
    assert "test_broken_and_downgraded FAILED (redirect-audit)" not in out
    gate = out.split(" redirect-audit: tests failed by the gate ", 1)[1].split("short test summary")[0]
    assert gate.splitlines()[1:-1] == [
        "3 tests passed on their own and failed only by the gate (new findings under "
        "--redirect-audit-fail-on, or a marker's expected rule that did not fire):",
        "  test_marked.py::test_a_marker_naming_no_rule",
        "  test_marked.py::test_expected_but_it_did_not_happen",
        "  test_marked.py::test_unmarked",
        "1 test failed on its own, and the gate failed it as well:",
        "  test_marked.py::test_broken_and_downgraded",
    ], gate
    assert "assert False" in out and "the test's own failure" in out  # its own report, unchanged
    assert (
        "redirect-audit: the test expected RA101 method-downgrade (@pytest.mark.redirect_audit(expect=...)), "
        "but it did not happen during this test" in out
    )
    assert "unknown rule 'RA999'" in out
    assert "1 finding suppressed" in out and "on per-url-ignores" in out
    off = run_pytest(pytester, "--strict-markers", "-p", "no:cacheprovider", "-k", "expected_downgrade")
    off.assert_outcomes(passed=1)
    # the command line over the file: only findings on another host, or of other rules, fail
    elsewhere = run_pytest(
        pytester,
        "--redirect-audit",
        "--redirect-audit-host=*.elsewhere.test",
        "-p",
        "no:cacheprovider",
        "-rf",
    )
    elsewhere.assert_outcomes(passed=4, failed=3)  # the expectations still hold
    assert "test_marked.py::test_unmarked" not in elsewhere.stdout.str().split("short test summary")[1]
    others = run_pytest(
        pytester, "--redirect-audit", "--redirect-audit-select=RA102,RA107", "-p", "no:cacheprovider"
    )
    others.assert_outcomes(passed=4, failed=3)


ASSERTING_SUITE = """
import requests

def test_pays(redirect_audit):
    requests.post(f"{UP}/r/302/checkout", data=b"a=1")
    redirect_audit.assert_no_findings()
"""


def test_a_failed_assert_no_findings_shows_the_finding_not_the_plugin(pytester, upstream):
    pytester.makepyfile(test_asserting=ASSERTING_SUITE.replace("{UP}", upstream.origin))
    result = run_pytest(pytester, "--redirect-audit", "-p", "no:cacheprovider", timeout=300)
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    failure = out[out.index("_ test_pays _") : out.index("test_asserting.py:5: AssertionError")]
    assert "redirect_audit.assert_no_findings()" in failure  # the test's own line
    assert "raise AssertionError" not in failure and "pytest_redirect_audit" not in failure, failure
    assert "redirect_audit = <redirect_audit: this test's findings and chains in " in failure
    assert "E       AssertionError: redirect-audit: 1 finding at or above low during this test:" in failure
    assert "E       LOW    method-downgrade (RA101) · chain " in failure
    assert re.search(r"E {14}POST http://127\.0\.0\.1:\d+/r/302/checkout → 302 → GET ", failure), failure
    assert "E              the chain: " in failure and " chains --db " in failure
