"""`chains` draws each chain as a tree: written as plain text into a file or a pipe (rich's
rendering of a thousand chains took a second), through rich with colour; both say the same
words, and text from a capture that looks like markup is shown as it is."""

from __future__ import annotations

import json
import re

from conftest import RULE_FIXTURES, corpus_store, run_cli

from analyzer.report import chain_records, header_changes

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def test_the_plain_and_the_coloured_tree_say_the_same(tmp_path):
    har = json.loads((RULE_FIXTURES / "md-307-post-to-get.har").read_text())
    for entry in har["log"]["entries"]:  # a capture's text that rich would read as markup
        entry["request"]["url"] = entry["request"]["url"] + "?q=[red]x[/]"
    path = tmp_path / "markup.har"
    path.write_text(json.dumps(har))
    db = str(tmp_path / "m.db")
    assert run_cli("import-har", str(path), "--db", db).returncode == 0
    plain = run_cli("chains", "--db", db)
    coloured = run_cli("chains", "--db", db, env={"FORCE_COLOR": "1"})
    assert plain.returncode == coloured.returncode == 0, plain.stderr + coloured.stderr
    assert "\x1b[" in coloured.stdout and "\x1b[" not in plain.stdout
    assert ANSI.sub("", coloured.stdout) == plain.stdout
    lines = plain.stdout.splitlines()
    assert lines[0].startswith("chain ") and lines[1].startswith("└── ")
    assert lines[2].startswith("    └── not-followed") and "?q=[red]x[/]" in lines[1]


def test_chains_v_shows_each_hop_s_headers_the_changes_and_the_finding_s_evidence(tmp_path):
    db = str(tmp_path / "cd.db")
    assert (
        run_cli("import-har", str(RULE_FIXTURES / "cd-api-key-same-origin.har"), "--db", db).returncode == 0
    )
    done = run_cli("chains", "--db", db, "-v")
    assert done.returncode == 0, done.stderr
    key = json.loads(run_cli("chains", "--db", db, "-f", "json", "-v").stdout)[0]["hops"][0]["from"][
        "request_headers"
    ][1][1]
    assert key.startswith("hmac:")  # stored as a keyed fingerprint, shown as one
    assert done.stdout.splitlines()[2:] == [
        "    ├── → GET https://api.test/items · 200  body: not captured · linked same-connection (1.00)",
        "    ├── request headers (the follow-up's where they differ: + added, - dropped, ~ changed):",
        "    ├──   User-Agent: fixture-client/1",
        f"    ├── - X-Api-Key: {key} (keyed fingerprint)   <- RA115 credential-dropped",
        "    ├── response headers of the 308:",
        "    └──   Location: https://api.test/items",
    ]
    plain = run_cli("chains", "--db", db)  # without -v: no header lines
    assert "request headers" not in plain.stdout and "X-Api-Key" not in plain.stdout


def test_chains_json_v_carries_the_headers_their_changes_and_the_evidence(tmp_path):
    db = str(tmp_path / "cd.db")
    assert (
        run_cli("import-har", str(RULE_FIXTURES / "cd-api-key-same-origin.har"), "--db", db).returncode == 0
    )
    (chain,) = json.loads(run_cli("chains", "--db", db, "-f", "json", "-v").stdout)
    (hop,) = chain["hops"]
    assert [name for name, _ in hop["from"]["request_headers"]] == ["User-Agent", "X-Api-Key"]
    assert hop["to"]["request_headers"] == [["User-Agent", "fixture-client/1"]]
    assert hop["from"]["response_headers"] == [["Location", "https://api.test/items"]]
    assert hop["header_changes"] == [
        {"change": "-", "name": "X-Api-Key", "value": hop["from"]["request_headers"][1][1]}
    ]
    assert hop["evidence"] == [{"rule_id": "RA115", "rule": "credential-dropped", "headers": ["x-api-key"]}]
    (lean,) = json.loads(run_cli("chains", "--db", db, "-f", "json").stdout)
    assert "request_headers" not in lean["hops"][0]["from"] and "header_changes" not in lean["hops"][0]


def test_header_changes_by_name_whatever_the_case_and_repeated_headers():
    before = [["Accept", "*/*"], ["Cookie", "a"], ["Cookie", "b"], ["X-Token", "t1"], ["Origin", "o"]]
    after = [["accept", "*/*"], ["Cookie", "b"], ["x-token", "t2"], ["Referer", "r"], ["Cookie", "c"]]
    assert header_changes(before, after) == [
        {"change": "-", "name": "Cookie", "value": "a"},
        {"change": "+", "name": "Cookie", "value": "c"},
        {"change": "~", "name": "x-token", "before": "t1", "after": "t2"},
        {"change": "-", "name": "Origin", "value": "o"},
        {"change": "+", "name": "Referer", "value": "r"},
    ]
    assert header_changes(before, None) == [] and header_changes(None, after) == []


def test_chains_read_by_id_are_those_of_the_whole_read_with_their_headers(tmp_path, monkeypatch):
    """The HTML report reads only its findings' chains, by id in chunks: each must be the
    same record as in the whole read, headers, changes and evidence included."""
    import analyzer.report
    from analyzer.analysis import analyze
    from analyzer.storeread import open_reader

    store = corpus_store(tmp_path / "corpus.db")
    analyze(store)
    store.close()
    monkeypatch.setattr(analyzer.report, "CHAIN_CHUNK", 3)  # several chunks, one cut mid-list
    with open_reader(str(tmp_path / "corpus.db")) as reader:
        everything = {c["chain_id"]: c for c in chain_records(reader, headers=True)}
        wanted = [*sorted(everything)[1::4], 10**9]  # and an id no chain has
        some = chain_records(reader, headers=True, chain_ids=wanted)
        lean = chain_records(reader, chain_ids=wanted[:5])
    assert len(everything) > 40 and [c["chain_id"] for c in some] == [c for c in everything if c in wanted]
    assert some == [everything[c["chain_id"]] for c in some]
    assert any(hop["evidence"] for c in some for hop in c["hops"])
    assert "request_headers" not in lean[0]["hops"][0]["from"] and len(lean) == 5
