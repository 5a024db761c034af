"""Analysis on a cluster: Dask or Spark runs the per-client analysis that `analyze` runs.

The unit of work is a pure function over a pandas DataFrame of exchanges, with the columns
of the store's `exchanges` table as the Parquet export writes them (`export --format
parquet DIR`, DIR/exchanges, Hive partitions by capture date):

    analyze_frame(frame)    each client's chains, hops and findings: the client's exchanges
                            go through windows.ChainStream.window in one window, the step
                            `analyze` runs on every time window it reads from the store
    stale_frame(frame)      one (source, target) group of temporary redirects, across
                            clients: its stale-temporary-redirect finding, as `analyze`
                            judges it after the clients

Both return rows of one frame (RESULT_SCHEMA: a `kind` column says chain, hop, finding or
place; a place is where a temporary redirect was served, for the stale findings' hop and
page verdict). The adapters run them where the data lives:

    analyze_pandas(df)        pandas, in this process (a notebook)
    analyze(dask_df)          Dask: shuffled by client, one call per partition; then by
                              (source, target) for the stale findings
    analyze_spark(spark_df)   Spark: groupBy(bucket of clients).applyInPandas, the same

and return Results (chains, hops, findings: frames of that engine, lazily).
`write_parquet(results, DIR)` writes them the way the export does, and `store_results(store,
results, exchanges)` puts them in the store the export came from, as a full `analyze` would
have (finding ids kept). Every node needs this package installed (its `dask` or `spark`
extra); the results equal the local analysis's, finding ids aside (a test compares them
on the corpus).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from analyzer.analysis import (
    TEMPORARY_STATUSES,
    AnalysisOptions,
    AnalysisResult,
    ResultChunk,
    accepted_write,
    batch_output,
    finding_row,
    replace_results,
    sighting_groups,
)
from analyzer.chains import Link, order_key, stored_id
from analyzer.columnar import check_target, day_of
from analyzer.detectors import stale_temporary_redirect as stale
from analyzer.errors import ReportedError
from analyzer.model import REDIRECT_STATUSES, Exchange
from analyzer.party import Parties, is_page_client
from analyzer.store import EXCHANGE_COLUMNS, light_exchange, row_reader
from analyzer.store import exchanges as ex_t
from analyzer.windows import ChainStream

EXCHANGE_NAMES = ("id", *EXCHANGE_COLUMNS)
BUCKET_EXCHANGES = 200_000  # Spark: at least one group of clients per this many exchanges
PARTITION_BYTES = 32 * 2**20  # of Parquet read into one Dask partition, where files are smaller
REQUIRED = ("id", "capture_id", "seq", "client", "method", "url", "url_norm", "started_at", "status")
SIGHTING_NAMES = (
    "id",
    "capture_id",
    "seq",
    "client",
    "url_norm",
    "location",
    "location_resolved",
    "status",
    "method",
    "synthetic",
    "started_at",
    "response_headers",
)

# One row per chain, hop, finding or place; each kind fills its own columns.
RESULT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("kind", "string"),  # chain | hop | finding | place
    ("client", "string"),
    ("chain_id", "int64"),  # a chain's id (its root exchange's), or the chain of a hop, finding, place
    ("hops", "int64"),
    ("end_reason", "string"),
    ("started_at", "double"),  # a chain's root, a hop's chain's root
    ("third_party", "bool"),
    ("idx", "int64"),  # a hop's (or a place's) index in its chain
    ("from_exchange_id", "int64"),
    ("to_exchange_id", "int64"),
    ("status", "int64"),
    ("link", "string"),
    ("confidence", "double"),
    ("rule", "string"),
    ("rule_id", "string"),
    ("severity", "string"),
    ("severity_rank", "int64"),
    ("message", "string"),
    ("hop", "int64"),
    ("observed_at", "double"),
    ("evidence", "string"),
    ("fingerprint", "string"),
    ("capture_date", "string"),  # the UTC day, as the export partitions: a chain's root start, a finding's
)
CHAIN_FIELDS = ("id", "root_exchange_id", "hops", "end_reason", "client", "started_at", "third_party")
HOP_FIELDS = ("chain_id", "idx", "from_exchange_id", "to_exchange_id", "status", "link", "confidence")
FINDING_FIELDS = (
    "rule",
    "rule_id",
    "severity",
    "severity_rank",
    "confidence",
    "message",
    "chain_id",
    "hop",
    "from_exchange_id",
    "to_exchange_id",
    "observed_at",
    "evidence",
    "fingerprint",
    "client",
    "third_party",
)


class FrameError(ReportedError):
    """A frame or directory that is not what the analysis reads."""


@dataclass
class Results:
    """Chains, hops and findings, as frames of the engine that made them (pandas, Dask or
    Spark). The columns are the store's (finding ids aside: the store gives them), plus
    `capture_date`; hops carry their chain's client and start as the export's do."""

    chains: Any
    hops: Any
    findings: Any


# ---- the pure functions -----------------------------------------------------------------


def result_schema() -> Any:  # a pyarrow Schema
    import pyarrow as pa

    types = {"string": pa.string(), "int64": pa.int64(), "double": pa.float64(), "bool": pa.bool_()}
    return pa.schema([pa.field(name, types[kind]) for name, kind in RESULT_COLUMNS])


def spark_schema() -> str:
    """RESULT_COLUMNS as a Spark DDL string (applyInPandas's schema)."""
    ddl = {"string": "string", "int64": "bigint", "double": "double", "bool": "boolean"}
    return ", ".join(f"{name} {ddl[kind]}" for name, kind in RESULT_COLUMNS)


def empty_result() -> Any:  # a pandas DataFrame: the meta Dask needs
    import pandas as pd

    return result_schema().empty_table().to_pandas(types_mapper=pd.ArrowDtype)


def exchanges_of(frame: Any) -> list[Exchange]:
    """The exchanges of a pandas DataFrame with the export's columns (others are ignored;
    integers may come as floats with NaN, as Spark and pandas hand them over)."""
    missing = [name for name in REQUIRED if name not in frame.columns]
    if missing:
        raise FrameError(
            f"the exchanges frame has no column {', '.join(missing)}: "
            "give it the columns of the export's exchanges (export --format parquet DIR, DIR/exchanges)"
        )
    names = [name for name in EXCHANGE_NAMES if name in frame.columns]
    make = row_reader(names)
    columns = [_values(frame[name].tolist(), _KINDS[name]) for name in names]
    return [make(row) for row in zip(*columns, strict=True)]


def _kind(column: Any) -> type:
    from sqlalchemy import BigInteger, Boolean, Float, Integer, LargeBinary

    kind = type(column.type)
    impl = getattr(column.type, "impl", None) if kind.__name__ == "Variant" else None
    kind = type(impl) if impl is not None else kind
    for sql, python in (
        (Boolean, bool),
        (BigInteger, int),
        (Integer, int),
        (Float, float),
        (LargeBinary, bytes),
    ):
        if issubclass(kind, sql):
            return python
    return str


_KINDS: dict[str, type] = {column.name: _kind(column) for column in ex_t.columns}


def _values(values: list[Any], kind: type) -> list[Any]:
    """One column as the store's reader has it: None where missing (None, NaN, pd.NA),
    integers as int (pandas and Spark give an integer column with gaps as floats)."""
    if kind is str:
        return [v if isinstance(v, str) else None for v in values]
    out: list[Any] = []
    for v in values:
        if v is None or (v != v) is True or type(v).__name__ == "NAType":
            out.append(None)
        else:
            out.append(kind(v))
    return out


def analyze_frame(frame: Any, options: AnalysisOptions | None = None) -> Any:
    """Chains, hops, findings and places of the clients in `frame` (pandas, the export's
    exchange columns), each client analyzed alone: a RESULT_SCHEMA frame."""
    return _arrow_frame(_analyzed_rows(frame, options or AnalysisOptions()))


def _analyzed_rows(frame: Any, options: AnalysisOptions) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    by_client: dict[str, list[Exchange]] = {}
    for ex in exchanges_of(frame):
        by_client.setdefault(ex.client, []).append(ex)
    for client in sorted(by_client):
        rows += _client_rows(client, by_client[client], options)
    return rows


def _arrow_frame(rows: list[dict[str, Any]]) -> Any:
    """RESULT_SCHEMA rows as a pandas frame of Arrow types (nullable integers and booleans)."""
    import pandas as pd
    import pyarrow as pa

    return pa.Table.from_pylist(rows, schema=result_schema()).to_pandas(types_mapper=pd.ArrowDtype)


def _plain_frame(rows: list[dict[str, Any]]) -> Any:
    """RESULT_SCHEMA rows as a pandas frame of Python objects, None where missing: what
    Spark's Arrow conversion takes against the declared schema, built without the per-call
    cost of an Arrow table (Spark calls once per group)."""
    import pandas as pd

    names = [name for name, _ in RESULT_COLUMNS]
    return pd.DataFrame([[row.get(name) for name in names] for row in rows], columns=names, dtype=object)


def _client_rows(client: str, exchanges: list[Exchange], options: AnalysisOptions) -> list[dict[str, Any]]:
    """One client through ChainStream.window, with what analysis.WindowLoader would have read
    from the store for the whole history: every request a candidate (light, as loaded for
    linking), follow-ups whole, accepted writes without headers."""
    exchanges.sort(key=order_key)
    whole = {stored_id(ex): ex for ex in exchanges}
    light = [light_exchange(_light_row(ex)) for ex in exchanges]
    navigations = light[:1] if is_page_client(client) else []
    stream = ChainStream(options.link, options.detect, navigations)

    def follow_ups(links: dict[int, Link]) -> dict[int, Exchange]:
        return {link.target_id: whole[link.target_id] for link in links.values()}

    def writes() -> list[Exchange]:
        return [
            msgspec.structs.replace(ex, request_headers=[], response_headers=[])
            for ex in exchanges
            if accepted_write(ex)
        ]

    redirects = [ex for ex in exchanges if ex.status in REDIRECT_STATUSES]
    flushed = stream.window(redirects, [], light, follow_ups, writes, None)
    out = batch_output([client], flushed, keep=False, replaces=True)
    rows: list[dict[str, Any]] = []
    root_start: dict[int, float | None] = {}
    for chain_id, _, hop_count, end, _, started, third in out.chain_rows:
        root_start[chain_id] = started
        rows.append(
            {
                "kind": "chain",
                "client": client,
                "chain_id": chain_id,
                "hops": hop_count,
                "end_reason": end,
                "started_at": started,
                "third_party": third,
                "capture_date": day_of(started),
            }
        )
    for chain_id, idx, from_id, to_id, status, how, confidence in out.hop_rows:
        rows.append(
            {
                "kind": "hop",
                "client": client,
                "chain_id": chain_id,
                "started_at": root_start[chain_id],
                "idx": idx,
                "from_exchange_id": from_id,
                "to_exchange_id": to_id,
                "status": status,
                "link": how,
                "confidence": confidence,
                "capture_date": day_of(root_start[chain_id]),
            }
        )
    for finding in out.finding_rows:
        rows.append({"kind": "finding", **finding, "capture_date": day_of(finding["observed_at"])})
    rows += _places(client, flushed.chains, navigations)
    return rows


def _light_row(ex: Exchange) -> tuple[Any, ...]:
    """The columns of store.LINK_COLUMNS, in order."""
    return (
        ex.id,
        ex.capture_id,
        ex.seq,
        ex.client,
        ex.connection,
        ex.started_at,
        ex.url_norm,
        ex.status,
        ex.location,
        ex.location_resolved,
        ex.synthetic,
        ex.method,
    )


def _places(client: str, chains: Sequence[Any], navigations: list[Exchange]) -> list[dict[str, Any]]:
    """Where each temporary redirect was served (chain, hop) and, on a browser page, whether
    its target is third party: what the stale findings, judged across clients, are placed
    by. The page's sites as analysis._StoredPages reads them from the store: the navigation's
    URL and its chain's follow-ups."""
    parties = None
    if navigations:
        nav = navigations[0]
        urls = [nav.url]
        for chain in chains:
            if chain.id == stored_id(nav):
                urls += [hop.target.url_norm for hop in chain.hops if hop.target is not None]
        parties = Parties.of_urls({client: urls})
    rows = []
    for chain in chains:
        for hop in chain.hops:
            source = hop.source
            target = source.location_resolved or source.location
            if source.status in TEMPORARY_STATUSES and target:
                rows.append(
                    {
                        "kind": "place",
                        "client": client,
                        "chain_id": chain.id,
                        "idx": hop.index,
                        "from_exchange_id": source.id,
                        "third_party": parties.third_party_hop(client, source, target) if parties else None,
                    }
                )
    return rows


def stale_frame(frame: Any, options: AnalysisOptions | None = None) -> Any:
    """The stale-temporary-redirect findings of the temporary redirects in `frame` (pandas,
    the export's exchange columns; whole (source, target) groups), as `analyze` judges
    them across clients: on the latest sighting, its hop and page verdict not yet known
    (chain_id null: the adapters join them from the places)."""
    return _arrow_frame(_stale_rows(frame, options or AnalysisOptions()))


def _stale_rows(frame: Any, options: AnalysisOptions) -> list[dict[str, Any]]:
    detect = options.detect
    wanted = frame[frame["status"].isin(TEMPORARY_STATUSES)]
    exchanges = exchanges_of(wanted)
    # The order `analyze` reads them in: by (source, target), then time (undated first, as
    # SQLite sorts NULL), capture and position.
    target_of = {stored_id(ex): ex.location_resolved or ex.location for ex in exchanges}
    exchanges.sort(
        key=lambda ex: (
            ex.url_norm,
            target_of[stored_id(ex)] or "",
            ex.started_at is not None,
            ex.started_at or 0.0,
            ex.capture_id,
            ex.seq,
        )
    )
    rows = []
    sightings = (tuple(getattr(ex, name) for name in SIGHTING_NAMES) for ex in exchanges)
    for (source, target), seen in sighting_groups(_with_header_text(sightings)):
        judged = stale.judge(source, target, seen, detect)
        if judged is None or seen.latest is None:
            continue
        message, evidence = judged
        row = finding_row(stale.stale_finding(message, evidence, seen.latest, None, 0))
        row["client"] = None  # across clients
        rows.append({"kind": "finding", **row, "capture_date": day_of(row["observed_at"])})
    return rows


def _with_header_text(rows: Iterable[tuple[Any, ...]]) -> Iterator[tuple[Any, ...]]:
    """sighting_groups reads response headers as the store keeps them (JSON text)."""
    import json

    at = SIGHTING_NAMES.index("response_headers")
    for row in rows:
        headers = row[at]
        yield (*row[:at], json.dumps([list(h) for h in headers]) if headers else None, *row[at + 1 :])


def _split(results: Any, stale_rows: Any, merge: Any) -> Results:
    """Results from the per-client rows and the stale findings, whatever the engine: the
    stale findings take their hop and page verdict from the places (`merge` joins)."""
    kind = results["kind"]
    chains = results[kind == "chain"]
    chains = chains.assign(id=chains["chain_id"], root_exchange_id=chains["chain_id"])
    hops = results[kind == "hop"].rename(columns={"started_at": "chain_started_at"})
    findings = results[kind == "finding"]
    places = results[kind == "place"][["from_exchange_id", "chain_id", "idx", "third_party"]]
    placed = merge(stale_rows.drop(columns=["chain_id", "third_party", "idx"]), places)
    placed = placed.assign(hop=placed["idx"].fillna(0).astype("int64[pyarrow]"))
    findings_all = _concat(
        [findings[[*FINDING_FIELDS, "capture_date"]], placed[[*FINDING_FIELDS, "capture_date"]]]
    )
    return Results(
        chains=chains[[*CHAIN_FIELDS, "capture_date"]],
        hops=hops[[*HOP_FIELDS, "client", "chain_started_at", "capture_date"]],
        findings=findings_all,
    )


def _concat(frames: list[Any]) -> Any:
    module = type(frames[0]).__module__
    if module.startswith("dask"):
        import dask.dataframe as dd

        return dd.concat(frames)
    import pandas as pd

    return pd.concat(frames, ignore_index=True)


# ---- pandas (one process: a notebook, a test) ----------------------------------------------


def analyze_pandas(exchanges: Any, options: AnalysisOptions | None = None) -> Results:
    """Analyze a pandas DataFrame of exchanges (the export's columns) in this process, with
    the functions the clusters run: for a notebook, or to check an adapter against."""
    options = options or AnalysisOptions()
    return _split(
        analyze_frame(exchanges, options),
        stale_frame(exchanges, options),
        lambda left, right: left.merge(right, on="from_exchange_id", how="left"),
    )


# ---- Dask ---------------------------------------------------------------------------------


def read_exchanges(directory: str | os.PathLike[str]) -> Any:
    """The export's exchanges as a Dask DataFrame (DIR/exchanges, or DIR itself)."""
    import dask.dataframe as dd

    path = _exchanges_dir(directory)
    # pyarrow's filesystem layer: it reads an export's many small day partitions together
    # (2.5 times faster than fsspec's on the corpus export, on a 2-worker LocalCluster)
    frame = dd.read_parquet(str(path.resolve()), columns=[*EXCHANGE_NAMES], filesystem="arrow")
    # An export has a file per day: many small ones cost a task (and a shuffle input) each.
    # Adjacent ones are merged up to about PARTITION_BYTES of Parquet (no data read for it).
    size = sum(f.stat().st_size for f in path.rglob("*.parquet"))
    wanted = max(1, -(-size // PARTITION_BYTES))
    return frame.repartition(npartitions=wanted) if wanted < frame.npartitions else frame


def _exchanges_dir(directory: str | os.PathLike[str]) -> Path:
    base = Path(directory)
    path = base / "exchanges" if (base / "exchanges").is_dir() else base
    if not path.is_dir() or not any(path.rglob("*.parquet")):
        raise FrameError(
            f"{base} holds no exported exchanges (DIR/exchanges/capture_date=.../*.parquet): "
            "make it with `redirect-audit export --format parquet DIR`"
        )
    return path


def analyze(exchanges: Any, options: AnalysisOptions | None = None) -> Results:
    """Analyze a Dask DataFrame of exchanges (the export's columns; read_exchanges(DIR)
    reads an export) on the cluster its client is connected to. Lazy: nothing runs until
    the results are computed, written (write_parquet) or stored (store_results)."""
    options = options or AnalysisOptions()
    present = [name for name in EXCHANGE_NAMES if name in exchanges.columns]
    frame = exchanges[present]
    meta = empty_result()
    # Each client's exchanges into one partition, then one call per partition (a call per
    # client would cost its overhead 360,000 times over a fleet); analyze_frame takes each
    # client of its frame alone.
    per_client = frame.shuffle(on="client").map_partitions(analyze_frame, options, meta=meta)
    temporary = frame[frame["status"].isin(list(TEMPORARY_STATUSES))]
    target = temporary["location_resolved"].fillna(temporary["location"])
    temporary = temporary.assign(group_target=target)
    temporary = temporary[~temporary["group_target"].isna()]
    stale_rows = temporary.shuffle(on=["url_norm", "group_target"]).map_partitions(
        stale_frame, options, meta=meta
    )

    return _split(
        per_client, stale_rows, lambda left, right: left.merge(right, on="from_exchange_id", how="left")
    )


# ---- Spark --------------------------------------------------------------------------------


def read_exchanges_spark(spark: Any, directory: str | os.PathLike[str]) -> Any:
    """The export's exchanges as a Spark DataFrame (DIR/exchanges, or DIR itself)."""
    path = _exchanges_dir(directory)
    return spark.read.option("basePath", str(path)).parquet(str(path)).select(*EXCHANGE_NAMES)


def analyze_spark(
    exchanges: Any, options: AnalysisOptions | None = None, buckets: int | None = None
) -> Results:
    """Analyze a Spark DataFrame of exchanges (the export's columns) with groupBy(...)
    .applyInPandas on the executors, then the stale findings by (source, target). Lazy, as
    Spark is.

    The groups are buckets of clients (a hash of the client), not single clients: each
    call costs a few milliseconds of pandas whatever its size, which over 360,000 clients
    is most of the run. `buckets`: how many (default: four per core of the session, at
    least one per 200,000 exchanges). Every client's exchanges are in one bucket, and
    analyze_frame takes each client alone, so the results are the same."""
    from pyspark.sql import functions as F

    options = options or AnalysisOptions()
    schema = spark_schema()
    frame = exchanges.select(*[name for name in EXCHANGE_NAMES if name in exchanges.columns])
    if buckets is None:
        parallel = frame.sparkSession.sparkContext.defaultParallelism
        buckets = max(4 * parallel, -(-frame.count() // BUCKET_EXCHANGES))
    per_client = (  # read four times below: computed once
        frame.groupBy(F.pmod(F.hash("client"), F.lit(buckets)))
        .applyInPandas(lambda group: _plain_frame(_analyzed_rows(group, options)), schema=schema)
        .cache()
    )
    target = F.coalesce("location_resolved", "location")
    temporary = frame.where(F.col("status").isin(*TEMPORARY_STATUSES)).where(target.isNotNull())
    stale_rows = temporary.groupBy(F.pmod(F.hash("url_norm", target), F.lit(buckets))).applyInPandas(
        lambda group: _plain_frame(_stale_rows(group, options)), schema=schema
    )
    kind = F.col("kind")
    places = per_client.where(kind == "place").select("from_exchange_id", "chain_id", "idx", "third_party")
    placed = (
        stale_rows.drop("chain_id", "third_party", "idx")
        .join(places, on="from_exchange_id", how="left")
        .withColumn("hop", F.coalesce("idx", F.lit(0)))
        .cache()  # read by every action on the findings
    )
    chains = (
        per_client.where(kind == "chain")
        .withColumn("id", F.col("chain_id"))
        .withColumn("root_exchange_id", F.col("chain_id"))
    )
    hops = per_client.where(kind == "hop").withColumnRenamed("started_at", "chain_started_at")
    findings = per_client.where(kind == "finding").select(*FINDING_FIELDS, "capture_date")
    return Results(
        chains=chains.select(*CHAIN_FIELDS, "capture_date"),
        hops=hops.select(*HOP_FIELDS, "client", "chain_started_at", "capture_date"),
        findings=findings.unionByName(placed.select(*FINDING_FIELDS, "capture_date")),
    )


# ---- where the results go -----------------------------------------------------------------


def write_parquet(results: Results, directory: str | os.PathLike[str]) -> Path:
    """DIR/chains, DIR/hops, DIR/findings, Hive-partitioned by capture date as the export
    is; DIR must be new or empty (nothing is overwritten), and is complete once it exists
    under its name (written next to it, then renamed)."""
    target = check_target(directory)
    staging = target.parent / f".{target.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    old = os.umask(0o077)
    try:
        frames = {name: getattr(results, name) for name in ("chains", "hops", "findings")}
        module = type(results.chains).__module__
        if module.startswith("dask"):  # one graph: the analysis runs once for the three
            import dask

            dask.compute(
                *(
                    frame.to_parquet(
                        str(staging / name), partition_on=["capture_date"], write_index=False, compute=False
                    )
                    for name, frame in frames.items()
                )
            )
        for name, frame in frames.items():
            if module.startswith("pyspark"):
                frame.write.partitionBy("capture_date").parquet(str(staging / name))
            elif not module.startswith("dask"):
                frame.to_parquet(str(staging / name), partition_cols=["capture_date"], index=False)
        if target.exists():
            target.rmdir()
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        os.umask(old)
    return target


def collect(results: Results) -> Results:
    """The results as pandas frames in this process, computed in one pass (Dask: one graph,
    so the per-client analysis runs once for the three; Spark: the cached rows, through
    Arrow). What `analyze --dask` does before writing them both to --out and to the store:
    results are a small part of the exchanges they come from."""
    module = type(results.chains).__module__
    if module.startswith("dask"):
        import dask

        return Results(*dask.compute(results.chains, results.hops, results.findings))
    if module.startswith("pyspark"):
        return Results(results.chains.toPandas(), results.hops.toPandas(), results.findings.toPandas())
    return results


def pandas_chunks(frame: Any, rows: int = 20_000) -> Iterator[Any]:
    """A pandas, Dask or Spark frame as pandas frames, a partition (or `rows`) at a time."""
    module = type(frame).__module__
    if module.startswith("dask"):
        for i in range(frame.npartitions):
            yield frame.get_partition(i).compute()
    elif module.startswith("pyspark"):
        import pandas as pd

        columns = frame.columns
        batch: list[Any] = []
        for row in frame.toLocalIterator():
            batch.append(tuple(row))
            if len(batch) >= rows:
                yield pd.DataFrame(batch, columns=columns)
                batch = []
        if batch:
            yield pd.DataFrame(batch, columns=columns)
    else:
        yield frame


def _records(frame: Any, names: Sequence[str]) -> list[tuple[Any, ...]]:
    import pyarrow as pa

    table = pa.Table.from_pandas(frame[list(names)], preserve_index=False)
    return list(zip(*(table.column(name).to_pylist() for name in names), strict=True))


def store_results(
    store: Any, results: Results, exchanges: tuple[int, int | None], options: AnalysisOptions | None = None
) -> AnalysisResult:
    """Put the results in place of the store's, as a full `analyze` would (one transaction;
    finding ids kept for the findings found again; the analysis recorded as current).
    `exchanges`: (count, highest id) of the exchanges they were computed from (as
    `export_counts` reads them from an export); refused when the store holds others."""
    options = options or AnalysisOptions()
    results = collect(results)

    def chunks() -> Iterator[ResultChunk]:
        for frame in pandas_chunks(results.chains):
            yield _records(frame, CHAIN_FIELDS), [], []
        for frame in pandas_chunks(results.hops):
            yield [], _records(frame, HOP_FIELDS), []
        for frame in pandas_chunks(results.findings):
            names = list(FINDING_FIELDS)
            found = [dict(zip(names, row, strict=True)) for row in _records(frame, names)]
            yield [], [], found

    return replace_results(store, chunks(), options, exchanges)


def export_counts(directory: str | os.PathLike[str]) -> tuple[int, int | None]:
    """(count, highest id) of an export's exchanges, from the Parquet footers and one column."""
    import pyarrow.dataset as ds

    data = ds.dataset(str(_exchanges_dir(directory)), format="parquet", partitioning="hive")
    count = data.count_rows()
    if count == 0:
        return 0, None
    import pyarrow.compute as pc

    return count, int(pc.max(data.to_table(columns=["id"]).column("id")).as_py())


__all__ = [
    "FrameError",
    "Results",
    "analyze",
    "analyze_frame",
    "analyze_pandas",
    "analyze_spark",
    "collect",
    "export_counts",
    "read_exchanges",
    "read_exchanges_spark",
    "stale_frame",
    "store_results",
    "write_parquet",
]
