"""The live proxy's memory as traffic goes on: mitmdump's RSS from 10k exchanges on.

    uv run python benchmarks/bench_live_memory.py --exchanges 1000000
    uv run python benchmarks/bench_live_memory.py --exchanges 200000 --no-live

A real mitmdump runs the recorder (live analysis on unless --no-live) into a SQLite
store in a temporary directory. Behind it, an asyncio upstream on 127.0.0.1 answers
at once; in front, an asyncio client sends --connections keep-alive streams of
requests through the proxy, a mix that keeps every part of live analysis busy:

* GET /r/N answers 302 to /t/N, which the client follows (a new redirect pair every
  time: the stale rule's summaries);
* GET /tmp answers 307 to /x, never followed (a redirect waiting out the link window);
* POST /pay/K with one of 50 bodies answers 201 (writes; the same one again within the
  duplicate window is a duplicate-write finding), and a POST to /pay-old answers 307 to
  /pay/K, which the client follows with the body (a write that arrived by a redirect);
* GET /p/N answers 200 (plain traffic).

RSS (psutil, the mitmdump process) is read when the proxy has answered 10k exchanges
and then at every --every, and printed with its difference from the 10k figure; the
exchanges stored are counted at the end. Each reading waits for the proxy to have
answered, not for the writer; the writer's queue is bounded by its own hold.
Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
ADDON = ROOT / "addons" / "redirect_recorder.py"
HOST = "127.0.0.1"
BODIES = [f'{{"amount": {k}, "currency": "EUR"}}'.encode() for k in range(50)]


def answer(method: str, path: str) -> bytes:
    if path.startswith("/r/"):
        head, body = f"302 Found\r\nLocation: /t/{path[3:]}", b"moved"
    elif path == "/tmp":
        head, body = "307 Temporary Redirect\r\nLocation: /x", b"moved"
    elif path.startswith("/pay-old/"):
        head, body = f"307 Temporary Redirect\r\nLocation: /pay/{path[9:]}", b"moved"
    elif method == "POST":
        head, body = "201 Created\r\nContent-Type: application/json", b'{"ok": true}'
    else:
        head, body = "200 OK\r\nContent-Type: text/plain", b"hello " * 20
    return f"HTTP/1.1 {head}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            length = 0
            for line in lines[1:]:
                if line[:15].lower() == "content-length:":
                    length = int(line[15:])
            if length:
                await reader.readexactly(length)
            writer.write(answer(method, target))
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


class Client:
    """One keep-alive connection to the proxy, sending absolute-form requests."""

    def __init__(self, proxy_port: int, upstream: str):
        self.proxy_port, self.upstream = proxy_port, upstream

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(HOST, self.proxy_port)

    async def send(self, method: str, path: str, body: bytes = b"") -> tuple[int, str | None]:
        extra = f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n" if body else ""
        self.writer.write(
            f"{method} {self.upstream}{path} HTTP/1.1\r\nHost: {self.upstream[7:]}\r\n"
            f"User-Agent: bench-live/1\r\n{extra}\r\n".encode()
            + body
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length, location = 0, None
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.lower()
            if name == "content-length":
                length = int(value)
            elif name == "location":
                location = value.strip()
        if length:
            await self.reader.readexactly(length)
        return status, location


async def drive(client: Client, start: int, step: int, total: int, counter: list[int]) -> None:
    n = start
    while counter[0] < total:
        kind = n % 6
        if kind == 0:
            _, location = await client.send("GET", f"/r/{n}")
            await client.send("GET", location or "/")
            counter[0] += 2
        elif kind == 1:
            await client.send("GET", "/tmp")
            counter[0] += 1
        elif kind == 2:
            await client.send("POST", f"/pay/{n % 50}", BODIES[n % 50])
            counter[0] += 1
        elif kind == 3:
            _, location = await client.send("POST", f"/pay-old/{n % 50}", BODIES[(n + 1) % 50])
            await client.send("POST", location or "/", BODIES[(n + 1) % 50])
            counter[0] += 2
        else:
            await client.send("GET", f"/p/{n}")
            counter[0] += 1
        n += step


async def run(args: argparse.Namespace, proxy_port: int, upstream_port: int, proc: psutil.Process) -> list:
    upstream = f"http://{HOST}:{upstream_port}"
    counter = [0]
    clients = [Client(proxy_port, upstream) for _ in range(args.connections)]
    for client in clients:
        await client.open()
    tasks = [
        asyncio.create_task(drive(client, i, args.connections, args.exchanges, counter))
        for i, client in enumerate(clients)
    ]
    readings = []
    marks = [10_000, *range(args.every, args.exchanges + 1, args.every)]
    started = time.monotonic()
    deadline = started + args.timeout
    for mark in sorted(set(m for m in marks if m <= args.exchanges)):
        while counter[0] < mark and time.monotonic() < deadline and not all(t.done() for t in tasks):
            await asyncio.sleep(0.05)
        if counter[0] < mark:
            break
        rss = proc.memory_info().rss / 2**20
        readings.append((counter[0], rss, time.monotonic() - started))
        base = readings[0][1]
        print(
            f"{counter[0]:>10,} exchanges  RSS {rss:7.1f} MB  ({rss - base:+6.1f} MB from 10k)"
            f"  {counter[0] / (time.monotonic() - started):7.0f}/s",
            flush=True,
        )
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return readings


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exchanges", type=int, default=200_000)
    parser.add_argument("--every", type=int, default=50_000, help="read RSS every this many exchanges")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--no-live", action="store_true", help="the recorder with live analysis off")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds before giving up")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-live-"))
    proxy_port = free_port()
    mitmdump = Path(sys.executable).parent / "mitmdump"
    db = tmp / "store.db"
    cmd = [
        str(mitmdump),
        "--listen-host",
        HOST,
        "--listen-port",
        str(proxy_port),
        "--set",
        f"confdir={tmp / 'conf'}",
        "--set",
        "flow_detail=0",
        "-s",
        str(ADDON),
        "--set",
        f"redirect_audit_db=sqlite:///{db}",
        "--set",
        f"redirect_audit_live={'false' if args.no_live else 'true'}",
    ]
    log = open(tmp / "mitmdump.log", "wb")  # noqa: SIM115 - closed below
    proxy = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)

    async def everything() -> list:
        server = await asyncio.start_server(serve, HOST, 0)
        upstream_port = server.sockets[0].getsockname()[1]
        for _ in range(300):  # the proxy listens within 30 s
            try:
                _, w = await asyncio.open_connection(HOST, proxy_port)
                w.close()
                break
            except OSError:
                await asyncio.sleep(0.1)
        async with server:
            return await run(args, proxy_port, upstream_port, psutil.Process(proxy.pid))

    try:
        print(f"live analysis {'off' if args.no_live else 'on'}; {args.connections} connections", flush=True)
        readings = asyncio.run(everything())
    finally:
        proxy.terminate()
        try:
            proxy.wait(120)
        except subprocess.TimeoutExpired:
            proxy.kill()
        log.close()
    stored = sqlite3.connect(db).execute("SELECT count(*) FROM exchanges").fetchone()[0]
    output = (tmp / "mitmdump.log").read_text(errors="replace")
    findings = output.count("redirect-audit RA")
    if readings:
        rss = [r for _, r, _ in readings]
        print(
            f"RSS from 10k to {readings[-1][0]:,} exchanges: {min(rss):.1f}..{max(rss):.1f} MB, "
            f"last - first {rss[-1] - rss[0]:+.1f} MB; stored {stored:,}; live findings logged {findings:,}"
        )
    for line in output.splitlines():
        if "live analysis keeps at most" in line:
            print(line.strip())
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
