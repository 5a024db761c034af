"""What faults cost: kill -9 under load, and a store that refuses writes for minutes.

    apt-get install nginx-light hey
    uv run python benchmarks/bench_faults.py kill9 --trials 5 --flush-ms 250 [--rate 1000]
    uv run python benchmarks/bench_faults.py outage --seconds 120 [--rate 400]
    uv run python benchmarks/bench_faults.py diskfull --seconds 60 [--spool-on-disk] (as root: mounts a tmpfs)

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

diskfull: the store on a tmpfs of its own (--size-mb), filled to the last byte by a
filler file 3 s into the traffic; after --seconds the filler goes, the traffic goes on
for 8 s, then SIGTERM. Prints nginx's count of answered requests against the store's,
and what the recorder said (the spool moving off the full filesystem, rows held in
memory, losses with their cause, the totals line). With --spool-on-disk the spool
directory is on the full tmpfs as well, so exchanges wait in memory (up to 50,000).
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


def mitmdump(
    tmp: Path, db: Path, flush_ms: int, *extra: str, quiet: bool = True
) -> tuple[subprocess.Popen, int]:
    port = free_port()
    args = [
        str(Path(sys.executable).parent / "mitmdump"),
        *(["-q"] if quiet else ["--set", "flow_detail=0"]),
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
        *extra,
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
    samples = rss_every_5_s(ps, args.seconds)
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


def rss_every_5_s(ps: psutil.Process, seconds: float) -> list[float]:
    """The process's RSS (MB) every 5 s for `seconds`, printed on one line as they come."""
    samples = []
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        samples.append(ps.memory_info().rss / 1e6)
        time.sleep(5)
    print("  " + " ".join(f"{x:.0f}" for x in samples))
    return samples


def diskfull(args: argparse.Namespace) -> None:
    """The store (and, with --spool-on-disk, the spool) on a small tmpfs filled to the
    last byte while traffic goes on; the filler removed after --seconds; then SIGTERM."""
    tmp = Path(tempfile.mkdtemp(prefix="diskfull-"))
    web, target = nginx(tmp)
    small = tmp / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={args.size_mb}m", "tmpfs", str(small)], check=True)
    state = tmp / "state"  # the fallback spool's directory: another filesystem
    os.environ["XDG_STATE_HOME"] = str(state)
    try:
        db = small / "d.db"
        extra = ["--set", f"redirect_audit_spool={small / 'spool'}"] if args.spool_on_disk else []
        proxy, port = mitmdump(tmp, db, 250, *extra, quiet=False)
        ps = psutil.Process(proxy.pid)
        driver = load(port, target, args.rate, args.seconds + 10)
        time.sleep(3)
        filler = small / "filler"
        with open(filler, "ab") as fh:
            for size in (1 << 20, 4096, 1):
                while True:
                    try:
                        os.write(fh.fileno(), b"\0" * size)
                    except OSError:
                        break
        print(
            f"store {'and spool ' if args.spool_on_disk else ''}on a full {args.size_mb} MB tmpfs for "
            f"{args.seconds} s under ~{args.rate} req/s; mitmdump RSS every 5 s (MB):"
        )
        start = time.monotonic()
        rss_every_5_s(ps, args.seconds)
        full_for = time.monotonic() - start
        filler.unlink()
        time.sleep(8)  # the rest of the traffic, with room again
        driver.wait()
        time.sleep(3)  # the writer's retry and replay
        proxy.send_signal(signal.SIGTERM)
        proxy.wait(timeout=120)
        answered = len(served(tmp))
        log = max(tmp.glob("mitmdump-*.log"), key=os.path.getmtime).read_text(errors="replace")
        said = [
            line.split("] ", 1)[-1]
            for line in log.splitlines()
            if any(w in line for w in ("spooling to", "wait in memory", "taken again", "lost", "saw "))
        ]
        print(f"  full for {full_for:.0f} s; answered {answered}, stored {stored(db)}")
        for line in said:
            print(f"  | {line[:220]}")
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)
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
    d = sub.add_parser("diskfull")
    d.add_argument("--seconds", type=int, default=60)
    d.add_argument("--rate", type=int, default=300)
    d.add_argument("--size-mb", type=int, default=64)
    d.add_argument("--spool-on-disk", action="store_true", help="the spool directory on the full tmpfs too")
    args = parser.parse_args()
    for tool in ("nginx", "hey"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: apt-get install nginx-light hey")
    {"kill9": kill9, "outage": outage, "diskfull": diskfull}[args.what](args)


if __name__ == "__main__":
    main()
