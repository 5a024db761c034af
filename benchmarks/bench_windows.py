"""`analyze` in time windows: peak memory and time for one huge client and for many.

    uv run python benchmarks/bench_windows.py --exchanges 1000000,10000000 --clients 1,360000
    uv run python benchmarks/bench_windows.py --exchanges 1000000 --clients 1 --windows 10000,50000,0
    uv run python benchmarks/bench_windows.py --exchanges 1000000 --clients 1 --append 0.01
    uv run python benchmarks/bench_windows.py --exchanges 1000000 --clients 1 --append 0.01 --gap 0.001
    uv run python benchmarks/bench_windows.py --exchanges 1000000 --clients 1 --append 0.01 --spacing 2.6

Stores are filled directly with bench_fleet's browser-like rows (14 request and 10
response headers, 10% redirects followed by their client, 1 in 7 a POST), every exchange
from one client or spread over N clients, on SQLite and (with --engines) PostgreSQL in a
throwaway local cluster. Each analysis runs in a child process and prints its seconds
and peak RSS (the kernel's high-water mark of the child) against the target of
issue 30: 300 MB for 10M exchanges, whatever the clients. `--windows 0` is one window
per batch: the memory of analysis before windows. `--append F` then adds F of the
store's size to the same client(s), later in time, and times the incremental analysis
taken up at a checkpoint against the same without checkpoints (from each client's first
exchange) and the full analysis. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import signal
import sqlite3
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

import bench_fleet  # noqa: E402
import pgcluster  # noqa: E402
from targets import TARGETS, verdict  # noqa: E402

TARGET_MB = TARGETS["one-client"].limit

ANALYZE = """
import json, sys, time, resource
from analyzer.store import open_store
from analyzer.analysis import analyze, WINDOW_EXCHANGES
import analyzer.analysis
store = open_store(sys.argv[1], create=False)
window = int(sys.argv[2]) or 10**12
if sys.argv[4] == "no-checkpoints":
    analyzer.analysis.CHECKPOINTS_KEPT = 0
profile = sys.argv[5] if len(sys.argv) > 5 else ""
if profile:
    import cProfile
    profiler = cProfile.Profile()
    profiler.enable()
t = time.perf_counter()
r = analyze(store, full=sys.argv[3] == "full", window_exchanges=window)
if profile:
    profiler.disable()
    profiler.dump_stats(profile)
print(json.dumps({"seconds": time.perf_counter() - t, "chains": r.chain_count, "findings": r.finding_count,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def analyze(url: str, window: int, full: bool = True, checkpoints: bool = True, profile: str = "") -> dict:
    return bench_fleet.run_child(
        ANALYZE,
        url,
        str(window),
        "full" if full else "incremental",
        "checkpoints" if checkpoints else "no-checkpoints",
        profile,
    )


def append(url: str, n: int, clients: int, one: str | None, args, tmp: str | None) -> None:
    """+share of the store to the same client(s), `--gap` seconds after its last exchange, analyzed
    incrementally with checkpoints and without (SQLite: on a copy), and in full."""
    window = int(args.windows.split(",")[0]) or 10**12
    extra = int(n * args.append)
    copy = None
    if tmp is not None:  # SQLite's backup: the file and what its WAL holds
        copy = str(Path(tmp) / "without-checkpoints.db")
        with sqlite3.connect(url) as source, sqlite3.connect(copy) as target:
            source.backup(target)
            target.execute("DELETE FROM analysis_checkpoints")  # from the client's first exchange
    for target in [url] + ([copy] if copy else []):
        bench_fleet.fill(
            target,
            extra,
            max(clients, 1),
            first_seq=n + 10,
            t0=bench_fleet.T0 + args.gap - 11 * args.spacing,  # its seq n + 10 starts `gap` after seq n - 1
            one_client=one,
            spacing=args.spacing,
        )
    timed = analyze(url, window, full=False, profile=args.profile)
    print(
        f"  +{args.append:.0%} ({extra:,} exchanges) incremental, from a checkpoint: {timed['seconds']:.1f} s, "
        f"peak RSS {timed['rss_mb']:.0f} MB",
        flush=True,
    )
    if copy:
        without = analyze(copy, window, full=False, checkpoints=False)
        print(f"  the same from each client's first exchange: {without['seconds']:.1f} s", flush=True)
        Path(copy).unlink()
    whole = analyze(url, window)
    print(f"  full analysis after it: {whole['seconds']:.1f} s", flush=True)
    note = (
        f"{n:,} exchanges over {clients:,} clients, {args.gap:g} s after the last"
        if n != 1_000_000 or clients != 1
        else f"{args.gap:g} s after the last"
    )
    print(verdict("append", 100 * timed["seconds"] / whole["seconds"], note), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exchanges", default="1000000", help="comma-separated store sizes")
    parser.add_argument("--clients", default="1,360000", help="comma-separated client counts")
    parser.add_argument("--engines", default="sqlite", help="sqlite,postgresql")
    parser.add_argument(
        "--windows", default="25000", help="window sizes (exchanges); 0: one window per batch"
    )
    parser.add_argument("--append", type=float, default=0.0, help="then append this share and analyze again")
    parser.add_argument(
        "--gap",
        type=float,
        default=60.0,
        help="seconds from the last exchange to the first appended one (60: the next run; 0.001: no pause)",
    )
    parser.add_argument(
        "--spacing",
        type=float,
        default=0.001,
        help="seconds between two exchanges (0.001: 1,000/s; 2.6: 1M in a month)",
    )
    parser.add_argument(
        "--profile", default="", help="write cProfile stats of the incremental analysis to this file"
    )
    args = parser.parse_args()
    # A killed run removes its stores too (a 10M-exchange SQLite store and its WAL take ~30 GB).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    engines = args.engines.split(",")
    cluster = pgcluster.Cluster() if "postgresql" in engines else None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for n in (int(x) for x in args.exchanges.split(",")):
                for clients in (int(x) for x in args.clients.split(",")):
                    for engine in engines:
                        name = f"w{n}c{clients}"
                        url = (
                            str(Path(tmp) / f"{name}.db")
                            if engine == "sqlite"
                            else cluster.new_database(name)
                        )
                        one = "proxy:ci-runner:8080/10.0.0.7" if clients == 1 else None
                        filled = bench_fleet.fill(
                            url, n, max(clients, 1), one_client=one, spacing=args.spacing
                        )
                        print(
                            f"[{engine} {n:,} exchanges, {clients:,} clients] fill {filled:.0f} s", flush=True
                        )
                        for window in (int(x) for x in args.windows.split(",")):
                            r = analyze(url, window)
                            print(
                                f"  window {window or 'whole':>7}: {r['seconds']:7.1f} s, peak RSS "
                                f"{r['rss_mb']:6.0f} MB, {r['chains']:,} chains, {r['findings']:,} findings",
                                flush=True,
                            )
                            if window == int(args.windows.split(",")[0]):  # the default's
                                key = "one-client" if clients == 1 else "many-clients"
                                note = (
                                    f"{engine}, {n:,} exchanges"
                                    if n != 10_000_000 or engine != "sqlite"
                                    else ""
                                )
                                print(verdict(key, r["rss_mb"], note), flush=True)
                        if args.append:
                            append(url, n, clients, one, args, tmp if engine == "sqlite" else None)
                        if engine == "sqlite":
                            Path(url).unlink()
    finally:
        if cluster is not None:
            cluster.stop()


if __name__ == "__main__":
    main()
