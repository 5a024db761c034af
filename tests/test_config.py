"""The project's configuration, as ruff's: found from the working directory up, validated
line by line, and the command line over it; what it suppresses is counted, never lost.

The demo store's seven findings (three RA101 at low, medium and high, RA102, RA103, two
RA104) are the traffic; each setting is checked by what `findings` and `check` print.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import DEMO, RULE_FIXTURES, run_cli


@pytest.fixture(scope="module")
def demo_db(tmp_path_factory) -> str:
    """The demo store, made once: every test here only reads it (configuration files live in
    each test's own directory)."""
    where = tmp_path_factory.mktemp("config-demo")
    copies = [str(shutil.copy(har, where / har.name)) for har in DEMO]
    db = str(where / "demo.db")
    assert run_cli("import-har", *copies, "--db", db).returncode == 0
    assert run_cli("analyze", "--db", db).returncode == 0
    return db


ALL_SEVEN = ["RA101", "RA101", "RA101", "RA102", "RA103", "RA104", "RA104"]


def rules_of(done) -> list[str]:
    assert done.returncode == 0, done.stderr
    return sorted(r["rule_id"] for r in json.loads(done.stdout))


def findings(demo_db: str, cwd: Path, *args: str):
    return run_cli("findings", "--db", demo_db, "-f", "json", *args, cwd=cwd)


def test_without_a_configuration_everything_is_shown(demo_db, tmp_path):
    done = findings(demo_db, tmp_path, "-v")
    assert rules_of(done) == ALL_SEVEN
    assert (
        f"configuration: no redirect-audit.toml or [tool.redirect-audit] from {tmp_path.resolve()} up"
        in done.stderr
    )
    assert "suppressed" not in done.stderr


def test_pyproject_is_found_from_a_subdirectory_and_named_with_v(demo_db, tmp_path):
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "shop"\n\n[tool.redirect-audit]\nignore = ["RA104", "duplicate-write"]\n'
    )
    deep = tmp_path / "tests" / "api"
    deep.mkdir(parents=True)
    done = findings(demo_db, deep, "-v")
    assert rules_of(done) == ["RA101", "RA101", "RA101", "RA102"]
    assert f"configuration: {tmp_path.resolve() / 'pyproject.toml'}" in done.stderr
    assert "3 findings suppressed: 3 of rules not selected; --show-suppressed lists them" in done.stderr
    # a pyproject.toml without the table is passed by; redirect-audit.toml is preferred in its directory
    (deep / "pyproject.toml").write_text('[project]\nname = "api"\n')
    (tmp_path / "redirect-audit.toml").write_text(
        'select = ["RA1"]\nextend-select = []\nignore = ["RA101"]\n'
    )
    done = findings(demo_db, deep, "-v")
    assert f"configuration: {tmp_path.resolve() / 'redirect-audit.toml'}" in done.stderr
    assert rules_of(done) == ["RA102", "RA103", "RA104", "RA104"]
    assert rules_of(findings(demo_db, deep, "--isolated")) == ALL_SEVEN


def test_suppressed_findings_are_listed_with_their_reason(demo_db, tmp_path):
    (tmp_path / "redirect-audit.toml").write_text(
        'ignore-hosts = ["pay-failover.*"]\nmin-confidence = 0.95\n\n'
        '[per-url-ignores]\n"https://shop.example.test/docs*" = ["RA104"]\n'
    )
    done = findings(demo_db, tmp_path, "--show-suppressed")
    records = json.loads(done.stdout)
    reasons = {r["rule_id"] + " " + r["from_url"].rsplit("/", 1)[-1]: r["suppressed"] for r in records}
    assert len(records) == 7  # nothing lost
    assert reasons["RA103 payments"] == (
        "host pay-failover.shop.example.test matches ignore-hosts 'pay-failover.*' (redirect-audit.toml)"
    )
    assert reasons["RA104 docs"] == (
        "URL matches per-url-ignores 'https://shop.example.test/docs*' for RA104 (redirect-audit.toml)"
    )
    assert reasons["RA102 orders"] == "confidence 0.90 below min-confidence 0.95"
    assert reasons["RA104 sale"] is None
    table = run_cli("findings", "--db", demo_db, "--show-suppressed", cwd=tmp_path)
    assert "suppressed: confidence 0.90 below min-confidence 0.95" in table.stdout
    assert "4 findings: 1 high, 2 medium, 1 low (3 suppressed, listed)" in table.stdout
    hidden = run_cli("findings", "--db", demo_db, cwd=tmp_path)
    assert "suppressed:" not in hidden.stdout and "4 findings" in hidden.stdout
    assert (
        "3 findings suppressed: 1 on ignored hosts, 1 on per-url-ignores, 1 below min-confidence;"
        in hidden.stderr
    )


def test_the_command_line_goes_over_the_file(demo_db, tmp_path):
    (tmp_path / "pyproject.toml").write_text(
        '[tool.redirect-audit]\nselect = ["RA104"]\nmin-confidence = 0.95\n'
    )
    assert rules_of(findings(demo_db, tmp_path)) == ["RA104", "RA104"]
    assert rules_of(findings(demo_db, tmp_path, "--select", "RA101,dropped-body")) == [
        "RA101",
        "RA101",
        "RA101",
    ]  # RA102's 0.90 is still below the file's min-confidence
    assert rules_of(findings(demo_db, tmp_path, "--select", "RA101,RA102", "--min-confidence", "0")) == [
        "RA101",
        "RA101",
        "RA101",
        "RA102",
    ]
    extended = findings(
        demo_db, tmp_path, "--extend-select", "RA103", "--ignore", "RA104", "--min-confidence", "0"
    )
    assert rules_of(extended) == ["RA103"]


def test_a_project_severity_is_what_the_gate_and_the_floor_see(demo_db, tmp_path):
    (tmp_path / "pyproject.toml").write_text(
        '[tool.redirect-audit]\nfail-on = "high"\n\n[tool.redirect-audit.severity]\nstale-temporary-redirect = "high"\nRA101 = "info"\n'
    )
    records = json.loads(findings(demo_db, tmp_path, "--min-severity", "high").stdout)
    assert sorted((r["rule_id"], r["severity"], r["rule_severity"]) for r in records) == [
        ("RA102", "high", "high"),
        ("RA103", "high", "high"),
        ("RA104", "high", "medium"),
        ("RA104", "high", "medium"),
    ]
    done = run_cli("check", "--db", demo_db, cwd=tmp_path)
    assert done.returncode == 1
    assert sorted(line.split()[2] for line in done.stdout.splitlines() if line.startswith("NEW")) == [
        "RA102",
        "RA103",
        "RA104",
        "RA104",
    ]
    assert "at or above high" in done.stdout  # fail-on from the file


def test_check_never_fails_on_what_is_suppressed_and_says_how_many(demo_db, tmp_path):
    (tmp_path / "pyproject.toml").write_text('[tool.redirect-audit]\nselect = ["RA104"]\n')
    done = run_cli("check", "--db", demo_db, cwd=tmp_path)
    assert done.returncode == 1
    assert [line.split()[2] for line in done.stdout.splitlines() if line.startswith("NEW")] == [
        "RA104",
        "RA104",
    ]
    assert "5 suppressed" in done.stdout
    listed = run_cli("check", "--db", demo_db, "--show-suppressed", "--ignore", "RA104", cwd=tmp_path)
    assert listed.returncode == 0, listed.stdout
    assert sum(line.startswith("SUPPRESSED") for line in listed.stdout.splitlines()) == 7
    assert "(rule RA101 is not selected (pyproject.toml))" in listed.stdout


def test_findings_views_by_rule_host_client_capture_and_sort(demo_db, tmp_path):
    assert rules_of(findings(demo_db, tmp_path, "--rule", "RA101")) == ["RA101"] * 3
    assert rules_of(findings(demo_db, tmp_path, "--host", "api-eu.*")) == ["RA102"]
    assert rules_of(findings(demo_db, tmp_path, "--capture", "2")) == ["RA104"]
    assert rules_of(findings(demo_db, tmp_path, "--client", "har:2/page_1")) == ["RA104"]
    by_severity = json.loads(findings(demo_db, tmp_path, "--sort", "severity").stdout)
    assert [r["severity"] for r in by_severity] == ["high"] * 3 + ["medium"] * 3 + ["low"]


@pytest.mark.parametrize(
    "text, problem",
    [
        (
            '[tool.redirect-audit]\nselect = ["RA101"]\nignroe = ["RA104"]\n',
            "pyproject.toml:3: unknown key 'ignroe'",
        ),
        (
            "[tool.redirect-audit]\nmin_confidence = 0.5\n",
            "pyproject.toml:2: unknown key 'min_confidence' (did you mean 'min-confidence'?)",
        ),
        (
            '[tool.redirect-audit]\nselect = [\n  "RA101",\n  "RA999",\n]\n',
            "pyproject.toml:4: unknown rule 'RA999' in select",
        ),
        (
            '[tool.redirect-audit]\n\n[tool.redirect-audit.severity]\nRA104 = "urgent"\n',
            "pyproject.toml:4: severity of RA104 must be one of info, low, medium, high",
        ),
        (
            '[tool.redirect-audit.per-url-ignores]\n"https://x/*" = ["no-such-rule"]\n',
            "pyproject.toml:2: unknown rule 'no-such-rule' in per-url-ignores",
        ),
        (
            "[tool.redirect-audit]\nmin-confidence = 3\n",
            "pyproject.toml:2: min-confidence must be a number from 0 to 1",
        ),
        (
            "[tool.redirect-audit]\nselect = [RA101]\n",
            "pyproject.toml: not valid TOML: Invalid value (at line 2, column 11)",
        ),
    ],
)
def test_a_bad_configuration_names_the_file_and_line(demo_db, tmp_path, text, problem):
    (tmp_path / "pyproject.toml").write_text(text)
    # every command reads it the same way: all three for the first case, findings for the rest
    commands = (["findings"], ["check"], ["analyze"]) if "ignroe" in text else (["findings"],)
    for command in commands:
        done = run_cli(*command, "--db", demo_db, cwd=tmp_path)
        assert done.returncode == 2, (command, done.stdout)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and problem in lines[0] and str(tmp_path.resolve()) in lines[0], done.stderr
        assert "Traceback" not in done.stderr


def test_an_unknown_rule_on_the_command_line_is_a_usage_error(demo_db, tmp_path):
    done = run_cli("findings", "--db", demo_db, "--select", "RA1O1", cwd=tmp_path)
    assert done.returncode == 2
    assert "unknown rule 'RA1O1' on the command line (rules are RA101-RA115" in done.stderr


def test_thresholds_in_the_configuration_reach_the_analysis(tmp_path):
    """max-redirects = 3: the fixture's loop (a chain of 4 follow-ups and more) is too many."""
    db = str(tmp_path / "loop.db")
    assert run_cli("import-har", "--db", db, str(RULE_FIXTURES / "rl-two-cycle.har")).returncode == 0
    before = rules_of(run_cli("findings", "--db", db, "-f", "json", cwd=tmp_path))
    assert "RA111" not in before
    (tmp_path / "redirect-audit.toml").write_text("max-redirects = 1\n")
    assert run_cli("analyze", "--db", db, cwd=tmp_path).returncode == 0
    after = rules_of(run_cli("findings", "--db", db, "-f", "json", cwd=tmp_path))
    assert "RA111" in after
