"""Cut the `log.entries` array of a HAR file into blocks of whole entries, fast.

ijson walks a file event by event at about 100 MB/s; msgspec parses a block of bytes
several times faster but needs to know where whole values start and end. This module
finds those places without a byte-by-byte scan:

* the offset of the entries array comes from a tokenizer over the (small) head;
* a block ends at a `}` followed by `,` and the start of an object whose first key is
  one an entry can have (`startedDateTime`, `request`, `_initiator`...);
* every block is checked by parsing it: ``[`` + block + ``]`` is valid JSON exactly
  when the block is a run of whole array elements. A cut inside a string or inside a
  nested array cannot pass, so a lucky-looking candidate is never trusted unverified;
* what follows the array is checked too, so a file truncated after the entries is
  still refused.

When something does not fit (no candidate verifies, msgspec refuses what a streaming
parser would accept), `Unsure` is raised and the importer falls back to ijson, which
either imports the file or names the real problem.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import IO

import ijson
import msgspec

from analyzer.ingest.jsonlimits import KeyWatch, Readable, checked_events

BLOCK = 1 << 20  # bytes of entries handed out at a time
READ = 4 << 20
MAX_BLOCK = 64 << 20  # an entry larger than this is left to the streaming parser
TRIES = 6  # candidates verified per block before giving up
TAIL = 64 << 10  # a block's cut is looked for in its last TAIL bytes first

_ENTRY_KEYS = 'pageref|startedDateTime|time|request|response|cache|timings|serverIPAddress|connection|comment|_[^"\\\\]*'
ENTRY_BREAK = re.compile(rb'\}\s*,\s*(?=\{\s*"(?:' + _ENTRY_KEYS.encode() + rb')"\s*:)')
ARRAY_END = re.compile(rb"\}\s*\]")
_HEAD_TOKEN = re.compile(rb'\s*(?:("(?:[^"\\]|\\.)*")|([{}\[\]:,])|([^\s{}\[\]:,"]+))')
_WS = re.compile(rb"\s*")


class Unsure(Exception):
    """The fast path cannot vouch for this file; use the streaming parser."""


def entries_offset(fh: IO[bytes], limit: int) -> int:
    """Offset just after the `[` that opens log.entries (the head is known to be valid)."""
    size = 64 << 10
    while True:
        fh.seek(0)
        buf = fh.read(size)
        found = _scan_head(buf, at_eof=len(buf) < size)
        if found is not None:
            return found
        if len(buf) < size or size >= limit:
            raise Unsure("log.entries not found by the head tokenizer")
        size *= 4


def _scan_head(buf: bytes, at_eof: bool) -> int | None:
    pos = 3 if buf.startswith(b"\xef\xbb\xbf") else 0
    stack: list[tuple[str | None, bool]] = []  # (key it was opened under, is it an object)
    key: str | None = None
    expect_key = False
    while True:
        m = _HEAD_TOKEN.match(buf, pos)
        if m is None or (m.end() == len(buf) and not at_eof):
            return None
        pos = m.end()
        string, punct = m[1], m[2]
        if string is not None:
            if expect_key:
                key = string[1:-1].decode("utf-8", "replace")
                expect_key = False
        elif punct in (b"{", b"["):
            if punct == b"[" and key == "entries" and [k for k, _ in stack] == [None, "log"]:
                return pos
            stack.append((key, punct == b"{"))
            key = None
            expect_key = punct == b"{"
        elif punct in (b"}", b"]"):
            if not stack:
                return None
            stack.pop()
            expect_key = False
        elif punct == b",":
            expect_key = bool(stack) and stack[-1][1]


class Blocks:
    """Iterates (first_index, block_bytes, count, file_offset) over the entries array.

    `reader` is positioned just after the `[`, at file offset `offset`, and is read
    sequentially to the end.
    """

    def __init__(self, reader: Readable, offset: int, block: int = BLOCK, name: str = "the file") -> None:
        self.reader = reader
        self.offset = offset
        self.block = block
        self.name = name  # in messages

    def __iter__(self) -> Iterator[tuple[int, bytes, int, int]]:
        fh = self.reader
        base = self.offset  # file offset of buf[0]
        buf = b""
        pos = 0
        eof = False
        index = 0

        def more() -> bool:
            nonlocal buf, pos, eof, base
            if eof:
                return False
            chunk = fh.read(READ)
            if not chunk:
                eof = True
                return False
            base += pos
            buf = buf[pos:] + chunk
            pos = 0
            return True

        while True:
            pos = _skip_space(buf, pos)
            while pos >= len(buf) and more():
                pos = _skip_space(buf, pos)
            if pos >= len(buf):
                raise Unsure("file ends inside log.entries")
            if buf[pos] == 0x5D:  # "]": the array is over
                self._check_tail(buf[pos + 1 :], fh)
                return
            if buf[pos] != 0x7B:  # "{"
                raise Unsure("an entry that is not an object")
            span = self.block
            while True:
                cut = self._cut(buf, pos, span, eof)
                if cut is not None:
                    end, nxt, entries = cut
                    yield index, buf[pos:end], entries, base + pos
                    index += entries
                    pos = nxt
                    break
                if len(buf) - pos <= span and not eof:
                    more()  # reads on, or learns that the file is over
                    continue
                if eof and len(buf) - pos <= span:
                    raise Unsure("no verifiable entry boundary")
                if span >= MAX_BLOCK:
                    raise Unsure("an entry larger than the block limit")
                span *= 2

    def _cut(self, buf: bytes, pos: int, span: int, eof: bool) -> tuple[int, int, int] | None:
        """(end of block, start of next, entry count) for a verified cut, or None."""
        limit = min(len(buf), pos + span)
        lo = max(pos, limit - TAIL)
        while True:
            breaks = list(ENTRY_BREAK.finditer(buf, lo, limit))
            if len(breaks) >= TRIES or lo == pos:
                break
            lo = max(pos, lo - 4 * (limit - lo))
        for m in reversed(breaks[-TRIES:]):
            count = _count_entries(buf[pos : m.start() + 1])
            if count:
                return m.start() + 1, m.end(), count
        if eof and len(buf) - pos <= span:
            ends = list(ARRAY_END.finditer(buf, max(pos, len(buf) - TAIL)))
            for m in reversed(ends[-TRIES:]):
                count = _count_entries(buf[pos : m.start() + 1])
                if count:
                    return m.start() + 1, m.end() - 1, count
        return None

    def _check_tail(self, rest: bytes, fh: Readable) -> None:
        """What follows the array must close log and the root object, as JSON (within the
        depth limit, without a second `entries` in log or a second `log`)."""
        keys: dict[int, str] = {}
        watch = KeyWatch(self.name)
        try:
            for event, value, depth in checked_events(_Chain(b'{"log":{"entries":[]' + rest, fh), self.name):
                if event == "map_key":
                    keys[depth] = value
                    watch.key(depth, value, keys.get(1))
        except ijson.JSONError as exc:
            raise Unsure(f"after log.entries: {exc}") from None


_RAW_LIST = msgspec.json.Decoder(list[msgspec.Raw])  # validates without building objects


def _skip_space(buf: bytes, pos: int) -> int:
    """The first position at or after `pos` that is not JSON whitespace."""
    found = _WS.match(buf, pos)
    return found.end() if found is not None else pos  # the pattern matches the empty string too


def _count_entries(block: bytes) -> int:
    try:
        return len(_RAW_LIST.decode(b"[" + block + b"]"))
    except msgspec.DecodeError:
        return 0
    except RecursionError:  # deeper than msgspec goes: the streaming reader names the depth
        raise Unsure("nested too deep for the block parser") from None


class _Chain:
    """A read() over some bytes followed by the rest of a file."""

    def __init__(self, first: bytes, fh: Readable) -> None:
        self.first = first
        self.fh = fh

    def read(self, size: int = -1) -> bytes:
        if size == 0:
            return b""
        if self.first:
            out, self.first = self.first, b""
            return out
        return self.fh.read(size)
