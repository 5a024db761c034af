"""Real clients through a real mitmdump with the recorder, against loopback upstreams.

curl, requests, httpx, urllib3, urllib.request and Node's built-in fetch each meet
301/302/303/307/308 for GET, HEAD, POST, PUT, PATCH and DELETE, same-origin and to
another port, over HTTP and over HTTPS through mitmproxy's CA (the matrix). Then the
cases the later rules exist for: a caller-set Authorization, Cookie and
Proxy-Authorization redirected to another port and to another loopback address
(127.0.0.2); an https -> http hop carrying a token; a redirect loop and a 25-hop chain,
met with each client's own redirect limit; a request that names its redirect target
(open-redirect shape); a 302 without Location.

For every case the test knows what the client is documented to do (behaviour(),
keeps_credential() and REDIRECT_LIMIT below, with their sources), checks that the
recorded chain shows exactly that, and that the findings are exactly those the rules
give for that behaviour: none where the client conforms. The live run's findings must
be the ones `analyze` finds afterwards, and the conformance table (`frames.clients`,
`redirect-audit clients`) must read each client's behaviour back off the capture.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import re
import ssl
import subprocess
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
from conftest import require_program
from proxyrun import ROOT, Mitmdump
from upstream import Upstream, self_signed_context

from analyzer.analysis import analyze
from analyzer.detectors import RULES
from analyzer.model import Severity
from analyzer.store import open_store

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("live_clients")]

CLIENTS = ["curl", "requests", "httpx", "urllib3", "urllib", "node"]
STATUSES = [301, 302, 303, 307, 308]
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]
BODY_METHODS = {"POST", "PUT", "PATCH"}
WRITES = {"POST", "PUT", "PATCH", "DELETE"}
SCHEMES = ["http", "https"]
ORIGINS = ["same", "port"]  # the matrix: same origin, or another port on the same host
CREDENTIALS = {
    "Authorization": "Bearer t0ken-for-127.0.0.1",
    "Cookie": "sid=s3ss10n",
    "Proxy-Authorization": "Bearer pr0xy-t0ken",
}  # Basic would be a client label
NODE_DIR = ROOT / "tests" / "node"
URLLIB_KEEPS_HEAD = 'method="HEAD"' in inspect.getsource(urllib.request.HTTPRedirectHandler.redirect_request)
LOOP, LONG = "loop", "long"
LONG_CHAIN = 25


@dataclass(frozen=True)
class Case:
    client: str
    scheme: str
    status: int
    method: str
    origin: (
        str  # same | port (another port) | host (127.0.0.2) | plain (https -> http) | upgrade (http -> https)
    )
    kind: str = (
        "matrix"  # matrix | creds | auth (to a target that answers 401 without it) | loop | long | open
    )
    credential: str | None = None  # a credential header the caller sets

    @property
    def id(self) -> str:
        parts = [self.client, self.kind, self.scheme, str(self.status), self.method, self.origin]
        return "-".join(parts + ([self.credential] if self.credential else [])).lower()

    @property
    def body(self) -> bytes | None:
        return f"case={self.id}".encode() if self.method in BODY_METHODS else None

    @property
    def headers(self) -> dict[str, str]:
        headers = dict(FORM) if self.body else {}
        if self.credential:
            headers[self.credential] = CREDENTIALS[self.credential]
        return headers


@dataclass(frozen=True)
class Follow:
    followed: bool
    method: str | None = None
    body: bool = False  # the follow-up carried the original body
    body_headers: bool = False  # a follow-up switched to GET kept Content-Type
    credential: bool = False  # the caller's credential header went along


def behaviour(client: str, status: int, method: str) -> Follow:
    """What each client is documented to do on the follow-up."""
    body = method in BODY_METHODS
    if client == "urllib":
        # Lib/urllib/request.py HTTPRedirectHandler.redirect_request: GET/HEAD follow every
        # status; POST follows 301/302/303 as GET; everything else raises HTTPError. The new
        # Request is built without a method where this CPython predates the HEAD fix, so HEAD
        # comes back as GET -- on 307/308 too. Content-Length/Type are dropped.
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
            # resolve_redirects drops the body and Content-Type/Length on every status but 307/308.
            return Follow(True, after, body and status in (307, 308))
        # httpx keeps the stream unless it switched to GET; _redirect_headers then pops
        # Content-Length and Transfer-Encoding only, so Content-Type stays.
        return Follow(True, after, body and not changed, body_headers=body and changed)
    if client == "urllib3":
        # PoolManager.urlopen: 303 becomes GET without body or body headers (HEAD too);
        # others keep method and body.
        if status == 303:
            return Follow(True, "GET")
        return Follow(True, method, body)
    if client == "node":
        # Fetch, HTTP-redirect fetch step 12: POST on 301/302, and anything but GET/HEAD on 303,
        # becomes GET without body or request-body headers; otherwise method and body are kept.
        changed = (status in (301, 302) and method == "POST") or (
            status == 303 and method not in ("GET", "HEAD")
        )
        return Follow(True, "GET" if changed else method, body and not changed)
    if client == "curl":
        # curl -L: POST (-d) becomes GET on 301/302/303; -X sets the method for every request
        # (CURLOPT_CUSTOMREQUEST) but the data is only re-sent on 307/308; -I stays HEAD.
        if method == "POST":
            return Follow(True, "GET" if status in (301, 302, 303) else "POST", status in (307, 308))
        return Follow(True, method, body and status in (307, 308))
    raise AssertionError(client)


def keeps_credential(client: str, credential: str) -> bool:
    """Does the client send a caller-set credential header on to another origin?"""
    if client == "urllib":
        # redirect_request copies every header but Content-Length/Content-Type.
        return True
    if client == "httpx":
        # _redirect_headers pops Authorization off-origin and Cookie always; it leaves
        # Proxy-Authorization alone.
        return credential == "Proxy-Authorization"
    if client == "curl":
        # Since 7.83.0 (CVE-2022-27776) -H Authorization and Cookie are not sent to another
        # host, port or scheme without --location-trusted; other -H headers always are.
        return credential == "Proxy-Authorization"
    # requests: should_strip_auth (host, port or scheme changed), Cookie rebuilt from the
    # jar, rebuild_proxies drops Proxy-Authorization. urllib3: Retry's
    # remove_headers_on_redirect (Cookie, Authorization, Proxy-Authorization) when the host
    # changes. undici's fetch: deletes authorization, proxy-authorization and cookie on a
    # cross-origin redirect.
    return False


def keeps_authorization(client: str, origin: str) -> bool:
    """Does the client send a caller-set Authorization on after a 302 to this origin?

    Same origin: every one does (Fetch keeps headers on a same-origin redirect; curl keeps
    -H headers on the same host and port; requests' should_strip_auth and httpx's
    _redirect_headers compare the origins; urllib3's Retry.remove_headers_on_redirect
    applies only when is_same_host fails). An http -> https upgrade on other ports, and
    a host change: another origin, with what keeps_credential() says of Authorization
    (requests keeps it on an upgrade only between the default ports 80 and 443; httpx
    only for a same-host upgrade to the default port; curl strips it on any scheme,
    host or port change; urllib keeps it everywhere).

    urllib3 through an HTTP proxy drops it on the same origin too, over plain HTTP:
    PoolManager.urlopen strips Retry.remove_headers_on_redirect (Authorization, Cookie,
    Proxy-Authorization) unless `conn.is_same_host(redirect)`, and for an http:// URL
    ProxyManager.connection_from_host returns the pool of the proxy, so the redirect is
    compared with the proxy's host and port and never matches (urllib3 2.x,
    poolmanager.py). Found by this harness: credential-dropped fires on it.
    """
    if client == "urllib3" and origin == "same":
        return False
    return origin == "same" or keeps_credential(client, "Authorization")


# How many redirects each client follows before it gives up, with its defaults.
REDIRECT_LIMIT = {
    "curl": 50,  # the curl tool's --max-redirs default
    "requests": 30,  # requests.models.DEFAULT_REDIRECT_LIMIT
    "httpx": 20,  # httpx DEFAULT_MAX_REDIRECTS
    "urllib3": 3,  # Retry.DEFAULT = Retry(3): redirects count against total
    "node": 20,  # Fetch: a network error at redirect count 20
}


def follow_ups(case: Case) -> int:
    """Follow-ups in a loop or in the 25-hop chain, given the client's redirect limit."""
    if case.client == "urllib":
        # HTTPRedirectHandler: max_repeats 4 visits of one URL, max_redirections 10 URLs.
        return 8 if case.kind == LOOP else 10
    limit = REDIRECT_LIMIT[case.client]
    return limit if case.kind == LOOP else min(limit, LONG_CHAIN)


def refused(case: Case) -> str | None:
    """The error a client raises instead of sending the case at all, if it does."""
    if case.client == "node" and case.credential == "Proxy-Authorization":
        # undici's ProxyAgent (the dispatcher Node's fetch goes through here) rejects a
        # caller-set Proxy-Authorization: proxy credentials belong in its constructor.
        return "Proxy-Authorization should be sent in ProxyAgent constructor"
    return None


def expected_follow(case: Case) -> Follow:
    if case.kind == "nolocation":
        return Follow(False)  # nowhere to go: every client hands the 3xx back
    follow = behaviour(case.client, case.status, case.method)
    if case.credential and follow.followed:
        keeps = (
            keeps_authorization(case.client, case.origin)
            if case.kind == "auth"
            else keeps_credential(case.client, case.credential)
        )
        follow = Follow(True, follow.method, follow.body, follow.body_headers, keeps)
    return follow


def expected_findings(case: Case) -> list[tuple[str, str]]:
    """The (rule id, severity) list the rules must give for this client's behaviour."""
    if refused(case):
        return []
    if case.kind in (LOOP, LONG):
        hops = follow_ups(case)
        found = [("RA110", "medium")] if case.kind == LOOP else []
        return found + ([("RA111", "medium")] if hops > 20 else [])
    if case.kind == "nolocation":
        return [("RA112", "medium")]
    follow = expected_follow(case)
    before, after, status = case.method, follow.method, case.status
    if not follow.followed:
        return [("RA113", "medium")] if before in WRITES and status != 303 else []
    found = []
    if after != before:
        if status in (307, 308):
            found.append(("RA101", "high"))
        elif status in (301, 302) and not (before == "HEAD" and after == "GET"):
            found.append(("RA101", "low" if (before, after) == ("POST", "GET") else "medium"))
    else:
        # any status: a kept POST/PUT/PATCH should carry its body (after a 303 the server
        # asked for a GET, so an empty one is medium: curl -X PUT -L does that)
        if before in BODY_METHODS and not follow.body:
            found.append(("RA102", "medium" if status == 303 else "high"))
    if before == "HEAD" and after == "GET":
        found.append(("RA108", "medium"))
    if status == 303 and after not in ("GET", "HEAD"):
        found.append(("RA109", "high" if follow.body else "medium"))
    if after in ("GET", "HEAD") and after != before and (follow.body or follow.body_headers):
        found.append(("RA107", "high" if follow.body else "low"))
    if case.kind == "auth" and not follow.credential:
        # the target answered 401: dropped on the same origin, the client's fault (high);
        # rightly dropped across origins, the redirect's design (medium)
        found.append(("RA115", "high" if case.origin == "same" else "medium"))
    if follow.credential and case.origin != "same":
        if case.origin == "port" and case.credential == "Cookie":
            found.append(("RA105", "low"))  # cookies do not isolate ports
        else:
            found.append(("RA105", "medium" if case.credential == "Cookie" else "high"))
    if case.origin == "plain":
        found.append(("RA106", "high" if follow.credential else "medium"))
    if case.kind == "open":
        found.append(("RA114", "medium"))
    return found


MATRIX = [
    Case(c, s, st, m, o)
    for c in CLIENTS
    for s in SCHEMES
    for st in STATUSES
    for m in METHODS
    for o in ORIGINS
]
SPECIAL = [
    case
    for c in CLIENTS
    for case in (
        *(
            Case(c, "http", 302, "GET", target, "creds", cred)
            for cred in CREDENTIALS
            for target in ("port", "host")
        ),
        Case(c, "https", 302, "GET", "plain", "creds", "Authorization"),  # https -> http with a token
        # Authorization to an API that answers 401 without it: same origin, another port,
        # an http -> https upgrade (to another port), another host
        *(
            Case(c, "http", 302, "GET", target, "auth", "Authorization")
            for target in ("same", "port", "upgrade", "host")
        ),
        Case(c, "http", 302, "GET", "same", LOOP),
        Case(c, "http", 302, "GET", "same", LONG),
        Case(c, "http", 302, "GET", "port", "open"),
        Case(c, "http", 302, "GET", "same", "nolocation"),
    )
]
ALL_CASES = MATRIX + SPECIAL


# ---- running the clients ---------------------------------------------------------


class World:
    """Origins on two ports over HTTP and HTTPS, one on 127.0.0.2, and the proxy in front."""

    def __init__(self, tmp: Path):
        tls = self_signed_context(tmp)
        self.origins = {
            ("http", 0): Upstream(),
            ("http", 1): Upstream(),
            ("https", 0): Upstream(tls),
            ("https", 1): Upstream(tls),
            ("http", "host"): Upstream(host="127.0.0.2"),
        }
        for scheme in SCHEMES:
            here = self.origins[(scheme, 0)]
            here.peers["port"] = self.origins[(scheme, 1)].origin
            here.peers["host"] = self.origins[("http", "host")].origin
            here.peers["plain"] = self.origins[("http", 1)].origin
            here.peers["upgrade"] = self.origins[("https", 1)].origin
        self.errors: dict[str, str] = {}  # case id -> the error a client reported
        self.db = tmp / "live.db"
        self.proxy = Mitmdump(tmp / "mitm", db=str(self.db))
        self.ca = str(self.proxy.ca)

    def url(self, case: Case) -> str:
        here = self.origins[(case.scheme, 0)].origin
        if case.kind == LOOP:
            return f"{here}/loop/{case.status}/0/{case.id}"
        if case.kind == LONG:
            return f"{here}/hops/{case.status}/{LONG_CHAIN}/{case.id}"
        url = f"{here}/r/{case.status}/{case.id}"
        if case.kind == "open":  # the request names where it wants to be sent
            return url + "?to=" + quote(f"{self.origins[(case.scheme, 1)].origin}/echo/{case.id}", safe="")
        if case.kind == "nolocation":
            return url + "?nolocation=1"
        if case.kind == "auth":
            return f"{url}?target=auth" + ("" if case.origin == "same" else f"&via={case.origin}")
        return url if case.origin == "same" else f"{url}?via={case.origin}"

    def close(self) -> str:
        output = self.proxy.stop()
        for up in self.origins.values():
            up.close()
        return output


FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def run_curl(world: World, cases: list[Case]) -> None:
    for case in cases:
        args = [
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            "-L",
            "--max-time",
            "15",
            "--proxy",
            world.proxy.url,
            "--cacert",
            world.ca,
            "--noproxy",
            "",
        ]
        if case.kind not in (LOOP, LONG):
            args += ["--max-redirs", "5"]
        for name, value in CREDENTIALS.items():
            if name == case.credential:
                args += ["-H", f"{name}: {value}"]
        if case.method == "HEAD":
            args.append("-I")
        elif case.method == "POST":
            args += ["-d", case.body.decode()]
        elif case.method != "GET":
            args += ["-X", case.method] + (["-d", case.body.decode()] if case.body else [])
        subprocess.run(
            [*args, world.url(case)], capture_output=True, timeout=60, env={"PATH": "/usr/bin:/bin"}
        )


def run_requests(world: World, cases: list[Case]) -> None:
    import requests

    with requests.Session() as session:
        session.trust_env = False
        session.proxies = {"http": world.proxy.url, "https": world.proxy.url}
        session.verify = world.ca
        for case in cases:
            try:
                session.request(
                    case.method, world.url(case), data=case.body, headers=case.headers, timeout=15
                )
            except requests.TooManyRedirects:
                pass


def run_httpx(world: World, cases: list[Case]) -> None:
    import httpx

    context = ssl.create_default_context(cafile=world.ca)
    with httpx.Client(
        proxy=world.proxy.url, verify=context, follow_redirects=True, trust_env=False, timeout=15
    ) as client:
        for case in cases:
            try:
                client.request(case.method, world.url(case), content=case.body, headers=case.headers)
            except httpx.TooManyRedirects:
                pass


def run_urllib3(world: World, cases: list[Case]) -> None:
    import urllib3

    with urllib3.ProxyManager(world.proxy.url, ca_certs=world.ca) as pool:
        for case in cases:
            if case.kind in (LOOP, LONG):  # the library's own redirect limit
                with contextlib.suppress(urllib3.exceptions.MaxRetryError):
                    pool.request(case.method, world.url(case), headers=case.headers, timeout=15)
                continue
            pool.request(
                case.method,
                world.url(case),
                body=case.body,
                headers=case.headers,
                redirect=True,
                retries=urllib3.Retry(total=5, redirect=5, raise_on_redirect=False),
                timeout=15,
            )


def run_urllib(world: World, cases: list[Case]) -> None:
    context = ssl.create_default_context(cafile=world.ca)
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({"http": world.proxy.url, "https": world.proxy.url}),
        urllib.request.HTTPSHandler(context=context),
    )
    for case in cases:
        request = urllib.request.Request(
            world.url(case), data=case.body, method=case.method, headers=case.headers
        )
        try:
            with opener.open(request, timeout=15) as response:
                response.read()
        except urllib.error.HTTPError as exc:  # a redirect it will not follow, or a loop it stopped
            exc.close()


def run_node(world: World, cases: list[Case]) -> None:
    payload = [
        {
            "id": c.id,
            "url": world.url(c),
            "method": c.method,
            "body": c.body.decode() if c.body else None,
            "headers": {k: v for k, v in c.headers.items() if k != "Content-Type"},
        }
        for c in cases
    ]
    done = subprocess.run(
        ["node", str(NODE_DIR / "fetch_cases.mjs"), world.proxy.url],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=NODE_DIR,
        env={"PATH": "/usr/bin:/bin:/usr/local/bin", "NODE_EXTRA_CA_CERTS": world.ca},
    )
    assert done.returncode == 0, done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(results) == len(cases), done.stdout + done.stderr
    world.errors.update((r["id"], r["error"]) for r in results if r["error"])


RUNNERS = {
    "curl": run_curl,
    "requests": run_requests,
    "httpx": run_httpx,
    "urllib3": run_urllib3,
    "urllib": run_urllib,
    "node": run_node,
}


@dataclass
class Outcome:
    chains: dict[str, object]  # case id -> Chain
    findings: dict[str, list[tuple[str, str]]]  # case id -> [(rule id, severity)]
    analyzed: set[tuple[str, str, str, str]]  # (rule id, severity, from url, to url)
    live: set[tuple[str, str, str, str]]
    output: str
    extra: dict[str, list[tuple[str, str]]]
    errors: dict[str, str]
    db: str


def prerequisites() -> None:
    require_program("curl", "apt-get install curl (.ci/run installs it)")
    require_program("node", "apt-get install nodejs (.ci/run installs it)")
    if not (NODE_DIR / "node_modules" / "undici").exists():
        npm = require_program("npm", "apt-get install npm: it installs undici for the Node client")
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=NODE_DIR,
            capture_output=True,
            text=True,
            timeout=300,
        )
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
    result = analyze(store, keep=True)
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
        if (
            f.rule == "stale-temporary-redirect"
        ):  # judged on sight, live: before any follow-up, so by its Location
            after = source.location_resolved
        elif f.chain is not None and f.chain.hops[f.hop].target is None:
            after = "not followed"
        else:
            after = f.exchange.url
        analyzed.add((f.rule_id, str(f.severity), source.url, after))
    live = {(m["rule"], m["sev"], m["src"], m["dst"] or "not followed") for m in LIVE_LINE.finditer(output)}
    return Outcome(
        chains,
        findings,
        analyzed,
        live,
        output,
        {k: findings.get(k, []) for k in extra},
        world.errors,
        str(world.db),
    )


LIVE_LINE = re.compile(
    r"redirect-audit (?P<rule>RA\d+) \S+ \[(?P<sev>\w+)\] \S+ (?P<src>\S+) -> \S+ -> "
    r"(?:not followed \([^)]*\)|\S+ (?P<dst>\S+)): "
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


def recorded(case: Case, chain) -> Follow:
    """What the capture shows the client did on the first follow-up."""
    target = chain.hops[0].target
    if target is None:
        return Follow(False)
    names = {name.lower() for name, _ in target.request_headers}
    switched = target.method in ("GET", "HEAD") and target.method != case.method
    return Follow(
        True,
        target.method,
        bool(target.request_body.length),
        body_headers=switched and "content-type" in names,
        credential=bool(case.credential) and case.credential.lower() in names,
    )


@pytest.mark.parametrize("client", CLIENTS)
def test_each_client_does_what_it_is_documented_to_do(outcome, client):
    wrong = []
    for case in (c for c in ALL_CASES if c.client == client):
        chain = outcome.chains.get(case.id)
        if refused(case):
            error = outcome.errors.get(case.id) or ""
            if chain is not None or refused(case) not in error:
                wrong.append(f"{case.id}: expected the client to refuse it ({refused(case)}), got {error!r}")
            continue
        if chain is None:
            wrong.append(f"{case.id}: no chain recorded")
            continue
        if case.kind in (LOOP, LONG):
            seen_hops = sum(1 for hop in chain.hops if hop.target is not None)
            if seen_hops != follow_ups(case):
                wrong.append(f"{case.id}: expected {follow_ups(case)} follow-ups, recorded {seen_hops}")
            continue
        expect, seen = expected_follow(case), recorded(case, chain)
        hop = chain.hops[0]
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


def test_real_clients_make_every_chain_rule_fire(outcome):
    fired = {rule for found in outcome.findings.values() for rule, _ in found}
    chain_rules = {rule.id for rule in RULES}
    assert chain_rules <= fired, sorted(chain_rules - fired)
    by_rule = {}
    for found in outcome.findings.values():
        for rule, _ in found:
            by_rule[rule] = by_rule.get(rule, 0) + 1
    assert by_rule["RA105"] == sum(
        1 for c in SPECIAL if expected_follow(c).credential and c.origin != "same" and not refused(c)
    )
    assert by_rule["RA115"] == sum(
        1 for c in SPECIAL if c.kind == "auth" and not expected_follow(c).credential
    )


UA_NAMES = {  # readable names (analyzer.clientnames): the product, its version
    "curl": "curl ",
    "requests": "requests ",
    "httpx": "httpx ",
    "urllib3": "urllib3 ",
    "urllib": "urllib ",
    "node": "node",
}
SPEC_RULES = {"RA101", "RA102", "RA105", "RA107", "RA108", "RA109"}  # what a deviation verdict covers


def test_conformance_table_reads_each_client_off_the_capture(outcome):
    from analyzer import frames

    table = frames.clients(outcome.db)
    names = {
        client: next(n for n in table["client_name"].unique() if n.startswith(prefix))
        for client, prefix in UA_NAMES.items()
    }
    rows = {(row.client_name, row.status, row.method): row for row in table.itertuples()}
    wrong = []
    for client in CLIENTS:
        for status in STATUSES:
            for method in METHODS:
                row = rows[(names[client], status, method)]
                cases = [c for c in MATRIX if (c.client, c.status, c.method) == (client, status, method)]
                follow = behaviour(client, status, method)
                if (status, method) != (302, "GET"):  # that cell also holds the special cases
                    # POST -> GET on 301/302 is allowed (RFC 9110 15.4.2/15.4.3), only flagged low.
                    deviates = any(
                        rule in SPEC_RULES and (rule, sev) != ("RA101", "low")
                        for c in cases
                        for rule, sev in expected_findings(c)
                    )
                    historical = status in (301, 302) and method == "POST" and follow.method == "GET"
                    want = (
                        "deviated"
                        if deviates
                        else (
                            "allowed, body lost"
                            if historical
                            else ("as specified" if follow.followed else "not followed")
                        )
                    )
                    if row.verdict != want or row.hops != len(cases):
                        wrong.append(
                            f"{client} {status} {method}: {row.verdict} over {row.hops}, expected {want}"
                        )
                if follow.followed and row.did_method != follow.method:
                    wrong.append(
                        f"{client} {status} {method}: did {row.did_method}, expected {follow.method}"
                    )
                if row.should_method != frames.prescribed_method(status, method):
                    wrong.append(f"{client} {status} {method}: should {row.should_method}")
                if row.body_headers_kept != (len(cases) if follow.body_headers else 0):
                    wrong.append(f"{client} {status} {method}: body headers kept {row.body_headers_kept}")
        leaks = sum(
            1
            for c in SPECIAL
            if c.client == client and expected_follow(c).credential and c.origin != "same" and not refused(c)
        )
        # Authorization on the 302 GETs: kept on the same origin by all, across origins by urllib alone
        row = rows[(names[client], 302, "GET")]
        same = "kept" if keeps_authorization(client, "same") else "dropped"
        across = "kept" if keeps_authorization(client, "port") else "dropped"
        if (row.auth_same_origin, row.auth_cross_origin) != (same, across):
            wrong.append(
                f"{client}: Authorization {row.auth_same_origin} on the same origin, "
                f"{row.auth_cross_origin} across origins; expected {same}, {across}"
            )
        if same == "dropped" and row.verdict != "deviated":
            wrong.append(f"{client}: a same-origin drop must read as deviated, not {row.verdict}")
        if rows[(names[client], 302, "GET")].credentials_cross_origin != leaks:
            wrong.append(
                f"{client}: {rows[(names[client], 302, 'GET')].credentials_cross_origin} credential leaks, "
                f"expected {leaks}"
            )
    assert not wrong, "\n".join(wrong)


def test_clients_command_prints_the_table_and_json(outcome):
    import os

    env = {**os.environ, "COLUMNS": "160"}
    done = subprocess.run(
        ["redirect-audit", "clients", "--db", outcome.db, "--format", "json"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    records = json.loads(done.stdout)
    assert {r["client_name"].split()[0] for r in records} >= {"curl", "node", "httpx", "urllib", "requests"}
    httpx_put = next(
        r
        for r in records
        if r["client_name"].startswith("httpx ") and (r["status"], r["method"]) == (302, "PUT")
    )
    assert (httpx_put["did_method"], httpx_put["should_method"], httpx_put["verdict"]) == (
        "GET",
        "PUT",
        "deviated",
    )
    assert "body-on-get" in httpx_put["rules"] and "method-downgrade" in httpx_put["rules"]
    shown = subprocess.run(
        ["redirect-audit", "clients", "--db", outcome.db],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert shown.returncode == 0, shown.stderr
    assert "httpx 0." in shown.stdout and "[spec: PUT]" in shown.stdout and "deviating:" in shown.stdout
