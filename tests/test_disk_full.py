"""A full disk loses only what cannot be held (issue 29, item 2).

The store lives on a small tmpfs of its own (mounted here: root, as CI is), filled to
the last byte by a filler file. The spool next to the store is on the same full
filesystem, so it moves to a fallback directory on another one; a spool directory the
user chose stays where it is, and then exchanges wait in memory up to the documented
bound. With the filler removed within the bound, nothing is lost; past it, each lost
exchange is counted once, by cause, and said.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from conftest import wait_until
from proxyrun import Mitmdump
from test_faults import count, drive, exchange
from upstream import Upstream

from analyzer.ingest.recorder import Recorder, RecorderSettings
from analyzer.store import open_store

pytestmark = pytest.mark.slow

SETTINGS = RecorderSettings(
    batch_size=100,
    flush_interval=0.05,
    queue_rows=1000,
    queue_bytes=4 << 20,
    retry_interval=0.1,
    close_budget=2.0,
)


class SmallDisk:
    """A tmpfs of a few MB, and a file that fills it to the last byte (until `make_room`)."""

    def __init__(self, where: Path, size_mb: int = 16):
        where.mkdir()
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0700", "tmpfs", str(where)], check=True
        )
        self.path = where
        self.filler = where / "filler"

    def fill(self) -> None:
        with open(self.filler, "ab") as fh:
            block = b"\0" * 65536
            for _ in range(10_000):  # bounded: the tmpfs holds a few MB
                try:
                    fh.write(block)
                    fh.flush()
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
            for size in (4096, 512, 1):  # the last partial blocks too
                while True:
                    try:
                        os.write(fh.fileno(), b"\0" * size)
                    except OSError:
                        break

    def make_room(self) -> None:
        self.filler.unlink()

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False)


@pytest.fixture
def disk(tmp_path, monkeypatch):
    small = SmallDisk(tmp_path / "small")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))  # the fallback: another filesystem
    yield small
    small.unmount()


def stored_rows(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute("select count(distinct seq) from exchanges").fetchone()[0]


def test_a_full_disk_moves_the_spool_off_it_and_loses_nothing(disk, tmp_path, caplog):
    db = disk.path / "s.db"
    store = open_store(str(db), wait=0.2)
    recorder = Recorder(store, SETTINGS, creator="test")
    for i in range(200):
        recorder.submit(exchange(i))
    assert wait_until(lambda: recorder.stored == 200)
    disk.fill()
    with caplog.at_level(logging.WARNING, logger="redirect_audit"):
        for i in range(200, 5_000):
            recorder.submit(exchange(i))
            if i % 500 == 0:
                time.sleep(0.05)  # traffic, not one burst
        assert wait_until(lambda: recorder.handled == 5_000)
        fallback = [p for p in (tmp_path / "state" / "redirect-audit" / "spool").glob("*.spool")]
        assert len(fallback) == 1 and list(fallback[0].glob("*.rows"))
        assert recorder.lost == 0 and recorder.stored + recorder.spooled == 5_000
        moved = [r.getMessage() for r in caplog.records if "spooling to" in r.getMessage()]
        assert moved == [
            f"redirect-audit: the spool's filesystem refuses writes (No space left on device: {db}.spool); "
            f"spooling to {fallback[0]} instead"
        ]
        disk.make_room()
        assert wait_until(lambda: recorder.stored == 5_000, timeout=30), (
            recorder.stored,
            recorder.spooled,
            recorder.lost,
            recorder._store_down_since,
            recorder._spools,
        )
    recorder.close()
    assert (recorder.seen, recorder.stored, recorder.spooled, recorder.lost) == (5_000, 5_000, 0, 0)
    assert stored_rows(db) == 5_000
    assert not list(fallback[0].glob("*.rows"))  # replayed and removed


def spooling_on_the_full_disk(disk: SmallDisk) -> tuple[Path, Recorder]:
    """A recorder whose store and chosen spool directory are on the disk, filled once the
    first exchange is stored."""
    db = disk.path / "s.db"
    settings = RecorderSettings(**{**SETTINGS.__dict__, "spool": disk.path / "my-spool"})
    recorder = Recorder(open_store(str(db), wait=0.2), settings, creator="test")
    recorder.submit(exchange(0))
    assert wait_until(lambda: recorder.stored == 1)
    disk.fill()
    return db, recorder


def test_a_spool_the_user_placed_on_the_full_disk_stays_and_memory_holds_the_rest(disk, caplog):
    db, recorder = spooling_on_the_full_disk(disk)
    with caplog.at_level(logging.WARNING, logger="redirect_audit"):
        for i in range(1, 900):  # within the bound of 1,000
            recorder.submit(exchange(i))
        time.sleep(1.0)  # several retries of the store and the spool, all refused
        assert recorder.lost == 0 and recorder.stored < 900
        held = [r.getMessage() for r in caplog.records if "wait in memory" in r.getMessage()]
        assert held == [
            f"redirect-audit: the store and the spool both refuse writes (the spool {disk.path / 'my-spool'} "
            "refuses writes (No space left on device)); exchanges wait in memory, up to 1,000 exchanges / "
            "4 MB, until one of them takes writes again"
        ]
        disk.make_room()
        assert wait_until(lambda: recorder.stored == 900, timeout=30)
        assert any("writes are taken again after" in r.getMessage() for r in caplog.records)
    recorder.close()
    assert (recorder.seen, recorder.stored, recorder.lost) == (900, 900, 0)
    assert stored_rows(db) == 900


def test_past_the_bound_each_loss_is_counted_once_with_its_cause(disk, caplog):
    db, recorder = spooling_on_the_full_disk(disk)
    with caplog.at_level(logging.WARNING, logger="redirect_audit"):
        for i in range(1, 2_500):
            recorder.submit(exchange(i))
        time.sleep(0.5)
        lost_while_full = recorder.lost
        disk.make_room()
        assert wait_until(lambda: recorder.handled == 2_500, timeout=30)
        recorder.close()
    assert 1_250 <= lost_while_full <= 1_499  # what did not fit in 1,000 held (and a batch in hand)
    assert recorder.lost == lost_while_full  # nothing more once there was room
    assert recorder.spooled >= 0 and recorder.stored + recorder.lost == 2_500
    assert stored_rows(db) == recorder.stored
    cause = (
        f"memory held 1,000 exchanges / 4 MB already and the spool {disk.path / 'my-spool'} refuses writes "
        "(No space left on device)"
    )
    assert recorder.loss_causes == {cause: recorder.lost}
    said = [r.getMessage() for r in caplog.records if "exchanges lost" in r.getMessage()]
    total = sum(int(line.split(" exchanges lost")[0].rsplit(" ", 1)[1].replace(",", "")) for line in said)
    assert total == recorder.lost and all(line.endswith(cause) for line in said)
    assert len(said) <= 3  # a line now and then, never one per exchange


def test_the_proxy_under_load_on_a_full_disk_loses_nothing_once_there_is_room(disk, tmp_path):
    """A real mitmdump, its store and its default spool on the full disk: the spool moves
    off it, the proxy answers on, and every answered exchange ends up in the store."""
    db = disk.path / "p.db"
    open_store(str(db)).close()
    upstream = Upstream()
    proxy = Mitmdump(tmp_path / "mitm", db=str(db))
    answered: list[float] = []
    try:
        drive(proxy.port, upstream, 0.5, answered)
        disk.fill()
        full_from = len(answered)
        drive(proxy.port, upstream, 3.0, answered)
        assert len(answered) > full_from + 20  # the proxy answered on
        disk.make_room()
        drive(proxy.port, upstream, 0.5, answered)
        wait_until(lambda: count(db) == len(answered), timeout=30)
    finally:
        output = proxy.stop()
        upstream.close()
    assert "spooling to" in output and str(tmp_path / "state") in output, output[-3000:]
    assert count(db) == len(answered), output[-3000:]
    assert f"saw {len(answered)} exchanges, stored {len(answered)}" in output
    assert "lost" not in output
