"""Memory and time of analyzer.frames on a large store (run bench_analyze's store builder first).

    uv run python benchmarks/bench_frames.py --exchanges 1000000

Builds a store of N exchanges (10% redirects, as bench_analyze does), analyzes it, then
loads each frame in a fresh child process and prints its rows, seconds, the frame's
own memory (pandas deep usage) and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_analyze import rows

from analyzer.analysis import analyze
from analyzer.store import add_capture, open_store, write_exchanges

CHILD = """
import resource, sys, time
from analyzer import frames
t = time.perf_counter()
frame = getattr(frames, sys.argv[2])(sys.argv[1])
seconds = time.perf_counter() - t
mb = frame.memory_usage(deep=True).sum() / 1e6
print(len(frame), seconds, mb, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exchanges", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = str(Path(tmp) / "frames.db")
        store = open_store(db)
        with store.begin() as conn:
            add_capture(conn, source="proxy", path="bench")
            written = write_exchanges(conn, rows(args.exchanges))
        analyze(store)
        store.close()
        print(f"store: {written:,} exchanges")
        for name in ("exchanges", "hops", "chains", "findings", "clients", "temporary_redirects"):
            done = subprocess.run(
                [sys.executable, "-c", CHILD, db, name], capture_output=True, text=True, check=True
            )
            count, seconds, frame_mb, peak = done.stdout.split()
            print(
                f"{name:20s} {int(count):>9,} rows in {float(seconds):6.2f} s; frame {float(frame_mb):7.1f} MB, "
                f"peak RSS {float(peak):6.0f} MB"
            )


if __name__ == "__main__":
    main()
