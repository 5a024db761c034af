"""The recorder's per-flow work in a warm loop: flow -> Exchange -> row, and the live rules.

    uv run python benchmarks/bench_convert.py --flows 3000

Builds flows shaped like the proxy benchmark's traffic (hey's GET through mitmproxy to
nginx's 3-byte answer), then times, best of --repeat passes, what the proxy's thread
does per flow: `FlowConverter.convert`, `exchange_row` and `LiveAnalyzer.add`. Three
kinds of traffic: the headers repeat (as hey's and nginx's do, until the Date changes),
each response carries a header of its own (an X-Request-Id), and every request and
response carries one (no header block repeats). Inside a loaded mitmdump the same
work costs about twice as much (benchmarks/bench_hook.py): there the flows' data have
left the CPU caches by the time they are converted.
"""

from __future__ import annotations

import argparse
import time

from mitmproxy import http
from mitmproxy.test import tflow

from analyzer.analysis import AnalysisOptions
from analyzer.ingest.flows import FlowConverter
from analyzer.live import LiveAnalyzer
from analyzer.store import exchange_row

T0 = 1_790_000_000.0
KINDS = ("repeated headers", "unique response headers", "no header block repeats")


def flows(count: int, kind: str) -> list[http.HTTPFlow]:
    client = tflow.tclient_conn()
    client.peername = ("127.0.0.1", 40000)
    made = []
    for n in range(count):
        at = T0 + n / 1000
        date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(int(at)))
        request = http.Request.make(
            "GET",
            "http://127.0.0.1:8080/",
            b"",
            {
                "Host": "127.0.0.1:8080",
                "User-Agent": "hey/0.0.1",
                "Content-Type": "text/html",
                "Accept-Encoding": "gzip",
            },
        )
        response = http.Response.make(
            200,
            b"ok\n",
            {
                "Server": "nginx/1.22.1",
                "Date": date,
                "Content-Type": "text/plain",
                "Content-Length": "3",
                "Connection": "keep-alive",
            },
        )
        if kind != KINDS[0]:
            response.headers["X-Request-Id"] = f"{n:032x}"
        if kind == KINDS[2]:
            request.headers["X-Trace"] = f"{n:016x}"
        request.timestamp_start, request.timestamp_end = at, at + 0.0005
        response.timestamp_start, response.timestamp_end = at + 0.001, at + 0.0015
        made.append(tflow.tflow(client_conn=client, req=request, resp=response))
    return made


def best(work, items, repeat: int) -> float:
    """Fewest µs per item over `repeat` passes."""
    fastest = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        work(items)
        fastest = min(fastest, time.perf_counter() - start)
    return fastest / len(items) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", type=int, default=3000)
    parser.add_argument("--repeat", type=int, default=7, help="passes; the fastest counts")
    args = parser.parse_args()
    for kind in KINDS:
        batch = flows(args.flows, kind)
        converter = FlowConverter(1, b"k" * 32)

        def convert(items, convert=converter.convert):
            for seq, flow in enumerate(items):
                exchange_row(convert(seq, flow))

        exchanges = [converter.convert(seq, flow) for seq, flow in enumerate(batch)]

        def judge(items):
            live = LiveAnalyzer(AnalysisOptions())
            for exchange in items:
                live.add(exchange)

        print(
            f"{kind:25s}: convert + row {best(convert, batch, args.repeat):5.2f} µs per flow, "
            f"live rules {best(judge, exchanges, args.repeat):5.2f} µs"
        )


if __name__ == "__main__":
    main()
