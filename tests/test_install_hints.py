"""A missing optional part (the PostgreSQL driver, Dask) is named with the command that
adds it where this redirect-audit was installed: a `uv tool install`, pipx, a checkout's
environment, or pip."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT

from analyzer.installed import how_installed, install_hint


@pytest.mark.parametrize(
    ("marker", "how", "hint"),
    [
        (
            "uv-receipt.toml",
            "uv-tool",
            "`uv tool install --with 'psycopg[binary]' SOURCE` again, SOURCE being what you installed from",
        ),
        ("pipx_metadata.json", "pipx", "`pipx inject redirect-audit 'psycopg[binary]'`"),
        (None, "pip", "`pip install 'redirect-audit[postgres]'`"),
    ],
)
def test_the_environment_says_how_it_was_installed(tmp_path, monkeypatch, marker, how, hint):
    monkeypatch.delenv("UV_RUN_RECURSION_DEPTH", raising=False)
    prefix = tmp_path / "env"
    prefix.mkdir()
    if marker:
        (prefix / marker).write_text("")
    assert how_installed(str(prefix)) == how
    assert install_hint("postgres", str(prefix)) == hint


def test_a_checkout_s_environment_is_synced_with_the_extra(tmp_path, monkeypatch):
    monkeypatch.delenv("UV_RUN_RECURSION_DEPTH", raising=False)
    venv = tmp_path / ".venv"
    venv.mkdir()
    (tmp_path / "pyproject.toml").write_text("")
    assert install_hint("dask", str(venv)) == "`uv sync --extra dask` (in the checkout)"
    assert how_installed(str(tmp_path / "elsewhere")) == "pip"
    monkeypatch.setenv("UV_RUN_RECURSION_DEPTH", "1")  # under `uv run`
    assert how_installed(str(tmp_path / "elsewhere")) == "checkout"
    pipx = tmp_path / "pipx"
    pipx.mkdir()
    (pipx / "pipx_metadata.json").write_text("")
    assert install_hint("dask", str(pipx)) == "`pipx inject redirect-audit 'dask[dataframe]' 'distributed'`"


def test_a_uv_tool_install_without_the_driver_names_uv_tool_install(tmp_path):
    """The README's install (`uv tool install .`), for real, into a directory of the test's."""
    uv = os.environ.get("UV") or shutil.which("uv")
    assert uv, "uv runs this suite (the README's `uv run pytest`)"
    env = {
        **{
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("VIRTUAL_ENV", "UV_RUN", "REDIRECT_AUDIT"))
        },
        "UV_TOOL_DIR": str(tmp_path / "tools"),
        "UV_TOOL_BIN_DIR": str(tmp_path / "bin"),
        "UV_PYTHON_DOWNLOADS": "never",
    }
    done = subprocess.run(
        [uv, "tool", "install", "--python", "3.12", str(ROOT)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    tool = Path(tmp_path / "bin" / "redirect-audit")
    said = subprocess.run(
        [str(tool), "findings", "--db", "postgresql://auditor@127.0.0.1:1/audit"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert said.returncode == 2
    assert said.stderr.strip() == (
        "redirect-audit: error: cannot open store postgresql+psycopg://auditor@127.0.0.1:1/audit: its database "
        "driver is not installed (psycopg); install the postgres extra: `uv tool install --with "
        "'psycopg[binary]' SOURCE` again, SOURCE being what you installed from"
    )
