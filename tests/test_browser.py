"""A real browser through the recorder: headless Chromium (Debian's package, driven by
Playwright) against loopback upstreams over HTTP and HTTPS, trusting mitmproxy's CA.

What Chromium does is what the Fetch standard's HTTP-redirect fetch says (Chromium's
network stack implements it; https://fetch.spec.whatwg.org/#http-redirect-fetch):
* step 12: a POST answered 301 or 302, and any method but GET/HEAD answered 303, is
  re-sent as GET without its body or its body headers; every other request is re-sent
  with its method and body (307 and 308 always);
* `redirect: "manual"` hands the redirect back to the page as an opaque-redirect
  response and sends nothing more; `"follow"` (the default) follows as above;
* cookies come from the cookie jar for each request's URL (RFC 6265 5.4): a host-only
  cookie of 127.0.0.1 goes to another port of that host (cookies do not isolate ports,
  8.5), and not to 127.0.0.2.

The recorded chains must show exactly that, and the findings must be exactly what that
behaviour earns: method-downgrade (low) for a form POST answered 301/302, lost-write
(medium) for a POST whose 307 the page took with `redirect: "manual"`,
credential-cross-origin (low, the cookie stayed on its site) for the cookie that went
to another port; nothing else. Loopback targets need `--proxy-bypass-list=<-loopback>`:
Chromium sends loopback around any proxy otherwise.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest
from conftest import require_program, run_cli
from proxyrun import Mitmdump
from upstream import Upstream, self_signed_context

pytestmark = [pytest.mark.slow, pytest.mark.browser, pytest.mark.xdist_group("browser")]

CHROMIUM_HOW = "apt-get install chromium (Debian's package; .ci/run installs it)"
STATUSES = (301, 302, 303, 307, 308)


def spki_hash(ca: Path) -> str:
    """What --ignore-certificate-errors-spki-list takes: base64 SHA-256 of the CA's public key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate(ca.read_bytes())
    der = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


def expected_chain(kind: str, status: int) -> tuple[str, str, bool]:
    """(method before, method after, body kept) as Fetch prescribes; after "" = not followed."""
    if kind == "manual":
        return "POST", "", False
    if kind in ("form", "fetch") and (status in (301, 302) or status == 303):
        return "POST", "GET", False
    if kind in ("form", "fetch"):
        return "POST", "POST", True
    return "GET", "GET", False


@pytest.fixture(scope="module")
def browser_run(tmp_path_factory):
    chromium = require_program("chromium", CHROMIUM_HOW)
    from playwright.sync_api import sync_playwright

    tmp = tmp_path_factory.mktemp("browser")
    plain, secure = Upstream(), Upstream(tls=self_signed_context(tmp))
    other_port, other_host = Upstream(), Upstream(host="127.0.0.2")
    plain.peers.update({"port": other_port.origin, "host": other_host.origin})
    # Chromium's own background requests go through the proxy too: the proxy answers any
    # request for a host other than loopback itself (444: the connection is closed), and
    # connects upstream only for a request (lazy), never for a bare CONNECT.
    proxy = Mitmdump(
        tmp / "conf",
        db=str(tmp / "browser.db"),
        extra=["--set", "connection_strategy=lazy", "--set", "block_list=/!(~d ^127\\.0\\.0\\.[12]$)/444"],
    )
    cases: dict[str, tuple[str, int, str]] = {}  # case -> (kind, status, scheme)
    answers: dict[str, object] = {}
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=chromium,
                args=[
                    "--no-sandbox",
                    f"--proxy-server={proxy.url}",
                    "--proxy-bypass-list=<-loopback>",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--no-pings",
                    "--disable-features=OptimizationHints,Translate,MediaRouter,AutofillServerCommunication",
                    f"--ignore-certificate-errors-spki-list={spki_hash(proxy.ca)}",
                ],
            )
            try:
                context = browser.new_context()
                page = context.new_page()
                for origin, scheme in ((plain.origin, "http"), (secure.origin, "https")):
                    page.goto(f"{origin}/echo/start-{scheme}")
                    for status in STATUSES:
                        link = f"link-{scheme}-{status}"
                        cases[link] = ("link", status, scheme)
                        page.set_content(f'<a id="go" href="{origin}/r/{status}/{link}">go</a>')
                        with page.expect_navigation(url=f"**/echo/{link}"):
                            page.click("#go")
                        answers[link] = json.loads(page.inner_text("body"))["method"]
                        page.goto(f"{origin}/echo/start-{scheme}")
                        form = f"form-{scheme}-{status}"
                        cases[form] = ("form", status, scheme)
                        page.set_content(
                            f'<form id="f" method="post" action="{origin}/r/{status}/{form}">'
                            f'<input name="field" value="{form}"><button id="b">send</button></form>'
                        )
                        with page.expect_navigation(url=f"**/echo/{form}"):
                            page.click("#b")
                        answers[form] = json.loads(page.inner_text("body"))["method"]
                        page.goto(f"{origin}/echo/start-{scheme}")
                    for status in (303, 307):
                        follow = f"fetch-{scheme}-{status}"
                        cases[follow] = ("fetch", status, scheme)
                        answers[follow] = page.evaluate(
                            "url => fetch(url, {method: 'POST', body: JSON.stringify({n: 1}), headers: "
                            "{'Content-Type': 'application/json'}}).then(r => r.json()).then(j => j.method)",
                            f"{origin}/r/{status}/{follow}",
                        )
                    manual = f"manual-{scheme}-307"
                    cases[manual] = ("manual", 307, scheme)
                    answers[manual] = page.evaluate(
                        "url => fetch(url, {method: 'POST', body: 'k=v', redirect: 'manual'}).then(r => r.type)",
                        f"{origin}/r/307/{manual}",
                    )
                context.add_cookies([{"name": "sid", "value": "s3ss10n", "domain": "127.0.0.1", "path": "/"}])
                for where in ("port", "host"):
                    case = f"cookie-{where}"
                    cases[case] = ("cookie", 302, "http")
                    page.goto(f"{plain.origin}/r/302/{case}?via={where}")
                    answers[case] = json.loads(page.inner_text("body"))["headers"].get("Cookie")
            finally:
                browser.close()
    finally:
        proxy.stop()
        for server in (plain, secure, other_port, other_host):
            server.close()
    db = str(tmp / "browser.db")
    chains = json.loads(run_cli("chains", "-f", "json", "--db", db).stdout)
    findings = json.loads(run_cli("findings", "-f", "json", "--db", db).stdout)
    urls = json.loads(run_cli("captures", "-f", "json", "--db", db).stdout)
    return {
        "cases": cases,
        "answers": answers,
        "chains": chains,
        "findings": findings,
        "db": db,
        "captures": urls,
    }


def case_of(url: str) -> str:
    return url.split("?")[0].rstrip("/").rsplit("/", 1)[1]


def test_the_browser_did_what_fetch_prescribes(browser_run):
    answers = browser_run["answers"]
    for case, (kind, status, _) in browser_run["cases"].items():
        _before, after, _ = expected_chain(kind, status)
        if kind == "manual":
            assert answers[case] == "opaqueredirect", case
        elif kind == "cookie":
            assert answers[case] == ("sid=s3ss10n" if case == "cookie-port" else None), case
        else:
            assert answers[case] == after, case


def test_the_recorded_chains_show_exactly_that(browser_run):
    by_case = {}
    for chain in browser_run["chains"]:
        by_case.setdefault(case_of(chain["hops"][0]["from"]["url"]), []).append(chain)
    assert set(by_case) == set(browser_run["cases"])  # one chain per case, and no other
    for case, (kind, status, scheme) in browser_run["cases"].items():
        (chain,) = by_case[case]
        (hop,) = chain["hops"]
        before, after, kept = expected_chain(kind, status)
        assert hop["status"] == status and hop["from"]["method"] == before, case
        assert hop["from"]["url"].startswith(f"{scheme}://"), case
        if not after:
            assert hop["followed"] is False, case
            continue
        assert hop["followed"] is True and hop["to"]["method"] == after, case
        if before == "POST":
            sent = hop["from"]["body"]
            assert sent["length"] and sent["length"] > 0, case
            if kept:
                assert hop["to"]["body"]["sha256"] == sent["sha256"], case
                assert hop["to"]["body"]["content_type"] == sent["content_type"], case
            else:
                assert (
                    hop["to"]["body"]["length"] in (0, None) and hop["to"]["body"]["content_type"] is None
                ), case
        assert hop["link"] in ("same-connection", "same-client"), hop["link"]


def test_the_findings_are_exactly_those_that_behaviour_earns(browser_run):
    got = sorted((case_of(f["from_url"]), f["rule"], f["severity"]) for f in browser_run["findings"])
    expected = sorted(
        [(f"form-{s}-{st}", "method-downgrade", "low") for s in ("http", "https") for st in (301, 302)]
        + [(f"manual-{s}-307", "lost-write", "medium") for s in ("http", "https")]
        + [("cookie-port", "credential-cross-origin", "low")]
    )
    assert got == expected
    for f in browser_run["findings"]:
        assert f["client"].startswith("proxy:") and f["client"].endswith("/127.0.0.1")


def test_nothing_left_loopback(browser_run):
    """Chromium's own background traffic goes through the proxy too: none may leave the
    machine. What it asked for elsewhere was refused by the proxy, never answered."""
    from sqlalchemy import create_engine, text

    engine = create_engine(f"sqlite:///{browser_run['db']}")
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT url, status FROM exchanges")).all()
    engine.dispose()
    outside = [
        (u, status)
        for u, status in rows
        if u.split("/")[2].rsplit(":", 1)[0] not in ("127.0.0.1", "127.0.0.2")
    ]
    assert len(rows) > len(outside) > -1
    assert all(status is None for _, status in outside), outside
