"""Stores written by earlier releases: refused with the command that upgrades them, never
altered by a reading or writing command, and after `db upgrade` nothing lost.

Fixtures (tests/fixtures/stores), each written by its release and committed as it was:
* release-be7a892.db: five rule fixtures imported, then `analyze` (no generation kept);
* release-17a54ff.db: six rule fixtures imported, then `analyze` (the last schema-1 release);
* release-026e1d2.db: the same six, then `analyze` (the last schema-2 release);
* release-6eaf4bd.db: the same six, then `analyze` (the last schema-4 release, before the
  time-window indexes);
* release-9f88195.db: the same six, then `analyze` (the last schema-5 release, before a
  capture could be marked damaged).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
from pathlib import Path

import pytest
from conftest import RULE_FIXTURES, run_cli
from sqlalchemy import MetaData, create_engine, insert, select

from analyzer.migrate import create_at, head_revision
from analyzer.store import metadata, open_store
from analyzer.storeread import SCHEMA_VERSION, StoreOutdated, resolve_db_url, revision_of

pytestmark = pytest.mark.slow

STORES = Path(__file__).parent / "fixtures" / "stores"
OLD = STORES / "release-be7a892.db"
LAST = STORES / "release-17a54ff.db"
SCHEMA_2 = STORES / "release-026e1d2.db"
SCHEMA_4 = STORES / "release-6eaf4bd.db"
SCHEMA_5 = STORES / "release-9f88195.db"
RELEASES = pytest.mark.parametrize(
    "fixture",
    [OLD, LAST, SCHEMA_2, SCHEMA_4, SCHEMA_5],
    ids=["be7a892", "17a54ff", "026e1d2", "6eaf4bd", "9f88195"],
)
FILES = {
    OLD: [
        "md-307-post-to-get.har",
        "dw-failover.har",
        "st-7-days.har",
        "cc-authorization-other-host.har",
        "lw-put-307.har",
    ],
    LAST: [
        "md-307-post-to-get.har",
        "dw-failover.har",
        "st-7-days.har",
        "cc-authorization-other-host.har",
        "lw-put-307.har",
        "db-307-empty.har",
    ],
}
FILES[SCHEMA_2] = FILES[SCHEMA_4] = FILES[SCHEMA_5] = FILES[LAST]
VERSION = {OLD: 1, LAST: 1, SCHEMA_2: 2, SCHEMA_4: 4, SCHEMA_5: 5}
REVISION = {OLD: "none", LAST: "none", SCHEMA_2: "0002", SCHEMA_4: "0004", SCHEMA_5: "0005"}


def summary(stdout: str) -> list[tuple]:
    return sorted(
        (
            f["rule"],
            f["severity"],
            f["status"],
            f["method_before"],
            f["method_after"],
            f["from_url"],
            f["to_url"],
            f["fingerprint"],
        )
        for f in json.loads(stdout)
    )


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_newest_migration_makes_this_release_s_schema_version():
    assert head_revision() == revision_of(SCHEMA_VERSION)


@RELEASES
def test_an_older_store_is_refused_with_the_upgrade_command_and_left_untouched(fixture, tmp_path):
    old = tmp_path / "old.db"
    shutil.copy(fixture, old)
    before = digest(old)
    for argv in (
        ["findings"],
        ["chains", "-f", "json"],
        ["check"],
        ["analyze"],
        ["captures"],
        ["import-har", str(RULE_FIXTURES / "db-308-changed.har")],
    ):
        done = run_cli(*argv, "--db", str(old))
        assert done.returncode == 2, argv
        assert done.stderr.strip().splitlines() == [
            f"redirect-audit: error: store {old} has schema version {VERSION[fixture]}, older than this release's {SCHEMA_VERSION}; "
            f"upgrade it with `db upgrade --db {old}` (its captures are kept; back it up first if an older "
            f"redirect-audit must still read it)"
        ], argv
    assert digest(old) == before  # nothing read or written changed a byte
    current = run_cli("db", "current", "--db", str(old))
    assert current.returncode == 0
    made = " (made before migrations)" if REVISION[fixture] == "none" else ""
    assert f"schema version {VERSION[fixture]}, revision {REVISION[fixture]}{made}" in current.stdout
    prefix = (
        "uv run redirect-audit" if os.environ.get("UV_RUN_RECURSION_DEPTH") else "redirect-audit"
    )  # as run
    assert f"outdated: `{prefix} db upgrade --db {old}` upgrades it" in current.stdout
    with pytest.raises(StoreOutdated):
        open_store(str(old), create=False)


@RELEASES
def test_an_upgraded_store_keeps_everything_and_answers_as_a_fresh_import(fixture, tmp_path):
    old = tmp_path / "old.db"
    shutil.copy(fixture, old)
    with sqlite3.connect(old) as conn:
        columns = {
            t: ", ".join(r[1] for r in conn.execute(f"PRAGMA table_info({t})"))
            for t in ("captures", "exchanges", "chains", "hops", "findings")
        }
        if VERSION[fixture] >= 2:
            columns["analyzed_captures"] = "capture_id, exchanges, max_seq"
        kept = {t: conn.execute(f"SELECT {columns[t]} FROM {t} ORDER BY 1").fetchall() for t in columns}
        key = conn.execute("SELECT value FROM meta WHERE key = 'hmac_key'").fetchone()
    done = run_cli("db", "upgrade", "--db", str(old))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        f"upgraded {old} from schema version {VERSION[fixture]} to {SCHEMA_VERSION} "
        f"(revision {REVISION[fixture]} -> {head_revision()})"
    )
    again = run_cli("db", "upgrade", "--db", str(old))
    assert (
        again.stdout.strip()
        == f"{old} is up to date (schema version {SCHEMA_VERSION}, revision {head_revision()})"
    )
    with sqlite3.connect(old) as conn:
        for table, rows in kept.items():  # every column it had, as it was (new columns are empty)
            assert conn.execute(f"SELECT {columns[table]} FROM {table} ORDER BY 1").fetchall() == rows, table
        assert conn.execute("SELECT value FROM meta WHERE key = 'hmac_key'").fetchone() == key
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    first = run_cli("findings", "-f", "json", "--db", str(old))
    assert first.returncode == 0, first.stderr
    if fixture == SCHEMA_5:  # analyzed by this release's analysis: its results stand as they are
        assert "analyzing it now" not in first.stderr, first.stderr
    else:  # its results were made by an older analysis: they are made again, and it says why
        said = (
            "has never been analyzed" if fixture.name == "release-be7a892.db" else "was analyzed by an older"
        )
        assert f"redirect-audit: the store {said}" in first.stderr and "analyzing it now" in first.stderr
    fresh = tmp_path / "fresh.db"
    assert (
        run_cli(
            "import-har", *[str(RULE_FIXTURES / f) for f in FILES[fixture]], "--db", str(fresh)
        ).returncode
        == 0
    )
    assert summary(first.stdout) == summary(run_cli("findings", "-f", "json", "--db", str(fresh)).stdout)
    assert len(summary(first.stdout)) >= 5


def test_an_upgraded_store_takes_new_captures_and_still_knows_its_files(tmp_path):
    old = tmp_path / "old.db"
    shutil.copy(OLD, old)
    assert run_cli("db", "upgrade", "--db", str(old)).returncode == 0
    added = run_cli("import-har", str(RULE_FIXTURES / "db-307-empty.har"), "--db", str(old))
    assert added.returncode == 0 and "as capture 6" in added.stdout
    again = run_cli("import-har", str(RULE_FIXTURES / "md-307-post-to-get.har"), "--db", str(old))
    assert "already imported as capture 1 on" in again.stdout  # the old release kept the file's SHA-256 too
    rules = {f["rule"] for f in json.loads(run_cli("findings", "-f", "json", "--db", str(old)).stdout)}
    assert "dropped-body" in rules
    listed = json.loads(run_cli("captures", "-f", "json", "--db", str(old)).stdout)
    assert [c["capture_id"] for c in listed] == [1, 2, 3, 4, 5, 6]


def test_a_store_of_a_newer_release_is_refused(tmp_path):
    new = tmp_path / "new.db"
    shutil.copy(LAST, new)
    with sqlite3.connect(new) as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    for argv in (["findings"], ["db", "upgrade"]):
        done = run_cli(*argv, "--db", str(new))
        assert done.returncode == 2
        assert (
            "schema version 99" in done.stderr and "newer" in done.stderr and "Traceback" not in done.stderr
        )


def test_a_postgresql_store_of_the_last_release_upgrades_with_nothing_lost(tmp_path, pg_cluster):
    """The schema-1 store on PostgreSQL (32-bit ids, VARCHAR(32) methods), filled with the
    rows of the 17a54ff fixture, upgraded: every row kept, 64-bit values and long methods
    accepted after, and the answers those of the SQLite store upgraded the same way."""
    url = pg_cluster.new_database()
    create_at(url, "0001")
    engine = create_engine(url)
    source = sqlite3.connect(LAST)
    old = MetaData()
    old.reflect(engine)
    with engine.begin() as conn:
        for table in ("meta", "captures", "exchanges", "chains", "hops", "findings"):
            cur = source.execute(f"SELECT * FROM {table}")
            names = [d[0] for d in cur.description]
            rows = [dict(zip(names, r, strict=False)) for r in cur.fetchall()]
            for r in rows:
                for flag in ("synthetic", "from_cache"):
                    if flag in r:
                        r[flag] = bool(r[flag])
            if rows:
                conn.execute(insert(old.tables[table]), rows)
        for table in ("captures", "exchanges", "chains", "findings"):
            conn.exec_driver_sql(f"SELECT setval('{table}_id_seq', (SELECT max(id) FROM {table}))")
    with engine.connect() as conn:
        kept = {
            t: conn.execute(select(old.tables[t]).order_by(*old.tables[t].primary_key.columns)).all()
            for t in ("captures", "exchanges", "chains", "hops", "findings")
        }
    refused = run_cli("findings", "--db", url)
    assert refused.returncode == 2 and "upgrade it with `db upgrade and the same --db`" in refused.stderr
    done = run_cli("db", "upgrade", "--db", url)
    assert done.returncode == 0, done.stderr
    new = MetaData()
    new.reflect(engine)
    assert (
        str(new.tables["exchanges"].c.id.type) == "BIGINT"
        and str(new.tables["exchanges"].c.method.type) == "TEXT"
    )
    with engine.connect() as conn:
        for table, rows in kept.items():
            same = [new.tables[table].c[c.name] for c in old.tables[table].columns]
            assert conn.execute(select(*same).order_by(*new.tables[table].primary_key.columns)).all() == rows
    engine.dispose()
    lite = tmp_path / "lite.db"
    shutil.copy(LAST, lite)
    assert run_cli("db", "upgrade", "--db", str(lite)).returncode == 0
    for what in ("findings", "chains", "clients"):
        assert (
            run_cli(what, "-f", "json", "--db", url).stdout
            == run_cli(what, "-f", "json", "--db", str(lite)).stdout
        )
    big = run_cli("import-har", str(RULE_FIXTURES / "db-308-changed.har"), "--db", url)
    assert big.returncode == 0, big.stderr


@pytest.mark.parametrize("engine_", ["sqlite", "postgresql"])
def test_a_migrated_store_has_exactly_the_schema_a_new_store_has(engine_, tmp_path, request):
    """Every schema change is a migration: from revision 0001 up, the tables, columns,
    types and indexes are those `create_all` makes for a new store (types on PostgreSQL;
    SQLite's declared types are left as they were, see revision 0002)."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    url = (
        str(tmp_path / "m.db")
        if engine_ == "sqlite"
        else request.getfixturevalue("pg_cluster").new_database()
    )
    create_at(url, "0001")
    engine = create_engine(resolve_db_url(url))
    with engine.begin() as conn:
        conn.execute(
            insert(metadata.tables["meta"]),
            [{"key": "schema_version", "value": "1"}, {"key": "hmac_key", "value": "00" * 32}],
        )
    engine.dispose()
    assert run_cli("db", "upgrade", "--db", url).returncode == 0
    engine = create_engine(resolve_db_url(url))
    with engine.connect() as conn:

        def made_here(obj, name, type_, reflected, compare_to):
            """An index declared for another dialect only (Index.ddl_if) is not expected here."""
            condition = getattr(obj, "_ddl_if", None)
            return not (
                type_ == "index" and condition is not None and condition.dialect not in (None, engine_)
            )

        context = MigrationContext.configure(
            conn, opts={"compare_type": engine_ == "postgresql", "include_object": made_here}
        )
        differences = compare_metadata(context, metadata)
    engine.dispose()
    assert differences == []
