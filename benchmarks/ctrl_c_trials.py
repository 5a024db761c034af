"""Ctrl-C trials: how often an interrupted import hangs, prints a traceback or stores part of a file.

    uv run python benchmarks/ctrl_c_trials.py [--trials 20] [--workers 2] [--command PATH]

Each trial runs `import-har` of a generated ~53 MB HAR on a pseudo-terminal, in a process
group of its own, and sends SIGINT to the group (as a terminal does) at a random moment
between 0.1 s and 4 s; a trial still running 30 s later counts as a hang (and is killed).
Prints, per outcome: exit statuses, hangs, tracebacks, partial stores, leftover processes,
and messages that say the opposite of what the store holds ("nothing of X was stored").
`--command` runs another build of the tool (an older checkout's .venv/bin/redirect-audit).
"""

from __future__ import annotations

import argparse
import collections
import os
import pty
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_har_fastpath import entry, write_har

ENTRIES = 100_000
HANG = 30.0


def trial(command: list[str], har: Path, db: Path, workers: str, moment: float) -> dict:
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [*command, "import-har", str(har), "--db", str(db), "--workers", workers],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
    )
    os.close(slave)
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    time.sleep(moment)
    try:
        os.killpg(proc.pid, signal.SIGINT)
    except ProcessLookupError:
        pass
    signalled = time.monotonic()
    hung = False
    try:
        code = proc.wait(timeout=HANG)
    except subprocess.TimeoutExpired:
        hung = True
        if os.environ.get("CTRL_C_TRIALS_DUMP"):  # what the hung processes were doing
            group = subprocess.run(
                ["pgrep", "-g", str(proc.pid)], capture_output=True, text=True
            ).stdout.split()
            for pid in group:
                subprocess.run(["py-spy", "dump", "--pid", pid], check=False)
        os.killpg(proc.pid, signal.SIGKILL)
        code = proc.wait()
    stopped_in = time.monotonic() - signalled
    reader.join(5)
    os.close(master)
    leftover = False
    time.sleep(0.5)
    try:
        os.killpg(proc.pid, 0)
        leftover = True
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    out = b"".join(chunks).decode("utf-8", "replace")
    stored = 0
    if db.exists():
        try:
            with sqlite3.connect(db) as conn:
                stored = conn.execute("select count(*) from exchanges").fetchone()[0]
        except sqlite3.Error:
            stored = -1
    said_nothing = "nothing of" in out
    return {
        "code": code,
        "hung": hung,
        "traceback": "Traceback" in out,
        "partial": stored not in (0, ENTRIES),
        "leftover": leftover,
        "completed": stored == ENTRIES,
        "wrong message": (stored == ENTRIES and said_nothing)
        or (stored == 0 and "was stored just before" in out),
        "output": out,
        "stopped_in": stopped_in,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--workers", default="2")
    parser.add_argument("--command", default=str(Path(sys.executable).parent / "redirect-audit"))
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    random.seed(args.seed)
    work = Path(tempfile.mkdtemp(prefix="ctrl-c-"))
    har = work / "big.har"
    write_har(har, [entry(i) for i in range(ENTRIES)])
    results = []
    for n in range(args.trials):
        db = work / f"t{n}.db"
        results.append(trial([args.command], har, db, args.workers, random.uniform(0.1, 4.0)))
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
    codes = collections.Counter(r["code"] for r in results)
    print(f"{args.command}, import-har --workers {args.workers}, {args.trials} trials")
    print(
        f"  exit statuses: {dict(codes)}; completed before the signal: {sum(r['completed'] for r in results)}"
    )
    for key in ("hung", "traceback", "partial", "leftover", "wrong message"):
        print(f"  {key}: {sum(r[key] for r in results)}")
    waits = sorted(r["stopped_in"] for r in results if r["code"] == 130)
    if waits:
        print(
            f"  from Ctrl-C to exit when interrupted: median {waits[len(waits) // 2]:.2f} s, max {waits[-1]:.2f} s"
        )
    for r in results:
        if r["hung"] or r["traceback"] or r["wrong message"]:
            print("---- output of a trial that went wrong:\n" + r["output"][-1500:])
    har.unlink()
    work.rmdir() if not any(work.iterdir()) else None


if __name__ == "__main__":
    main()
