"""`redirect-audit db upgrade` and `db current`: a store's schema brought up to this
release's through the Alembic migrations in analyzer/migrations.

Only these commands alter a store's schema. Stores made before migrations existed
(schema version 1, no alembic_version table) are stamped with revision 0001 first. The
whole upgrade runs in one transaction under the store's schema lock: on SQLite and on
PostgreSQL it either completes or leaves the store as it was.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import inspect, select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

if TYPE_CHECKING:
    from alembic.config import Config

from analyzer.store import alembic_version, lock_schema, make_engine, meta
from analyzer.storeread import (
    DEFAULT_WAIT,
    SCHEMA_VERSION,
    StoreError,
    describe_error,
    missing_driver,
    require_store,
    resolve_db_url,
    revision_of,
    url_shown,
)

MIGRATIONS = Path(__file__).with_name("migrations")


@dataclass(frozen=True)
class SchemaState:
    version: int  # meta.schema_version
    revision: str | None  # alembic_version; None for a store from before migrations
    head: str  # the newest revision this release ships

    @property
    def current(self) -> bool:
        return self.version == SCHEMA_VERSION and self.revision == self.head


def _config(conn: Connection) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = conn
    return config


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory(str(MIGRATIONS)).get_current_head()
    if head is None:
        raise RuntimeError(f"no migration in {MIGRATIONS}: the package is damaged")
    return head


def _state(conn: Connection, url: str) -> SchemaState:
    if not inspect(conn).has_table("meta"):
        raise StoreError(f"{url_shown(url)} is not a redirect-audit store (no meta table)")
    version = conn.execute(select(meta.c.value).where(meta.c.key == "schema_version")).scalar()
    if version is None or not str(version).isdigit():
        raise StoreError(f"{url_shown(url)} is not a redirect-audit store (schema version {version!r})")
    revision = None
    if inspect(conn).has_table("alembic_version"):
        revision = conn.execute(select(alembic_version.c.version_num)).scalar()
    return SchemaState(int(version), revision, head_revision())


@contextmanager
def _engine_on(db: str | None, wait: float) -> Iterator[tuple[Engine, str]]:
    """An engine on an existing store; the driver's errors as one-line StoreErrors."""
    url = resolve_db_url(db)
    require_store(url)
    engine = None
    try:
        engine = make_engine(url, wait)
        yield engine, url
    except SQLAlchemyError as exc:
        raise StoreError(describe_error(exc, url, wait)) from None
    except ImportError as exc:
        raise StoreError(missing_driver(url, exc)) from None
    finally:
        if engine is not None:
            engine.dispose()


def schema_state(db: str | None, wait: float = DEFAULT_WAIT) -> SchemaState:
    """The store's schema version and revision, read without changing anything."""
    with _engine_on(db, wait) as (engine, url), engine.connect() as conn:
        return _state(conn, url)


def upgrade(db: str | None, wait: float = DEFAULT_WAIT) -> tuple[SchemaState, SchemaState]:
    """Upgrade the store to this release's schema; the states before and after."""
    from alembic import command

    with _engine_on(db, wait) as (engine, url), engine.begin() as conn:
        lock_schema(conn)
        before = _state(conn, url)
        if before.version > SCHEMA_VERSION:
            raise StoreError(
                f"store {url_shown(url)} has schema version {before.version}, newer than this "
                f"release's {SCHEMA_VERSION}: upgrade redirect-audit instead"
            )
        if before.revision is None:  # made before migrations: stamp the revision its version is
            alembic_version.create(conn, checkfirst=True)
            conn.execute(alembic_version.insert().values(version_num=revision_of(before.version)))
        command.upgrade(_config(conn), "head")
        return before, _state(conn, url)


def create_at(url: str, revision: str) -> None:
    """An empty store at an older revision (tests: a store as an older release made it)."""
    from alembic import command

    engine = make_engine(resolve_db_url(url))
    try:
        with engine.begin() as conn:
            command.upgrade(_config(conn), revision)
    finally:
        engine.dispose()
