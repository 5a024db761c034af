"""`redirect-audit run -- CMD`: real clients (curl, a Python script, a Node script) run
under it against loopback upstreams; the exit statuses (CMD fails, the gate fails,
both pass, a signal), the findings printed, and the child's other HTTPS still verifying.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import require_program, run_cli
from proxyrun import ROOT
from upstream import Upstream, self_signed_context

from analyzer.ingest.recorder import RUNNING

pytestmark = pytest.mark.slow


@pytest.fixture
def env(tmp_path) -> dict:
    """mitmproxy's CA in a directory of the test's own, never ~/.mitmproxy."""
    return {"REDIRECT_AUDIT_CONFDIR": str(tmp_path / "conf"), "NO_COLOR": "1"}


def run(*args: str, env: dict, timeout: float = 180) -> subprocess.CompletedProcess:
    return run_cli("run", *args, env=env, timeout=timeout)


def store_of(stderr: str) -> str:
    line = next(line for line in stderr.splitlines() if re.search(r"recording (through|transparently)", line))
    return line.split(" into ", 1)[1].removeprefix("a fresh store, ")


def test_a_post_answered_302_is_found_and_the_gate_decides_the_exit_status(upstream, env, tmp_path):
    curl = require_program("curl", "apt-get install curl")
    argv = ["--", curl, "-s", "-L", "-d", "amount=1", f"{upstream.origin}/r/302/pay"]
    low = run("--fail-on", "low", *argv, env=env)
    assert low.returncode == 90, low.stderr  # curl passed, the gate failed
    assert (
        "redirect-audit run: exit status 90: the command passed and the gate failed (91 when both fail, "
        "the command's own status when only it does)"
    ) in low.stderr
    assert '"method": "GET"' in low.stdout  # curl's own output comes through
    assert "LOW    method-downgrade (RA101)" in low.stdout
    assert f"POST {upstream.origin}/r/302/pay → 302 → GET {upstream.origin}/echo/pay" in low.stdout
    assert f"NEW low RA101 method-downgrade: POST {upstream.origin}/r/302/pay" in low.stderr
    assert "exited with 0; 2 exchanges seen, 2 stored" in low.stderr
    assert f"recorded 2 exchanges from 1 client: curl {curl_version(curl)} (2)" in low.stderr
    db = store_of(low.stderr)
    assert (
        db.startswith(os.path.realpath(os.environ.get("TMPDIR", "/tmp"))) and Path(db).exists()
    )  # kept, printed
    assert f"chains --db {db}" in low.stderr
    passing = run("--fail-on", "medium", *argv, env=env)  # the same finding is below the bar
    assert passing.returncode == 0, passing.stderr
    assert "0 findings at or above medium not in the baseline" in passing.stderr
    assert store_of(passing.stderr) != db  # a fresh store per run


def test_the_project_configuration_decides_what_fails_a_run(upstream, env, tmp_path):
    """fail-on and per-url-ignores from the pyproject.toml of the directory `run` starts
    in: the ignored finding is counted, not shown, and fails nothing; -v names the file."""
    curl = require_program("curl", "apt-get install curl")
    argv = ["run", "-v", "--", curl, "-s", "-L", "-d", "amount=1", f"{upstream.origin}/r/302/pay"]
    (tmp_path / "pyproject.toml").write_text('[tool.redirect-audit]\nfail-on = "low"\n')
    failing = run_cli(*argv, env=env, cwd=tmp_path, timeout=180)
    assert failing.returncode == 90, failing.stderr
    assert f"configuration: {tmp_path.resolve() / 'pyproject.toml'}" in failing.stderr
    assert "NEW low RA101 method-downgrade" in failing.stderr
    (tmp_path / "pyproject.toml").write_text(
        '[tool.redirect-audit]\nfail-on = "low"\n\n[tool.redirect-audit.per-url-ignores]\n'
        '"*/r/302/pay" = ["method-downgrade"]\n'
    )
    passing = run_cli(*argv, env=env, cwd=tmp_path, timeout=180)
    assert passing.returncode == 0, passing.stderr
    assert "method-downgrade" not in passing.stdout
    assert "1 finding suppressed: 1 on per-url-ignores" in passing.stderr
    bad = run_cli(*argv[:2], "--select", "RA1OI", *argv[2:], env=env, cwd=tmp_path)
    assert bad.returncode == 2 and "unknown rule 'RA1OI'" in bad.stderr
    assert " seen, " not in bad.stderr  # refused before the command ran


def test_the_exit_status_tells_the_command_s_failure_the_gate_s_and_both_apart(upstream, env):
    """CI must tell "my tests broke" from "redirect-audit found something": the command's
    own status when only it failed, 90 when only the gate did, 91 when both did."""
    post = f"import urllib.request, sys; urllib.request.urlopen('{upstream.origin}/r/302/x', data=b'a=1'); "
    both = run("--fail-on", "low", "--", sys.executable, "-c", post + "sys.exit(3)", env=env)
    assert both.returncode == 91, both.stderr
    assert "exited with 3" in both.stderr
    assert "method-downgrade" in both.stdout  # still analyzed and shown
    assert (
        "exit status 91: the command failed (status 3) and so did the gate (90 when only the gate fails, "
        "the command's own status when only it does)"
    ) in both.stderr
    command_only = run("--fail-on", "high", "--", sys.executable, "-c", post + "sys.exit(3)", env=env)
    assert command_only.returncode == 3, command_only.stderr  # RA101 is low: under the bar
    assert "exit status" not in command_only.stderr
    gate_only = run("--fail-on", "low", "--", sys.executable, "-c", post + "sys.exit(0)", env=env)
    assert gate_only.returncode == 90, gate_only.stderr
    neither = run("--fail-on", "high", "--", sys.executable, "-c", post + "sys.exit(0)", env=env)
    assert neither.returncode == 0, neither.stderr


def test_a_clean_command_passes_and_a_store_named_with_db_is_kept(upstream, env, tmp_path):
    db = tmp_path / "kept.db"
    script = f"import urllib.request; urllib.request.urlopen('{upstream.origin}/r/301/clean').read()"
    first = run("--db", str(db), "--label", "smoke", "--", sys.executable, "-c", script, env=env)
    assert first.returncode == 0, first.stderr
    assert "No findings in this run's traffic." in first.stdout
    second = run("--db", str(db), "--label", "smoke", "--", sys.executable, "-c", script, env=env)
    assert second.returncode == 0
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT client, count(*) FROM exchanges GROUP BY client").fetchall() == [
            ("smoke", 4)
        ]
        assert conn.execute("SELECT count(*) FROM captures").fetchone() == (2,)
        # the label is the listener's: no credential was sent, none stored
        assert "Proxy-Authorization" not in "".join(
            r[0] for r in conn.execute("SELECT request_headers FROM exchanges")
        )


def test_the_child_s_other_https_still_verifies_and_node_is_recorded(upstream, env, tmp_path):
    """The child trusts what it trusted before (here: a private CA in SSL_CERT_FILE, for a
    second TLS server it reaches directly) and mitmproxy's CA. Node's fetch and https,
    used as any application does, are recorded whatever the Node version (a preload in
    NODE_OPTIONS; Node before 22.21 reads no proxy variable) and trust the CA through
    NODE_EXTRA_CA_CERTS; each Node process says as it exits whether it sent anything."""
    node = require_program("node", "apt-get install nodejs")
    tls_dir = tmp_path / "tls"
    tls_dir.mkdir()
    second = Upstream(tls=self_signed_context(tls_dir))
    secure = Upstream(tls=self_signed_context(tmp_path))
    try:
        own_trust = (
            tls_dir / "upstream-cert.pem"
        )  # the certificate self_signed_context wrote, as the child's trust
        assert own_trust.exists()
        script = tmp_path / "client.py"
        script.write_text(
            textwrap.dedent(f"""
            import http.client, json, ssl, urllib.request
            # through the proxy, over HTTPS: trusts mitmproxy's CA through the bundle
            print(urllib.request.urlopen('{secure.origin}/r/303/tls', data=b'k=v').read().decode())
            # straight to the second server (no proxy): verified against the child's own trust
            conn = http.client.HTTPSConnection('127.0.0.1', {second.port}, context=ssl.create_default_context())
            conn.request('GET', '/echo/direct')
            print('direct', conn.getresponse().status)
        """)
        )
        done = run(
            "--set",
            "ssl_insecure=true",
            "--",
            sys.executable,
            str(script),
            env={**env, "SSL_CERT_FILE": str(own_trust)},
        )
        assert done.returncode == 0, done.stderr + done.stdout
        assert "direct 200" in done.stdout
        assert "exited with 0; 2 exchanges seen, 2 stored" in done.stderr  # the direct request went around
        js = tmp_path / "client.mjs"
        js.write_text(
            textwrap.dedent(f"""
            // Node's own clients, as an application uses them: nothing here knows of a proxy
            import http from "node:http";
            import https from "node:https";
            const r = await fetch("{secure.origin}/r/303/node", {{ method: "POST", body: "a=1" }});
            console.log("node", r.status, (await r.json()).method);
            await new Promise((resolve, reject) => https
                .request("{secure.origin}/r/307/https", {{ method: "PUT" }}, (res) => {{
                    console.log("https", res.statusCode);
                    res.resume();
                    res.on("end", resolve);
                }})
                .on("error", reject)
                .end("b=2"));
            // a client that proxies by itself (axios does): straight to the recorder, once
            const proxy = new URL(process.env.HTTP_PROXY);
            const plain = "{upstream.origin}/r/301/self";
            await new Promise((resolve, reject) => http
                .get({{ host: proxy.hostname, port: proxy.port, path: plain, headers: {{ Host: new URL(plain).host }} }},
                    (res) => {{ console.log("self", res.statusCode); res.resume(); res.on("end", resolve); }})
                .on("error", reject));
        """)
        )
        both = f"{shlex.quote(node)} -e 0 && {shlex.quote(node)} {shlex.quote(str(js))}"
        node_run = run(
            "--set",
            "ssl_insecure=true",
            "--label",
            "web",
            "--",
            "sh",
            "-c",
            both,
            env={**env, "NODE_OPTIONS": "--no-deprecation"},  # the user's own options are kept
        )
        assert node_run.returncode == 90, node_run.stderr + node_run.stdout  # the 307 nobody followed
        assert "node 200 GET" in node_run.stdout and "https 307" in node_run.stdout
        assert "self 301" in node_run.stdout
        assert "4 exchanges seen, 4 stored" in node_run.stderr
        version = subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip()[1:]
        assert (
            f"runtimes seen starting: node {version}: 2 process(es), 1 sent nothing ((no script))"
        ) in node_run.stderr
        assert (
            "recorded 4 exchanges from 2 clients: no User-Agent (web) (2), node (web) (2)" in node_run.stderr
        )
        db = store_of(node_run.stderr)
        chains = json.loads(run_cli("chains", "-f", "json", "--db", db).stdout)
        assert sorted(
            (h["from"]["method"], h["status"], h["to"]["method"] if h["to"] else None)
            for c in chains
            for h in c["hops"]
        ) == [("GET", 301, None), ("POST", 303, "GET"), ("PUT", 307, None)]
    finally:
        second.close()
        secure.close()


def test_verbose_lists_what_it_set_and_loopback_no_proxy_entries_are_removed(upstream, env):
    script = "import os, json; print(json.dumps({k: os.environ.get(k) for k in ('NO_PROXY', 'no_proxy', 'HTTP_PROXY')}))"
    done = run(
        "-v",
        "--allow-empty",
        "--label",
        "ci",
        "--",
        sys.executable,
        "-c",
        script,
        env={**env, "NO_PROXY": "localhost,127.0.0.1,::1,.corp.example", "no_proxy": "127.0.0.0/8"},
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.splitlines()[0])
    assert seen["NO_PROXY"] == ".corp.example" and seen["no_proxy"] is None
    # the label's own listener: no credential in the URL, so no header the child sends changes
    given = re.search(r"recording through (http://127\.0\.0\.1:\d+) \(label ci\)", done.stderr)
    assert given and seen["HTTP_PROXY"] == given[1], done.stderr
    for name in (
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "SSL_CERT_FILE",
        "REQUESTS_CA_BUNDLE",
        "CURL_CA_BUNDLE",
        "NODE_EXTRA_CA_CERTS",
        "NODE_OPTIONS",
        "JAVA_TOOL_OPTIONS",
    ):
        assert f"redirect-audit run:   {name}=" in done.stderr
    assert "redirect-audit run:   no_proxy removed" in done.stderr


def test_a_signal_is_passed_to_the_command_and_what_it_did_is_still_analyzed(upstream, env, tmp_path):
    script = tmp_path / "slow.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys, time, urllib.request
        try:
            urllib.request.urlopen('{upstream.origin}/r/302/before', data=b'a=1').read()
            print('sent', flush=True)  # inside the try: the signal may come as soon as this is read
            time.sleep(60)
        except KeyboardInterrupt:
            print('interrupted', flush=True)
            sys.exit(130)
    """)
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "analyzer", "run", "--", sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, **env},
    )
    deadline = time.monotonic() + 60
    line = process.stdout.readline()
    assert line.strip() == "sent" and time.monotonic() < deadline
    process.send_signal(signal.SIGINT)  # to run alone, as a CI runner's cancel does: passed on
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "interrupted" in out
    assert "was interrupted" in err or "exited with 130" in err
    assert "method-downgrade" in out and "/r/302/before" in out
    assert "Traceback" not in err


def test_usage_mistakes_and_a_missing_command_are_one_line(env):
    missing = run("--", "no-such-program-here", env=env)
    assert missing.returncode == 2
    assert (
        missing.stderr.strip().splitlines()[-1]
        == "redirect-audit: error: no-such-program-here: command not found"
    )
    no_cmd = run_cli("run", env=env)
    assert no_cmd.returncode == 2 and "Missing argument '-- CMD [ARGS]...'" in no_cmd.stderr
    bad_set = run("--set", "ssl_insecure", "--", "true", env=env)
    assert bad_set.returncode == 2 and "'ssl_insecure' is not NAME=VALUE" in bad_set.stderr


def test_nothing_is_left_in_the_temporary_directory_but_a_fresh_store(upstream, env, tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**env, "TMPDIR": str(scratch)}
    kept = run("--db", str(tmp_path / "named.db"), "--allow-empty", "--", "true", env=env)
    assert kept.returncode == 0, kept.stderr
    assert list(scratch.iterdir()) == []  # with --db, the CA bundle and the log went with the run
    refused = run("--db", str(tmp_path / "no" / "such" / "dir.db"), "--", "true", env=env)
    assert refused.returncode == 2 and "cannot open store" in refused.stderr
    assert list(scratch.iterdir()) == []
    fresh = run("--", "true", env=env)
    (left,) = scratch.iterdir()
    assert store_of(fresh.stderr) == str(left / "capture.db")  # the fresh store stays, where it said


def curl_version(curl: str) -> str:
    """curl's version as its User-Agent gives it, major.minor: '8.14'."""
    words = subprocess.run([curl, "--version"], capture_output=True, text=True, check=True).stdout.split()
    return ".".join(words[1].split(".")[:2])


def test_a_run_that_records_nothing_says_why_and_exits_2(env):
    """Not "No findings": nothing was judged. The command cleared the proxy variables here,
    as the fixtures of many HTTP libraries' test suites do."""
    script = "import os; [os.environ.pop(k) for k in list(os.environ) if k.lower().endswith('_proxy')]"
    empty = run("--", sys.executable, "-c", script, env=env)
    assert empty.returncode == 2, empty.stderr
    assert "No findings" not in empty.stdout + empty.stderr
    assert "recorded nothing: no HTTP(S) exchange went through the recorder" in empty.stderr
    assert "nothing was judged, so this is not an all-clear" in empty.stderr
    assert "the command cleared the proxy variables, or its clients do not read them" in empty.stderr
    assert "--allow-empty accepts a run that records nothing" in empty.stderr
    allowed = run("--allow-empty", "--", sys.executable, "-c", script, env=env)
    assert allowed.returncode == 0, allowed.stderr
    assert "recorded nothing" in allowed.stderr  # still said
    # a pytest run that failed: its status wins, and the reasons speak of tests
    pytest_run = run("--", sys.executable, "-m", "pytest", "--no-such-option", env=env)
    assert pytest_run.returncode == 4, pytest_run.stderr
    assert "recorded nothing" in pytest_run.stderr
    assert "the tests' HTTP clients do not read the proxy variables" in pytest_run.stderr


def test_the_command_starts_while_the_recorder_boots_and_nothing_waits_for_an_unused_one(
    upstream, env, tmp_path
):
    """With mitmproxy's CA made already, `run` binds the proxy's port itself and starts the
    command at once: a client that connects in its first milliseconds waits in the port's
    queue and is recorded; a command that never connects costs no recorder start-up, and
    the recorder stopped on the way leaves the store as clean as a finished run."""
    db = tmp_path / "kept.db"
    first = run("--db", str(db), "--allow-empty", "--", "true", env=env)  # makes the CA
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "conf" / "mitmproxy-ca-cert.pem").exists()
    script = (
        f"import urllib.request; urllib.request.urlopen('{upstream.origin}/r/302/early', data=b'a=1').read()"
    )
    early = run("--db", str(db), "--fail-on", "low", "--", sys.executable, "-c", script, env=env)
    assert early.returncode == 90, early.stderr
    assert "exited with 0; 2 exchanges seen, 2 stored" in early.stderr
    assert f"NEW low RA101 method-downgrade: POST {upstream.origin}/r/302/early" in early.stderr
    for _ in range(3):  # never touched: stopped where it stood, at any point of its start-up
        unused = run("--db", str(db), "--", "true", env=env)
        assert unused.returncode == 2, unused.stderr
        assert "true exited with 0; 0 exchanges seen, 0 stored" in unused.stderr
        assert "recorded nothing: no HTTP(S) exchange went through the recorder" in unused.stderr
        assert "the recorder failed" not in unused.stderr
    again = run("--db", str(db), "--fail-on", "high", "--", sys.executable, "-c", script, env=env)
    assert again.returncode == 0, again.stderr
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM exchanges").fetchone() == (4,)
        # no recorder left a running mark behind (the next would report it "stopped uncleanly")
        assert conn.execute("SELECT key FROM meta WHERE key LIKE ?", (f"{RUNNING}%",)).fetchall() == []


def test_tls_handshakes_a_client_refused_are_counted_by_host(upstream, env, tmp_path):
    """curl pinned to a CA bundle of its own does not trust the recorder: what it sent is
    not seen, and the summary names the host instead of passing quietly. A second curl
    trusts the recorder, but the recorder does not trust the server's own certificate:
    that is counted on a line of its own, with the way out."""
    curl = require_program("curl", "apt-get install curl")
    secure = Upstream(tls=self_signed_context(tmp_path))
    try:
        pinned = tmp_path / "upstream-cert.pem"
        url = secure.origin.replace("127.0.0.1", "localhost")
        both = (
            f"{shlex.quote(curl)} -s --cacert {shlex.quote(str(pinned))} {url}/echo/pinned; echo pinned $?; "
            f"{shlex.quote(curl)} -s {secure.origin}/echo/untrusted; echo untrusted $?"
        )
        done = run("--", "sh", "-c", both, env=env)
    finally:
        secure.close()
    assert "pinned 60" in done.stdout, (
        done.stdout + done.stderr
    )  # curl: the peer's certificate is not trusted
    assert re.search(r"untrusted (52|56|92)\b", done.stdout), done.stdout  # closed: empty reply, or h2 stream
    assert (
        "1 TLS handshake refused by a client that does not trust the recorder's CA, so what it "
        "sent there was not seen: localhost (1)"
    ) in done.stderr
    (upstream_line,) = [line for line in done.stderr.splitlines() if "with an upstream server failed" in line]
    assert (
        "TLS handshakes with an upstream server failed (its certificate was not trusted; the "
        "client's connection was closed; --upstream-ca FILE trusts a test server's own CA): "
    ) in upstream_line and "127.0.0.1 (1)" in upstream_line, upstream_line


def test_upstream_ca_trusts_a_test_server_s_own_certificate_and_nothing_else(upstream, env, tmp_path):
    """`--upstream-ca FILE`: the recorder verifies the test server against that CA, so the
    request goes through and is recorded; verification stays on, so a server whose
    certificate that CA did not sign still fails."""
    curl = require_program("curl", "apt-get install curl")
    secure = Upstream(tls=self_signed_context(tmp_path))
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    stranger = Upstream(tls=self_signed_context(other_dir))
    try:
        both = (
            f"{shlex.quote(curl)} -s {secure.origin}/r/302/trusted -d a=1 -L -o /dev/null -w 'trusted %{{http_code}}\\n'; "
            f"{shlex.quote(curl)} -s {stranger.origin}/echo/stranger; echo stranger $?"
        )
        done = run(
            "--upstream-ca",
            str(tmp_path / "upstream-cert.pem"),
            "--fail-on",
            "high",
            "--",
            "sh",
            "-c",
            both,
            env=env,
        )
    finally:
        secure.close()
        stranger.close()
    assert done.returncode == 0, done.stderr
    assert "trusted 200" in done.stdout, done.stdout + done.stderr
    assert "method-downgrade" in done.stdout  # the trusted server's redirect was recorded and judged
    assert re.search(r"stranger (52|56|92)\b", done.stdout), done.stdout
    (upstream_line,) = [line for line in done.stderr.splitlines() if "with an upstream server failed" in line]
    assert upstream_line.endswith("127.0.0.1 (1)"), upstream_line
    pem = tmp_path / "not-a-cert.pem"
    pem.write_text("hello")
    refused = run("--upstream-ca", str(pem), "--", "true", env=env)
    assert refused.returncode == 2
    assert (
        f"Invalid value for '--upstream-ca': {pem} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
        in (refused.stderr)
    )
    assert " seen, " not in refused.stderr  # refused before the command ran
    proxy = run_cli("proxy", "--upstream-ca", str(pem), env=env)  # the proxy takes it too
    assert proxy.returncode == 2 and "holds no PEM certificate" in proxy.stderr, proxy.stderr


def test_requests_the_recorder_answered_itself_are_stored_and_say_so(upstream, env):
    """A redirect to a port where nothing listens: without the recorder, requests raises
    ConnectionError; through it, it must too (not get a 502 the recorder made up), and the
    chain shows the follow-up the client sent, with why it went nowhere. A redirect to
    `http://:1` (no host): urllib sends `GET http://:1/ HTTP/1.1` to the proxy, which cannot
    parse it and answers 400 itself; that exchange is stored too, marked as the recorder's."""
    target = "http://127.0.0.1:1/gone"  # loopback, nothing listens: refused at once
    script = (
        "import requests, urllib.request, urllib.error\n"
        f"try: print('answered', requests.get('{upstream.origin}/r/302/gone?to={target}').status_code)\n"
        "except requests.ConnectionError as e: print('connection error')\n"
        f"try: urllib.request.urlopen('{upstream.origin}/r/302/nohost?to=http://:1')\n"
        "except urllib.error.HTTPError as e: print('urllib', e.code)\n"
        "except urllib.error.URLError as e: print('urllib no connection')\n"
    )
    direct = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert direct.stdout.splitlines() == ["connection error", "urllib no connection"], direct.stderr
    done = run("--", sys.executable, "-c", script, env=env)
    assert done.stdout.splitlines()[0] == "connection error", done.stdout + done.stderr
    db = store_of(done.stderr)
    chains = json.loads(run_cli("chains", "-f", "json", "--db", db).stdout)
    hops = {h["from"]["url"].split("/r/302/")[1]: h for c in chains for h in c["hops"]}
    hop = hops[f"gone?to={target}"]
    assert (hop["from"]["method"], hop["status"], hop["to"]["method"], hop["to"]["url"]) == (
        "GET",
        302,
        "GET",
        target,
    )
    assert hop["to"]["error"].startswith(
        "the server could not be reached; the recorder closed the client's connection: "
        "[Errno 111] Connect call failed"
    ), hop["to"]
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT method, url, status, error FROM exchanges WHERE url LIKE 'http://:1%'"
        ).fetchall()
    assert rows == [
        (
            "GET",
            "http://:1/",
            400,
            "the recorder answered 400 itself; it could not parse the request: "
            "Bad HTTP request line: b'GET http://:1/ HTTP/1.1'",
        )
    ]
    # the hop before it is what it is: a redirect whose Location no client can use
    assert hops["nohost?to=http://:1"]["to"] is None, hops
    assert "RA112" in done.stdout, done.stdout


TRANSPARENT_CLIENTS = """
import os, subprocess, sys, urllib.error, urllib.request
sys.path.insert(0, {tests!r})
from upstream import Upstream

own = Upstream()  # a server the command starts itself, on the namespace's loopback
curl = subprocess.run(
    ["curl", "--noproxy", "*", "-sS", "-L", "-o", "/dev/null", "-w", "%{{http_code}}", "-d", "amount=5",
     own.origin + "/r/302/pay"],
    capture_output=True, text=True,
)
print("curl", curl.stdout, curl.stderr.strip())
direct = urllib.request.build_opener(urllib.request.ProxyHandler({{}}))  # no proxy, whatever the environment
print("urllib", direct.open(own.origin + "/r/301/moved").status)
print(subprocess.run([{go!r}], capture_output=True, text=True).stdout.strip())
try:  # the host's loopback is another namespace's: out of reach
    direct.open(os.environ["HOST_UPSTREAM"] + "/echo/host", timeout=10)
    print("host reached")
except (urllib.error.URLError, ConnectionError):
    print("host unreachable")
own.close()
"""


def test_transparent_records_clients_that_ignore_proxies(upstream, env, tmp_path):
    """`run --transparent`: curl told to use no proxy and urllib with proxies switched off,
    against a server the command starts itself, are recorded without any proxy variable;
    the host's own loopback servers are out of the command's reach, and it says so."""
    require_program("nft", "apt-get install nftables")
    require_program("curl", "apt-get install curl")
    if os.geteuid() != 0:
        pytest.skip("--transparent needs root")  # the not-root message is checked below, as nobody
    go = require_program("go", "apt-get install golang-go")
    client = tmp_path / "loopback_client"
    built = subprocess.run(
        [go, "build", "-o", str(client), str(ROOT / "tests" / "go" / "loopback_client.go")],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "GOCACHE": str(tmp_path / "gocache"), "GOPATH": str(tmp_path / "gopath"), "GOFLAGS": "-mod=mod"},
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    # Without --transparent, Go's loopback traffic goes around the proxy: nothing recorded, and said so
    around = run("--", str(client), env=env)
    assert around.returncode == 2 and around.stdout == "go 200 GET\n", around.stdout + around.stderr
    assert "`run --transparent` records them without their cooperation" in around.stderr
    script = tmp_path / "clients.py"
    script.write_text(TRANSPARENT_CLIENTS.format(tests=str(ROOT / "tests"), go=str(client)))
    done = run(
        "--transparent", "--", sys.executable, str(script), env={**env, "HOST_UPSTREAM": upstream.origin}
    )
    assert done.returncode == 0, done.stdout + done.stderr  # RA101 is low: under --fail-on medium
    assert done.stdout.splitlines()[:4] == ["curl 200 ", "urllib 200", "go 200 GET", "host unreachable"], (
        done.stdout
    )
    assert "recording transparently into a fresh store" in done.stderr
    assert "it reaches only the servers it starts itself" in done.stderr
    assert re.search(
        r"recorded 7 exchanges? from 3 clients?: urllib 3\.\d+ \(3\), (curl [\d.]+ \(2\), Go-http-client 1\.1 \(2\)|Go-http-client 1\.1 \(2\), curl [\d.]+ \(2\))",
        done.stderr,
    ), done.stderr
    assert "method-downgrade (RA101)" in done.stdout  # curl's POST through a 302
    db = store_of(done.stderr)
    chains = json.loads(run_cli("chains", "-f", "json", "--db", db).stdout)
    hops = [
        (h["from"]["method"], h["status"], (h["to"] or {}).get("method")) for c in chains for h in c["hops"]
    ]
    assert sorted(hops) == [("GET", 301, "GET"), ("POST", 302, "GET"), ("POST", 302, "GET")], hops
    with sqlite3.connect(db) as conn:  # the request to the host's server: sent, and stored as going nowhere
        (error,) = conn.execute("SELECT error FROM exchanges WHERE url LIKE '%/echo/host'").fetchone()
    assert error.startswith("the server could not be reached; the recorder closed the client's connection"), (
        error
    )
    # A store over TCP is out of the namespace's reach, and without root there is no namespace:
    # one line each, before anything runs.
    tcp = run("--transparent", "--db", "postgresql://u@127.0.0.1:5432/x", "--", "true", env=env)
    assert tcp.returncode == 2 and tcp.stderr.strip().splitlines() == [
        "redirect-audit: error: --transparent: the store postgresql+psycopg://u@127.0.0.1:5432/x is reached "
        "over TCP, which "
        "the network namespace CMD and the recorder run in cannot reach; use SQLite, or PostgreSQL over its "
        "Unix socket (postgresql://user@/db?host=/run/postgresql)"
    ], tcp.stderr
    # root without CAP_NET_ADMIN (dropped from the bounding set, as a container does)
    capless = subprocess.run(
        ["setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin",
         sys.executable, "-m", "analyzer", "run", "--transparent", "--", "true"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env={**os.environ, **env},
    )  # fmt: skip
    assert capless.returncode == 2, capless.stderr
    assert capless.stderr.strip() == (
        "redirect-audit: error: --transparent needs root: it gives the command a network namespace of its "
        "own (CAP_NET_ADMIN) and runs the recorder under a group of its own (CAP_SETGID); without root, run "
        "without --transparent (clients are sent to the recorder through the proxy variables)"
    ), capless.stderr


def test_java_s_clients_are_recorded_over_http_and_https(upstream, env, tmp_path):
    """Java reads no proxy variable: run sets its proxy properties (loopback included) and a
    truststore in JAVA_TOOL_OPTIONS, so HttpClient and HttpURLConnection are recorded."""
    java = require_program("java", "apt-get install openjdk-17-jdk-headless")
    secure = Upstream(tls=self_signed_context(tmp_path))
    client = str(ROOT / "tests" / "java" / "RedirectClient.java")
    try:
        origins = (upstream.origin, secure.origin)
        done = run("--set", "ssl_insecure=true", "--label", "jvm", "--", java, client, *origins, env=env)
    finally:
        secure.close()
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("httpclient 200") == 2 and done.stdout.count("urlconnection 200") == 2
    assert "8 exchanges seen, 8 stored" in done.stderr
    assert re.search(
        r"recorded 8 exchanges? from 2 clients?: Java 1\d\.\d \(jvm\) \(4\), "
        r"Java-http-client 1\d\.\d \(jvm\) \(4\)",
        done.stderr,
    ), done.stderr
    assert "Warning" not in done.stderr  # nothing of ours on the way
    chains = json.loads(run_cli("chains", "-f", "json", "--db", store_of(done.stderr)).stdout)
    hops = sorted(
        (h["from"]["url"].split("/r/")[0], h["from"]["method"], h["status"], h["to"]["method"])
        for c in chains
        for h in c["hops"]
    )
    assert hops == sorted(
        (origin, method, status, method)
        for origin in origins
        for method, status in (("GET", 302), ("POST", 307))
    )
