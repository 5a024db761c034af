"""Analysis on a cluster against the local analysis, on one machine: time, and the findings compared.

    uv run python benchmarks/bench_distributed.py --exchanges 1000000 --clients 1000
    uv run python benchmarks/bench_distributed.py --exchanges 200000 --clients 1 --engines dask

A SQLite store is filled with bench_fleet's browser-like rows (`--clients` clients) and
exported as Parquet; then, each in a child process: `analyze --full` (local, one process),
Dask (`analyze --dask local:N --parquet DIR`: N worker processes here, results back into a
copy of the store) and Spark (`local[N]`, groupBy(client).applyInPandas, findings
collected). Each prints its seconds and findings count; the findings must be the local
analysis's (counted by rule). On a 2-core machine a cluster of two workers measures the
adapters' overhead, not a speed-up: the per-client work is the same function. Nothing is
asserted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

import bench_fleet  # noqa: E402

COUNT = """
import json, sys, sqlite3
rows = sqlite3.connect(sys.argv[1]).execute("SELECT rule, count(*) FROM findings GROUP BY rule").fetchall()
print(json.dumps(dict(rows)))
"""

SPARK = """
import json, os, sys, time
os.environ["SPARK_LOCAL_IP"] = "127.0.0.1"
from pyspark.sql import SparkSession
from analyzer import distributed
t = time.perf_counter()
spark = (SparkSession.builder.master(f"local[{sys.argv[2]}]").config("spark.ui.enabled", "false")
         .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
         .config("spark.driver.memory", "8g").getOrCreate())
spark.sparkContext.setLogLevel("ERROR")
started = time.perf_counter() - t
results = distributed.analyze_spark(distributed.read_exchanges_spark(spark, sys.argv[1]))
counts = {r["rule"]: r["count"] for r in results.findings.groupBy("rule").count().collect()}
print(json.dumps({"seconds": time.perf_counter() - t, "session": started, "counts": counts}))
spark.stop()
"""


def timed(*command: str, env: dict | None = None) -> float:
    start = time.perf_counter()
    done = subprocess.run(
        command, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})}
    )
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])}…: {done.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exchanges", type=int, default=1_000_000)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--engines", default="local,dask,spark")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    engines = args.engines.split(",")
    cli = [sys.executable, "-m", "analyzer"]
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "store.db"
        one = "proxy:ci-runner:8080/10.0.0.7" if args.clients == 1 else None
        filled = bench_fleet.fill(str(db), args.exchanges, args.clients, one_client=one)
        took = timed(*cli, "export", "--db", str(db), "--no-analyze", str(Path(tmp) / "export"))
        print(
            f"[{args.exchanges:,} exchanges, {args.clients:,} clients] fill {filled:.0f} s, "
            f"Parquet export {took:.1f} s",
            flush=True,
        )
        reference = None
        if "local" in engines:
            local = Path(tmp) / "local.db"
            shutil.copy(db, local)
            took = timed(*cli, "analyze", "--db", str(local), "--full")
            reference = bench_fleet.run_child(COUNT, str(local))
            print(
                f"  local analyze --full:       {took:7.1f} s, {sum(reference.values()):,} findings",
                flush=True,
            )
        if "dask" in engines:
            copy = Path(tmp) / "dask.db"
            shutil.copy(db, copy)
            took = timed(
                *cli,
                *("analyze", "--db", str(copy), "--dask", f"local:{args.workers}"),
                *("--parquet", str(Path(tmp) / "export")),
            )
            counts = bench_fleet.run_child(COUNT, str(copy))
            same = (
                "" if reference is None else (" (the local findings)" if counts == reference else " DIFFER")
            )
            print(
                f"  dask local:{args.workers} (into the store): {took:7.1f} s, "
                f"{sum(counts.values()):,} findings{same}",
                flush=True,
            )
        if "spark" in engines:
            r = bench_fleet.run_child(SPARK, str(Path(tmp) / "export"), str(args.workers))
            counts = r["counts"]
            same = (
                "" if reference is None else (" (the local findings)" if counts == reference else " DIFFER")
            )
            print(
                f"  spark local[{args.workers}] (collected):  {r['seconds']:7.1f} s "
                f"(session start {r['session']:.1f} s), {sum(counts.values()):,} findings{same}",
                flush=True,
            )


if __name__ == "__main__":
    main()
