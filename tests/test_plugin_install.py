"""The light plugin (plugin/, pytest-redirect-audit) where users install it: a test
environment without redirect-audit. When it cannot find or talk to redirect-audit, pytest
stops before any test with one line that says what to do, never a traceback. (That it
records a real suite there, and changes no outcome, is tests/test_thirdparty_suites.py.)
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from lightenv import LightEnv, pinned

pytestmark = pytest.mark.slow

SUITE = """
import urllib.request

def test_one():
    assert 1 + 1 == 2
"""


@pytest.fixture(scope="module")
def light(tmp_path_factory) -> LightEnv:
    env = LightEnv(tmp_path_factory.mktemp("light") / "venv")
    env.install(*pinned("pytest"))
    env.install_plugin()
    return env


def run_light(
    env: LightEnv, where: Path, *args: str, path: str = "/usr/bin:/bin"
) -> subprocess.CompletedProcess[str]:
    (where / "test_it.py").write_text(SUITE)
    environment = {k: v for k, v in os.environ.items() if not k.startswith("REDIRECT_AUDIT")}
    environment["PATH"] = path
    return subprocess.run(
        [str(env.python), "-m", "pytest", "-p", "no:cacheprovider", "-q", *args],
        cwd=where,
        capture_output=True,
        text=True,
        timeout=120,
        env=environment,
    )


def test_without_redirect_audit_anywhere_pytest_says_how_to_get_it(light, tmp_path):
    done = run_light(light, tmp_path, "--redirect-audit")
    assert done.returncode == 4, done.stdout + done.stderr  # pytest's usage error
    said = done.stderr
    assert "redirect-audit was not found" in said and "uv tool install redirect-audit" in said, said
    assert "--redirect-audit-tool" in said and "Traceback" not in said + done.stdout
    # not asked for: the plugin stays out of the way, and the suite runs as ever
    plain = run_light(light, tmp_path)
    assert plain.returncode == 0 and "1 passed" in plain.stdout, plain.stdout + plain.stderr


def test_a_tool_that_speaks_another_protocol_is_refused_by_name(light, tmp_path):
    fake = tmp_path / "old-redirect-audit"
    fake.write_text(
        f"#!{sys.executable}\n"
        "import json, sys\n"
        "for line in sys.stdin:\n"
        "    print(json.dumps({'ok': {'protocol': 99, 'version': '9.9.9'}}), flush=True)\n"
    )
    fake.chmod(0o755)
    done = run_light(light, tmp_path, "--redirect-audit", f"--redirect-audit-tool={fake}")
    assert done.returncode == 4, done.stdout + done.stderr
    assert f"redirect-audit ({fake}) is redirect-audit 9.9.9, which speaks protocol 99" in done.stderr
    from pytest_redirect_audit.tool import PROTOCOL

    assert f"pytest-redirect-audit 0.1.0 speaks {PROTOCOL}" in done.stderr and "Traceback" not in done.stderr


def test_a_tool_that_stops_says_why(light, tmp_path):
    # an older redirect-audit has no pytest-backend command: click says so and exits 2
    old = "sh -c 'echo \"Error: No such command '\\''pytest-backend'\\''.\" >&2; exit 2' redirect-audit"
    done = run_light(light, tmp_path, "--redirect-audit", f"--redirect-audit-tool={old}")
    assert done.returncode == 4, done.stdout + done.stderr
    assert "stopped answering. It is too old for this plugin: upgrade redirect-audit." in done.stderr
    assert "No such command 'pytest-backend'" in done.stderr, done.stderr
    missing = run_light(light, tmp_path, "--redirect-audit", "--redirect-audit-tool=/nowhere/redirect-audit")
    assert missing.returncode == 4
    assert "could not start redirect-audit (/nowhere/redirect-audit)" in missing.stderr
    assert "No such file or directory" in missing.stderr, missing.stderr


def test_the_tool_on_path_records_the_suite(light, tmp_path):
    """The commonest install: redirect-audit as an isolated tool on PATH, the plugin alone
    with the tests. The tool's environment is this project's; the tests' has neither
    mitmproxy nor redirect-audit."""
    assert not light.importable("analyzer") and not light.importable("mitmproxy")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "redirect-audit").symlink_to(Path(sys.executable).parent / "redirect-audit")
    (tmp_path / "test_it.py").write_text(SUITE)
    (tmp_path / "test_talks.py").write_text(
        "import http.server, threading, urllib.request\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_POST(self):\n"
        "        self.rfile.read(int(self.headers['Content-Length']))\n"
        "        self.send_response(302); self.send_header('Location', '/done'); self.send_header('Content-Length', '0'); self.end_headers()\n"
        "    def do_GET(self):\n"
        "        self.send_response(200); self.send_header('Content-Length', '2'); self.end_headers(); self.wfile.write(b'ok')\n"
        "    def log_message(self, *a): pass\n"
        "def test_pay():\n"
        "    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), H)\n"
        "    threading.Thread(target=server.serve_forever, daemon=True).start()\n"
        "    try:\n"
        "        url = f'http://127.0.0.1:{server.server_port}/pay'\n"
        "        assert urllib.request.urlopen(urllib.request.Request(url, data=b'amount=1')).read() == b'ok'\n"
        "    finally:\n"
        "        server.shutdown()\n"
    )
    db = tmp_path / "capture.db"
    done = run_light(
        light,
        tmp_path,
        f"--redirect-audit={db}",
        "--redirect-audit-fail-on=low",
        path=os.pathsep.join([str(bin_dir), "/usr/bin", "/bin"]),
    )
    out = done.stdout
    assert done.returncode == 1, out + done.stderr  # the gate failed test_pay
    assert "1 failed, 1 passed" in out, out
    assert "redirect-audit: 1 new finding at or above low during this test:" in out, out
    urllib = f"urllib {sys.version_info.major}.{sys.version_info.minor} (pytest main) (2)"
    assert f"recorded 2 exchanges from 1 client: {urllib}" in out, out
    assert (
        "test_talks.py::test_pay: 1 finding" in out
        and "RA101 method-downgrade: POST http://127.0.0.1:" in out
    )
    # the test process's own traffic was stored by the tool, with no proxy in between
    with sqlite3.connect(db) as conn:
        kept = conn.execute(
            "SELECT c.creator, count(e.id) FROM captures c JOIN exchanges e ON e.capture_id = c.id GROUP BY c.id"
        ).fetchall()
    assert [(creator.endswith("(pytest, in process)"), n) for creator, n in kept] == [(True, 2)], kept


def test_calls_whose_answers_wait_never_fill_the_pipe_back():
    """The plugin sends some calls without waiting for their answers (a label switch and a
    test's end, twice per test of a suite that starts subprocesses). A suite of thousands
    of tests must not fill the pipe the tool answers on: the tool would stop reading calls
    and both sides would wait forever (seen on HTTPie's suite)."""
    import threading

    from pytest_redirect_audit.tool import PROTOCOL, Child, ToolError

    tool = Child([str(Path(sys.executable).parent / "redirect-audit")], "redirect-audit (test)")
    try:
        answered: list[dict] = []

        def many() -> None:
            for _ in range(20_000):  # each answer ~60 bytes: 1.2 MB, far past a pipe's 64 KiB
                tool.send("hello")
            answered.append(tool.call("hello"))

        sender = threading.Thread(target=many, daemon=True)
        sender.start()
        sender.join(timeout=120)
        if sender.is_alive():  # stuck: end the child so that nothing hangs, and fail
            tool.process.kill()
            pytest.fail("the plugin and the tool both waited on each other (the answer pipe filled up)")
        assert answered and answered[0]["protocol"] == PROTOCOL
        tool.send("no_such_call")
        with pytest.raises(ToolError, match="has no call 'no_such_call'"):
            tool.call("hello")
    finally:
        tool.close()
    assert tool.process.returncode == 0


def test_a_recorder_never_outlives_the_process_that_started_it(tmp_path):
    """The tool's backend killed outright (SIGKILL: no chance to stop anything): its
    recorder is told by the kernel (PR_SET_PDEATHSIG) and stops instead of listening on,
    orphaned, for ever."""
    import psutil
    from pytest_redirect_audit.tool import Child

    tool = Child([str(Path(sys.executable).parent / "redirect-audit")], "redirect-audit (test)")
    tool.send("hello")
    tool.send("configure", db=str(tmp_path / "s.db"), session="0badcafe", fresh=True, baseline=None)
    tool.call("start", label="pytest-main-0badcafe", in_process=False, confdir=str(tmp_path / "conf"))
    recorders = psutil.Process(tool.process.pid).children()
    assert [p.name() for p in recorders] == ["mitmdump"], recorders
    tool.process.kill()
    tool.process.wait()
    _, alive = psutil.wait_procs(recorders, timeout=30)
    for process in alive:  # nothing left behind by the test itself, whatever happens
        process.kill()
    assert alive == [], "the recorder outlived the backend that started it"
