"""A store for a fleet, SQLite and PostgreSQL side by side: analysis at scale, incremental
analysis, --jobs, proxy start-up on a big store, HAR import rates, three proxies at once.

    uv run python benchmarks/bench_fleet.py analyze --exchanges 1000000,10000000
    uv run python benchmarks/bench_fleet.py startup --exchanges 1000000
    uv run python benchmarks/bench_fleet.py import --entries 100000
    uv run python benchmarks/bench_fleet.py proxies --requests 3000

PostgreSQL runs on a throwaway local cluster (tests/pgcluster.py: initdb as the postgres
user, Unix socket only, durability off as in the tests). Every figure is printed, one
line per measurement; nothing is asserted. Stores are filled directly (rows shaped like
browser traffic: 14 request and 10 response headers, about 10% redirects followed by
their client, thousands of clients, enough misbehaviour for the rules to fire), then
each analysis runs in a child process whose peak RSS is read from the kernel.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import pgcluster  # noqa: E402
from targets import verdict  # noqa: E402

from analyzer.model import Body, Exchange  # noqa: E402
from analyzer.store import (  # noqa: E402
    add_capture,
    exchange_row,
    finish_capture,
    header_block,
    open_store,
    refresh_statistics,
    write_exchanges,
)

REQUEST_HEADERS = [
    ("Host", "svc.example.test"),
    (
        "User-Agent",
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like "
        "Gecko) Chrome/131.0.0.0 Safari/537.36",
    ),
    ("Accept", "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"),
    ("Accept-Language", "en-GB,en;q=0.9"),
    ("Accept-Encoding", "gzip, deflate, br, zstd"),
    ("Connection", "keep-alive"),
    ("Upgrade-Insecure-Requests", "1"),
    ("Sec-Fetch-Dest", "document"),
    ("Sec-Fetch-Mode", "navigate"),
    ("Sec-Fetch-Site", "same-origin"),
    ("Sec-Fetch-User", "?1"),
    ("Priority", "u=0, i"),
    ("Cookie", "hmac:3f5e0c1d2b4a69788796a5b4c3d2e1f0"),
    ("Referer", "https://svc.example.test/"),
]
RESPONSE_HEADERS = [
    ("Date", "Tue, 01 Dec 2026 10:00:00 GMT"),
    ("Content-Type", "text/html; charset=utf-8"),
    ("Content-Length", "5120"),
    ("Connection", "keep-alive"),
    ("Server", "nginx/1.27.3"),
    ("Cache-Control", "private, no-cache"),
    ("Strict-Transport-Security", "max-age=63072000"),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Request-Id", "8f14e45fceea167a5a36dedd4bea2543"),
    ("Vary", "Accept-Encoding"),
]
T0 = 1_790_000_000.0


def blocks(variants: int = 64):
    """Header blocks shared between rows (as the proxy shares them), each encoded once."""
    req = [
        header_block([*REQUEST_HEADERS[:-1], ("Referer", f"https://svc{i}.example.test/")])
        for i in range(variants)
    ]
    resp = [
        header_block([*RESPONSE_HEADERS[:-1], ("Vary", f"Accept-Encoding, X-{i}")]) for i in range(variants)
    ]
    redirect = [header_block([*RESPONSE_HEADERS[:2], ("Location", "x"), *RESPONSE_HEADERS[3:]])]
    cacheable = [
        header_block([*RESPONSE_HEADERS[:5], ("Cache-Control", "max-age=3600"), *RESPONSE_HEADERS[6:]])
    ]
    return req, resp, redirect[0], cacheable[0]


def rows(
    n: int,
    capture: int,
    clients: int,
    first_seq: int = 0,
    client_offset: int = 0,
    t0: float = T0,
    one_client: str | None = None,
    spacing: float = 0.001,
):
    """`n` exchanges of `clients` clients; every 10th starts a redirect its client follows.
    1 in 7 redirected requests is a POST; a third of those get a 302 followed with GET
    (method-downgrade), the rest a 307 followed with the body. Every 50th GET redirect is
    a cacheable 302 to the same target (stale-temporary-redirect) and every 1000th
    exchange re-sends the previous POST (duplicate-write). `one_client`: every exchange is
    that client's (one CI runner, one service behind a proxy); `spacing`: seconds between
    two exchanges."""
    req, resp, redirect_h, cacheable_h = blocks()
    body = Body(length=24, sha256=hashlib.sha256(b"x").hexdigest(), content_type="application/json")
    i = 0
    while i < n:
        seq = first_seq + i
        client = one_client or (
            f"proxy:runner-{(seq // 97) % 20}:8080/10.{(seq % clients + client_offset) // 250 % 250}."
            f"{(seq % clients + client_offset) % 250}.7"
        )
        url = f"https://svc{seq % 40}.example.test/r/{seq}"
        post = seq % 7 == 0
        redirect = seq % 10 == 0 and i + 1 < n
        downgrade = post and seq % 3 == 0
        status = (302 if downgrade else 307 if post else 302) if redirect else 200
        cacheable = redirect and not post and seq % 50 == 0
        target = (
            "https://svc.example.test/sale"
            if cacheable
            else f"https://svc{seq % 40}.example.test/r/{seq}/next"
        )
        yield exchange_row(
            Exchange(
                capture_id=capture,
                seq=seq,
                method="POST" if post else "GET",
                url=url,
                url_norm=url,
                started_at=t0 + seq * spacing,
                client=client,
                connection=f"c{seq}",
                status=status,
                location=target if redirect else None,
                location_resolved=target if redirect else None,
                request_body=body if post else Body(),
                request_headers=req[seq % len(req)],
                response_headers=(cacheable_h if cacheable else redirect_h)
                if redirect
                else resp[seq % len(resp)],
                user_agent=REQUEST_HEADERS[1][1],
            )
        )
        i += 1
        if redirect:
            follow = "GET" if downgrade else ("POST" if post else "GET")
            seq += 1
            yield exchange_row(
                Exchange(
                    capture_id=capture,
                    seq=seq,
                    method=follow,
                    url=target,
                    url_norm=target,
                    started_at=t0 + seq * spacing,
                    client=client,
                    connection=f"c{seq - 1}",
                    status=201 if follow == "POST" else 200,
                    request_body=body if follow == "POST" else Body(),
                    request_headers=req[seq % len(req)],
                    response_headers=resp[seq % len(resp)],
                    user_agent=REQUEST_HEADERS[1][1],
                )
            )
            i += 1
        elif seq % 1000 == 0 and i < n:
            seq += 1
            yield exchange_row(
                Exchange(
                    capture_id=capture,
                    seq=seq,
                    method="POST",
                    url=url,
                    url_norm=url,
                    started_at=t0 + seq * spacing,
                    client=client,
                    connection=f"c{seq}",
                    status=201,
                    request_body=body,
                    request_headers=req[seq % len(req)],
                    response_headers=resp[seq % len(resp)],
                )
            )
            i += 1


def fill(
    url: str,
    n: int,
    clients: int,
    *,
    first_seq: int = 0,
    client_offset: int = 0,
    t0: float = T0,
    one_client: str | None = None,
    spacing: float = 0.001,
) -> float:
    store = open_store(url)
    start = time.perf_counter()
    with store.begin() as conn:
        capture = add_capture(conn, source="proxy", path=None)
        written = write_exchanges(
            conn, rows(n, capture, clients, first_seq, client_offset, t0, one_client, spacing)
        )
        finish_capture(conn, capture, entries=written)
        refresh_statistics(conn, "exchanges", "captures")
    store.close()
    return time.perf_counter() - start


ANALYZE = """
import json, sys, time, resource
from analyzer.store import open_store
from analyzer.analysis import analyze
store = open_store(sys.argv[1], create=False)
t = time.perf_counter()
r = analyze(store, jobs=int(sys.argv[2]), full=sys.argv[3] == "full")
took = time.perf_counter() - t
print(json.dumps({"seconds": took, "chains": r.chain_count, "findings": r.finding_count,
                  "clients": [r.clients_analyzed, r.clients_total],
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "children_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def run_child(code: str, *args: str) -> dict:
    """A script in a child process (its peak RSS its own), and the JSON it prints."""
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout)


def run_analyze(url: str, jobs: int = 1, full: bool = True) -> dict:
    return run_child(ANALYZE, url, str(jobs), "full" if full else "incremental")


def stores(engines: list[str], cluster, work: Path, name: str) -> dict[str, str]:
    out = {}
    for engine in engines:
        out[engine] = str(work / f"{name}.db") if engine == "sqlite" else cluster.new_database(name)
    return out


def cmd_analyze(args, cluster, work: Path) -> None:
    for n in args.exchanges:
        clients = max(100, n // 500)
        took: dict[str, float] = {}
        for engine, url in stores(args.engines, cluster, work, f"a{n}").items():
            filled = fill(url, n, clients)
            print(f"[{engine} {n:,}] fill: {filled:.1f} s ({n / filled:,.0f} rows/s)", flush=True)
            full = run_analyze(url, jobs=1)
            took[engine] = full["seconds"]
            print(
                f"[{engine} {n:,}] analyze --jobs 1: {full['seconds']:.1f} s, peak RSS {full['rss_mb']:.0f} MB, "
                f"{full['clients'][1]:,} clients, {full['chains']:,} chains, {full['findings']:,} findings",
                flush=True,
            )
            if args.jobs2:
                two = run_analyze(url, jobs=2)
                print(
                    f"[{engine} {n:,}] analyze --jobs 2: {two['seconds']:.1f} s (x{full['seconds'] / two['seconds']:.2f}),"
                    f" peak RSS {two['rss_mb']:.0f} MB here + {two['children_rss_mb']:.0f} MB per worker",
                    flush=True,
                )
            if args.incremental:
                extra = n // 100
                added = fill(url, extra, max(1, clients // 100), first_seq=n + 10, t0=T0 + n * 0.001 + 60)
                step = run_analyze(url, jobs=1, full=False)
                print(
                    f"[{engine} {n:,}] +{extra:,} exchanges ({added:.1f} s), a new capture: "
                    f"analyze {step['seconds']:.2f} s = {100 * step['seconds'] / full['seconds']:.1f}% of the full run, "
                    f"{step['clients'][0]:,} of {full['clients'][1]:,} clients analyzed",
                    flush=True,
                )
            if engine == "sqlite" and not args.keep:
                for suffix in ("", "-wal", "-shm"):
                    Path(url + suffix).unlink(missing_ok=True)
            elif engine == "postgresql" and not args.keep:
                cluster.drop_database(url)
        if "sqlite" in took and "postgresql" in took:
            note = "" if n == 1_000_000 else f"{n:,} exchanges"
            print(verdict("postgresql", took["postgresql"] / took["sqlite"], note), flush=True)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def start_proxy(url: str, work: Path, extra: tuple = ()) -> tuple[object, float]:
    from proxyrun import Mitmdump

    t = time.perf_counter()
    proxy = Mitmdump(work / f"mitm-{time.monotonic_ns()}", db=url, extra=list(extra))
    deadline = time.monotonic() + 120
    while "recording into" not in proxy.output() and time.monotonic() < deadline:
        time.sleep(0.02)
    return proxy, time.perf_counter() - t


def cmd_startup(args, cluster, work: Path) -> None:
    n = args.exchanges[0]
    for engine in args.engines:
        empty = stores([engine], cluster, work, "empty")[engine]
        open_store(empty).close()
        big = stores([engine], cluster, work, f"s{n}")[engine]
        fill(big, n, max(100, n // 500))
        for label, url in (("empty", empty), (f"{n:,}", big)):
            times, rss = [], []
            for _ in range(args.rounds):
                proxy, took = start_proxy(url, work)
                time.sleep(0.5)
                rss.append(rss_mb(proxy.process.pid))
                times.append(took)
                proxy.stop()
            times.sort()
            rss.sort()
            print(
                f"[{engine}] proxy start-up on a store of {label} exchanges: {times[len(times) // 2]:.2f} s "
                f"(median of {args.rounds}), RSS {rss[len(rss) // 2]:.0f} MB",
                flush=True,
            )


def write_har(path: Path, entries: int) -> None:
    with path.open("w") as out:
        out.write('{"log": {"version": "1.2", "creator": {"name": "bench", "version": "1"}, "entries": [\n')
        for i in range(entries):
            redirect = i % 10 == 0
            entry = {
                "startedDateTime": f"2026-03-01T{(i // 3600) % 24:02d}:{(i // 60) % 60:02d}:{i % 60:02d}.{i % 1000:03d}Z",
                "time": 12,
                "pageref": f"page_{i // 500}",
                "request": {
                    "method": "GET",
                    "url": f"https://svc{i % 40}.example.test/r/{i}",
                    "httpVersion": "HTTP/2",
                    "headers": [{"name": k, "value": v} for k, v in REQUEST_HEADERS],
                    "queryString": [],
                    "cookies": [],
                    "headersSize": -1,
                    "bodySize": 0,
                },
                "response": {
                    "status": 302 if redirect else 200,
                    "statusText": "",
                    "httpVersion": "HTTP/2",
                    "headers": [{"name": k, "value": v} for k, v in RESPONSE_HEADERS]
                    + ([{"name": "Location", "value": f"/r/{i + 1}"}] if redirect else []),
                    "cookies": [],
                    "content": {"size": 5120, "mimeType": "text/html"},
                    "redirectURL": "",
                    "headersSize": -1,
                    "bodySize": 5120,
                },
                "cache": {},
                "timings": {"send": 1, "wait": 10, "receive": 1},
            }
            out.write(("," if i else "") + json.dumps(entry) + "\n")
        out.write("]}}\n")


def cmd_import(args, cluster, work: Path) -> None:
    har = work / "bench.har"
    write_har(har, args.entries)
    size = har.stat().st_size / 2**20
    for engine in args.engines:
        rates = []
        for r in range(args.rounds):
            url = stores([engine], cluster, work, f"i{r}")[engine]
            t = time.perf_counter()
            done = subprocess.run(
                [sys.executable, "-m", "analyzer", "import-har", str(har), "--db", url],
                capture_output=True,
                text=True,
                cwd=ROOT,
            )
            took = time.perf_counter() - t
            if done.returncode != 0:
                raise SystemExit(done.stderr)
            rates.append(args.entries / took)
        rates.sort()
        # the largest process any import ran (the command, or one of its converter workers)
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(
            f"[{engine}] import-har of {args.entries:,} entries ({size:.0f} MB): {rates[len(rates) // 2]:,.0f} "
            f"entries/s (median of {args.rounds}); the largest process {peak:.0f} MB",
            flush=True,
        )
        note = f"{engine}, {size:.0f} MB" + (f", {args.entries:,} entries" if args.entries != 100_000 else "")
        print(verdict("import-rate", rates[len(rates) // 2], note), flush=True)
        print(verdict("import-peak", peak, note), flush=True)


def cmd_proxies(args, cluster, work: Path) -> None:
    import http.client

    import psutil
    from upstream import Upstream

    upstream = Upstream()

    def drive(port: int, count: int, answered: list) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        for i in range(count):
            path = f"/r/302/b{i}" if i % 10 == 0 else f"/echo/b{i}"
            try:
                conn.request("GET", f"{upstream.origin}{path}")
                response = conn.getresponse()
                response.read()
                answered.append(response.status)
            except OSError:
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.close()

    for layout in ("own SQLite each", "one PostgreSQL"):
        urls = (
            [str(work / f"p{i}.db") for i in range(3)]
            if layout.startswith("own")
            else [cluster.new_database("fleet")] * 3
        )
        for url in set(urls):
            open_store(url).close()
        proxies = [
            start_proxy(url, work, ("--set", f"redirect_audit_proxy_id=bench-{i}"))[0]
            for i, url in enumerate(urls)
        ]
        answered: list[list] = [[] for _ in proxies]
        before = [psutil.Process(p.process.pid).cpu_times() for p in proxies]
        threads = [
            threading.Thread(target=drive, args=(p.port, args.requests, answered[i]))
            for i, p in enumerate(proxies)
            for _ in range(2)
        ]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join(600)
        took = time.perf_counter() - t
        time.sleep(1.0)
        after = [psutil.Process(p.process.pid).cpu_times() for p in proxies]
        for p in proxies:
            p.stop()
        stored = 0
        for url in set(urls):
            store = open_store(url, create=False)
            from sqlalchemy import func, select

            from analyzer.store import exchanges

            with store.begin() as conn:
                stored += conn.execute(select(func.count()).select_from(exchanges)).scalar()
            store.close()
        total = sum(len(a) for a in answered)
        cpu = [
            (a.user + a.system - b.user - b.system) / max(1, len(ans)) * 1e3
            for a, b, ans in zip(after, before, answered, strict=False)
        ]
        print(
            f"[{layout}] 3 proxies x 2 clients x {args.requests:,} requests in {took:.1f} s: stored {stored:,} of "
            f"{total:,} answered; CPU per request {', '.join(f'{c:.2f}' for c in cpu)} ms",
            flush=True,
        )
    upstream.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=("analyze", "startup", "import", "proxies"))
    parser.add_argument(
        "--exchanges", default="1000000", type=lambda s: [int(x.replace("_", "")) for x in s.split(",")]
    )
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--engines", default="sqlite,postgresql", type=lambda s: s.split(","))
    parser.add_argument("--no-jobs2", dest="jobs2", action="store_false")
    parser.add_argument("--no-incremental", dest="incremental", action="store_false")
    parser.add_argument(
        "--keep", action="store_true", help="keep the stores (and the cluster's data) afterwards"
    )
    parser.add_argument("--workdir", help="where the SQLite stores go (default: a temporary directory)")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-fleet-"))
    work.mkdir(parents=True, exist_ok=True)
    cluster = pgcluster.Cluster() if "postgresql" in args.engines else None
    try:
        {"analyze": cmd_analyze, "startup": cmd_startup, "import": cmd_import, "proxies": cmd_proxies}[
            args.what
        ](args, cluster, work)
    finally:
        if cluster is not None:
            cluster.stop()
        if not args.workdir and not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
