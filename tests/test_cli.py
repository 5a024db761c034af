"""The command line as users run it: a child process, real files, exit codes, one-line errors."""

from __future__ import annotations

import json

import pytest
from conftest import CORPUS, RULE_FIXTURES, run_cli

pytestmark = pytest.mark.slow

FINDING_FIELDS = {
    "rule",
    "rule_id",
    "severity",
    "confidence",
    "message",
    "chain_id",
    "hop",
    "status",
    "method_before",
    "method_after",
    "from_url",
    "to_url",
    "client",
    "observed_at",
    "evidence",
    "capture",
}


def test_import_analyze_findings_json(db_path):
    fixture = RULE_FIXTURES / "md-307-post-to-get.har"
    assert run_cli("import-har", "--db", db_path, str(fixture)).returncode == 0
    done = run_cli("analyze", "--db", db_path)
    assert done.returncode == 0 and "1 finding: 1 high" in done.stdout
    listed = run_cli("findings", "--db", db_path, "--format", "json")
    [finding] = json.loads(listed.stdout)
    assert finding.keys() >= FINDING_FIELDS
    assert (finding["rule"], finding["method_before"], finding["method_after"], finding["status"]) == (
        "method-downgrade",
        "POST",
        "GET",
        307,
    )
    assert finding["capture"] == {"source": "har", "file": str(fixture.resolve()), "entry_index": 1}
    assert finding["observed_at"].startswith("2026-03-01T12:00:00")


def test_jsonl_and_min_severity(db_path):
    for name in ("md-301-post-to-get.har", "md-307-post-to-get.har"):
        run_cli("import-har", "--db", db_path, str(RULE_FIXTURES / name))
    run_cli("analyze", "--db", db_path)
    lines = run_cli("findings", "--db", db_path, "--format", "jsonl").stdout.splitlines()
    assert sorted(json.loads(x)["severity"] for x in lines) == ["high", "low"]
    high = run_cli(
        "findings", "--db", db_path, "--format", "jsonl", "--min-severity", "high"
    ).stdout.splitlines()
    assert [json.loads(x)["severity"] for x in high] == ["high"]


def test_db_from_environment(tmp_path):
    env = {"REDIRECT_AUDIT_DB": str(tmp_path / "env.db")}
    assert run_cli("import-har", str(RULE_FIXTURES / "db-307-empty.har"), env=env).returncode == 0
    assert (tmp_path / "env.db").exists()


def test_chains_json_points_back_to_capture(db_path):
    fixture = RULE_FIXTURES / "md-second-hop.har"
    run_cli("import-har", "--db", db_path, str(fixture))
    run_cli("analyze", "--db", db_path)
    [chain] = json.loads(run_cli("chains", "--db", db_path, "--format", "json").stdout)
    assert [h["status"] for h in chain["hops"]] == [308, 307]
    pointers = [
        (h["from"]["capture"]["entry_index"], h["to"]["capture"]["entry_index"]) for h in chain["hops"]
    ]
    assert pointers == [(0, 1), (1, 2)]
    assert chain["hops"][1]["changes"][0] == "method POST -> GET"


def test_chains_tree_and_url_filter(db_path):
    run_cli(
        "import-har",
        "--db",
        db_path,
        str(RULE_FIXTURES / "db-307-empty.har"),
        str(RULE_FIXTURES / "md-303-post-to-get.har"),
    )
    run_cli("analyze", "--db", db_path)
    tree = run_cli("chains", "--db", db_path, "--url", "/b").stdout
    assert "chain 1" in tree and "body dropped" in tree
    assert "No chains." in run_cli("chains", "--db", db_path, "--url", "nowhere").stdout


def test_bad_files_one_line_each_exit_2_good_ones_kept(db_path):
    bad = sorted((CORPUS / "bad").glob("*.har"))
    good = RULE_FIXTURES / "dw-failover.har"
    done = run_cli("import-har", "--db", db_path, str(good), *map(str, bad))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == len(bad) and "Traceback" not in done.stderr
    for line, path in zip(lines, bad, strict=False):
        assert line.startswith(f"redirect-audit: error: {path}: ")
    assert "imported 3 entries" in done.stdout


def test_demo_shows_all_four_mission_rules(tmp_path):
    done = run_cli("demo", "--db", str(tmp_path / "demo.db"))
    assert done.returncode == 0, done.stderr
    for slug in ("method-downgrade", "dropped-body", "duplicate-write", "stale-temporary-redirect"):
        assert slug in done.stdout
    again = run_cli("demo", "--db", str(tmp_path / "demo.db"))  # re-running starts fresh
    assert again.stdout.count(" finding") == done.stdout.count(" finding")
    assert again.stdout.splitlines()[-3] == done.stdout.splitlines()[-3]


def test_rules_is_a_table_of_one_line_per_rule_and_all_gives_every_text():
    from analyzer.detectors import RULES

    out = run_cli("rules").stdout
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "RULE", "SEVERITY", "WHAT", "IT", "FINDS"]
    for rule in RULES:
        (line,) = [line for line in lines if line.startswith(rule.id + " ")]
        assert line.split()[:3] == [rule.id, rule.slug, str(rule.severity)] and line.endswith(rule.summary)
    assert len(lines) <= len(RULES) + 3 and "RFC 9110" not in out
    assert "`redirect-audit rules RA102` shows one rule in full; --all shows every one." in out
    full = run_cli("rules", "--all").stdout
    assert all(f"{r.id} {r.slug} (default severity {r.severity})" in full for r in RULES)
    assert "RFC 9110" in full and len(full.splitlines()) > 10 * len(RULES)
    one = run_cli("rules", "RA102").stdout
    assert one.startswith("RA102 dropped-body (default severity high)") and "RA101" not in one


def test_bodies_kept_only_on_request_capped_and_redacted(tmp_path):
    import sqlite3

    har = tmp_path / "login.har"
    body = "user=ada&password=hunter2&note=" + "n" * 500
    har.write_text(
        json.dumps(
            {
                "log": {
                    "version": "1.2",
                    "entries": [
                        {
                            "startedDateTime": "2026-01-01T00:00:00Z",
                            "request": {
                                "method": "POST",
                                "url": "https://h.test/login",
                                "headers": [],
                                "postData": {"mimeType": "application/x-www-form-urlencoded", "text": body},
                            },
                            "response": {"status": 303, "headers": [{"name": "Location", "value": "/home"}]},
                        }
                    ],
                }
            }
        )
    )
    plain, kept = str(tmp_path / "plain.db"), str(tmp_path / "kept.db")
    assert run_cli("import-har", "--db", plain, str(har)).returncode == 0
    assert run_cli("import-har", "--db", kept, "--keep-bodies", "--body-cap", "100", str(har)).returncode == 0
    [(length, raw)] = (
        sqlite3.connect(plain).execute("select req_body_len, req_body from exchanges").fetchall()
    )
    assert length == len(body) and raw is None
    [(length, raw)] = sqlite3.connect(kept).execute("select req_body_len, req_body from exchanges").fetchall()
    assert length == len(body) and b"user=ada" in raw and b"hunter2" not in raw and len(raw) < 120
