"""`export --format parquet DIR`: the store as Parquet files for DuckDB, Spark, Trino, pandas.

    DIR/exchanges/capture_date=2026-03-01/part-0.parquet   every exchange, headers as stored (JSON text)
    DIR/hops/capture_date=.../                            one row per hop, with its chain's client
    DIR/chains/capture_date=.../                          one row per chain
    DIR/findings/capture_date=.../                        one row per finding, evidence as JSON text
    DIR/captures.parquet                                  the captures (few rows: not partitioned)

Partitioned the Hive way by capture date (the UTC day an exchange started, a chain's root
started, a finding's exchange started; `unknown` when undated), so engines prune by day.
Rows stream from the store in chunks into pyarrow's dataset writer: memory is a chunk,
whatever the store holds. Written into a new directory next to DIR and renamed into place
once complete, files readable by their owner only, as every other output.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Column, Select, Table, select

from analyzer.errors import ReportedError
from analyzer.store import Store, captures, chains, exchanges, findings, hops

CHUNK_ROWS = 20_000
UNKNOWN = "unknown"


class ExportError(ReportedError):
    pass


@dataclass
class ExportResult:
    directory: Path
    rows: dict[str, int] = field(default_factory=dict)
    days: int = 0


def day_of(seconds: float | None) -> str:
    if seconds is None:
        return UNKNOWN
    try:
        return dt.datetime.fromtimestamp(seconds, dt.UTC).date().isoformat()
    except (OverflowError, OSError, ValueError):  # outside what a date can say
        return UNKNOWN


def arrow_type(column: Column[Any]) -> Any:  # a pyarrow DataType (pyarrow has no type information)
    import pyarrow as pa
    from sqlalchemy import BigInteger, Boolean, Float, Integer, LargeBinary

    kind = type(column.type)
    impl = getattr(column.type, "impl", None) if kind.__name__ == "Variant" else None
    kind = type(impl) if impl is not None else kind
    if issubclass(kind, Boolean):
        return pa.bool_()
    if issubclass(kind, BigInteger | Integer):
        return pa.int64()
    if issubclass(kind, Float):
        return pa.float64()
    if issubclass(kind, LargeBinary):
        return pa.binary()
    return pa.string()


def arrow_schema(table: Table, extra: tuple[Any, ...] = ()) -> Any:
    import pyarrow as pa

    fields = [pa.field(c.name, arrow_type(c)) for c in table.columns]
    return pa.schema([*fields, *extra, pa.field("capture_date", pa.string())])


def _batches(store: Store, stmt: Select[Any], schema: Any, day_at: int) -> Iterator[Any]:
    """RecordBatches of CHUNK_ROWS rows, each row with its capture date from column `day_at`."""
    import pyarrow as pa

    names = schema.names
    with store.begin() as conn:
        result = conn.execute(stmt.execution_options(yield_per=CHUNK_ROWS))
        for chunk in result.partitions():
            columns = list(zip(*chunk, strict=False))
            days = [day_of(v) for v in columns[day_at]]
            arrays = [
                pa.array(list(values), type=schema.field(name).type)
                for name, values in zip(names, columns, strict=False)
            ]
            arrays.append(pa.array(days, type=pa.string()))
            yield pa.RecordBatch.from_arrays(arrays, schema=schema)


@contextmanager
def _private_umask() -> Iterator[None]:
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def check_target(directory: str | os.PathLike[str]) -> Path:
    """Refuse a DIR that holds anything, or whose parent does not exist."""
    target = Path(directory)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ExportError(
            f"{target} exists and is not an empty directory; name a new one (nothing is overwritten)"
        )
    if not target.parent.is_dir():
        raise ExportError(f"cannot write {target}: its directory {target.parent} does not exist")
    return target


def export_parquet(store: Store, directory: str | os.PathLike[str]) -> ExportResult:
    """Write the store's exchanges, hops, chains, findings and captures under `directory`,
    which must not exist or be empty (nothing is overwritten)."""
    import pyarrow as pa
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    target = check_target(directory)
    result = ExportResult(target)
    with _private_umask():
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            plans = {
                "exchanges": (select(*exchanges.c), arrow_schema(exchanges), "started_at"),
                "chains": (select(*chains.c), arrow_schema(chains), "started_at"),
                "hops": (
                    select(*hops.c, chains.c.client, chains.c.started_at.label("chain_started_at")).join(
                        chains, chains.c.id == hops.c.chain_id
                    ),
                    arrow_schema(
                        hops, (pa.field("client", pa.string()), pa.field("chain_started_at", pa.float64()))
                    ),
                    "chain_started_at",
                ),
                "findings": (select(*findings.c), arrow_schema(findings), "observed_at"),
            }
            days: set[str] = set()
            for name, (stmt, schema, day_column) in plans.items():
                count = 0

                def counted(batches: Iterator[Any]) -> Iterator[Any]:
                    nonlocal count
                    for batch in batches:
                        count += batch.num_rows
                        days.update(batch.column("capture_date").unique().to_pylist())
                        yield batch

                ds.write_dataset(
                    counted(_batches(store, stmt, schema, schema.names.index(day_column))),
                    staging / name,
                    schema=schema,
                    format="parquet",
                    partitioning=ds.partitioning(pa.schema([("capture_date", pa.string())]), flavor="hive"),
                    basename_template="part-{i}.parquet",
                    existing_data_behavior="error",
                    max_partitions=100_000,
                )
                if count == 0:  # an empty table still has its schema on disk, for readers that glob it
                    empty = staging / name / f"capture_date={UNKNOWN}"
                    empty.mkdir(parents=True, exist_ok=True)
                    pq.write_table(schema.empty_table(), empty / "part-0.parquet")
                result.rows[name] = count
            with store.begin() as conn:
                rows = conn.execute(select(*captures.c)).all()
            table = pa.table(
                {
                    c.name: pa.array([r[i] for r in rows], type=arrow_type(c))
                    for i, c in enumerate(captures.columns)
                }
            )
            pq.write_table(table, staging / "captures.parquet")
            result.rows["captures"] = len(rows)
            result.days = len(days - {UNKNOWN})
            if target.exists():
                target.rmdir()  # empty, checked above
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return result
