"""The recorder addon inside mitmproxy's own addon test harness (taddons): options,
what is stored, live findings marking and commenting the flows involved."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ENGINES, new_store_url
from mitmproxy import exceptions, http
from mitmproxy.test import taddons, tflow
from sqlalchemy import select

from addons.redirect_recorder import CONVERT_BATCH, CONVERT_DELAY, MARK, RedirectRecorder
from analyzer.store import EXCHANGE_COLUMNS, captures, exchanges, open_store

T0 = 1_790_000_000.0


def make_flow(
    method: str,
    url: str,
    *,
    status: int | None = None,
    location: str | None = None,
    body: bytes = b"",
    at: float = T0,
    conn=None,
    headers: dict | None = None,
) -> http.HTTPFlow:
    client = conn or tflow.tclient_conn()
    client.peername = ("127.0.0.1", 40000)
    request = http.Request.make(method, url, body, headers or {})
    request.timestamp_start, request.timestamp_end = at, at + 0.01
    flow = tflow.tflow(client_conn=client, req=request)
    if status is not None:
        response = http.Response.make(status, b"ok", {"Location": location} if location else {})
        response.timestamp_start, response.timestamp_end = at + 0.02, at + 0.03
        flow.response = response
    return flow


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    # Loading the addon configures it with every default, the default store included.
    monkeypatch.chdir(tmp_path)


@pytest.fixture(params=ENGINES)
def addon_db(request, tmp_path) -> str:
    """The recorder's store, once on SQLite and once on PostgreSQL."""
    return new_store_url(request, tmp_path, "addon.db")


@pytest.fixture
def recorder(addon_db):
    addon = RedirectRecorder()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, redirect_audit_db=addon_db, redirect_audit_flush_ms=50)
        addon.running()
        yield addon
        addon.done()


def stored(db: str) -> list:
    store = open_store(db)
    try:
        with store.begin() as conn:
            return conn.execute(select(exchanges).order_by(exchanges.c.seq)).mappings().all()
    finally:
        store.close()


@pytest.mark.parametrize(
    "option, value, problem",
    [
        ("redirect_audit_batch", 0, "batch size must be at least 1"),
        ("redirect_audit_flush_ms", 0, "flush interval"),
        ("redirect_audit_body_cap", -1, "body cap"),
        ("redirect_audit_link_window", 0, "link window"),
    ],
)
def test_options_are_checked_in_configure(tmp_path, option, value, problem):
    addon = RedirectRecorder()
    with taddons.context(addon) as tctx:
        with pytest.raises(exceptions.OptionsError, match=problem):
            tctx.configure(addon, redirect_audit_db=str(tmp_path / "x.db"), **{option: value})


def test_a_store_that_cannot_be_opened_is_an_option_error(tmp_path):
    addon = RedirectRecorder()
    with taddons.context(addon) as tctx:
        with pytest.raises(exceptions.OptionsError, match="redirect_audit_db"):
            tctx.configure(addon, redirect_audit_db=str(tmp_path / "no" / "such" / "dir" / "x.db"))


def test_a_finding_marks_and_comments_both_flows_and_is_logged(recorder, tmp_path, caplog):
    conn = tflow.tclient_conn()
    first = make_flow(
        "PUT", "http://api.test/items/1", status=302, location="/items/1/v2", body=b'{"n":1}', conn=conn
    )
    second = make_flow("GET", "http://api.test/items/1/v2", status=200, at=T0 + 0.1, conn=conn)
    quiet = make_flow("GET", "http://api.test/other", status=200, at=T0 + 0.2, conn=conn)
    with caplog.at_level(logging.WARNING, logger="redirect_audit"):
        for flow in (first, second, quiet):
            recorder.response(flow)
    assert first.marked == second.marked == MARK and not quiet.marked
    assert "RA101 method-downgrade (medium)" in first.comment and "RA101" in second.comment
    assert (
        "redirect-audit RA101 method-downgrade [medium] PUT http://api.test/items/1 -> 302 -> GET"
        in caplog.text
    )


def test_every_flow_is_stored_once_with_secrets_fingerprinted(recorder, addon_db, tmp_path, caplog):
    answered = make_flow(
        "POST",
        "http://api.test/login?access_token=abc123",
        status=200,
        body=b"user=a",
        headers={"Authorization": "Bearer s3cret-token"},
    )
    broken = make_flow("GET", "http://api.test/slow", at=T0 + 1)
    broken.error = tflow.terr("connection reset")
    recorder.response(answered)
    recorder.error(answered)  # an error after the response: still one exchange
    recorder.error(broken)
    with caplog.at_level(logging.INFO, logger="redirect_audit"):
        recorder.done()
    assert "saw 2 exchanges, stored 2" in caplog.text
    rows = stored(addon_db)
    assert [r["flow_id"] for r in rows] == [answered.id, broken.id]
    assert rows[1]["error"] == "connection reset" and rows[1]["status"] is None
    assert rows[0]["req_body_len"] == 6 and rows[0]["status"] == 200
    assert "s3cret-token" not in rows[0]["request_headers"] and "hmac:" in rows[0]["request_headers"]
    assert "abc123" not in rows[0]["url"]
    if "://" not in addon_db:  # SQLite: not in the file either
        raw = (tmp_path / "addon.db").read_bytes()
        assert b"s3cret-token" not in raw and b"abc123" not in raw
    store = open_store(addon_db)
    with store.begin() as conn:
        capture = conn.execute(select(captures)).mappings().one()
    assert capture["source"] == "proxy" and capture["entries"] == 2


def test_a_redirect_nobody_follows_is_judged_when_its_window_closes(recorder, tmp_path, caplog):
    lost = make_flow("POST", "http://api.test/pay", status=307, location="/pay/v2", body=b"amount=5")
    recorder.response(lost)
    assert recorder.live.expire(T0 + 1) == []  # still inside the window
    with caplog.at_level(logging.INFO, logger="redirect_audit"):
        recorder.done()
    assert "saw 1 exchanges, stored 1" in caplog.text


def test_bytes_that_are_not_utf8_are_stored_escaped_and_lose_no_batch(recorder, addon_db, tmp_path, caplog):
    # mitmproxy hands such bytes over as lone surrogates, which no database stores as
    # text; they once failed the whole batch they were in.
    odd = make_flow("GET", "http://api.test/ok", status=200)
    odd.request.headers[b"X-Name"] = b"caf\xe9"
    odd.request.path = b"/caf\xe9"
    odd.response.reason = b"Fine \xff"
    odd.request.data.http_version = b"HTTP/1.1\xe9"
    plain = make_flow("GET", "http://api.test/plain", status=200, at=T0 + 1)
    recorder.response(odd)
    recorder.response(plain)
    with caplog.at_level(logging.INFO, logger="redirect_audit"):
        recorder.done()
    assert "saw 2 exchanges, stored 2" in caplog.text
    rows = stored(addon_db)
    assert ["X-Name", "caf\\xe9"] in json.loads(rows[0]["request_headers"])
    assert rows[0]["url"] == "http://api.test/caf\\xe9"
    assert rows[0]["status_text"] == "Fine \u00ff"  # reason phrases are Latin-1 to mitmproxy
    assert rows[0]["http_version"] == "HTTP/1.1\\xe9"
    assert rows[1]["url"] == "http://api.test/plain"


def test_a_row_the_store_refuses_costs_only_itself(recorder, addon_db, tmp_path, caplog):
    flows = [make_flow("GET", f"http://api.test/{n}", status=200, at=T0 + n) for n in range(9)]
    for flow in flows[:4]:
        recorder.response(flow)
    bad = recorder.converter.convert(recorder.recorder.next_seq(), flows[4])
    bad.url = "http://api.test/\udce9"  # what no UTF-8 database takes as text
    recorder.recorder.submit(bad)
    for flow in flows[5:]:
        recorder.response(flow)
    with caplog.at_level(logging.INFO, logger="redirect_audit"):
        recorder.done()
    assert "saw 9 exchanges, stored 8" in caplog.text
    assert (
        "exchange 4 (http://api.test/\\udce9) cannot be stored: the store refused column url: text with a lone "
        "surrogate" in caplog.text
    )
    assert "attempt" not in caplog.text  # a bad row is not retried
    assert [r["url"] for r in stored(addon_db)] == [f"http://api.test/{n}" for n in range(9) if n != 4]


def test_on_the_event_loop_flows_are_converted_in_batches_and_none_is_left_behind(addon_db, tmp_path, caplog):
    # In the proxy the hooks only set flows aside; the event loop converts them a batch at
    # a time: after CONVERT_DELAY, at once when a batch is full, and at shutdown.
    async def proxy_run() -> list[http.HTTPFlow]:
        addon = RedirectRecorder()
        with taddons.context(addon) as tctx:
            tctx.configure(addon, redirect_audit_db=addon_db, redirect_audit_flush_ms=50)
            addon.running()
            conn = tflow.tclient_conn()
            put = make_flow(
                "PUT", "http://api.test/items/1", status=302, location="/items/1/v2", body=b"{}", conn=conn
            )
            get = make_flow("GET", "http://api.test/items/1/v2", status=200, at=T0 + 0.1, conn=conn)
            addon.response(put)
            addon.response(get)
            assert addon.recorder.seen == 0 and not put.marked  # set aside, not converted yet
            await asyncio.sleep(CONVERT_DELAY * 4)
            assert addon.recorder.seen == 2 and put.marked == get.marked == MARK
            batch = [
                make_flow("GET", f"http://api.test/{n}", status=200, at=T0 + 1 + n)
                for n in range(CONVERT_BATCH)
            ]
            for flow in batch[:-1]:
                addon.response(flow)
            assert addon.recorder.seen == 2
            addon.response(batch[-1])  # a full batch does not wait
            assert addon.recorder.seen == 2 + CONVERT_BATCH
            last = make_flow("GET", "http://api.test/last", at=T0 + 100)
            last.error = tflow.terr("connection reset")
            addon.error(last)
            with caplog.at_level(logging.INFO, logger="redirect_audit"):
                addon.done()  # the flow still set aside is stored too
            return [put, get, *batch, last]

    flows = asyncio.run(proxy_run())
    assert f"saw {len(flows)} exchanges, stored {len(flows)}; 1 findings" in caplog.text
    assert [r["flow_id"] for r in stored(addon_db)] == [f.id for f in flows]


@pytest.mark.parametrize(
    "part, error, message, kept",
    [
        (
            "converter.convert",
            ValueError("converter bug"),
            "flow {id} could not be recorded: ValueError('converter bug')",
            [0, 2],
        ),
        (
            "live.add",
            KeyError("rule bug"),
            "the live rules failed on flow {id}: KeyError('rule bug')",
            [0, 1, 2],
        ),
    ],
)
def test_a_bug_that_one_flow_trips_costs_at_most_that_flow(
    recorder, addon_db, caplog, monkeypatch, part, error, message, kept
):
    flows = [make_flow("GET", f"http://api.test/{n}", status=200, at=T0 + n) for n in range(3)]
    owner, name = part.split(".")
    original = getattr(getattr(recorder, owner), name)

    def fails_on_the_second(*args):  # convert(seq, flow) or add(exchange)
        if flows[1].id in {getattr(arg, "id", None) for arg in args} | {
            getattr(arg, "flow_id", None) for arg in args
        }:
            raise error
        return original(*args)

    monkeypatch.setattr(getattr(recorder, owner), name, fails_on_the_second)
    with caplog.at_level(logging.INFO, logger="redirect_audit"):
        for flow in flows:
            recorder.response(flow)
        recorder.done()
    assert message.format(id=flows[1].id) in caplog.text
    assert f"saw 3 exchanges, stored {len(kept)}" in caplog.text
    assert [r["flow_id"] for r in stored(addon_db)] == [flows[n].id for n in kept]


def test_a_flow_that_finishes_after_shutdown_began_is_stored_and_counted(
    recorder, addon_db, tmp_path, caplog
):
    # mitmproxy serves the connections in flight while it shuts down: their clients get
    # answers after the done hook has run.
    first = make_flow("GET", "http://api.test/first", status=200)
    late = make_flow("GET", "http://api.test/late", status=200, at=T0 + 1)
    recorder.response(first)
    with caplog.at_level(logging.INFO, logger="redirect_audit"):
        recorder.done()
        recorder.response(late)
        recorder.done()  # a second done changes nothing
    assert "saw 1 exchanges, stored 1;" in caplog.text
    assert caplog.text.count("saw 2 exchanges, stored 2 (1 after shutdown began)") == 1
    assert [r["flow_id"] for r in stored(addon_db)] == [first.id, late.id]
    with open_store(addon_db).begin() as conn:
        assert conn.execute(select(captures.c.entries)).scalar_one() == 2


def test_totals_after_mitmproxy_took_its_log_handler_down_go_to_stderr(
    recorder, addon_db, monkeypatch, capsys
):
    # mitmproxy uninstalls its log handler after the last done hook, then cancels the
    # connections still open; a flow that finishes in between is stored, and its totals
    # must still be seen (a real mitmdump stopped mid-burst printed 304 for 305 stored).
    recorder.response(make_flow("GET", "http://api.test/first", status=200))
    recorder.done()
    capsys.readouterr()
    monkeypatch.setattr(
        logging.getLogger(), "handlers", []
    )  # no handler left anywhere, as after mitmproxy's done
    recorder.response(make_flow("GET", "http://api.test/late", status=200, at=T0 + 1))
    assert "redirect-audit: saw 2 exchanges, stored 2 (1 after shutdown began)" in capsys.readouterr().err
    assert len(stored(addon_db)) == 2


def test_the_start_up_heap_is_frozen_while_recording_and_thawed_after(tmp_path):
    addon = RedirectRecorder()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, redirect_audit_db=str(tmp_path / "addon.db"))
        addon.running()
        assert gc.get_freeze_count() > 10_000  # mitmproxy, SQLAlchemy, the Public Suffix List
        addon.done()
    assert gc.get_freeze_count() == 0


AUDIT_PROBE = """
import sys
added = []
sys.addaudithook(lambda event, args: added.append(event) if event == "sys.addaudithook" else None)
from mitmproxy.test import taddons
from addons.redirect_recorder import RedirectRecorder
addon = RedirectRecorder()
with taddons.context(addon) as tctx:
    tctx.configure(addon, redirect_audit_db=sys.argv[1])
    addon.running()
    addon.done()
print(len(added))
"""


def test_the_recorder_adds_no_audit_hook_to_the_proxy(tmp_path):
    # A Python audit hook runs on every audited call in the process: mitmproxy makes about
    # 27 per request (id(), socket calls). tldextract's filelock added one, which cost
    # the proxy about 1% more CPU per request. An earlier hook sees every later one added.
    done = subprocess.run(
        [sys.executable, "-c", AUDIT_PROBE, str(tmp_path / "probe.db")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0"]


FAST = [  # the proxy's everyday shapes: built straight from mitmproxy's fields
    ("GET", "http://api.test/"),
    ("GET", "https://api.test/a/b?x=1&y=2"),
    ("POST", "http://127.0.0.1:8080/pay?"),  # an empty query is no query
    ("GET", "https://api.test:443/p??"),  # a query of "?" is kept
    ("GET", "http://api.test:80/%7Euser/;p=1?q=%20"),
    ("PUT", "https://cdn-1.api_test.example:8443/x?token_type=bearer"),  # "token" inside a longer name
]
GENERAL = [  # everything else takes the general path
    ("GET", "https://api.test/login?access_token=abc&x=1"),  # a secret to fingerprint
    (
        "GET",
        "http://API.test/Upper",
    ),  # mitmproxy lower-cases a host it parses; one set by an addon may not be
    ("GET", "http://[::1]:8080/v6"),
    ("GET", "http://api.test/caf\u00e9"),  # UTF-8 bytes in the target
    ("OPTIONS", "http://api.test*"),
]


@pytest.mark.parametrize("method, url", FAST + GENERAL)
def test_urls_on_the_hot_path_equal_the_general_path(method, url):
    from analyzer.ingest.flows import _clean, _urls
    from analyzer.secrets import protect_url
    from analyzer.urls import normalize_url

    key = b"k" * 32
    if url.endswith("*"):  # asterisk-form: OPTIONS * HTTP/1.1
        request = http.Request.make(method, url[:-1] + "/")
        request.path = "*"
    else:
        request = http.Request.make(method, url.replace("\u00e9", "e"))
    if "API" in url:
        request.data.host = "API.test"
    if "caf" in url:
        request.data.path = "/caf\u00e9".encode()
    if url.endswith("pay?"):  # mitmproxy's URL parser would drop the "?"; a client may send it
        request.data.path = b"/pay?"
    from analyzer.secrets import DEFAULT_POLICY

    fast_url, fast_norm = _urls(request, key, DEFAULT_POLICY)
    general = protect_url(_clean(request.url), key)
    if (method, url) in FAST:
        assert (fast_url, fast_norm) == (general, normalize_url(general))
    else:
        assert fast_norm is None


def test_a_repeated_header_block_is_converted_once_and_fingerprinted_with_each_stores_key():
    from analyzer.ingest.flows import HEADER_BLOCKS, FlowConverter
    from analyzer.store import exchange_row, headers_json

    def flow(n):
        return make_flow(
            "GET",
            f"http://api.test/{n}",
            status=200,
            at=T0 + n,
            headers={"Authorization": "Bearer s3cret", "Accept": "*/*"},
        )

    first, second, listed = flow(1), flow(2), flow(3)
    listed.request.headers.fields = [list(field) for field in listed.request.headers.fields]  # not hashable
    one, other = FlowConverter(1, b"1" * 32), FlowConverter(1, b"2" * 32)
    a, b, c = (one.convert(n, f) for n, f in enumerate((first, second, listed)))
    assert a.request_headers is b.request_headers  # the same block, shared
    assert a.response_headers is b.response_headers
    assert c.request_headers == a.request_headers and c.request_headers is not a.request_headers
    assert headers_json(c.request_headers) == headers_json(a.request_headers)
    assert dict(a.request_headers)["Authorization"].startswith("Bearer hmac:")
    d = other.convert(0, first)  # another store, another key: another fingerprint
    assert dict(d.request_headers)["Authorization"] != dict(a.request_headers)["Authorization"]
    assert dict(d.request_headers)["Authorization"].startswith("Bearer hmac:")
    row = exchange_row(b)
    stored_headers = json.loads(row[EXCHANGE_COLUMNS.index("request_headers")])
    assert stored_headers == [list(pair) for pair in b.request_headers] and "s3cret" not in str(
        stored_headers
    )
    for n in range(HEADER_BLOCKS + 1):  # what is remembered stays bounded
        one.convert(n, make_flow("GET", "http://api.test/", status=200, headers={"X-N": str(n)}))
    assert 0 < len(one._blocks) <= HEADER_BLOCKS


def test_the_script_module_is_the_only_stop_on_mitmproxys_walk():
    # mitmproxy offers each of its eight events per request to every addon, walking into
    # any `addons` list: the script module carries the hooks itself, all of one recorder.
    from mitmproxy.addonmanager import traverse

    import addons.redirect_recorder as script

    assert list(traverse([script])) == [script]
    hooks = ("load", "configure", "running", "response", "error", "done")
    assert {getattr(script, name).__self__ for name in hooks} == {script.recorder}
    assert all(callable(getattr(script, name)) for name in hooks)


def test_record_keeps_every_exchange_it_can_and_counts_the_rest(recorder, addon_db):
    """`/record` (the plugin's in-process exchanges): a URL whose port is out of range (httpx's
    own tests send one) is kept, with the scheme's default port; a capture that is not one
    costs only itself, never the batch (which used to be answered 400 and lost whole)."""

    def capture(url: str) -> dict:
        return {"method": "GET", "url": url, "started": T0, "connection": "c1", "http_version": "HTTP/1.1",
                "request_headers": [["Host", "h"]], "status": 200, "reason": "OK", "response_headers": [],
                "label": "pytest-main-t1"}  # fmt: skip

    batch = [
        capture("http://127.0.0.1:99999/far"),
        {"url": "http://x/no-method"},
        capture("http://api.test/ok"),
    ]
    control = tflow.tflow()
    control.request = http.Request.make("POST", "http://redirect-audit.invalid/record", json.dumps(batch))
    recorder._record(control)
    assert control.response.status_code == 200
    assert json.loads(control.response.content) == {"recorded": 2, "refused": 1}
    recorder.done()
    assert [(row["url"], row["client"]) for row in stored(addon_db)] == [
        ("http://127.0.0.1/far", "pytest-main-t1"),
        ("http://api.test/ok", "pytest-main-t1"),
    ]
