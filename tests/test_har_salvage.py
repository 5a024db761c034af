"""A HAR cut off or damaged part way (browsers and upload limits truncate exports) keeps
its complete entries before the damage: `import-har` says where the file broke and what it
kept, marks the capture damaged and exits 0 with a warning; `--strict` refuses the file.
On a real Chrome export cut at 1 MB, and on cut points at every entry boundary and inside
every entry of a re-serialized real export."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from conftest import CORPUS, run_cli

from analyzer.ingest.common import ImportError_
from analyzer.ingest.har import import_har
from analyzer.store import open_store

CHROME = CORPUS / "good" / "chrome__mitmproxy__timed-out.har"  # 1.2 MB, 33 entries
SMALL = CORPUS / "good" / "chrome-har__sitespeedio__hsts-internal-redirect.har"  # 21 entries


def stored(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "SELECT seq, method, url, status, started_at FROM exchanges ORDER BY seq"
        ).fetchall()


def test_a_real_chrome_export_cut_at_1_mb_keeps_its_complete_entries(tmp_path):
    cut = tmp_path / "cut.har"
    cut.write_bytes(CHROME.read_bytes()[:1_000_000])
    whole_db, cut_db = tmp_path / "whole.db", tmp_path / "cut.db"
    assert run_cli("import-har", str(CHROME), "--db", str(whole_db)).returncode == 0
    done = run_cli("import-har", str(cut), "--db", str(cut_db))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"imported 24 entries from {cut} as capture 1"
    assert done.stderr.strip() == (
        f"redirect-audit: warning: {cut}: the file ends at byte 1,000,000, in entry 24 (0-based), before its "
        "JSON is complete; the 24 complete entries before it were imported; its capture is marked damaged "
        "(`captures` shows it; --strict refuses such a file)"
    )
    assert stored(cut_db) == stored(whole_db)[:24]  # the same rows as the whole file's first 24
    shown = run_cli("captures", "--db", str(cut_db))
    assert "capture 1 is damaged: the file ends at byte 1,000,000, in entry 24 (0-based)" in shown.stdout
    assert run_cli("analyze", "--db", str(cut_db)).returncode == 0
    strict = run_cli("import-har", "--strict", str(cut), "--db", str(tmp_path / "strict.db"))
    assert strict.returncode == 2
    assert strict.stderr.strip() == (
        f"redirect-audit: error: {cut}: the file ends at byte 1,000,000, in entry 24 (0-based), before its JSON "
        "is complete: refused (--strict); without --strict the 24 complete entries before the damage are imported"
    )
    assert stored(tmp_path / "strict.db") == []


@pytest.fixture(scope="module")
def reserialized(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, list[tuple[int, int]], Path]:
    """A real export written out again with known offsets: (bytes, each entry's [start, end)), and a
    store of the whole file."""
    har = json.loads(SMALL.read_text())
    entries = har["log"].pop("entries")
    head = json.dumps(har)[:-2] + ', "entries": [\n'  # `{"log": {..., "entries": [`
    text, spans = head.encode(), []
    for i, entry in enumerate(entries):
        piece = json.dumps(entry).encode()
        spans.append((len(text), len(text) + len(piece)))
        text += piece + (b",\n" if i < len(entries) - 1 else b"\n")
    text += b"]}}\n"
    where = tmp_path_factory.mktemp("salvage")
    (where / "whole.har").write_bytes(text)
    store = open_store(str(where / "whole.db"))
    assert import_har(store, where / "whole.har", workers=0).entries == len(entries)
    store.engine.dispose()
    return text, spans, where / "whole.db"


def test_every_entry_boundary_and_inside_every_entry(reserialized, tmp_path):
    text, spans, whole_db = reserialized
    whole = stored(whole_db)
    cuts = []
    for i, (start, end) in enumerate(spans):
        cuts += [(start, i), ((start + end) // 2, i), (end - 1, i), (end, i + 1), (end + 1, i + 1)]
    for n, (cut, kept) in enumerate(cuts):
        path = tmp_path / f"cut{n}.har"
        path.write_bytes(text[:cut])
        store = open_store(str(tmp_path / f"cut{n}.db"))
        if kept == 0:  # no complete entry to keep: refused as before
            with pytest.raises(ImportError_, match="not valid JSON"):
                import_har(store, path, workers=0)
            store.engine.dispose()
            continue
        result = import_har(store, path, workers=0)
        store.engine.dispose()
        assert result.entries == kept, (cut, kept)
        assert result.damage is not None and result.damage.startswith(
            f"the file ends at byte {cut:,}, in entry {kept} (0-based), before its JSON is complete"
        ), result.damage
        assert stored(tmp_path / f"cut{n}.db") == whole[:kept], cut
        (tmp_path / f"cut{n}.db").unlink()
    assert len(cuts) == 5 * len(spans) > 100


def test_damage_inside_the_file_and_after_the_entries(reserialized, tmp_path):
    text, spans, whole_db = reserialized
    whole = stored(whole_db)
    start, _ = spans[7]
    broken = text[: start + 10] + b"\x00garbage" + text[start + 10 :]  # entry 7 damaged in the middle
    path = tmp_path / "broken.har"
    path.write_bytes(broken)
    store = open_store(str(tmp_path / "broken.db"))
    result = import_har(store, path, workers=0)
    assert result.entries == 7 and stored(tmp_path / "broken.db") == whole[:7]
    assert result.damage.startswith("the file is damaged in entry 7 (0-based), within its first "), (
        result.damage
    )
    tail = tmp_path / "tail.har"  # every entry complete, the document not closed
    tail.write_bytes(text[: spans[-1][1] + 3])
    assert import_har(store, tail, workers=0).damage.startswith(
        f"the file ends at byte {spans[-1][1] + 3:,}, after its entries"
    )
    with pytest.raises(ImportError_, match="refused \\(--strict\\); without --strict the 7 complete entries"):
        import_har(store, path, workers=0, force=True, strict=True)
    head = tmp_path / "head.har"  # cut before the entries began: nothing to keep, an error as before
    head.write_bytes(text[: spans[0][0] - 5])
    with pytest.raises(ImportError_, match="not valid JSON"):
        import_har(store, head, workers=0)
    store.engine.dispose()


def test_the_html_report_says_which_capture_is_damaged(tmp_path):
    cut = tmp_path / "cut.har"
    cut.write_bytes(CHROME.read_bytes()[:1_000_000])
    db = str(tmp_path / "cut.db")
    assert run_cli("import-har", str(cut), "--db", db).returncode == 0
    out = tmp_path / "r.html"
    done = run_cli("findings", "--db", db, "-f", "html", "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert (
        '<p class="damaged"><b>Damaged file:</b> <code>cut.har</code>: the file ends at byte 1,000,000, in entry '
        "24 (0-based), before its JSON is complete; the 24 complete entries before it were imported.</p>"
    ) in out.read_text()
