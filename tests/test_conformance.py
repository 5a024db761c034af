"""`clients` answers from plain SQL (analyzer.conformance) without pandas, and says what the
pandas frames say hop by hop on the corpus and every rule fixture."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import corpus_store, run_cli

from analyzer import frames
from analyzer.conformance import body_change, client_rows, tally
from analyzer.storeread import open_reader


@pytest.fixture(scope="module")
def corpus_db(tmp_path_factory: pytest.TempPathFactory) -> str:
    db = tmp_path_factory.mktemp("conformance") / "corpus.db"
    corpus_store(db).engine.dispose()
    assert run_cli("analyze", "--db", str(db)).returncode == 0
    return str(db)


def test_the_table_says_what_the_frames_say_hop_by_hop(corpus_db):
    """frames.hops (pandas, what the figures draw) and the SQL rows are computed apart:
    every (client, status, method) case tallies the same follow-ups."""
    hops = frames.hops(corpus_db)
    with open_reader(corpus_db) as reader:
        rows = client_rows(reader)
    assert len(rows) > 40
    for row in rows:
        case = hops[
            (hops["client_name"] == row["client_name"])
            & (hops["status"] == row["status"])
            & (hops["method_before"] == row["method"])
        ]
        followed = case[case["followed"]]
        assert row["hops"] == len(case) and row["followed"] == len(followed), row
        if len(followed):
            assert Counter(row["did_body"].split(", ")) == Counter(
                tally(list(followed["body_after"])).split(", ")
            ), row
            assert row["cross_origin_hops"] == int(followed["cross_origin"].sum()), row
        assert row["deviated"] == int((case["verdict"] == "deviated").sum()), row
    # every verdict and body outcome the corpus holds shows up somewhere
    assert {"kept", "dropped", "not captured", "none"} <= {
        part.split(" (")[0] for row in rows for part in row["did_body"].split(", ")
    }


def test_a_body_whose_digest_one_side_lacks_is_judged_by_its_length():
    """A frame's missing digest is NaN, which is truthy: it read as a changed body."""
    nan = float("nan")
    assert body_change(True, 10.0, 10.0, "ab" * 32, nan) == "kept"
    assert body_change(True, 10.0, 12.0, "ab" * 32, nan) == "changed"
    assert body_change(True, 10, 10, "ab" * 32, "cd" * 32) == "changed"
    assert body_change(True, 10.0, nan, "ab" * 32, nan) == "not captured"
    assert body_change(True, nan, 5.0, nan, nan) == "added"


def test_clients_answers_without_pandas(corpus_db):
    probe = (
        "import sys\n"
        "from analyzer.__main__ import main\n"
        f"sys.argv = ['redirect-audit', 'clients', '--db', {corpus_db!r}, '-f', 'json']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('pandas' in sys.modules, file=sys.stderr)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=Path(corpus_db).parent
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "False", done.stderr
    assert '"did_method"' in done.stdout
