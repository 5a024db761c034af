"""The HTML report opened in a real headless Chromium (Debian's package, as .ci/run installs it)."""

from __future__ import annotations

import re

import pytest
from conftest import require_program, run_cli

CHROMIUM_HOW = "apt-get install chromium (Debian's package; .ci/run installs it)"


@pytest.fixture
def report(demo_db, tmp_path):
    path = tmp_path / "report.html"
    done = run_cli("findings", "--db", demo_db, "--format", "html", "--output", str(path))
    assert done.returncode == 0, done.stderr
    return path


def test_the_report_is_one_self_contained_file(report):
    html = report.read_text()
    assert "<script" not in html
    assert not re.search(r'(src|href)="(https?:)?//', html)  # nothing fetched from anywhere
    assert html.count('src="data:image/png;base64,') == 5


def test_chromium_renders_tables_and_images_without_console_errors(report):
    chromium = require_program("chromium", CHROMIUM_HOW)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on(
                "console", lambda message: errors.append(message.text) if message.type == "error" else None
            )
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(report.as_uri())
            tables = page.locator("table.findings")
            assert tables.count() == 4  # one per rule that fired
            rows = page.locator("table.findings tbody tr")
            assert rows.count() == 7
            widths = page.evaluate("Array.from(document.images).map(i => i.complete ? i.naturalWidth : 0)")
            assert len(widths) == 5 and all(w > 100 for w in widths)
            assert page.locator("img").first.bounding_box()["width"] > 100  # laid out, not just loaded
            assert "3 high" in page.locator(".counts").inner_text()
            assert errors == []
        finally:
            browser.close()
