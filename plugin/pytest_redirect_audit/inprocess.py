"""In-process recording: what this Python process's HTTP clients put on the wire, hop by hop.

The pytest plugin records a test process's own traffic here instead of sending it through
the recorder proxy: no proxy variable, no CA bundle, nothing between the client and the
server, so a suite that scrubs or tests proxy settings, pins its own CA bundle or tests
malformed responses behaves exactly as without the plugin. Each request is captured as
the client library sent it (after its own redirect handling, one exchange per hop) and
handed to the recorder (`/record`), which stores it through the same converter as the
proxy's flows: same schema, labels, redaction and live rules.

One hook point per library, each installed once and removed by `uninstall()`:

* `http.client.HTTPConnection` (urllib, urllib3, requests, pip, ...): `putrequest`,
  `putheader`, `endheaders`, `send` and `getresponse`, at the class every client
  subclasses; the request line, headers and body as written, the status line and
  headers as read;
* `httpx.HTTPTransport.handle_request` and `httpx.AsyncHTTPTransport.handle_async_request`:
  the transport every httpx client sends through (a mock or WSGI transport sends nothing
  on a wire, and is not recorded);
* aiohttp: its own hook point, a `TraceConfig` (request headers sent, body chunks sent,
  redirect, end, exception: one exchange per hop), added to every `ClientSession` as it
  is made (`ClientSession.__init__`).

Response bodies are the client's to read: they are not kept (their length is unknown
to the store). Only the standard library is imported here, and httpx when installed.
"""

from __future__ import annotations

import base64
import http.client
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

CONTROL_HOST = "redirect-audit.invalid"
BODY_KEPT = 1 << 20  # bytes of a request body kept for its digest; past it, its length only
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass
class Capture:
    """One exchange as the client library put it on the wire."""

    method: str
    url: str
    label: str
    connection: str
    started: float
    request_headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    body_len: int = 0
    http_version: str = "HTTP/1.1"
    status: int | None = None
    reason: str = ""
    response_headers: list[tuple[str, str]] = field(default_factory=list)
    response_started: float | None = None
    error: str | None = None
    headers_done: bool = False

    def add_body(self, data: object) -> None:
        if isinstance(data, str):
            data = data.encode("utf-8")
        if isinstance(data, (bytes, bytearray, memoryview)):
            self.body_len += len(data)
            if len(self.body) < BODY_KEPT:
                self.body += bytes(data)[: BODY_KEPT - len(self.body)]

    def as_json(self) -> dict[str, Any]:
        body = bytes(self.body)
        if any(k.lower() == "transfer-encoding" and "chunked" in v.lower() for k, v in self.request_headers):
            body = _dechunk(body)
        return {
            "method": self.method,
            "url": self.url,
            "label": self.label,
            "connection": self.connection,
            "started": self.started,
            "http_version": self.http_version,
            "request_headers": self.request_headers,
            # the body when it was kept whole; else only that there was one (length unknown)
            "body": base64.b64encode(body).decode() if 0 <= self.body_len <= BODY_KEPT else None,
            "status": self.status,
            "reason": self.reason,
            "response_headers": self.response_headers,
            "response_started": self.response_started,
            "error": self.error,
        }


def _dechunk(raw: bytes) -> bytes:
    out, at = bytearray(), 0
    while at < len(raw):
        end = raw.find(b"\r\n", at)
        if end < 0:
            break
        try:
            size = int(raw[at:end].split(b";")[0], 16)
        except ValueError:
            return raw  # not chunked after all: as sent
        if size == 0:
            break
        out += raw[end + 2 : end + 2 + size]
        at = end + 2 + size + 2
    return bytes(out)


class Sink:
    """Captures waiting to be handed to the recorder, in the order their requests started."""

    def __init__(self, label: str) -> None:
        self.label = label  # the client the next requests are recorded under (a test's own)
        self._lock = threading.Lock()
        self._done: list[Capture] = []
        self.count = 0

    def add(self, capture: Capture) -> None:
        with self._lock:
            self._done.append(capture)
            self.count += 1

    def waiting(self) -> int:
        return len(self._done)

    def take(self) -> list[Capture]:
        with self._lock:
            done, self._done = self._done, []
        return sorted(done, key=lambda c: c.started)


_sink: Sink | None = None
_undo: list[Callable[[], None]] = []


def install(sink: Sink) -> None:
    """Record this process's HTTP clients into `sink` until `uninstall()`."""
    global _sink
    if _undo:
        uninstall()
    _sink = sink
    _patch_http_client()
    _when_imported("httpx", _patch_httpx)
    _when_imported("aiohttp", _patch_aiohttp)


def uninstall() -> None:
    global _sink
    while _undo:
        _undo.pop()()
    _sink = None


def _when_imported(module: str, patch: Callable[[], None]) -> None:
    """Patch a client library now if it is loaded, else the moment it is first imported:
    a test process pays nothing for a library it never uses (aiohttp alone takes 0.25 s
    to import). A finder at the head of `sys.meta_path` wraps the module's loader."""
    import sys

    if module in sys.modules:
        patch()
        return
    finder = _PatchOnImport(module, patch)
    sys.meta_path.insert(0, finder)
    _undo.append(lambda: sys.meta_path.remove(finder) if finder in sys.meta_path else None)


class _PatchOnImport:
    def __init__(self, module: str, patch: Callable[[], None]) -> None:
        self.module, self.patch = module, patch

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != self.module:
            return None
        import importlib.abc
        import importlib.util
        import sys

        sys.meta_path.remove(self)  # once: the other finders find it
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader, patch = spec.loader, self.patch

        class Patching(importlib.abc.Loader):  # the module's own loader, then the patch
            def __getattr__(self, attr: str) -> Any:  # resources, source: as the loader has them
                return getattr(loader, attr)

            def create_module(self, spec: Any) -> Any:
                return loader.create_module(spec)

            def exec_module(self, module: Any) -> None:
                loader.exec_module(module)
                if _sink is not None:
                    patch()

        spec.loader = Patching()
        return spec


def _replace(owner: Any, name: str, new: Callable[..., Any]) -> None:
    old = owner.__dict__[name]
    setattr(owner, name, new)
    _undo.append(lambda: setattr(owner, name, old))


def give_children(
    changes: Callable[[], dict[str, str | None]], on_start: Callable[[], None] | None = None
) -> None:
    """A child process started without an environment of its own (`env=None`: this
    process's) gets this process's with `changes()` on top (a value None: removed), so the
    subprocesses a test starts are recorded through the recorder proxy while this process
    keeps its own environment. One place: `subprocess.Popen` (asyncio's subprocesses too)."""
    import os
    import subprocess

    init = subprocess.Popen.__init__

    def with_env(self: Any, args: Any, *rest: Any, **kwargs: Any) -> None:
        if on_start is not None:
            on_start()
        if len(rest) <= 9 and kwargs.get("env") is None:  # env is Popen's 11th parameter
            env = dict(os.environ)
            for name, value in changes().items():
                if value is None:
                    env.pop(name, None)
                else:
                    env[name] = value
            kwargs["env"] = env
        init(self, args, *rest, **kwargs)

    _replace(subprocess.Popen, "__init__", with_env)


# ---- http.client --------------------------------------------------------------------


def _patch_http_client() -> None:
    cls = http.client.HTTPConnection
    putrequest, putheader, endheaders, send, getresponse = (
        cls.putrequest,
        cls.putheader,
        cls.endheaders,
        cls.send,
        cls.getresponse,
    )

    def rec_putrequest(self: Any, method: str, url: str, *args: Any, **kwargs: Any) -> None:
        sink = _sink
        self._redirect_audit = None
        if sink is not None:
            target = _target(self, url)
            if target is not None:
                if not hasattr(self, "_redirect_audit_conn"):
                    self._redirect_audit_conn = uuid.uuid4().hex
                self._redirect_audit = Capture(
                    method=str(method),
                    url=target,
                    label=sink.label,
                    connection=self._redirect_audit_conn,
                    started=time.time(),
                )
        return putrequest(self, method, url, *args, **kwargs)

    def rec_putheader(self: Any, header: Any, *values: Any) -> None:
        putheader(self, header, *values)  # raises on a bad header before anything is noted
        capture = getattr(self, "_redirect_audit", None)
        if capture is not None and not capture.headers_done:
            capture.request_headers.append((_text(header), ", ".join(_text(v) for v in values)))

    def rec_endheaders(self: Any, message_body: Any = None, **kwargs: Any) -> None:
        capture = getattr(self, "_redirect_audit", None)
        try:
            return endheaders(self, message_body, **kwargs)
        except BaseException as exc:  # the connection failed (refused, TLS): the request went nowhere
            if capture is not None and _sink is not None:
                self._redirect_audit = None
                capture.error = f"{type(exc).__name__}: {exc}"
                _sink.add(capture)
            raise
        finally:
            if capture is not None:
                capture.headers_done = True
                if message_body is not None:
                    capture.add_body(message_body)

    def rec_send(self: Any, data: Any) -> None:
        capture = getattr(self, "_redirect_audit", None)
        send(self, data)
        if capture is not None and capture.headers_done and capture.status is None:
            capture.add_body(data)  # a body sent after the headers (urllib3's chunks)

    def rec_getresponse(self: Any) -> http.client.HTTPResponse:
        capture = getattr(self, "_redirect_audit", None)
        self._redirect_audit = None
        try:
            response = getresponse(self)
        except BaseException as exc:
            if capture is not None and _sink is not None:
                capture.error = f"{type(exc).__name__}: {exc}"
                _sink.add(capture)
            raise
        if capture is not None and _sink is not None:
            capture.status = response.status
            capture.reason = response.reason
            capture.http_version = "HTTP/1.0" if response.version == 10 else "HTTP/1.1"
            capture.response_headers = [(k, v) for k, v in response.msg.items()]
            capture.response_started = time.time()
            _sink.add(capture)
        return response

    for name, new in (
        ("putrequest", rec_putrequest),
        ("putheader", rec_putheader),
        ("endheaders", rec_endheaders),
        ("send", rec_send),
        ("getresponse", rec_getresponse),
    ):
        _replace(cls, name, new)


def _target(conn: Any, url: str) -> str | None:
    """The request's absolute URL (None for the recorder's own control requests)."""
    if url.startswith(("http://", "https://")):  # absolute form: to a proxy the test chose
        from urllib.parse import urlsplit

        return None if urlsplit(url).hostname == CONTROL_HOST else url
    scheme = "https" if isinstance(conn, http.client.HTTPSConnection) else "http"
    host = getattr(conn, "_tunnel_host", None) or conn.host
    port = getattr(conn, "_tunnel_port", None) or conn.port
    if host == CONTROL_HOST:
        return None
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    authority = host if port in (None, _DEFAULT_PORTS[scheme]) else f"{host}:{port}"
    return f"{scheme}://{authority}{url if url.startswith('/') else '/' + url}"


def _text(value: Any) -> str:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("latin-1")
    return str(value)


# ---- httpx ----------------------------------------------------------------------------


def _patch_httpx() -> None:
    try:
        import httpx
    except ImportError:  # not installed: nothing to record
        return
    sync_cls, async_cls = httpx.HTTPTransport, httpx.AsyncHTTPTransport
    handle, handle_async = sync_cls.handle_request, async_cls.handle_async_request

    def rec_handle(self: Any, request: Any) -> Any:
        capture = _from_httpx(self, request)
        try:
            response = handle(self, request)
        except BaseException as exc:
            _failed(capture, exc)
            raise
        _answered(capture, response)
        return response

    async def rec_handle_async(self: Any, request: Any) -> Any:
        capture = _from_httpx(self, request)
        try:
            response = await handle_async(self, request)
        except BaseException as exc:
            _failed(capture, exc)
            raise
        _answered(capture, response)
        return response

    _replace(sync_cls, "handle_request", rec_handle)
    _replace(async_cls, "handle_async_request", rec_handle_async)


def _from_httpx(transport: Any, request: Any) -> Capture | None:
    sink = _sink
    if sink is None or request.url.host == CONTROL_HOST:
        return None
    capture = Capture(
        method=request.method,
        url=str(request.url),
        label=sink.label,
        connection=f"httpx-{id(transport):x}",
        started=time.time(),
        request_headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw],
    )
    try:
        capture.add_body(request.content)
    except Exception:  # not read into the request: a redirect's replayed bytes, or a stream
        import httpx

        if isinstance(request.stream, httpx.ByteStream):  # bytes, re-iterable without consuming
            capture.add_body(b"".join(request.stream))
        else:
            capture.body_len = -1  # a one-shot stream is the client's: its length stays unknown
    return capture


def _answered(capture: Capture | None, response: Any) -> None:
    if capture is None or _sink is None:
        return
    capture.status = response.status_code
    capture.reason = response.reason_phrase
    version = response.extensions.get("http_version", b"HTTP/1.1")
    capture.http_version = version.decode() if isinstance(version, bytes) else str(version)
    capture.response_headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in response.headers.raw]
    capture.response_started = time.time()
    _sink.add(capture)


def _failed(capture: Capture | None, exc: BaseException) -> None:
    if capture is not None and _sink is not None:
        capture.error = f"{type(exc).__name__}: {exc}"
        _sink.add(capture)


# ---- aiohttp --------------------------------------------------------------------------


def _patch_aiohttp() -> None:
    try:
        import aiohttp
    except ImportError:  # not installed: nothing to record
        return
    init = aiohttp.ClientSession.__init__

    def with_trace(self: Any, *args: Any, **kwargs: Any) -> None:
        configs = list(kwargs.get("trace_configs") or ())
        configs.append(_aiohttp_trace(aiohttp))
        kwargs["trace_configs"] = configs
        init(self, *args, **kwargs)

    _replace(aiohttp.ClientSession, "__init__", with_trace)


def _aiohttp_capture(session: Any, params: Any, sink: Sink) -> Capture:
    """A hop of an aiohttp session: its request as the trace signal gives it."""
    return Capture(
        method=params.method,
        url=str(params.url),
        label=sink.label,
        connection=f"aiohttp-{id(session):x}",
        started=time.time(),
        request_headers=[(str(k), str(v)) for k, v in params.headers.items()],
    )


def _aiohttp_trace(aiohttp: Any) -> Any:
    trace = aiohttp.TraceConfig()

    async def headers_sent(session: Any, ctx: Any, params: Any) -> None:
        sink = _sink
        if sink is None or params.url.host == CONTROL_HOST:
            ctx.redirect_audit = None
            return
        ctx.redirect_audit = _aiohttp_capture(session, params, sink)

    async def chunk_sent(session: Any, ctx: Any, params: Any) -> None:
        capture = getattr(ctx, "redirect_audit", None)
        if capture is not None:
            capture.add_body(params.chunk)

    async def answered(session: Any, ctx: Any, params: Any) -> None:
        capture = getattr(ctx, "redirect_audit", None)
        ctx.redirect_audit = None
        if capture is None or _sink is None:
            return
        response = params.response
        capture.status = response.status
        capture.reason = response.reason or ""
        capture.http_version = f"HTTP/{response.version.major}.{response.version.minor}"
        capture.response_headers = [
            (k.decode("latin-1"), v.decode("latin-1")) for k, v in response.raw_headers
        ]
        capture.response_started = time.time()
        _sink.add(capture)

    async def failed(session: Any, ctx: Any, params: Any) -> None:
        capture = getattr(ctx, "redirect_audit", None)
        ctx.redirect_audit = None
        sink = _sink
        if sink is None or params.url.host == CONTROL_HOST:
            return
        if capture is None:  # it failed before its headers went out (connecting)
            capture = _aiohttp_capture(session, params, sink)
        capture.error = f"{type(params.exception).__name__}: {params.exception}"
        sink.add(capture)

    trace.on_request_headers_sent.append(headers_sent)
    trace.on_request_chunk_sent.append(chunk_sent)
    trace.on_request_redirect.append(answered)
    trace.on_request_end.append(answered)
    trace.on_request_exception.append(failed)
    return trace
