"""A throwaway PostgreSQL server for the tests and benchmarks.

`initdb` into a temporary directory as the unprivileged `postgres` user (the server
refuses to run as root), listening only on a Unix socket in that directory (no TCP
port at all), with durability off (fsync, full-page writes): a test database is thrown
away, and the engine's behaviour under test does not depend on them. Stopped and
removed by `stop()`.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

SERVER_USER = "postgres"


def find_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]))
    return candidates[-1] if candidates else None


def missing() -> str | None:
    """Why no cluster can be started here, or None."""
    for program in ("initdb", "pg_ctl"):
        if find_bin(program) is None:
            return f"PostgreSQL's {program} is not installed (Debian: apt-get install postgresql)"
    try:
        pwd.getpwnam(SERVER_USER)
    except KeyError:
        return f"there is no {SERVER_USER!r} user to run the server as (Debian's postgresql package makes it)"
    if shutil.which("runuser") is None and os.geteuid() == 0:
        return "runuser is missing (util-linux)"
    return None


class Cluster:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="ra-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self._names = itertools.count(1)
        self._spare: list[str] = []  # emptied databases, handed out again
        self._with_schema: list[str] = []  # emptied of rows, the store's schema kept
        self._schema: list[tuple[str, ...]] | None = None
        user = pwd.getpwnam(SERVER_USER)
        os.chown(self.dir, user.pw_uid, user.pw_gid)
        os.chmod(self.dir, 0o755)
        try:
            self._as_server(
                find_bin("initdb"),
                "-D",
                str(self.data),
                "-A",
                "trust",
                "-U",
                SERVER_USER,
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            )
            options = (
                f"-k {self.dir} -c listen_addresses='' -c fsync=off -c full_page_writes=off "
                f"-c synchronous_commit=off -c max_connections=200 -c shared_buffers=128MB"
            )
            self._as_server(
                find_bin("pg_ctl"),
                "-D",
                str(self.data),
                "-l",
                str(self.log),
                "-o",
                options,
                "-w",
                "-t",
                "60",
                "start",
            )
        except BaseException:
            self.stop()
            raise

    def _as_server(self, *argv: str) -> None:
        command = list(argv)
        if os.geteuid() == 0:
            command = ["runuser", "-u", SERVER_USER, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=self.dir)
        if done.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(argv[:2])} failed: {done.stderr.strip()} {log[-2000:]}")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{SERVER_USER}@/{database}?host={self.dir}"

    def new_database(self, prefix: str = "t") -> str:
        """A fresh empty database; its URL. One a test gave back (`recycle`) is emptied and
        handed out again: CREATE DATABASE copies a template of some 7 MB each time."""
        import psycopg

        if self._spare:
            return self._spare.pop()
        name = f"{prefix}_{os.getpid()}_{next(self._names)}"
        with psycopg.connect(
            host=str(self.dir), user=SERVER_USER, dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def new_store_database(self) -> str:
        """A database for a new store: empty of rows, with the store's schema already made
        when one is at hand (making it costs ~0.15 s of DDL a test); see `recycle`."""
        return self._with_schema.pop() if self._with_schema else self.new_database()

    def recycle(self, url: str, *, keep_schema: bool = False) -> None:
        """Empty a database a test is done with, for the next test; one that cannot be
        emptied is left alone. Its connections are closed; then its rows go (ids start at 1
        again) and it is handed out by `new_store_database()` if `keep_schema` and its schema
        is exactly the one a new store gets, else its schema goes and `new_database()` hands
        it out."""
        import psycopg

        name = url.split("@/", 1)[1].split("?")[0]
        try:
            with psycopg.connect(host=str(self.dir), user=SERVER_USER, dbname=name, autocommit=True) as conn:
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
                shape = _schema_of(conn)
                if keep_schema and shape and shape == self._store_schema():
                    tables = ", ".join(f'"{t}"' for t in sorted({t for t, *_ in shape}))
                    conn.execute(f"TRUNCATE {tables} RESTART IDENTITY CASCADE")
                    self._with_schema.append(url)
                    return
                conn.execute("DROP SCHEMA public CASCADE")
                conn.execute("CREATE SCHEMA public")
        except psycopg.Error:
            return
        self._spare.append(url)

    def _store_schema(self) -> list[tuple[str, ...]]:
        """The schema `open_store` makes from nothing, as `_schema_of` reads it."""
        if self._schema is None:
            import psycopg

            from analyzer.store import open_store

            url = self.new_database()
            open_store(url).close()
            name = url.split("@/", 1)[1].split("?")[0]
            with psycopg.connect(host=str(self.dir), user=SERVER_USER, dbname=name, autocommit=True) as conn:
                self._schema = _schema_of(conn)
        return self._schema

    def drop_database(self, url: str) -> None:
        import psycopg

        name = url.split("@/", 1)[1].split("?")[0]
        with psycopg.connect(
            host=str(self.dir), user=SERVER_USER, dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        """Stop the server and remove its files. A run leaves a database per test, some
        hundred thousand files that take seconds to delete: a process of their own does
        it, so the run does not wait."""
        if (self.data / "postmaster.pid").exists():
            try:
                self._as_server(find_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
            except Exception:
                pass
        subprocess.Popen(
            ["rm", "-rf", "--", str(self.dir)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )


def _schema_of(conn) -> list[tuple[str, ...]]:
    """Tables, columns with their types, indexes and the migration revision in `public`."""
    columns = conn.execute(
        "SELECT table_name, column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = 'public' ORDER BY 1, 2"
    ).fetchall()
    indexes = conn.execute(
        "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1, 2"
    ).fetchall()
    revision = []
    if any(t == "alembic_version" for t, *_ in columns):
        revision = [
            (
                "alembic_version",
                "revision",
                *(r for (r,) in conn.execute("SELECT version_num FROM alembic_version")),
            )
        ]
    return [tuple(r) for r in columns] + [tuple(r) for r in indexes] + revision
