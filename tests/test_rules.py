"""Every rule fixture says in log._expect which (rule, hop, severity) it must produce."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from conftest import RULE_FIXTURES, run_cli

from analyzer.analysis import analyze
from analyzer.detectors import RULES
from analyzer.ingest import import_har

FIXTURES = sorted(RULE_FIXTURES.glob("*.har"))


def expected(path: Path) -> list[tuple]:
    return sorted(tuple(x) for x in json.loads(path.read_text())["log"]["_expect"])


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_fixture_produces_exactly_its_expected_findings(store, path):
    import_har(store, path)
    result = analyze(store, keep=True)
    produced = sorted((f.rule, f.hop, str(f.severity)) for f in result.findings)
    assert produced == expected(path)


def test_every_rule_has_firing_and_quiet_fixtures():
    fired = {row[0] for p in FIXTURES for row in expected(p)}
    prefixes = {
        "method-downgrade": "md-",
        "dropped-body": "db-",
        "duplicate-write": "dw-",
        "stale-temporary-redirect": "st-",
        "credential-cross-origin": "cc-",
        "https-downgrade": "hd-",
        "body-on-get": "bg-",
        "head-to-get": "hg-",
        "non-get-after-303": "ng-",
        "redirect-loop": "rl-",
        "too-many-redirects": "tm-",
        "missing-location": "ml-",
        "lost-write": "lw-",
        "open-redirect-pattern": "or-",
        "credential-dropped": "cd-",
    }
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
        node.module
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ImportFrom) and node.module
    }
    assert not imported & {"analyzer.store", "analyzer.cli", "analyzer.report", "sqlalchemy", "os", "io"}


def test_thresholds_are_options(store):
    from analyzer.analysis import AnalysisOptions
    from analyzer.detectors import DetectorOptions

    import_har(store, RULE_FIXTURES / "st-6-days-23-hours.har")
    quiet = analyze(store, keep=True)
    loud = analyze(store, AnalysisOptions(detect=DetectorOptions(stale_after_days=6.5)), keep=True)
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


def _one_hop(source, target=None):
    from analyzer.model import Chain, Hop

    return Chain(
        hops=[Hop(0, source, target, "same-client" if target else "not-followed", 0.9)],
        end="final" if target else "not-followed",
    )


@pytest.mark.parametrize(
    "ctype, raw, fires",
    [
        ("application/x-www-form-urlencoded", b"user=a&next=https%3A%2F%2Fevil.test%2Fx", True),
        ("application/json", b'{"return_to": "//evil.test/x"}', True),
        ("application/json", b'{"return_to": "/account"}', False),
        ("text/plain", b"next=https://evil.test/x", False),  # not a format whose fields we read
    ],
)
def test_open_redirect_reads_kept_bodies(ctype, raw, fires):
    """With --keep-bodies the target may be named in a form or JSON field instead of the query."""
    from analyzer.detectors import RULES_BY_SLUG, run_detectors
    from analyzer.model import Body, Exchange

    post = Exchange(
        capture_id=1,
        seq=0,
        method="POST",
        url="https://site.test/login",
        url_norm="https://site.test/login",
        started_at=1.0,
        status=303,
        location="https://evil.test/x",
        location_resolved="https://evil.test/x",
        request_body=Body(len(raw), None, ctype, raw),
        id=1,
    )
    found = run_detectors([_one_hop(post)], rules=[RULES_BY_SLUG["open-redirect-pattern"]])
    assert [(f.rule, f.evidence.get("in")) for f in found] == (
        [("open-redirect-pattern", "body")] if fires else []
    )


def test_credential_evidence_names_the_header_never_the_value(store):
    import_har(store, RULE_FIXTURES / "cc-authorization-other-host.har")
    finding = analyze(store, keep=True).findings[0]
    text = json.dumps(finding.evidence) + finding.message
    assert finding.evidence["header"] == "authorization" and "s3cr3t" not in text and "hmac:" not in text


@pytest.mark.parametrize(
    "host, expected",
    [
        ("www.example.co.uk", "example.co.uk"),
        ("api.example.co.uk", "example.co.uk"),
        ("co.uk", "co.uk"),  # a public suffix is nobody's site but its own
        ("alice.github.io", "alice.github.io"),  # the list's private section counts, as in browsers
        ("127.0.0.1", "127.0.0.1"),
        ("localhost", "localhost"),
        ("a.b.internal", "a.b.internal"),  # a top-level label the list does not know: a private name
    ],
)
def test_site_is_the_registrable_domain_or_the_host_itself(host, expected):
    from analyzer.detectors.base import site

    assert site(host) == expected


def test_credential_dropped_watches_every_api_key_header_the_secrets_list_knows():
    from analyzer.detectors.credential_dropped import API_KEY_HEADERS
    from analyzer.secrets import CREDENTIAL_HEADERS

    not_keys = {
        "authorization",
        "proxy-authorization",
        "cookie",
        "set-cookie",
        "set-cookie2",
        "x-csrf-token",
        "x-xsrf-token",
    }
    assert set(API_KEY_HEADERS) == CREDENTIAL_HEADERS - not_keys


@pytest.mark.parametrize(
    "length, said",
    [
        (8, "but the POST body (8 bytes) was dropped;"),
        (0, "but this POST had no body, so nothing was lost this time, but a body would be;"),
        (None, "but any POST body was dropped (the capture does not say whether there was one);"),
    ],
)
def test_a_post_turned_get_claims_only_the_body_the_capture_shows(length, said):
    """RA101 on POST -> 302 -> GET says a body was lost only when the capture shows one."""
    from analyzer.detectors import RULES_BY_SLUG, run_detectors
    from analyzer.model import Body, Exchange

    common = {"capture_id": 1, "started_at": 1.0}
    post = Exchange(
        seq=0,
        method="POST",
        url="https://shop.test/pay",
        url_norm="https://shop.test/pay",
        status=302,
        location="/done",
        location_resolved="https://shop.test/done",
        request_body=Body(length),
        id=1,
        **common,
    )
    get = Exchange(
        seq=1,
        method="GET",
        url="https://shop.test/done",
        url_norm="https://shop.test/done",
        status=200,
        id=2,
        **common,
    )
    found = run_detectors([_one_hop(post, get)], rules=[RULES_BY_SLUG["method-downgrade"]])
    assert [(f.rule_id, str(f.severity)) for f in found] == [("RA101", "low")]
    assert said in found[0].message, found[0].message


MESSAGE_FIXTURES = (
    "md-302-post-without-body",
    "db-303-post-kept-no-body",
    "ng-303-post-kept-not-captured",
    "bg-303-content-length-only",
    "cd-digest-answered",
    "cd-other-host-digest-answered",
    "cd-same-origin-401",
)


@pytest.fixture(scope="module")
def message_findings(tmp_path_factory) -> list[dict]:
    """The findings of every message fixture, from one store (each HAR is its own client)."""
    db = str(tmp_path_factory.mktemp("messages") / "m.db")
    files = [str(RULE_FIXTURES / f"{name}.har") for name in MESSAGE_FIXTURES]
    assert run_cli("import-har", "--db", db, *files).returncode == 0
    return json.loads(run_cli("findings", "--db", db, "-f", "json").stdout)


@pytest.mark.parametrize(
    "fixture, rule, said, not_said",
    [
        # a body the capture did not see is not called lost, and an empty one not called a payload
        (
            "md-302-post-without-body",
            "RA101",
            "this POST had no body, so nothing was lost this time",
            "dropped",
        ),
        (
            "db-303-post-kept-no-body",
            "RA102",
            "the server asked for a GET and received an empty POST",
            "payload",
        ),
        ("db-303-post-kept-no-body", "RA109", "it went without a body", "bytes) was sent again"),
        (
            "ng-303-post-kept-not-captured",
            "RA109",
            "the capture does not show whether a body went with it",
            "without a body",
        ),
        (
            "bg-303-content-length-only",
            "RA107",
            "still declared a body of 12 bytes (Content-Length; the capture does not show",
            "declared bytes",
        ),
        ("cd-digest-answered", "RA115", "its retry of https://api.test/reports/2026 got 200", "failed"),
        (
            "cd-other-host-digest-answered",
            "RA115",
            "the client answered the challenge (its retry got 200)",
            "can only fail",
        ),
        ("cd-same-origin-401", "RA115", "was answered 401", "retry"),
    ],
)
def test_messages_claim_only_what_the_capture_shows(tmp_path, fixture, rule, said, not_said):
    db = str(tmp_path / "m.db")
    assert run_cli("import-har", "--db", db, str(RULE_FIXTURES / f"{fixture}.har")).returncode == 0
    (message,) = [
        f["message"]
        for f in json.loads(run_cli("findings", "--db", db, "-f", "json").stdout)
        if f["rule_id"] == rule
    ]
    assert said in message and not_said not in message, message
