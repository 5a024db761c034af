"""The recorder when the store goes away, and when the proxy is killed.

A store that refuses writes (held locked by another process here, as a full or
unreachable store refuses them too) must never cost the proxy's traffic or memory: what
the store cannot take goes to a spool file and is replayed once it can. A `kill -9`
loses at most what waited for the next commit, leaves a sound store, and the next start
says what happened.
"""

from __future__ import annotations

import http.client
import signal
import sqlite3
import stat
import threading
import time
from pathlib import Path

import pytest
from conftest import wait_until
from proxyrun import Mitmdump
from upstream import Upstream

from analyzer.ingest.recorder import Recorder, RecorderSettings
from analyzer.model import Exchange
from analyzer.store import open_store

pytestmark = pytest.mark.slow


def exchange(i: int) -> Exchange:
    url = f"http://api.test/item/{i}"
    return Exchange(
        capture_id=0,
        seq=i,
        method="GET",
        url=url,
        url_norm=url,
        started_at=1_700_000_000.0 + i,
        client="127.0.0.1",
        status=200,
        request_headers=[("Accept", "*/*")],
        response_headers=[],
    )


def count(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute("select count(*) from exchanges").fetchone()[0]


class Holder:
    """Another process's write lock on a SQLite store (BEGIN IMMEDIATE), for as long as wanted."""

    def __init__(self, db: Path):
        self.conn = sqlite3.connect(db, timeout=30, check_same_thread=False)
        self.conn.execute("BEGIN IMMEDIATE")

    def release(self) -> None:
        self.conn.rollback()
        self.conn.close()


SETTINGS = RecorderSettings(
    batch_size=200,
    flush_interval=0.05,
    queue_rows=1000,
    queue_bytes=1 << 20,
    retry_interval=0.2,
    close_budget=1.0,
)


def test_a_locked_store_spools_and_the_spool_is_replayed_when_it_takes_writes_again(tmp_path):
    db = tmp_path / "s.db"
    store = open_store(str(db), wait=0.2)
    holder = Holder(db)
    recorder = Recorder(store, SETTINGS, creator="test")
    peak = 0
    for i in range(20_000):
        recorder.submit(exchange(i))
        peak = max(peak, len(recorder._waiting))
    assert wait_until(lambda: recorder.spooled > 0)
    assert recorder.stored == 0
    assert peak <= SETTINGS.queue_rows  # memory stays bounded while the store is gone
    spool = recorder.spool_path
    assert stat.S_IMODE(spool.stat().st_mode) == 0o600
    holder.release()
    deadline = time.monotonic() + 30
    while recorder.stored < 20_000 and time.monotonic() < deadline:
        time.sleep(0.1)
    seen, stored = recorder.close()
    assert (seen, stored, recorder.lost) == (20_000, 20_000, 0)
    assert count(db) == 20_000 and not spool.exists()
    with sqlite3.connect(db) as conn:
        assert conn.execute("pragma integrity_check").fetchone()[0] == "ok"
        assert conn.execute("select count(distinct seq) from exchanges").fetchone()[0] == 20_000  # none twice


def test_closing_on_a_store_that_does_not_answer_spools_the_rest_and_the_next_run_replays_it(tmp_path):
    db = tmp_path / "s.db"
    store = open_store(str(db), wait=0.2)
    recorder = Recorder(store, SETTINGS, creator="first run")
    for i in range(300):
        recorder.submit(exchange(i))
    assert wait_until(lambda: count(db) == 300)
    holder = Holder(db)
    for i in range(300, 5_000):
        recorder.submit(exchange(i))
    closer = threading.Thread(target=recorder.close)
    closer.start()
    closer.join(30)  # bounded by close_budget plus one short wait on the lock; never the store's pace
    assert not closer.is_alive()
    assert recorder.stored == 300 and recorder.spooled == 4_700 and recorder.lost == 0
    holder.release()
    second = Recorder(open_store(str(db), wait=0.2), SETTINGS, creator="second run")
    deadline = time.monotonic() + 30
    while count(db) < 5_000 and time.monotonic() < deadline:
        time.sleep(0.1)
    second.close()
    assert count(db) == 5_000
    with sqlite3.connect(db) as conn:
        captures = conn.execute("select creator, entries from captures order by id").fetchall()
        seqs = conn.execute("select count(distinct capture_id || '/' || seq) from exchanges").fetchone()[0]
    assert seqs == 5_000  # replayed once, not twice
    assert sum(n for _, n in captures) == 5_000
    assert not list((tmp_path / "s.db.spool").glob("*.rows"))


# ---- a real proxy ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream():
    up = Upstream()
    yield up
    up.close()


def drive(port: int, upstream: Upstream, seconds: float, answered: list[float]) -> None:
    """Requests through the proxy, one connection at a time, recording when each was answered."""
    stop = time.monotonic() + seconds
    n = 0
    while time.monotonic() < stop:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", f"{upstream.origin}/echo/load-{n}")
            if conn.getresponse().read() is not None:
                answered.append(time.monotonic())
            conn.close()
        except OSError:
            return
        n += 1


def test_the_proxy_keeps_answering_and_loses_nothing_while_its_store_is_locked(tmp_path, upstream):
    db = tmp_path / "p.db"
    open_store(str(db)).close()
    proxy = Mitmdump(tmp_path / "mitm", db=str(db))
    answered: list[float] = []
    holder = None
    try:
        drive(proxy.port, upstream, 1.0, answered)
        holder = Holder(db)
        locked_at = len(answered)
        drive(proxy.port, upstream, 3.0, answered)  # the store refuses every write meanwhile
        assert len(answered) > locked_at + 20  # the proxy answered on
        holder.release()
        holder = None
        drive(proxy.port, upstream, 2.0, answered)
        wait_until(lambda: count(db) == len(answered))  # the spool replayed; asserted below
    finally:
        if holder is not None:
            holder.release()
        output = proxy.stop()
    assert "the store is not taking writes" in output and "exchanges go to" in output
    assert "takes writes again" in output
    assert count(db) == len(answered), output[-2000:]
    assert f"saw {len(answered)} exchanges, stored {len(answered)}" in output


def test_a_clean_stop_while_the_store_is_locked_is_not_called_unclean_next_time(tmp_path, upstream):
    """SIGTERM while another process holds the store: the recorder cannot clear its
    running mark, so it spools what it holds and says, next to the spool, that it stopped
    cleanly; the next start replays the spool and says the stop was clean."""
    db = tmp_path / "t.db"
    open_store(str(db)).close()
    proxy = Mitmdump(tmp_path / "mitm", db=str(db))
    answered: list[float] = []
    holder = None
    try:
        drive(proxy.port, upstream, 0.8, answered)
        wait_until(lambda: count(db) == len(answered))
        holder = Holder(db)
        drive(proxy.port, upstream, 1.0, answered)
        proxy.stop()  # SIGTERM, the store still locked
    finally:
        if holder is not None:
            holder.release()
    assert list((tmp_path / "t.db.spool").glob("*.rows.stopped"))
    again = Mitmdump(tmp_path / "mitm2", db=str(db))
    wait_until(lambda: count(db) == len(answered), timeout=20)
    output = again.stop()
    assert "stopped cleanly while the store was busy" in output and "replayed now" in output, output[-2000:]
    assert "uncleanly" not in output
    assert count(db) == len(answered)
    assert not list((tmp_path / "t.db.spool").glob("*"))  # spool and its mark gone


def test_kill_9_loses_at_most_the_last_commit_interval_and_the_next_start_says_so(tmp_path, upstream):
    db = tmp_path / "k.db"
    open_store(str(db)).close()
    proxy = Mitmdump(tmp_path / "mitm", db=str(db))
    answered: list[float] = []
    worker = threading.Thread(target=drive, args=(proxy.port, upstream, 30, answered))
    worker.start()
    time.sleep(3)
    killed_at = time.monotonic()
    proxy.process.send_signal(signal.SIGKILL)
    proxy.process.wait()
    worker.join(10)
    proxy.stop()
    before_kill = [t for t in answered if t <= killed_at]
    lost = len(before_kill) - count(db)
    window = [t for t in before_kill if t > killed_at - 1.0]  # 4 commit intervals of 250 ms, for scheduling
    assert 0 <= lost <= len(window), f"lost {lost} of {len(before_kill)}; {len(window)} in the last second"
    with sqlite3.connect(db) as conn:
        assert conn.execute("pragma integrity_check").fetchone()[0] == "ok"
    again = Mitmdump(tmp_path / "mitm2", db=str(db))
    wait_until(lambda: "stopped uncleanly" in again.output())  # asserted below, after the stop
    output = again.stop()
    assert "the last run on this store (capture 1, pid" in output and "stopped uncleanly" in output


def test_kill_9_while_spooling_then_the_next_start_replays_the_spool(tmp_path, upstream):
    db = tmp_path / "s.db"
    open_store(str(db)).close()
    holder = Holder(db)  # locked before the proxy starts: it never writes to the store
    answered: list[float] = []
    try:
        proxy = Mitmdump(tmp_path / "mitm", db=str(db))
        drive(proxy.port, upstream, 2.5, answered)
        time.sleep(0.6)  # the batch after the last request reaches the spool
        proxy.process.send_signal(signal.SIGKILL)
        proxy.process.wait()
        proxy.stop()
    finally:
        holder.release()
    spools = list((tmp_path / "s.db.spool").glob("*.rows"))
    assert spools and count(db) == 0
    again = Mitmdump(tmp_path / "mitm2", db=str(db))
    deadline = time.monotonic() + 20
    while count(db) < len(answered) - 5 and time.monotonic() < deadline:
        time.sleep(0.2)
    output = again.stop()
    assert (
        "stopped uncleanly before it could write to it; its spool holds" in output
        and "replayed now" in output
    )
    assert len(answered) - 5 <= count(db) <= len(answered)  # all but what waited for the spool's next write
    assert not list((tmp_path / "s.db.spool").glob("*.rows"))
