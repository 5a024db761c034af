"""Where a store is, whether it exists, whether its results are current, and reading it cheaply.

The commands that read (`findings`, `chains`, `check`, ...) start here. On SQLite they
read through the standard library's `sqlite3`, so that answering needs neither
SQLAlchemy nor the analysis, whose imports alone take longer than the whole answer;
any other engine is read through SQLAlchemy with the same SQL. The SQL here is portable
and takes named `:parameters`, which both paths understand.

A store knows whether its results are current: `meta.generation` is advanced by every
transaction that adds or removes exchanges, and `analyze` records the generation it
read (`meta.analyzed_generation`) with the options it ran with.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from analyzer.errors import ReportedError

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine

Row = tuple[Any, ...]  # one result row, whatever the engine

DB_ENV = "REDIRECT_AUDIT_DB"
DEFAULT_DB = "redirect-audit.db"
DEMO_DB = "redirect-audit-demo.db"  # what `redirect-audit demo` writes
SCHEMA_VERSION = 6  # the schema this release reads and writes; migration revision f"{n:04d}" makes version n
DEFAULT_WAIT = 10.0  # seconds a command waits for another process's write lock

GENERATION = "generation"
ANALYZED_GENERATION = "analyzed_generation"
REPORT_FIGURES = (
    "report_figures"  # the HTML report's figures, drawn once per state of the results (htmlreport)
)
# The revision of the analysis (linking, rules, finding keys). Results an older revision made
# are stale: the next reading command analyzes the store again, as after new exchanges.
# 2: WHATWG Location resolution, store-independent finding keys, first/third party.
# 3: a Location's other forms tried by each redirect's own neighbourhood (time windows).
ANALYSIS_ENGINE = 3
ANALYSIS_OPTIONS = "analysis_options"


class StoreError(ReportedError):
    """The store cannot be opened, read or written; str() is one line a user can act on."""


class StoreMissing(StoreError):
    """A command that only reads was pointed at a store that does not exist."""


class StoreUnavailable(StoreError):
    """The store refused work as a whole (locked, full, read-only): trying later may help."""


class StoreOutdated(StoreError):
    """The store's schema is older than this release's: `db upgrade` brings it up to date."""


class ValueRefused(StoreError):
    """The database refused a value in a row: trying again never helps. `row` is the row,
    `column` the column when it could be told."""

    def __init__(self, message: str, row: Row | None = None, column: str | None = None):
        super().__init__(message)
        self.row = row
        self.column = column


def resolve_db_url(db: str | None) -> str:
    """--db value, else $REDIRECT_AUDIT_DB, else ./redirect-audit.db; plain paths become SQLite URLs.

    `postgresql://` and `postgres://` mean psycopg 3, the driver of the `postgres` extra.
    """
    value = db or os.environ.get(DB_ENV) or DEFAULT_DB
    if "://" not in value:
        return f"sqlite:///{Path(value).expanduser()}"
    scheme, rest = value.split("://", 1)
    if scheme in ("postgresql", "postgres"):
        return f"postgresql+psycopg://{rest}"
    return value


def sqlite_file(url: str) -> Path | None:
    """The file of a plain SQLite URL; None for other engines, memory and URI-style SQLite URLs."""
    if not url.startswith("sqlite:///") or "?" in url:
        return None
    path = url.removeprefix("sqlite:///")
    return None if path in ("", ":memory:") else Path(path)


def safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    return re.sub(r"^([a-z0-9+.-]+://[^:/@]*):[^@/]*@", r"\1:***@", url, flags=re.IGNORECASE)


def shown(db: str | None) -> str:
    """How to name a store in a message: the path as given for SQLite, else the safe URL."""
    return url_shown(resolve_db_url(db))


def url_shown(url: str) -> str:
    path = sqlite_file(url)
    return str(path) if path is not None else safe_url(url)


def require_store(url: str) -> None:
    """Refuse a SQLite store that does not exist: reading it would report on nothing."""
    path = sqlite_file(url)
    if path is not None and not path.exists():
        where = "" if path.parent.is_dir() else f" (and its directory {path.parent} does not exist)"
        demo = path.with_name(DEMO_DB)
        also = (
            f" (the demo's store is {DEMO_DB}: --db {DEMO_DB})"
            if path.name == DEFAULT_DB and demo.exists()
            else ""
        )
        raise StoreMissing(
            f"no store at {path}{where}: nothing was captured there; create it with "
            f"`import-har FILE --db {path}` or `proxy --db {path}`, or pass the --db of an existing store{also}"
        )


def describe_error(exc: BaseException, url: str, wait: float = DEFAULT_WAIT) -> str:
    """One line for an error the database raised, whichever driver raised it."""
    text = _first_line(exc)
    lowered = text.lower()
    if "database is locked" in lowered or "database table is locked" in lowered:
        return (
            f"store busy: another process holds the write lock on {url_shown(url)}; waited {wait:g} s "
            f"(--wait SECONDS to wait longer)"
        )
    if "disk is full" in lowered or "no space left" in lowered:
        return f"store full: the disk under {url_shown(url)} has no space left ({text})"
    if "readonly database" in lowered or "read-only" in lowered:
        return f"store read-only: {url_shown(url)} cannot be written ({text})"
    if "unable to open database" in lowered:
        return f"cannot open store {url_shown(url)}: {text}"
    if "file is not a database" in lowered or "file is encrypted" in lowered:
        return f"{url_shown(url)} is not a redirect-audit store (not an SQLite database)"
    if (
        "no such table" in lowered
        or "undefinedtable" in lowered
        or ("does not exist" in lowered and "relation" in lowered)
    ):
        return f"{url_shown(url)} is not a redirect-audit store ({text})"
    return f"store {url_shown(url)}: {text}"


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def missing_driver(url: str, exc: ImportError) -> str:
    """The one line for a database URL whose driver is not installed."""
    scheme = url.split("://", 1)[0]
    if scheme.startswith("postgresql"):
        from analyzer.installed import install_hint

        how = f"install the postgres extra: {install_hint('postgres')}"
    else:
        how = f"install the Python driver SQLAlchemy uses for {scheme}://"
    return (
        f"cannot open store {url_shown(url)}: its database driver is not installed ({exc.name or exc}); {how}"
    )


# ---- reading --------------------------------------------------------------------------


class Reader:
    """A read connection: `rows(sql, **params)` whatever the engine."""

    def __init__(self, url: str, wait: float = DEFAULT_WAIT):
        self.url = url
        self.wait = wait
        self._sqlite: sqlite3.Connection | None = None
        self._engine: Engine | None = None
        self._conn: Connection | None = None
        self._in_snapshot = False
        path = sqlite_file(url)
        try:
            if path is not None:
                # mode=rw: never creates a file, and WAL readers need the -shm file writable
                self._sqlite = sqlite3.connect(f"{path.resolve().as_uri()}?mode=rw", uri=True, timeout=wait)
                self._sqlite.execute("PRAGMA query_only=ON")
            else:
                self._connect_sqlalchemy(url)
        except ImportError as exc:
            raise StoreError(missing_driver(url, exc)) from None
        except Exception as exc:
            raise StoreError(describe_error(exc, url, wait)) from None

    def _connect_sqlalchemy(self, url: str) -> None:
        from sqlalchemy import create_engine

        self._engine = engine = create_engine(url)
        self._conn = engine.connect()

    def rows(self, sql: str, **params: Any) -> list[Row]:
        try:
            if self._sqlite is not None:
                return self._sqlite.execute(sql, params).fetchall()
            from sqlalchemy import text

            assert self._conn is not None  # one of the two connections is always open
            return [tuple(r) for r in self._conn.execute(text(sql), params)]
        except Exception as exc:
            raise StoreError(describe_error(exc, self.url, self.wait)) from None

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """Reads inside see one state of the store, whatever other processes commit meanwhile
        (a chain's hops and the exchanges they point at are read by separate queries).
        Inside another snapshot it reads in that one."""
        if self._in_snapshot:
            yield
            return
        self._in_snapshot = True
        try:
            yield from self._snapshot()
        finally:
            self._in_snapshot = False

    def _snapshot(self) -> Iterator[None]:
        if self._sqlite is not None:
            self._sqlite.execute("BEGIN")  # WAL: the first read fixes what the others see
            try:
                yield
            finally:
                self._sqlite.rollback()
            return
        assert self._conn is not None
        conn = self._conn
        conn.rollback()
        level = conn.get_isolation_level()
        conn.execution_options(isolation_level="REPEATABLE READ")
        try:
            yield
        finally:
            conn.rollback()
            conn.execution_options(isolation_level=level)

    def value(self, sql: str, **params: Any) -> Any:
        found = self.rows(sql, **params)
        return found[0][0] if found else None

    def close(self) -> None:
        if self._sqlite is not None:
            self._sqlite.close()
        if self._conn is not None:
            self._conn.close()
        if self._engine is not None:
            self._engine.dispose()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_reader(db: str | None, wait: float = DEFAULT_WAIT) -> Reader:
    """A reader on an existing store (a missing SQLite file is refused, never created)."""
    url = resolve_db_url(db)
    require_store(url)
    reader = Reader(url, wait)
    try:
        check_schema(reader)
    except BaseException:
        reader.close()
        raise
    return reader


@dataclass(frozen=True)
class StoreState:
    """What a reading command needs to know before it answers."""

    generation: int  # advanced by every change to the exchanges
    analyzed: int | None  # the generation the last analysis read; None: never analyzed
    options: dict[str, Any] | None  # the options of the last analysis
    exchanges: int  # -1: not counted

    @property
    def is_current(self) -> bool:
        return (
            self.analyzed is not None
            and self.analyzed == self.generation
            and (self.options or {}).get("engine") == ANALYSIS_ENGINE
        )

    @property
    def older_engine(self) -> bool:
        """Analyzed by an older redirect-audit (another revision of the analysis)."""
        return self.analyzed is not None and (self.options or {}).get("engine") != ANALYSIS_ENGINE


META_SQL = "SELECT key, value FROM meta WHERE key <> :figures"  # not the report's cached figures


def check_schema(reader: Reader) -> dict[str, str]:
    """The store's meta table, after checking that this release can read it."""
    meta: dict[str, str] = dict(reader.rows(META_SQL, figures=REPORT_FIGURES))
    version = meta.get("schema_version")
    if version is None:
        raise StoreError(f"{url_shown(reader.url)} is not a redirect-audit store (no schema version)")
    check_version(version, reader.url)
    return meta


def revision_of(version: int) -> str:
    """The migration revision that makes schema version `version` (analyzer/migrations)."""
    return f"{version:04d}"


def check_version(version: str, url: str) -> None:
    """Refuse a store whose schema this release does not read: an older one with the
    command that upgrades it (nothing is altered without being asked), a newer one plainly."""
    try:
        number = int(version)
    except ValueError:
        raise StoreError(
            f"{url_shown(url)} is not a redirect-audit store (schema version {version!r})"
        ) from None
    if number < SCHEMA_VERSION:
        path = sqlite_file(url)
        again = f"--db {path}" if path is not None else "and the same --db"
        raise StoreOutdated(
            f"store {url_shown(url)} has schema version {number}, older than this release's {SCHEMA_VERSION}; "
            f"upgrade it with `db upgrade {again}` (its captures are kept; back it up first "
            f"if an older redirect-audit must still read it)"
        )
    if number > SCHEMA_VERSION:
        raise StoreError(
            f"store {url_shown(url)} has schema version {number}, written by a newer "
            f"redirect-audit; this one reads version {SCHEMA_VERSION}: upgrade redirect-audit"
        )


def store_state(reader: Reader, count: bool = True) -> StoreState:
    """Generations, last analysis options and (with `count`) how many exchanges are stored."""
    meta: dict[str, str] = dict(reader.rows(META_SQL, figures=REPORT_FIGURES))
    analyzed = meta.get(ANALYZED_GENERATION)
    options = meta.get(ANALYSIS_OPTIONS)
    return StoreState(
        generation=int(meta.get(GENERATION) or 0),
        analyzed=None if analyzed is None else int(analyzed),
        options=json.loads(options) if options else None,
        exchanges=(reader.value("SELECT COUNT(*) FROM exchanges") or 0) if count else -1,
    )
