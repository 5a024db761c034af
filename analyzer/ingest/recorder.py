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
run could not finish it. When the spool's filesystem is full too, the spool moves to one
that is not (spool.fallback_spool_dir; not a directory the user chose); when no spool
takes writes either, exchanges wait in memory, up to the same bound, and are written as
soon as the store or a spool takes them. Only what is past the bound then is lost:
counted once, where it is dropped, by cause, and said in a line at most every
LOSS_REPORT_INTERVAL seconds and in the summary. `close()` stores what it can within `close_budget` seconds and
spools the rest, so stopping the proxy never waits on a store that does not answer.
A flow submitted after `close()` (the proxy serves the connections in flight while it
winds down) is stored at once, in the caller's thread.

What `kill -9` can lose is what waits in memory: at most `flush_interval` of traffic
(250 ms by default) plus a batch being committed.
"""

from __future__ import annotations

import errno
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

from analyzer.ingest.spool import (
    Spool,
    default_spool_path,
    fallback_spool_dir,
    fallback_spool_dirs,
    old_spools,
    stopped_mark,
)
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
LOSS_REPORT_INTERVAL = 10.0  # seconds between two lines about exchanges lost


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
        self.lost = 0  # rows dropped, each counted once where it was dropped (loss_causes says why)
        self.loss_causes: dict[str, int] = {}
        self._counts = threading.Lock()  # spooled, lost: counted by both threads
        self._unsaid: dict[str, int] = {}  # lost since the last line about it
        self._said_at = 0.0
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
        self._spools = [self._spool]  # this run's files: a second one off a full filesystem
        self._moving = threading.Lock()
        self._spool_refused: str | None = None  # why the spool last refused a write
        self._spool_next_try = 0.0
        self._holding_since: float | None = None  # the store and the spool both refuse: rows wait in memory
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
            # memory stays bounded whatever the store does
            if not self._spool_rows([row]):
                self._lose(1, f"memory held {self._bound()} already and {self._spool_refused}")
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
            self._say_losses(now=closing)
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
            late = deadline is not None and time.monotonic() > deadline
            if (not late and self._try_store(batch)) or self._spool_rows(batch, last=deadline is not None):
                self._handled_writer += len(batch)
                self._taken_again()
            elif deadline is not None:  # the proxy is stopping: nothing can wait any longer
                self._lose(len(batch), f"the proxy stopped while {self._spool_refused}")
                self._handled_writer += len(batch)
            else:
                self._hold(batch)
                return
        self._taken_again()

    def _bound(self) -> str:
        return f"{self.settings.queue_rows:,} exchanges / {self.settings.queue_bytes >> 20} MB"

    def _hold(self, batch: list[Row]) -> None:
        """The store and the spool both refused a batch: it waits in memory, first in line."""
        self._waiting.extendleft(reversed(batch))
        self._bytes_out -= sum(_row_bytes(r) for r in batch)
        if self._holding_since is None:
            self._holding_since = time.monotonic()
            log.error(
                "redirect-audit: the store and the spool both refuse writes (%s); exchanges wait in "
                "memory, up to %s, until one of them takes writes again",
                self._spool_refused,
                self._bound(),
            )

    def _taken_again(self) -> None:
        if self._holding_since is not None:
            log.warning(
                "redirect-audit: writes are taken again after %.0f s; what waited in memory is written",
                time.monotonic() - self._holding_since,
            )
            self._holding_since = None

    def _lose(self, count: int, cause: str, *, say: bool = True) -> None:
        """Count rows dropped, once, by cause; said now if nothing was said lately."""
        with self._counts:
            self.lost += count
            self.loss_causes[cause] = self.loss_causes.get(cause, 0) + count
            if say:
                self._unsaid[cause] = self._unsaid.get(cause, 0) + count
        self._say_losses()

    def _say_losses(self, now: bool = False) -> None:
        if not self._unsaid or (not now and time.monotonic() - self._said_at < LOSS_REPORT_INTERVAL):
            return
        with self._counts:
            unsaid, self._unsaid = self._unsaid, {}
            self._said_at = time.monotonic()
        for cause, count in unsaid.items():
            log.error("redirect-audit: %s exchanges lost: %s", f"{count:,}", cause)

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
            if self._spool_rows(rows, last=True):
                self._spool.sync()
            else:
                self._lose(len(rows), f"it finished after the proxy stopped, and {self._spool_refused}")
                self._say_losses(now=True)

    def _isolate(self, rows: list[Row], exc: Exception) -> None:
        """A batch failed because of what is in it: store the rows around the bad one."""
        if len(rows) > 1:
            half = len(rows) // 2
            for part in (rows[:half], rows[half:]):
                try:
                    self._write(part)
                except StoreUnavailable as down:
                    self._down(down)
                    if not self._spool_rows(part, last=True):
                        self._lose(len(part), f"the store failed mid-batch and {self._spool_refused}")
            return
        self._lose(1, "the store refused a value in it", say=False)  # said here, with the exchange
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

    def _spool_rows(self, rows: list[Row], *, last: bool = False) -> bool:
        """Append rows to the spool; False, with the reason in _spool_refused, if it will not
        take them. After a refusal it is tried again only every retry_interval (`last`:
        now, whatever the interval: the proxy is stopping). A spool in the default place
        whose filesystem is full moves, once, to a fallback directory on another one."""
        if not last and time.monotonic() < self._spool_next_try:
            return False
        spool = self._spool
        try:
            written = spool.append(rows)
        except OSError as exc:
            if not self._move_spool(spool, exc):
                return self._refused(exc)
            try:
                written = self._spool.append(rows)
            except OSError as again:
                return self._refused(again)
        self._spool_refused = None
        with self._counts:
            self.spooled += written
        if written < len(rows):
            self._lose(len(rows) - written, "a row no file can hold (text MessagePack cannot encode)")
        return True

    def _refused(self, exc: OSError) -> bool:
        self._spool_refused = f"the spool {self._spool.directory} refuses writes ({exc.strerror or exc})"
        self._spool_next_try = time.monotonic() + self.settings.retry_interval
        return False

    def _move_spool(self, failed: Spool, exc: OSError) -> bool:
        """Start a second spool file off the full filesystem; False when that cannot help."""
        with self._moving:  # the proxy's thread and the writer may both find the spool full
            if self._spool is not failed:
                return True  # the other moved it meanwhile
            if self.settings.spool is not None or len(self._spools) > 1:
                return False  # a directory the user chose stays; and the spool moves once
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
                return False
            directory = fallback_spool_dir(self.store.url, failed.directory)
            if directory is None:
                return False
            spool = Spool(directory, self.run_id, self.creator, part=2)
            spool.capture_id = failed.capture_id
            self._spools.append(spool)
            log.warning(
                "redirect-audit: the spool's filesystem refuses writes (%s: %s); spooling to %s instead",
                exc.strerror or exc,
                failed.directory,
                directory,
            )
            self._spool = spool
            return True

    def _spool_directories(self) -> list[Path]:
        """Where this store's spools may be: the configured directory, and the fallbacks."""
        dirs = [self._spools[0].directory]
        if self.settings.spool is None:
            dirs += [d for d in fallback_spool_dirs(self.store.url) if d not in dirs]
        return dirs

    def _old_spools(self) -> list[Spool]:
        return [spool for d in self._spool_directories() for spool in old_spools(d, self.run_id)]

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
        for spool in self._spools:
            spool.capture_id = self.capture_id
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
        for spool in self._old_spools():
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
        for spool in [*self._spools, *self._old_spools()]:
            while deadline is None or time.monotonic() < deadline:
                try:
                    done = spool.replay_batch(self.store, self.settings.batch_size)
                except StoreUnavailable as exc:
                    self._down(exc)
                    return
                if done is None:  # nothing was written: that says nothing of the store
                    break
                self._up()
                self.recovered += done
                if spool in self._spools:
                    with self._counts:
                        self.spooled -= done
                    self.stored += done
                if done and not self._waiting:
                    continue
                if self._waiting:  # live traffic first; the spool waits for the next wake
                    return

    def _finish(self) -> None:
        for spool in self._spools:
            spool.sync()
        if self.capture_id is None or self._store_down_since is not None:
            for spool in self._spools:
                spool.mark_stopped()  # the spool holds it all; the next start replays it
            return
        try:
            with self.store.begin() as conn:
                finish_capture(conn, self.capture_id, entries=self.stored)
                conn.execute(delete(meta).where(meta.c.key == self._marker))  # a clean stop
        except StoreError:
            for spool in self._spools:
                spool.mark_stopped()
            return
        for spool in self._spools:
            if not spool.pending():
                spool.remove()


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
