"""The proxy's writer: one thread owns the database and commits exchanges in batches.

The recorder addon converts flows on the proxy's event loop and hands each Exchange
over (`submit`), so a slow disk never stalls traffic. The writer thread sleeps until
`batch_size` exchanges are waiting or `flush_interval` seconds have passed, then
commits what is waiting, a batch per transaction. It is never woken once per exchange:
a wake-up per request would cost the proxy a thread switch and a GIL hand-over each
time, which is most of what recording would cost. `close()` drains the queue before it
returns, so every exchange that was submitted is stored, and says how many were seen
and how many were stored. An exchange submitted after `close()` (the proxy serves the
connections in flight while it winds down) is stored at once, in the caller's thread.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
import time
from dataclasses import dataclass

from analyzer.model import Exchange
from analyzer.store import (
    EXCHANGE_COLUMNS,
    Store,
    StoreUnavailable,
    add_capture,
    exchange_row,
    finish_capture,
    write_exchange_blocks,
)

log = logging.getLogger("redirect_audit")

RETRIES = 5  # attempts at a batch the database refused (locked, full disk) before giving up


@dataclass(frozen=True)
class RecorderSettings:
    # Under load a transaction costs the proxy about 6 ms of CPU beyond its rows: at
    # 1,000 requests/s the writer spent 14 µs per row with 2,000 rows / 2 s, 22 µs with
    # 500 / 0.5 s (thread CPU time in a loaded mitmdump).
    batch_size: int = 2000
    flush_interval: float = 2.0  # seconds

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch size must be at least 1, not {self.batch_size}")
        if not 0 < self.flush_interval <= 60:
            raise ValueError(f"flush interval must be in (0, 60] seconds, not {self.flush_interval}")


class Recorder:
    """Queue plus writer thread for one capture (one proxy run)."""

    def __init__(self, store: Store, settings: RecorderSettings = RecorderSettings(), *, creator: str | None = None):
        self.store = store
        self.settings = settings
        self.seen = 0
        self.stored = 0
        self.lost = 0
        self._waiting: deque[tuple] = deque()  # append/popleft are atomic: no lock needed
        self._wake = threading.Event()
        self._closing = False
        self._closed = False  # the writer thread has drained the queue and ended
        with store.begin() as conn:
            self.capture_id = add_capture(conn, source="proxy", creator=creator)
        self._thread = threading.Thread(target=self._run, name="redirect-audit-writer", daemon=True)
        self._thread.start()

    def next_seq(self) -> int:
        """Position of the next exchange in this capture (call from one thread only)."""
        return self.seen

    def submit(self, exchange: Exchange) -> None:
        """Queue one exchange. It is queued as its row, a flat tuple of strings and numbers:
        the cycle collector stops tracking such tuples, while an Exchange (with its header
        lists) would be walked by every collection for as long as it waits."""
        row = exchange_row(exchange)
        self.seen += 1
        if self._closed:  # no writer thread any more: a transaction of its own, now
            self._write([row])
            return
        self._waiting.append(row)
        if len(self._waiting) >= self.settings.batch_size and not self._wake.is_set():
            self._wake.set()

    def close(self) -> tuple[int, int]:
        """Drain the queue, record the totals; returns (seen, stored)."""
        self._closing = True
        self._wake.set()
        self._thread.join()
        self._closed = True
        with self.store.begin() as conn:
            finish_capture(conn, self.capture_id, entries=self.stored)
        return self.seen, self.stored

    def _run(self) -> None:
        while True:
            self._wake.wait(self.settings.flush_interval)
            self._wake.clear()
            closing = self._closing  # read before draining: whatever was submitted before close() is drained
            waiting, size = self._waiting, self.settings.batch_size
            while waiting:
                # Only this thread takes from the left; the hooks append on the right.
                batch = [waiting.popleft() for _ in range(min(size, len(waiting)))]
                self._write(batch)
            if closing:
                return

    def _write(self, rows: list[tuple]) -> None:
        for attempt in range(1, RETRIES + 1):
            try:
                with self.store.begin() as conn:
                    write_exchange_blocks(conn, [rows])
                    finish_capture(conn, self.capture_id, entries=self.stored + len(rows))
            except Exception as exc:  # noqa: BLE001 - the database, whatever it says, must not kill the proxy
                if not isinstance(exc, StoreUnavailable):  # not the store (locked, full) but a row: no retry helps
                    self._isolate(rows, exc)
                    return
                log.error("redirect-audit: writing %d exchanges failed (attempt %d of %d): %s",
                          len(rows), attempt, RETRIES, str(exc).splitlines()[0])
                time.sleep(min(0.2 * 2**attempt, 5.0))
                continue
            self.stored += len(rows)
            return
        self.lost += len(rows)
        log.error("redirect-audit: gave up on %d exchanges; the store is not taking writes", len(rows))

    def _isolate(self, rows: list[tuple], exc: Exception) -> None:
        """A batch failed because of what is in it: store the rows around the bad one."""
        if len(rows) > 1:
            half = len(rows) // 2
            self._write(rows[:half])
            self._write(rows[half:])
            return
        self.lost += 1
        url = str(rows[0][_URL])[:200].encode("utf-8", "backslashreplace").decode()
        log.error("redirect-audit: exchange %s (%s) cannot be stored: %s", rows[0][_SEQ], url,
                  str(exc).splitlines()[0])


_SEQ, _URL = EXCHANGE_COLUMNS.index("seq"), EXCHANGE_COLUMNS.index("url")
