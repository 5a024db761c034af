"""The recorder's work on the proxy's own thread, timed inside a loaded mitmdump.

    apt-get install nginx-light hey
    uv run python benchmarks/bench_hook.py --requests 30000 --rounds 6

Each round starts a fresh mitmdump with the recorder (benchmarks/timed_recorder.py,
which adds up the thread CPU time spent in the recorder's hooks and batch
conversions), sends it --requests requests through `hey` to a local nginx, stops it
and prints that time per flow. Rounds alternate between the recorder as shipped
(flows converted in batches on the event loop) and CONVERT_BATCH=1 (each flow
converted as its response arrives). Each hook call also pays for two clock reads
(a system call each), in both modes alike. benchmarks/bench_convert.py times the same
work in a warm loop, outside the proxy.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_proxy
from bench_proxy import free_port, hey, start_nginx, wait_for_port

TIMED = Path(__file__).resolve().parent / "timed_recorder.py"
MODES = {"batched": None, "one at a time": "1"}


def round_(
    tmp: Path, target: int, requests: int, concurrency: int, batch: str | None
) -> tuple[float, int, int]:
    """(µs of main-thread recorder CPU per flow, flows, requests answered) for one fresh mitmdump."""
    port = free_port()
    out = tmp / "hook.txt"
    env = {**os.environ, "BENCH_HOOK_OUT": str(out)}
    if batch is not None:
        env["REDIRECT_AUDIT_CONVERT_BATCH"] = batch
    proc = subprocess.Popen(
        bench_proxy.mitmdump_args(tmp, port, True, tmp / "hook.db"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        answered = hey(port, target, requests, concurrency)["ok"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    nanoseconds, flows = (int(x) for x in out.read_text().split())
    return nanoseconds / 1000 / max(flows, 1), flows, answered


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=30_000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=6, help="fresh mitmdumps, alternating the two modes")
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    bench_proxy.SCRIPT[0] = str(TIMED)
    results: dict[str, list[float]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        bench_proxy.RECORDER_SET.extend(["--set", f"redirect_audit_db={tmp / 'hook.db'}"])
        nginx, target = start_nginx(tmp)
        try:
            for k in range(args.rounds):
                mode = list(MODES)[k % 2]
                per_flow, flows, answered = round_(tmp, target, args.requests, args.concurrency, MODES[mode])
                results[mode].append(per_flow)
                print(
                    f"round {k + 1}: {mode:13s} {per_flow:6.1f} µs of main-thread CPU per flow "
                    f"({flows} flows, {answered} answered)",
                    flush=True,
                )
        finally:
            nginx.send_signal(signal.SIGQUIT)
            nginx.wait(timeout=30)
    medians = {mode: statistics.median(values) for mode, values in results.items() if values}
    for mode, value in medians.items():
        print(f"{mode:13s}: median {value:.1f} µs per flow over {len(results[mode])} rounds")
    if len(medians) == 2:
        print(f"batched / one at a time: {medians['batched'] / medians['one at a time']:.2f}")


if __name__ == "__main__":
    main()
