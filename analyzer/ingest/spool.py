"""The proxy's spool: exchanges the store could not take, on local disk until it can.

One append-only file per proxy run, in a directory next to the store (`capture.db.spool/`,
or `redirect-audit-<id>.spool/` in the working directory for a store that is not a file),
readable by its owner only; when that filesystem is full, a second file in a directory
for the store on another one (fallback_spool_dirs), which every start looks in too. A file is a run header and then records, each a 4-byte
length and a MessagePack row (an exchanges-table row without its capture id). Appends
are fsync'd in batches. Replay moves rows into the store a batch per transaction and
records, in the same transaction, how far it got (`meta`: `spool.<run>`), so a replay cut
short by a crash is resumed, never repeated. A record cut short by a kill -9 ends the
file; an append the disk cuts short is taken back whole (truncated to where it began),
so a row is never both counted lost and replayed. Rows go into the run's own capture, or a capture made for them when the run never
got one (the store was down from its start).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import struct
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, BinaryIO

import msgspec
from sqlalchemy import delete, insert, select, update

from analyzer.store import Store, add_capture, captures, finish_capture, meta, write_exchange_blocks
from analyzer.storeread import Row, sqlite_file

SUFFIX = ".rows"
_LENGTH = struct.Struct(">I")
_ENCODE = msgspec.msgpack.Encoder()
_DECODE = msgspec.msgpack.Decoder()
PROGRESS = "spool."  # meta key prefix


def default_spool_path(store_url: str) -> Path:
    """The spool directory for a store: next to a SQLite file, else in the working directory."""
    path = sqlite_file(store_url)
    if path is not None:
        return Path(f"{path}.spool")
    return Path(f"redirect-audit-{_store_key(store_url)}.spool")


def _store_key(store_url: str) -> str:
    path = sqlite_file(store_url)
    name = str(Path(path).resolve()) if path is not None else store_url
    return hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:12]


def fallback_spool_dirs(store_url: str) -> list[Path]:
    """Where a store's spool goes when the filesystem of its own directory is full, best
    first: the user's state directory, /var/tmp, the temporary directory; a directory per
    store (by a digest of its URL), readable by its owner only, looked in at every start."""
    state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    uid = os.getuid() if hasattr(os, "getuid") else 0
    bases = [state / "redirect-audit" / "spool", Path("/var/tmp") / f"redirect-audit-{uid}"]
    bases.append(Path(tempfile.gettempdir()) / f"redirect-audit-{uid}")
    key = _store_key(store_url)
    seen: list[Path] = []
    for base in bases:
        if base not in seen:
            seen.append(base)
    return [base / f"{key}.spool" for base in seen]


def _device(path: Path) -> int | None:
    """The filesystem a path is on (its nearest existing ancestor's), or None."""
    for candidate in (path, *path.parents):
        try:
            return candidate.stat().st_dev
        except OSError:
            continue
    return None


def _free_bytes(path: Path) -> int:
    for candidate in (path, *path.parents):
        try:
            stats = os.statvfs(candidate)
        except OSError:
            continue
        return stats.f_bavail * stats.f_frsize
    return 0


FALLBACK_FREE = 16 << 20  # bytes a fallback spool's filesystem must have free to be chosen


def fallback_spool_dir(store_url: str, full: Path) -> Path | None:
    """The first fallback directory on another filesystem than `full` with room to spare."""
    device = _device(full)
    for directory in fallback_spool_dirs(store_url):
        if _device(directory) != device and _free_bytes(directory) >= FALLBACK_FREE:
            return directory
    return None


def stopped_mark(path: Path) -> Path:
    """The file that says a spool's run stopped cleanly (Spool.mark_stopped)."""
    return path.with_name(path.name + ".stopped")


def old_spools(directory: Path, this_run: str) -> list[Spool]:
    """The spool files other runs left in the directory (replayed by whoever runs next)."""
    if not directory.is_dir():
        return []
    spools = []
    for f in sorted(directory.glob(f"*{SUFFIX}")):
        run, _, part = f.stem.partition(".")
        if run != this_run:
            spools.append(
                Spool(directory, run, None, reader_only=True, part=int(part) if part.isdigit() else 1)
            )
    return spools


class Spool:
    """One run's spool file."""

    def __init__(
        self, directory: Path, run_id: str, creator: str | None, *, reader_only: bool = False, part: int = 1
    ):
        """`part`: a run's second file (and so on), made when the first one's filesystem filled."""
        self.directory = Path(directory)
        self.run_id = run_id
        self.creator = creator
        self.capture_id: int | None = None
        self.path = self.directory / (f"{run_id}{SUFFIX}" if part == 1 else f"{run_id}.{part}{SUFFIX}")
        self.progress_key = PROGRESS + self.path.stem
        self.reader_only = reader_only
        self._fd: int | None = None  # written with os.write: no buffer holds half a record
        self._lock = threading.Lock()  # the writer thread and, past the queue's bound, the proxy's own
        self._unsynced = 0
        self._written = 0  # bytes this run appended (for `pending`)
        self._replayed: int | None = None  # offset replay has reached, once known

    # ---- appending -------------------------------------------------------------------

    def append(self, rows: list[Row]) -> int:
        """Append rows (capture id left out); returns how many were written. All or none:
        a write the disk cuts short (full) is taken back, so no half record is replayed
        later and no row is both counted lost and stored."""
        payload = []
        for row in rows:
            try:
                data = _ENCODE.encode(row[1:])
            except (msgspec.EncodeError, UnicodeEncodeError, TypeError):
                continue  # a row no file could hold either; the caller counts the rest
            payload.append(_LENGTH.pack(len(data)) + data)
        data = b"".join(payload)
        with self._lock:
            fd = self._open()
            start = os.lseek(fd, 0, os.SEEK_END)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            except OSError:
                os.ftruncate(fd, start)
                raise
            self._unsynced += len(payload)
            if self._unsynced >= 256:
                os.fsync(fd)
                self._unsynced = 0
        return len(payload)

    def _open(self) -> int:
        if self._fd is None:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                if os.lseek(fd, 0, os.SEEK_END) == 0:
                    header = json.dumps(
                        {
                            "run": self.run_id,
                            "creator": self.creator,
                            "started": time.time(),
                            "host": socket.gethostname(),
                            "pid": os.getpid(),
                        }
                    ).encode()
                    record = _LENGTH.pack(len(header)) + header
                    if os.write(fd, record) != len(record):
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            except OSError:
                os.ftruncate(fd, 0)
                os.close(fd)
                raise
            self._fd = fd
        return self._fd

    def sync(self) -> None:
        with self._lock:
            if self._fd is not None:
                try:
                    os.fsync(self._fd)
                except OSError:
                    pass  # what reached the file is there; a full disk may refuse the flush
                self._unsynced = 0

    # ---- replaying -------------------------------------------------------------------

    def pending(self) -> bool:
        """Whether rows of this file are not in the store yet."""
        if not self.path.exists():
            return False
        return self._replayed is None or self._replayed < self.path.stat().st_size

    def replay_batch(self, store: Store, size: int) -> int | None:
        """Move up to `size` rows into the store; None when nothing is left to move."""
        if not self.path.exists():
            return None
        with store.begin() as conn:
            progress = conn.execute(select(meta.c.value).where(meta.c.key == self.progress_key)).scalar()
            state = json.loads(progress) if progress else {}
            rows, end, header = _read(self.path, state.get("offset"), size)
            self._replayed = end
            if not rows:
                if self.reader_only and header is not None:  # an old run's file, all in the store: gone
                    conn.execute(delete(meta).where(meta.c.key == self.progress_key))
                    self.path.unlink(missing_ok=True)
                    stopped_mark(self.path).unlink(missing_ok=True)
                return None
            capture = state.get("capture") or self.capture_id
            if (
                capture is None
                or conn.execute(select(captures.c.id).where(captures.c.id == capture)).first() is None
            ):
                creator = (header or {}).get("creator") or self.creator
                capture = add_capture(conn, source="proxy", creator=f"{creator or 'proxy'} (from its spool)")
            write_exchange_blocks(conn, [[(capture, *row) for row in rows]])
            count = conn.execute(select(captures.c.entries).where(captures.c.id == capture)).scalar() or 0
            finish_capture(conn, capture, entries=count + len(rows))
            value = json.dumps({"offset": end, "capture": capture})
            if progress is None:
                conn.execute(insert(meta).values(key=self.progress_key, value=value))
            else:
                conn.execute(update(meta).where(meta.c.key == self.progress_key).values(value=value))
        return len(rows)

    def remove(self) -> None:
        """All replayed: the file and its progress go."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            self.path.unlink(missing_ok=True)
            stopped_mark(self.path).unlink(missing_ok=True)
        try:
            self.directory.rmdir()  # only if empty
        except OSError:
            pass

    def mark_stopped(self) -> None:
        """Say, next to the file, that its run stopped cleanly although the store could not
        be told (it was locked or down): the next start then does not call it an unclean stop."""
        if self.path.exists():
            try:
                fd = os.open(stopped_mark(self.path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as fh:
                    fh.write(json.dumps({"stopped": time.time(), "pid": os.getpid()}))
            except OSError:
                pass  # a full disk: the next start calls the stop unclean, and replays all the same

    @staticmethod
    def count(path: Path) -> int:
        """Rows in a spool file (for messages)."""
        return len(_read(path, None, 1 << 62)[0]) if path.exists() else 0

    def header(self) -> dict[str, Any]:
        """The run header (host, pid, creator, started); {} if there is none to read."""
        return (_read(self.path, None, 0)[2] or {}) if self.path.exists() else {}


def _read(path: Path, offset: int | None, limit: int) -> tuple[list[Row], int, dict[str, Any] | None]:
    """Up to `limit` rows from `offset` (None: after the header); (rows, end offset, header)."""
    with open(path, "rb") as fh:
        data_header = _record(fh)
        header = None
        if data_header is not None:
            try:
                header = json.loads(data_header)
            except ValueError:
                header = None
        if offset is not None:
            fh.seek(offset)
        rows: list[Row] = []
        end = fh.tell()
        while len(rows) < limit:
            record = _record(fh)
            if record is None:  # the end, or a record a kill -9 cut short
                break
            try:
                rows.append(tuple(_DECODE.decode(record)))
            except msgspec.DecodeError:
                break
            end = fh.tell()
    return rows, end, header


def _record(fh: BinaryIO) -> bytes | None:
    head = fh.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        return None
    (length,) = _LENGTH.unpack(head)
    data: bytes = fh.read(length)
    return data if len(data) == length else None
