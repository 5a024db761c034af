"""Limits on the JSON a HAR file may hold, enforced while it is read, before memory is spent.

* **Depth.** No value nested more than MAX_DEPTH levels (real HAR files stay under 20;
  Chrome's deepest, an initiator's async stack, under 25 in the corpus). The streaming
  reader counts levels from its events and refuses at once; its events carry no path
  (ijson's prefixed events grow with the square of the depth: 20k levels took a GB).
  The block parser (msgspec) skips what the importer does not read without building it,
  and a block it cannot even skip (its own recursion limit) goes to the streaming reader,
  which names the depth.
* **Repeated keys.** A `log` object with `entries` twice, or a document with `log` twice,
  is refused: JSON parsers disagree on which one counts (the first, the last, both), so
  whatever was imported would be a guess. Other repeated keys: the last one counts, in
  both readers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import ijson

from analyzer.ingest.common import ImportError_

MAX_DEPTH = 64


class Readable(Protocol):
    """What the streaming parser reads from: a file, or a wrapper that counts or chains."""

    def read(self, size: int = -1, /) -> bytes: ...


_OPEN = frozenset({"start_map", "start_array"})
_CLOSE = frozenset({"end_map", "end_array"})


class Position:
    """How far a reader has got, for messages."""

    def __init__(self, reader: Readable):
        self.reader = reader

    def __str__(self) -> str:
        read = getattr(self.reader, "read_bytes", None)
        return f"within the first {read} bytes" if read is not None else "in it"


def checked_events(reader: Readable, name: str) -> Iterator[tuple[str, Any, int]]:
    """ijson's basic events of a document with their depth; refuses nesting past MAX_DEPTH."""
    depth = 0
    for event, value in ijson.basic_parse(reader, use_float=True):
        if event in _OPEN:
            depth += 1
            if depth > MAX_DEPTH:
                raise ImportError_(
                    f"{name}: nested more than {MAX_DEPTH} levels deep ({Position(reader)}); "
                    "no HAR file is, so it is refused"
                )
        elif event in _CLOSE:
            depth -= 1
        yield event, value, depth


class KeyWatch:
    """Refuses a second `log` in the document or a second `entries` in `log`."""

    def __init__(self, name: str):
        self.name = name
        self.seen: set[tuple[int, str]] = set()
        self.in_log = False

    def key(self, depth: int, key: str, parent_key: str | None) -> None:
        """A key at `depth` (1: the document's own keys; 2: those of the object under `parent_key`)."""
        if (depth == 1 and key == "log") or (depth == 2 and parent_key == "log" and key == "entries"):
            if (depth, key) in self.seen:
                where = "the document" if key == "log" else "log"
                raise ImportError_(
                    f"{self.name}: {where} holds {key!r} twice; JSON readers disagree on which "
                    f"counts, so the file is refused (keep one)"
                )
            self.seen.add((depth, key))
