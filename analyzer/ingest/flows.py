"""mitmproxy flows as Exchanges: the recorder addon's converter and `import-flows`.

The only module of `analyzer` that imports mitmproxy (an import-linter contract says
so), so everything else, HAR import and analysis included, works without a proxy.
A flow becomes one Exchange: the request as the client sent it, the response or the
error that ended it, the label the client gave in its proxy URL or else its peer
address as its identity, and the client connection as its connection. Credentials are fingerprinted before anything else
sees them, as for HAR.
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Iterator
from io import BufferedReader
from pathlib import Path
from typing import Any, BinaryIO, cast

from mitmproxy import connection, exceptions, http, io, version
from mitmproxy.flow import Error as FlowError

from analyzer.ingest.common import (
    IDEMPOTENCY_HEADERS,
    MAX_URL,
    CaptureOptions,
    ImportError_,
    ImportResult,
    dates_out_of_range,
    empty_body,
    file_sha256,
    headers_too_large,
    refuse_reimport,
    summarize_body,
    url_too_long,
)
from analyzer.model import Body, Exchange
from analyzer.secrets import SecretPolicy, protect_and_index, protect_url
from analyzer.store import (
    EXCHANGE_COLUMNS,
    STATISTICS_AFTER,
    HeaderBlock,
    Store,
    add_capture,
    exchange_row,
    finish_capture,
    header_block,
    refresh_statistics,
    write_exchanges,
)
from analyzer.storeread import ValueRefused
from analyzer.text import printable
from analyzer.urls import BadURL, normalize_url, resolve_location

MITMPROXY_VERSION = version.VERSION
# flow.metadata key: the label the client gave in its proxy URL (http://LABEL@host:port),
# set by the recorder addon, which took the proxy credentials off the request. Saved
# with the flow, so an imported dump keeps its clients' labels.
# flow.metadata: (how the recorder answered a request itself: "closed" or a status, why)
ANSWERED_KEY = "redirect_audit_answered"
LABEL_KEY = "redirect_audit_label"
LABEL_MAX = 100  # characters of a label kept
INPROCESS_KEY = "redirect_audit_inprocess"  # flow.metadata: recorded in the client's own process


class FlowConverter:
    """Turns HTTP flows into Exchanges for one capture."""

    def __init__(
        self, capture_id: int, key: bytes, options: CaptureOptions = CaptureOptions(), *, recorder: str = ""
    ):
        self.capture_id = capture_id
        self.key = key
        # A client is its peer address as seen by one recorder: "proxy:HOST:PORT/10.0.0.7", or
        # "flows:3/10.0.0.7" for an imported dump. Two proxies (or runners behind one NAT)
        # that see the same address are two clients, never linked into one chain.
        self.client_prefix = f"{recorder}/" if recorder else ""
        self.warnings = 0
        self.options = options

    @property
    def options(self) -> CaptureOptions:
        return self._options

    @options.setter
    def options(self, options: CaptureOptions) -> None:
        self._options = options
        self.policy = options.policy
        self._blocks: dict[
            Any, tuple[HeaderBlock, dict[str, str]]
        ] = {}  # header fields -> (HeaderBlock, index): see _header_block(); of this policy

    def convert(self, seq: int, flow: http.HTTPFlow) -> Exchange:
        # Runs on the proxy's event loop for every exchange: mitmproxy's raw fields are
        # read directly where its properties would decode or rebuild them.
        request = flow.request
        data = request.data
        req_headers, req_h = _header_block(self._blocks, data.headers.fields, self.key, self.policy)
        url, url_norm = _urls(request, self.key, self.policy)
        if url_norm is None:
            url = protect_url(_clean(request.url), self.key, self.policy)
            try:
                url_norm = normalize_url(url)
            except BadURL:
                self.warnings += 1
                url_norm = url
        raw_method = data.method
        method = raw_method.decode().upper() if raw_method.isascii() else _clean(request.method).upper()
        peer = flow.client_conn.peername
        label = flow.metadata.get(LABEL_KEY)
        response = flow.response
        error = flow.error
        ex = Exchange(
            capture_id=self.capture_id,
            seq=seq,
            method=method,
            url=url,
            url_norm=url_norm,
            started_at=_seconds(data.timestamp_start),
            # a label is the client's identity as the client named itself; else its address
            # (not its port, which changes per connection) as this recorder saw it
            client=label if label else self.client_prefix + (str(peer[0]) if peer else "unknown"),
            connection=flow.client_conn.id,
            flow_id=flow.id,
            http_version=data.http_version.decode("utf-8", "backslashreplace"),
            request_headers=req_headers,
            user_agent=req_h.get("user-agent"),
            idempotency_key=req_h.get(IDEMPOTENCY_HEADERS[0]) or req_h.get(IDEMPOTENCY_HEADERS[1]) or None,
            request_body=self._body(data.content, req_h),
            error=error.msg if error is not None else None,  # with a response: answered, then broken off
        )
        if response is None:
            if error is None:
                ex.error = "no response"
            elif flow.metadata.get(ANSWERED_KEY):
                # the server could not be reached (refused, unresolvable, TLS failed): mitmproxy
                # answered the client itself, and the client went on from that answer
                how, reason = flow.metadata[ANSWERED_KEY]
                done = "closed the client's connection" if how == "closed" else f"answered {how}"
                ex.error = f"the server could not be reached; the recorder {done}: {reason}"
            return ex
        rdata = response.data
        resp_headers, resp_h = _header_block(self._blocks, rdata.headers.fields, self.key, self.policy)
        ex.response_started_at = _seconds(rdata.timestamp_start)
        ex.status = rdata.status_code
        ex.status_text = rdata.reason.decode("ISO-8859-1")  # as mitmproxy's `reason` decodes it
        ex.response_headers = resp_headers
        ex.response_body = self._body(rdata.content, resp_h)
        location = resp_h.get("location")
        if location is not None:
            ex.location = protect_url(location, self.key, self.policy)
            if ex.is_redirect:
                try:
                    ex.location_resolved = resolve_location(ex.url, ex.location)
                except BadURL as exc:
                    ex.location_error = str(exc)
        return ex

    def _body(self, raw: bytes | None, headers: dict[str, str]) -> Body:
        content_type = headers.get("content-type")
        # `raw` is the body as on the wire (still content-encoded); None if it was streamed
        if raw is None:
            return Body(content_type=content_type)
        if not raw:
            return empty_body(self.key, content_type)
        return summarize_body(raw, content_type, self.options, self.key)


_DEFAULT_PORT = {b"http": ("http", 80), b"https": ("https", 443)}
_PLAIN_HOST = re.compile(r"[a-z0-9.\-_]+")
_PLAIN_TARGET = re.compile(rb"/[\x21\x22\x24-\x7e]*")  # origin-form, printable ASCII, no '#'


def _urls(request: http.Request, key: bytes, policy: SecretPolicy) -> tuple[str, str | None]:
    """(url, url_norm) of an everyday request, built straight from mitmproxy's fields.

    The same strings as `protect_url(request.url)` and `normalize_url()` of it, for
    an http(s) request with a lower-case name or IPv4 host and a printable ASCII
    origin-form target: the proxy's hot path, for every exchange. Anything else
    (IPv6, upper case, escapes, a fragment, CONNECT) gets (url, None) and takes the
    general path; so does a URL whose query holds a secret field.
    """
    data = request.data
    known = _DEFAULT_PORT.get(data.scheme)
    path = data.path
    if known is None or data.method == b"CONNECT" or _PLAIN_TARGET.fullmatch(path) is None:
        return "", None
    host = data.host
    if _PLAIN_HOST.fullmatch(host) is None:
        return "", None
    scheme, default = known
    port = data.port
    target = path.decode("ascii")
    url = f"{scheme}://{host}{target}" if port == default else f"{scheme}://{host}:{port}{target}"
    if "=" in target and protect_url(url, key, policy) is not url:
        return "", None
    if target[-1] == "?" and target.index("?") == len(target) - 1:
        return url, url[:-1]  # an empty query is no query
    return url, url


# Header fields as mitmproxy keeps them: (name, value) byte pairs.
Fields = tuple[tuple[bytes, bytes], ...]
HEADER_BLOCKS = 256  # distinct header blocks a converter remembers (about 2 KB each, with index and JSON)


def _header_block(
    blocks: dict[Any, tuple[HeaderBlock, dict[str, str]]], fields: Fields, key: bytes, policy: SecretPolicy
) -> tuple[HeaderBlock, dict[str, str]]:
    """A header block as stored (credentials fingerprinted) and its lower-case index.

    A client sends the same request headers again and again, and under load a server
    sends the same response headers many times a second (until its Date changes).
    Converting a block and encoding it as JSON costs about 2 µs; finding it in
    `blocks` (the converter's own, so of one store's key) a few tenths. mitmproxy
    keeps `fields` as a tuple of byte pairs, so it is the key itself. The block and
    its index are shared between exchanges and never changed. `blocks` is emptied
    when full, so a block not found costs a lookup and an insert, about 1 µs in all
    (benchmarks/bench_convert.py), where a least-recently-used list costs more at
    every miss. Fields that are not hashable (an addon may set a list) are
    converted anew."""
    try:
        found = blocks.get(fields)
    except TypeError:
        return _convert_block(fields, key, policy)
    if found is None:
        if len(blocks) >= HEADER_BLOCKS:
            blocks.clear()
        found = blocks[fields] = _convert_block(fields, key, policy)
    return found


def _convert_block(fields: Fields, key: bytes, policy: SecretPolicy) -> tuple[HeaderBlock, dict[str, str]]:
    pairs, index = protect_and_index(_pairs(fields), key, policy)
    return header_block(pairs), index


def _pairs(fields: Fields) -> list[tuple[str, str]]:
    """The header fields as text, bytes that are not UTF-8 written as `\\xNN`.

    mitmproxy's own `items(multi=True)` decodes with surrogateescape, and a lone
    surrogate cannot be stored as text: one such header used to fail its whole batch."""
    return [(k.decode("utf-8", "backslashreplace"), v.decode("utf-8", "backslashreplace")) for k, v in fields]


def _clean(text: str) -> str:
    """A mitmproxy string (URL, method) as storable text: undecodable bytes as `\\xNN`."""
    if text.isascii():
        return text
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _bounded(name: str, seq: int, flow: http.HTTPFlow) -> http.HTTPFlow:
    """The flow, unless a URL or header block in it is past the import limits (common.py)."""
    request = flow.request
    length = len(request.data.path) + len(request.data.host) + 16
    if length > MAX_URL:
        raise ImportError_(f"{name}: flow {seq}: {url_too_long(len(request.url))}")
    for side, message in (("request", request), ("response", flow.response)):
        if message is None:
            continue
        fields = message.data.headers.fields
        problem = headers_too_large(side, len(fields), sum(len(k) + len(v) for k, v in fields))
        if problem is not None:
            raise ImportError_(f"{name}: flow {seq}: {problem}")
    return flow


def read_flows(path: str, name: str | None = None) -> Iterator[http.HTTPFlow]:
    """The HTTP flows of a mitmproxy dump, refusing HAR (it has its own importer)."""
    name = name or path
    with open(path, "rb") as fh:
        start = fh.read(4)
        if start.lstrip(b"\xef\xbb\xbf").lstrip().startswith(b"{"):
            raise ImportError_(
                f"{name}: this is JSON (a HAR file?), not a mitmproxy flow dump; use import-har"
            )
        if not start:
            raise ImportError_(f"{name}: empty file, not a mitmproxy flow dump")
        fh.seek(0)
        # mitmproxy's reader only calls read() and peek(), which the guard provides
        for flow in io.FlowReader(cast(BinaryIO, _GuardedDump(fh, name))).stream():
            if isinstance(flow, http.HTTPFlow):
                yield flow


def _seconds(value: Any) -> float | None:
    """A timestamp as the store keeps it: a float, whatever a saved dump put there (an
    integer of 64 digits included); one no float can hold is unknown."""
    if type(value) is float or value is None:  # what mitmproxy itself records
        return value
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        return None


MAX_DEPTH = 64  # containers within containers in one record; a flow has about 5


class _GuardedDump:
    """A dump file as mitmproxy's reader sees it, with two guards in front of its parser.

    mitmproxy reads a record's length prefix and then that many bytes: a prefix of
    `999999999999:` in a 113-byte file asked for a terabyte (MemoryError). Here a length
    beyond the end of the file is refused before anything is allocated. Its parser then
    recurses once per nesting level: a record nested past MAX_DEPTH is refused first,
    by a loop over the length prefixes."""

    def __init__(self, fh: BufferedReader, name: str):
        self.fh = fh
        self.name = name
        self.size = os.fstat(fh.fileno()).st_size

    def peek(self, n: int) -> bytes:
        return self.fh.peek(n)

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0 or n <= 1:
            return self.fh.read(n)
        left = self.size - self.fh.tell()
        if n > left:
            raise ImportError_(
                f"{self.name}: damaged mitmproxy flow dump: a record of {n} bytes where {left} "
                "remain (truncated, or not a flow dump)"
            )
        data = self.fh.read(n)
        if data.count(b"]") + data.count(b"}") > MAX_DEPTH:  # only then can it be nested that deep
            _check_depth(data, self.name)
        return data


def _check_depth(data: bytes, name: str) -> None:
    """Refuse a tnetstring record payload nested more than MAX_DEPTH containers deep. A
    malformed payload is left to mitmproxy's parser, which names the problem."""
    ends = [len(data)]  # where the content of each open container ends (its type tag follows)
    pos = 0
    try:
        while ends:
            if pos >= ends[-1]:
                pos = ends.pop() + 1  # past the container's type tag
                continue
            colon = data.index(b":", pos, pos + 13)
            start = colon + 1
            stop = start + int(data[pos:colon])
            tag = data[stop]
            if tag in (0x5D, 0x7D):  # "]" or "}": a container, its elements inside
                if len(ends) >= MAX_DEPTH:
                    raise ImportError_(
                        f"{name}: a record nested more than {MAX_DEPTH} levels deep; no flow is, "
                        "so the file is refused"
                    )
                ends.append(stop)
                pos = start
            else:
                pos = stop + 1
    except (ValueError, IndexError):
        return


def import_flows(
    store: Store,
    path: str | os.PathLike[str],
    options: CaptureOptions = CaptureOptions(),
    *,
    force: bool = False,
    name: str | None = None,
) -> ImportResult:
    """Import a `mitmdump -w` / mitmweb dump in one transaction; a bad file stores nothing.

    Content the store already holds raises AlreadyImported unless `force`; `name` is how
    the file is called in messages and in the store (default: its path).
    """
    name = name or str(path)
    path = str(path)
    try:
        sha256 = file_sha256(path)
        if not force:
            with store.begin() as conn:
                refuse_reimport(conn, name, sha256)
        with store.begin() as conn:
            capture_id = add_capture(
                conn,
                source="flows",
                path=name if name != path else str(Path(path).resolve()),
                sha256=sha256,
                creator=f"mitmproxy {MITMPROXY_VERSION}",
            )
            converter = FlowConverter(capture_id, store.secret_key, options, recorder=f"flows:{capture_id}")
            rows = (
                exchange_row(converter.convert(seq, _bounded(name, seq, flow)))
                for seq, flow in enumerate(read_flows(path, name))
            )
            count = write_exchanges(conn, rows)
            if not force:
                refuse_reimport(conn, name, sha256, capture_id)
            finish_capture(conn, capture_id, entries=count, warnings=converter.warnings)
            if count >= STATISTICS_AFTER:
                refresh_statistics(conn, "exchanges", "captures")
            odd = dates_out_of_range(conn, capture_id)
    except ValueRefused as exc:
        seq = f"flow {exc.row[EXCHANGE_COLUMNS.index('seq')]}: " if exc.row is not None else ""
        raise ImportError_(f"{name}: {seq}{exc}") from None
    except exceptions.FlowReadException as exc:
        raise ImportError_(f"{name}: not a mitmproxy flow dump: {_one_line(exc)}") from None
    except (ValueError, KeyError, TypeError, OverflowError) as exc:  # tnetstring or flow-state damage
        raise ImportError_(f"{name}: damaged mitmproxy flow dump: {_one_line(exc)}") from None
    except RecursionError:
        raise ImportError_(f"{name}: damaged mitmproxy flow dump: nested too deep") from None
    except OSError as exc:
        raise ImportError_(f"{name}: cannot read: {exc.strerror or exc}") from None
    return ImportResult(name, capture_id, count, converter.warnings, odd)


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


# ---- flows of requests the proxy did not read itself ----------------------------------


def made_flow(
    client: connection.Client,
    host: str,
    port: int,
    method: bytes,
    scheme: bytes,
    path: bytes,
    version: bytes,
    headers: http.Headers,
    content: bytes | None,
    at: float,
) -> http.HTTPFlow:
    """A flow of a request the proxy did not read itself (in process, or rejected unparsed)."""
    made = http.HTTPFlow(client, connection.Server(address=(host, port)))
    made.request = http.Request(
        host=host,
        port=port,
        method=method,
        scheme=scheme,
        authority=b"",
        path=path,
        http_version=version,
        headers=headers,
        content=content,
        trailers=None,
        timestamp_start=at,
        timestamp_end=at,
    )
    return made


def made_response(
    version: bytes, status: int, reason: bytes, headers: http.Headers, at: float
) -> http.Response:
    """Its answer, without a body (a client reads it; the recorder's own 400 has none kept)."""
    return http.Response(
        http_version=version,
        status_code=status,
        reason=reason,
        headers=headers,
        content=None,
        trailers=None,
        timestamp_start=at,
        timestamp_end=at,
    )


def made_headers(pairs: list[list[str]]) -> http.Headers:
    return http.Headers([(k.encode("latin-1"), v.encode("latin-1")) for k, v in pairs])


def flow_of_capture(capture: dict[str, Any]) -> http.HTTPFlow:
    """A flow from an exchange recorded in a client's process (the pytest plugin's
    inprocess.Capture.as_json): the recorder's `/record` and the plugin's backend, which
    stores a test process's own traffic without a proxy, make the same flow of it."""
    from urllib.parse import urlsplit

    url = urlsplit(capture["url"])
    scheme = url.scheme or "http"
    try:
        port = url.port or (443 if scheme == "https" else 80)
    except ValueError:  # a port out of range or not a number (it went nowhere): the default port
        port = 443 if scheme == "https" else 80
    target = (url.path or "/") + (f"?{url.query}" if url.query else "")
    started = float(capture["started"])
    client = connection.Client(
        peername=("127.0.0.1", 0),
        sockname=("127.0.0.1", 0),
        timestamp_start=started,
        id=str(capture["connection"]),
    )
    body = capture.get("body")
    made = made_flow(
        client,
        url.hostname or "",
        port,
        str(capture["method"]).encode("latin-1"),
        scheme.encode(),
        target.encode("latin-1"),
        str(capture["http_version"]).encode(),
        made_headers(capture["request_headers"]),
        base64.b64decode(body) if body is not None else None,
        started,
    )
    if capture.get("status") is not None:
        made.response = made_response(
            str(capture["http_version"]).encode(),
            int(capture["status"]),
            str(capture.get("reason") or "").encode("latin-1", "replace"),
            made_headers(capture["response_headers"]),
            float(capture.get("response_started") or started),
        )
    if capture.get("error"):
        made.error = FlowError(str(capture["error"]))
    made.metadata[LABEL_KEY] = printable(str(capture.get("label") or ""))[:LABEL_MAX] or None
    made.metadata[INPROCESS_KEY] = True
    return made
