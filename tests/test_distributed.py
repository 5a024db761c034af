"""Analysis on a cluster (analyzer.distributed): a real dask.distributed LocalCluster with two
worker processes, a real local[2] Spark, and pandas in this process, each on the Parquet
export of the corpus and the rule fixtures, must give the chains, hops and findings the
local analysis gives (finding ids aside: the store gives them). Write-back must leave the
store as a full local analysis would, and refuse results from other exchanges."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import corpus_store, run_cli
from sqlalchemy import text

from analyzer import distributed
from analyzer.analysis import analyze
from analyzer.columnar import export_parquet
from analyzer.store import open_store, remove_captures
from analyzer.storeread import open_reader, store_state
from analyzer.text import counted

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("distributed")]

CHAINS = distributed.CHAIN_FIELDS
HOPS = distributed.HOP_FIELDS
FINDINGS = distributed.FINDING_FIELDS


def _plain(value):
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    return value.item() if hasattr(value, "item") else value


def frame_rows(frame: pd.DataFrame, fields) -> list[tuple]:
    return sorted(tuple(_plain(v) for v in row) for row in frame[list(fields)].itertuples(index=False))


def stored_rows(db: Path) -> dict[str, list[tuple]]:
    store = open_store(str(db), create=False)
    with store.engine.connect() as conn:
        out = {
            name: sorted(tuple(r) for r in conn.execute(text(f"SELECT {', '.join(fields)} FROM {name}")))
            for name, fields in (("chains", CHAINS), ("hops", HOPS), ("findings", FINDINGS))
        }
    store.engine.dispose()
    return out


def result_rows(results: distributed.Results) -> dict[str, list[tuple]]:
    return {
        "chains": frame_rows(results.chains, CHAINS),
        "hops": frame_rows(results.hops, HOPS),
        "findings": frame_rows(results.findings, FINDINGS),
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, list[tuple]]]:
    """The corpus and the rule fixtures in one store analyzed here, its Parquet export, and
    the local results."""
    base = tmp_path_factory.mktemp("distributed")
    db = base / "corpus.db"
    store = corpus_store(db)
    analyze(store, full=True)
    export_parquet(store, base / "export")
    store.engine.dispose()
    local = stored_rows(db)
    # What the comparison must cover: every rule's findings, stale ones placed on a hop, and
    # page verdicts both ways.
    rules = {row[0] for row in local["findings"]}
    stale = [row for row in local["findings"] if row[0] == "stale-temporary-redirect"]
    assert len(rules) >= 14
    assert any(row[6] is not None for row in stale) and {row[-1] for row in stale} >= {None, True}
    return db, base / "export", local


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    """A Dask cluster as one is deployed: `dask scheduler` and `dask worker` (two worker
    processes), on loopback; yields its address and a client connected to it."""
    from distributed import Client

    base = tmp_path_factory.mktemp("dask")
    info = base / "scheduler.json"
    dask = str(Path(sys.executable).with_name("dask"))
    common = ["--host", "127.0.0.1", "--no-dashboard"]
    log = (base / "cluster.log").open("w")
    scheduler = subprocess.Popen(
        [dask, "scheduler", "--port", "0", "--scheduler-file", str(info), *common], stdout=log, stderr=log
    )
    workers = subprocess.Popen(
        [dask, "worker", "--scheduler-file", str(info), "--nworkers", "2", "--nthreads", "1", *common],
        stdout=log,
        stderr=log,
        cwd=base,
    )
    try:
        for _ in range(300):  # the scheduler writes its address once it listens (bounded: 30 s)
            if info.exists() and info.stat().st_size:
                break
            time.sleep(0.1)
        address = json.loads(info.read_text())["address"]
        with Client(address, timeout="30s") as client:
            client.wait_for_workers(2, timeout=60)
            yield address, client
    finally:
        for process in (workers, scheduler):
            process.terminate()
        for process in (workers, scheduler):
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        log.close()


def test_the_pure_function_in_pandas_gives_the_local_results(corpus):
    _, export, local = corpus
    frame = pd.read_parquet(export / "exchanges")
    assert result_rows(distributed.analyze_pandas(frame)) == local


def test_a_dask_cluster_gives_the_local_results_and_writes_them_as_parquet_and_into_the_store(
    corpus, cluster, tmp_path
):
    db, export, local = corpus
    results = distributed.analyze(distributed.read_exchanges(export))
    out = distributed.write_parquet(results, tmp_path / "out")  # Dask's own writer, one graph
    assert sorted(p.name for p in out.iterdir()) == ["chains", "findings", "hops"]
    assert any(p.name.startswith("capture_date=20") for p in (out / "findings").iterdir())
    written = distributed.Results(*(pd.read_parquet(out / name) for name in ("chains", "hops", "findings")))
    assert result_rows(written) == local

    # Into a copy whose results are gone: the store ends as a full local analysis leaves it.
    copy = tmp_path / "copy.db"
    shutil.copy(db, copy)
    store = open_store(str(copy), create=False)
    with store.begin() as conn:
        before = dict(conn.execute(text("SELECT fingerprint, id FROM findings")).all())
        conn.execute(text("DELETE FROM hops WHERE chain_id IN (SELECT id FROM chains WHERE hops > 1)"))
    stored = distributed.store_results(store, results, distributed.export_counts(export))
    assert stored.finding_count == len(local["findings"]) and stored.chain_count == len(local["chains"])
    store.engine.dispose()
    assert stored_rows(copy) == local
    store = open_store(str(copy), create=False)
    with store.begin() as conn:
        after = dict(conn.execute(text("SELECT fingerprint, id FROM findings")).all())
    store.engine.dispose()
    assert after == before  # a finding found again keeps its id
    with open_reader(str(copy), 5) as reader:
        assert store_state(reader).is_current  # reading commands do not analyze it again


def test_analyze_dask_at_a_scheduler_address_exports_analyzes_and_stores(corpus, cluster, tmp_path):
    db, _, local = corpus
    copy = tmp_path / "store.db"
    shutil.copy(db, copy)
    address = cluster[0]
    done = run_cli(
        "analyze",
        "--db",
        str(copy),
        "--dask",
        address,
        "--parquet",
        str(tmp_path / "shared"),
        "--out",
        str(tmp_path / "results"),
        "--link-window",
        "0.2",
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    exchanges = len(pd.read_parquet(tmp_path / "shared" / "exchanges", columns=["id"]))
    assert f"exported the store to {tmp_path / 'shared'} ({counted(exchanges, 'exchange')})" in done.stdout
    assert f"wrote the chains, hops and findings to {tmp_path / 'results'}" in done.stdout
    # The options given are the analysis's, remembered as `analyze` remembers them: a local
    # analysis with them finds exactly what the cluster stored.
    on_cluster = stored_rows(copy)
    again = tmp_path / "again.db"
    shutil.copy(db, again)
    assert run_cli("analyze", "--db", str(again), "--link-window", "0.2").returncode == 0
    assert on_cluster == stored_rows(again) != local
    assert (
        f"{counted(len(on_cluster['chains']), 'chain')}, {counted(len(on_cluster['hops']), 'hop')}"
        in done.stdout
    )
    assert frame_rows(pd.read_parquet(tmp_path / "results" / "findings"), FINDINGS) == on_cluster["findings"]
    # A second run, on a cluster of its own here, reads the export already there.
    done = run_cli(
        "analyze",
        *(
            "--db",
            str(copy),
            "--dask",
            "local:1",
            "--parquet",
            str(tmp_path / "shared"),
            "--link-window",
            "30",
        ),
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "exported" not in done.stdout and stored_rows(copy) == local


def test_results_from_an_older_export_are_refused_and_the_store_kept(corpus, cluster, tmp_path):
    db, export, _ = corpus
    copy = tmp_path / "grown.db"
    shutil.copy(db, copy)
    store = open_store(str(copy), create=False)
    with store.begin() as conn:
        assert remove_captures(conn, [1]) == []
    analyze(store)
    store.engine.dispose()
    before = stored_rows(copy)
    done = run_cli("analyze", "--db", str(copy), "--dask", cluster[0], "--parquet", str(export))
    assert done.returncode == 2
    assert "the results were computed from" in done.stderr and "export the store again" in done.stderr
    assert "Traceback" not in done.stderr and not done.stdout  # refused before the cluster works
    assert stored_rows(copy) == before


def test_analyze_dask_says_what_is_wrong(corpus, tmp_path):
    db, _, _ = corpus
    cases = [
        (("--dask", "local:2"), "--dask needs --parquet DIR"),
        (("--parquet", str(tmp_path / "p")), "--parquet go(es) with --dask ADDRESS"),
        (
            ("--dask", "local", "--parquet", str(tmp_path / "p"), "--jobs", "2"),
            "--jobs cannot go with --dask",
        ),
        (
            ("--dask", "local", "--parquet", str(tmp_path / "p"), "--no-store"),
            "--no-store with no --out writes the results nowhere",
        ),
    ]
    for args, words in cases:
        done = run_cli("analyze", "--db", str(db), *args)
        assert done.returncode == 2 and words in done.stderr, (args, done.stderr)
    (tmp_path / "notexport").mkdir()
    (tmp_path / "notexport" / "x.txt").write_text("x")
    done = run_cli(
        "analyze", "--db", str(db), "--dask", "tcp://127.0.0.1:9", "--parquet", str(tmp_path / "notexport")
    )
    assert done.returncode == 2 and f"{tmp_path / 'notexport'} holds no exported exchanges" in done.stderr
    done = run_cli(
        "analyze",
        *("--db", str(db), "--dask", "tcp://127.0.0.1:9", "--parquet", str(tmp_path / "e")),
        env={"DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "2s"},
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in done.stderr
    assert "Traceback" not in done.stderr


def test_without_dask_installed_the_hint_names_the_extra(corpus, tmp_path):
    db, _, _ = corpus
    code = (
        "import sys; sys.modules['distributed'] = None\n"
        "from analyzer.__main__ import main\n"
        f"sys.argv = ['redirect-audit', 'analyze', '--db', {str(db)!r}, '--dask', 'local', '--parquet', "
        f"{str(tmp_path / 'p')!r}]\n"
        "main()"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "--dask needs Dask, which is not installed" in done.stderr and "dask extra" in done.stderr
    assert not (tmp_path / "p").exists()


@pytest.fixture(scope="module")
def spark():
    os.environ["SPARK_LOCAL_IP"] = "127.0.0.1"  # loopback only (the JVM reads it when it starts)
    from pyspark.sql import SparkSession

    session = (
        SparkSession.builder.master("local[2]")
        .appName("redirect-audit-tests")
        .config("spark.ui.enabled", "false")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.ui.showConsoleProgress", "false")
        # a few seconds of small jobs: the JVM's quick compiler alone (and its simplest
        # collector) start them sooner than tiered compilation does (a quarter of the time here)
        .config("spark.driver.extraJavaOptions", "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


def test_spark_apply_in_pandas_gives_the_local_results_and_writes_parquet(corpus, spark, tmp_path):
    _, export, local = corpus
    results = distributed.analyze_spark(distributed.read_exchanges_spark(spark, export))
    got = distributed.Results(results.chains.toPandas(), results.hops.toPandas(), results.findings.toPandas())
    assert result_rows(got) == local
    out = distributed.write_parquet(results, tmp_path / "spark-out")
    assert frame_rows(pd.read_parquet(out / "findings"), FINDINGS) == local["findings"]
    assert frame_rows(pd.read_parquet(out / "chains"), CHAINS) == local["chains"]


def test_a_frame_without_the_export_columns_and_a_used_out_dir_are_refused_by_name(corpus, tmp_path):
    from analyzer.columnar import ExportError

    with pytest.raises(distributed.FrameError) as refused:
        distributed.analyze_frame(pd.DataFrame({"id": [1], "client": ["a"], "url": ["https://a.test/"]}))
    assert "the exchanges frame has no column capture_id, seq, method, url_norm, started_at, status" in str(
        refused.value
    )
    _, export, _ = corpus
    frame = pd.read_parquet(export / "exchanges")
    results = distributed.analyze_pandas(frame[frame["client"] == frame["client"].iloc[0]])
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="is not an empty directory"):
        distributed.write_parquet(results, tmp_path / "used")
    assert [p.name for p in (tmp_path / "used").iterdir()] == ["keep.txt"]
    assert not list(tmp_path.glob(".used*"))
