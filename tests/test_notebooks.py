"""The three notebooks, executed headless with a real Jupyter kernel, on the demo capture by
default and on a live-capture store through $REDIRECT_AUDIT_DB."""

from __future__ import annotations

import os

import nbformat
import pytest
from conftest import ROOT
from nbclient import NotebookClient

pytestmark = pytest.mark.slow

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_there_are_three_small_notebooks_committed_clean():
    assert [p.name for p in NOTEBOOKS] == [
        "01-overview.ipynb",
        "02-chain-explorer.ipynb",
        "03-temporary-redirects.ipynb",
    ]
    for path in NOTEBOOKS:
        book = nbformat.read(path, as_version=4)
        code = [c for c in book.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), f"{path.name} has outputs"
        assert not any("def " in c.source or "lambda" in c.source for c in code), (
            f"{path.name} defines functions"
        )
        assert len(code) <= 12


def execute(path, cwd, env: dict) -> nbformat.NotebookNode:
    book = nbformat.read(path, as_version=4)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update({k: v for k, v in env.items() if v is not None})
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
    try:
        NotebookClient(
            book, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
        ).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return book


def outputs(book) -> str:
    return "\n".join(
        str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", ""))
        for c in book.cells
        if c.cell_type == "code"
        for o in c.outputs
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_runs_on_the_demo_capture_by_default(path, tmp_path):
    book = execute(path, tmp_path, {"REDIRECT_AUDIT_DB": None})
    assert (tmp_path / "redirect-audit-demo.db").exists()  # built where the notebook runs, nowhere else
    images = sum(
        "image/png" in o.get("data", {}) for c in book.cells if c.cell_type == "code" for o in c.outputs
    )
    assert images == {"01-overview": 4, "02-chain-explorer": 0, "03-temporary-redirects": 1}[path.stem]
    text = outputs(book)
    assert "Error" not in text and "Traceback" not in text
    # nothing on stderr either (matplotlib's date locator warned on captures years apart)
    said = [o.get("text", "") for c in book.cells if c.cell_type == "code" for o in c.outputs]
    assert [
        t
        for c in book.cells
        for o in c.get("outputs", [])
        if o.get("name") == "stderr"
        for t in [o.get("text")]
    ] == [], said
    if path.stem == "02-chain-explorer":
        assert "credentials_forwarded" in text and "cross_origin" in text and "body_sha256_before" in text
    if path.stem == "03-temporary-redirects":
        assert "max-age=2592000" in text  # the cacheable 307 of the demo


def test_runs_on_a_store_named_by_the_environment(tmp_path):
    from analyzer.demo_store import build_demo_store

    db = build_demo_store(str(tmp_path / "elsewhere.db"))
    book = execute(NOTEBOOKS[0], tmp_path / "..", {"REDIRECT_AUDIT_DB": db})
    assert db in outputs(book)
    assert not (tmp_path.parent / "redirect-audit-demo.db").exists()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_every_cell_has_an_id_as_nbformat_4_5_requires(path):
    """Read raw (nbformat.read would fill missing ids in and only warn): every cell has a unique id."""
    import json

    cells = json.loads(path.read_text())["cells"]
    ids = [cell.get("id") for cell in cells]
    assert None not in ids and len(set(ids)) == len(ids)
