"""The HTML report opened in a real headless Chromium (Debian's package, as .ci/run installs it):
what a reader sees first, the order, the filters and sorting, and that it stays one file."""

from __future__ import annotations

import json
import re

import pytest
from conftest import require_program, run_cli

from analyzer.detectors import RULES
from analyzer.htmlreport import breakable, pointer

pytestmark = [pytest.mark.slow, pytest.mark.browser, pytest.mark.xdist_group("html_report")]

CHROMIUM_HOW = "apt-get install chromium (Debian's package; .ci/run installs it)"


@pytest.fixture
def report(demo_db, tmp_path):
    path = tmp_path / "report.html"
    done = run_cli("findings", "--db", demo_db, "--format", "html", "--output", str(path))
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr, done.stderr
    return path


def test_the_report_is_one_self_contained_file(report):
    html = report.read_text()
    assert html.count("<script") == 1 and "<script src" not in html  # inline, nothing fetched
    assert not re.search(r'(src|href)="(https?:)?//', html)
    assert html.count('src="data:image/png;base64,') == 5
    # the summary comes before the findings, and the figures after them
    assert html.index('id="summary"') < html.index('id="findings"') < html.index("data:image/png")


def test_urls_break_only_after_slash_query_and_ampersand():
    def nb(text):
        return f'<span class="nb">{text}</span>'

    assert str(breakable("GET https://api-eu.test/x?y=1&z=<2>")) == nb("GET") + " " + "<wbr>".join(
        [nb("https:/"), nb("/"), nb("api-eu.test/"), nb("x?"), nb("y=1&amp;"), nb("z=&lt;2&gt;")]
    )


def test_a_piece_too_long_for_any_line_may_break_anywhere():
    encoded = "next=" + "https%3A%2F%2Fexample.test%2F" * 3
    assert str(breakable(f"/a?{encoded}")) == (
        f'<span class="nb">/</span><wbr><span class="nb">a?</span><wbr><span class="long">{encoded}</span>'
    )


def test_a_capture_is_its_file_name_and_entry_with_the_path_in_a_tooltip():
    short, full = pointer({"source": "har", "file": "/home/me/captures/shop.har", "entry_index": 12})
    assert (short, full) == ("shop.har#12", "/home/me/captures/shop.har, entry 12 (0-based)")


def open_page(p, chromium, report):
    browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(report.as_uri())
    return browser, page, errors


def visible(page) -> list[tuple[str, str, str]]:
    """(severity, rule, capture) of each finding row shown, in order."""
    return page.evaluate(
        """Array.from(document.querySelectorAll('#findings tbody tr'))
             .filter(r => r.offsetParent !== null)
             .map(r => [r.dataset.severity, r.dataset.rule, r.querySelector('td.capture').innerText])"""
    )


def test_chromium_shows_summary_findings_by_severity_filters_and_sorts(report):
    chromium = require_program("chromium", CHROMIUM_HOW)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser, page, errors = open_page(p, chromium, report)
        try:
            cards = page.locator("#summary .cards").inner_text()
            for text in ("3\nhigh", "3\nmedium", "1\nlow", "11\nchains", "1\nclients", "25\nexchanges"):
                assert text in cards, cards
            assert (
                "traffic from 2026-10-02 09:00 to 2026-11-20 16:30 UTC"
                in page.locator("#summary").inner_text()
            )
            rows = visible(page)
            assert [r[0] for r in rows] == ["high"] * 3 + ["medium"] * 3 + ["low"]
            assert rows[0] == ["high", "method-downgrade", "shop-2026-10-02.har#16"]
            capture = page.locator("td.capture code").first
            assert capture.get_attribute("title").endswith("shop-2026-10-02.har, entry 16 (0-based)")
            # the hop in monospace, the message, the fix, and the whole chain behind a disclosure
            first = page.locator("#findings tbody tr").first
            assert "POST https://api.shop.example.test/v1/subscriptions → 308 → GET" in first.inner_text()
            assert "Fix: Answer 307/308" in first.inner_text()
            assert not first.locator("details pre").is_visible()
            first.locator("details > summary").first.click()
            assert (
                "0: POST https://api.shop.example.test/v1/subscriptions → 308"
                in first.locator("pre").inner_text()
            )

            page.select_option("select[data-filter=severity]", "medium")
            assert [r[0] for r in visible(page)] == ["medium"] * 3
            assert page.locator("#shown").inner_text() == "3 of 7 shown"
            page.select_option("select[data-filter=rule]", "stale-temporary-redirect")
            assert [r[1] for r in visible(page)] == ["stale-temporary-redirect"] * 2
            page.select_option("select[data-filter=severity]", "")
            page.select_option("select[data-filter=rule]", "")
            page.select_option("select[data-filter=host]", "api.shop.example.test")
            assert len(visible(page)) == 4 and page.locator("#shown").inner_text() == "4 of 7 shown"
            page.select_option("select[data-filter=host]", "")
            page.select_option("select[data-filter=client]", "Firefox 133 · page_1")
            assert len(visible(page)) == 7

            page.click("th[data-sort=capture]")
            captures = [r[2] for r in visible(page)]
            in_order = [f"shop-2026-10-02.har#{n}" for n in (5, 7, 9, 12, 16, 19)] + ["shop-2026-11-20.har#0"]
            assert captures == in_order  # entry numbers in number order: #9 before #12
            page.click("th[data-sort=capture]")
            assert [r[2] for r in visible(page)] == in_order[::-1]
            page.click("th[data-sort=rank]")
            assert [r[0] for r in visible(page)][:3] == ["high"] * 3

            quiet = page.locator(".quiet").inner_text()
            assert quiet.startswith("No findings for: RA105 credential-cross-origin")
            assert quiet.count("RA1") == len(RULES) - 4  # four rules fired on the demo
            # the table and the figures use the page's width
            assert page.locator("#findings").bounding_box()["width"] > 1150
            assert page.locator(".figures").bounding_box()["width"] > 1150
            boxes = [page.locator("figure img").nth(i).bounding_box() for i in range(5)]
            assert len({round(b["y"]) for b in boxes}) < 5  # side by side where they fit
            assert all(b["width"] > 500 for b in boxes)
            widths = page.evaluate("Array.from(document.images).map(i => i.complete ? i.naturalWidth : 0)")
            assert len(widths) == 5 and all(w > 100 for w in widths)
            # on a narrow window URLs wrap after / ? & only: no piece is broken over two lines
            page.set_viewport_size({"width": 520, "height": 900})
            pieces = page.evaluate(
                "Array.from(document.querySelectorAll('.hop .nb')).map(e => [e.innerText, e.getClientRects().length])"
            )
            assert ["api-eu.shop.example.test/", 1] in pieces
            assert all(lines == 1 for _, lines in pieces), [p for p in pieces if p[1] != 1]
            # nothing wider than a half-screen window: long file names and URLs wrap
            page.set_viewport_size({"width": 800, "height": 900})
            assert page.evaluate("document.documentElement.scrollWidth") <= 800
            assert errors == []
        finally:
            browser.close()


@pytest.mark.parametrize(
    "har",
    [
        "chrome-har__sitespeedio__yahoo-devtoolslog.har",
        "chrome-har__sitespeedio__case-sensitive-protocol.har",
        # a client named by a 32-hex page id, and hops with every header behind them
        "playwright-chromium__microsoft__har-redirect.har",
    ],
)
def test_real_tracking_urls_and_long_file_names_fit_a_half_screen_window(har, tmp_path):
    """Real captures carry 300-character tracking URLs with encoded URLs inside, and long
    file names: nothing may push the page wider than the window."""
    from conftest import CORPUS

    chromium = require_program("chromium", CHROMIUM_HOW)
    db, path = str(tmp_path / "c.db"), tmp_path / "report.html"
    assert run_cli("import-har", str(CORPUS / "good" / har), "--db", db).returncode == 0
    done = run_cli("findings", "--db", db, "--third-party", "--format", "html", "--output", str(path))
    assert done.returncode == 0 and "Warning" not in done.stderr, done.stderr
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser, page, errors = open_page(p, chromium, path)
        try:
            assert len(visible(page)) >= 1
            for opened in (False, True):  # then every chain and hop disclosure open
                if opened:
                    page.evaluate(
                        "document.querySelectorAll('#findings details').forEach(d => d.open = true)"
                    )
                for width in (1280, 800):
                    page.set_viewport_size({"width": width, "height": 900})
                    assert page.evaluate("document.documentElement.scrollWidth") <= width, (opened, width)
            assert errors == []
        finally:
            browser.close()


def test_each_hop_s_headers_are_behind_its_disclosure_with_the_evidence_marked(tmp_path):
    """As `chains -v` shows them: the finding's hop opens with its chain, the header its
    evidence names is marked with the finding, a secret is shown as its keyed fingerprint,
    and a real browser's hop lists what the follow-up added and dropped."""
    from conftest import CORPUS, RULE_FIXTURES

    chromium = require_program("chromium", CHROMIUM_HOW)
    db, path = str(tmp_path / "h.db"), tmp_path / "report.html"
    real = CORPUS / "good" / "playwright-chromium__microsoft__har-redirect.har"
    for har in (RULE_FIXTURES / "cd-api-key-same-origin.har", real):
        assert run_cli("import-har", str(har), "--db", db).returncode == 0
    done = run_cli("findings", "--db", db, "--third-party", "--format", "html", "--output", str(path))
    assert done.returncode == 0 and "Warning" not in done.stderr, done.stderr
    html = path.read_text()
    secrets = {
        h["value"]
        for entry in json.loads(real.read_text())["log"]["entries"]
        for side in (entry["request"], entry["response"])
        for h in side["headers"]
        if h["name"].lower() in ("cookie", "set-cookie")
    }
    assert len(secrets) >= 3 and not [v for v in secrets if v in html]  # kept as fingerprints only
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser, page, errors = open_page(p, chromium, path)
        try:
            row = page.locator("#findings tbody tr", has_text="credential-dropped")
            hop = row.locator("details.hop-detail").first
            assert not hop.is_visible()
            row.locator("details > summary").first.click()  # the chain: its finding's hop is open
            assert hop.locator(".headers").is_visible()
            marked = hop.locator("mark")
            assert marked.count() == 1
            assert re.fullmatch(r"- X-Api-Key: hmac:[0-9a-f]+ \(keyed fingerprint\)", marked.inner_text())
            lines = hop.locator(".headers").inner_text().splitlines()
            assert lines[0] == "body: not captured"
            assert lines[-2:] == ["response headers of the 308:", "  Location: https://api.test/items"]
            assert any(line.endswith("← RA115 credential-dropped") for line in lines)

            browsers = page.locator("#findings tbody tr", has_text="https-downgrade")
            browsers.locator("details > summary").first.click()
            first, second = (browsers.locator("details.hop-detail").nth(i) for i in (0, 1))
            assert first.locator(".headers").is_visible()  # the finding is on hop 0
            assert not second.locator(".headers").is_visible()
            second.locator("summary").click()
            shown = second.locator(".headers").inner_text()
            assert "- Host: www.theverge.com" in shown and "+ :authority: www.theverge.com" in shown
            assert "~ accept-encoding: gzip, deflate -> gzip, deflate, br" in shown
            assert re.search(r"Set-Cookie: hmac:[0-9a-f]+ \(keyed fingerprint\)", shown)
            assert errors == []
        finally:
            browser.close()
