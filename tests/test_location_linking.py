"""Location values as real servers send them, followed by real clients, linked as sent.

Servers send raw UTF-8 in `Location` (`/š`), spaces, backslashes, upper-case schemes and
hosts, internationalized host names, dot segments and fragments. Each client repairs the
value before it sends the follow-up: Chromium and Node's fetch as the WHATWG URL parser
does (percent-encoding, `\\` as `/`, IDNA to punycode), curl and requests in their own
ways. Whatever the client sent, the recorded follow-up must be linked to its redirect:
an unlinked follow-up turns a re-sent POST into a false lost-write.

The clients reach one loopback server through a real mitmdump in upstream-proxy mode, so
every host name (`origin.test`, `bücher.test`) ends at that server and nothing is ever
resolved: no traffic leaves loopback. The server answers `/start/<case>` with a redirect
whose Location bytes are the case's, anything else with 200.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import ada_url
import pytest
from conftest import require_program, run_cli
from proxyrun import ROOT, Mitmdump

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("location_linking")]

# case -> the Location bytes the server sends for http://origin.test/start/<client>-<case>,
# "{id}" standing for <client>-<case> so that every follow-up names its case
LOCATIONS: dict[str, bytes] = {
    "utf8": "/land/š-{id}".encode(),
    "space": b"/land/a b-{id}",
    "backslash": b"\\land\\back-{id}",
    "scheme": b"HTTP://Origin.TEST/land/Mixed-{id}",
    "idn": "http://bücher.test/land/{id}".encode(),
    "query": "/land/q-{id}?x=ä y".encode(),
    "dots": b"/land/x/../dots-{id}",
    "fragment": b"/land/frag-{id}#part",
}
CLIENT_ERRORS: dict[str, str] = {}  # <client>-<case> -> what the client raised
START = re.compile(r"/start/(?P<id>[a-z]+-(?P<case>[a-z0-9]+))")
CLIENTS = ("curl", "requests", "node", "chromium")
CURL = ("curl", "-sS", "-o", "/dev/null", "-L")
NODE_DIR = ROOT / "tests" / "node"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, format, *args):
        pass

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        path = urlsplit(self.path).path
        start = START.fullmatch(path)
        if start is not None and start["case"] in LOCATIONS:
            status = 303 if self.command == "POST" else 302
            location = LOCATIONS[start["case"]].replace(b"{id}", start["id"].encode())
            head = f"HTTP/1.1 {status} Found\r\n".encode() + b"Location: " + location + b"\r\n"
            self.wfile.write(head + b"Content-Length: 0\r\n\r\n")
            return
        target = self.path if "://" in self.path else f"http://{self.headers['Host']}{self.path}"
        self.server.seen.append((self.command, target, len(body)))
        answer = json.dumps({"method": self.command, "target": self.path, "body": len(body)}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(answer)

    do_GET = do_POST = do_PUT = do_HEAD = _handle

    def do_CONNECT(self) -> None:
        """undici's ProxyAgent tunnels even http:// URLs: the requests follow in origin form."""
        self.send_response(200, "Connection established")
        self.end_headers()


def start(client: str, case: str) -> str:
    return f"http://origin.test/start/{client}-{case}"


def run_curl(proxy: str) -> None:
    for case in LOCATIONS:
        done = subprocess.run(
            [
                *CURL,
                "--max-redirs",
                "3",
                "--max-time",
                "15",
                "--proxy",
                proxy,
                "--noproxy",
                "",
                start("curl", case),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env={"PATH": "/usr/bin:/bin"},  # no locale: curl cannot convert a UTF-8 host name
        )
        if done.returncode != 0:
            CLIENT_ERRORS[f"curl-{case}"] = done.stderr.strip()
    # curl -X POST -L keeps POST after a 303 and sends it without the body
    subprocess.run(
        [*CURL, "-X", "POST", "-d", "amount=5", "--proxy", proxy, "--noproxy", "", start("curlpost", "dots")],
        capture_output=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )


def run_requests(proxy: str) -> None:
    import requests

    with requests.Session() as session:
        session.trust_env = False
        session.proxies = {"http": proxy}
        for case in LOCATIONS:
            try:
                session.get(start("requests", case), timeout=15)
            except Exception as exc:  # a raw UTF-8 host: urllib3 fails an assert (b'b')
                CLIENT_ERRORS[f"requests-{case}"] = repr(exc)


def run_node(proxy: str) -> None:
    payload = [
        {"id": case, "url": start("node", case), "method": "GET", "body": None, "headers": {}}
        for case in LOCATIONS
    ]
    done = subprocess.run(
        ["node", str(NODE_DIR / "fetch_cases.mjs"), proxy],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=NODE_DIR,
        env={"PATH": "/usr/bin:/bin:/usr/local/bin"},
    )
    assert done.returncode == 0, done.stderr


def run_chromium(proxy: str) -> None:
    chromium = require_program("chromium", "apt-get install chromium (.ci/run installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium,
            args=[
                "--no-sandbox",
                f"--proxy-server={proxy}",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-pings",
                "--disable-features=OptimizationHints,Translate,MediaRouter,AutofillServerCommunication",
            ],
        )
        try:
            page = browser.new_page()
            for case in LOCATIONS:
                page.goto(start("chromium", case), timeout=15000)
        finally:
            browser.close()


RUNNERS = {"curl": run_curl, "requests": run_requests, "node": run_node, "chromium": run_chromium}


@pytest.fixture(scope="module")
def linked(tmp_path_factory) -> dict:
    require_program("curl", "apt-get install curl (.ci/run installs it)")
    require_program("node", "apt-get install nodejs (.ci/run installs it)")
    if not (NODE_DIR / "node_modules" / "undici").exists():
        pytest.fail("tests/node has no node_modules: run `npm ci --prefix tests/node` (.ci/run does)")
    tmp: Path = tmp_path_factory.mktemp("locations")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.seen = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    db = str(tmp / "locations.db")
    proxy = Mitmdump(
        tmp / "conf", db=db, extra=["--mode", f"upstream:http://127.0.0.1:{server.server_address[1]}"]
    )
    try:
        for client in CLIENTS:
            RUNNERS[client](proxy.url)
    finally:
        proxy.stop()
        server.shutdown()
        server.server_close()
    chains = json.loads(run_cli("chains", "-f", "json", "--db", db).stdout)
    findings = json.loads(run_cli("findings", "-f", "json", "--db", db).stdout)
    return {"chains": chains, "findings": findings, "seen": server.seen, "db": db}


def _chain_of(chains: list[dict], client: str, case: str) -> dict:
    wanted = f"/start/{client}-{case}"
    found = [c for c in chains if c["hops"][0]["from"]["url"].endswith(wanted)]
    assert len(found) == 1, f"{client} {case}: {len(found)} chains start at {wanted}"
    return found[0]


def _followed(linked: dict, client: str, case: str) -> list[str]:
    """What the server received after the redirect of this client and case."""
    marker = f"{client}-{case}"
    return [
        target
        for _, target, _ in linked["seen"]
        if marker in target and "/start/" + marker != urlsplit(target).path
    ]


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("case", LOCATIONS)
def test_each_follow_up_is_linked_to_its_redirect(linked, client, case):
    """Whatever the client made of the Location, what it sent is the hop's follow-up; a
    client that could not follow it (requests and a raw UTF-8 host) has an unlinked hop."""
    chain = _chain_of(linked["chains"], client, case)
    hop = chain["hops"][0]
    sent = _followed(linked, client, case)
    assert len(sent) <= 1, sent
    if not sent:
        assert hop["to"] is None, (
            f"{client} sent nothing after {LOCATIONS[case]!r}, yet a follow-up was linked"
        )
        assert f"{client}-{case}" in CLIENT_ERRORS  # the client gave up (requests, on a raw UTF-8 host)
        return
    assert hop["to"] is not None, f"{client} sent {sent[0]} after {LOCATIONS[case]!r}: not linked"
    assert _on_the_wire(hop["to"]["url"]) == _on_the_wire(sent[0])


def _on_the_wire(url: str) -> str:
    """mitmproxy records a host as it reads it (an IDN in Unicode, the case kept)."""
    return str(ada_url.URL(url).href)


def test_what_the_clients_really_sent(linked):
    """The repairs each client makes, as recorded: the reason linking cannot compare strings."""
    assert _followed(linked, "chromium", "utf8") == ["http://origin.test/land/%C5%A1-chromium-utf8"]
    assert _followed(linked, "curl", "space") == ["http://origin.test/land/a%20b-curl-space"]
    # WHATWG: "\\" is "/" in an http URL; requests percent-encodes it and resolves it as relative
    assert _followed(linked, "node", "backslash") == ["http://origin.test/land/back-node-backslash"]
    assert _followed(linked, "requests", "backslash") == [
        "http://origin.test/start/%5Cland%5Cback-requests-backslash"
    ]
    assert _followed(linked, "chromium", "idn") == ["http://xn--bcher-kva.test/land/chromium-idn"]
    assert _followed(linked, "curl", "query") == ["http://origin.test/land/q-curl-query?x=%c3%a4+y"]


def test_no_false_lost_write_or_unlinked_finding(linked):
    rules = sorted({f["rule"] for f in linked["findings"]})
    assert "lost-write" not in rules


def test_a_303_followed_with_post_and_no_body_is_a_dropped_body(linked):
    """curl -X POST -L keeps the method after a 303 and sends no body: two findings."""
    chain = _chain_of(linked["chains"], "curlpost", "dots")
    hop = chain["hops"][0]
    assert (hop["from"]["method"], hop["to"]["method"]) == ("POST", "POST")
    mine = {f["rule"]: f for f in linked["findings"] if f["chain_id"] == chain["chain_id"]}
    assert set(mine) == {"non-get-after-303", "dropped-body"}
    assert "no body" in mine["dropped-body"]["message"]
