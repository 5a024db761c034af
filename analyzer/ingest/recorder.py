"""The proxy's writer: one thread owns the database and commits exchanges in batches, and
a spool file takes what the store cannot.

The recorder addon converts flows on the proxy's event loop and hands each Exchange
over (`submit`), so a slow disk never stalls traffic. The writer thread sleeps until
`batch_size` exchanges are waiting or `flush_interval` seconds have passed, then commits
what is waiting, a batch per transaction. It is never woken once per exchange: a wake-up
per request would cost the proxy a thread switch and a GIL hand-over each time.

When the store goes away (locked past a short wait, disk full, unreachable), batches go
to a spool file next to it (analyzer.ingest.spool), and the queue stays bounded: past
`queue_rows` rows or `queue_bytes` bytes, `submit` itself appends to the spool. Once the
store takes writes again, the spool is replayed into it, also at the next start if this
run could not finish it. `close()` stores what it can within `close_budget` seconds and
spools the rest, so stopping the proxy never waits on a store that does not answer.
A flow submitted after `close()` (the proxy serves the connections in flight while it
winds down) is stored at once, in the caller's thread.

What `kill -9` can lose is what waits in memory: at most `flush_interval` of traffic
(250 ms by default) plus a batch being committed.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import delete, insert, select
from sqlalchemy.engine import Connection

from analyzer.ingest.spool import Spool, default_spool_path, old_spools, stopped_mark
from analyzer.model import Exchange
from analyzer.store import (
    EXCHANGE_COLUMNS,
    Store,
    add_capture,
    exchange_row,
    finish_capture,
    meta,
    write_exchange_blocks,
)
from analyzer.storeread import Row, StoreError, StoreUnavailable

log = logging.getLogger("redirect_audit")

RUNNING = "recorder.running."  # meta key prefix: a recorder is running (removed when it stops cleanly)


@dataclass(frozen=True)
class RecorderSettings:
    # Under load a transaction costs the proxy about 6 ms of CPU beyond its rows (thread
    # CPU time in a loaded mitmdump); a commit every 250 ms is what bounds a kill -9's loss.
    batch_size: int = 2000
    flush_interval: float = 0.25  # seconds
    queue_rows: int = 50_000  # rows waiting in memory before they go to the spool instead
    queue_bytes: int = 64 << 20
    close_budget: float = 1.5  # seconds close() spends on the store before spooling the rest
    retry_interval: float = 2.0  # seconds between attempts at a store that refused a batch
    spool: Path | None = None  # default: next to the store (see spool.default_spool_path)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch size must be at least 1, not {self.batch_size}")
        if not 0 < self.flush_interval <= 60:
            raise ValueError(f"flush interval must be in (0, 60] seconds, not {self.flush_interval}")
        if self.queue_rows < self.batch_size:
            raise ValueError(f"the queue must hold at least one batch ({self.batch_size} rows)")


_SEQ, _URL = EXCHANGE_COLUMNS.index("seq"), EXCHANGE_COLUMNS.index("url")
_REQH, _RESPH = EXCHANGE_COLUMNS.index("request_headers"), EXCHANGE_COLUMNS.index("response_headers")
_REQB, _RESPB = EXCHANGE_COLUMNS.index("req_body"), EXCHANGE_COLUMNS.index("resp_body")


def _row_bytes(row: Row) -> int:
    """About what a queued row holds (its long fields), for the queue's bound in bytes.
    Written out, not a generator: it runs for every exchange on the proxy's thread."""
    size = 200 + len(row[_URL]) + len(row[_REQH]) + len(row[_RESPH])
    body = row[_REQB]
    if body is not None:
        size += len(body)
    body = row[_RESPB]
    if body is not None:
        size += len(body)
    return size


class Recorder:
    """Queue, writer thread and spool for one capture (one proxy run)."""

    def __init__(
        self, store: Store, settings: RecorderSettings = RecorderSettings(), *, creator: str | None = None
    ):
        self.store = store
        self.settings = settings
        self.creator = creator
        self.seen = 0
        self.stored = 0
        self.spooled = 0  # rows that went to the spool and are not in the store yet
        self.recovered = 0  # rows of spools that are now in the store
        self.lost = 0
        # Rows the writer is done with (stored, spooled or lost), of the `seen` submitted;
        # each counted by one thread only, as the byte counts are.
        self._handled_here = 0  # by the submitting thread (queue full, after close)
        self._handled_writer = 0  # by the writer thread
        self.run_id = uuid.uuid4().hex
        self.capture_id: int | None = None  # made by the writer, as soon as the store takes writes
        self._waiting: deque[Row] = deque()  # append/popleft are atomic: no lock needed
        # Bytes queued and bytes taken, each counted by one thread only (no lock, no lost update).
        self._bytes_in = 0
        self._bytes_out = 0
        self._wake = threading.Event()
        self._closing = False
        self._closed = False  # the writer thread has ended
        self._store_down_since: float | None = None
        self._next_try = 0.0
        self._spool = Spool(settings.spool or default_spool_path(store.url), self.run_id, creator)
        self._marker = f"{RUNNING}{self.run_id}"
        self._thread = threading.Thread(target=self._run, name="redirect-audit-writer", daemon=True)
        self._thread.start()

    @property
    def spool_path(self) -> Path:
        return self._spool.path

    # ---- the proxy's side ----------------------------------------------------------------

    def next_seq(self) -> int:
        """Position of the next exchange in this capture (call from one thread only)."""
        return self.seen

    def submit(self, exchange: Exchange) -> None:
        """Queue one exchange, as its row: a flat tuple of strings and numbers, which the
        cycle collector stops tracking (an Exchange with its header lists would be walked
        by every collection for as long as it waits)."""
        row = exchange_row(exchange)
        self.seen += 1
        if self._closed:  # no writer thread any more: a transaction of its own, now
            self._write_now([row])
            self._handled_here += 1
            return
        if (
            len(self._waiting) >= self.settings.queue_rows
            or self._bytes_in - self._bytes_out >= self.settings.queue_bytes
        ):
            self._spool_rows([row])  # memory stays bounded whatever the store does
            self._handled_here += 1
            return
        self._waiting.append(row)
        self._bytes_in += _row_bytes(row)
        if len(self._waiting) >= self.settings.batch_size and not self._wake.is_set():
            self._wake.set()

    @property
    def handled(self) -> int:
        """Rows submitted so far that the writer is done with: in the store, in the spool, or lost."""
        return self._handled_here + self._handled_writer

    @property
    def closed(self) -> bool:
        """close() has run: the writer thread has ended."""
        return self._closed

    def flush_soon(self) -> int:
        """Have the writer commit what waits now, without waiting for a full batch or the
        flush interval; returns the count `handled` reaches once it has (see the addon's
        flush request, which waits on it)."""
        self._wake.set()
        return self.seen

    def close(self) -> tuple[int, int]:
        """Store what waits within close_budget, spool the rest; returns (seen, stored)."""
        self._closing = True
        self._wake.set()
        self._thread.join()
        self._closed = True
        return self.seen, self.stored

    # ---- the writer thread ---------------------------------------------------------------

    def _run(self) -> None:
        self._try_start()
        while True:
            self._wake.wait(self.settings.flush_interval)
            self._wake.clear()
            closing = self._closing  # read before draining: whatever was submitted before close() is drained
            deadline = time.monotonic() + self.settings.close_budget if closing else None
            self._drain(deadline)
            if self._store_up():
                self._replay(deadline)
            if closing:
                self._finish()
                return

    def _take(self) -> list[Row]:
        waiting, size = self._waiting, self.settings.batch_size
        batch = [
            waiting.popleft() for _ in range(min(size, len(waiting)))
        ]  # only this thread takes from the left
        self._bytes_out += sum(_row_bytes(r) for r in batch)
        return batch

    def _drain(self, deadline: float | None) -> None:
        while self._waiting:
            batch = self._take()
            if (deadline is not None and time.monotonic() > deadline) or not self._try_store(batch):
                self._spool_rows(batch)
            self._handled_writer += len(batch)

    def _store_up(self) -> bool:
        """Whether to try the store now: it took the last write, or its retry time has come."""
        if self._store_down_since is None:
            return True
        return time.monotonic() >= self._next_try and (self.capture_id is not None or self._try_start())

    def _try_store(self, rows: list[Row]) -> bool:
        """Store a batch if the store takes it; False (and the store marked down) if not."""
        if not self._store_up() or (self.capture_id is None and not self._try_start()):
            return False
        try:
            self._write(rows)
        except StoreUnavailable as exc:
            self._down(exc)
            return False
        self._up()
        return True

    def _up(self) -> None:
        if self._store_down_since is not None:
            log.warning(
                "redirect-audit: the store takes writes again after %.0f s; replaying the spool",
                time.monotonic() - self._store_down_since,
            )
            self._store_down_since = None

    def _write(self, rows: list[Row]) -> None:
        capture = self.capture_id
        assert capture is not None  # only called once the capture is made (_try_store)
        if rows[0][0] != capture or rows[-1][0] != capture:  # converted before the capture was made
            rows = [row if row[0] == capture else (capture, *row[1:]) for row in rows]
        try:
            with self.store.begin() as conn:
                write_exchange_blocks(conn, [rows])
                finish_capture(conn, capture, entries=self.stored + len(rows))
        except StoreUnavailable:
            raise
        except Exception as exc:
            self._isolate(rows, exc)
            return
        self.stored += len(rows)

    def _write_now(self, rows: list[Row]) -> None:
        """After close(): one transaction, now; what the store will not take goes to the spool."""
        if self.capture_id is None or not self._try_store(rows):
            self._spool_rows(rows)
            self._spool.sync()

    def _isolate(self, rows: list[Row], exc: Exception) -> None:
        """A batch failed because of what is in it: store the rows around the bad one."""
        if len(rows) > 1:
            half = len(rows) // 2
            for part in (rows[:half], rows[half:]):
                try:
                    self._write(part)
                except StoreUnavailable as down:
                    self._down(down)
                    self._spool_rows(part)
            return
        self.lost += 1
        url = str(rows[0][_URL])[:200].encode("utf-8", "backslashreplace").decode()
        log.error(
            "redirect-audit: exchange %s (%s) cannot be stored: %s",
            rows[0][_SEQ],
            url,
            str(exc).splitlines()[0],
        )

    def _down(self, exc: Exception) -> None:
        if self._store_down_since is None:
            self._store_down_since = time.monotonic()
            log.error(
                "redirect-audit: the store is not taking writes (%s); exchanges go to %s until it does",
                str(exc).splitlines()[0],
                self._spool.path,
            )
        self._next_try = time.monotonic() + self.settings.retry_interval

    def _spool_rows(self, rows: list[Row]) -> None:
        try:
            self.spooled += self._spool.append(rows)
        except OSError as exc:
            self.lost += len(rows)
            log.error(
                "redirect-audit: %d exchanges lost: the store and the spool %s both refused them (%s)",
                len(rows),
                self._spool.path,
                exc.strerror or exc,
            )

    # ---- start, replay, finish -----------------------------------------------------------

    def _try_start(self) -> bool:
        """Make this run's capture and its running mark; say if the last run stopped uncleanly."""
        if self.capture_id is not None:
            return True
        try:
            with self.store.begin() as conn:
                self._report_unclean(conn)
                self.capture_id = add_capture(conn, source="proxy", creator=self.creator)
                conn.execute(
                    insert(meta).values(
                        key=self._marker,
                        value=json.dumps(
                            {
                                "host": socket.gethostname(),
                                "pid": os.getpid(),
                                "capture": self.capture_id,
                                "spool": str(self._spool.path),
                            }
                        ),
                    )
                )
        except StoreError as exc:
            self._down(exc)
            return False
        self._spool.capture_id = self.capture_id
        self._up()
        log.info("redirect-audit: recording into capture %d", self.capture_id)
        return True

    def _report_unclean(self, conn: Connection) -> None:
        """Runs of this host whose process is gone did not stop cleanly: say so, and forget them.
        A run is known by its mark in the store, or, if the store was down all its life, by
        the spool it left."""
        here = socket.gethostname()
        told: set[str] = set()
        for key, value in conn.execute(
            select(meta.c.key, meta.c.value).where(meta.c.key.like(f"{RUNNING}%"))
        ):
            try:
                mark = json.loads(value)
            except ValueError:
                mark = {}
            if mark.get("host") != here or _alive(mark.get("pid")):
                continue
            spooled = Path(mark["spool"]) if mark.get("spool") else None
            waiting = Spool.count(spooled) if spooled is not None else 0
            told.add(key.removeprefix(RUNNING))
            held = (
                f"its spool holds {waiting} exchanges, replayed now"
                if waiting
                else "what it had committed is stored (a commit every 250 ms by default)"
            )
            if spooled is not None and stopped_mark(spooled).exists():
                log.info(
                    "redirect-audit: the last run on this store (capture %s, pid %s) stopped cleanly while the "
                    "store was busy; %s",
                    mark.get("capture"),
                    mark.get("pid"),
                    held,
                )
            else:
                log.warning(
                    "redirect-audit: the last run on this store (capture %s, pid %s) stopped uncleanly; %s",
                    mark.get("capture"),
                    mark.get("pid"),
                    held,
                )
            conn.execute(delete(meta).where(meta.c.key == key))
        for spool in old_spools(self._spool.directory, self.run_id):
            head = spool.header()
            if spool.run_id in told or head.get("host") != here or _alive(head.get("pid")):
                continue
            if stopped_mark(spool.path).exists():
                log.info(
                    "redirect-audit: an earlier run on this store (pid %s) stopped cleanly while the store was "
                    "busy; its spool holds %d exchanges, replayed now",
                    head.get("pid"),
                    Spool.count(spool.path),
                )
                continue
            log.warning(
                "redirect-audit: an earlier run on this store (pid %s) stopped uncleanly before it could "
                "write to it; its spool holds %d exchanges, replayed now",
                head.get("pid"),
                Spool.count(spool.path),
            )

    def _replay(self, deadline: float | None) -> None:
        """Move spooled rows (this run's and earlier runs') into the store, a batch at a time."""
        for spool in [self._spool, *old_spools(self._spool.directory, self.run_id)]:
            while deadline is None or time.monotonic() < deadline:
                try:
                    done = spool.replay_batch(self.store, self.settings.batch_size)
                except StoreUnavailable as exc:
                    self._down(exc)
                    return
                self._up()
                if done is None:
                    break
                self.recovered += done
                if spool is self._spool:
                    self.spooled -= done
                    self.stored += done
                if done and not self._waiting:
                    continue
                if self._waiting:  # live traffic first; the spool waits for the next wake
                    return

    def _finish(self) -> None:
        self._spool.sync()
        if self.capture_id is None or self._store_down_since is not None:
            self._spool.mark_stopped()  # the spool holds it all; the next start replays it
            return
        try:
            with self.store.begin() as conn:
                finish_capture(conn, self.capture_id, entries=self.stored)
                conn.execute(delete(meta).where(meta.c.key == self._marker))  # a clean stop
        except StoreError:
            self._spool.mark_stopped()
            return
        if not self._spool.pending():
            self._spool.remove()


def _alive(pid: object) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
