"""What faults cost: kill -9 under load, and a store that refuses writes for minutes.

    apt-get install nginx-light hey
    uv run python benchmarks/bench_faults.py kill9 --trials 5 --flush-ms 250 [--rate 1000]
    uv run python benchmarks/bench_faults.py outage --seconds 120 [--rate 400]

kill9: mitmdump with the recorder in front of a local nginx; `hey` sends about --rate
requests a second for a few seconds, then the proxy is killed with SIGKILL. nginx's
access log says how many requests the proxy had answered (each is logged as it is
served); the store says how many it kept. Prints the loss per trial, in exchanges and
in milliseconds of traffic at the measured rate. Compare --flush-ms 2000 (the old
default) with 250 (the default now).

outage: the same set-up; after 5 s of traffic another process takes the store's write
lock (BEGIN IMMEDIATE) and holds it for --seconds while the traffic goes on. mitmdump's
RSS is sampled every 5 s. Then SIGTERM, still locked: how long until the proxy exits, and
how many exchanges it left in its spool. Then the lock goes, a new mitmdump starts on the
store and replays the spool: how many exchanges are stored against nginx's count.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from proxyrun import free_port, wait_for_port  # noqa: E402

NGINX_CONF = """
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log;
events {{ worker_connections 1024; }}
http {{
    log_format stamp '$msec';
    access_log {tmp}/access.log stamp;
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""


def nginx(tmp: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, port=port))
    proc = subprocess.Popen(
        ["nginx", "-c", str(conf), "-p", str(tmp)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_for_port(port)
    return proc, port


def served(tmp: Path) -> list[float]:
    log = tmp / "access.log"
    return [float(x) for x in log.read_text().split()] if log.exists() else []


def mitmdump(tmp: Path, db: Path, flush_ms: int) -> tuple[subprocess.Popen, int]:
    port = free_port()
    args = [
        str(Path(sys.executable).parent / "mitmdump"),
        "-q",
        "--listen-host",
        "127.0.0.1",
        "--listen-port",
        str(port),
        "--set",
        f"confdir={tmp / 'mitm'}",
        "-s",
        str(ROOT / "addons" / "redirect_recorder.py"),
        "--set",
        f"redirect_audit_db={db}",
        "--set",
        f"redirect_audit_flush_ms={flush_ms}",
    ]
    out = open(tmp / f"mitmdump-{port}.log", "wb")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    wait_for_port(port)
    return proc, port


def load(port: int, target: int, rate: int, seconds: float) -> subprocess.Popen:
    workers = 10
    return subprocess.Popen(
        [
            "hey",
            "-z",
            f"{seconds}s",
            "-c",
            str(workers),
            "-q",
            str(max(1, rate // workers)),
            "-x",
            f"http://127.0.0.1:{port}",
            f"http://127.0.0.1:{target}/",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stored(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute("select count(*) from exchanges").fetchone()[0]


def kill9(args: argparse.Namespace) -> None:
    print(f"kill -9 under ~{args.rate} req/s, commit every {args.flush_ms} ms, {args.trials} trials")
    losses, in_ms = [], []
    for trial in range(args.trials):
        tmp = Path(tempfile.mkdtemp(prefix="kill9-"))
        web, target = nginx(tmp)
        db = tmp / "k.db"
        proxy, port = mitmdump(tmp, db, args.flush_ms)
        driver = load(port, target, args.rate, 30)
        time.sleep(args.run)
        proxy.send_signal(signal.SIGKILL)
        killed = time.time()
        proxy.wait()
        driver.terminate()
        driver.wait()
        time.sleep(0.3)
        answered = [t for t in served(tmp) if t <= killed]
        rate = len([t for t in answered if t > killed - 2]) / 2
        kept = stored(db)
        with sqlite3.connect(db) as conn:
            sound = conn.execute("pragma integrity_check").fetchone()[0]
        lost = len(answered) - kept
        losses.append(lost)
        in_ms.append(1000 * lost / rate if rate else float("nan"))
        print(
            f"  trial {trial + 1}: answered {len(answered)}, stored {kept}, lost {lost} "
            f"({in_ms[-1]:.0f} ms of traffic at {rate:.0f} req/s); integrity_check {sound}"
        )
        web.terminate()
        web.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"  lost per trial: median {statistics.median(losses)}, max {max(losses)}; "
        f"in traffic: median {statistics.median(in_ms):.0f} ms, max {max(in_ms):.0f} ms"
    )


def outage(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="outage-"))
    web, target = nginx(tmp)
    db = tmp / "o.db"
    proxy, port = mitmdump(tmp, db, 250)
    ps = psutil.Process(proxy.pid)
    driver = load(port, target, args.rate, args.seconds + 30)
    time.sleep(5)
    holder = sqlite3.connect(db, timeout=30)
    holder.execute("BEGIN IMMEDIATE")
    print(f"store locked for {args.seconds} s under ~{args.rate} req/s; mitmdump RSS every 5 s (MB):")
    samples = []
    start = time.monotonic()
    while time.monotonic() - start < args.seconds:
        samples.append(ps.memory_info().rss / 1e6)
        time.sleep(5)
    print("  " + " ".join(f"{s:.0f}" for s in samples))
    print(f"  first {samples[0]:.0f} MB, last {samples[-1]:.0f} MB, max {max(samples):.0f} MB")
    term = time.monotonic()
    proxy.send_signal(signal.SIGTERM)
    proxy.wait(timeout=120)
    stopped = time.monotonic() - term
    driver.terminate()
    driver.wait()
    time.sleep(0.3)
    answered = len(served(tmp))
    spool = sum(1 for _ in (tmp / "o.db.spool").glob("*.rows"))
    log = max(tmp.glob("mitmdump-*.log"), key=os.path.getmtime).read_text(errors="replace")
    totals = [line for line in log.splitlines() if "saw " in line][-1:]
    print(f"  SIGTERM with the store still locked: exited in {stopped:.2f} s; {totals[0] if totals else '?'}")
    holder.rollback()
    holder.close()
    again, _ = mitmdump(tmp, db, 250)
    deadline = time.monotonic() + 120
    while stored(db) < answered and time.monotonic() < deadline:
        time.sleep(0.5)
    again.send_signal(signal.SIGTERM)
    again.wait(timeout=60)
    print(
        f"  after the lock went and a new start replayed {spool} spool file(s): stored {stored(db)} of "
        f"{answered} answered"
    )
    web.terminate()
    web.wait()
    shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    k = sub.add_parser("kill9")
    k.add_argument("--trials", type=int, default=5)
    k.add_argument("--flush-ms", type=int, default=250)
    k.add_argument("--rate", type=int, default=1000)
    k.add_argument("--run", type=float, default=4.0, help="seconds of traffic before the kill")
    o = sub.add_parser("outage")
    o.add_argument("--seconds", type=int, default=120)
    o.add_argument("--rate", type=int, default=400)
    args = parser.parse_args()
    for tool in ("nginx", "hey"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: apt-get install nginx-light hey")
    kill9(args) if args.what == "kill9" else outage(args)


if __name__ == "__main__":
    main()
