"""Ctrl-C as a user gives it: SIGINT to the whole process group of a command running on a
terminal (a pseudo-terminal here), at several moments of its work, many times over.

Every trial must end within a bound (no hang), with exit status 130 (or 0 when the work
was already done), one line saying what happened and no traceback, no worker process
left behind, and a store that holds all of the interrupted file or none of it.
"""

from __future__ import annotations

import os
import pty
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, run_cli
from test_har_fastpath import entry, write_har

pytestmark = pytest.mark.slow
# The tests that share the big file, and those that share the store made of it: two groups,
# each on one worker, so each shared thing is made once per group.
ON_THE_BIG_FILE = pytest.mark.xdist_group("interrupts-file")
ON_THE_BIG_STORE = pytest.mark.xdist_group("interrupts-store")

ENTRIES = 100_000  # ~53 MB: an import takes seconds here, so a Ctrl-C lands in the middle of it
BOUND = 60  # seconds a trial may take, interrupted or not
# The installed command, as users run it. Before its first line runs, the interpreter
# starts (~15 ms here, more under load): a Ctrl-C then gets Python's own handling, so
# the earliest moment below leaves that time.
SCRIPT = Path(sys.executable).parent / "redirect-audit"


FOREGROUND = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT}); os.execv(sys.argv[1], sys.argv[1:])"
)


class Trial:
    """One command on a pseudo-terminal, in a process group of its own, as a shell runs it."""

    def __init__(self, *args: str, cwd: Path, program: list[str] | None = None):
        master, slave = pty.openpty()
        self.proc = subprocess.Popen(
            # Ctrl-C at its default and not blocked first, as a shell gives a foreground job:
            # whatever disposition or mask the test process has is not the command's
            [sys.executable, "-c", FOREGROUND, *(program or [str(SCRIPT)]), *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            cwd=cwd,
            start_new_session=True,
            env={**os.environ, "COLUMNS": "100"},
        )
        os.close(slave)
        self.master = master
        self.chunks: list[bytes] = []
        self.reader = threading.Thread(target=self._drain, daemon=True)
        self.reader.start()

    def _drain(self) -> None:
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:  # EIO: the terminal's last writer is gone
                return
            if not data:
                return
            self.chunks.append(data)

    def ctrl_c(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGINT)  # what the terminal does: the whole foreground group
        except ProcessLookupError:
            pass

    def finish(self) -> tuple[int, str]:
        try:
            code = self.proc.wait(timeout=BOUND)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            pytest.fail(f"hung: still running {BOUND} s after Ctrl-C; output: {self.output()[-2000:]!r}")
        self.reader.join(5)
        os.close(self.master)
        return code, self.output()

    def output(self) -> str:
        return b"".join(self.chunks).decode("utf-8", "replace")

    def group_is_gone(self) -> bool:
        """No process of the command's group is left (its workers included)."""
        for _ in range(50):
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                return True
            time.sleep(0.1)
        return False


def exchanges_in(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        assert conn.execute("pragma integrity_check").fetchone()[0] == "ok"
        return conn.execute("select count(*) from exchanges").fetchone()[0]


def chains_in(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute("select count(*) from chains").fetchone()[0]


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("interrupts") / "big.har"
    write_har(path, [entry(i) for i in range(ENTRIES)])
    return path


@pytest.fixture(scope="module")
def big_store(big, tmp_path_factory) -> Path:
    """The big file imported but not analyzed yet."""
    db = tmp_path_factory.mktemp("interrupts-store") / "big.db"
    done = run_cli("import-har", str(big), "--db", str(db), timeout=300)
    assert done.returncode == 0, done.stderr
    return db


def results_of(db: Path) -> tuple[list[tuple], ...]:
    """Every chain, hop and finding the store holds, ids included."""
    with sqlite3.connect(db) as conn:
        return tuple(
            conn.execute(f"SELECT * FROM {table} ORDER BY {order}").fetchall()
            for table, order in (("chains", "id"), ("hops", "chain_id, idx"), ("findings", "id"))
        )


@pytest.fixture(scope="module")
def big_results(big_store, tmp_path_factory) -> tuple[list[tuple], ...]:
    """The big store's results analyzed without interruption: what every interrupted
    analysis must come to once the next reading command finishes it."""
    reference = tmp_path_factory.mktemp("interrupts-reference") / "ref.db"
    shutil.copy(big_store, reference)
    done = run_cli("analyze", "--db", str(reference), timeout=300)
    assert done.returncode == 0, done.stderr
    results = results_of(reference)
    assert len(results[0]) > 1000 and len(results[2]) > 0
    return results


def no_traceback(text: str) -> None:
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]


# Moments (seconds after the start) at which Ctrl-C is given: before the modules are
# loaded, while they load, and at several points of the work.
IMPORT_MOMENTS = [0.1, 0.3, 0.8, 1.5, 2.5, 4.0]


# Before about 0.5 s the command is still loading its modules, whatever --workers says:
# the parallel import is interrupted only once it can have started its workers.
IMPORT_TRIALS = [(m, "0") for m in IMPORT_MOMENTS] + [(m, "2") for m in IMPORT_MOMENTS if m >= 0.8]


@ON_THE_BIG_FILE
@pytest.mark.parametrize(
    "moment, workers",
    IMPORT_TRIALS,
    ids=[f"{m}-{'serial' if w == '0' else 'parallel'}" for m, w in IMPORT_TRIALS],
)
def test_ctrl_c_during_an_import(big, tmp_path, workers, moment):
    db = tmp_path / "s.db"
    small = ROOT / "tests" / "fixtures" / "rules" / "md-307-post-to-get.har"
    trial = Trial("import-har", str(small), str(big), "--db", str(db), "--workers", workers, cwd=tmp_path)
    time.sleep(moment)
    trial.ctrl_c()
    code, out = trial.finish()
    no_traceback(out)
    assert trial.group_is_gone(), "a worker process outlived the command"
    if code in (0, -signal.SIGINT) and f"imported {ENTRIES} entries" in out:
        # done before the signal arrived (or it came as the interpreter exited, when
        # Python has given SIGINT back to the system: a shell reports that as 130 too)
        assert exchanges_in(db) == 2 + ENTRIES
        return
    if code == -signal.SIGINT and not out.strip():
        # so early (a loaded machine, 0.1 s in) that the new interpreter had not set its
        # handler yet: the signal's default ended it, a shell's 130, before anything began
        assert not db.exists() or exchanges_in(db) == 0
        return
    assert code == 130, out[-2000:]
    stored = exchanges_in(db) if db.exists() else 0  # a store interrupted while being created is removed
    if stored == 2 + ENTRIES:  # the signal came after the big file's commit: the message must say so
        assert (
            f"redirect-audit: interrupted: {big} was stored just before; the 1 file before it were stored"
            in out
        )
        return
    assert stored in (0, 2), "the interrupted file was stored in part"
    if stored == 2:  # the small file went in first; nothing of the big one
        said = (
            # during the big file
            f"redirect-audit: interrupted: nothing of {big} was stored; the 1 file before it were stored",
            # between the two (a loaded machine's window)
            f"redirect-audit: interrupted: {small} was stored just before; nothing after it was imported",
        )
        assert any(line in out for line in said), out[-2000:]
    else:
        assert "redirect-audit: interrupted" in out, out[-2000:]
    lines = [line for line in out.replace("\r", "\n").splitlines() if "redirect-audit" in line]
    assert len(lines) == 1, lines  # one line says it


@ON_THE_BIG_STORE
@pytest.mark.parametrize("moment", [0.3, 1.0, 2.0])
def test_ctrl_c_during_analyze_leaves_the_store_as_it_was(big_store, big_results, tmp_path, moment):
    db = tmp_path / "a.db"
    shutil.copy(big_store, db)
    trial = Trial("analyze", "--db", str(db), cwd=tmp_path)
    time.sleep(moment)
    trial.ctrl_c()
    code, out = trial.finish()
    no_traceback(out)
    if code in (0, -signal.SIGINT) and re.search(r"\d+ findings?\b", out):
        assert chains_in(db) > 0
        return
    assert code == 130
    said = [line.strip() for line in out.splitlines() if "redirect-audit" in line]
    assert exchanges_in(db) == ENTRIES
    if said == [
        "redirect-audit: interrupted after the analysis finished: its results are stored and the store "
        "counts as analyzed"
    ]:  # the signal came after the last commit: what it says must be so
        assert results_of(db) == big_results
        return
    assert said in (
        [
            "redirect-audit: interrupted: the clients analyzed so far have their new results (a big one "
            "read in time windows: those of the windows done), the others keep their earlier ones; the "
            "store still counts as not analyzed"
        ],
        ["redirect-audit: interrupted"],
    ), said  # the latter: before it began
    with sqlite3.connect(db) as conn:  # not recorded as analyzed: the next reading command finishes the job
        assert conn.execute("SELECT value FROM meta WHERE key = 'analyzed_generation'").fetchone() is None
    finished = run_cli("findings", "-f", "json", "--db", str(db), timeout=300, cwd=tmp_path)
    assert finished.returncode == 0 and "analyzing it now" in finished.stderr
    assert results_of(db) == big_results  # every chain, hop and finding, ids included


@ON_THE_BIG_STORE
@pytest.mark.parametrize("moment", [0.5, 2.0, 4.0])
def test_ctrl_c_during_a_report_leaves_no_half_file(big_store, tmp_path, moment):
    db = tmp_path / "r.db"
    shutil.copy(big_store, db)
    report = tmp_path / "report.html"
    trial = Trial("findings", "--db", str(db), "--format", "html", "-o", str(report), cwd=tmp_path)
    time.sleep(moment)
    trial.ctrl_c()
    code, out = trial.finish()
    no_traceback(out)
    assert trial.group_is_gone()
    if code in (0, -signal.SIGINT) and "wrote" in out:
        assert report.stat().st_size > 0
        return
    assert code == 130 and "redirect-audit: interrupted" in out, out[-2000:]
    assert not report.exists()
    exchanges_in(db)  # and the store is intact


@pytest.mark.parametrize("moment", [0.08, 0.15, 0.25, 0.4])
def test_ctrl_c_while_starting(tmp_path, moment):
    """Interrupted while its modules load (what `import-har` loads takes ~0.5 s here)."""
    assert SCRIPT.exists(), "the console script is installed with the package"
    trial = Trial(
        "import-har",
        "--db",
        str(tmp_path / "s.db"),
        str(ROOT / "tests" / "fixtures" / "rules" / "md-307-post-to-get.har"),
        cwd=tmp_path,
    )
    time.sleep(moment)
    trial.ctrl_c()
    code, out = trial.finish()
    no_traceback(out)
    assert code in (0, 130, -signal.SIGINT), out
    if code == 130:
        assert "redirect-audit: interrupted" in out
        assert not (tmp_path / "s.db").exists() or exchanges_in(tmp_path / "s.db") == 0


def test_a_ctrl_c_that_lands_in_a_weakref_callback_is_delivered_again_not_swallowed():
    """Python prints a KeyboardInterrupt raised in a finalizer or weakref callback as
    "Exception ignored" and goes on (seen once under load: the import finished after
    Ctrl-C, with a traceback). The entry point delivers it again, once the callback is over."""
    import textwrap

    code = textwrap.dedent("""
        import _signal, os, signal, sys, time, weakref
        import analyzer.__main__ as entry
        _signal.signal(_signal.SIGINT, entry._on_sigint)
        sys.unraisablehook = entry._unraisable
        class Thing:
            pass
        def callback(ref):
            os.kill(os.getpid(), signal.SIGINT)  # lands while the callback runs
            for _ in range(1000):
                pass
        thing = Thing()
        ref = weakref.ref(thing, callback)
        try:
            del thing
            for _ in range(200):  # short sleeps: the signal is handled between two of them
                time.sleep(0.01)
            print("swallowed")
        except KeyboardInterrupt:
            print("delivered")
    """)
    for _ in range(3):
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=30
        )
        assert done.stdout.strip() == "delivered" and done.stderr == "", done.stderr


@pytest.mark.parametrize("moment", [0.4, 0.9, 3.0])
def test_ctrl_c_at_any_moment_of_the_proxy_s_life_exits_130_without_a_traceback(tmp_path, moment):
    """While the command loads, while mitmproxy loads (after the exec), and while it runs:
    one line or the recorder's totals, status 130, never a KeyboardInterrupt traceback."""
    from proxyrun import free_port

    port = free_port()
    conf = tmp_path / "conf"
    trial = Trial(
        "proxy", "--db", str(tmp_path / "p.db"), "-p", str(port), "--confdir", str(conf), cwd=tmp_path
    )
    time.sleep(moment)
    trial.ctrl_c()
    code, out = trial.finish()
    no_traceback(out)
    assert code == 130, out[-2000:]
    assert trial.group_is_gone()
    if moment >= 3.0:  # it was running: mitmproxy's own shutdown, the recorder's totals
        assert "saw 0 exchanges, stored 0" in out, out[-2000:]
    else:
        assert "redirect-audit: interrupted" in out, out[-2000:]
