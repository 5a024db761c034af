"""HAR 1.1/1.2 import, streamed: memory stays flat however large the file.

The file is read twice: a short head scan up to `log.entries` (version, creator,
browser) and then the entries one by one through ijson's C backend. Everything a
file adds happens in one transaction, so a file that turns out broken halfway
leaves nothing behind.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import ijson

from analyzer.ingest.common import (
    EMPTY_SHA256,
    IDEMPOTENCY_HEADERS,
    CaptureOptions,
    ImportError_,
    ImportResult,
    summarize_body,
)
from analyzer.model import Body, Exchange
from analyzer.secrets import protect_headers, protect_url
from analyzer.store import Store, add_capture, exchange_row, finish_capture, write_exchanges
from analyzer.urls import BadURL, normalize_url, resolve_location

UTF8_BOM = b"\xef\xbb\xbf"
HEAD_SCAN_LIMIT = 64 * 1024 * 1024  # bytes of metadata we accept before log.entries
TIMING_PHASES = ("blocked", "dns", "connect", "send", "wait")  # ssl is inside connect (HAR 1.2)
SYNTHETIC_REASON = "non-authoritative-reason"  # Chrome's header on its internal redirects

Progress = Callable[[int], None]


def import_har(
    store: Store,
    path: str | os.PathLike,
    options: CaptureOptions = CaptureOptions(),
    progress: Progress | None = None,
) -> ImportResult:
    """Import one HAR file in one transaction; raise ImportError_ and store nothing if it is bad."""
    name = str(path)
    try:
        head = _scan_head(name)
        with store.begin() as conn:
            capture_id = add_capture(
                conn,
                source="har",
                path=str(Path(name).resolve()),
                creator=head.get("creator"),
                browser=head.get("browser"),
                format_version=head.get("version"),
            )
            reader = _HarEntries(name, capture_id, store.secret_key, options, progress)
            count = write_exchanges(conn, (exchange_row(ex) for ex in reader))
            finish_capture(conn, capture_id, entries=count, warnings=reader.warnings, sha256=reader.sha256)
    except ImportError_:
        raise
    except (ijson.JSONError, ijson.IncompleteJSONError) as exc:
        raise ImportError_(f"{name}: not valid JSON: {_one_line(exc)}") from None
    except OSError as exc:
        raise ImportError_(f"{name}: cannot read: {exc.strerror or exc}") from None
    return ImportResult(name, capture_id, count, reader.warnings)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class _CountingReader:
    """File wrapper that skips a UTF-8 BOM, hashes what it reads and reports progress."""

    def __init__(self, fh: IO[bytes], progress: Progress | None) -> None:
        self._fh = fh
        self._progress = progress
        self.sha = hashlib.sha256()
        self.read_bytes = 0
        first = fh.read(3)
        self.sha.update(first)
        self._pending = b"" if first == UTF8_BOM else first

    def read(self, size: int = -1) -> bytes:
        if size == 0:  # ijson probes the stream type with read(0)
            return b""
        chunk = self._fh.read(size)
        self.sha.update(chunk)
        if self._pending:
            chunk, self._pending = self._pending + chunk, b""
        self.read_bytes += len(chunk)
        if self._progress is not None:
            self._progress(len(chunk))
        return chunk


def _scan_head(name: str) -> dict[str, str | None]:
    """Check the file is a HAR object with log.entries; return version/creator/browser."""
    with open(name, "rb") as fh:
        start = fh.read(64).removeprefix(UTF8_BOM).lstrip()
        if not start:
            raise ImportError_(f"{name}: empty file, not a HAR")
        if not start.startswith(b"{"):
            snippet = start[:24].decode("utf-8", "replace").split("\n")[0]
            hint = " (a JSONP/HARP wrapper?)" if b"(" in start[:40] else ""
            raise ImportError_(f"{name}: not a HAR file: does not start with a JSON object but {snippet!r}{hint}")
        fh.seek(0)
        return _walk_head(name, _CountingReader(fh, None))


def _walk_head(name: str, reader: _CountingReader) -> dict[str, Any]:
    found: dict[str, Any] = {}
    top_keys: list[str] = []
    for prefix, event, value in ijson.parse(reader, use_float=True):
        if reader.read_bytes > HEAD_SCAN_LIMIT:
            break
        if prefix == "" and event == "map_key":
            top_keys.append(value)
        elif prefix == "log" and event == "start_array":
            raise ImportError_(f"{name}: not a HAR file: \"log\" is an array, not an object")
        elif prefix == "log.entries":
            if event == "start_array":
                return found
            raise ImportError_(f"{name}: not a HAR file: \"log.entries\" is not an array")
        elif prefix in ("log.version", "log.creator.name", "log.creator.version", "log.browser.name", "log.browser.version"):
            if event in ("string", "number"):
                found[prefix] = str(value)
    if "log" not in top_keys:
        keys = ", ".join(top_keys[:5]) or "none"
        raise ImportError_(f"{name}: not a HAR file: no top-level \"log\" object (top-level keys: {keys})")
    raise ImportError_(f"{name}: not a HAR file: \"log\" has no \"entries\" array")


class _HarEntries:
    """Iterates the entries of one HAR file as Exchanges, counting quirks as warnings."""

    def __init__(self, name: str, capture_id: int, key: bytes, options: CaptureOptions, progress: Progress | None):
        self.name = name
        self.capture_id = capture_id
        self.key = key
        self.options = options
        self.progress = progress
        self.warnings = 0
        self.sha256: str | None = None

    def __iter__(self) -> Iterator[Exchange]:
        with open(self.name, "rb") as fh:
            reader = _CountingReader(fh, self.progress)
            for index, entry in enumerate(ijson.items(reader, "log.entries.item", use_float=True)):
                if not isinstance(entry, dict):
                    raise ImportError_(f"{self.name}: entry {index} is not an object")
                yield self.convert(index, entry)
            self.sha256 = reader.sha.hexdigest()

    def convert(self, index: int, entry: dict) -> Exchange:
        request = _as_dict(entry.get("request"))
        response = _as_dict(entry.get("response"))
        req_headers, req_h = _protected_headers(request.get("headers"), self.key)
        resp_headers, resp_h = _protected_headers(response.get("headers"), self.key)
        url = protect_url(str(request.get("url") or ""), self.key)
        started = self._timestamp(entry.get("startedDateTime"))
        ex = Exchange(
            capture_id=self.capture_id,
            seq=index,
            method=str(request.get("method") or "GET").upper(),
            url=url,
            url_norm=self._normalize(url),
            started_at=started,
            response_started_at=_response_start(started, entry.get("timings")),
            client=_client(self.capture_id, entry.get("pageref")),
            connection=_text(entry.get("connection")),
            http_version=_text(request.get("httpVersion")),
            request_headers=req_headers,
            response_headers=resp_headers,
            user_agent=req_h.get("user-agent"),
            idempotency_key=next(filter(None, (req_h.get(h) for h in IDEMPOTENCY_HEADERS)), None),
            from_cache=bool(entry.get("_fromCache")),
        )
        ex.request_body = self._request_body(request, req_h)
        self._fill_response(ex, entry, response, resp_h)
        return ex

    def _normalize(self, url: str) -> str:
        try:
            return normalize_url(url)
        except BadURL:
            self.warnings += 1
            return url

    def _timestamp(self, value: Any) -> float | None:
        if not isinstance(value, str) or not value:
            return None
        try:
            moment = datetime.fromisoformat(value.strip())
        except ValueError:
            self.warnings += 1
            return None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.timestamp()

    def _request_body(self, request: dict, headers: dict[str, str]) -> Body:
        content_type = headers.get("content-type")
        post = request.get("postData")
        if isinstance(post, dict):
            content_type = content_type or _text(post.get("mimeType")) or None
            raw = self._post_bytes(post)
            if raw is not None:
                return summarize_body(raw, content_type, self.options)
        # No postData: the exporter did not show us the body. Length may still be known.
        declared = _int(request.get("bodySize"))
        length = _int(headers.get("content-length"))
        if length is None and declared is not None and declared > 0:
            length = declared
        if length == 0:
            return Body(length=0, sha256=EMPTY_SHA256, content_type=content_type)
        return Body(length=length, content_type=content_type)

    def _post_bytes(self, post: dict) -> bytes | None:
        text = post.get("text")
        if isinstance(text, str) and text:
            if str(post.get("encoding") or "").lower() == "base64":
                try:
                    return base64.b64decode(text, validate=False)
                except (binascii.Error, ValueError):
                    self.warnings += 1
            return text.encode("utf-8", "surrogatepass")
        params = post.get("params")
        if isinstance(params, list) and params:
            # Charles and others give only the parsed fields; hash a canonical form of them.
            pairs = [f"{_as_dict(p).get('name', '')}={_as_dict(p).get('value', '')}" for p in params]
            return "&".join(pairs).encode("utf-8", "surrogatepass")
        return b""

    def _fill_response(self, ex: Exchange, entry: dict, response: dict, headers: dict[str, str]) -> None:
        status = _int(response.get("status"))
        if not status or status < 100:
            ex.error = _text(entry.get("_error")) or _text(response.get("_error")) or "no response"
            return
        ex.status = status
        ex.status_text = _text(response.get("statusText"))
        content = _as_dict(response.get("content"))
        ex.response_body = self._response_body(content, headers.get("content-type"))
        location = headers.get("location") or _text(response.get("redirectURL")) or None
        if location is not None:
            ex.location = protect_url(location, self.key)
        ex.synthetic = status == 307 and (
            (ex.status_text or "").lower() == "internal redirect" or SYNTHETIC_REASON in headers
        )
        if ex.is_redirect and ex.location is not None:
            try:
                ex.location_resolved = resolve_location(ex.url, ex.location)
            except BadURL as exc:
                ex.location_error = str(exc)

    def _response_body(self, content: dict, content_type: str | None) -> Body:
        content_type = content_type or _text(content.get("mimeType")) or None
        text = content.get("text")
        if isinstance(text, str) and text:
            raw = self._post_bytes({"text": text, "encoding": content.get("encoding")}) or b""
            return summarize_body(raw, content_type, self.options)
        size = _int(content.get("size"))
        return Body(length=size if size is not None and size >= 0 else None, content_type=content_type)


def _as_dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _protected_headers(value: Any, key: bytes) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """Headers as stored (credentials fingerprinted) plus a lower-case lookup of first values."""
    if not isinstance(value, list):
        return [], {}
    pairs = protect_headers(
        [(str(h.get("name", "")), str(h.get("value", ""))) for h in value if isinstance(h, dict)], key
    )
    lookup: dict[str, str] = {}
    for name, val in pairs:
        lookup.setdefault(name.lower(), val)
    return pairs, lookup


def _client(capture_id: int, pageref: Any) -> str:
    """HAR entries of one file and one page (tab) come from one client."""
    return f"har:{capture_id}/{pageref}" if pageref else f"har:{capture_id}"


def _response_start(started: float | None, timings: Any) -> float | None:
    if started is None or not isinstance(timings, dict):
        return started
    spent = 0.0
    for phase in TIMING_PHASES:
        value = timings.get(phase)
        if isinstance(value, int | float) and value > 0:
            spent += value
    return started + spent / 1000.0
