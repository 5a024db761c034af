"""mitmproxy flows as Exchanges: the recorder addon's converter and `import-flows`.

The only module of `analyzer` that imports mitmproxy (an import-linter contract says
so), so everything else, HAR import and analysis included, works without a proxy.
A flow becomes one Exchange: the request as the client sent it, the response or the
error that ended it, the client's peer address as its identity and the client
connection as its connection. Credentials are fingerprinted before anything else
sees them, as for HAR.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from mitmproxy import exceptions, http, io, version

from analyzer.ingest.common import (
    EMPTY_SHA256,
    IDEMPOTENCY_HEADERS,
    CaptureOptions,
    ImportError_,
    ImportResult,
    summarize_body,
)
from analyzer.model import Body, Exchange
from analyzer.secrets import protect_and_index, protect_url
from analyzer.store import Store, add_capture, exchange_row, finish_capture, write_exchanges
from analyzer.urls import BadURL, normalize_url, resolve_location

MITMPROXY_VERSION = version.VERSION


def client_of(flow: http.HTTPFlow) -> str:
    """The client's identity: its peer address (the port changes per connection)."""
    peer = flow.client_conn.peername
    return str(peer[0]) if peer else "unknown"


class FlowConverter:
    """Turns HTTP flows into Exchanges for one capture."""

    def __init__(self, capture_id: int, key: bytes, options: CaptureOptions = CaptureOptions()):
        self.capture_id = capture_id
        self.key = key
        self.options = options
        self.warnings = 0

    def convert(self, seq: int, flow: http.HTTPFlow) -> Exchange:
        request = flow.request
        req_headers, req_h = protect_and_index(_pairs(request.headers), self.key)
        url = protect_url(_clean(request.url), self.key)
        try:
            url_norm = normalize_url(url)
        except BadURL:
            self.warnings += 1
            url_norm = url
        ex = Exchange(
            capture_id=self.capture_id,
            seq=seq,
            method=_clean(request.method).upper(),
            url=url,
            url_norm=url_norm,
            started_at=request.timestamp_start,
            client=client_of(flow),
            connection=flow.client_conn.id,
            flow_id=flow.id,
            http_version=request.http_version,
            request_headers=req_headers,
            user_agent=req_h.get("user-agent"),
            idempotency_key=req_h.get(IDEMPOTENCY_HEADERS[0]) or req_h.get(IDEMPOTENCY_HEADERS[1]) or None,
            request_body=self._body(request, req_h),
        )
        response = flow.response
        if response is None:
            ex.error = flow.error.msg if flow.error else "no response"
            return ex
        resp_headers, resp_h = protect_and_index(_pairs(response.headers), self.key)
        ex.response_started_at = response.timestamp_start
        ex.status = response.status_code
        ex.status_text = response.reason
        ex.response_headers = resp_headers
        ex.response_body = self._body(response, resp_h)
        if flow.error is not None:
            ex.error = flow.error.msg  # answered, then broken off (a body cut short)
        location = resp_h.get("location")
        if location is not None:
            ex.location = protect_url(location, self.key)
            if ex.is_redirect:
                try:
                    ex.location_resolved = resolve_location(ex.url, ex.location)
                except BadURL as exc:
                    ex.location_error = str(exc)
        return ex

    def _body(self, message: http.Message, headers: dict[str, str]) -> Body:
        content_type = headers.get("content-type")
        raw = message.raw_content  # as on the wire (still content-encoded); None if streamed
        if raw is None:
            return Body(content_type=content_type)
        if not raw:
            return Body(length=0, sha256=EMPTY_SHA256, content_type=content_type)
        return summarize_body(raw, content_type, self.options)


def _pairs(headers: http.Headers) -> list[tuple[str, str]]:
    """The header fields as text, bytes that are not UTF-8 written as `\\xNN`.

    mitmproxy's own `items(multi=True)` decodes with surrogateescape, and a lone
    surrogate cannot be stored as text: one such header used to fail its whole batch.
    One list comprehension over `fields`, too: this runs on the proxy's event loop for
    every exchange, and the generator costs twice as much."""
    return [(k.decode("utf-8", "backslashreplace"), v.decode("utf-8", "backslashreplace")) for k, v in headers.fields]


def _clean(text: str) -> str:
    """A mitmproxy string (URL, method) as storable text: undecodable bytes as `\\xNN`."""
    if text.isascii():
        return text
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def read_flows(path: str) -> Iterator[http.HTTPFlow]:
    """The HTTP flows of a mitmproxy dump, refusing HAR (it has its own importer)."""
    with open(path, "rb") as fh:
        start = fh.read(4)
        if start.lstrip(b"\xef\xbb\xbf").lstrip().startswith(b"{"):
            raise ImportError_(f"{path}: this is JSON (a HAR file?), not a mitmproxy flow dump; use import-har")
        if not start:
            raise ImportError_(f"{path}: empty file, not a mitmproxy flow dump")
        fh.seek(0)
        for flow in io.FlowReader(fh).stream():
            if isinstance(flow, http.HTTPFlow):
                yield flow


def import_flows(store: Store, path: str | os.PathLike, options: CaptureOptions = CaptureOptions()) -> ImportResult:
    """Import a `mitmdump -w` / mitmweb dump in one transaction; a bad file stores nothing."""
    name = str(path)
    try:
        with store.begin() as conn:
            capture_id = add_capture(conn, source="flows", path=str(Path(name).resolve()),
                                     creator=f"mitmproxy {MITMPROXY_VERSION}")
            converter = FlowConverter(capture_id, store.secret_key, options)
            rows = (exchange_row(converter.convert(seq, flow)) for seq, flow in enumerate(read_flows(name)))
            count = write_exchanges(conn, rows)
            finish_capture(conn, capture_id, entries=count, warnings=converter.warnings)
    except exceptions.FlowReadException as exc:
        raise ImportError_(f"{name}: not a mitmproxy flow dump: {_one_line(exc)}") from None
    except (ValueError, KeyError, TypeError) as exc:  # tnetstring or flow-state damage
        raise ImportError_(f"{name}: damaged mitmproxy flow dump: {_one_line(exc)}") from None
    except OSError as exc:
        raise ImportError_(f"{name}: cannot read: {exc.strerror or exc}") from None
    return ImportResult(name, capture_id, count, converter.warnings)


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
