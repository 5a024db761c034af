"""PostgreSQL and SQLite as equals: values real traffic carries, concurrent creation,
the same answers from both.

The PostgreSQL half runs on the session's throwaway server (conftest.pg_cluster).
"""

from __future__ import annotations

import hashlib
import json
import time

import pytest
import warmcli
from conftest import RULE_FIXTURES, corpus_files, require_corpus, run_cli, start_cli, start_python
from sqlalchemy import select

from analyzer.store import captures, exchanges, meta, open_store

pytestmark = pytest.mark.slow

BIG = 2**33 + 7
NOISE = "".join(
    hashlib.sha256(str(i).encode()).hexdigest() for i in range(200)
)  # 12,800 characters, incompressible


def hostile_values_har(tmp_path):
    """Values SQLite always took and PostgreSQL's old schema refused: sizes past 2**31, a
    40-character method and HTTP version, NUL in a URL and a User-Agent, statuses outside HTTP's."""
    method = "X" * 40
    entries = [
        {
            "startedDateTime": "2026-03-01T12:00:00Z",
            "request": {
                "method": "POST",
                "url": "https://api.test/up\u0000load",
                "httpVersion": "HTTP/1.1" + "1" * 32,
                "headers": [
                    {"name": "User-Agent", "value": "agent\u0000nul"},
                    {"name": "Content-Length", "value": str(BIG)},
                ],
                "bodySize": BIG,
            },
            "response": {
                "status": 307,
                "headers": [{"name": "Location", "value": "/next\u0000"}],
                "bodySize": BIG,
                "content": {"size": BIG, "mimeType": "text/plain"},
            },
        },
        {
            "startedDateTime": "2026-03-01T12:00:01Z",
            "request": {
                "method": method,
                "url": "https://api.test/m",
                "httpVersion": "HTTP/1.1",
                "headers": [],
            },
            "response": {"status": 2**40, "headers": []},
        },
        {
            "startedDateTime": "2026-03-01T12:00:02Z",
            "request": {
                "method": "GET",
                "url": "https://api.test/neg",
                "httpVersion": "HTTP/1.1",
                "headers": [],
            },
            "response": {"status": -5, "headers": []},
        },
        # longer than a PostgreSQL B-tree entry may be (2,704 bytes): a URL, a Location, a page (the client id)
        {
            "startedDateTime": "2026-03-01T12:00:03Z",
            "pageref": NOISE,
            "request": {
                "method": "GET",
                "url": "https://api.test/long?q=" + NOISE,
                "httpVersion": "HTTP/1.1",
                "headers": [],
            },
            "response": {"status": 302, "headers": [{"name": "Location", "value": "/long?r=" + NOISE}]},
        },
    ]
    path = tmp_path / "hostile-values.har"
    path.write_text(
        json.dumps(
            {"log": {"version": "1.2", "creator": {"name": "t\u0000x", "version": "1"}, "entries": entries}}
        )
    )
    return path


def test_values_real_traffic_carries_are_stored_on_both_engines(db_path, tmp_path):
    har = hostile_values_har(tmp_path)
    done = run_cli("import-har", str(har), "--db", db_path)
    assert done.returncode == 0, done.stderr
    assert "imported 4 entries" in done.stdout
    store = open_store(db_path, create=False)
    try:
        with store.begin() as conn:
            rows = conn.execute(
                select(
                    exchanges.c.method,
                    exchanges.c.url,
                    exchanges.c.http_version,
                    exchanges.c.status,
                    exchanges.c.req_body_len,
                    exchanges.c.resp_body_len,
                    exchanges.c.user_agent,
                    exchanges.c.location,
                ).order_by(exchanges.c.seq)
            ).all()
            creator = conn.execute(select(captures.c.creator)).scalar()
    finally:
        store.close()
    first, second, third, long = rows
    assert len(long.url) > 6000 and len(long.location) > 6000
    assert (
        first.url == "https://api.test/up\\x00load"
    )  # NUL written as \x00, like other bytes that are not text
    assert first.user_agent == "agent\\x00nul"
    assert first.location == "/next\\x00"
    assert first.http_version == "HTTP/1.1" + "1" * 32
    assert first.req_body_len == BIG and first.resp_body_len == BIG
    assert second.method == "X" * 40
    assert second.status == 999  # clamped to HTTP's three digits
    assert third.status is None  # a negative status is HAR's "no response"
    assert creator.startswith("t\\x00x")
    chains = json.loads(run_cli("chains", "-f", "json", "--db", db_path).stdout)
    assert chains[0]["hops"][0]["from"]["url"] == "https://api.test/up\\x00load"


def outputs(db: str) -> dict[str, str]:
    return {
        what: run_cli(what, "-f", "json", "--db", db).stdout for what in ("findings", "chains", "clients")
    }


def test_both_engines_give_byte_identical_answers_on_the_corpus_and_every_fixture(tmp_path, request):
    require_corpus()
    files = corpus_files()
    assert len(files) > 100
    pg = request.getfixturevalue("pg_cluster").new_database()
    lite = str(tmp_path / "lite.db")
    key = str(tmp_path / "key")  # one fingerprint key for both, so a secret's fingerprint is the same
    for db in (lite, pg):
        done = run_cli("import-har", *map(str, files), "--db", db, "--key-file", key, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    lite_out, pg_out = outputs(lite), outputs(pg)
    assert len(json.loads(lite_out["findings"])) > 50 and len(json.loads(lite_out["chains"])) > 100
    for what in lite_out:
        assert pg_out[what] == lite_out[what], what


OPEN_AT = """
import sys, time
from analyzer.store import open_store
at = float(sys.argv[2])
while time.time() < at:
    time.sleep(0.001)
store = open_store(sys.argv[1], wait=30)
store.close()
print("ok")
"""


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_many_processes_creating_one_store_at_once_all_get_it(engine, tmp_path, request):
    """Seen before: 7 in 10 failed on PostgreSQL ('relation "meta" already exists'), 10 in 10
    on SQLite (one of two proxies started together exited)."""
    for trial in range(4):
        url = (  # nothing in it: making the schema is what the processes race for
            str(tmp_path / f"race{trial}.db")
            if engine == "sqlite"
            else request.getfixturevalue("pg_cluster").new_database()
        )
        # every process past its imports, then all at once (warm children start past them)
        at = time.time() + (0.3 if warmcli.server() else 1.5)
        procs = [start_python(OPEN_AT, url, str(at)) for _ in range(6)]
        results = [p.communicate(timeout=120) for p in procs]
        assert [p.returncode for p in procs] == [0] * 6, [err[-500:] for _, err in results]
        store = open_store(url, create=False)
        try:
            with store.begin() as conn:
                keys = conn.execute(select(meta.c.key)).scalars().all()
        finally:
            store.close()
        assert sorted(keys) == ["generation", "hmac_key", "schema_version"]  # made once, one key


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_imports_into_a_new_store_at_once_all_land(engine, tmp_path, request):
    url = (  # nothing in it: the processes race to make the store
        str(tmp_path / "together.db")
        if engine == "sqlite"
        else request.getfixturevalue("pg_cluster").new_database()
    )
    files = sorted(RULE_FIXTURES.glob("md-*.har"))[:5]
    procs = [start_cli("import-har", str(f), "--db", url) for f in files]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * len(files), [err for _, err in results]
    listed = json.loads(run_cli("captures", "-f", "json", "--db", url).stdout)
    assert sorted(c["file"].rsplit("/", 1)[-1] for c in listed) == sorted(f.name for f in files)


def test_the_notebook_frames_read_postgresql_as_they_read_sqlite(tmp_path, request):
    """analyzer.frames on a PostgreSQL URL: the same frames, value for value, as on SQLite."""
    import pandas as pd

    from analyzer import frames

    files = [str(f) for f in sorted(RULE_FIXTURES.glob("*.har"))[:25]]
    pg = request.getfixturevalue("pg_cluster").new_database()
    lite = str(tmp_path / "lite.db")
    key = str(tmp_path / "key")
    for db in (lite, pg):
        assert run_cli("import-har", *files, "--db", db, "--key-file", key).returncode == 0
    for name in (
        "exchanges",
        "hops",
        "chains",
        "findings",
        "clients",
        "client_summary",
        "temporary_redirects",
    ):
        on_lite, on_pg = getattr(frames, name)(lite), getattr(frames, name)(pg)
        assert len(on_lite) > 0, name
        pd.testing.assert_frame_equal(
            on_pg.reset_index(drop=True),
            on_lite.reset_index(drop=True),
            check_dtype=False,
            check_categorical=False,
            obj=name,
        )
