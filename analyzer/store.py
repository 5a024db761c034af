"""The capture store: SQLAlchemy Core schema, engine set-up and batched writes.

SQLite by default (WAL, one writer); any SQLAlchemy URL works, and the SQL stays
portable so PostgreSQL needs no rewrite. Credential headers arrive here already
fingerprinted (see `analyzer.secrets`); the HMAC key lives in the `meta` table.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import msgspec
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    cast,
    create_engine,
    delete,
    event,
    insert,
    inspect,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import OperationalError, SQLAlchemyError, StatementError
from sqlalchemy.sql import ColumnElement

from analyzer.keys import KEY_FILE_ENV, key_file_from, key_id, new_key, read_key, read_or_create_key
from analyzer.model import Body, Exchange
from analyzer.storeread import (  # noqa: F401 - re-exported: where a store is and what its errors mean
    ANALYSIS_OPTIONS,
    ANALYZED_GENERATION,
    DB_ENV,
    DEFAULT_DB,
    DEFAULT_WAIT,
    GENERATION,
    SCHEMA_VERSION,
    StoreError,
    StoreMissing,
    StoreUnavailable,
    ValueRefused,
    check_version,
    describe_error,
    missing_driver,
    require_store,
    resolve_db_url,
    revision_of,
    safe_url,
    sqlite_file,
    url_shown,
)

BATCH_SIZE = 2000

Row = tuple[Any, ...]  # an exchanges-table row, in EXCHANGE_COLUMNS order

metadata = MetaData()

# Ids, counts and sizes are 64-bit (a body or a store can pass 2**31). SQLite's INTEGER is
# 64-bit already and only "INTEGER PRIMARY KEY" is its rowid, so it keeps INTEGER there.
Big = BigInteger().with_variant(Integer(), "sqlite")

# The schema as of SCHEMA_VERSION; every change is a migration in analyzer/migrations
# (revision "0002" is schema version 2), and a new store is stamped with the newest.
alembic_version = Table(
    "alembic_version",
    metadata,
    Column("version_num", String(32), primary_key=True),
)

meta = Table(
    "meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

captures = Table(
    "captures",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("source", String(16), nullable=False),  # har | flows | proxy
    Column("path", Text),
    Column("sha256", String(64)),
    Column("creator", Text),
    Column("browser", Text),
    Column("format_version", Text),
    Column("imported_at", Float, nullable=False),
    Column("entries", Big, nullable=False, default=0),
    Column("warnings", Big, nullable=False, default=0),
    # a HAR cut off or damaged part way: where it broke and what was kept (NULL: taken whole)
    Column("damage", Text),
)

exchanges = Table(
    "exchanges",
    metadata,
    Column("id", Big, primary_key=True),
    Column("capture_id", Integer, ForeignKey("captures.id", ondelete="CASCADE"), nullable=False),
    Column("seq", Big, nullable=False),
    Column("flow_id", Text),
    Column("client", Text, nullable=False),
    Column("connection", Text),
    Column("started_at", Float),
    Column("response_started_at", Float),
    Column("method", Text, nullable=False),
    Column("url", Text, nullable=False),
    Column("url_norm", Text, nullable=False),
    Column("http_version", Text),
    Column("status", Integer),
    Column("status_text", Text),
    Column("location", Text),
    Column("location_resolved", Text),
    Column("location_error", Text),
    Column("synthetic", Boolean, nullable=False, default=False),
    Column("from_cache", Boolean, nullable=False, default=False),
    Column("error", Text),
    Column("request_headers", Text, nullable=False),  # JSON [[name, value], ...]
    Column("response_headers", Text, nullable=False),
    Column("req_body_len", Big),
    Column("req_body_sha256", String(64)),
    Column("req_content_type", Text),
    Column("req_body", LargeBinary),
    Column("resp_body_len", Big),
    Column("resp_body_sha256", String(64)),
    Column("resp_content_type", Text),
    Column("resp_body", LargeBinary),
    Column("user_agent", Text),
    Column("idempotency_key", Text),
    Index("ix_exchanges_capture_seq", "capture_id", "seq"),
    Index("ix_exchanges_status", "status"),
    # By URL: a hash index on PostgreSQL, whose B-tree refuses entries over 2,704 bytes (URLs can be longer).
    Index("ix_exchanges_url", "url_norm", postgresql_using="hash"),
    # A client's requests to a URL (the follow-ups a redirect may have had), by time. SQLite
    # only: it plans with no statistics, and without this walks every request to a popular
    # URL, of every client, for each batch; PostgreSQL plans the same join from its statistics.
    Index("ix_exchanges_client_url_start", "client", "url_norm", "started_at").ddl_if(dialect="sqlite"),
    # A client's redirects, and its exchanges, by time: what analysis reads one time window at a time.
    Index("ix_exchanges_client_status_start", "client", "status", "started_at"),
    Index("ix_exchanges_client_start", "client", "started_at"),
)

chains = Table(
    "chains",
    metadata,
    Column("id", Big, primary_key=True),
    Column("root_exchange_id", Big, ForeignKey("exchanges.id", ondelete="CASCADE"), nullable=False),
    Column("hops", Big, nullable=False),
    Column("end_reason", String(32), nullable=False),
    Column("client", Text, nullable=False),
    Column("started_at", Float),
    Column("third_party", Boolean),  # every hop between third parties of its page (NULL: no page)
    Index("ix_chains_client", "client"),
)

hops = Table(
    "hops",
    metadata,
    Column("chain_id", Big, ForeignKey("chains.id", ondelete="CASCADE"), primary_key=True),
    Column("idx", Big, primary_key=True),
    Column("from_exchange_id", Big, nullable=False),
    Column("to_exchange_id", Big),
    Column("status", Integer, nullable=False),
    Column("link", String(32), nullable=False),
    Column("confidence", Float, nullable=False),
    Index("ix_hops_from_exchange", "from_exchange_id"),
)

findings = Table(
    "findings",
    metadata,
    Column("id", Big, primary_key=True),
    Column("rule", String(64), nullable=False),
    Column("rule_id", String(16), nullable=False),
    Column("severity", String(16), nullable=False),
    Column("severity_rank", Integer, nullable=False),
    Column("confidence", Float, nullable=False),
    Column("message", Text, nullable=False),
    Column("chain_id", Big, ForeignKey("chains.id", ondelete="CASCADE")),
    Column("hop", Big, nullable=False),
    Column("from_exchange_id", Big, nullable=False),
    Column("to_exchange_id", Big, nullable=False),
    Column("observed_at", Float),
    Column("evidence", Text, nullable=False),
    Column("fingerprint", String(64), nullable=False),
    Column("client", Text),  # whose analysis made it (NULL: a finding across clients, or from schema 1)
    Column("third_party", Boolean),  # about a hop between third parties of its page (NULL: no page)
    Index("ix_findings_chain", "chain_id"),
    Index("ix_findings_client", "client"),
    Index("ix_findings_from", "from_exchange_id"),
    Index("ix_findings_severity", "severity"),
)

# What the last analysis read of each capture: its exchange count and highest seq. A
# capture whose count moved has new exchanges, and only their clients are analyzed again.
analyzed_captures = Table(
    "analyzed_captures",
    metadata,
    Column("capture_id", Integer, primary_key=True),
    Column("exchanges", Big, nullable=False),
    Column("max_seq", Big),
)

# Where analysis can take up a big client again (analyzer.windows.snapshot): the state of its
# time-window analysis at a few boundaries near its end, so that traffic appended later is
# analyzed from there, not from the client's first exchange.
analysis_checkpoints = Table(
    "analysis_checkpoints",
    metadata,
    Column("client", Text, primary_key=True),
    Column("boundary", Float, primary_key=True),
    Column("state", LargeBinary, nullable=False),
)

# The tests of a test run (the pytest plugin writes them): what happened between a test's
# start and end, from the client its traffic is labelled with, happened during that test.
test_runs = Table(
    "test_runs",
    metadata,
    Column("id", Big, primary_key=True, autoincrement=True),
    Column("session", Text, nullable=False),  # one pytest run: a random id
    Column("nodeid", Text, nullable=False),
    Column("worker", Text, nullable=False),  # "main", or the pytest-xdist worker ("gw0", ...)
    # The label the test's traffic was recorded under (one per test: the recorder renames
    # the worker's label at each test's start), and the recorder's name, by which a client
    # that ignored the label (a browser) is known: `proxy:RECORDER/ADDRESS`.
    Column("client", Text, nullable=False),
    Column("recorder", Text, nullable=False),
    Column("started_at", Float, nullable=False),
    Column("ended_at", Float),
    Column("outcome", Text),  # passed, failed, skipped; None while it runs
    Index("ix_test_runs_client_start", "client", "started_at"),
)


def _sqlite_pragmas(wait: float) -> Callable[[Any, Any], None]:
    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout={int(wait * 1000)}")  # first: the WAL switch may wait too
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    return on_connect


@dataclass
class Store:
    """An open store: the engine plus the key that fingerprints secrets (see analyzer.keys)."""

    engine: Engine
    url: str
    key: bytes | None  # None: the store's key lives outside it and no key file was given
    wait: float = DEFAULT_WAIT
    key_problem: str = ""

    @property
    def secret_key(self) -> bytes:
        if self.key is None:
            raise StoreError(self.key_problem)
        return self.key

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        """A transaction; the store refusing work as a whole (locked past `wait`, full,
        read-only) comes out as StoreUnavailable with a one-line message."""
        try:
            with self.engine.begin() as conn:
                yield conn
        except OperationalError as exc:
            raise StoreUnavailable(describe_error(exc, self.url, self.wait)) from exc

    def close(self) -> None:
        self.engine.dispose()


def open_store(
    db: str | None = None, *, create: bool = True, wait: float = DEFAULT_WAIT, key_file: str | None = None
) -> Store:
    """Open the store at a URL or path; `create=False` refuses one that does not exist.

    Only what writes captures (imports, the proxy, the demo) creates a store: a reading
    command pointed at a mistyped path must say so, not report on a new empty store.
    A new SQLite store is created readable by its owner only (its -wal and -shm follow).
    `wait` is how long to wait for another process's write lock (SQLite); `key_file`
    (else $REDIRECT_AUDIT_KEY_FILE) is where the key lives for a store that does not
    keep its own (analyzer.keys).
    """
    url = resolve_db_url(db)
    if not create:
        require_store(url)
    path = sqlite_file(url)
    made_file = False
    engine = None
    try:
        if path is not None and create:
            made_file = _create_private_file(path)
        engine = make_engine(url, wait)
        key, problem = _open_schema(engine, url, create, key_file_from(key_file), wait)
    except BaseException as exc:
        if engine is not None:
            engine.dispose()
        if made_file and path is not None and not _holds_a_store(path):
            # a store that was never finished is no store: leave no file that looks like one
            # (but one another process finished in the file made here is theirs: kept)
            _remove_sqlite_files(path)
        if isinstance(exc, SQLAlchemyError):
            raise StoreError(describe_error(exc, url, wait)) from None
        if isinstance(exc, ImportError):
            raise StoreError(missing_driver(url, exc)) from None
        raise
    return Store(engine=engine, url=url, key=key, wait=wait, key_problem=problem)


def _open_schema(
    engine: Engine, url: str, create: bool, key_file: Path | None, wait: float
) -> tuple[bytes | None, str]:
    """The store's key (its schema made first when `create` and it has none). Processes
    creating one SQLite store at once can be told "locked" at once rather than after the
    busy timeout (SQLite refuses to wait where waiting could deadlock): they try again
    until `wait` has passed."""
    deadline = time.monotonic() + wait
    while True:
        try:
            with engine.begin() as conn:
                if create and not inspect(conn).has_table("meta"):
                    lock_schema(
                        conn
                    )  # two processes creating one store: the second waits, then finds it made
                    if not inspect(conn).has_table("meta"):
                        metadata.create_all(conn)
                return _schema_key(conn, url, key_file)
        except OperationalError as exc:
            if "database is locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


def _holds_a_store(path: Path) -> bool:
    """Whether the SQLite file at `path` has a finished store's schema in it."""
    try:
        with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=1)) as conn:
            return conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone() is not None
    except sqlite3.Error:
        return False


def make_engine(url: str, wait: float = DEFAULT_WAIT) -> Engine:
    """An engine on the store's URL; SQLite connections get WAL, a busy timeout and foreign keys."""
    engine = create_engine(url)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas(wait))
    return engine


SCHEMA_LOCK = 0x7265_6469_7200  # PostgreSQL advisory lock key: "redir"


def lock_schema(conn: Connection) -> None:
    """Take the store's schema lock for the rest of this transaction: creating and
    upgrading a store happen under it, so concurrent processes take turns. SQLite: the
    write lock (BEGIN IMMEDIATE, waiting up to the busy timeout); PostgreSQL: an advisory
    transaction lock (DDL is transactional there, so a waiter sees the finished schema)."""
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    elif conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({SCHEMA_LOCK})")


def _create_private_file(path: Path) -> bool:
    """An empty file SQLite will take as a new database, readable by its owner only;
    False when the file exists already (made by another process a moment ago, maybe)."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        raise StoreError(f"cannot open store {path}: unable to open database file ({exc.strerror})") from None


def _remove_sqlite_files(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def _schema_key(conn: Connection, url: str, key_file: Path | None) -> tuple[bytes | None, str]:
    """The store's key (creating the meta rows of a new store), or None and why not."""
    rows = dict(conn.execute(select(meta.c.key, meta.c.value)).all())
    if "schema_version" not in rows:
        key = read_or_create_key(key_file) if key_file is not None else new_key()
        where = (
            {"key": "hmac_key_id", "value": key_id(key)}
            if key_file is not None
            else {"key": "hmac_key", "value": key.hex()}
        )
        conn.execute(
            insert(meta),
            [
                {"key": "schema_version", "value": str(SCHEMA_VERSION)},
                where,
                {"key": GENERATION, "value": "0"},
            ],
        )
        conn.execute(insert(alembic_version).values(version_num=revision_of(SCHEMA_VERSION)))
        return key, ""
    check_version(rows["schema_version"], url)
    if "hmac_key" in rows:
        return bytes.fromhex(rows["hmac_key"]), ""  # the store keeps its own key; a key file is not used
    if key_file is None:
        return None, (
            f"store {url_shown(url)} keeps its key outside it: give its key file with --key-file "
            f"or ${KEY_FILE_ENV}"
        )
    key = read_key(key_file)
    if key_id(key) != rows.get("hmac_key_id"):
        return None, f"key file {key_file} is not the key of store {url_shown(url)} (the key ids differ)"
    return key, ""


def bump_generation(conn: Connection) -> None:
    """Mark the exchanges as changed, so that reading commands re-analyze. Called last in
    each writing transaction: on PostgreSQL the meta row stays locked until the commit."""
    done = conn.execute(
        update(meta).where(meta.c.key == GENERATION).values(value=cast(cast(meta.c.value, Integer) + 1, Text))
    )
    if done.rowcount == 0:  # a store from before generations were kept
        conn.execute(insert(meta).values(key=GENERATION, value="1"))


def read_generation(conn: Connection) -> int:
    value = conn.execute(select(meta.c.value).where(meta.c.key == GENERATION)).scalar()
    return int(value or 0)


def record_analysis(conn: Connection, generation: int, options: dict[str, Any]) -> None:
    """Remember which generation the results describe and the options they were made with."""
    for key, value in ((ANALYZED_GENERATION, str(generation)), (ANALYSIS_OPTIONS, json.dumps(options))):
        set_meta(conn, key, value)


# ---- writes -----------------------------------------------------------------


def add_capture(conn: Connection, **values: Any) -> int:
    values.setdefault("imported_at", time.time())
    values = {k: v.replace("\x00", "\\x00") if type(v) is str else v for k, v in values.items()}
    key = conn.execute(insert(captures).values(**values)).inserted_primary_key
    assert key is not None  # an INSERT always returns the new row's key
    return int(key[0])


def finish_capture(conn: Connection, capture_id: int, **values: Any) -> None:
    """Record a capture's totals at the end of the transaction that wrote its exchanges."""
    conn.execute(update(captures).where(captures.c.id == capture_id).values(**values))
    bump_generation(conn)


STATISTICS_AFTER = 1000  # rows a bulk load adds before the planner's statistics are refreshed


def refresh_statistics(conn: Connection, *tables: str) -> None:
    """PostgreSQL plans by its table statistics, which autovacuum refreshes only after a
    while: right after a bulk load, the planner still believes the table empty and picks
    nested loops (the repeated-writes query took 18.6 s at 50k rows). ANALYZE samples the
    table (it reads at most 30,000 rows' pages, whatever its size). SQLite: nothing to do."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"ANALYZE {', '.join(tables)}")


EXCHANGE_COLUMNS = (
    "capture_id",
    "seq",
    "flow_id",
    "client",
    "connection",
    "started_at",
    "response_started_at",
    "method",
    "url",
    "url_norm",
    "http_version",
    "status",
    "status_text",
    "location",
    "location_resolved",
    "location_error",
    "synthetic",
    "from_cache",
    "error",
    "request_headers",
    "response_headers",
    "req_body_len",
    "req_body_sha256",
    "req_content_type",
    "req_body",
    "resp_body_len",
    "resp_body_sha256",
    "resp_content_type",
    "resp_body",
    "user_agent",
    "idempotency_key",
)


class HeaderBlock(list[tuple[str, str]]):
    """Header pairs as stored, with the JSON they are stored as. The proxy's converter
    shares one block between all the exchanges that carry the same headers (flows.py),
    so it is encoded once. Never changed once made."""

    __slots__ = ("json",)
    json: str


def header_block(pairs: Sequence[tuple[str, str]]) -> HeaderBlock:
    block = HeaderBlock(pairs)
    block.json = _encode_headers(pairs)
    return block


def headers_json(headers: Sequence[tuple[str, str]]) -> str:
    """A header list as stored: JSON [[name, value], ...]."""
    if type(headers) is HeaderBlock:
        return headers.json
    return _encode_headers(headers)


def _encode_headers(headers: Sequence[tuple[str, str]]) -> str:
    try:
        return msgspec.json.encode(headers).decode()
    except (
        TypeError,
        UnicodeEncodeError,
        msgspec.EncodeError,
    ):  # lone surrogates from a sloppy exporter: the stdlib encoder escapes them
        return json.dumps(headers, ensure_ascii=False)


def exchange_row(ex: Exchange) -> Row:
    """The exchanges-table row for one Exchange, in EXCHANGE_COLUMNS order (capture_id must be set).

    Stored the same on every engine: a NUL character (which PostgreSQL text cannot hold)
    becomes the four characters `\\x00`, as other bytes that are not text are kept; a
    status outside HTTP's three digits is clamped to 0..999 (0: no response).
    """
    rb, sb = ex.request_body, ex.response_body
    status = ex.status
    if status is not None and not 0 <= status <= 999:
        status = 0 if status < 0 else 999
    row = (
        ex.capture_id,
        ex.seq,
        ex.flow_id,
        ex.client,
        ex.connection,
        ex.started_at,
        ex.response_started_at,
        ex.method,
        ex.url,
        ex.url_norm,
        ex.http_version,
        status,
        ex.status_text,
        ex.location,
        ex.location_resolved,
        ex.location_error,
        ex.synthetic,
        ex.from_cache,
        ex.error,
        headers_json(ex.request_headers),
        headers_json(ex.response_headers),
        rb.length,
        rb.sha256,
        rb.content_type,
        rb.raw,
        sb.length,
        sb.sha256,
        sb.content_type,
        sb.raw,
        ex.user_agent,
        ex.idempotency_key,
    )
    for i in _TEXT_AT:
        value = row[i]
        if type(value) is str and "\x00" in value:
            return nul_escaped(row)
    return row


# Text columns of an exchange row that can carry a NUL from the wire (header lists are
# JSON, where a NUL is already written as an escape).
_TEXT_AT = tuple(
    EXCHANGE_COLUMNS.index(name)
    for name in (
        "flow_id",
        "client",
        "connection",
        "method",
        "url",
        "url_norm",
        "http_version",
        "status_text",
        "location",
        "location_resolved",
        "location_error",
        "error",
        "req_content_type",
        "resp_content_type",
        "user_agent",
        "idempotency_key",
    )
)


def nul_escaped(row: Row) -> Row:
    """The row with every NUL character in a text value written as `\\x00`."""
    return tuple(v.replace("\x00", "\\x00") if type(v) is str else v for v in row)


def write_exchanges(conn: Connection, rows: Iterable[Row], batch_size: int = BATCH_SIZE) -> int:
    """Insert exchange_row() tuples in executemany batches; return how many were written."""
    return insert_tuples(conn, exchanges, EXCHANGE_COLUMNS, rows, batch_size)


def write_exchange_blocks(conn: Connection, blocks: Iterable[Sequence[Row]]) -> int:
    """write_exchanges() for rows that come in lists already (a HAR import's blocks)."""
    return insert_blocks(conn, exchanges, EXCHANGE_COLUMNS, blocks)


MULTI_ROW_LIMIT = 200  # rows per multi-row INSERT (x 31 columns stays far under SQLite's 32766 variables)


def insert_tuples(
    conn: Connection,
    table: Table,
    columns: tuple[str, ...],
    rows: Iterable[Row],
    batch_size: int = BATCH_SIZE,
) -> int:
    """Bulk insert, skipping SQLAlchemy's per-row parameter processing.

    The single-row statement is compiled once per dialect, so the SQL stays what
    SQLAlchemy would send. With a positional driver (SQLite's qmark) rows go in
    multi-row `INSERT ... VALUES (...), (...)` statements: one statement step per 200
    rows instead of one per row. That matters beyond speed: the sqlite3 module releases
    the GIL around every step, and in the proxy, where a writer thread inserts while the
    event loop serves traffic, each release is a thread hand-over; per row, those
    hand-overs cost the proxy more CPU than the recording itself. Fewer than 200 rows go
    in chunks of 128, 64, ... 1, so that only nine statement shapes exist and the
    driver's statement cache always has them prepared (a batch of any other size would
    parse and prepare a statement of thousands of parameters). Named-parameter drivers
    (psycopg) get the driver's executemany. Every column type used here (int, float,
    text, bool, bytes) needs no bind processing.
    """
    return insert_blocks(conn, table, columns, _batches(rows, batch_size))


def insert_blocks(
    conn: Connection, table: Table, columns: tuple[str, ...], blocks: Iterable[Sequence[Row]]
) -> int:
    """insert_tuples() for rows that come in lists already: no per-row regrouping."""
    if conn.dialect.name == "postgresql" and conn.dialect.driver == "psycopg":
        return _copy_blocks(conn, table, columns, blocks)
    plan = _insert_plan(conn, table, columns)
    count = 0
    if plan.multi_row:
        order = plan.order
        for block in blocks:
            for start in range(0, len(block), MULTI_ROW_LIMIT):
                piece = block[start : start + MULTI_ROW_LIMIT]
                at = 0
                for n in _chunk_sizes(len(piece)):
                    chunk = piece[at : at + n]
                    at += n
                    flat = (
                        tuple(chain.from_iterable(chunk))
                        if order is None
                        else tuple(r[i] for r in chunk for i in order)
                    )
                    try:
                        conn.exec_driver_sql(plan.statement(n), flat)
                    except _VALUE_ERRORS as exc:
                        if isinstance(exc, OperationalError):
                            raise
                        raise refused(conn.dialect.name, table, columns, chunk, exc) from exc
            count += len(block)
        return count
    for block in blocks:
        if block:
            try:
                conn.exec_driver_sql(
                    plan.sql,
                    list(block) if plan.positional else [dict(zip(columns, r, strict=False)) for r in block],
                )
            except _VALUE_ERRORS as exc:
                if isinstance(exc, OperationalError):
                    raise
                raise refused(conn.dialect.name, table, columns, block, exc) from exc
            count += len(block)
    return count


def _copy_blocks(
    conn: Connection, table: Table, columns: tuple[str, ...], blocks: Iterable[Sequence[Row]]
) -> int:
    """PostgreSQL: rows go through COPY FROM STDIN (psycopg's copy), in the transaction of
    `conn`: several times the rate of INSERT statements. A value the server refuses fails
    the COPY (and the transaction, as any refused INSERT does); the rows are then searched
    for the value, as for a refused INSERT."""
    import psycopg

    driver = conn.connection.driver_connection
    assert driver is not None  # an open connection has its driver connection
    cursor = driver.cursor()
    names = ", ".join(f'"{c}"' for c in columns)
    count = 0
    for block in blocks:
        if not block:
            continue
        try:
            with cursor.copy(f'COPY "{table.name}" ({names}) FROM STDIN') as copy:
                for row in block:
                    copy.write_row(row)
        except psycopg.OperationalError as exc:
            raise StoreUnavailable(describe_error(exc, str(conn.engine.url), DEFAULT_WAIT)) from exc
        except (psycopg.Error, UnicodeError, OverflowError, ValueError, TypeError) as exc:
            raise refused(conn.dialect.name, table, columns, block, exc) from exc
        count += len(block)
    return count


# What a driver raises for a value it or the database refuses (StatementError wraps the
# database's own errors; OperationalError among them is about the store, not a value).
_VALUE_ERRORS = (StatementError, UnicodeError, OverflowError)


def refused(
    dialect: str, table: Table, columns: Sequence[str], rows: Sequence[Row], exc: BaseException
) -> ValueRefused:
    """The error for a batch the database refused because of a value: which row and which
    column, when a value breaks one of the limits known below, else the database's words."""
    cause = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    said = cause[0] if cause else type(exc).__name__
    for row in rows:
        for name, value in zip(columns, row, strict=False):
            problem = value_problem(dialect, table.c[name], value)
            if problem is not None:
                return ValueRefused(f"the store refused column {name}: {problem} ({said})", row, name)
    return ValueRefused(f"the store refused a row: {said}", rows[0] if len(rows) == 1 else None)


def value_problem(dialect: str, column: Column[Any], value: object) -> str | None:
    """Why a database of this dialect would refuse this value in this column, if it would."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "text with a lone surrogate, which is not Unicode"
        if dialect == "postgresql" and "\x00" in value:
            return "text with a NUL character"
        length = getattr(column.type, "length", None)
        if dialect != "sqlite" and length and len(value) > length:
            return f"{len(value)} characters, over the column's {length}"
    elif isinstance(value, int) and not isinstance(value, bool):
        bits = 31 if dialect != "sqlite" and type(column.type) is Integer else 63
        if not -(2**bits) <= value < 2**bits:
            return f"the number {value} is outside a {bits + 1}-bit integer"
    return None


@dataclass
class _InsertPlan:
    sql: str  # the single-row statement
    positional: bool
    multi_row: bool
    order: list[int] | None  # driver parameter order as indexes into a row, None if the same
    _statements: dict[int, str] = field(default_factory=dict)

    def statement(self, rows: int) -> str:
        """The multi-row form of `sql` for this many rows (built once per size)."""
        sql = self._statements.get(rows)
        if sql is None:
            head, values = _split_values(self.sql)
            sql = self._statements[rows] = head + ", ".join([values] * rows)
        return sql


_PLANS: dict[tuple[str, str, str, tuple[str, ...]], _InsertPlan] = {}


def _insert_plan(conn: Connection, table: Table, columns: tuple[str, ...]) -> _InsertPlan:
    key = (conn.dialect.name, conn.dialect.paramstyle, table.name, columns)
    plan = _PLANS.get(key)
    if plan is None:
        compiled = insert(table).compile(dialect=conn.dialect, column_keys=list(columns))
        positional = bool(compiled.positional)
        order = [columns.index(name) for name in compiled.positiontup or ()] if positional else None
        plan = _PLANS[key] = _InsertPlan(
            sql=compiled.string,
            positional=positional,
            multi_row=positional and compiled.string.rstrip().endswith(")"),
            order=None if order == list(range(len(columns))) else order,
        )
    return plan


def _chunk_sizes(n: int) -> Iterator[int]:
    """n (at most MULTI_ROW_LIMIT) as MULTI_ROW_LIMIT or as falling powers of two."""
    if n == MULTI_ROW_LIMIT:
        yield n
        return
    bit = 1 << (n.bit_length() - 1) if n else 0
    while bit:
        if n & bit:
            yield bit
        bit >>= 1


def _split_values(sql: str) -> tuple[str, str]:
    """'INSERT INTO t (a, b) VALUES (?, ?)' -> ('INSERT INTO t (a, b) VALUES ', '(?, ?)')."""
    at = sql.upper().rindex("VALUES")
    return sql[: at + len("VALUES")] + " ", sql[at + len("VALUES") :].strip()


def _batches(rows: Iterable[Row], size: int) -> Iterator[list[Row]]:
    batch: list[Row] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def drop_exchanges(conn: Connection, capture_id: int) -> None:
    """Forget the exchanges written so far for a capture (inside the import's transaction)."""
    conn.execute(delete(exchanges).where(exchanges.c.capture_id == capture_id))


def remove_captures(conn: Connection, ids: Sequence[int]) -> list[int]:
    """Remove captures with their exchanges; returns the ids that did not exist.

    The results of the clients they held go too (they may point at the removed
    exchanges), and those clients are analyzed again on the next read, as are the stale
    redirects (their sightings may have gone); every other result keeps its id. The
    generation moves on, so the next reading command analyzes what changed.
    """
    found = set(conn.execute(select(captures.c.id).where(captures.c.id.in_(ids))).scalars())
    missing = [i for i in ids if i not in found]
    if missing:
        return missing
    clients = list(
        conn.execute(select(exchanges.c.client).where(exchanges.c.capture_id.in_(ids)).distinct()).scalars()
    )
    for start in range(0, len(clients), 500):
        chunk = clients[start : start + 500]
        theirs = select(chains.c.id).where(chains.c.client.in_(chunk))
        conn.execute(delete(findings).where(findings.c.client.in_(chunk) | findings.c.chain_id.in_(theirs)))
        conn.execute(delete(hops).where(hops.c.chain_id.in_(theirs)))
        conn.execute(delete(chains).where(chains.c.client.in_(chunk)))
        conn.execute(delete(analysis_checkpoints).where(analysis_checkpoints.c.client.in_(chunk)))
        shared = select(exchanges.c.capture_id).where(exchanges.c.client.in_(chunk)).distinct()
        conn.execute(delete(analyzed_captures).where(analyzed_captures.c.capture_id.in_(shared)))
    conn.execute(delete(analyzed_captures).where(analyzed_captures.c.capture_id.in_(ids)))
    conn.execute(delete(exchanges).where(exchanges.c.capture_id.in_(ids)))
    conn.execute(delete(captures).where(captures.c.id.in_(ids)))
    set_meta(conn, STALE_RECHECK, "all")
    bump_generation(conn)
    return []


STALE_RECHECK = "stale_recheck"  # meta: "all" when the next analysis must judge every stale group


def set_meta(conn: Connection, key: str, value: str) -> None:
    if conn.execute(update(meta).where(meta.c.key == key).values(value=value)).rowcount == 0:
        conn.execute(insert(meta).values(key=key, value=value))


def clear_analysis(conn: Connection) -> None:
    """Drop every analysis result, and what the last analysis read: the next is a full one."""
    for table in (findings, hops, chains, analyzed_captures):
        conn.execute(delete(table))


# ---- reads ------------------------------------------------------------------

LINK_COLUMNS = (
    "id",
    "capture_id",
    "seq",
    "client",
    "connection",
    "started_at",
    "url_norm",
    "status",
    "location",
    "location_resolved",
    "synthetic",
    "method",
)


def load_exchanges(
    conn: Connection, where: ColumnElement[bool] | None = None, *, light: bool = False, headers: bool = True
) -> list[Exchange]:
    """Exchanges matching a SQLAlchemy condition.

    `light` loads only what linking needs; `headers=False` skips the header lists (the
    costliest part of a row to decode) for callers that do not read them. Rows are
    fetched all at once and read by position: on a million rows, per-row fetches and
    name lookups cost more than the query.
    """
    cols = [exchanges.c[name] for name in LINK_COLUMNS] if light else list(exchanges.c)
    if not light and not headers:
        cols = [c for c in cols if c.name not in ("request_headers", "response_headers")]
    stmt = select(*cols)
    if where is not None:
        stmt = stmt.where(where)
    rows = conn.execute(stmt).all()
    if light:
        return [light_exchange(row) for row in rows]
    make = row_reader([c.name for c in cols])
    return [make(row) for row in rows]


def exchange_from_row(row: Mapping[str, Any]) -> Exchange:
    """The Exchange a full exchanges-table row (a mapping) describes."""
    names = [c.name for c in exchanges.c if c.name in row]
    return row_reader(names)(tuple(row[n] for n in names))


def row_reader(names: list[str]) -> Callable[[Row], Exchange]:
    """A function turning a row of these columns, by position, into an Exchange."""
    at = {name: i for i, name in enumerate(names)}
    missing = len(names)

    def pos(name: str) -> int:
        return at.get(name, missing)  # a column not selected reads as None

    (
        i_id,
        i_cap,
        i_seq,
        i_flow,
        i_client,
        i_conn,
        i_start,
        i_resp_start,
        i_method,
        i_url,
        i_norm,
        i_ver,
        i_status,
        i_text,
        i_loc,
        i_res,
        i_err_loc,
        i_syn,
        i_cache,
        i_err,
        i_reqh,
        i_resph,
        i_rql,
        i_rqs,
        i_rqt,
        i_rqb,
        i_rsl,
        i_rss,
        i_rst,
        i_rsb,
        i_ua,
        i_key,
    ) = (pos(n) for n in ("id", *EXCHANGE_COLUMNS))

    def make(row: Row) -> Exchange:
        r = (*row, None)
        return Exchange(
            id=r[i_id],
            capture_id=r[i_cap],
            seq=r[i_seq],
            flow_id=r[i_flow],
            client=r[i_client],
            connection=r[i_conn],
            started_at=r[i_start],
            response_started_at=r[i_resp_start],
            method=r[i_method],
            url=r[i_url],
            url_norm=r[i_norm],
            http_version=r[i_ver],
            status=r[i_status],
            status_text=r[i_text],
            location=r[i_loc],
            location_resolved=r[i_res],
            location_error=r[i_err_loc],
            synthetic=bool(r[i_syn]),
            from_cache=bool(r[i_cache]),
            error=r[i_err],
            request_headers=_headers_from(r[i_reqh]),
            response_headers=_headers_from(r[i_resph]),
            request_body=Body(r[i_rql], r[i_rqs], r[i_rqt], r[i_rqb]),
            response_body=Body(r[i_rsl], r[i_rss], r[i_rst], r[i_rsb]),
            user_agent=r[i_ua],
            idempotency_key=r[i_key],
        )

    return make


def _headers_from(text: str | None) -> list[tuple[str, str]]:
    return [tuple(h) for h in json.loads(text)] if text else []


def light_exchange(row: Row) -> Exchange:
    ex_id, capture_id, seq, client, connection, started, url_norm, status, loc, loc_res, synthetic, method = (
        row
    )
    return Exchange(
        capture_id=capture_id,
        seq=seq,
        method=method,
        url=url_norm,
        url_norm=url_norm,
        started_at=started,
        client=client,
        connection=connection,
        status=status,
        location=loc,
        location_resolved=loc_res,
        synthetic=bool(synthetic),
        id=ex_id,
    )
