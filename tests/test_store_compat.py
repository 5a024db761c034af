"""A store the previous release wrote is read, analyzed and written by this one.

`tests/fixtures/stores/release-be7a892.db` was written by the release before this one
(be7a892: five rule fixtures imported, then `analyze`). It has no generation in its meta
table and analysis results this release did not make; reading it analyzes it once, and
the findings are those a fresh import gives today.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from conftest import RULE_FIXTURES, run_cli

OLD = Path(__file__).parent / "fixtures" / "stores" / "release-be7a892.db"
FILES = ["md-307-post-to-get.har", "dw-failover.har", "st-7-days.har", "cc-authorization-other-host.har",
         "lw-put-307.har"]


def summary(stdout: str) -> list[tuple]:
    return sorted((f["rule"], f["severity"], f["status"], f["method_before"], f["method_after"], f["from_url"],
                   f["to_url"], f["fingerprint"]) for f in json.loads(stdout))


def test_a_store_of_the_previous_release_reads_as_a_fresh_import_of_its_files(tmp_path):
    old = tmp_path / "old.db"
    shutil.copy(OLD, old)
    first = run_cli("findings", "-f", "json", "--db", str(old))
    assert first.returncode == 0, first.stderr
    assert "the store has never been analyzed; analyzing it now" in first.stderr
    fresh = tmp_path / "fresh.db"
    assert run_cli("import-har", *[str(RULE_FIXTURES / f) for f in FILES], "--db", str(fresh)).returncode == 0
    assert summary(first.stdout) == summary(run_cli("findings", "-f", "json", "--db", str(fresh)).stdout)
    assert {r[0] for r in summary(first.stdout)} == {"lost-write", "method-downgrade", "credential-cross-origin",
                                                      "duplicate-write", "stale-temporary-redirect"}
    again = run_cli("findings", "-f", "json", "--db", str(old))
    assert again.stderr == ""  # analyzed once, current since


def test_the_previous_release_s_store_takes_new_captures(tmp_path):
    old = tmp_path / "old.db"
    shutil.copy(OLD, old)
    added = run_cli("import-har", str(RULE_FIXTURES / "db-307-empty.har"), "--db", str(old))
    assert added.returncode == 0 and "as capture 6" in added.stdout
    again = run_cli("import-har", str(RULE_FIXTURES / "md-307-post-to-get.har"), "--db", str(old))
    assert "already imported as capture 1 on" in again.stdout  # the old release kept the file's SHA-256 too
    rules = {f["rule"] for f in json.loads(run_cli("findings", "-f", "json", "--db", str(old)).stdout)}
    assert "dropped-body" in rules
    listed = json.loads(run_cli("captures", "-f", "json", "--db", str(old)).stdout)
    assert [c["capture_id"] for c in listed] == [1, 2, 3, 4, 5, 6]
