"""HAR import throughput and peak memory on a generated HAR.

    uv run python benchmarks/bench_import.py --entries 100000
    uv run python benchmarks/bench_import.py --megabytes 200
    uv run python benchmarks/bench_import.py --megabytes 200 --filler 200   # the 100k file's entries
    uv run python benchmarks/bench_import.py --entries 100000 --pss         # memory of all processes

The HAR is written to a temporary directory, then imported --runs times, each by a
fresh child process into a new store, so peak RSS is the importer's alone (its worker
processes are reported apart); the previous run's store is deleted and synced to disk
first. Prints entries/s, MB/s, CPU time and peak RSS per run, and how long a fixed
CPU-bound loop took just after it (the machine's speed then); with --pss also the peak
of the processes' summed PSS (shared pages counted once).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psutil

HEADERS = [
    ("Accept", "text/html,application/xhtml+xml"),
    ("Accept-Encoding", "gzip, deflate, br"),
    ("Accept-Language", "en-US,en;q=0.9"),
    ("User-Agent", "Mozilla/5.0 (X11; Linux x86_64) Chrome/130.0"),
    ("Cookie", "sid=abcdef0123456789; theme=dark"),
    ("Sec-Fetch-Mode", "navigate"),
]


def entry(i: int, start: datetime, filler: str) -> dict:
    t = start + timedelta(milliseconds=i * 20)
    redirect = i % 10 == 0
    post = i % 7 == 0
    url = f"https://shop{i % 50}.example.test/p/{i % 5000}?q={i}"
    req = {
        "method": "POST" if post else "GET",
        "url": url,
        "httpVersion": "h2",
        "headers": [{"name": k, "value": v} for k, v in HEADERS],
        "queryString": [],
        "cookies": [],
        "headersSize": -1,
        "bodySize": 0,
    }
    if post:
        req["postData"] = {"mimeType": "application/json", "text": json.dumps({"item": i, "qty": 1})}
    resp_headers = [
        {"name": "content-type", "value": "text/html"},
        {"name": "cache-control", "value": "no-cache"},
    ]
    if redirect:
        resp_headers.append({"name": "location", "value": f"/p/{i % 5000}/next"})
    return {
        "pageref": "page_1",
        "startedDateTime": t.isoformat().replace("+00:00", "Z"),
        "time": 12.5,
        "request": req,
        "response": {
            "status": 302 if redirect else 200,
            "statusText": "",
            "httpVersion": "h2",
            "headers": resp_headers,
            "cookies": [],
            "redirectURL": "",
            "content": {"size": len(filler), "mimeType": "text/html", "text": filler},
            "headersSize": -1,
            "bodySize": -1,
        },
        "cache": {},
        "timings": {
            "blocked": 1,
            "dns": -1,
            "connect": -1,
            "ssl": -1,
            "send": 0.1,
            "wait": 10,
            "receive": 1.4,
        },
        "connection": str(i % 6),
    }


def write_har(path: Path, entries: int | None, megabytes: int | None, filler_bytes: int | None = None) -> int:
    start = datetime(2026, 11, 1, tzinfo=UTC)
    filler = "x" * (filler_bytes if filler_bytes is not None else 1800 if megabytes else 200)
    target = megabytes * 1024 * 1024 if megabytes else None
    written = count = 0
    with path.open("w") as fh:
        fh.write(
            '{"log": {"version": "1.2", "creator": {"name": "bench", "version": "1"}, "pages": [], "entries": [\n'
        )
        while (entries is not None and count < entries) or (target is not None and written < target):
            text = ("," if count else "") + json.dumps(entry(count, start, filler))
            fh.write(text)
            written += len(text)
            count += 1
        fh.write("\n]}}\n")
    return count


CHILD = """
import sys, time, resource
from analyzer.store import open_store
from analyzer.ingest import import_har
store = open_store(sys.argv[2])
t = time.perf_counter()
result = import_har(store, sys.argv[1], workers=None if sys.argv[3] == "auto" else int(sys.argv[3]))
seconds = time.perf_counter() - t
own = resource.getrusage(resource.RUSAGE_SELF)
kids = resource.getrusage(resource.RUSAGE_CHILDREN)
print(result.entries, seconds, own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime,
      own.ru_maxrss / 1024, kids.ru_maxrss / 1024)
"""


def calibration_ms() -> float:
    """CPU milliseconds of a fixed pure-Python loop: the machine's speed right now.

    A shared VM runs the same work 1.5 times slower in some minutes than in others; an
    import measured in a slow minute shows it here too, so runs can be compared."""
    start = time.process_time()
    total = 0
    for i in range(2_000_000):
        total += i * i % 7
    return (time.process_time() - start) * 1000


def run_sampling_pss(command: list[str]) -> tuple[str, float]:
    """Run the importer; return its stdout and the peak of its and its workers' summed PSS.

    RSS counts the pages forked workers share with their parent once per process; PSS
    splits shared pages between the processes that map them, so the sum is the memory
    the import really occupies. Sampled every 20 ms.
    """
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    peak = 0.0
    try:
        me = psutil.Process(proc.pid)
        while proc.poll() is None:
            total = 0
            try:
                for p in [me, *me.children(recursive=True)]:
                    total += p.memory_full_info().pss
            except psutil.Error:  # a worker came or went between listing and reading
                pass
            peak = max(peak, total / 2**20)
            time.sleep(0.02)
    finally:
        stdout, _ = proc.communicate(timeout=600)
    if proc.returncode:
        raise SystemExit(f"importer failed with status {proc.returncode}")
    return stdout, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int)
    parser.add_argument("--megabytes", type=int)
    parser.add_argument("--runs", type=int, default=3, help="imports of the same file, each into a new store")
    parser.add_argument("--workers", default="auto", help="converter processes (auto: the importer decides)")
    parser.add_argument(
        "--pss",
        action="store_true",
        help="also sample the summed PSS of the importer and its "
        "workers every 20 ms (the sampling costs CPU: judge speed without it)",
    )
    parser.add_argument(
        "--filler",
        type=int,
        help="bytes of response text per entry (default: 200 with "
        "--entries, about 1.3 KB entries; 1800 with --megabytes, about 2.9 KB entries)",
    )
    args = parser.parse_args()
    if not args.entries and not args.megabytes:
        args.entries = 100_000
    with tempfile.TemporaryDirectory() as tmp:
        har = Path(tmp) / "bench.har"
        count = write_har(har, args.entries, args.megabytes, args.filler)
        os.sync()  # let writeback of the new file finish before the clock starts
        size_mb = har.stat().st_size / 1e6
        print(f"file: {size_mb:.1f} MB, {count} entries; workers: {args.workers}")
        rates = []
        for run in range(1, args.runs + 1):
            for old in Path(tmp).glob("bench*.db*"):  # the previous run's store
                old.unlink()
            os.sync()  # and its writeback, which would otherwise compete with this run
            db = Path(tmp) / f"bench{run}.db"
            command = [sys.executable, "-c", CHILD, str(har), str(db), args.workers]
            if args.pss:
                stdout, pss = run_sampling_pss(command)
            else:
                stdout = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            entries, seconds, own_cpu, kids_cpu, own_rss, kids_rss = (float(x) for x in stdout.split())
            rates.append(entries / seconds)
            print(
                f"run {run} (calibration loop {calibration_ms():.0f} ms): {int(entries)} entries in {seconds:.2f} s = {entries / seconds:,.0f} entries/s, "
                f"{size_mb / seconds:.1f} MB/s; CPU {own_cpu:.2f} s main + {kids_cpu:.2f} s workers; "
                f"peak RSS {own_rss:.0f} MB main, {kids_rss:.0f} MB largest worker"
                + (f"; peak PSS of all processes together {pss:.0f} MB" if args.pss else "")
            )
        print(f"median: {statistics.median(rates):,.0f} entries/s")


if __name__ == "__main__":
    main()
