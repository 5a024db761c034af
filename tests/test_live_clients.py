"""Real clients through a real mitmdump with the recorder, against a loopback upstream.

curl, requests, httpx, urllib3, urllib.request and Node's built-in fetch each meet
301/302/303/307/308 for GET, HEAD, POST, PUT, PATCH and DELETE, same-origin and to
another origin (another port), over HTTP and over HTTPS through mitmproxy's CA. For
every case the test knows what the client is documented to do (BEHAVIOUR below, with
its source), checks that the recorded chain shows exactly that, and that the findings
are exactly those the rules give for that behaviour: none where the client conforms.
The live run's findings must be the ones `analyze` finds afterwards.
"""

from __future__ import annotations

import inspect
import json
import re
import shutil
import ssl
import subprocess
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest

from analyzer.analysis import analyze
from analyzer.model import Severity
from analyzer.store import open_store
from proxyrun import ROOT, Mitmdump
from upstream import Upstream, self_signed_context

CLIENTS = ["curl", "requests", "httpx", "urllib3", "urllib", "node"]
STATUSES = [301, 302, 303, 307, 308]
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]
BODY_METHODS = {"POST", "PUT", "PATCH"}
SCHEMES = ["http", "https"]
ORIGINS = ["same", "cross"]
NODE_DIR = ROOT / "tests" / "node"
URLLIB_KEEPS_HEAD = 'method="HEAD"' in inspect.getsource(urllib.request.HTTPRedirectHandler.redirect_request)


@dataclass(frozen=True)
class Case:
    client: str
    scheme: str
    status: int
    method: str
    origin: str

    @property
    def id(self) -> str:
        return f"{self.client}-{self.scheme}-{self.status}-{self.method}-{self.origin}".lower()

    @property
    def body(self) -> bytes | None:
        return f"case={self.id}".encode() if self.method in BODY_METHODS else None


@dataclass(frozen=True)
class Follow:
    followed: bool
    method: str | None = None
    body: bool = False  # the follow-up carried the original body


def behaviour(client: str, status: int, method: str) -> Follow:
    """What each client is documented to do on the follow-up."""
    body = method in BODY_METHODS
    if client == "urllib":
        # Lib/urllib/request.py HTTPRedirectHandler.redirect_request: GET/HEAD follow every
        # status; POST follows 301/302/303 as GET; everything else raises HTTPError. The new
        # Request is built without a method where this CPython predates the HEAD fix, so HEAD
        # comes back as GET -- on 307/308 too.
        if method == "HEAD":
            return Follow(True, "HEAD" if URLLIB_KEEPS_HEAD else "GET")
        if method == "GET":
            return Follow(True, method)
        if method == "POST" and status in (301, 302, 303):
            return Follow(True, "GET")
        return Follow(False)
    if client in ("requests", "httpx"):
        # requests SessionRedirectMixin.rebuild_method / httpx Client._redirect_method:
        # 303 and 302 turn everything but HEAD into GET, 301 turns POST into GET.
        changed = (status in (302, 303) and method != "HEAD") or (status == 301 and method == "POST")
        after = "GET" if changed else method
        if client == "requests":
            # resolve_redirects drops the body on every status but 307/308.
            return Follow(True, after, body and status in (307, 308))
        return Follow(True, after, body and not changed)  # httpx keeps the stream unless it switched to GET
    if client == "urllib3":
        # PoolManager.urlopen: 303 becomes GET without body (HEAD too); others keep method and body.
        if status == 303:
            return Follow(True, "GET")
        return Follow(True, method, body)
    if client == "node":
        # Fetch, HTTP-redirect fetch step 12: POST on 301/302, and anything but GET/HEAD on 303,
        # becomes GET without body; otherwise method and body are kept.
        changed = (status in (301, 302) and method == "POST") or (status == 303 and method not in ("GET", "HEAD"))
        return Follow(True, "GET" if changed else method, body and not changed)
    if client == "curl":
        # curl -L: POST (-d) becomes GET on 301/302/303; -X sets the method for every request
        # (CURLOPT_CUSTOMREQUEST) but the data is only re-sent on 307/308; -I stays HEAD.
        if method == "POST":
            return Follow(True, "GET" if status in (301, 302, 303) else "POST", status in (307, 308))
        return Follow(True, method, body and status in (307, 308))
    raise AssertionError(client)


def expected_findings(case: Case) -> list[tuple[str, str]]:
    """The (rule id, severity) list the mission rules must give for this behaviour."""
    follow = behaviour(case.client, case.status, case.method)
    if not follow.followed:
        return []
    before, after = case.method, follow.method
    if after != before:
        if case.status in (307, 308):
            return [("RA101", "high")]
        if case.status in (301, 302) and not (before == "HEAD" and after == "GET"):
            return [("RA101", "low" if (before, after) == ("POST", "GET") else "medium")]
        return []
    keeps_body = case.status in (307, 308) or (case.status in (301, 302) and before in BODY_METHODS)
    if before in BODY_METHODS and keeps_body and not follow.body:
        return [("RA102", "high")]
    return []


ALL_CASES = [Case(c, s, st, m, o) for c in CLIENTS for s in SCHEMES for st in STATUSES for m in METHODS for o in ORIGINS]


# ---- running the clients ---------------------------------------------------------


class World:
    """Two HTTP and two HTTPS origins, and the proxy in front of them."""

    def __init__(self, tmp: Path):
        tls = self_signed_context(tmp)
        self.origins = {("http", 0): Upstream(), ("http", 1): Upstream(),
                        ("https", 0): Upstream(tls), ("https", 1): Upstream(tls)}
        self.db = tmp / "live.db"
        self.proxy = Mitmdump(tmp / "mitm", db=str(self.db))
        self.ca = str(self.proxy.ca)

    def url(self, case: Case) -> str:
        here, there = self.origins[(case.scheme, 0)], self.origins[(case.scheme, 1)]
        url = f"{here.origin}/r/{case.status}/{case.id}"
        if case.origin == "cross":
            url += "?to=" + quote(f"{there.origin}/echo/{case.id}", safe="")
        return url

    def close(self) -> str:
        output = self.proxy.stop()
        for up in self.origins.values():
            up.close()
        return output


FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def run_curl(world: World, cases: list[Case]) -> None:
    for case in cases:
        args = ["curl", "-sS", "-o", "/dev/null", "-L", "--max-redirs", "5", "--max-time", "15",
                "--proxy", world.proxy.url, "--cacert", world.ca, "--noproxy", ""]
        if case.method == "HEAD":
            args.append("-I")
        elif case.method == "POST":
            args += ["-d", case.body.decode()]
        elif case.method != "GET":
            args += ["-X", case.method] + (["-d", case.body.decode()] if case.body else [])
        subprocess.run([*args, world.url(case)], capture_output=True, timeout=30, env={"PATH": "/usr/bin:/bin"})


def run_requests(world: World, cases: list[Case]) -> None:
    import requests

    with requests.Session() as session:
        session.trust_env = False
        session.proxies = {"http": world.proxy.url, "https": world.proxy.url}
        session.verify = world.ca
        for case in cases:
            session.request(case.method, world.url(case), data=case.body, headers=FORM if case.body else None,
                            timeout=15)


def run_httpx(world: World, cases: list[Case]) -> None:
    import httpx

    context = ssl.create_default_context(cafile=world.ca)
    with httpx.Client(proxy=world.proxy.url, verify=context, follow_redirects=True, trust_env=False,
                      timeout=15) as client:
        for case in cases:
            client.request(case.method, world.url(case), content=case.body, headers=FORM if case.body else None)


def run_urllib3(world: World, cases: list[Case]) -> None:
    import urllib3

    with urllib3.ProxyManager(world.proxy.url, ca_certs=world.ca) as pool:
        for case in cases:
            pool.request(case.method, world.url(case), body=case.body, headers=FORM if case.body else None,
                         redirect=True, retries=urllib3.Retry(total=5, redirect=5, raise_on_redirect=False),
                         timeout=15)


def run_urllib(world: World, cases: list[Case]) -> None:
    context = ssl.create_default_context(cafile=world.ca)
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({"http": world.proxy.url, "https": world.proxy.url}),
        urllib.request.HTTPSHandler(context=context),
    )
    for case in cases:
        request = urllib.request.Request(world.url(case), data=case.body, method=case.method,
                                         headers=FORM if case.body else {})
        try:
            with opener.open(request, timeout=15) as response:
                response.read()
        except urllib.error.HTTPError as exc:  # a redirect it will not follow
            exc.close()


def run_node(world: World, cases: list[Case]) -> None:
    payload = [{"id": c.id, "url": world.url(c), "method": c.method,
                "body": c.body.decode() if c.body else None} for c in cases]
    done = subprocess.run(["node", str(NODE_DIR / "fetch_cases.mjs"), world.proxy.url], input=json.dumps(payload),
                          capture_output=True, text=True, timeout=300, cwd=NODE_DIR,
                          env={"PATH": "/usr/bin:/bin:/usr/local/bin", "NODE_EXTRA_CA_CERTS": world.ca})
    assert done.returncode == 0, done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(results) == len(cases), done.stdout + done.stderr


RUNNERS = {"curl": run_curl, "requests": run_requests, "httpx": run_httpx, "urllib3": run_urllib3,
           "urllib": run_urllib, "node": run_node}


@dataclass
class Outcome:
    chains: dict[str, object]  # case id -> Chain
    findings: dict[str, list[tuple[str, str]]]  # case id -> [(rule id, severity)]
    analyzed: set[tuple[str, str, str, str]]  # (rule id, severity, from url, to url)
    live: set[tuple[str, str, str, str]]
    output: str
    extra: dict[str, list[tuple[str, str]]]


def prerequisites() -> None:
    missing = [tool for tool in ("curl", "node") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"real clients missing: {', '.join(missing)} (.ci/run installs them)")
    if not (NODE_DIR / "node_modules" / "undici").exists():
        npm = shutil.which("npm")
        if npm is None:
            pytest.fail("npm missing: it installs undici for the Node client (apt-get install npm)")
        done = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=NODE_DIR,
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            pytest.fail(f"npm ci in tests/node failed: {done.stderr.strip()[-500:]}")


@pytest.fixture(scope="module")
def outcome(tmp_path_factory) -> Outcome:
    prerequisites()
    world = World(tmp_path_factory.mktemp("live"))
    try:
        by_client = {c: [case for case in ALL_CASES if case.client == c] for c in CLIENTS}
        with ThreadPoolExecutor(len(CLIENTS)) as pool:
            for future in [pool.submit(RUNNERS[c], world, by_client[c]) for c in CLIENTS]:
                future.result()
        extra = run_other_rules(world)
    finally:
        output = world.close()
    store = open_store(str(world.db))
    result = analyze(store)
    chains, findings = {}, {}
    ids = {case.id for case in ALL_CASES} | set(extra)
    for chain in result.chains:
        case_id = chain.root.url.rsplit("/", 1)[-1].split("?")[0]
        if case_id in ids:
            chains[case_id] = chain
    analyzed = set()
    for f in result.findings:
        source = f.chain.hops[f.hop].source if f.chain else f.exchange
        case_id = (f.chain.root.url if f.chain else f.exchange.url).rsplit("/", 1)[-1].split("?")[0]
        findings.setdefault(case_id, []).append((f.rule_id, str(f.severity)))
        analyzed.add((f.rule_id, str(f.severity), source.url, f.exchange.url))
    live = {(m["rule"], m["sev"], m["src"], m["dst"]) for m in LIVE_LINE.finditer(output)}
    return Outcome(chains, findings, analyzed, live, output, {k: findings.get(k, []) for k in extra})


LIVE_LINE = re.compile(
    r"redirect-audit (?P<rule>RA\d+) \S+ \[(?P<sev>\w+)\] \S+ (?P<src>\S+) -> \S+ -> \S+ (?P<dst>\S+): "
)


def run_other_rules(world: World) -> dict[str, None]:
    """Traffic for the rules that look beyond one chain: a write accepted twice, a cacheable 302."""
    import requests

    here = world.origins[("http", 0)].origin
    with requests.Session() as session:
        session.trust_env = False
        session.proxies = {"http": world.proxy.url, "https": world.proxy.url}
        for _ in range(2):  # the same order, sent twice, accepted twice
            session.post(f"{here}/echo/dup-order", data=b"order=42", headers=FORM, timeout=15)
        session.get(f"{here}/r/302/cached-302?cache=86400", timeout=15)
    return {"dup-order": None, "cached-302": None}


# ---- the assertions -----------------------------------------------------------------


@pytest.mark.parametrize("client", CLIENTS)
def test_each_client_does_what_it_is_documented_to_do(outcome, client):
    wrong = []
    for case in (c for c in ALL_CASES if c.client == client):
        expect = behaviour(case.client, case.status, case.method)
        chain = outcome.chains.get(case.id)
        if chain is None:
            wrong.append(f"{case.id}: no chain recorded")
            continue
        hop = chain.hops[0]
        seen = Follow(hop.target is not None,
                      hop.target.method if hop.target else None,
                      bool(hop.target and hop.target.request_body.length))
        if seen != expect:
            wrong.append(f"{case.id}: expected {expect}, recorded {seen} (chain end {chain.end})")
        elif hop.target is not None and hop.link not in ("same-connection", "same-client"):
            wrong.append(f"{case.id}: linked as {hop.link}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("client", CLIENTS)
def test_each_client_gets_exactly_the_findings_its_behaviour_earns(outcome, client):
    wrong = []
    for case in (c for c in ALL_CASES if c.client == client):
        got = sorted(outcome.findings.get(case.id, []))
        want = sorted(expected_findings(case))
        if got != want:
            wrong.append(f"{case.id}: expected {want}, got {got}")
    assert not wrong, "\n".join(wrong)


def test_some_cases_fire_and_most_conform(outcome):
    firing = [c for c in ALL_CASES if expected_findings(c)]
    assert 60 <= len(firing) < len(ALL_CASES) // 2  # the matrix is not trivially quiet or noisy


def test_rules_beyond_one_chain_fire_live_and_afterwards(outcome):
    assert outcome.extra["dup-order"] == [("RA103", str(Severity.HIGH))]
    assert outcome.extra["cached-302"] == [("RA104", str(Severity.MEDIUM))]


def test_the_live_run_and_analyze_agree(outcome):
    firing = sum(len(expected_findings(c)) for c in ALL_CASES) + len(outcome.extra)
    assert len(outcome.live) == firing, outcome.output[-3000:]
    assert outcome.live == outcome.analyzed


def test_every_exchange_seen_is_stored(outcome):
    totals = re.search(r"saw (\d+) exchanges, stored (\d+)", outcome.output)
    assert totals, outcome.output[-3000:]
    seen, stored = map(int, totals.groups())
    assert seen == stored >= len(ALL_CASES)
