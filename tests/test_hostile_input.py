"""Input that used to take the importer down, and capture text that used to steer the terminal.

Each file here is small and hostile; each must end in a clean import or in exit status 2
with one line naming the file and the problem, with nothing stored, within a bounded
amount of memory (measured on the importing process itself).
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import RULE_FIXTURES, run_cli, wait_until

pytestmark = pytest.mark.slow

MEMORY_BOUND = 200 << 20  # bytes of peak RSS for any input under 1 MB (issue 17)
DEEP = 100_000
ENTRY = {
    "startedDateTime": "2026-01-01T00:00:00Z",
    "request": {"method": "GET", "url": "https://h.test/a", "headers": []},
    "response": {"status": 200, "headers": []},
}


def measured(args: list[str], cwd: Path) -> tuple[int, str, str, int]:
    """Run the CLI from a fresh interpreter that reports its child's peak RSS."""
    code = (
        "import resource, subprocess, sys, json\n"
        "p = subprocess.run([sys.executable, '-m', 'analyzer', *sys.argv[1:]], capture_output=True, text=True,"
        " stdin=subprocess.DEVNULL)\n"
        "print(json.dumps([p.returncode, p.stdout, p.stderr,"
        " resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd, timeout=180
    )
    return tuple(json.loads(done.stdout))


def write_deep_har(path: Path, where: str) -> None:
    deep = "[" * DEEP + "]" * DEEP
    entry = json.dumps(ENTRY)
    text = {
        "head": '{"x": ' + deep + ', "log": {"version": "1.2", "entries": [' + entry + "]}}",
        "entries": '{"log": {"version": "1.2", "entries": [' + deep + "]}}",
        "unread field": '{"log": {"version": "1.2", "entries": [' + entry[:-1] + ', "_x": ' + deep + "}]}}",
        "read field": '{"log": {"version": "1.2", "entries": ['
        + entry.replace('"https://h.test/a"', deep)
        + "]}}",
        "after entries": '{"log": {"version": "1.2", "entries": [' + entry + '], "pages": ' + deep + "}}",
    }[where]
    path.write_text(text)


@pytest.mark.parametrize("where", ["head", "entries", "unread field", "read field", "after entries"])
def test_deep_nesting_is_refused_naming_the_file_within_bounded_memory(tmp_path, where):
    har = tmp_path / "deep.har"
    write_deep_har(har, where)
    assert har.stat().st_size < 1 << 20
    code, out, err, peak = measured(["import-har", str(har), "--db", str(tmp_path / "s.db")], tmp_path)
    assert code == 2, (out, err)
    assert err.strip() == (
        f"redirect-audit: error: {har}: nested more than 64 levels deep "
        f"{err.split('deep ', 1)[1].split(')')[0]}); no HAR file is, so it is refused"
    )
    assert peak < MEMORY_BOUND, f"peak RSS {peak >> 20} MB"
    db = tmp_path / "s.db"
    assert not db.exists() or sqlite3.connect(db).execute("select count(*) from exchanges").fetchone()[0] == 0


def test_nesting_up_to_the_limit_is_fine(tmp_path):
    har = tmp_path / "ok.har"
    entry = dict(ENTRY, _x="[" * 50 + "]" * 50)
    entry["_y"] = json.loads("[" * 55 + "]" * 55)
    har.write_text(json.dumps({"log": {"version": "1.2", "entries": [entry]}}))
    assert run_cli("import-har", str(har), "--db", str(tmp_path / "s.db")).returncode == 0


@pytest.mark.parametrize(
    "text, said",
    [
        ('{"log": {"version": "1.2", "entries": [], "entries": [ENTRY]}}', "log holds 'entries' twice"),
        (
            '{"log": {"version": "1.2", "entries": [ENTRY]}, "log": {"entries": []}}',
            "the document holds 'log' twice",
        ),
    ],
)
def test_a_repeated_log_or_entries_key_is_refused_never_read_as_empty(tmp_path, text, said):
    har = tmp_path / "twice.har"
    har.write_text(text.replace("ENTRY", json.dumps(ENTRY)))
    for workers in ("0", "2"):
        done = run_cli("import-har", str(har), "--db", str(tmp_path / "s.db"), "--workers", workers)
        assert done.returncode == 2
        assert done.stderr.strip() == (
            f"redirect-audit: error: {har}: {said}; JSON readers disagree on which "
            "counts, so the file is refused (keep one)"
        )


def test_metadata_past_the_head_limit_is_named_as_such(tmp_path, monkeypatch):
    from analyzer.ingest import ImportError_, import_har
    from analyzer.ingest import har as har_module
    from analyzer.store import open_store

    monkeypatch.setattr(har_module, "HEAD_SCAN_LIMIT", 1 << 16)
    path = tmp_path / "fat.har"
    path.write_text(json.dumps({"log": {"version": "1.2", "comment": "c" * 200_000, "entries": [ENTRY]}}))
    with pytest.raises(
        ImportError_, match=r"fat.har: no log.entries array in its first 0 MB: metadata that large"
    ):
        import_har(open_store(str(tmp_path / "s.db")), path)


# ---- flow dumps -------------------------------------------------------------------------------


def test_a_record_length_beyond_the_file_is_refused_before_anything_is_allocated(tmp_path):
    dump = tmp_path / "huge.mitm"
    dump.write_bytes(b"999999999999:" + b"x" * 100)
    code, _out, err, peak = measured(["import-flows", str(dump), "--db", str(tmp_path / "s.db")], tmp_path)
    assert code == 2
    assert err.strip() == (
        f"redirect-audit: error: {dump}: damaged mitmproxy flow dump: a record of 999999999999 "
        "bytes where 100 remain (truncated, or not a flow dump)"
    )
    assert peak < MEMORY_BOUND


def test_a_deeply_nested_record_is_refused_before_mitmproxy_parses_it(tmp_path):
    data = b"0:]"
    for _ in range(50_000):
        data = str(len(data)).encode() + b":" + data + b"]"
    dump = tmp_path / "deep.mitm"
    dump.write_bytes(data)
    code, _out, err, peak = measured(["import-flows", str(dump), "--db", str(tmp_path / "s.db")], tmp_path)
    assert code == 2
    assert err.strip() == (
        f"redirect-audit: error: {dump}: a record nested more than 64 levels deep; no flow is, "
        "so the file is refused"
    )
    assert peak < MEMORY_BOUND


def test_a_64_digit_timestamp_in_a_flow_is_stored_as_a_number_and_warned_about(tmp_path):
    from mitmproxy.io import tnetstring
    from mitmproxy.test import tflow

    state = tflow.tflow(resp=True).get_state()
    state["request"]["timestamp_start"] = int("9" * 64)
    dump = tmp_path / "bigint.mitm"
    dump.write_bytes(tnetstring.dumps(state))
    db = tmp_path / "s.db"
    done = run_cli("import-flows", str(dump), "--db", str(db))
    assert done.returncode == 0, done.stderr
    assert f"redirect-audit: warning: {dump}: 1 of its flows dated outside 1677-2262" in done.stderr
    assert sqlite3.connect(db).execute("select started_at from exchanges").fetchone()[0] == float("9" * 64)
    assert run_cli("chains", "--db", str(db), "-f", "json").returncode == 0


# ---- dates out of range -------------------------------------------------------------------------


def test_dates_no_report_can_place_are_kept_and_every_output_still_works(tmp_path):
    def entry(at, url, status=200, location=None, method="GET"):
        headers = [{"name": "Location", "value": location}] if location else []
        return {
            "startedDateTime": at,
            "request": {"method": method, "url": url, "headers": []},
            "response": {"status": status, "headers": headers},
        }

    har = tmp_path / "dates.har"
    har.write_text(
        json.dumps(
            {
                "log": {
                    "version": "1.2",
                    "entries": [
                        entry("9999-12-31T23:59:59-14:00", "https://h.test/a", 302, "/b"),
                        entry("9999-12-31T23:59:59-14:00", "https://h.test/b"),
                        entry("1500-01-01T00:00:00Z", "https://h.test/c", 307, "/d", "POST"),
                        entry("1500-01-01T00:00:01Z", "https://h.test/d"),
                    ],
                }
            }
        )
    )
    db = str(tmp_path / "d.db")
    done = run_cli("import-har", str(har), str(RULE_FIXTURES / "md-307-post-to-get.har"), "--db", db)
    assert done.returncode == 0
    assert (
        f"redirect-audit: warning: {har}: 4 of its entries dated outside 1677-2262, which reports and frames "
        "cannot place on a timeline; kept as given: entry 0 (year ~10000)"
    ) in done.stderr
    for args in (
        ["findings"],
        ["findings", "-f", "json"],
        ["findings", "-f", "sarif"],
        ["findings", "-f", "junit"],
        ["findings", "-f", "markdown"],
        ["chains"],
        ["chains", "-f", "json"],
        ["clients"],
        ["captures"],
    ):
        shown = run_cli(*args, "--db", db)
        assert shown.returncode == 0, (args, shown.stderr)
        assert "Traceback" not in shown.stderr and "error" not in shown.stderr, args
    gate = run_cli("check", "--db", db)
    assert gate.returncode == 1 and "RA101" in gate.stdout  # the gate still judges: exit 1, not 2
    report = tmp_path / "r.html"
    html = run_cli("findings", "-f", "html", "-o", str(report), "--db", db)
    assert html.returncode == 0 and report.stat().st_size > 10_000 and "Warning" not in html.stderr
    records = json.loads(run_cli("findings", "-f", "json", "--db", db).stdout)
    assert {r["observed_at"] for r in records if r["capture"]["file"].endswith("dates.har")} == {
        "1500-01-01T00:00:01Z"
    }  # a year a calendar date can say
    chains = json.loads(run_cli("chains", "-f", "json", "--db", db).stdout)
    assert sorted(c["started_at"] or "none" for c in chains)[-1] == "none"  # year 10000: none can

    from analyzer import frames

    assert frames.exchanges(db)["started"].isna().sum() == 4
    assert len(frames.hops(db)) == 3 and len(frames.findings(db)) == len(records)


# ---- capture text that would steer a terminal --------------------------------------------------

ESCAPES = "\x1b]0;pwned\x07\x1b[2J\x9b31m"


def test_control_characters_from_a_capture_never_reach_the_terminal_raw(tmp_path):
    har = tmp_path / "esc.har"
    har.write_text(
        json.dumps(
            {
                "log": {
                    "version": "1.2",
                    "entries": [
                        {
                            "startedDateTime": "2026-01-01T00:00:00Z",
                            "request": {
                                "method": "PUT",
                                "url": f"https://h.test/a{ESCAPES}<b>bold</b>",
                                "headers": [],
                            },
                            "response": {
                                "status": 307,
                                "headers": [
                                    {"name": "Location", "value": f"/b{ESCAPES}<img src=x onerror=alert(1)>"}
                                ],
                            },
                        },
                    ],
                }
            }
        )
    )
    db = str(tmp_path / "e.db")
    assert run_cli("import-har", str(har), "--db", db).returncode == 0
    for args in (
        ["findings"],
        ["findings", "-f", "json"],
        ["findings", "-f", "jsonl"],
        ["findings", "-f", "sarif"],
        ["chains"],
        ["chains", "-f", "json"],
        ["check"],
        ["clients"],
        ["captures"],
    ):
        shown = run_cli(*args, "--db", db)
        for char in "\x1b\x07\x9b":
            assert char not in shown.stdout + shown.stderr, (args, repr(char))
        coloured = run_cli(
            *args, "--db", db, env={"FORCE_COLOR": "1", "NO_COLOR": ""}
        )  # our own colours only
        for sequence in ("\x1b]0;", "\x1b[2J", "\x07", "\x9b"):
            assert sequence not in coloured.stdout + coloured.stderr, (args, repr(sequence))
    assert "\\x1b]0;pwned\\x07" in run_cli("findings", "--db", db).stdout  # shown, escaped
    ET.fromstring(
        run_cli("findings", "-f", "junit", "--db", db).stdout
    )  # valid XML whatever the capture holds
    markdown = run_cli("findings", "-f", "markdown", "--db", db).stdout
    assert "<b>" not in markdown and "&lt;b&gt;bold&lt;/b&gt;" in markdown  # the request URL, as sent
    # the Location as a client resolves it (WHATWG: "<", ">" and spaces percent-encoded)
    assert "<img" not in markdown and "%3Cimg%20src=x%20onerror=alert(1)%3E" in markdown


def test_the_live_finding_log_escapes_what_an_upstream_sends(tmp_path):
    from urllib.parse import quote

    from proxyrun import Mitmdump
    from upstream import Upstream

    up = Upstream()
    proxy = Mitmdump(
        tmp_path / "mitm", db=str(tmp_path / "live.db"), extra=["--set", "redirect_audit_link_window=1"]
    )
    try:
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        target = quote(f"/nowhere{ESCAPES}", safe="")
        conn.request("PUT", f"{up.origin}/r/307/esc?to={target}", body=b"x=1")
        conn.getresponse().read()
        conn.close()
        # the link window (1 s) closes: nobody followed the 307, a lost write (asserted below)
        wait_until(lambda: "RA113 lost-write" in proxy.output(), timeout=30)
    finally:
        output = proxy.stop()
        up.close()
    assert "RA113 lost-write" in output and "not followed (Location" in output
    # the Location as a client would resolve it: WHATWG percent-encodes control characters
    assert "/nowhere%1B]0;pwned%07%1B[2J" in output
    for char in "\x1b\x07\x9b":
        assert char not in output, repr(char)


@pytest.mark.parametrize(
    "text, words",
    [
        (
            b'{"log": {"version": "1.2", "entries": [{"request": \x9f }]}}',
            "lexical error: invalid char in json text.",
        ),
        (
            b'{"log": {"version": "1.2", "entries": [ }, { "x" ]}}',
            "parse error: unallowed token at this point in JSON text",
        ),
    ],
)
def test_a_refusal_is_in_words_never_a_bytes_repr(tmp_path, text, words):
    har = tmp_path / "broken.har"
    har.write_bytes(text)
    done = run_cli("import-har", str(har), "--db", str(tmp_path / "b.db"))
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line == f"redirect-audit: error: {har}: not valid JSON: {words}", line
    assert "b'" not in line and "\\x" not in line


# ---- sizes no browser sends (issue 29, item 4) ----------------------------------------------


def har_with(entry: dict) -> str:
    return json.dumps({"log": {"version": "1.2", "entries": [ENTRY, ENTRY, entry]}})


@pytest.mark.parametrize(
    "entry, said",
    [
        (
            {**ENTRY, "request": {**ENTRY["request"], "url": "https://h.test/?q=" + "a" * (2 << 20)}},
            "entry 2: its URL is 2,097,170 characters long, over the limit of 2,097,152 "
            "(2 MiB, the longest URL a browser sends)",
        ),
        (
            {
                **ENTRY,
                "response": {"status": 200, "headers": [{"name": "X-Big", "value": "v" * (300 << 10)}]},
            },
            "entry 2: its response headers hold 307,205 characters, over the limit of 262,144 "
            "(256 KiB, the most a browser accepts in a response's headers)",
        ),
        (
            {**ENTRY, "request": {**ENTRY["request"], "headers": [{"name": "X", "value": ""}] * 2001}},
            "entry 2: its request has 2,001 header fields, over the limit of 2,000",
        ),
    ],
    ids=["url", "header characters", "header fields"],
)
def test_a_url_or_header_block_no_browser_sends_is_refused_naming_entry_and_limit(tmp_path, entry, said):
    har = tmp_path / "big.har"
    har.write_text(har_with(entry))
    db = tmp_path / "s.db"
    for args in (["--workers", "2"], ["--workers", "0"]):
        done = run_cli("import-har", str(har), "--db", str(db), *args)
        assert done.returncode == 2
        assert done.stderr.strip() == f"redirect-audit: error: {har}: {said}"
    assert sqlite3.connect(db).execute("select count(*) from exchanges").fetchone()[0] == 0


def test_a_flow_with_a_url_past_the_limit_is_refused_naming_the_flow(tmp_path):
    from mitmproxy.io import tnetstring
    from mitmproxy.test import tflow

    fine = tflow.tflow(resp=True).get_state()
    huge = tflow.tflow(resp=True)
    huge.request.path = "/?q=" + "a" * (2 << 20)
    dump = tmp_path / "huge-url.mitm"
    dump.write_bytes(tnetstring.dumps(fine) + tnetstring.dumps(huge.get_state()))
    done = run_cli("import-flows", str(dump), "--db", str(tmp_path / "s.db"))
    assert done.returncode == 2
    assert done.stderr.strip().startswith(f"redirect-audit: error: {dump}: flow 1: its URL is 2,097,")
    assert "over the limit of 2,097,152 (2 MiB" in done.stderr


def test_a_url_at_the_limit_imports_and_every_command_reads_it(tmp_path):
    url = "https://h.test/?q="
    url += "a" * ((2 << 20) - len(url))
    har = tmp_path / "at-limit.har"
    har.write_text(har_with({**ENTRY, "request": {**ENTRY["request"], "url": url}}))
    db = tmp_path / "s.db"
    assert run_cli("import-har", str(har), "--db", str(db)).returncode == 0
    for command in ("analyze", "chains", "findings"):
        done = run_cli(command, "--db", str(db))
        assert done.returncode == 0, (command, done.stderr)


def calls_to_analyze(tmp_path: Path, name: str, entries: list[dict]) -> int:
    """Python calls `analyze` makes on a store of these entries: work, counted exactly."""
    import cProfile
    import pstats

    from analyzer.analysis import analyze
    from analyzer.ingest import import_har
    from analyzer.store import open_store

    har = tmp_path / f"{name}.har"
    har.write_text(json.dumps({"log": {"version": "1.2", "entries": entries}}))
    store = open_store(str(tmp_path / f"{name}.db"))
    import_har(store, har)
    profile = cProfile.Profile()
    profile.runcall(analyze, store, full=True)
    return pstats.Stats(profile).total_calls


def test_identical_redirects_and_writes_cost_what_ordinary_traffic_costs(tmp_path):
    """3,000 identical POST 307 -> POST pairs at one instant (every follow-up a candidate
    for every redirect) used to join into 9 million rows; the work must stay near-linear."""
    at = "2026-03-01T12:00:00Z"
    body = {"mimeType": "application/json", "text": '{"amount": 5}'}

    def entry(method, url, status, location=None, when=at):
        headers = [{"name": "Location", "value": location}] if location else []
        request = {"method": method, "url": url, "headers": []}
        if method == "POST":
            request["postData"] = body
        return {
            "startedDateTime": when,
            "request": request,
            "response": {"status": status, "headers": headers},
        }

    n = 1_500
    identical = []
    for _ in range(n):
        identical += [
            entry("POST", "https://h.test/pay", 307, "/v2/pay"),
            entry("POST", "https://h.test/v2/pay", 201),
        ]
    ordinary = []
    for i in range(n):
        when = f"2026-03-01T12:{i // 60 % 60:02d}:{i % 60:02d}Z"
        ordinary += [
            entry("POST", f"https://h.test/pay/{i}", 307, f"/v2/pay/{i}", when),
            entry("POST", f"https://h.test/v2/pay/{i}", 201, when=when),
        ]
    hostile, usual = (
        calls_to_analyze(tmp_path, "identical", identical),
        calls_to_analyze(tmp_path, "ordinary", ordinary),
    )
    assert hostile < 2 * usual, (hostile, usual)
