"""Whole proxy runs: SIGTERM in the middle of a burst, `redirect-audit proxy` itself,
proxy credentials over HTTPS (CONNECT) and plain HTTP, and `import-flows` on what
mitmdump saved."""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, run_cli, wait_until
from proxyrun import Mitmdump, free_port, wait_for_port
from sqlalchemy import func, select
from upstream import Upstream, self_signed_context

from analyzer.analysis import analyze
from analyzer.ingest import ImportError_
from analyzer.ingest.flows import import_flows
from analyzer.store import captures, exchanges, open_store

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("proxy_runs")]


@pytest.fixture(scope="module")
def upstream():
    up = Upstream()
    yield up
    up.close()


def get_through(proxy_port: int, url: str, method: str = "GET", body: bytes | None = None) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", proxy_port, timeout=10)
    try:
        conn.request(method, url, body=body)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def stored_urls(db: Path) -> list[str]:
    store = open_store(str(db))
    with store.begin() as conn:
        return conn.execute(select(exchanges.c.url)).scalars().all()


def test_sigterm_in_the_middle_of_a_burst_keeps_every_answered_exchange(tmp_path, upstream):
    db = tmp_path / "burst.db"
    proxy = Mitmdump(tmp_path / "mitm", db=str(db), extra=["--set", "redirect_audit_flush_ms=2000"])
    answered: list[str] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + 30

    def client(worker: int) -> None:
        for n in range(400):  # bounded in count and in time
            if time.monotonic() > stop_at:
                return
            url = f"{upstream.origin}/echo/burst-{worker}-{n}"
            try:
                status = get_through(proxy.port, url)
            except OSError:
                return  # the proxy is gone
            if status == 200:
                with lock:
                    answered.append(url)

    workers = [threading.Thread(target=client, args=(w,)) for w in range(8)]
    for w in workers:
        w.start()
    while len(answered) < 300 and time.monotonic() < stop_at:
        time.sleep(0.01)
    proxy.process.send_signal(signal.SIGTERM)  # mid-burst, with a 2 s flush interval pending
    for w in workers:
        w.join(timeout=60)
    output = proxy.stop()
    assert len(answered) >= 300
    missing = set(answered) - set(stored_urls(db))
    assert not missing, f"{len(missing)} answered exchanges were not stored"
    # the last count: a flow that finishes while the proxy winds down is stored and counted after done
    seen, stored = map(int, re.findall(r"saw (\d+) exchanges, stored (\d+)", output)[-1])
    assert seen == stored >= len(answered)


def test_proxy_command_prints_where_things_are_and_records(tmp_path, upstream):
    db = tmp_path / "cli-proxy.db"
    port = free_port()
    confdir = tmp_path / "conf"
    log = open(tmp_path / "proxy.out", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "analyzer",
            "proxy",
            "--db",
            str(db),
            "-p",
            str(port),
            "--confdir",
            str(confdir),
            "--set",
            "termlog_verbosity=info",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "UV_RUN_RECURSION_DEPTH": ""},
    )
    try:
        wait_for_port(port)
        assert get_through(port, f"{upstream.origin}/r/302/cli-case") == 302
        assert get_through(port, f"{upstream.origin}/echo/cli-case") == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()
    out = (tmp_path / "proxy.out").read_text()
    assert f"listening on 127.0.0.1:{port}" in out
    assert f"exchanges go to  sqlite:///{db}" in out
    assert str(confdir / "mitmproxy-ca-cert.pem") in out and "NODE_EXTRA_CA_CERTS" in out
    assert (confdir / "mitmproxy-ca-cert.pem").exists()
    assert "saw 2 exchanges, stored 2" in out
    assert len(stored_urls(db)) == 2
    # the banner's last line is a command that shows this store's findings, and it works
    [then] = re.findall(r"stop with Ctrl-C; then: (.*)", out)
    assert then == f"redirect-audit findings --db {db}"
    shown = run_cli(*shlex.split(then)[1:])
    assert shown.returncode == 0 and "No findings in 2 exchanges." in shown.stdout


def test_reverse_mode_is_passed_through(tmp_path, upstream):
    db = tmp_path / "reverse.db"
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "analyzer",
            "proxy",
            "--db",
            str(db),
            "-p",
            str(port),
            "--confdir",
            str(tmp_path / "conf"),
            "--mode",
            f"reverse:{upstream.origin}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    try:
        wait_for_port(port)
        conn = http.client.HTTPConnection(
            "127.0.0.1", port, timeout=10
        )  # talks to the proxy as if to the server
        conn.request("POST", "/r/302/rev-case", body=b"n=1")
        assert conn.getresponse().read() and True
        conn.request("GET", "/echo/rev-case")  # the relative Location, followed with GET
        assert conn.getresponse().status == 200
        conn.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    store = open_store(str(db))
    found = analyze(store, keep=True).findings
    assert [(f.rule_id, str(f.severity)) for f in found] == [("RA101", "low")]
    assert len(stored_urls(db)) == 2


def test_proxy_command_refuses_a_bad_store_in_one_line(tmp_path):
    done = run_cli("proxy", "--db", str(tmp_path / "missing-dir" / "x.db"), "-p", str(free_port()))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "cannot open store" in done.stderr


def test_web_mode_runs_mitmweb_with_the_recorder(tmp_path, upstream):
    db = tmp_path / "web.db"
    port, web_port = free_port(), free_port()
    log = open(tmp_path / "web.out", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "analyzer",
            "proxy",
            "--web",
            "--db",
            str(db),
            "-p",
            str(port),
            "--confdir",
            str(tmp_path / "conf"),
            "--set",
            f"web_port={web_port}",
            "--set",
            "web_password=letmein",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    try:
        wait_for_port(port)
        wait_for_port(web_port)
        conn = http.client.HTTPConnection(
            "127.0.0.1", port, timeout=10
        )  # one client connection, as a client would
        conn.request("PUT", f"{upstream.origin}/r/302/web-case", body=b"n=1")
        assert conn.getresponse().read() and True
        conn.request("GET", f"{upstream.origin}/echo/web-case")  # follows the 302 with GET: RA101 medium
        assert conn.getresponse().status == 200
        conn.close()
        shown: dict = {}

        def marked() -> bool:  # the live rules judge the hop a moment after its follow-up
            web = http.client.HTTPConnection("127.0.0.1", web_port, timeout=10)
            web.request("GET", "/flows?token=letmein")
            reply = web.getresponse()
            assert reply.status == 200
            shown.update({f["request"]["path"]: f for f in json.loads(reply.read())})
            web.close()
            return all(shown.get(p, {}).get("comment") for p in ("/r/302/web-case", "/echo/web-case"))

        wait_until(marked, timeout=20, every=0.1)  # what they show is asserted below
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()
    for path in ("/r/302/web-case", "/echo/web-case"):  # both flows of the hop stand out in mitmweb
        assert shown[path]["marked"] in (":warning:", "\u26a0")  # mitmweb shows the shortcode as its emoji
        assert "RA101 method-downgrade (medium)" in shown[path]["comment"]
    assert sorted(stored_urls(db)) == [
        f"{upstream.origin}/echo/web-case",
        f"{upstream.origin}/r/302/web-case",
    ]


PROXY_USER, PROXY_PASSWORD = "tester", "pr0xy-s3cret"


@pytest.mark.parametrize("proxyauth", [False, True], ids=["proxy-forwards", "proxy-checks"])
def test_proxy_credentials_never_reach_the_store_in_clear(tmp_path, upstream, proxyauth):
    # Over HTTPS a client sends its proxy credentials once, on the CONNECT that opens
    # the tunnel, which mitmproxy answers itself (it is not an exchange: nothing is
    # recorded for it); over plain HTTP it sends them with every request. With
    # `proxyauth` set mitmproxy checks them. The credential must not be written
    # anywhere in the store (file or WAL) in clear; its user name is the client's label.
    tls_upstream = Upstream(self_signed_context(tmp_path))
    db = tmp_path / "credentials.db"
    extra = ["--set", f"proxyauth={PROXY_USER}:{PROXY_PASSWORD}"] if proxyauth else []
    proxy = Mitmdump(tmp_path / "mitm", db=str(db), extra=extra)
    urls = [f"{tls_upstream.origin}/echo/tunnelled", f"{upstream.origin}/echo/plain"]
    try:
        for url in urls:
            done = subprocess.run(
                [
                    "curl",
                    "-sS",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "--max-time",
                    "20",
                    "--proxy",
                    proxy.url,
                    "--proxy-user",
                    f"{PROXY_USER}:{PROXY_PASSWORD}",
                    "--proxy-basic",
                    "--cacert",
                    str(proxy.ca),
                    url,
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.stdout == "200", (url, done.stderr)
    finally:
        output = proxy.stop()
        tls_upstream.close()
    assert "saw 2 exchanges, stored 2" in output
    assert sorted(stored_urls(db)) == sorted(urls)
    secret = base64.b64encode(f"{PROXY_USER}:{PROXY_PASSWORD}".encode())
    for path in [db, *tmp_path.glob(db.name + "-*")]:  # the file and its WAL
        raw = path.read_bytes()
        leaked = PROXY_PASSWORD.encode() in raw or secret in raw
        assert not leaked, f"{path.name} holds the proxy credential in clear"
    with open_store(str(db)).begin() as conn:
        rows = conn.execute(select(exchanges.c.url, exchanges.c.request_headers, exchanges.c.client)).all()
    sent = {row.url: dict((k.lower(), v) for k, v in json.loads(row.request_headers)) for row in rows}
    # A Basic proxy credential is the client's label: taken off the request (the recorder
    # does it, or mitmproxy's proxyauth after checking it), never forwarded or stored.
    assert all("proxy-authorization" not in headers for headers in sent.values())
    assert {row.client for row in rows} == {PROXY_USER}


@pytest.fixture(scope="module")
def saved_flows(tmp_path_factory, upstream):
    """A real mitmdump run with the recorder and `-w`: the same traffic twice over."""
    tmp = tmp_path_factory.mktemp("flows")
    dump = tmp / "run.mitm"
    proxy = Mitmdump(tmp / "mitm", db=str(tmp / "live.db"), extra=["-w", str(dump)])
    try:
        get_through(proxy.port, f"{upstream.origin}/r/302/saved-a", "POST", b"n=1")
        get_through(proxy.port, f"{upstream.origin}/echo/saved-a")
        get_through(proxy.port, f"{upstream.origin}/r/307/saved-b", "PUT", b"n=2")
        get_through(proxy.port, f"{upstream.origin}/echo/saved-b", "PUT", b"n=2")
        with pytest.raises(http.client.RemoteDisconnected):  # refused: the recorder closes the connection
            get_through(proxy.port, "http://127.0.0.1:9/refused")
    finally:
        proxy.stop()
    return tmp / "live.db", dump


def test_import_flows_stores_what_the_live_recorder_stored(tmp_path, saved_flows):
    live_db, dump = saved_flows
    done = run_cli("import-flows", str(dump), "--db", str(tmp_path / "imported.db"))
    assert done.returncode == 0, done.stderr
    assert "imported 5 flows" in done.stdout
    live, imported = open_store(str(live_db)), open_store(str(tmp_path / "imported.db"))

    def summary(store):
        with store.begin() as conn:
            rows = conn.execute(
                select(
                    exchanges.c.flow_id,
                    exchanges.c.method,
                    exchanges.c.url_norm,
                    exchanges.c.status,
                    exchanges.c.req_body_len,
                    exchanges.c.error,
                ).order_by(exchanges.c.seq)
            ).all()
        found = sorted((f.rule_id, str(f.severity)) for f in analyze(store, keep=True).findings)
        return rows, found

    def clients(store):
        with store.begin() as conn:
            return set(conn.execute(select(exchanges.c.client)).scalars())

    def digests(store):
        with store.begin() as conn:
            return conn.execute(select(exchanges.c.req_body_sha256).order_by(exchanges.c.seq)).scalars().all()

    imported_summary = summary(imported)
    assert summary(live) == imported_summary
    assert imported_summary[1] == [("RA101", "low")]
    # the same peer, told apart by who recorded it: the proxy (host name:port), or the imported dump
    [live_client], [imported_client] = clients(live), clients(imported)
    assert re.fullmatch(r"proxy:[^/]+:\d+/127\.0\.0\.1", live_client), live_client
    assert imported_client == "flows:1/127.0.0.1"
    # body digests are keyed by each store's own key: equal bodies match within a store, not across
    live_digests, imported_digests = digests(live), digests(imported)
    assert [d is None for d in live_digests] == [d is None for d in imported_digests]
    assert not set(filter(None, live_digests)) & set(filter(None, imported_digests))


def test_bad_flow_files_are_refused_and_leave_nothing(tmp_path, saved_flows):
    _, dump = saved_flows
    truncated = tmp_path / "truncated.mitm"
    truncated.write_bytes(dump.read_bytes()[: dump.stat().st_size * 2 // 3])
    har = tmp_path / "looks-like.har"
    har.write_text('{"log": {"entries": []}}')
    noise = tmp_path / "noise.mitm"
    noise.write_bytes(b"\x00\x01definitely not a flow" * 10)
    empty = tmp_path / "empty.mitm"
    empty.write_bytes(b"")
    store = open_store(str(tmp_path / "x.db"))
    for path, problem in [
        (truncated, "flow dump"),
        (har, "use import-har"),
        (noise, "flow dump"),
        (empty, "empty file"),
    ]:
        with pytest.raises(ImportError_, match=re.escape(str(path)) + ".*" + problem):
            import_flows(store, path)
    with store.begin() as conn:
        assert conn.execute(select(func.count()).select_from(exchanges)).scalar_one() == 0
        assert conn.execute(select(func.count()).select_from(captures)).scalar_one() == 0
    done = run_cli("import-flows", str(noise), "--db", str(tmp_path / "x.db"))
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
