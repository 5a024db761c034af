"""Canaries per artefact: which secrets reach which file, through each way in.

    uv run python benchmarks/canary_table.py
    uv run python benchmarks/canary_table.py --repo /path/to/an/older/checkout

One set of canaries (distinctive strings) is put where secrets sit in real traffic,
under names no fixed list had (`x-signature`, `secretToken`, `X-Session-Token`, a JWT
under `q`, URL userinfo, `pass%77ord`, a GraphQL or XML password...) and under the
usual ones. They go in through the three ways in: a HAR file, a mitmproxy flow dump
and a real `redirect-audit proxy` (with --keep-bodies, with the store locked for part
of the traffic so that the spool is written too). Then every artefact is searched for
each canary, as is and percent-encoded or base64-encoded: the store with its WAL, the
spool, the proxy's terminal, every output format of findings/chains/clients/captures,
the HTML report, the Parquet export and the export-tests modules.

It drives the command line only, so --repo can point at an older checkout (its
`python -m analyzer`, run with this interpreter) for a before/after table. Loopback only.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from canaries import leaks  # noqa: E402
from proxyrun import free_port, wait_for_port  # noqa: E402
from upstream import Upstream  # noqa: E402

QUERY = (
    "x-signature",
    "auth_key",
    "secretToken",
    "api-token",
    "client-secret",
    "AWSAccessKeyId",
    "sas_token",
)
QUERY += ("private_token", "passcode", "access_token")
HEADERS = ("Token", "X-Token", "X-Session-Token", "X-Shopify-Access-Token", "Cookie")


def canaries() -> dict[str, str]:
    c = {f"query {n}": f"CANARY{i}q{uuid.uuid4().hex[:8]}" for i, n in enumerate(QUERY)}
    c |= {f"header {n}": f"CANARY{i}h{uuid.uuid4().hex[:8]}" for i, n in enumerate(HEADERS)}
    for i, where in enumerate(
        (
            "authorization bearer",
            "authentication bearer",
            "userinfo password",
            "location userinfo",
            "json clientSecret",
            "json escaped password",
            "json nested secret",
            "form encoded password",
            "graphql password",
            "xml password",
        )
    ):
        c[where] = f"CANARY{i}s{uuid.uuid4().hex[:8]}"
    c["jwt under q"] = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0." + f"CANARYjwt{uuid.uuid4().hex[:8]}"
    return c


def leaked(blob: bytes, c: dict[str, str]) -> set[str]:
    return set(leaks(blob, c))


# ---- the traffic, one request list for all three ways in --------------------------------------


def requests_of(c: dict[str, str], origin: str) -> list[tuple[str, str, dict[str, str], bytes]]:
    host = origin.split("://", 1)[1]
    query = "&".join(f"{n}={c['query ' + n]}" for n in QUERY)
    json_body = (
        '{"user": "u", "clientSecret": "'
        + c["json clientSecret"]
        + '", "pass\\u0077ord": "'
        + c["json escaped password"]
        + '", "auth": {"secret": "'
        + c["json nested secret"]
        + '"}, "query": '
        + json.dumps('mutation { login(user: "u", password: "' + c["graphql password"] + '") { ok } }')
        + "}"
    ).encode()
    headers = {n: c[f"header {n}"] for n in HEADERS if n != "Cookie"}
    headers["Cookie"] = f"sid={c['header Cookie']}"
    headers["Authorization"] = f"Bearer {c['authorization bearer']}"
    headers["Authentication"] = f"Bearer {c['authentication bearer']}"
    headers["Content-Type"] = "application/json"
    to = quote(f"http://u:{c['location userinfo']}@{host}/echo/after", safe="")
    return [
        ("POST", f"{origin}/r/307/pay?{query}&q={c['jwt under q']}&to={to}", headers, json_body),
        # userinfo in the request target: clients other than http.client move it to a header;
        # mitmproxy refuses the line, and the recorder records it from the line
        ("GET", f"http://u:{c['userinfo password']}@{host}/echo/userinfo", {}, b""),
        ("POST", f"{origin}/r/303/form", {"Content-Type": "application/x-www-form-urlencoded"},
         f"user=u&pass%77ord={c['form encoded password']}&next_page_token=page-2".encode()),
        ("POST", f"{origin}/echo/xml", {"Content-Type": "application/xml"},
         f"<login><user>u</user><Password>{c['xml password']}</Password></login>".encode()),
    ]  # fmt: skip


def har(c: dict[str, str], path: Path) -> None:
    entries = []
    for i, (method, url, headers, body) in enumerate(requests_of(c, "https://api.test")):
        entries.append(
            {
                "startedDateTime": f"2026-06-01T10:00:0{i}Z",
                "request": {
                    "method": method,
                    "url": url,
                    "httpVersion": "HTTP/1.1",
                    "headers": [{"name": n, "value": v} for n, v in headers.items()],
                    **(
                        {"postData": {"mimeType": headers.get("Content-Type", ""), "text": body.decode()}}
                        if body
                        else {}
                    ),
                },
                "response": {
                    "status": 307 if i == 0 else 200,
                    "statusText": "",
                    "headers": [
                        {"name": "Location", "value": f"https://u:{c['location userinfo']}@api.test/next"}
                    ]
                    if i == 0
                    else [],
                    "content": {"size": 0, "mimeType": "text/plain"},
                },
            }
        )
    path.write_text(
        json.dumps({"log": {"version": "1.2", "creator": {"name": "c", "version": "1"}, "entries": entries}})
    )


def flow_dump(c: dict[str, str], path: Path) -> None:
    from mitmproxy import io as mio
    from mitmproxy.test import tflow

    with path.open("wb") as fh:
        writer = mio.FlowWriter(fh)
        for i, (method, url, headers, body) in enumerate(requests_of(c, "http://api.test")):
            flow = tflow.tflow(resp=True)
            flow.request.url = url
            flow.request.method = method
            for n, v in headers.items():
                flow.request.headers[n] = v
            flow.request.content = body
            if i == 0:
                flow.response.status_code = 307
                flow.response.headers["Location"] = f"http://u:{c['location userinfo']}@api.test/next"
            writer.add(flow)


# ---- running the tool -------------------------------------------------------------------------


class Tool:
    def __init__(self, repo: Path):
        self.repo = repo
        self.env = {**os.environ, "PYTHONPATH": str(repo), "PYTHONUNBUFFERED": "1"}

    def run(self, *args: str, ok=(0, 1)) -> bytes:
        done = subprocess.run(
            [sys.executable, "-m", "analyzer", *args],
            cwd=self.repo,
            env=self.env,
            capture_output=True,
            timeout=300,
        )
        if done.returncode not in ok:
            return b""  # a command this version does not have, or refused: nothing to search
        return done.stdout + done.stderr

    def artefacts(self, db: Path, work: Path) -> dict[str, bytes]:
        out: dict[str, bytes] = {
            "store + WAL": b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*") if p.is_file())
        }
        outputs = b""
        for args in (
            ["findings"], ["findings", "-f", "json"], ["findings", "-f", "sarif"], ["findings", "-f", "junit"],
            ["findings", "-f", "markdown"], ["chains"], ["chains", "-f", "json"], ["clients"], ["captures"],
        ):  # fmt: skip
            outputs += self.run(*args, "--db", str(db))
        out["findings/chains/clients/captures"] = outputs
        html = work / "report.html"
        self.run("findings", "-f", "html", "--db", str(db), "-o", str(html))
        out["HTML report"] = html.read_bytes() if html.exists() else b""
        parquet, tests = work / "parquet", work / "contract"
        self.run("export", str(parquet), "--db", str(db))
        out["Parquet export"] = b"".join(p.read_bytes() for p in parquet.rglob("*") if p.is_file())
        self.run("export-tests", "--db", str(db), "-o", str(tests))
        out["export-tests"] = b"".join(p.read_bytes() for p in tests.rglob("*") if p.is_file())
        return out


def through_proxy(tool: Tool, c: dict[str, str], work: Path) -> dict[str, bytes]:
    upstream = Upstream()
    db = work / "p.db"
    tool.run("import-har", str(work / "empty.har"), "--db", str(db), ok=(0, 1, 2))  # the store exists first
    port = free_port()
    log = work / "proxy.out"
    spool = b""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "analyzer", "proxy", "--db", str(db), "-p", str(port), "--keep-bodies",
             "--confdir", str(work / "conf")],
            cwd=tool.repo, env=tool.env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            wait_for_port(port, 60)
            requests = requests_of(c, upstream.origin)
            lock = None
            for i, (method, url, headers, body) in enumerate(requests * 2):
                if i == len(requests):  # the second round while the store is locked: it goes to the spool
                    lock = sqlite3.connect(db, timeout=30)
                    lock.execute("BEGIN IMMEDIATE")
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                conn.request(method, url, body=body, headers=headers)
                conn.getresponse().read()
                conn.close()
            time.sleep(3)  # the writer gives up on the lock and spools
            spool = b"".join(p.read_bytes() for p in work.glob("p.db.spool/*") if p.is_file())
            if lock is not None:
                lock.rollback()
                lock.close()
            time.sleep(4)  # replayed
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
            upstream.close()
    found = tool.artefacts(db, work)
    found["spool"] = spool
    found["proxy terminal"] = log.read_bytes()
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--repo", type=Path, default=ROOT, help="the checkout whose `python -m analyzer` runs"
    )
    args = parser.parse_args()
    tool = Tool(args.repo.resolve())
    c = canaries()
    table: dict[str, dict[str, set[str]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "empty.har").write_text('{"log": {"version": "1.2", "entries": []}}')
        for way in ("HAR", "flows", "proxy"):
            here = work / way
            here.mkdir()
            if way == "HAR":
                har(c, here / "in.har")
                tool.run("import-har", str(here / "in.har"), "--db", str(here / "s.db"), "--keep-bodies")
                found = tool.artefacts(here / "s.db", here)
            elif way == "flows":
                flow_dump(c, here / "in.mitm")
                tool.run("import-flows", str(here / "in.mitm"), "--db", str(here / "s.db"), "--keep-bodies")
                found = tool.artefacts(here / "s.db", here)
            else:
                found = through_proxy(tool, c, here)
            table[way] = {name: leaked(blob, c) for name, blob in found.items()}
    names = sorted({n for found in table.values() for n in found})
    print(f"canaries in clear, of {len(c)} ({tool.repo}):")
    print(f"{'artefact':36} {'HAR':>5} {'flows':>6} {'proxy':>6}")
    for name in names:
        cells = [str(len(table[w][name])) if name in table[w] else "-" for w in ("HAR", "flows", "proxy")]
        print(f"{name:36} {cells[0]:>5} {cells[1]:>6} {cells[2]:>6}")
    every = sorted(set().union(*(s for found in table.values() for s in found.values())))
    print("leaked anywhere:", ", ".join(every) or "none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
