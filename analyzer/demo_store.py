"""The bundled demo capture as a store: what `redirect-audit demo` and the notebooks open."""

from __future__ import annotations

import os
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from analyzer.analysis import analyze
from analyzer.ingest import import_har
from analyzer.store import open_store
from analyzer.storeread import DEMO_DB


def build_demo_store(db: str = DEMO_DB, report: Callable[[str], None] | None = None) -> str:
    """(Re)create `db` from the bundled HAR files and analyze it; returns db."""
    if "://" not in db:
        for suffix in ("", "-wal", "-shm"):
            Path(db + suffix).unlink(missing_ok=True)
    store = open_store(db)
    try:
        for entry in sorted(resources.files("analyzer").joinpath("demo").iterdir(), key=lambda p: p.name):
            if entry.name.endswith(".har"):
                with resources.as_file(entry) as path:
                    result = import_har(store, path)
                if report is not None:
                    report(f"imported {result.entries} entries from demo/{entry.name}")
        analyze(store)
    finally:
        store.close()
    return db


def notebook_store() -> str:
    """$REDIRECT_AUDIT_DB if set (any store, a live capture's too), else the demo store, built once."""
    chosen = os.environ.get("REDIRECT_AUDIT_DB")
    if chosen:
        return chosen
    if not Path(DEMO_DB).exists():
        build_demo_store(DEMO_DB)
    return DEMO_DB
