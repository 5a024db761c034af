"""How this redirect-audit was installed, so that a missing optional part is named with the
command that adds it there: a `uv tool install`, a `pipx install`, a checkout's project
environment (`uv sync`/`uv run`), or anything else (pip)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

EXTRAS = {  # an extra, and the packages it adds (pyproject.toml), as `--with` names them
    "postgres": ("psycopg[binary]",),
    "dask": ("dask[dataframe]", "distributed"),
    "spark": ("pyspark",),
}


def how_installed(prefix: str | None = None) -> str:
    """ "uv-tool", "pipx", "checkout" or "pip", from the environment this process runs in."""
    where = Path(prefix or sys.prefix)
    if (where / "uv-receipt.toml").is_file():
        return "uv-tool"
    if (where / "pipx_metadata.json").is_file():
        return "pipx"
    if where.name == ".venv" and (where.parent / "pyproject.toml").is_file():
        return "checkout"
    if os.environ.get("UV_RUN_RECURSION_DEPTH"):
        return "checkout"
    return "pip"


def install_hint(extra: str, prefix: str | None = None) -> str:
    """The command that adds an extra where this redirect-audit is installed."""
    packages = EXTRAS[extra]
    how = how_installed(prefix)
    if how == "uv-tool":
        with_ = " ".join(f"--with '{p}'" for p in packages)
        return f"`uv tool install {with_} SOURCE` again, SOURCE being what you installed from"
    if how == "pipx":
        return f"`pipx inject redirect-audit {' '.join(repr(p) for p in packages)}`"
    if how == "checkout":
        return f"`uv sync --extra {extra}` (in the checkout)"
    return f"`pip install 'redirect-audit[{extra}]'`"
