"""Secrets under generated names, in every placement, through every way in (issue 29, item 6).

Names are spelled as APIs spell them (tests/canaries.py: the secret words with the words
that sit next to them, joined by `_`, `-`, `.` or nothing, in any case or camelCase) and
placed where secrets travel (query, header, JSON key plain or \\u-escaped, form field
plain or percent-encoded, XML element, GraphQL argument, `k=v` text, multipart part).
Hypothesis draws them for the protecting functions and for HAR and flow imports; the
live proxy gets a seeded draw of the same kind. Each canary is searched for, as is and
encoded, in every artefact: the store and its WAL, the spool, the proxy's terminal,
every output format, the Parquet export and the export-tests modules.
"""

from __future__ import annotations

import http.client
import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from canaries import (
    AFFIXES,
    CASES,
    HEADER_SPELLINGS,
    PLACEMENTS,
    SECRET_TERMS,
    SEPARATORS,
    canary,
    leaks,
    name_of,
    placed,
    random_cases,
)
from conftest import ROOT, run_cli, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from proxyrun import free_port, wait_for_port
from test_secrets_everywhere import PROXY_NAMES, exports_of, proxy_requests, store_bytes
from upstream import Upstream

from analyzer.secrets import protect_and_index, protect_url, redact_body

KEY = b"k" * 32


def rows(db: Path) -> int:
    with sqlite3.connect(db, timeout=5) as conn:
        return conn.execute("select count(*) from exchanges").fetchone()[0]


PROXY = [sys.executable, "-m", "analyzer", "proxy"]


@st.composite
def secret_names(draw, placement: str | None = None) -> str:
    term = draw(st.sampled_from(SECRET_TERMS))
    before = draw(st.lists(st.sampled_from(AFFIXES), max_size=1))
    after = draw(st.lists(st.sampled_from(AFFIXES), max_size=1))
    if placement == "header":
        separator, case = (
            draw(st.sampled_from(HEADER_SPELLINGS[0])),
            draw(st.sampled_from(HEADER_SPELLINGS[1])),
        )
    else:
        separator, case = draw(st.sampled_from(SEPARATORS)), draw(st.sampled_from(CASES))
    return name_of(term, before, after, separator, case)


@st.composite
def placements(draw) -> tuple[str, str]:
    where = draw(st.sampled_from(PLACEMENTS))
    return where, draw(secret_names(where))


def protected(where: str, name: str, value: str) -> tuple[bytes, bytes]:
    path, headers, ctype, body = placed(where, name, value)
    url = protect_url("https://api.test" + path, KEY)
    stored = protect_and_index(headers, KEY)[0]
    return url.encode() + json.dumps(stored).encode(), redact_body(body, ctype, KEY)


@given(placements())
def test_a_secret_name_in_any_spelling_and_placement_is_protected(case):
    where, name = case
    secret = canary()
    head, body = protected(where, name, secret)
    assert leaks(head + body, {name: secret}) == [], (where, name)
    if where != "header":
        assert b"42" in head + body  # the ordinary field next to it stays readable
    if where in ("json", "json-escaped"):
        assert json.loads(body)["id"] == 42  # and redacted JSON is still JSON


@given(
    st.sampled_from(("page_token", "nextPageToken", "token_type", "author", "keyword", "monkey", "secretary"))
)
def test_names_about_a_secret_or_only_like_one_stay_readable(name):
    head, _ = protected("query", name, "ordinary-value")
    assert b"ordinary-value" in head


def har_of(cases: list[tuple[str, str]], secrets: dict[str, str]) -> dict:
    entries = []
    for i, (where, name) in enumerate(cases):
        path, headers, ctype, body = placed(where, name, secrets[f"{i} {where} {name}"])
        request = {
            "method": "POST",
            "url": "https://api.test" + path,
            "httpVersion": "HTTP/1.1",
            "headers": [{"name": n, "value": v} for n, v in headers],
        }
        if body:
            request["postData"] = {"mimeType": ctype or "", "text": body.decode()}
        entries.append(
            {
                "startedDateTime": f"2026-06-01T10:00:{i:02d}Z",
                "request": request,
                "response": {"status": 200, "headers": [], "content": {"size": 0, "mimeType": "text/plain"}},
            }
        )
    return {"log": {"version": "1.2", "creator": {"name": "t", "version": "1"}, "entries": entries}}


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(placements(), min_size=5, max_size=20))
def test_generated_names_through_a_har_import_leave_no_canary_in_the_store(tmp_path_factory, cases):
    from analyzer.ingest import import_har
    from analyzer.ingest.common import CaptureOptions
    from analyzer.store import open_store

    tmp = tmp_path_factory.mktemp("har")
    secrets = {f"{i} {where} {name}": canary(str(i)) for i, (where, name) in enumerate(cases)}
    har = tmp / "gen.har"
    har.write_text(json.dumps(har_of(cases, secrets)))
    store = open_store(str(tmp / "s.db"))
    import_har(store, har, CaptureOptions(keep_bodies=True))
    store.close()
    assert leaks(store_bytes(tmp / "s.db"), secrets) == []


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(placements(), min_size=5, max_size=20))
def test_generated_names_through_a_flow_dump_leave_no_canary_in_the_store(tmp_path_factory, cases):
    from mitmproxy import io as mio
    from mitmproxy.test import tflow

    from analyzer.ingest.common import CaptureOptions
    from analyzer.ingest.flows import import_flows
    from analyzer.store import open_store

    tmp = tmp_path_factory.mktemp("flows")
    secrets = {f"{i} {where} {name}": canary(str(i)) for i, (where, name) in enumerate(cases)}
    dump = tmp / "gen.mitm"
    with dump.open("wb") as fh:
        writer = mio.FlowWriter(fh)
        for i, (where, name) in enumerate(cases):
            path, headers, _ctype, body = placed(where, name, secrets[f"{i} {where} {name}"])
            flow = tflow.tflow(resp=True)
            flow.request.url = "http://api.test" + path
            flow.request.method = "POST"
            for n, v in headers:
                flow.request.headers[n] = v
            flow.request.content = body
            writer.add(flow)
    store = open_store(str(tmp / "f.db"))
    import_flows(store, dump, CaptureOptions(keep_bodies=True))
    store.close()
    assert leaks(store_bytes(tmp / "f.db"), secrets) == []


@pytest.mark.slow
def test_canaries_under_generated_names_through_the_live_proxy_reach_no_artefact(tmp_path):
    """A real `redirect-audit proxy --keep-bodies`; for the second half of the traffic the
    store is locked, so the spool holds it until the store is free again."""
    cases = random_cases(40, seed=29)
    secrets = {f"{i} {where} {name}": canary(str(i)) for i, (where, name) in enumerate(cases)}
    classic = {name: canary(name.replace(" ", "")) for name in PROXY_NAMES}  # the usual names, too
    upstream = Upstream()
    sent = len(proxy_requests(classic)) + len(cases) + len(cases) // 2 + 1
    db = tmp_path / "p.db"
    from analyzer.store import open_store

    open_store(str(db)).close()  # made first: the lock below needs its file
    port = free_port()
    log = tmp_path / "proxy.out"
    spool = b""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*PROXY, "--db", str(db), "-p", str(port), "--keep-bodies", "--confdir", str(tmp_path / "conf")],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        lock = None
        try:
            wait_for_port(port)
            for method, path, headers, body in proxy_requests(classic):
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                conn.request(method, upstream.origin + path, body=body, headers=headers)
                conn.getresponse().read()
                conn.close()
            secrets |= classic
            for i, (where, name) in enumerate(cases):
                if i == len(cases) // 2:
                    lock = sqlite3.connect(db, timeout=30)
                    lock.execute("BEGIN IMMEDIATE")
                path, headers, _ctype, body = placed(where, name, secrets[f"{i} {where} {name}"])
                if where == "header":
                    name = name.replace(".", "-")  # http.client refuses a header name with a dot
                    headers = [(name, v) for _, v in headers]
                query = path.partition("?")[2]
                # every other one a 307 the client follows with the body: chains for export-tests
                target = f"/r/307/c{i}" if i % 2 else f"/echo/c{i}"
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                conn.request("POST", f"{upstream.origin}{target}?{query}", body=body, headers=dict(headers))
                answer = conn.getresponse()
                answer.read()
                location = answer.getheader("Location")
                if location:
                    conn.request("POST", upstream.origin + location, body=body, headers=dict(headers))
                    conn.getresponse().read()
                conn.close()
            # userinfo in the request target (http.client sends it as given): mitmproxy refuses
            # the line, the recorder records it from the line, and both log it protected
            secrets["rejected userinfo"], secrets["rejected query"] = canary("u"), canary("q")
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            target = f"http://u:{secrets['rejected userinfo']}@127.0.0.1:{upstream.port}/echo/ui"
            conn.request("GET", f"{target}?x-signature={secrets['rejected query']}")
            assert conn.getresponse().status == 400
            conn.close()
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not list(tmp_path.glob("p.db.spool/*.rows")):
                time.sleep(0.1)
            spool = b"".join(p.read_bytes() for p in tmp_path.glob("p.db.spool/*") if p.is_file())
        finally:
            if lock is not None:
                lock.rollback()
                lock.close()
            wait_until(
                lambda: rows(db) == sent
            )  # the writer retries every 2 s: the spool goes into the store
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
            upstream.close()
    terminal = log.read_bytes()
    assert spool, terminal[-2000:]  # the spool was written, and is searched
    assert f"saw {sent} exchanges, stored {sent}".encode() in terminal, terminal[-2000:]
    found = {"spool": spool, "terminal": terminal, "store + WAL": store_bytes(db)}
    found |= exports_of(db, tmp_path)
    parquet, tests = tmp_path / "parquet", tmp_path / "contract"
    assert run_cli("export", str(parquet), "--db", str(db)).returncode == 0
    assert run_cli("export-tests", "--db", str(db), "-o", str(tests)).returncode == 0
    found["parquet"] = b"".join(p.read_bytes() for p in parquet.rglob("*") if p.is_file())
    found["export-tests"] = b"".join(p.read_bytes() for p in tests.rglob("*") if p.is_file())
    assert {where: leaks(blob, secrets) for where, blob in found.items()} == {where: [] for where in found}
