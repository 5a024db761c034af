"""Analysis by client: only clients with new exchanges are analyzed again, ids stay, and
worker processes give what one process gives. On both engines (the db_path fixture)."""

from __future__ import annotations

import json

import pytest
from conftest import RULE_FIXTURES, run_cli

from analyzer.text import counted

pytestmark = pytest.mark.slow

FIRST = ["md-307-post-to-get.har", "dw-failover.har", "lw-put-307.har", "cc-authorization-other-host.har"]
LATER = ["db-307-empty.har", "md-302-put-to-get.har"]


def findings(db: str) -> list[dict]:
    done = run_cli("findings", "-f", "json", "--db", db)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def chains(db: str) -> list[dict]:
    return json.loads(run_cli("chains", "-f", "json", "--db", db).stdout)


def ids(records: list[dict]) -> dict[tuple, int]:
    return {(f["rule"], f["from_url"], f["client"]): f["finding_id"] for f in records}


def test_new_captures_are_analyzed_alone_and_every_id_stays(db_path):
    assert run_cli("import-har", *[str(RULE_FIXTURES / f) for f in FIRST], "--db", db_path).returncode == 0
    first = run_cli("analyze", "--db", db_path)
    assert first.returncode == 0 and "analyzed" not in first.stdout  # a first analysis is a full one
    before_findings, before_chains = findings(db_path), chains(db_path)
    assert len(before_findings) >= 4
    assert all(
        c["chain_id"] == c["hops"][0]["from"]["id"] for c in before_chains
    )  # a chain is its root exchange
    assert run_cli("import-har", *[str(RULE_FIXTURES / f) for f in LATER], "--db", db_path).returncode == 0
    again = run_cli("analyze", "--db", db_path)
    assert again.returncode == 0, again.stderr
    assert (
        f"(analyzed the {counted(len(LATER), 'client')} with new exchanges; the others had nothing new)"
        in again.stdout
    )
    after_findings, after_chains = findings(db_path), chains(db_path)
    kept = ids(after_findings)
    assert {k: kept[k] for k in ids(before_findings)} == ids(before_findings)  # same findings, same ids
    assert [
        c for c in after_chains if c["chain_id"] in {b["chain_id"] for b in before_chains}
    ] == before_chains
    new = [f for f in after_findings if ids([f]).keys() - ids(before_findings).keys()]
    assert {f["rule"] for f in new} >= {"dropped-body", "method-downgrade"}
    assert min(f["finding_id"] for f in new) > max(f["finding_id"] for f in before_findings)
    # nothing new: nothing analyzed, nothing changed
    idle = run_cli("analyze", "--db", db_path)
    assert "(analyzed the 0 clients with new exchanges" in idle.stdout
    assert findings(db_path) == after_findings
    # a full analysis finds the same, with the same ids
    full = run_cli("analyze", "--full", "--db", db_path)
    assert full.returncode == 0 and "analyzed" not in full.stdout
    assert findings(db_path) == after_findings and chains(db_path) == after_chains


def test_new_options_analyze_everything_again_and_ids_still_stay(db_path):
    assert (
        run_cli(
            "import-har", *[str(RULE_FIXTURES / f) for f in [*FIRST, "st-7-days.har"]], "--db", db_path
        ).returncode
        == 0
    )
    before = findings(db_path)
    assert "stale-temporary-redirect" in {f["rule"] for f in before}
    done = run_cli("analyze", "--stale-days", "30", "--db", db_path)
    assert done.returncode == 0 and "analyzed" not in done.stdout  # options changed: a full analysis
    after = findings(db_path)
    assert "stale-temporary-redirect" not in {f["rule"] for f in after}
    assert ids(after) == {k: v for k, v in ids(before).items() if k[0] != "stale-temporary-redirect"}
    run_cli("analyze", "--db", db_path)  # back to 7 days: the stale redirect is back, under its old id
    assert ids(findings(db_path)) == ids(before)


def test_a_growing_stale_redirect_is_judged_again_across_clients(db_path, tmp_path):
    """Stale temporary redirects are judged across clients: a sighting from a new client
    moves the group's last sighting, and its finding keeps its id."""
    har = json.loads((RULE_FIXTURES / "st-7-days.har").read_text())
    assert run_cli("import-har", str(RULE_FIXTURES / "st-7-days.har"), "--db", db_path).returncode == 0
    [before] = [f for f in findings(db_path) if f["rule"] == "stale-temporary-redirect"]
    later = har["log"]["entries"][-2]  # the 302
    later["startedDateTime"] = "2026-12-01T00:00:00Z"  # the same redirect, months later, from another file
    har["log"]["entries"] = [later]
    (tmp_path / "later.har").write_text(json.dumps(har))
    assert run_cli("import-har", str(tmp_path / "later.har"), "--db", db_path).returncode == 0
    [after] = [f for f in findings(db_path) if f["rule"] == "stale-temporary-redirect"]
    assert after["finding_id"] == before["finding_id"]
    assert after["evidence"]["sightings"] == before["evidence"]["sightings"] + 1
    assert after["evidence"]["age_days"] > before["evidence"]["age_days"] + 200
    assert after["client"].startswith("har:2")  # it points at the latest sighting


def test_worker_processes_give_what_one_process_gives(db_path, tmp_path):
    files = sorted(RULE_FIXTURES.glob("*.har"))
    assert run_cli("import-har", *map(str, files), "--db", db_path).returncode == 0
    one = run_cli("analyze", "--full", "--jobs", "1", "--db", db_path)
    assert one.returncode == 0, one.stderr
    expected = (findings(db_path), chains(db_path))
    # small batches, so that two workers share the clients
    script = (
        "import sys; from analyzer.store import open_store; from analyzer.analysis import analyze; "
        "s = open_store(sys.argv[1], create=False); r = analyze(s, jobs=2, full=True, batch_exchanges=10); "
        "print(r.chain_count, r.finding_count)"
    )
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", script, db_path], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert (findings(db_path), chains(db_path)) == expected
    assert done.stdout.split() == [str(len(expected[1])), str(len(expected[0]))]
    cli = run_cli("analyze", "--full", "--jobs", "2", "--db", db_path)
    assert cli.returncode == 0 and (findings(db_path), chains(db_path)) == expected


def test_removing_a_capture_takes_its_results_and_leaves_the_rest(db_path):
    assert run_cli("import-har", *[str(RULE_FIXTURES / f) for f in FIRST], "--db", db_path).returncode == 0
    before = findings(db_path)
    assert run_cli("captures", "remove", "1", "--db", db_path).returncode == 0
    after = findings(db_path)
    assert after == [f for f in before if not f["client"].startswith("har:1")]


def sighting(seq: int, when: str, headers: list[dict] | None = None) -> dict:
    return {
        "startedDateTime": when,
        "request": {
            "method": "GET",
            "url": "https://api.test/docs",
            "httpVersion": "HTTP/1.1",
            "headers": [],
        },
        "response": {"status": 307, "headers": [{"name": "Location", "value": "/docs/v2"}, *(headers or [])]},
    }


def test_the_proxy_starts_from_the_store_s_summary_and_judges_as_analyze_does(store, tmp_path):
    """The live stale rule starts from stale_history (a summary per source -> target, not
    the redirects): a new sighting is judged as a full analysis of store + sighting judges it."""
    from analyzer.analysis import analyze, stale_history
    from analyzer.ingest import import_har
    from analyzer.live import LiveAnalyzer
    from analyzer.model import Exchange

    entries = [
        sighting(0, "2026-03-01T12:00:00Z", [{"name": "Retry-After", "value": "3600"}]),
        sighting(1, "2026-03-03T12:00:00Z", [{"name": "Cache-Control", "value": "no-cache"}]),
        sighting(2, "2026-03-04T12:00:00Z"),
    ]
    har = tmp_path / "history.har"
    har.write_text(
        json.dumps({"log": {"version": "1.2", "creator": {"name": "t", "version": "1"}, "entries": entries}})
    )
    import_har(store, har)
    with store.begin() as conn:
        history = stale_history(conn)
    group = history[("https://api.test/docs", "https://api.test/docs/v2")]
    assert (group.count, group.statuses, group.latest_status) == (3, (307,), 307)
    assert group.earliest_deadline is not None and group.lifetime == 0.0
    live = LiveAnalyzer(history=history)
    new = Exchange(
        capture_id=9,
        seq=0,
        method="GET",
        url="https://api.test/docs",
        url_norm="https://api.test/docs",
        client="c",
        status=307,
        location="/docs/v2",
        location_resolved="https://api.test/docs/v2",
        started_at=group.last + 5 * 86400,
        id=10**6,
    )
    found = live.add(new, now=new.started_at) + live.expire(now=new.started_at + 3600)
    [finding] = [f for f in found if f.rule == "stale-temporary-redirect"]
    assert finding.evidence["sightings"] == 4 and finding.evidence["age_days"] == 8.0
    assert "after its Retry-After ran out" in finding.message
    later = tmp_path / "later.har"  # the same sighting, imported: analyze agrees
    later.write_text(
        json.dumps(
            {
                "log": {
                    "version": "1.2",
                    "creator": {"name": "t", "version": "1"},
                    "entries": [sighting(3, "2026-03-09T12:00:00Z")],
                }
            }
        )
    )
    import_har(store, later)
    [expected] = [
        f for f in analyze(store, keep=True, full=True).findings if f.rule == "stale-temporary-redirect"
    ]
    assert expected.message == finding.message
    assert {k: v for k, v in expected.evidence.items() if k != "first_seen"} == {
        k: v for k, v in finding.evidence.items() if k != "first_seen"
    }


def test_an_incremental_analysis_reads_through_indexes_only(tmp_path):
    """Every statement an incremental analysis sends SQLite is planned through an index:
    no full scan of a table that grows with the store (a covering-index scan for the
    per-capture and per-client counts is the one pass over every exchange)."""
    import sqlite3

    from sqlalchemy import event

    from analyzer.analysis import analyze
    from analyzer.ingest import import_har
    from analyzer.store import open_store

    db = str(tmp_path / "plans.db")
    store = open_store(db)
    for name in [*FIRST, "st-7-days.har"]:
        import_har(store, RULE_FIXTURES / name)
    analyze(store)
    import_har(store, RULE_FIXTURES / "db-307-empty.har")
    sent: list[tuple[str, object]] = []

    def remember(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith(("SELECT", "DELETE", "UPDATE")):
            sent.append((statement, parameters))

    event.listen(store.engine, "before_cursor_execute", remember)
    result = analyze(store)
    event.remove(store.engine, "before_cursor_execute", remember)
    store.close()
    assert result.clients_analyzed == 1 and len(sent) > 10
    growing = ("exchanges", "chains", "hops", "findings")
    plans = sqlite3.connect(db)
    scans = []
    for statement, parameters in sent:
        for row in plans.execute("EXPLAIN QUERY PLAN " + statement, parameters or ()):
            detail = row[-1]
            if detail.startswith("SCAN ") and detail.split()[1] in growing and "COVERING INDEX" not in detail:
                scans.append((detail, statement.split("\n")[0][:120]))
    assert scans == []
