"""HAR 1.1/1.2 import, streamed: memory stays flat however large the file.

The file is read twice: a short head scan up to `log.entries` (version, creator,
browser) and then the entries one by one through ijson's C backend. Everything a
file adds happens in one transaction, so a file that turns out broken halfway
leaves nothing behind.
"""

from __future__ import annotations

import base64
import binascii
import gc
import hashlib
import multiprocessing
import os
import signal
import threading
from collections import deque
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import IO, Any

import ijson
import msgspec
from sqlalchemy.engine import Connection

from analyzer.forking import start_method
from analyzer.gcpause import cycle_collection_paused
from analyzer.ingest.common import (
    IDEMPOTENCY_HEADERS,
    MAX_HEADER_CHARS,
    MAX_HEADERS,
    MAX_URL,
    AlreadyImported,
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
from analyzer.ingest.harsplit import BLOCK, Blocks, Unsure, entries_offset
from analyzer.ingest.jsonlimits import MAX_DEPTH, KeyWatch, checked_events
from analyzer.model import Body, Exchange
from analyzer.secrets import protect_header_value, protect_url
from analyzer.store import (
    EXCHANGE_COLUMNS,
    STATISTICS_AFTER,
    Store,
    add_capture,
    drop_exchanges,
    exchange_row,
    finish_capture,
    refresh_statistics,
    write_exchange_blocks,
    write_exchanges,
)
from analyzer.storeread import Row, ValueRefused
from analyzer.urls import BadURL, normalize_url, resolve_location

UTF8_BOM = b"\xef\xbb\xbf"
HEAD_SCAN_LIMIT = 64 * 1024 * 1024  # bytes of metadata we accept before log.entries
SYNTHETIC_REASON = "non-authoritative-reason"  # Chrome's header on its internal redirects
PARALLEL_MIN_BYTES = 16 << 20  # smaller files are converted in-process
WORKERS_ENV = "REDIRECT_AUDIT_IMPORT_WORKERS"

Progress = Callable[[int], None]


class _Header(msgspec.Struct, gc=False):
    name: Any = ""
    value: Any = ""


class _PostData(msgspec.Struct, gc=False):
    mimeType: Any = None
    text: Any = None
    encoding: Any = None
    params: Any = None


class _Request(msgspec.Struct, gc=False):
    method: Any = None
    url: Any = None
    httpVersion: Any = None
    headers: list[_Header] | None = None
    postData: _PostData | None = None
    bodySize: Any = None


class _Content(msgspec.Struct, gc=False):
    mimeType: Any = None
    text: Any = None
    encoding: Any = None
    size: Any = None


class _Response(msgspec.Struct, gc=False):
    status: Any = None
    statusText: Any = None
    headers: list[_Header] | None = None
    content: _Content | None = None
    redirectURL: Any = None
    error: Any = msgspec.field(default=None, name="_error")


class _Timings(msgspec.Struct, gc=False):
    blocked: Any = None
    dns: Any = None
    connect: Any = None  # ssl is inside connect (HAR 1.2)
    send: Any = None
    wait: Any = None


class _Entry(msgspec.Struct, gc=False):
    """The part of a HAR entry the importer reads. Scalars are `Any` (exporters put
    anything there and the converter copes); only the containers are typed, so that
    msgspec builds no dicts and skips what is not read (cookies, queryString, cache)."""

    pageref: Any = None
    startedDateTime: Any = None
    request: _Request | None = None
    response: _Response | None = None
    timings: _Timings | None = None
    connection: Any = None
    fromCache: Any = msgspec.field(default=None, name="_fromCache")
    error: Any = msgspec.field(default=None, name="_error")


_NO_REQUEST = _Request()
_NO_RESPONSE = _Response()
_NO_CONTENT = _Content()
_ENTRIES = msgspec.json.Decoder(list[_Entry])
_ANY_JSON = msgspec.json.Decoder()


def _as_entry(entry: dict[str, Any]) -> _Entry:
    """An _Entry from a generic JSON object, with every container of the wrong type
    dropped (a string `request`, a header that is not an object...), as the converter
    has always read them."""
    request = _obj(entry.get("request"))
    if request is not None:
        request = {
            **request,
            "headers": _objects(request.get("headers")),
            "postData": _obj(request.get("postData")),
        }
    response = _obj(entry.get("response"))
    if response is not None:
        response = {
            **response,
            "headers": _objects(response.get("headers")),
            "content": _obj(response.get("content")),
        }
    shaped = {**entry, "request": request, "response": response, "timings": _obj(entry.get("timings"))}
    return msgspec.convert(shaped, _Entry)


def _obj(value: Any) -> dict[str, Any] | None:
    return value if type(value) is dict else None


def _objects(value: Any) -> list[dict[str, Any]] | None:
    return [v for v in value if type(v) is dict] if type(value) is list else None


def import_har(
    store: Store,
    path: str | os.PathLike[str],
    options: CaptureOptions = CaptureOptions(),
    progress: Progress | None = None,
    *,
    workers: int | None = None,
    block_size: int = BLOCK,
    fast: bool = True,
    force: bool = False,
    name: str | None = None,
    strict: bool = False,
) -> ImportResult:
    """Import one HAR file in one transaction; raise ImportError_ and store nothing if it is bad.

    Content the store already holds (by SHA-256, whatever the file is called) raises
    AlreadyImported unless `force`. Entries are cut into blocks of whole entries and
    converted by `workers` processes (default: one per CPU, at most 4, for files over
    16 MB; none for smaller ones). A file whose blocks cannot all be verified is read
    again by the streaming parser instead; `fast=False` goes to it straight away.
    `name` is how the file is called in messages and in the store (default: its path).

    A file cut off or damaged after its entries began (a browser or an upload limit
    truncates exports) keeps the complete entries before the damage: the capture is
    marked damaged (`captures.damage`, and `ImportResult.damage` says where it broke and
    what was kept). With `strict`, such a file is refused like any other bad file.
    """
    name = name or str(path)
    path = str(path)
    try:
        head = _scan_head(path, name)
        sha256 = file_sha256(path)
        if not force:
            with store.begin() as conn:
                refuse_reimport(conn, name, sha256)
        with cycle_collection_paused(), store.begin() as conn:
            capture_id = add_capture(
                conn,
                source="har",
                path=name if name != path else str(Path(path).resolve()),
                sha256=sha256,
                creator=_named(head, "log.creator"),
                browser=_named(head, "log.browser"),
                format_version=head.get("log.version"),
            )
            count, warnings, damage = _import_entries(
                conn,
                path,
                name,
                capture_id,
                store.secret_key,
                options,
                progress,
                _worker_count(path, workers),
                block_size,
                fast,
                strict,
            )
            if not force:  # another process may have imported the same file meanwhile
                refuse_reimport(conn, name, sha256, capture_id)
            finish_capture(conn, capture_id, entries=count, warnings=warnings, damage=damage)
            if count >= STATISTICS_AFTER:
                refresh_statistics(conn, "exchanges", "captures")
            odd = dates_out_of_range(conn, capture_id)
    except (ImportError_, AlreadyImported):
        raise
    except ValueRefused as exc:
        raise ImportError_(f"{name}: {_entry_of(exc)}{exc}") from None
    except (ijson.JSONError, ijson.IncompleteJSONError) as exc:
        raise ImportError_(f"{name}: not valid JSON: {_one_line(exc)}") from None
    except UnicodeDecodeError as exc:
        raise ImportError_(
            f"{name}: a string in it is not valid UTF-8 ({exc.reason}): raw bytes that are not "
            f"UTF-8, or an escaped lone surrogate such as \\ud800"
        ) from None
    except OSError as exc:
        raise ImportError_(f"{name}: cannot read: {exc.strerror or exc}") from None
    return ImportResult(name, capture_id, count, warnings, odd, damage)


def _import_entries(
    conn: Connection,
    path: str,
    name: str,
    capture_id: int,
    key: bytes,
    options: CaptureOptions,
    progress: Progress | None,
    workers: int,
    block_size: int,
    fast: bool,
    strict: bool = False,
) -> tuple[int, int, str | None]:
    """Write a file's entries as exchanges of a capture; (entries, warnings, damage)."""
    converter = _HarEntries(name, path, capture_id, key, options)
    fast_reader = _FastImport(converter, progress, workers, block_size)
    try:
        if not fast:
            raise Unsure("streaming parser asked for")
        with closing(fast_reader.blocks()) as blocks:  # closed at once on failure: its workers stop
            count = write_exchange_blocks(conn, blocks)
        return count, fast_reader.warnings, None
    except Unsure:
        # Start over with the streaming parser; it imports the file or names the problem.
        drop_exchanges(conn, capture_id)
        if progress is not None:
            progress(-fast_reader.read_bytes)
        converter = _HarEntries(name, path, capture_id, key, options)
        reader = _StreamImport(converter, progress, salvage=not strict)
        count = write_exchanges(conn, reader)
    return count, reader.warnings, reader.damage


def _entry_of(exc: ValueRefused) -> str:
    if exc.row is None:
        return ""
    return f"entry {exc.row[EXCHANGE_COLUMNS.index('seq')]}: "


def _worker_count(name: str, workers: int | None) -> int:
    if workers is None and os.environ.get(WORKERS_ENV):
        workers = int(os.environ[WORKERS_ENV])
    if workers is not None:
        return max(0, workers)
    cpus = os.cpu_count() or 1
    if os.path.getsize(name) < PARALLEL_MIN_BYTES or cpus == 1:
        return 0
    # This process is busy too (reading, verifying, inserting), but one worker per CPU
    # still wins: on 2 cores, 2 workers beat 1 in 6 of 8 alternated runs of
    # benchmarks/bench_import.py, though they spend 15-30% more CPU in all.
    return min(cpus, 4)


class _FastImport:
    """Rows from verified blocks of entries, converted in-process or by worker processes,
    handed on a block at a time: generator steps per row cost this process, the
    busiest one, 400,000 Python calls per 100,000 entries (cProfile)."""

    def __init__(self, converter: _HarEntries, progress: Progress | None, workers: int, block: int):
        self.path = converter.path
        self.converter = converter
        self.progress = progress
        self.workers = workers
        self.block = block
        self.warnings = 0
        self.read_bytes = 0

    def blocks(self) -> Generator[list[Row]]:
        with open(self.path, "rb") as fh:
            start = entries_offset(fh, HEAD_SCAN_LIMIT)
            fh.seek(0)
            reader = _CountingReader(fh, self.progress, skip_bom=False)
            try:
                reader.read(start)
                blocks = iter(Blocks(reader, start, self.block, self.converter.name))
                if self.workers:
                    yield from self._parallel(blocks)
                else:
                    for first, block, _, _ in blocks:
                        rows, warnings = self.converter.convert_block(first, block)
                        self.warnings += warnings
                        yield rows
            finally:
                self.read_bytes = reader.read_bytes

    def _parallel(self, blocks: Iterator[tuple[int, bytes, int, int]]) -> Iterator[list[Row]]:
        """Workers read their blocks from the file themselves: only offsets cross the pipe."""
        # fork starts workers at once and shares the imported code; it is only safe
        # while this process has no other thread (a lock held by one would be copied).
        context: BaseContext
        if start_method() == "fork":
            context = multiprocessing.get_context("fork")
        else:
            context = server = multiprocessing.get_context("forkserver")
            server.set_forkserver_preload([__name__])
        conv = self.converter
        with ProcessPoolExecutor(
            self.workers,
            mp_context=context,
            initializer=_init_worker,
            initargs=(conv.name, conv.path, conv.capture_id, conv.key, conv.options),
        ) as pool:
            pending: deque[Future[tuple[bytes | list[Row], int]]] = deque()
            try:
                for first, block, _, offset in blocks:
                    with _sigint_held():  # the first submit forks the workers: they must not get Ctrl-C
                        pending.append(pool.submit(_convert_in_worker, first, offset, len(block)))
                    if len(pending) > 2 * self.workers:
                        yield self._collect(pending.popleft())
                while pending:
                    yield self._collect(pending.popleft())
            finally:
                # On Ctrl-C, a failure or the consumer giving up (GeneratorExit), what was not
                # started is cancelled and the pool waits for the blocks in hand (a fraction of
                # a second). The workers are not killed: one killed while writing its result
                # leaves half a message in the pipe, and the pool's reader waits for the rest
                # forever (seen: 1 Ctrl-C in 60 hung that way).
                for future in pending:
                    future.cancel()

    def _collect(self, future: Future[tuple[bytes | list[Row], int]]) -> list[Row]:
        rows, warnings = future.result()
        self.warnings += warnings
        return _ROWS.decode(rows) if isinstance(rows, bytes) else rows


_worker_converter: _HarEntries | None = None


@contextmanager
def _sigint_held() -> Iterator[None]:
    """SIGINT blocked on this thread for a moment: a worker forked meanwhile starts with it
    blocked too, until _init_worker has set it to be ignored. Ctrl-C reaches the whole
    process group; the import's own process answers it, and a worker that got it too
    would print a traceback of its own. A Ctrl-C that comes meanwhile is delivered after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _init_worker(name: str, path: str, capture_id: int, key: bytes, options: CaptureOptions) -> None:
    global _worker_converter
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # see _sigint_held
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    gc.disable()  # see analyzer.gcpause; a worker lives only for one import
    _worker_converter = _HarEntries(name, path, capture_id, key, options)


def _convert_in_worker(first: int, offset: int, length: int) -> tuple[bytes | list[Row], int]:
    """Rows for one block, as MessagePack: half the CPU of pickling them, on both sides."""
    assert _worker_converter is not None
    with open(_worker_converter.path, "rb") as fh:
        block = os.pread(fh.fileno(), length, offset)
    if len(block) != length:
        raise ImportError_(f"{_worker_converter.name}: the file changed while it was being imported")
    rows, warnings = _worker_converter.convert_block(first, block)
    try:
        return _ROWS_OUT.encode(rows), warnings
    except (UnicodeEncodeError, msgspec.EncodeError):  # a lone surrogate: pickle carries it
        return rows, warnings


_ROWS_OUT = msgspec.msgpack.Encoder()
_ROWS = msgspec.msgpack.Decoder(list[tuple[Any, ...]])


class _StreamImport:
    """Rows from the entries as ijson streams them: slower, but takes any valid JSON. With
    `salvage`, JSON that breaks off or is damaged once the entries began ends the entries
    there (`damage` says where); before them, it is an error."""

    def __init__(self, converter: _HarEntries, progress: Progress | None, salvage: bool = False):
        self.converter = converter
        self.progress = progress
        self.salvage = salvage
        self.damage: str | None = None

    @property
    def warnings(self) -> int:
        return self.converter.warnings

    def __iter__(self) -> Iterator[Row]:
        with open(self.converter.path, "rb") as fh:
            reader = _CountingReader(fh, self.progress)
            where = _Where()
            kept = 0
            try:
                for index, entry in enumerate(_entry_values(reader, self.converter.name, where)):
                    yield exchange_row(self.converter.convert(index, self.converter.checked(index, entry)))
                    kept = index + 1
            except (ijson.JSONError, ijson.IncompleteJSONError) as exc:
                # Nothing to keep (the damage is before any complete entry), or JSON that is
                # not damaged but holds what no parser here can (a number past a double):
                # refused as before.
                if not where.entries_began or kept == 0 or "overflow" in _one_line(exc):
                    raise
                # cut off: the parser failed once told the file had ended, not on bytes it read
                at_end = reader.at_eof
                where_, kept_ = _damage(exc, reader, at_end, kept, where.entries_ended)
                if not self.salvage:
                    raise ImportError_(
                        f"{self.converter.name}: {where_}: refused (--strict); without --strict the "
                        f"{kept_} before the damage are imported"
                    ) from None
                self.damage = f"{where_}; the {kept_} before it were imported"


@dataclass
class _Where:
    """How far the streaming parser got in the document's structure."""

    entries_began: bool = False
    entries_ended: bool = False


def _damage(
    exc: BaseException, reader: _CountingReader, at_end: bool, kept: int, ended: bool
) -> tuple[str, str]:
    """(where a file broke off or was damaged, the complete entries before it), in words."""
    place = "after its entries" if ended else f"in entry {kept} (0-based)"
    if at_end:  # the parser read to the end of the file: cut off there
        where = f"the file ends at byte {reader.read_bytes:,}, {place}, before its JSON is complete"
    else:
        where = (
            f"the file is damaged {place}, within its first {reader.read_bytes:,} bytes ({_one_line(exc)})"
        )
    return where, f"{kept:,} complete {'entry' if kept == 1 else 'entries'}"


def _one_line(exc: BaseException) -> str:
    """An exception's message in one line of words: a parser that gives its message as
    bytes (yajl's `b'lexical error: ...'`) is decoded, not shown as a Python repr."""
    first = exc.args[0] if len(exc.args) == 1 else None
    message = first.decode("utf-8", "replace") if isinstance(first, bytes | bytearray) else str(exc)
    text = message.strip().splitlines()
    return text[0].strip() if text else type(exc).__name__


class _CountingReader:
    """File wrapper that skips a UTF-8 BOM and reports progress."""

    def __init__(self, fh: IO[bytes], progress: Progress | None, skip_bom: bool = True) -> None:
        self._fh = fh
        self._progress = progress
        self.read_bytes = 0
        self.at_eof = False
        self._pending = b""
        if skip_bom:
            first = fh.read(3)
            self._pending = b"" if first == UTF8_BOM else first

    def read(self, size: int = -1) -> bytes:
        if size == 0:  # ijson probes the stream type with read(0)
            return b""
        chunk = self._fh.read(size)
        if self._pending:
            chunk, self._pending = self._pending + chunk, b""
        if not chunk:
            self.at_eof = True  # the parser has been told the file ended
        self.read_bytes += len(chunk)
        if self._progress is not None:
            self._progress(len(chunk))
        return chunk


def _scan_head(path: str, name: str) -> dict[str, str | None]:
    """Check the file is a HAR object with log.entries; return version/creator/browser."""
    with open(path, "rb") as fh:
        start = fh.read(64).removeprefix(UTF8_BOM).lstrip()
        if not start:
            raise ImportError_(f"{name}: empty file, not a HAR")
        if not start.startswith(b"{"):
            snippet = start[:24].decode("utf-8", "replace").split("\n")[0]
            hint = " (a JSONP/HARP wrapper?)" if b"(" in start[:40] else ""
            raise ImportError_(
                f"{name}: not a HAR file: does not start with a JSON object but {snippet!r}{hint}"
            )
        fh.seek(0)
        return _walk_head(name, _CountingReader(fh, None))


def _named(head: dict[str, Any], where: str) -> str | None:
    """`log.creator` or `log.browser` as "name version" (None when the file names neither)."""
    text = " ".join(v for v in (head.get(f"{where}.name"), head.get(f"{where}.version")) if v)
    return text or None


_HEAD_FIELDS: dict[tuple[str | None, ...], str] = {
    ("log", "version"): "log.version",
    ("log", "creator", "name"): "log.creator.name",
    ("log", "creator", "version"): "log.creator.version",
    ("log", "browser", "name"): "log.browser.name",
    ("log", "browser", "version"): "log.browser.version",
}
_SCALARS = frozenset({"string", "number", "boolean", "null"})


class _Path:
    """The keys that lead to the value being read, from ijson's basic events."""

    def __init__(self, name: str):
        self.keys: list[str | None] = [None] * (MAX_DEPTH + 2)
        self.watch = KeyWatch(name)

    def see(self, event: str, value: Any, depth: int) -> None:
        if event == "map_key":
            self.keys[depth] = value
            self.watch.key(depth, value, self.keys[1])
        elif event in ("start_map", "start_array"):
            self.keys[depth] = None  # until the object's first key; an array's items have none

    def to(self, depth: int) -> tuple[str | None, ...]:
        """The keys leading to a value at `depth` (a container opened there, or a scalar in it)."""
        return tuple(self.keys[1:depth])


def _walk_head(name: str, reader: _CountingReader) -> dict[str, Any]:
    found: dict[str, Any] = {}
    top_keys: list[str] = []
    path = _Path(name)
    for event, value, depth in checked_events(reader, name):
        if reader.read_bytes > HEAD_SCAN_LIMIT:
            raise ImportError_(
                f"{name}: no log.entries array in its first {HEAD_SCAN_LIMIT >> 20} MB: metadata that "
                "large is not a HAR file's"
            )
        path.see(event, value, depth)
        if event == "map_key":
            if depth == 1:
                top_keys.append(value)
            continue
        if event in _SCALARS:
            where = path.to(depth + 1)
            if where == ("log", "entries"):
                raise ImportError_(f'{name}: not a HAR file: "log.entries" is not an array')
            if where in _HEAD_FIELDS and event in ("string", "number"):
                found[_HEAD_FIELDS[where]] = str(value)
        elif event in ("start_map", "start_array"):
            where = path.to(depth)
            if where == ("log",) and event == "start_array":
                raise ImportError_(f'{name}: not a HAR file: "log" is an array, not an object')
            if where == ("log", "entries"):
                if event == "start_array":
                    return found
                raise ImportError_(f'{name}: not a HAR file: "log.entries" is not an array')
    if "log" not in top_keys:
        keys = ", ".join(top_keys[:5]) or "none"
        raise ImportError_(f'{name}: not a HAR file: no top-level "log" object (top-level keys: {keys})')
    raise ImportError_(f'{name}: not a HAR file: "log" has no "entries" array')


def _entry_values(reader: _CountingReader, name: str, where: _Where | None = None) -> Iterator[Any]:
    """Each element of log.entries, built from ijson's basic events as they stream (depth
    checked, repeated `log`/`entries` refused); the rest of the document is read through
    to its end, so a file truncated after the entries is refused too."""
    path = _Path(name)
    builder: ijson.ObjectBuilder | None = None
    in_entries = False
    for event, value, depth in checked_events(reader, name):
        if builder is not None:
            builder.event(event, value)
            if depth == 3 and event in ("end_map", "end_array"):
                yield builder.value
                builder = None
            continue
        path.see(event, value, depth)
        if in_entries:
            if depth == 2:  # the array closed
                in_entries = False
                if where is not None:
                    where.entries_ended = True
            elif event in ("start_map", "start_array"):
                builder = ijson.ObjectBuilder()
                builder.event(event, value)
            else:
                yield value  # a scalar entry: the converter names it
        elif event == "start_array" and depth == 3 and path.to(3) == ("log", "entries"):
            in_entries = True
            if where is not None:
                where.entries_began = True


PAGEREF_KEPT = (
    200  # characters of a pageref kept in the client id; longer ones are shortened, told apart by a digest
)


class _HarEntries:
    """Turns the entries of one HAR file into Exchanges, counting quirks as warnings."""

    def __init__(self, name: str, path: str, capture_id: int, key: bytes, options: CaptureOptions):
        self.name = name  # in messages
        self.path = path  # to read
        self.capture_id = capture_id
        self.key = key
        self.options = options
        self.policy = options.policy
        self.warnings = 0
        self._client_ids: dict[Any, str] = {}

    def convert_block(self, first: int, block: bytes) -> tuple[list[Row], int]:
        """Rows for a verified block of entries, and the warnings it raised."""
        before = self.warnings
        data = b"[" + block + b"]"
        try:
            try:
                entries = _ENTRIES.decode(data)
            except msgspec.ValidationError:  # a container of the wrong type somewhere in the block
                entries = [self.checked(first + i, entry) for i, entry in enumerate(_ANY_JSON.decode(data))]
        except msgspec.DecodeError as exc:  # valid JSON msgspec will not build (1e400)
            raise Unsure(str(exc)) from None
        except RecursionError:  # nested deeper than msgspec goes: the streaming reader names the depth
            raise Unsure("nested too deep for the block parser") from None
        rows = [exchange_row(self.convert(first + i, entry)) for i, entry in enumerate(entries)]
        return rows, self.warnings - before

    def checked(self, index: int, entry: Any) -> _Entry:
        """The typed form of an entry that came out of a generic JSON parser."""
        if not isinstance(entry, dict):
            raise ImportError_(f"{self.name}: entry {index} is not an object")
        try:
            return _as_entry(entry)
        except msgspec.ValidationError as exc:  # not expected: _as_entry drops what does not fit
            raise ImportError_(f"{self.name}: entry {index} cannot be read: {exc}") from None

    def convert(self, index: int, entry: _Entry) -> Exchange:
        request = entry.request or _NO_REQUEST
        response = entry.response or _NO_RESPONSE
        req_headers, req_h = self._headers(request.headers, index, "request")
        resp_headers, resp_h = self._headers(response.headers, index, "response")
        url = request.url
        if type(url) is not str:
            url = str(url or "")
        if len(url) > MAX_URL:
            raise ImportError_(f"{self.name}: entry {index}: {url_too_long(len(url))}")
        url = protect_url(url, self.key, self.policy)
        started = self._timestamp(entry.startedDateTime)
        method = request.method
        ex = Exchange(
            capture_id=self.capture_id,
            seq=index,
            method=method.upper() if type(method) is str and method else str(method or "GET").upper(),
            url=url,
            url_norm=self._normalize(url),
            started_at=started,
            response_started_at=_response_start(started, entry.timings),
            client=self._client(entry.pageref),
            connection=_text(entry.connection),
            http_version=_text(request.httpVersion),
            request_headers=req_headers,
            response_headers=resp_headers,
            user_agent=req_h.get("user-agent"),
            idempotency_key=req_h.get(IDEMPOTENCY_HEADERS[0]) or req_h.get(IDEMPOTENCY_HEADERS[1]) or None,
            from_cache=bool(entry.fromCache),
            request_body=self._request_body(request, req_h),
        )
        self._fill_response(ex, entry, response, resp_h)
        return ex

    def _headers(
        self, value: list[_Header] | None, index: int, side: str
    ) -> tuple[list[tuple[str, str]], dict[str, str]]:
        """Headers as stored (credentials fingerprinted) plus a lower-case lookup of first values.

        `secrets.protect_and_index` in one pass with the HAR clean-up (names and values
        as text): feeding it a cleaned list or a generator costs this, the importer's
        hottest loop, about a third more (measured). Headers past the limits (common.
        MAX_HEADERS, MAX_HEADER_CHARS) refuse the file, naming the entry.
        """
        pairs: list[tuple[str, str]] = []
        lookup: dict[str, str] = {}
        if not value:
            return pairs, lookup
        chars = 0
        for h in value:
            name = h.name
            val = h.value
            if type(name) is not str:
                name = str(name)
            if type(val) is not str:
                val = str(val)
            chars += len(name) + len(val)
            lname = name.lower()
            val = protect_header_value(lname, val, self.key, self.policy)
            pairs.append((name, val))
            if lname not in lookup:
                lookup[lname] = val
        if chars > MAX_HEADER_CHARS or len(pairs) > MAX_HEADERS:
            problem = headers_too_large(side, len(pairs), chars)
            raise ImportError_(f"{self.name}: entry {index}: {problem}")
        return pairs, lookup

    def _client(self, pageref: Any) -> str:
        """HAR entries of one file and one page (tab) come from one client."""
        try:
            return self._client_ids[pageref]
        except (KeyError, TypeError):
            page = str(pageref) if pageref else ""
            if len(page) > PAGEREF_KEPT:  # a client id is indexed: B-tree entries have a size limit
                page = f"{page[:64]}~{hashlib.sha256(page.encode('utf-8', 'surrogatepass')).hexdigest()[:16]}"
            client = f"har:{self.capture_id}/{page}" if page else f"har:{self.capture_id}"
            if isinstance(pageref, str | int | None):
                self._client_ids[pageref] = client
            return client

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

    def _request_body(self, request: _Request, headers: dict[str, str]) -> Body:
        content_type = headers.get("content-type")
        post = request.postData
        if post is not None:
            content_type = content_type or _text(post.mimeType) or None
            return summarize_body(self._post_bytes(post), content_type, self.options, self.key)
        # No postData: the exporter did not show us the body. Length may still be known.
        declared = _int(request.bodySize)
        length = _int(headers.get("content-length"))
        if length is None and declared is not None and declared > 0:
            length = declared
        if length == 0:
            return empty_body(self.key, content_type)
        return Body(length=length, content_type=content_type)

    def _post_bytes(self, post: _PostData) -> bytes:
        text = post.text
        if isinstance(text, str) and text:
            return self._text_bytes(text, post.encoding)
        params = post.params
        if isinstance(params, list) and params:
            # Charles and others give only the parsed fields; hash a canonical form of them.
            pairs = [f"{_as_dict(p).get('name', '')}={_as_dict(p).get('value', '')}" for p in params]
            return "&".join(pairs).encode("utf-8", "surrogatepass")
        return b""

    def _text_bytes(self, text: str, encoding: Any) -> bytes:
        """The bytes of a HAR `text` field, base64-decoded when `encoding` says so."""
        if str(encoding or "").lower() == "base64":
            try:
                return base64.b64decode(text, validate=False)
            except (binascii.Error, ValueError):
                self.warnings += 1
        return text.encode("utf-8", "surrogatepass")

    def _fill_response(
        self, ex: Exchange, entry: _Entry, response: _Response, headers: dict[str, str]
    ) -> None:
        status = _int(response.status)
        if not status or status < 100:
            ex.error = _text(entry.error) or _text(response.error) or "no response"
            return
        ex.status = status
        ex.status_text = _text(response.statusText)
        ex.response_body = self._response_body(response.content or _NO_CONTENT, headers.get("content-type"))
        location = headers.get("location") or _text(response.redirectURL) or None
        if location is not None:
            ex.location = protect_url(location, self.key, self.policy)
        ex.synthetic = status == 307 and (
            (ex.status_text or "").lower() == "internal redirect" or SYNTHETIC_REASON in headers
        )
        if ex.is_redirect and ex.location is not None:
            try:
                ex.location_resolved = resolve_location(ex.url, ex.location)
            except BadURL as exc:
                ex.location_error = str(exc)

    def _response_body(self, content: _Content, content_type: str | None) -> Body:
        content_type = content_type or _text(content.mimeType) or None
        text = content.text
        if isinstance(text, str) and text:
            return summarize_body(
                self._text_bytes(text, content.encoding), content_type, self.options, self.key
            )
        size = _int(content.size)
        return Body(length=size if size is not None and size >= 0 else None, content_type=content_type)


def _as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _int(value: Any) -> int | None:
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if -(2**63) <= number < 2**63 else None  # what a database column holds


def _response_start(started: float | None, timings: _Timings | None) -> float | None:
    if started is None or timings is None:
        return started
    spent = 0.0
    for value in (timings.blocked, timings.dns, timings.connect, timings.send, timings.wait):
        if isinstance(value, (int, float)) and value > 0:
            spent += value
    return started + spent / 1000.0
