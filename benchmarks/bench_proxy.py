"""What the recorder costs the proxy: mitmdump with and without it, under the same load.

    apt-get install nginx-light hey        # the upstream and the load generator
    uv run python benchmarks/bench_proxy.py --requests 10000 --rounds 10

A local nginx answers every request; `hey` sends requests through mitmdump (regular
proxy mode, loopback only). Two mitmdump processes run side by side, one plain, one
with the recorder, and the load alternates between them in --rounds bursts (the order
flips every round), so drifting machine load hits both alike. Each process's CPU time
(user + sys, psutil) is read between rounds, so a round charges each proxy with all it
did while both bursts ran, its writer's commits included wherever they fall (the
flush interval does not line up with the bursts); after the last round it waits one
second past the flush interval for the last commit. It prints CPU time per request per
round, then totals: CPU/request, median throughput and latency, and the exchanges
stored against the requests the recorder answered. Throughput swings from run to run
on a shared machine; CPU time per request is the figure to judge by. More, shorter
rounds pin the median down better (the pairing is closer in time). But two processes
of the same program differ too, by several percent in CPU per request for as long as
they live (memory layout; one string hash seed for both did not narrow it): --pairs K
starts K fresh pairs of mitmdumps, the rounds shared out among them, and bootstraps
the overall figure over the pairs. It also splits each process's CPU time by thread:
the proxy's own (main) thread, and the others, which in the recording proxy are its
writer.

    uv run python benchmarks/bench_proxy.py --requests 200000 --rounds 400 --pairs 10

`hey` sends the same request headers every time and nginx answers with the same
headers until its Date changes, so the recorder finds nearly every header block it
has converted before. With --unique-responses nginx adds an X-Request-Id of its own
to each response, and every response block is new to the recorder: its worst case.

    apt-get install valgrind
    uv run python benchmarks/bench_proxy.py --instructions --requests 400 --rounds 2

`--instructions` counts instead of timing: each mitmdump runs under valgrind's callgrind
with counting off, is warmed up, and counts user-space instructions from just before a
burst until the recorder's file holds its exchanges. The count barely moves between runs
(about 0.1%), where CPU time swings by several percent, so a change of a tenth of a
percent shows; but it leaves out what instructions do not show (cache misses, kernel
time, thread hand-overs), so it guides work and CPU time judges it. Under valgrind the
proxy runs about 50 times slower, so a writer that commits every flush interval would
commit every ~20 rows instead of the ~1,300 it commits at full speed, and charge each
row about 9 µs of transaction overhead the real proxy does not pay. So here the recorder
commits by count: a batch of --requests rows, a full batch for the warm-up and one for
the burst (unless --set gives redirect_audit_batch or redirect_audit_flush_ms). Work
done per second of wall time (the recorder's one-second tick, mitmproxy's script
reloader) is still counted over a window some 50 times longer than the burst takes at
full speed: about 135,000 instructions per idle second, some 0.15% of the count.
"""

from __future__ import annotations

import argparse
import random
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from proxyrun import free_port, wait_for_port  # noqa: E402

from analyzer.ingest.recorder import RecorderSettings  # noqa: E402

NGINX_CONF = """
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp}; proxy_temp_path {tmp}; fastcgi_temp_path {tmp};
    uwsgi_temp_path {tmp}; scgi_temp_path {tmp};
    server {{
        listen 127.0.0.1:{port};
        keepalive_requests 100000;
        location / {{ {extra}return 200 "ok\\n"; }}
    }}
}}
"""


def start_nginx(tmp: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, port=port, extra=NGINX_EXTRA[0]))
    proc = subprocess.Popen(
        ["nginx", "-c", str(conf), "-p", str(tmp)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_for_port(port)
    return proc, port


# --unique-responses: a response header no two responses share, as many APIs send
UNIQUE_HEADER = "add_header X-Request-Id $request_id always; "
NGINX_EXTRA = [""]

RECORDER = ROOT / "addons" / "redirect_recorder.py"
RECORDER_SET: list[str] = []  # extra --set NAME=VALUE for the recorder runs
SCRIPT = [str(RECORDER)]  # --script swaps in another addon, to measure what any addon costs
BASELINE: list[str] = []  # --baseline: a script the "plain" mitmdump runs


def mitmdump_args(tmp: Path, port: int, recorder: bool, db: Path) -> list[str]:
    """mitmdump's command line: plain, or with the recorder (or the --script addon)."""
    args = [
        str(Path(sys.executable).parent / "mitmdump"),
        "-q",
        "--listen-host",
        "127.0.0.1",
        "--listen-port",
        str(port),
        "--set",
        f"confdir={tmp / 'mitm'}",
    ]
    if not recorder and BASELINE:
        args += ["-s", BASELINE[0]]
    if recorder:
        args += ["-s", SCRIPT[0], *RECORDER_SET]
        if SCRIPT[0] == str(RECORDER):
            args += ["--set", f"redirect_audit_db={db}"]
    return args


def start_mitmdump(tmp: Path, recorder: bool, db: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen(
        mitmdump_args(tmp, port, recorder, db), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_for_port(port)
    return proc, port


def hey(proxy_port: int, target: int, requests: int, concurrency: int) -> dict:
    done = subprocess.run(
        [
            "hey",
            "-n",
            str(requests),
            "-c",
            str(concurrency),
            "-x",
            f"http://127.0.0.1:{proxy_port}",
            f"http://127.0.0.1:{target}/",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=True,
    )
    text = done.stdout
    ok = re.search(r"\[200\]\s+(\d+) responses", text)

    def number(label: str) -> float:
        m = re.search(label + r":\s+([\d.]+)", text)
        return float(m.group(1)) if m else float("nan")

    p99 = re.search(r"99%+ in ([\d.]+) secs", text)
    return {
        "ok": int(ok.group(1)) if ok else 0,
        "rps": number("Requests/sec"),
        "avg": number("Average"),
        "p99": float(p99.group(1)) if p99 else float("nan"),
    }


def count_instructions(
    tmp: Path, recorder: bool, requests: int, target: int, settle: float, run: int, warm_up: int
) -> int:
    """User-space instructions one mitmdump executes for `requests` requests (callgrind)."""
    port = free_port()
    out = tmp / f"callgrind.{run}.{'recorder' if recorder else 'plain'}"
    args = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={out}",
        sys.executable,
        *mitmdump_args(tmp, port, recorder, tmp / f"count{run}.db"),
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp)
    db = tmp / f"count{run}.db" if recorder and SCRIPT[0] == str(RECORDER) else None

    def settled(expected: int) -> None:
        """Wait for the writer to commit `expected` exchanges in all (just wait, without it)."""
        if db is None:
            time.sleep(settle)
            return
        deadline = time.monotonic() + 300
        while committed(db) < expected and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(0.5)

    try:
        wait_for_port(port, timeout=300)
        answered = hey(port, target, warm_up, 4)["ok"]  # not counted
        settled(answered)

        def control(*option: str) -> None:
            subprocess.run(
                ["callgrind_control", *option, str(proc.pid)],
                cwd=tmp,
                capture_output=True,
                timeout=120,
                check=True,
            )

        control("--instr=on")
        answered += hey(port, target, requests, 4)["ok"]
        settled(answered)  # the burst's commit is counted, whenever it ends
        control("--dump")
        control("--instr=off")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=600)
    total = 0
    for dump in tmp.glob(out.name + ".*"):  # the --dump file(s); the exit dump counts nothing
        m = re.search(r"^(?:summary|totals): (\d+)", dump.read_text(errors="replace"), re.M)
        total += int(m.group(1)) if m else 0
        dump.unlink()
    for leftover in tmp.glob(out.name + "*"):
        leftover.unlink()
    return total


def committed(db: Path) -> int:
    """Exchanges committed to the recorder's SQLite file so far (0 before it exists)."""
    if not db.exists():
        return 0
    try:
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)) as conn:
            return conn.execute("SELECT count(*) FROM exchanges").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return 0


def instructions_main(args: argparse.Namespace, settle: float) -> None:
    for tool in ("valgrind", "callgrind_control", "nginx", "hey"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: apt-get install valgrind nginx-light hey")
    warm_up = 100
    if not any(o.startswith(("redirect_audit_batch=", "redirect_audit_flush_ms=")) for o in args.set):
        # commit by count, as at full speed (see the module docstring): the warm-up fills one
        # batch, the burst the next
        RECORDER_SET.extend(
            ["--set", f"redirect_audit_batch={args.requests}", "--set", "redirect_audit_flush_ms=60000"]
        )
        warm_up, settle = args.requests, 3.0
    counts: dict[str, list[float]] = {"plain": [], "recorder": []}
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        nginx, target = start_nginx(tmp)
        try:
            for round_ in range(1, args.rounds + 1):
                order = ["plain", "recorder"] if round_ % 2 else ["recorder", "plain"]
                for label in order:
                    n = count_instructions(
                        tmp, label == "recorder", args.requests, target, settle, round_, warm_up
                    )
                    counts[label].append(n / args.requests)
                print(
                    f"round {round_:2d}: plain {counts['plain'][-1]:,.0f} instructions/request, recorder "
                    f"{counts['recorder'][-1]:,.0f} ({(counts['recorder'][-1] / counts['plain'][-1] - 1) * 100:+.2f}%)",
                    flush=True,
                )
        finally:
            nginx.send_signal(signal.SIGQUIT)
            nginx.wait(timeout=30)
    plain, recorder = statistics.median(counts["plain"]), statistics.median(counts["recorder"])
    print(
        f"instructions/request, medians of {args.rounds} runs: plain {plain:,.0f}, recorder {recorder:,.0f}: "
        f"{(recorder / plain - 1) * 100:+.2f}% (spread of runs: plain {spread(counts['plain']):.2f}%, "
        f"recorder {spread(counts['recorder']):.2f}%)"
    )


def spread(values: list[float]) -> float:
    return (max(values) - min(values)) / statistics.median(values) * 100


def usage(proc: psutil.Process) -> tuple[float, float, int]:
    """CPU seconds (user + sys), sys seconds, and context switches of a process so far."""
    times, switches = proc.cpu_times(), proc.num_ctx_switches()
    return times.user + times.system, times.system, switches.voluntary + switches.involuntary


def thread_times(proc: psutil.Process) -> dict[int, float]:
    """CPU seconds (user + sys) of each live thread of a process, by thread id."""
    return {t.id: t.user_time + t.system_time for t in proc.threads()}


def ratio_of_sums(rounds: list[tuple[float, float]]) -> float:
    """Recorder over plain CPU per request, all rounds together (rounds are equal in size)."""
    return sum(r for _, r in rounds) / sum(p for p, _ in rounds)


def median_ratio(rounds: list[tuple[float, float]]) -> float:
    return statistics.median(r / p for p, r in rounds)


def interval(
    rounds: list[tuple[float, float]], statistic, draws: int = 2000, seed: int = 1
) -> tuple[float, float]:
    """A 95% percentile-bootstrap interval of statistic(rounds), resampling whole rounds."""
    rng = random.Random(seed)
    values = sorted(statistic(rng.choices(rounds, k=len(rounds))) for _ in range(draws))
    return values[int(0.025 * draws)], values[int(0.975 * draws) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000, help="requests through each proxy, in all")
    parser.add_argument(
        "--rounds", type=int, default=10, help="alternations; each sends requests/rounds per proxy"
    )
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a recorder option, e.g. redirect_audit_live=false",
    )
    parser.add_argument(
        "--script",
        help="run this addon instead of the recorder "
        "(benchmarks/noop_addon.py shows what any -s script costs)",
    )
    parser.add_argument(
        "--pairs",
        type=int,
        default=1,
        help="start a fresh plain and recording mitmdump this many times, the rounds shared out "
        "among them: two processes of the same program differ by several percent in CPU "
        "per request (memory layout), which more rounds of one pair cannot average out",
    )
    parser.add_argument(
        "--baseline",
        metavar="SCRIPT",
        help="the plain mitmdump runs this script (benchmarks/freeze_addon.py: the recorder's cost "
        "beyond what its start-up freeze saves mitmproxy)",
    )
    parser.add_argument(
        "--unique-responses",
        action="store_true",
        help="nginx adds an X-Request-Id of its own to each response, so no response header "
        "block repeats (the recorder converts each anew: its worst case)",
    )
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="count instructions per request under valgrind instead of timing (try --requests 400)",
    )
    args = parser.parse_args()
    if args.script:
        SCRIPT[0] = str(Path(args.script).resolve())
    if args.unique_responses:
        NGINX_EXTRA[0] = UNIQUE_HEADER
    if args.baseline:
        BASELINE.append(str(Path(args.baseline).resolve()))
        print(f"plain: mitmdump -s {args.baseline}")
    for option in args.set:
        RECORDER_SET.extend(["--set", option])
    for tool in ("nginx", "hey"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: apt-get install nginx-light hey")
    chunk = args.requests // args.rounds
    flush = RecorderSettings().flush_interval
    for option in args.set:
        name, _, value = option.partition("=")
        if name == "redirect_audit_flush_ms":
            flush = int(value) / 1000
    settle = flush + 1.0
    if args.instructions:
        instructions_main(args, settle)
        return
    pairs = max(1, min(args.pairs, args.rounds))
    per_pair = [args.rounds // pairs + (1 if k < args.rounds % pairs else 0) for k in range(pairs)]
    totals = {
        label: {"cpu": 0.0, "main": 0.0, "threads": 0.0, "ok": 0, "rps": [], "avg": [], "p99": []}
        for label in ("plain", "recorder")
    }
    answered = {"plain": 0, "recorder": 0}
    by_pair: list[list[tuple[float, float]]] = []  # (plain, recorder) CPU ms per request, per round
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        db = tmp / "recorder.db"
        nginx, target = start_nginx(tmp)
        try:
            for k, count in enumerate(per_pair, 1):
                by_pair.append(
                    run_pair(tmp, db, target, count, chunk, args.concurrency, settle, totals, answered)
                )
                if pairs > 1:
                    print(
                        f"pair {k}: recorder {(ratio_of_sums(by_pair[-1]) - 1) * 100:+.1f}% CPU/request over plain "
                        f"in its {count} rounds",
                        flush=True,
                    )
        finally:
            nginx.send_signal(signal.SIGQUIT)
            nginx.wait(timeout=30)
        stored = committed(db) if SCRIPT[0] == str(RECORDER) else 0
    rounds = [r for pair in by_pair for r in pair]
    for label in ("plain", "recorder"):
        t = totals[label]
        print(
            f"{label:8s}: {t['ok']} requests answered 200, {t['cpu'] / t['ok']:.3f} ms CPU/request, "
            f"{statistics.median(t['rps']):.0f} req/s, latency avg {statistics.median(t['avg']) * 1000:.1f} ms, "
            f"p99 {statistics.median(t['p99']) * 1000:.1f} ms (medians over rounds)"
        )
    for label in ("plain", "recorder"):
        t = totals[label]
        print(
            f"{label:8s}: main thread {t['main'] / t['ok'] * 1000:.1f} µs CPU/request, other threads (the "
            f"recorder's writer) {t['threads'] / t['ok'] * 1000:.1f} µs/request"
        )
    overall = (
        totals["recorder"]["cpu"]
        / totals["recorder"]["ok"]
        / (totals["plain"]["cpu"] / totals["plain"]["ok"])
    )
    print(
        f"recorder CPU/request vs plain: {(overall - 1) * 100:+.1f}% overall, "
        f"{(median_ratio(rounds) - 1) * 100:+.1f}% median of paired rounds"
    )
    if pairs >= 3:
        low, high = interval(by_pair, lambda chosen: ratio_of_sums([r for pair in chosen for r in pair]))
        print(
            f"  95% bootstrap interval of the overall figure over the {pairs} process pairs: "
            f"{(low - 1) * 100:+.1f}% to {(high - 1) * 100:+.1f}%"
        )
    low, high = interval(rounds, ratio_of_sums)
    print(
        f"  95% bootstrap interval of the overall figure over rounds (blind to what differs between "
        f"processes): {(low - 1) * 100:+.1f}% to {(high - 1) * 100:+.1f}%"
    )
    if SCRIPT[0] == str(RECORDER):
        print(
            f"exchanges stored {stored} of {answered['recorder']} answered through the recorder "
            f"(lost: {answered['recorder'] - stored})"
        )


def run_pair(
    tmp: Path,
    db: Path,
    target: int,
    count: int,
    chunk: int,
    concurrency: int,
    settle: float,
    totals: dict,
    answered: dict,
) -> list[tuple[float, float]]:
    """Start a plain and a recording mitmdump, alternate `count` bursts between them, stop both."""
    procs = {}
    rounds = []
    try:
        procs["plain"] = start_mitmdump(tmp, False, db)
        procs["recorder"] = start_mitmdump(tmp, True, db)
        for label, (_proc, port) in procs.items():
            answered[label] += hey(port, target, 20 * concurrency, concurrency)["ok"]  # warm-up
        watched = {label: psutil.Process(proc.pid) for label, (proc, _) in procs.items()}
        time.sleep(settle)  # the warm-up's exchanges are committed before anything is counted
        last = {label: usage(me) for label, me in watched.items()}
        threads_before = {label: thread_times(me) for label, me in watched.items()}
        for round_ in range(1, count + 1):
            order = ["plain", "recorder"] if round_ % 2 else ["recorder", "plain"]
            ok = {}
            for label in order:
                r = hey(procs[label][1], target, chunk, concurrency)
                ok[label] = max(r["ok"], 1)
                t = totals[label]
                t["ok"] += r["ok"]
                answered[label] += r["ok"]
                for key in ("rps", "avg", "p99"):
                    t[key].append(r[key])
            now = {label: usage(me) for label, me in watched.items()}
            per = {}
            for label in procs:
                cpu, system, switches = (b - a for a, b in zip(last[label], now[label], strict=False))
                per[label] = cpu * 1000 / ok[label]
                per[label + "_detail"] = (
                    f"sys {system * 1000 / ok[label]:.3f} ms, {switches / ok[label]:.1f} ctx switches"
                )
                totals[label]["cpu"] += cpu * 1000
            last = now
            rounds.append((per["plain"], per["recorder"]))
            print(
                f"round {round_:2d}: plain {per['plain']:.3f} ms CPU/request ({per['plain_detail']}), "
                f"recorder {per['recorder']:.3f} ({per['recorder_detail']}) "
                f"({(per['recorder'] / per['plain'] - 1) * 100:+.1f}%)",
                flush=True,
            )
        time.sleep(settle)  # the last burst's commit
        for label, me in watched.items():
            totals[label]["cpu"] += (usage(me)[0] - last[label][0]) * 1000
            main = procs[label][0].pid
            for tid, seconds in thread_times(me).items():
                spent = (seconds - threads_before[label].get(tid, 0.0)) * 1000
                totals[label]["main" if tid == main else "threads"] += spent
    finally:
        for proc, _ in procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc, _ in procs.values():
            proc.wait(timeout=120)
    return rounds


if __name__ == "__main__":
    main()
