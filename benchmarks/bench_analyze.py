"""`analyze` on a store of N exchanges (default 1,000,000).

    uv run python benchmarks/bench_analyze.py --exchanges 1000000

Fills a fresh SQLite store directly (rows shaped like a busy proxy capture: 10% of
requests are redirects followed by their client, 1 in 7 is a POST, a few thousand
clients, and enough misbehaviour for three of the four rules to fire), then times
`analyze` in a child process and prints seconds, findings and peak RSS.
"""

from __future__ import annotations

import argparse
import hashlib
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from analyzer.model import Body, Exchange
from analyzer.store import exchange_row, open_store, write_exchanges

CLIENTS = 5000


def rows(n: int):
    """Exchanges; every 10th starts a redirect. Of the redirected POSTs (1 in 7), a third get a
    302 followed with GET (method-downgrade fires), the others a 307 followed with the body;
    every 50th GET redirect is a cacheable 302 (stale-temporary-redirect fires), and every
    1000th exchange re-sends the previous POST's body (duplicate-write fires)."""
    body = Body(length=24, sha256=hashlib.sha256(b"x").hexdigest(), content_type="application/json")
    t0 = 1_790_000_000.0
    i = 0
    while i < n:
        client = f"10.{(i // 250) % 250}.{i % CLIENTS % 250}.{i % 7}"
        url = f"https://svc{i % 40}.example.test/r/{i}"
        post = i % 7 == 0
        redirect = i % 10 == 0 and i + 1 < n
        downgrade = post and i % 3 == 0
        status = (302 if downgrade else 307 if post else 302) if redirect else 200
        cacheable = redirect and not post and i % 50 == 0
        target = f"https://svc{i % 40}.example.test/r/{i}/next"
        yield exchange_row(
            Exchange(
                capture_id=1,
                seq=i,
                method="POST" if post else "GET",
                url=url,
                url_norm=url,
                started_at=t0 + i * 0.001,
                client=client,
                connection=f"c{i}",
                status=status,
                location=target if redirect else None,
                location_resolved=target if redirect else None,
                request_body=body if post else Body(),
                response_headers=[("Cache-Control", "max-age=3600")] if cacheable else [],
            )
        )
        i += 1
        if redirect:
            follow = "GET" if downgrade else ("POST" if post else "GET")
            yield exchange_row(
                Exchange(
                    capture_id=1,
                    seq=i,
                    method=follow,
                    url=target,
                    url_norm=target,
                    started_at=t0 + i * 0.001,
                    client=client,
                    connection=f"c{i - 1}",
                    status=201 if follow == "POST" else 200,
                    request_body=body if follow == "POST" else Body(),
                )
            )
            i += 1
        elif i % 1000 == 0 and i < n:  # the same order again, from the same client, accepted again
            yield exchange_row(
                Exchange(
                    capture_id=1,
                    seq=i,
                    method="POST",
                    url="https://svc0.example.test/orders",
                    url_norm="https://svc0.example.test/orders",
                    started_at=t0 + i * 0.001,
                    client="10.9.9.9",
                    connection=f"c{i}",
                    status=201,
                    request_body=body,
                )
            )
            i += 1


CHILD = """
import sys, time
from analyzer.store import open_store
from analyzer.analysis import analyze
store = open_store(sys.argv[1])
t = time.perf_counter()
result = analyze(store)
print(result.chain_count, result.finding_count, time.perf_counter() - t)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exchanges", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = str(Path(tmp) / "bench.db")
        store = open_store(db)
        t = time.perf_counter()
        with store.begin() as conn:
            from analyzer.store import add_capture

            add_capture(conn, source="proxy", path="bench")
            written = write_exchanges(conn, rows(args.exchanges))
        fill = time.perf_counter() - t
        store.close()
        done = subprocess.run([sys.executable, "-c", CHILD, db], capture_output=True, text=True, check=True)
        chains, findings, seconds = done.stdout.split()
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"store: {written:,} exchanges written in {fill:.1f} s ({written / fill:,.0f} rows/s)")
    print(
        f"analyze: {float(seconds):.2f} s for {written:,} exchanges -> {int(chains):,} chains, "
        f"{int(findings):,} findings"
    )
    print(f"peak RSS of the analyzing process: {peak_mb:.0f} MB")


if __name__ == "__main__":
    main()
