"""`export --format parquet DIR`, read back with DuckDB, on both engines."""

from __future__ import annotations

import json
import stat

import duckdb
import pytest
from conftest import RULE_FIXTURES, run_cli

pytestmark = pytest.mark.slow

FILES = [
    "md-307-post-to-get.har",
    "dw-failover.har",
    "st-7-days.har",
    "cc-authorization-other-host.har",
    "lw-put-307.har",
]


def test_parquet_export_reads_back_in_duckdb_with_counts_and_joins_intact(db_path, tmp_path):
    assert run_cli("import-har", *[str(RULE_FIXTURES / f) for f in FILES], "--db", db_path).returncode == 0
    out = tmp_path / "lake"
    done = run_cli("export", str(out), "--db", db_path)
    assert done.returncode == 0, done.stderr
    findings = json.loads(run_cli("findings", "-f", "json", "--db", db_path).stdout)
    chains = json.loads(run_cli("chains", "-f", "json", "--db", db_path).stdout)
    exchanges = sum(
        c["exchanges"] for c in json.loads(run_cli("captures", "-f", "json", "--db", db_path).stdout)
    )
    assert done.stdout.strip() == (
        f"wrote {exchanges} exchanges, {len(chains)} chains, "
        f"{sum(len(c['hops']) for c in chains)} hops, {len(findings)} findings, "
        f"{len(FILES)} captures to {out} (2 capture dates)"
    )

    def table(name: str) -> str:
        return f"read_parquet('{out}/{name}/**/*.parquet', hive_partitioning = true)"

    db = duckdb.connect()
    assert db.execute(f"SELECT count(*) FROM {table('exchanges')}").fetchone()[0] == exchanges
    assert db.execute(f"SELECT count(*) FROM {table('findings')}").fetchone()[0] == len(findings)
    days = db.execute(
        f"SELECT DISTINCT CAST(capture_date AS VARCHAR) FROM {table('exchanges')} ORDER BY 1"
    ).fetchall()
    assert days == [("2026-03-01",), ("2026-03-08",)]
    assert sorted(p.name for p in (out / "exchanges").iterdir()) == [
        "capture_date=2026-03-01",
        "capture_date=2026-03-08",
    ]
    # a join: each finding's redirect, as the JSON output names it
    joined = db.execute(f"""SELECT f.finding_id, f.rule, e.method, e.url, e.status FROM (
                            SELECT id AS finding_id, rule, from_exchange_id FROM {table("findings")}) f
                        JOIN {table("exchanges")} e ON e.id = f.from_exchange_id ORDER BY 1""").fetchall()
    assert joined == sorted(
        (f["finding_id"], f["rule"], f["method_before"], f["from_url"], f["status"]) for f in findings
    )
    # headers as stored: JSON text, credentials fingerprinted
    headers = db.execute(
        f"SELECT request_headers FROM {table('exchanges')} WHERE request_headers LIKE '%uthorization%'"
    ).fetchall()
    assert headers and all("hmac:" in h for (h,) in headers)
    hops = db.execute(f"SELECT count(*), count(DISTINCT chain_id) FROM {table('hops')}").fetchone()
    assert hops == (sum(len(c["hops"]) for c in chains), len(chains))
    for path in out.rglob("*.parquet"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_an_export_never_overwrites_and_an_empty_table_keeps_its_schema(db_path, tmp_path):
    assert run_cli("import-har", str(RULE_FIXTURES / "md-307-post-kept.har"), "--db", db_path).returncode == 0
    out = tmp_path / "lake"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    refused = run_cli("export", str(out), "--db", db_path)
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        f"redirect-audit: error: {out} exists and is not an empty directory; "
        f"name a new one (nothing is overwritten)"
    )
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    empty = tmp_path / "empty"
    assert run_cli("export", str(empty), "--db", db_path).returncode == 0
    db = duckdb.connect()
    rows = db.execute(f"SELECT count(*) FROM read_parquet('{empty}/findings/**/*.parquet')").fetchone()[0]
    assert rows == 0  # no finding: the table is there, with its columns
    columns = [
        c[0]
        for c in db.execute(
            f"DESCRIBE SELECT * FROM read_parquet('{empty}/findings/**/*.parquet')"
        ).fetchall()
    ]
    assert {"rule", "severity", "fingerprint", "evidence"} <= set(columns)
    assert not list(tmp_path.glob(".empty.*")) and not list(
        tmp_path.glob(".lake.*")
    )  # no staging left behind
