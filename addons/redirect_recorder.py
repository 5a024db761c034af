"""redirect-audit's recorder: every HTTP exchange through this proxy, into the store.

    mitmdump -s addons/redirect_recorder.py --set redirect_audit_db=capture.db
    redirect-audit proxy            # the same, with the options below set for you

Options (all prefixed `redirect_audit_`): `db` (SQLAlchemy URL or path; default
$REDIRECT_AUDIT_DB, else ./redirect-audit.db), `batch` (rows per commit), `flush_ms`
(milliseconds before a partial batch is committed), `bodies` and `body_cap` (keep request
and response bodies, capped and with secret fields redacted; off by default), `live`
(link chains and run the rules while traffic flows; on by default).

The hooks only set a finished flow aside; on the proxy's event loop the flows set aside
are converted a batch at a time (at most CONVERT_DELAY after the first of them, or at
once when CONVERT_BATCH are waiting) and queued for a writer thread, which owns the
database. When the proxy stops, what is set aside is converted, the queue is drained,
and the addon logs how many exchanges it saw and how many it stored (again, with the
new totals, for each flow that finishes while mitmproxy winds down). Findings are
logged as soon as their flows are converted, and the flows involved are marked and
commented, so they stand out in mitmweb.

Client labels: a client whose proxy URL carries a user name (`http://LABEL@127.0.0.1:8080`,
or `LABEL:anything@`) sends it as `Proxy-Authorization: Basic ...`, on each plain-HTTP
request and on the CONNECT of each HTTPS tunnel. The recorder takes that header off
(it is never forwarded, fingerprinted or stored) and records the client under LABEL,
its identity for chain linking and in every output. Without one, a client is the
recorder's name and its address, as before.

Control requests: `http://redirect-audit.invalid/ping`, `/flush` and `/label`, sent
through the proxy, are answered by the recorder itself and never forwarded or recorded.
`/flush` answers once everything the proxy has finished is in the store (or, if the
store is down, in the spool): what the pytest plugin waits on before it reads a test's
findings. `/label?from=A&to=B` records the traffic of clients labelled A under B from
the next request on (`to` empty: as A again): the plugin gives each test its own.
`/listen?label=L` opens a listener on a free loopback port whose traffic is recorded
under L: the label without a credential in the client's proxy URL (`run`, the plugin).
`/flush` also says, per host, how many TLS handshakes a client refused (it does not trust
the recorder's CA, so nothing it sent was seen) and how many upstream handshakes failed.
"""

from __future__ import annotations

import ast
import asyncio
import base64
import binascii
import gc
import json
import logging
import re
import socket
import sys
import time
import weakref
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from mitmproxy import connection, ctx, exceptions, http, tls
from mitmproxy.addonmanager import Loader
from mitmproxy.flow import Error as FlowError
from mitmproxy.hooks import UpdateHook
from mitmproxy.proxy import mode_specs, server_hooks

from analyzer.analysis import AnalysisOptions, stale_history
from analyzer.chains import LinkOptions
from analyzer.detectors import DetectorOptions
from analyzer.detectors.base import WRITE_METHODS
from analyzer.ingest.common import DEFAULT_BODY_CAP, CaptureOptions
from analyzer.ingest.flows import (
    ANSWERED_KEY,
    LABEL_KEY,
    LABEL_MAX,
    MITMPROXY_VERSION,
    FlowConverter,
    flow_of_capture,
    made_flow,
    made_response,
)
from analyzer.ingest.recorder import Recorder, RecorderSettings
from analyzer.live import LIVE_LIMIT, PENDING, LiveAnalyzer
from analyzer.model import Exchange, Finding
from analyzer.secrets import protect_url
from analyzer.store import Store, open_store
from analyzer.storeread import StoreError, safe_url
from analyzer.text import printable

log = logging.getLogger("redirect_audit")

PREFIX = "redirect_audit_"
MARK = ":warning:"
RECORDED = "redirect_audit_recorded"  # flow.metadata key: this flow is already set aside
# Converting flows one after another costs the proxy's thread 40-50% less CPU than
# converting each as its response arrives: inside a loaded mitmdump, 17.2 µs per flow
# in batches against 29.4 µs one at a time (benchmarks/bench_hook.py; before header
# blocks were remembered, 19.7 against 33.5), where a warm loop over the same flows
# takes 5.5 µs (benchmarks/bench_convert.py). One flow at a time, the converter's code
# and data have left the CPU caches between two flows, evicted by mitmproxy's own work
# for the request in between.
STORE_WAIT = 1.0  # seconds the writer waits for another process's lock before it spools
CONVERT_BATCH = 64
CONVERT_DELAY = 0.05  # seconds; findings and stored rows wait at most this long for a batch
CONTROL_HOST = "redirect-audit.invalid"  # .invalid never resolves (RFC 6761): nothing else can be meant
FLUSH_TIMEOUT = 30.0  # seconds a /flush waits for the writer before it answers 504
_PROXY_MODES = (mode_specs.RegularMode, mode_specs.UpstreamMode)


def take_label(request: http.Request) -> str | None:
    """The user name of a Basic `Proxy-Authorization`, with the header removed; None (and
    the header left alone) for any other header or none. The password is never read."""
    value = request.headers.get("proxy-authorization")
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    del request.headers["proxy-authorization"]  # addressed to this proxy: never forwarded
    try:
        user = base64.b64decode(token.strip(), validate=True).decode("utf-8").partition(":")[0]
    except (binascii.Error, UnicodeDecodeError):
        return None
    label = printable(user.strip())[:LABEL_MAX]
    return label or None


def _after(finding: Finding, target: Exchange) -> str:
    """What came after the redirect, as every other output says it: the follow-up, or
    `not followed (Location ...)` for a redirect nobody followed."""
    chain = finding.chain
    if chain is not None and finding.hop < len(chain.hops) and chain.hops[finding.hop].target is None:
        hop = chain.hops[finding.hop]
        where = hop.source.location_resolved or hop.source.location
        if hop.link == PENDING:  # judged on sight (a stale redirect): the follow-up may still come
            return f"Location {where}"
        return f"not followed (Location {where})" if where else "not followed (no Location)"
    return f"{target.method} {target.url}"


def proxy_id() -> str:
    """redirect_audit_proxy_id, else this machine's name and the port the proxy listens on."""
    given = str(ctx.options.redirect_audit_proxy_id).strip()
    if given:
        return given
    return f"{socket.gethostname()}:{ctx.options.listen_port or 8080}"


class RedirectRecorder:
    def __init__(self) -> None:
        self.recorder: Recorder | None = None
        self.converter: FlowConverter | None = None
        self.live: LiveAnalyzer | None = None
        self._trim_said: set[str] = set()  # kinds live analysis let go of, said once each
        self.flows: weakref.WeakValueDictionary[int, http.HTTPFlow] = weakref.WeakValueDictionary()
        self.findings = 0
        self.store: Store | None = None
        self.settings = RecorderSettings()
        self.capture = CaptureOptions()
        self.analysis = AnalysisOptions()
        self._ticker: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: list[http.HTTPFlow] = []  # finished flows not yet converted, in order
        self._timer: asyncio.TimerHandle | None = None
        self.unqueued = 0  # flows that could not be converted or queued (a bug): seen, not stored
        self._closed = False  # done() has run
        self.late = 0  # flows that finished after done()
        self.labels: dict[str, str] = {}  # client connection id -> label given on its CONNECT
        self.renamed: dict[str, str] = {}  # label a client gives -> label it is recorded under (/label)
        self.port_labels: dict[str, str] = {}  # a listener's mode spec -> the label of its traffic (/listen)
        # TLS handshakes that failed, per host (SNI, else the address): a client that refused the
        # recorder's certificate sent nothing we could see; an upstream that failed verification
        # was answered by the proxy. Both go out with /flush, for the end-of-run summary.
        self.tls_refused: dict[str, int] = {}
        self.tls_upstream_failed: dict[str, int] = {}
        # client connection id -> the server address it could not reach (refused, TLS failed):
        # mitmproxy answers such a request 502 itself, and the exchange says so
        self.unreachable: dict[str, tuple[str, int]] = {}
        # open client connections by peer address: mitmproxy names the client of a request
        # it rejected (unparseable head) only by its address, in a log record
        self.clients: dict[tuple[str, int], connection.Client] = {}
        self.rejected = _RejectedRequests(self)

    # ---- options -------------------------------------------------------------

    def load(self, loader: Loader) -> None:
        loader.add_option(
            PREFIX + "db",
            str,
            "",
            "Store for the exchanges: SQLAlchemy URL or file path "
            "(default: $REDIRECT_AUDIT_DB, else ./redirect-audit.db).",
        )
        loader.add_option(PREFIX + "batch", int, 2000, "Exchanges committed per transaction.")
        loader.add_option(
            PREFIX + "flush_ms",
            int,
            250,
            "Milliseconds before a partial batch is committed: what a kill -9 can lose at most.",
        )
        loader.add_option(
            PREFIX + "spool",
            str,
            "",
            "Directory for exchanges the store cannot take (default: next to the store, STORE.spool).",
        )
        loader.add_option(
            PREFIX + "bodies",
            bool,
            False,
            "Also store request and response bodies (capped, well-known secret fields redacted).",
        )
        loader.add_option(
            PREFIX + "body_cap", int, DEFAULT_BODY_CAP, "Bytes kept per body when bodies are stored."
        )
        loader.add_option(
            PREFIX + "live",
            bool,
            True,
            "Link chains and run the rules while traffic flows; log findings and mark the flows involved.",
        )
        loader.add_option(
            PREFIX + "secret_fields",
            str,
            "",
            "Comma-separated field names protected in URLs and "
            "bodies beyond the built-in list (see the README's Secrets).",
        )
        loader.add_option(
            PREFIX + "proxy_id",
            str,
            "",
            "This recorder's name in the store: clients are told apart "
            "by it and their address, so proxies sharing a store never link each other's "
            "traffic (default: host name:listen port).",
        )
        loader.add_option(
            PREFIX + "link_window",
            int,
            int(LinkOptions().window),
            "Seconds within which a follow-up must start after its redirect.",
        )

    def configure(self, updated: set[str]) -> None:
        if not any(name.startswith(PREFIX) for name in updated):
            return
        opts = ctx.options
        try:
            self.settings = RecorderSettings(
                batch_size=opts.redirect_audit_batch,
                flush_interval=opts.redirect_audit_flush_ms / 1000,
                spool=Path(opts.redirect_audit_spool) if opts.redirect_audit_spool else None,
            )
            self.capture = CaptureOptions(
                keep_bodies=opts.redirect_audit_bodies,
                body_cap=opts.redirect_audit_body_cap,
                secret_fields=tuple(f for f in opts.redirect_audit_secret_fields.split(",") if f.strip()),
            )
            self.analysis = AnalysisOptions(
                link=LinkOptions(window=opts.redirect_audit_link_window), detect=DetectorOptions()
            )
        except ValueError as exc:
            raise _options_error(f"redirect_audit: {exc}") from None
        if self.recorder is not None:
            if PREFIX + "db" in updated or PREFIX + "live" in updated:
                raise _options_error(
                    "redirect_audit_db and redirect_audit_live cannot change while the proxy runs"
                )
            if self.converter is not None:
                self.converter.options = self.capture
            return
        if PREFIX + "db" in updated or self.store is None:
            try:  # opened now so that a bad store stops the proxy at start, with one line
                # A short wait for another process's lock: past it, the writer spools (never the proxy waiting).
                self.store = open_store(opts.redirect_audit_db or None, wait=STORE_WAIT)
            except StoreError as exc:
                raise _options_error(f"redirect_audit_db: {exc}") from None

    def running(self) -> None:
        self._start()
        if self.rejected not in _MITMPROXY_SERVER_LOG.handlers:
            _MITMPROXY_SERVER_LOG.addHandler(self.rejected)

    def _start(self) -> None:
        if self.store is None or self.recorder is not None:
            return
        store = self.store
        self.recorder = Recorder(store, self.settings, creator=f"mitmproxy {MITMPROXY_VERSION}")
        self.converter = FlowConverter(
            0,
            store.secret_key,
            self.capture,  # the writer sets each row's capture
            recorder=f"proxy:{proxy_id()}",
        )
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop: driven by hand (tests); flows are converted at once
            self._loop = None
        if ctx.options.redirect_audit_live:
            try:
                with store.begin() as conn:  # a summary per redirect: start-up does not grow with the store
                    history = stale_history(conn)
            except StoreError as exc:  # the store is down: the live rules start without its history
                log.warning("redirect-audit: %s; live rules start without the store's earlier redirects", exc)
                history = {}
            self.live = LiveAnalyzer(self.analysis, history)
            # without a loop, expire() is called explicitly
            self._ticker = self._loop.create_task(self._tick()) if self._loop is not None else None
        # What is alive now lives as long as the proxy: mitmproxy's and our modules, the
        # store's metadata. Frozen, the cycle collector stops rescanning it at every full
        # collection. That saved about 1.5% CPU per request while tldextract's 30,000-dict
        # suffix trie was in the heap; without it, a 400-request instruction count shows no
        # difference either way, but a long run (mitmweb keeps every flow, so full
        # collections come back) still scans less.
        gc.collect()
        gc.freeze()
        log.info("redirect-audit: recording into %s", safe_url(store.url))

    # ---- labels and control requests ------------------------------------------

    def http_connect(self, flow: http.HTTPFlow) -> None:
        if flow.client_conn.proxy_mode.full_spec in self.port_labels:
            return  # labelled by its port: a credential there is the client's own business
        label = take_label(flow.request)
        if label is not None:  # every request through this tunnel is the labelled client's
            self.labels[flow.client_conn.id] = label

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        conn = flow.client_conn
        # A listener of a label's own (/listen) labels its traffic and leaves every header
        # as the client sent it: a Proxy-Authorization the client sends goes on, as it
        # would without the recorder.
        label = self.port_labels.get(conn.proxy_mode.full_spec) or None
        if label is None and isinstance(conn.proxy_mode, _PROXY_MODES) and not conn.tls_established:
            label = take_label(flow.request)  # a plain-HTTP request to the proxy carries its own
        if label is None:
            label = self.labels.get(conn.id)
        if label is None and isinstance(flow.metadata.get("proxyauth"), tuple):
            # mitmproxy's own proxyauth checked the credential and took it off: its user is the label
            label = printable(str(flow.metadata["proxyauth"][0]).strip())[:LABEL_MAX] or None
        if label is not None:
            flow.metadata[LABEL_KEY] = self.renamed.get(label, label)

    def request(self, flow: http.HTTPFlow) -> Coroutine[Any, Any, None] | None:
        # Not a coroutine function: mitmproxy would then create and await a coroutine for
        # every request through the proxy. Only a control request gets one (it awaits the writer).
        if flow.request.host == CONTROL_HOST:
            return self._control(flow)
        return None

    def client_connected(self, client: connection.Client) -> None:
        if client.peername:
            self.clients[client.peername[:2]] = client

    def client_disconnected(self, client: connection.Client) -> None:
        if client.peername:
            self.clients.pop(client.peername[:2], None)
        self.labels.pop(client.id, None)
        self.unreachable.pop(client.id, None)

    def server_connect_error(self, data: server_hooks.ServerConnectionHookData) -> None:
        if data.server.address is not None:
            self.unreachable[data.client.id] = data.server.address

    def tls_failed_client(self, data: tls.TlsData) -> None:
        _count(self.tls_refused, _tls_host(data))

    def tls_failed_server(self, data: tls.TlsData) -> None:
        _count(self.tls_upstream_failed, _tls_host(data))
        server = data.context.server
        if data.conn is server and server.address is not None:
            self.unreachable[data.context.client.id] = server.address

    async def _control(self, flow: http.HTTPFlow) -> None:
        flow.metadata[RECORDED] = True  # answered here: never forwarded, never recorded
        path = flow.request.path.split("?", 1)[0]
        if path == "/ping":
            self._answer(flow, 200, {"ready": self.recorder is not None or self.store is not None})
            return
        if path == "/label":
            query = flow.request.query
            given, to = query.get("from", ""), query.get("to", "")
            if not given:
                self._answer(
                    flow,
                    400,
                    {
                        "error": "/label needs from=LABEL (and to=LABEL; without it, "
                        "the label is recorded as given again)"
                    },
                )
                return
            if to:
                self.renamed[given] = printable(to)[:LABEL_MAX]
            else:
                self.renamed.pop(given, None)
            self._answer(flow, 200, {"from": given, "to": self.renamed.get(given, given)})
            return
        if path == "/listen":
            await self._listen(flow)
            return
        if path == "/record":
            self._record(flow)
            return
        if path != "/flush":
            self._answer(
                flow,
                404,
                {
                    "error": f"unknown control request {printable(path)[:100]}; "
                    "known: /ping, /flush, /label, /listen, /record"
                },
            )
            return
        if self.recorder is None:
            self._start()
        recorder = self.recorder
        if recorder is None:
            self._answer(flow, 503, {"error": "the recorder has not started"})
            return
        self.convert_pending()
        target = recorder.flush_soon()
        deadline = time.monotonic() + FLUSH_TIMEOUT
        while recorder.handled < target and time.monotonic() < deadline and not recorder.closed:
            await asyncio.sleep(0.001)  # a commit takes a few ms: a test waits for this, once or twice
        done = recorder.handled >= target or recorder.closed
        self._answer(
            flow,
            200 if done else 504,
            {
                "flushed": done,
                "seen": recorder.seen,
                "stored": recorder.stored,
                "spooled": recorder.spooled,
                "capture": recorder.capture_id,
                "tls_refused": self.tls_refused,
                "tls_upstream_failed": self.tls_upstream_failed,
            },
        )

    def _record(self, flow: http.HTTPFlow) -> None:
        """`POST /record`: exchanges a client recorded in its own process (the pytest plugin's
        in-process hooks, analyzer/inprocess.py), as JSON. Each becomes a flow like those
        through the proxy, so the same converter, labels and live rules store and judge it."""
        try:
            captures = json.loads(flow.request.content or b"[]")
            if not isinstance(captures, list):
                raise TypeError("a JSON list was expected")
        except (ValueError, TypeError) as exc:
            self._answer(
                flow, 400, {"error": f"/record: not a list of exchanges: {printable(str(exc))[:200]}"}
            )
            return
        flows, refused = [], 0
        for capture in captures:  # one that cannot be made a flow costs only itself
            try:
                flows.append(flow_of_capture(capture))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                refused += 1
                log.warning(
                    "redirect-audit: an exchange recorded in process was not kept: %s",
                    printable(str(exc))[:200],
                )
        for made in flows:
            label = made.metadata.get(LABEL_KEY)
            if label is not None:
                made.metadata[LABEL_KEY] = self.renamed.get(label, label)
            self._set_aside(made)
        self._answer(flow, 200, {"recorded": len(flows), "refused": refused})

    async def _listen(self, flow: http.HTTPFlow) -> None:
        """`/listen?label=L`: a listener of its own on a free loopback port, whose traffic is
        recorded under L. A client given that port needs no credential in its proxy URL, so
        nothing of the label reaches a header the client sends (a test's own
        Proxy-Authorization stays its own). Answers the port once it accepts connections.
        `&mode=transparent`: a transparent listener (127.0.0.1 and ::1, one port) for
        connections the kernel redirects to it (`run --transparent`); L may be empty there
        (its clients are then known by address, as on the main port)."""
        query = flow.request.query
        label = printable(query.get("label", "").strip())[:LABEL_MAX]
        kind = query.get("mode", "regular")
        if kind not in ("regular", "transparent") or (not label and kind == "regular"):
            self._answer(flow, 400, {"error": "/listen needs label=LABEL (and mode=regular or transparent)"})
            return
        for spec, known in self.port_labels.items():
            if known == label and spec.startswith(kind + "@"):  # asked again (a retry): the same port
                self._answer(
                    flow, 200, {"label": label, "port": mode_specs.ProxyMode.parse(spec).listen_port()}
                )
                return
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        specs = [f"{kind}@127.0.0.1:{port}"] + ([f"transparent@::1:{port}"] if kind == "transparent" else [])
        for spec in specs:
            self.port_labels[spec] = label
        try:
            ctx.options.mode = [*ctx.options.mode, *specs]  # proxyserver starts the listeners
        except exceptions.OptionsError as exc:
            for spec in specs:
                del self.port_labels[spec]
            self._answer(flow, 500, {"error": f"cannot listen for {label or kind}: {exc}"})
            return
        server = ctx.master.addons.get("proxyserver")  # type: ignore[no-untyped-call]  # mitmproxy's addon manager is unannotated
        deadline = time.monotonic() + FLUSH_TIMEOUT
        while time.monotonic() < deadline:
            if sum(addr[1] == port for addr in server.listen_addrs()) >= len(specs):
                self._answer(flow, 200, {"label": label, "port": port})
                return
            await asyncio.sleep(0.005)
        self._answer(flow, 504, {"error": f"the listener for {label or kind} on port {port} did not start"})

    @staticmethod
    def _answer(flow: http.HTTPFlow, status: int, body: dict[str, object]) -> None:
        flow.response = http.Response.make(
            status,
            json.dumps(body).encode(),
            {"Content-Type": "application/json", "Cache-Control": "no-store"},
        )

    # ---- traffic -------------------------------------------------------------

    def response(self, flow: http.HTTPFlow) -> None:
        self._set_aside(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        failed = self.unreachable.pop(flow.client_conn.id, None)
        if failed is not None and flow.response is None and failed[1] == flow.request.port:
            # The server could not be reached. mitmproxy would answer 502 Bad Gateway, which
            # a client takes for the server's answer (a test expecting a connection error
            # would fail); closing the client's connection instead is what the client meets
            # without the recorder: a connection error.
            reason = flow.error.msg if flow.error is not None else "unreachable"
            if flow.killable:
                flow.kill()  # type: ignore[no-untyped-call]  # mitmproxy's Flow.kill is unannotated
                flow.metadata[ANSWERED_KEY] = ("closed", reason)
            else:
                flow.metadata[ANSWERED_KEY] = (502, reason)
        self._set_aside(flow)

    def protected_line(self, line: bytes) -> bytes:
        """A request line with its target's secrets fingerprinted, as the store keeps its URL."""
        parts = line.split(b" ")
        if len(parts) < 2 or self.converter is None:
            return line
        target = parts[1].decode("latin-1")
        shown = protect_url(target, self.converter.key, self.converter.policy)
        return b" ".join([parts[0], shown.encode("latin-1", "backslashreplace"), *parts[2:]])

    def rejected_request(self, peer: tuple[str, int], line: bytes, reason: str) -> None:
        """mitmproxy answered 400 to a request whose request line it could not parse
        (`GET http://:1/ HTTP/1.1`, a client following an unusable Location) and made no
        flow of it: the exchange is recorded from the line, as answered by the recorder."""
        client = self.clients.get(peer)
        if client is None:
            return
        flow = _rejected_flow(client, line, reason)
        label = self.port_labels.get(client.proxy_mode.full_spec) or self.labels.get(client.id)
        if label is not None:
            flow.metadata[LABEL_KEY] = self.renamed.get(label, label)
        self._set_aside(flow)

    def _set_aside(self, flow: http.HTTPFlow) -> None:
        if flow.metadata.get(RECORDED):  # an error after its response: the flow is already set aside
            return
        if self.recorder is None:
            self._start()  # traffic can arrive before the running hook
            if self.recorder is None:
                return
        flow.metadata[RECORDED] = True
        pending = self._pending
        pending.append(flow)
        if len(pending) >= CONVERT_BATCH or self._loop is None:
            self.convert_pending()
            if self._closed:  # it finished while the proxy winds down: stored now, and counted
                self.late += 1
                self._log_totals()
        elif len(pending) == 1:
            self._timer = self._loop.call_later(CONVERT_DELAY, self.convert_pending)

    def convert_pending(self) -> None:
        """Convert, queue and judge the flows set aside, in the order they finished."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, []
        if self.converter is None or self.recorder is None:  # made together by _start()
            return
        convert, recorder, live = self.converter.convert, self.recorder, self.live
        if self.converter.capture_id != recorder.capture_id and recorder.capture_id is not None:
            self.converter.capture_id = recorder.capture_id  # the writer made it: rows carry it from now on
        for flow in pending:
            # A bug that one flow trips must cost that flow only, never the rest of its batch.
            try:
                exchange = convert(recorder.next_seq(), flow)
                recorder.submit(exchange)
            except Exception as exc:
                self.unqueued += 1
                log.error("redirect-audit: flow %s could not be recorded: %r", flow.id, exc, exc_info=True)
                continue
            if live is not None:
                try:
                    self._judge(live, flow, exchange)
                except Exception as exc:
                    log.error(
                        "redirect-audit: the live rules failed on flow %s: %r", flow.id, exc, exc_info=True
                    )

    def _judge(self, live: LiveAnalyzer, flow: http.HTTPFlow, exchange: Exchange) -> None:
        found = live.add(exchange)
        # Only flows a later finding can point back at are remembered (redirects and
        # writes); a plain GET is marked, if at all, by the finding it completes now.
        if exchange.id is not None and (found or exchange.is_redirect or exchange.method in WRITE_METHODS):
            self.flows[exchange.id] = flow
        if found:
            self._report(found)

    def _report(self, found: list[Finding]) -> None:
        touched: dict[str, http.HTTPFlow] = {}
        for finding in found:
            self.findings += 1
            target = finding.exchange
            source = target
            if finding.chain is not None and finding.hop < len(finding.chain.hops):
                source = finding.chain.hops[finding.hop].source
            log.warning(
                "redirect-audit %s %s [%s] %s %s -> %s -> %s: %s",
                finding.rule_id,
                finding.rule,
                finding.severity,
                printable(source.method),
                printable(source.url),
                source.status,
                printable(_after(finding, target)),
                printable(finding.message),
            )
            involved = [source, target] if source is not target else [target]
            for ex in involved:
                flow = self.flows.get(ex.id) if ex.id is not None else None
                if flow is None:
                    continue
                flow.marked = MARK
                note = f"{finding.rule_id} {finding.rule} ({finding.severity}): {finding.message}"
                if note not in flow.comment:
                    flow.comment = f"{flow.comment}\n{note}".strip()
                touched[flow.id] = flow
        if touched:
            ctx.master.addons.trigger(UpdateHook(list(touched.values())))

    # ---- time passing ----------------------------------------------------------

    async def _tick(self) -> None:
        """A redirect nobody follows is a finding too; notice it without waiting for traffic."""
        while self.live is not None:
            await asyncio.sleep(1.0)
            if self.live is not None:
                self.convert_pending()  # a follow-up set aside is not taken for a missing one
                found = self.live.expire()
                if found:
                    self._report(found)
                self._say_trimmed(self.live)

    def _say_trimmed(self, live: LiveAnalyzer) -> None:
        """Say once per kind that live analysis reached its cap and let go of the oldest."""
        for kind, count in live.trimmed.items():
            if count and kind not in self._trim_said:
                self._trim_said.add(kind)
                log.warning(
                    "redirect-audit: live analysis keeps at most %s %s and let go of the oldest; "
                    "`redirect-audit analyze` judges them from the store",
                    f"{LIVE_LIMIT:,}",
                    kind,
                )

    # ---- shutdown ------------------------------------------------------------

    def done(self) -> None:
        _MITMPROXY_SERVER_LOG.removeHandler(self.rejected)
        if self._ticker is not None:
            self._ticker.cancel()
        if self.recorder is None or self._closed:
            return
        self.convert_pending()
        if self.live is not None:
            found = self.live.close()
            if found:
                self._report(found)
        self.recorder.close()
        # The recorder stays, for flows that finish while the proxy winds down (mitmproxy
        # serves the connections in flight): without the loop they are converted at once,
        # and the closed recorder stores each as it comes. The live rules are over.
        self._closed, self._loop, self.live = True, None, None
        self._log_totals()
        gc.unfreeze()  # what start-up froze is collectable again (the proxy may live on: tests, reloads)

    def _log_totals(self) -> None:
        rec = self.recorder
        if rec is None:
            return
        seen, stored = rec.seen + self.unqueued, rec.stored
        late = f" ({self.late} after shutdown began)" if self.late else ""
        causes = dict(rec.loss_causes)
        if self.unqueued:
            causes["the recorder failed on them (logged above)"] = self.unqueued
        extra = ", ".join(
            [f"{rec.spooled:,} spooled to {rec.spool_path}"] * (rec.spooled > 0)
            + [f"{n:,} lost ({cause})" for cause, n in causes.items()]
        )
        line = (
            f"redirect-audit: saw {seen} exchanges, stored {stored}{late}{'; ' + extra if extra else ''}; "
            f"{self.findings} findings while running"
        )
        if not log.hasHandlers():
            # mitmproxy takes its log handler down once every done hook has run, and
            # then cancels the connections still open, some of which finish first: the
            # last totals still reach the terminal, on stderr.
            print(line, file=sys.stderr, flush=True)
            return
        log.log(
            logging.INFO
            if seen == stored
            else logging.WARNING
            if rec.lost + self.unqueued == 0
            else logging.ERROR,
            "%s",
            line,
        )


TLS_HOSTS_KEPT = 1000  # hosts counted one by one; past it, the rest are counted as one


def _tls_host(data: tls.TlsData) -> str:
    conn = data.conn
    if conn.sni:
        return printable(conn.sni)[:253]
    peer = data.context.server.address  # where the client was going, or the server itself
    return f"{peer[0]}:{peer[1]}" if peer else "(no name)"


def _count(counts: dict[str, int], host: str) -> None:
    if host not in counts and len(counts) >= TLS_HOSTS_KEPT:
        host = "(other hosts)"
    counts[host] = counts.get(host, 0) + 1


# What mitmproxy logs when it answers 400 to a request head it cannot parse: the only trace
# of that exchange (its http1 server layer makes no flow without a parsed request).
_MITMPROXY_SERVER_LOG = logging.getLogger("mitmproxy.proxy.server")


_REJECTED_LINE = re.compile(r"(Bad HTTP request line: (b'.*'|b\".*\"))\Z", re.DOTALL)


class _RejectedRequests(logging.Handler):
    def __init__(self, recorder: RedirectRecorder) -> None:
        super().__init__(logging.DEBUG)
        self.recorder = recorder

    def emit(self, record: logging.LogRecord) -> None:
        peer = getattr(record, "client", None)
        if not isinstance(peer, tuple) or not isinstance(record.msg, str):
            return
        found = _REJECTED_LINE.search(record.msg)
        if found is None:
            return
        try:
            line = ast.literal_eval(found[2])
        except (ValueError, SyntaxError):
            return
        if isinstance(line, bytes):
            shown = self.recorder.protected_line(line)
            self.recorder.rejected_request(peer[:2], line, f"Bad HTTP request line: {shown!r}")
            # mitmproxy's own log line (the terminal, a log file) shows it protected as well:
            # this handler runs before the root logger's, and the record is theirs too
            record.msg = record.msg[: found.start(2)] + repr(shown)


def _rejected_flow(client: connection.Client, line: bytes, reason: str) -> http.HTTPFlow:
    """A flow for a request line mitmproxy rejected: method and target as the client sent
    them (an absolute-form target split by hand: it did not parse), the recorder's 400."""
    parts = line.split(b" ")
    method = parts[0] if parts and parts[0] else b"?"
    target = parts[1] if len(parts) > 1 else b""
    version = parts[-1] if len(parts) > 2 and parts[-1].startswith(b"HTTP/") else b"HTTP/1.1"
    scheme, sep, rest = target.partition(b"://")
    if sep:
        authority, slash, path = rest.partition(b"/")
        host, colon, port_text = authority.rpartition(b":")
        if not colon or not port_text.isdigit():
            host, port_text = authority, b""
        port = (
            int(port_text) if port_text and int(port_text) <= 65535 else (443 if scheme == b"https" else 80)
        )
        path = slash + path or b"/"
    else:  # origin-form (in a tunnel): where the client's connection was going
        scheme = b"https" if client.tls_established else b"http"
        host = (client.sni or "").encode("latin-1", "replace")
        port = 443 if client.tls_established else 80
        path = target or b"/"
    now = time.time()
    made = made_flow(
        client, host.decode("latin-1"), port, method, scheme.lower(), path, version, http.Headers(), None, now
    )
    made.response = made_response(version, 400, b"Bad Request", http.Headers(), now)
    made.error = FlowError(f"the recorder answered 400 itself; it could not parse the request: {reason}")
    return made


def _options_error(message: str) -> exceptions.OptionsError:
    return exceptions.OptionsError(message)  # type: ignore[no-untyped-call]  # mitmproxy's exceptions are unannotated


# mitmproxy offers every event to every addon, eight per request (four lifecycle hooks,
# each followed by `update`), walking into each addon's `addons` list with a generator
# of its own. A script's module is one stop on that walk and an `addons = [...]` list
# in it would add another, so the hooks are the module's own names, bound to the one
# recorder: the walk stops at the module.
recorder = RedirectRecorder()
load = recorder.load
configure = recorder.configure
running = recorder.running
http_connect = recorder.http_connect
requestheaders = recorder.requestheaders
request = recorder.request
client_connected = recorder.client_connected
client_disconnected = recorder.client_disconnected
server_connect_error = recorder.server_connect_error
tls_failed_client = recorder.tls_failed_client
tls_failed_server = recorder.tls_failed_server
response = recorder.response
error = recorder.error
done = recorder.done
