"""Every rule fixture says in log._expect which (rule, hop, severity) it must produce."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from analyzer.analysis import analyze
from analyzer.detectors import RULES
from analyzer.ingest import import_har
from conftest import RULE_FIXTURES

FIXTURES = sorted(RULE_FIXTURES.glob("*.har"))


def expected(path: Path) -> list[tuple]:
    return sorted(tuple(x) for x in json.loads(path.read_text())["log"]["_expect"])


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_fixture_produces_exactly_its_expected_findings(store, path):
    import_har(store, path)
    result = analyze(store)
    produced = sorted((f.rule, f.hop, str(f.severity)) for f in result.findings)
    assert produced == expected(path)


def test_every_rule_has_firing_and_quiet_fixtures():
    fired = {row[0] for p in FIXTURES for row in expected(p)}
    prefixes = {"method-downgrade": "md-", "dropped-body": "db-", "duplicate-write": "dw-",
                "stale-temporary-redirect": "st-", "credential-cross-origin": "cc-", "https-downgrade": "hd-",
                "body-on-get": "bg-", "head-to-get": "hg-", "non-get-after-303": "ng-", "redirect-loop": "rl-",
                "too-many-redirects": "tm-", "missing-location": "ml-", "lost-write": "lw-",
                "open-redirect-pattern": "or-"}
    for rule in RULES:
        assert rule.slug in fired, f"{rule.slug} has no firing fixture"
        quiet = [p for p in FIXTURES if p.name.startswith(prefixes[rule.slug]) and not expected(p)]
        assert quiet, f"{rule.slug} has no quiet fixture"


@pytest.mark.parametrize("rule", RULES, ids=[r.slug for r in RULES])
def test_rule_documents_itself_with_its_source(rule):
    assert rule.id.startswith("RA") and rule.slug
    for section in ("What fires", "Not flagged", "How to fix"):
        assert section in rule.doc
    assert "RFC 9110" in rule.doc or "Fetch" in rule.doc


def test_rule_ids_and_slugs_are_unique():
    assert len({r.id for r in RULES}) == len({r.slug for r in RULES}) == len(RULES)


@pytest.mark.parametrize("rule", RULES, ids=[r.slug for r in RULES])
def test_checks_do_no_io(rule):
    """A check is a pure function: its module imports no store, CLI or I/O helpers."""
    source = Path(__import__(rule.check.__module__, fromlist=["_"]).__file__).read_text()
    imported = {
        node.module for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom) and node.module
    }
    assert not imported & {"analyzer.store", "analyzer.cli", "analyzer.report", "sqlalchemy", "os", "io"}


def test_thresholds_are_options(store):
    from analyzer.analysis import AnalysisOptions
    from analyzer.detectors import DetectorOptions

    import_har(store, RULE_FIXTURES / "st-6-days-23-hours.har")
    quiet = analyze(store)
    loud = analyze(store, AnalysisOptions(detect=DetectorOptions(stale_after_days=6.5)))
    assert quiet.findings == [] and [f.rule for f in loud.findings] == ["stale-temporary-redirect"]


def test_analyze_is_idempotent(store):
    from sqlalchemy import func, select

    from analyzer.store import chains, findings

    import_har(store, RULE_FIXTURES / "dw-failover.har")
    for _ in range(2):
        analyze(store)
    with store.begin() as conn:
        assert conn.execute(select(func.count()).select_from(findings)).scalar_one() == 1
        assert conn.execute(select(func.count()).select_from(chains)).scalar_one() == 1
