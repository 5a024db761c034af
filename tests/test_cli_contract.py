"""What a user sees when a command cannot answer about the data they meant.

Every case here was seen going wrong once: an all-clear about a store that does not
exist, stale results, a re-import counted twice, a usage slip reported as a bug, a
redirect nobody followed printed as a hop to itself. Each test checks the words the
user reads, not only the exit status.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import sqlite3
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
from conftest import ROOT, RULE_FIXTURES, run_cli

pytestmark = pytest.mark.slow

ANSI = re.compile(r"\x1b\[")
NO_UV = {"UV_RUN_RECURSION_DEPTH": ""}  # hints as for an installed command


def exchanges_in(db: str) -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute("select count(*) from exchanges").fetchone()[0]


def stderr_lines(done: subprocess.CompletedProcess) -> list[str]:
    return [line for line in done.stderr.splitlines() if line.strip()]


# ---- a store is created only by what writes it ----------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ["findings"],
        ["findings", "--format", "json"],
        ["chains"],
        ["clients"],
        ["check"],
        ["analyze"],
        ["captures"],
        ["captures", "remove", "1"],
    ],
)
def test_a_reading_command_refuses_a_store_that_does_not_exist(tmp_path, command):
    typo = tmp_path / "typo.db"
    done = run_cli(*command, "--db", str(typo))
    assert done.returncode == 2
    [line] = stderr_lines(done)
    assert line.startswith(f"redirect-audit: error: no store at {typo}: nothing was captured there")
    assert f"--db {typo}" in line  # what to do about it
    assert done.stdout == ""
    assert not typo.exists() and list(tmp_path.iterdir()) == []  # nothing created


def test_the_frames_refuse_a_store_that_does_not_exist_too(tmp_path):
    from analyzer import frames
    from analyzer.store import StoreMissing

    with pytest.raises(StoreMissing, match=f"no store at {re.escape(str(tmp_path / 'nb.db'))}"):
        frames.findings(str(tmp_path / "nb.db"))
    assert not (tmp_path / "nb.db").exists()


def test_the_ci_gate_fails_on_a_store_where_nothing_was_captured(tmp_path):
    db = str(tmp_path / "empty.db")
    har = tmp_path / "nothing.har"
    har.write_text(json.dumps({"log": {"version": "1.2", "entries": []}}))
    assert run_cli("import-har", "--db", db, str(har)).returncode == 0
    done = run_cli("check", "--db", db)
    assert done.returncode == 2
    assert stderr_lines(done)[-1] == (
        f"redirect-audit: error: nothing was captured: the store {db} holds no exchanges, "
        "so nothing was checked (--allow-empty to pass on an empty store)"
    )
    allowed = run_cli("check", "--db", db, "--allow-empty")
    assert allowed.returncode == 0 and "0 exchanges checked" in allowed.stdout


def test_findings_say_what_they_looked_at(tmp_path):
    db = str(tmp_path / "clean.db")
    run_cli("import-har", "--db", db, str(RULE_FIXTURES / "bg-303-clean.har"))
    done = run_cli("findings", "--db", db)
    assert done.stdout.strip() == "No findings in 2 exchanges."


def test_the_missing_default_store_points_at_the_demo_store(tmp_path):
    assert run_cli("demo", cwd=tmp_path).returncode == 0
    done = run_cli("findings", cwd=tmp_path, env={"REDIRECT_AUDIT_DB": ""})
    assert done.returncode == 2
    assert "no store at redirect-audit.db" in done.stderr
    assert "the demo's store is redirect-audit-demo.db: --db redirect-audit-demo.db" in done.stderr


# ---- results are never stale ----------------------------------------------------------


def test_results_follow_every_import_without_an_explicit_analyze(tmp_path):
    db = str(tmp_path / "s.db")
    run_cli("import-har", "--db", db, str(RULE_FIXTURES / "md-307-post-to-get.har"))
    first = run_cli("findings", "--db", db, "--format", "json")
    assert [f["rule"] for f in json.loads(first.stdout)] == ["method-downgrade"]
    assert stderr_lines(first) == ["redirect-audit: the store has never been analyzed; analyzing it now"]
    again = run_cli("findings", "--db", db, "--format", "json")
    assert again.stderr == "" and json.loads(again.stdout) == json.loads(first.stdout)  # current: no re-run

    run_cli("import-har", "--db", db, str(RULE_FIXTURES / "db-307-empty.har"))
    chains = run_cli("chains", "--db", db, "--format", "json")
    assert stderr_lines(chains) == [
        "redirect-audit: the store changed since its last analysis; analyzing it now"
    ]
    assert len(json.loads(chains.stdout)) == 2
    rules = {f["rule"] for f in json.loads(run_cli("findings", "--db", db, "--format", "json").stdout)}
    assert rules == {"method-downgrade", "dropped-body"}


def test_no_analyze_reads_stale_results_and_says_so(tmp_path):
    db = str(tmp_path / "s.db")
    run_cli("import-har", "--db", db, str(RULE_FIXTURES / "md-307-post-to-get.har"))
    run_cli("analyze", "--db", db)
    run_cli("import-har", "--db", db, str(RULE_FIXTURES / "db-307-empty.har"))
    stale = run_cli("findings", "--db", db, "--format", "json", "--no-analyze")
    assert [f["rule"] for f in json.loads(stale.stdout)] == ["method-downgrade"]
    assert (
        "note: the store changed since its last analysis; these results do not include that change"
        in stale.stderr
    )
    gate = run_cli("check", "--db", db)  # the gate analyzes: the dropped body fails it
    assert gate.returncode == 1 and "RA102 dropped-body" in gate.stdout


def test_a_re_analysis_on_its_own_keeps_the_options_of_the_last_analyze(tmp_path):
    db = str(tmp_path / "s.db")
    run_cli("import-har", "--db", db, str(RULE_FIXTURES / "tm-20.har"))
    assert run_cli("analyze", "--db", db, "--max-redirects", "5").returncode == 0
    run_cli("import-har", "--db", db, str(RULE_FIXTURES / "bg-303-clean.har"))
    found = json.loads(run_cli("findings", "--db", db, "--format", "json").stdout)
    assert "too-many-redirects" in {f["rule"] for f in found}  # 20 follow-ups > 5, remembered


def test_the_frames_analyze_a_changed_store_before_they_read_it(tmp_path, capfd):
    from analyzer import frames

    db = str(tmp_path / "s.db")
    run_cli("import-har", "--db", db, str(RULE_FIXTURES / "md-307-post-to-get.har"))
    assert list(frames.findings(db)["rule"]) == ["method-downgrade"]
    assert "analyzing it now" in capfd.readouterr().err
    assert len(frames.chains(db)) == 1
    assert capfd.readouterr().err == ""


def test_every_proxy_batch_makes_the_results_stale(tmp_path):
    from analyzer.ingest.recorder import Recorder, RecorderSettings
    from analyzer.model import Exchange
    from analyzer.store import open_store
    from analyzer.storeread import open_reader, store_state

    db = str(tmp_path / "p.db")
    store = open_store(db)
    recorder = Recorder(store, RecorderSettings(batch_size=1, flush_interval=0.05))
    with open_reader(db) as reader:
        before = store_state(reader).generation
    recorder.submit(
        Exchange(
            capture_id=recorder.capture_id,
            seq=0,
            method="GET",
            url="http://a.test/",
            url_norm="http://a.test/",
            status=200,
        )
    )
    recorder.close()
    with open_reader(db) as reader:
        after = store_state(reader)
    assert after.generation > before and after.exchanges == 1 and not after.is_current


# ---- imports are idempotent -----------------------------------------------------------


def test_the_same_content_is_imported_once_whatever_the_file_is_called(tmp_path):
    db = str(tmp_path / "s.db")
    original = RULE_FIXTURES / "dw-failover.har"
    renamed = tmp_path / "copy-of-failover.har"
    shutil.copy(original, renamed)
    assert run_cli("import-har", "--db", db, str(original)).returncode == 0
    findings = run_cli("findings", "--db", db, "--format", "json").stdout
    for again in (original, renamed):
        done = run_cli("import-har", "--db", db, str(again))
        assert done.returncode == 0
        assert re.fullmatch(
            rf"{re.escape(str(again))}: already imported as capture 1 on \d{{4}}-\d\d-\d\d \d\d:\d\d UTC; "
            r"--force to import it again\n",
            done.stdout,
        )
    assert exchanges_in(db) == 3
    assert run_cli("findings", "--db", db, "--format", "json").stdout == findings  # nothing doubled
    forced = run_cli("import-har", "--db", db, "--force", str(renamed))
    assert "as capture 2" in forced.stdout and exchanges_in(db) == 6


def test_flow_dumps_are_imported_once_too(tmp_path):
    from mitmproxy import io as mio
    from mitmproxy.test import tflow

    dump = tmp_path / "run.mitm"
    with dump.open("wb") as fh:
        writer = mio.FlowWriter(fh)
        for _ in range(3):
            writer.add(tflow.tflow(resp=True))
    db = str(tmp_path / "f.db")
    assert "imported 3 flows" in run_cli("import-flows", "--db", db, str(dump)).stdout
    again = run_cli("import-flows", "--db", db, str(dump))
    assert again.returncode == 0 and "already imported as capture 1" in again.stdout and exchanges_in(db) == 3


def test_captures_lists_and_removes_what_the_store_holds(tmp_path):
    db = str(tmp_path / "s.db")
    run_cli(
        "import-har",
        "--db",
        db,
        str(RULE_FIXTURES / "md-307-post-to-get.har"),
        str(RULE_FIXTURES / "st-7-days.har"),
    )
    listed = json.loads(run_cli("captures", "--db", db, "--format", "json").stdout)
    assert [(c["capture_id"], c["source"], os.path.basename(c["file"]), c["exchanges"]) for c in listed] == [
        (1, "har", "md-307-post-to-get.har", 2),
        (2, "har", "st-7-days.har", 4),
    ]
    assert listed[1]["first_at"] < listed[1]["last_at"]  # the time span it covers
    table = run_cli("captures", "--db", db).stdout
    assert "st-7-days.har" in table and "2 captures, 6 exchanges" in table
    assert {f["rule"] for f in json.loads(run_cli("findings", "--db", db, "-f", "json").stdout)} == {
        "method-downgrade",
        "stale-temporary-redirect",
    }

    removed = run_cli("captures", "remove", "2", "--db", db)
    assert removed.stdout.strip() == f"removed capture 2 and their exchanges from {db}"
    assert exchanges_in(db) == 2
    after = run_cli("findings", "--db", db, "-f", "json")
    assert "analyzing it now" in after.stderr
    assert [f["rule"] for f in json.loads(after.stdout)] == ["method-downgrade"]

    missing = run_cli("captures", "remove", "7", "--db", db, env=NO_UV)
    assert missing.returncode == 2
    assert stderr_lines(missing) == [
        f"redirect-audit: error: no capture 7 in {db}; nothing was removed "
        f"(`redirect-audit captures --db {db}` lists them)"
    ]


# ---- a command line users recognise ---------------------------------------------------


@pytest.mark.parametrize(
    "args, error",
    [
        (
            ["findings", "--formt", "json"],
            "Error: No such option '--formt'. (Did you mean one of: '--format', '--host', '--sort'?)",
        ),
        (["analyse"], "Error: No such command 'analyse'. Did you mean 'analyze'?"),
        (
            ["findings", "--format", "xml"],
            "Error: Invalid value for '--format' / '-f': 'xml' is not one of 'table', 'json', 'jsonl', 'sarif', 'junit', "
            "'markdown', 'html'.",
        ),
        (
            ["findings", "--min-severity", "bogus"],
            "Error: Invalid value for '--min-severity': 'bogus' is not one of 'info', 'low', 'medium', 'high'.",
        ),
        (
            ["import-har", "--body-cap", "lots", "x.har"],
            "Error: Invalid value for '--body-cap': 'lots' is not a size (bytes, or a number with KB, MB, GB, KiB, MiB or "
            "GiB)",
        ),
        (["import-har"], "Error: Missing argument 'FILE...'."),
        (
            ["rules", "RA999"],
            "Error: Invalid value for 'RULE': no rule 'RA999'. Did you mean 'RA109'? (`redirect-audit "
            "rules` lists them all)",
        ),
        (["analyze", "--link-window", "-3", "--db", "x.db"], "Error: link window must be > 0 seconds"),
    ],
)
def test_a_usage_mistake_gives_the_usage_line_the_error_and_a_hint(args, error):
    done = run_cli(*args)
    assert done.returncode == 2
    lines = stderr_lines(done)
    usage = (
        "Usage: redirect-audit [OPTIONS] [COMMAND]"
        if args[0] == "analyse"
        else f"Usage: redirect-audit {args[0]} "
    )
    assert lines[0].startswith(usage)
    assert lines[1].startswith("Try 'redirect-audit") and lines[1].endswith("--help' for help.")
    assert lines[-1] == error
    assert "internal error" not in done.stderr and "Traceback" not in done.stderr
    assert done.stdout == ""


def test_no_arguments_prints_the_help_and_exits_0():
    done = run_cli()
    assert done.returncode == 0 and done.stderr == ""
    assert done.stdout.startswith("Usage: redirect-audit [OPTIONS] [COMMAND] [ARGS]...")
    for command in ("import-har", "findings", "check", "captures", "proxy", "demo"):
        assert f"\n  {command} " in done.stdout


def test_version():
    from analyzer import __version__

    done = run_cli("--version")
    assert done.returncode == 0 and done.stdout == f"redirect-audit {__version__}\n"


@pytest.mark.parametrize("name", ["RA102", "ra102", "dropped-body"])
def test_rules_shows_one_rule_by_id_or_slug(name):
    from analyzer.detectors import RULES

    done = run_cli("rules", name)
    assert done.returncode == 0
    assert done.stdout.startswith(
        "RA102 dropped-body (default severity high)\nFix: Clients re-send the body on 307/308 "
    )
    assert "RA101" not in done.stdout
    rule = next(r for r in RULES if r.id == "RA102")
    for line in rule.doc.strip().splitlines():  # the documentation as written, not re-wrapped
        assert line in done.stdout.splitlines()


def test_a_dash_reads_the_capture_from_stdin(tmp_path):
    db = str(tmp_path / "s.db")
    har = (RULE_FIXTURES / "md-307-post-to-get.har").read_text()
    done = run_cli("import-har", "-", "--db", db, input=har)
    assert done.returncode == 0 and done.stdout == "imported 2 entries from <stdin> as capture 1\n"
    listed = json.loads(run_cli("captures", "--db", db, "-f", "json").stdout)
    assert listed[0]["file"] == "<stdin>"
    again = run_cli("import-har", "--db", db, str(RULE_FIXTURES / "md-307-post-to-get.har"))
    assert "already imported as capture 1" in again.stdout  # the same content, by any way in
    assert not list(tmp_path.glob("-*")) and not (ROOT / "-").exists()


def test_output_files_and_dash_for_stdout(tmp_path, demo_db):
    for command in (["findings", "-f", "json"], ["chains", "-f", "json"], ["clients", "-f", "json"]):
        target = tmp_path / f"{command[0]}.json"
        done = run_cli(*command, "--db", demo_db, "-o", str(target))
        assert done.returncode == 0, done.stderr
        to_stdout = run_cli(*command, "--db", demo_db, "-o", "-")
        assert json.loads(target.read_text()) == json.loads(to_stdout.stdout) != []
    assert not (tmp_path / "-").exists() and not (ROOT / "-").exists()


def test_piped_output_is_never_wrapped_coloured_or_highlighted(tmp_path):
    db = str(tmp_path / "s.db")
    har = json.loads((RULE_FIXTURES / "md-307-post-to-get.har").read_text())
    long_path = "/v1/" + "segment-2026/" * 12 + "orders"
    for entry in har["log"]["entries"]:
        entry["request"]["url"] = (
            entry["request"]["url"].replace("/b", long_path).replace("/a", long_path + "x")
        )
        for h in entry["response"]["headers"]:
            if h["name"].lower() == "location":
                h["value"] = h["value"].replace("/b", long_path)
    (tmp_path / "long2026.har").write_text(json.dumps(har))
    run_cli("import-har", "--db", db, str(tmp_path / "long2026.har"))
    for command in (["findings"], ["chains"], ["check"], ["rules"], ["captures"]):
        done = run_cli(*command, "--db", db) if command != ["rules"] else run_cli("rules")
        assert not ANSI.search(done.stdout), command
        if command in (["findings"], ["chains"], ["check"]):
            assert any(long_path in line and len(line) > 120 for line in done.stdout.splitlines()), command
    coloured = run_cli("findings", "--db", db, env={"FORCE_COLOR": "1", "NO_COLOR": ""})
    assert ANSI.search(coloured.stdout) and any(long_path in line for line in coloured.stdout.splitlines())
    plain = run_cli("findings", "--db", db, env={"FORCE_COLOR": "1", "NO_COLOR": "1"})
    assert not ANSI.search(plain.stdout)


def test_a_closed_pipe_ends_quietly():
    proc = subprocess.Popen(
        [sys.executable, "-m", "analyzer", "rules"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT
    )
    proc.stdout.close()  # like `| head` that has read what it wanted
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 141
    assert err == b""


# ---- errors from the store -----------------------------------------------------------


def test_a_locked_store_is_one_line_per_file_and_nothing_is_stored(tmp_path):
    db = str(tmp_path / "s.db")
    run_cli("import-har", "--db", db, str(RULE_FIXTURES / "bg-303-clean.har"))
    holder = sqlite3.connect(db)
    holder.execute("BEGIN IMMEDIATE")  # another process holding the write lock
    try:
        files = [str(RULE_FIXTURES / "md-307-post-to-get.har"), str(RULE_FIXTURES / "db-307-empty.har")]
        done = run_cli("import-har", "--db", db, "--wait", "0.5", *files)
        assert done.returncode == 2
        assert stderr_lines(done) == [
            f"redirect-audit: error: {f}: store busy: another process holds the write lock on {db}; "
            "waited 0.5 s (--wait SECONDS to wait longer)"
            for f in files
        ]
        busy = run_cli("findings", "--db", db, "--wait", "0.2")  # must analyze, so must write
        assert busy.returncode == 2 and stderr_lines(busy)[-1].startswith(
            "redirect-audit: error: store busy:"
        )
    finally:
        holder.rollback()
        holder.close()
    assert exchanges_in(db) == 2


def test_a_missing_database_driver_names_what_to_install(tmp_path):
    done = run_cli("findings", "--db", "mysql://auditor:s3cret@127.0.0.1/audit")
    assert done.returncode == 2
    [line] = stderr_lines(done)
    assert line.startswith(
        "redirect-audit: error: cannot open store mysql://auditor:***@127.0.0.1/audit: its "
        "database driver is not installed"
    )
    assert "s3cret" not in done.stderr
    pg = run_cli(
        "import-har", "--db", "postgresql://u@127.0.0.1:1/x", str(RULE_FIXTURES / "bg-303-clean.har")
    )
    if "driver is not installed" in pg.stderr:  # without the postgres extra
        assert "`uv sync --extra postgres`" in pg.stderr and pg.returncode == 2


def test_a_file_that_fails_for_any_reason_is_named_and_the_others_still_import(tmp_path):
    db = str(tmp_path / "s.db")
    broken = tmp_path / "a.har"  # a byte that is not UTF-8 inside a string: the JSON decoder fails on it
    entry = json.loads((RULE_FIXTURES / "bg-303-clean.har").read_text())["log"]["entries"][0]
    entry["request"]["url"] = "https://h.test/a-XX-b"
    broken.write_bytes(
        json.dumps({"log": {"version": "1.2", "entries": [entry]}}).encode().replace(b"-XX-", b"\xff")
    )
    good = RULE_FIXTURES / "md-307-post-to-get.har"
    done = run_cli("import-har", "--db", db, str(broken), str(good))
    assert done.returncode == 2
    [line] = stderr_lines(done)
    assert line == (
        f"redirect-audit: error: {broken}: a string in it is not valid UTF-8 (invalid start byte): raw "
        "bytes that are not UTF-8, or an escaped lone surrogate such as \\ud800"
    )
    assert f"imported 2 entries from {good}" in done.stdout
    assert exchanges_in(db) == 2


def test_a_bug_that_one_file_trips_costs_that_file_only(tmp_path, monkeypatch, capsys):
    """Fault injection: the converter fails on one file as an unforeseen bug would."""
    from analyzer import cli
    from analyzer.ingest import har

    convert = har._HarEntries.convert

    def fails_on_one_file(self, index, entry):
        if self.name.endswith("md-307-post-to-get.har"):
            raise KeyError("startedDateTime")
        return convert(self, index, entry)

    monkeypatch.setattr(har._HarEntries, "convert", fails_on_one_file)
    monkeypatch.delenv("REDIRECT_AUDIT_DEBUG", raising=False)
    db = str(tmp_path / "s.db")
    first, second = str(RULE_FIXTURES / "md-307-post-to-get.har"), str(RULE_FIXTURES / "db-307-empty.har")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["import-har", "--db", db, "--workers", "0", first, second])
    assert exit_.value.code == 2
    out, err = capsys.readouterr()
    assert err == (
        f"redirect-audit: error: {first}: not imported: internal error: KeyError: 'startedDateTime' "
        "(set REDIRECT_AUDIT_DEBUG=1 for the traceback)\n"
    )
    assert (
        out == f"imported 2 entries from {second} as capture 1\n"
    )  # the failed one left nothing, not even its id
    assert exchanges_in(db) == 2


def test_a_value_the_database_refuses_names_the_column_the_file_and_the_entry(tmp_path, monkeypatch, capsys):
    """Fault injection: the converter hands the store text that is not Unicode, as a
    future bug could; the database refuses it, and the message must still say where."""
    from analyzer import cli
    from analyzer.ingest import har

    convert = har._HarEntries.convert

    def bad_url_for_entry_1(self, index, entry):
        ex = convert(self, index, entry)
        if index == 1:
            ex.url = "https://h.test/\udce9"
        return ex

    monkeypatch.setattr(har._HarEntries, "convert", bad_url_for_entry_1)
    db = str(tmp_path / "s.db")
    path = str(RULE_FIXTURES / "md-307-post-to-get.har")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["import-har", "--db", db, "--workers", "0", path])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"redirect-audit: error: {path}: entry 1: the store refused column url: text with a lone "
        "surrogate, which is not Unicode"
    )
    assert exchanges_in(db) == 0


# ---- hints that work -----------------------------------------------------------------


def test_the_demo_hint_names_the_store_it_wrote_and_runs(tmp_path):
    done = run_cli("demo", "--db", str(tmp_path / "my demo.db"), env=NO_UV)
    hint = done.stdout.strip().splitlines()[-1]
    assert hint.startswith("Explore it: redirect-audit chains --db ")
    first = shlex.split(hint.removeprefix("Explore it: ").split("|")[0])
    assert first[:2] == ["redirect-audit", "chains"]
    followed = run_cli(*first[1:])
    assert followed.returncode == 0 and "chain 1" in followed.stdout
    under_uv = run_cli("demo", "--db", str(tmp_path / "d.db"), env={"UV_RUN_RECURSION_DEPTH": "1"})
    assert "Explore it: uv run redirect-audit chains --db " in under_uv.stdout


# ---- a redirect nobody followed reads as one, everywhere ------------------------------


def test_an_unfollowed_redirect_reads_as_one_in_every_output(tmp_path):
    db = str(tmp_path / "s.db")
    run_cli(
        "import-har",
        "--db",
        db,
        str(RULE_FIXTURES / "lw-put-307.har"),
        str(RULE_FIXTURES / "ml-no-header.har"),
    )
    records = {f["rule"]: f for f in json.loads(run_cli("findings", "--db", db, "-f", "json").stdout)}
    lost = records["lost-write"]
    assert (lost["followed"], lost["method_after"], lost["to_url"]) == (
        False,
        None,
        "https://api2.test/doc/1",
    )
    assert lost["from_url"] != lost["to_url"]
    assert (records["missing-location"]["followed"], records["missing-location"]["to_url"]) == (False, None)

    expected = "PUT https://api.test/doc/1 → 307 → not followed (Location https://api2.test/doc/1)"
    assert expected in run_cli("findings", "--db", db).stdout
    assert (
        "GET https://www.test/a → 302 → not followed (no Location)" in run_cli("findings", "--db", db).stdout
    )
    assert f"NEW medium RA113 lost-write: {expected}" in run_cli("check", "--db", db).stdout
    assert (
        "| 307 → not followed (Location https://api2.test/doc/1) |"
        in run_cli("findings", "--db", db, "-f", "markdown").stdout
    )
    sarif = json.loads(run_cli("findings", "--db", db, "-f", "sarif").stdout)
    assert any(
        expected in r["message"]["text"] and r["properties"]["followed"] is False
        for r in sarif["runs"][0]["results"]
    )
    junit = ET.fromstring(run_cli("findings", "--db", db, "-f", "junit").stdout)
    assert any(expected in (f.text or "") for f in junit.iter("failure"))
    chains = json.loads(run_cli("chains", "--db", db, "-f", "json").stdout)
    assert [(h["followed"], h["to"]) for c in chains for h in c["hops"]] == [(False, None), (False, None)]
    html = tmp_path / "report.html"
    assert run_cli("findings", "--db", db, "-f", "html", "-o", str(html)).returncode == 0
    hops = [
        re.sub(r"<[^>]+>", "", h.split("</div>", 1)[0])
        for h in html.read_text().split('<div class="hop">')[1:]
    ]
    assert any(h.endswith("→ 307 → not followed (Location https://api2.test/doc/1)") for h in hops), hops


def test_a_followed_hop_still_reads_as_a_hop(demo_db):
    records = json.loads(run_cli("findings", "--db", demo_db, "-f", "json").stdout)
    stale = [f for f in records if f["rule"] == "stale-temporary-redirect"]
    assert stale and all(f["followed"] is True and f["method_after"] == "GET" for f in stale)
    assert all(f["followed"] is True for f in records if f["rule"] == "method-downgrade")


# ---- proxy owns its options ------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, said",
    [
        (
            ["--listen-port", "9999"],
            "--listen-port is set by redirect-audit proxy; give it as proxy's -p/--port",
        ),
        (
            ["--", "--listen-host", "127.0.0.2"],
            "--listen-host is set by redirect-audit proxy; give it as proxy's "
            "--listen-host (before any mitmproxy option)",
        ),
        (
            ["--set", "listen_port=9999"],
            "--set listen_port is set by redirect-audit proxy; give it as proxy's -p/--port",
        ),
        (
            ["--set", "redirect_audit_db=other.db"],
            "--set redirect_audit_db is set by redirect-audit proxy; give it as proxy's --db",
        ),
        (
            ["--set", "redirect_audit_spool=elsewhere"],
            "--set redirect_audit_spool is set by redirect-audit proxy; give it as proxy's --spool-dir",
        ),
        (
            ["-s", str(ROOT / "addons" / "redirect_recorder.py")],
            "-s: the recorder addon is already loaded by redirect-audit proxy; loaded twice, it would record every exchange "
            "twice",
        ),
    ],
)
def test_proxy_refuses_pass_through_options_that_contradict_its_own(tmp_path, extra, said):
    done = run_cli("proxy", "--db", str(tmp_path / "p.db"), "-p", "0", *extra, timeout=60)
    assert done.returncode == 2
    assert stderr_lines(done) == [f"redirect-audit: error: {said}"]
    assert done.stdout == ""  # refused before any banner


def test_spool_dir_reaches_the_recorder_from_proxy_and_run(tmp_path):
    from analyzer.proxy import ProxyPlan
    from analyzer.session import Recording

    where = tmp_path / "spool here"
    plan = ProxyPlan(db_url="sqlite:///x.db", spool_dir=str(where))
    assert f"redirect_audit_spool={where}" in plan.argv()
    recording = Recording(db_url="sqlite:///x.db", workdir=tmp_path, spool_dir=str(where))
    assert f"redirect_audit_spool={where}" in recording.plan().argv()
    assert not any("redirect_audit_spool" in a for a in ProxyPlan(db_url="sqlite:///x.db").argv())


def test_proxy_on_a_busy_port_or_an_unusable_store_says_so_before_any_banner(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_cli("proxy", "--db", str(tmp_path / "p.db"), "-p", str(port), timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert stderr_lines(done) == [
        f"redirect-audit: error: port {port} is already in use on 127.0.0.1 (another "
        "proxy?); choose another with -p PORT"
    ]
    nowhere = run_cli("proxy", "--db", str(tmp_path / "no" / "such" / "dir" / "p.db"), "-p", "0", timeout=60)
    assert nowhere.returncode == 2 and nowhere.stdout == ""
    [line] = stderr_lines(nowhere)
    assert (
        line.startswith(f"redirect-audit: error: cannot open store {tmp_path / 'no'}")
        and "unable to open" in line
    )


def test_an_import_of_files_that_cannot_be_read_creates_no_store(tmp_path):
    db = tmp_path / "new.db"
    done = run_cli("import-har", "--db", str(db), str(tmp_path / "missing.har"), str(tmp_path))
    assert done.returncode == 2
    assert stderr_lines(done) == [
        f"redirect-audit: error: {tmp_path / 'missing.har'}: cannot read: No such file or directory",
        f"redirect-audit: error: {tmp_path}: is a directory, not a capture file",
    ]
    assert not db.exists()
