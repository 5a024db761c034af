"""docs/rules.md and the README's rules table come from the detectors themselves
(`redirect-audit rules --format markdown`); a change to a docstring without the page fails here."""

from __future__ import annotations

import re

from conftest import ROOT, RULE_FIXTURES, run_cli

from analyzer.detectors import RULES
from analyzer.ruledocs import render, sections, spec_links, summary_table

REGENERATE = "redirect-audit rules --format markdown --examples tests/fixtures/rules -o docs/rules.md"


def test_the_committed_rules_page_is_what_the_command_writes_now(tmp_path):
    out = tmp_path / "rules.md"
    done = run_cli("rules", "--format", "markdown", "--examples", str(RULE_FIXTURES), "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert (ROOT / "docs" / "rules.md").read_text() == out.read_text(), (
        f"docs/rules.md is out of date: run `{REGENERATE}`"
    )
    assert list(tmp_path.iterdir()) == [out]  # the example stores went to a temp dir that is gone


def test_every_rule_has_its_sections_references_and_a_real_example():
    page = (ROOT / "docs" / "rules.md").read_text()
    for rule in RULES:
        part = page.split(f"## {rule.id} {rule.slug}\n", 1)[1].split("\n## ", 1)[0]
        for title in ("### What fires", "### Not flagged", "### How to fix", "### Example"):
            assert title in part, f"{rule.slug}: no {title}"
        example = part.split("### Example", 1)[1]
        # the example's hop line and the severity: message the rule produced on a fixture
        assert re.search(r"^\S+ https?://\S+ → \d{3}", example, re.M), example
        assert re.search(rf"^{rule.severity}: ", example, re.M), example
    assert "rfc-editor.org/rfc/rfc9110#section-15.4.8" in page


def test_the_readme_carries_the_rules_table_with_its_fixes():
    readme = (ROOT / "README.md").read_text()
    assert summary_table(RULES) in readme, "README's rules table differs from ruledocs.summary_table(RULES)"
    assert all(rule.fix.endswith(".") and len(rule.fix) < 160 for rule in RULES)


def test_citations_become_links_each_once_in_section_order():
    text = "RFC 9110 15.4.8 and 15.4.9 say so; see RFC 9110\n15.4.2/15.4.3, RFC 6265 5.4, 8.5 and Fetch."
    assert spec_links(text) == [
        ("RFC 6265 5.4", "https://www.rfc-editor.org/rfc/rfc6265#section-5.4"),
        ("RFC 6265 8.5", "https://www.rfc-editor.org/rfc/rfc6265#section-8.5"),
        ("RFC 9110 15.4.2", "https://www.rfc-editor.org/rfc/rfc9110#section-15.4.2"),
        ("RFC 9110 15.4.3", "https://www.rfc-editor.org/rfc/rfc9110#section-15.4.3"),
        ("RFC 9110 15.4.8", "https://www.rfc-editor.org/rfc/rfc9110#section-15.4.8"),
        ("RFC 9110 15.4.9", "https://www.rfc-editor.org/rfc/rfc9110#section-15.4.9"),
        ("Fetch: HTTP-redirect fetch", "https://fetch.spec.whatwg.org/#http-redirect-fetch"),
    ]


def test_sections_and_bullets_of_a_docstring_render_as_markdown():
    doc = "x (RA1): a thing.\n\nWhat fires\n    A hop whose follow-up:\n    * lost it (high),\n      really;\n    * changed it.\n\nHow to fix\n    Do not.\n"
    assert [t for t, _ in sections(doc)] == ["", "What fires", "How to fix"]
    page = render([RULES[0]])
    assert "### What fires\n\n- 307 or 308 followed with any other method (high)." in page
    assert "### Example" not in page  # no fixtures given: no example
    from analyzer.ruledocs import _markdown_body

    assert _markdown_body(dict(sections(doc))["What fires"]) == (
        "A hop whose follow-up:\n\n- lost it (high), really;\n- changed it."
    )


def test_examples_need_the_markdown_format_and_say_so():
    done = run_cli("rules", "--examples", str(RULE_FIXTURES))
    assert done.returncode == 2
    assert "--examples goes with --format markdown" in done.stderr
