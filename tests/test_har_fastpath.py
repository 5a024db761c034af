"""The fast HAR path (verified blocks, worker processes) must store exactly what the
streaming parser stores, and must refuse what is not JSON."""

from __future__ import annotations

import json

import pytest
from conftest import CORPUS
from sqlalchemy import select

from analyzer.ingest import ImportError_, import_har
from analyzer.ingest.harsplit import Blocks, entries_offset
from analyzer.store import EXCHANGE_COLUMNS, captures, exchanges

GOOD = sorted((CORPUS / "good").glob("*.har"))
COMPARED = [c for c in EXCHANGE_COLUMNS if c != "capture_id"]


def stored_rows(store, capture_id: int) -> list[tuple]:
    cols = [exchanges.c[name] for name in COMPARED]
    with store.begin() as conn:
        stmt = select(*cols).where(exchanges.c.capture_id == capture_id).order_by(exchanges.c.seq)
        rows = [list(r) for r in conn.execute(stmt)]
    at = COMPARED.index("client")
    for row in rows:  # the client names the capture; everything else must match exactly
        row[at] = row[at].replace(f"har:{capture_id}", "har:N")
    return [tuple(r) for r in rows]


def capture_sha(store, capture_id: int) -> str:
    with store.begin() as conn:
        return conn.execute(select(captures.c.sha256).where(captures.c.id == capture_id)).scalar_one()


def both_ways(store, path, **fast_kwargs):
    fast = import_har(store, path, force=True, **fast_kwargs)
    slow = import_har(store, path, fast=False, force=True)  # the same file a second time, on purpose
    return fast, slow


@pytest.mark.parametrize("path", GOOD, ids=[p.name for p in GOOD])
def test_fast_path_takes_every_corpus_file_without_falling_back(path):
    with open(path, "rb") as fh:
        start = entries_offset(fh, 1 << 26)
        fh.seek(start)
        blocks = list(Blocks(fh, start, block=4096))  # small blocks: many cuts per file
    with open(path, "rb") as fh:
        raw = fh.read()
    for _, block, _, offset in blocks:
        assert raw[offset : offset + len(block)] == block
    counts = [c for _, _, c, _ in blocks]
    assert all(c > 0 for c in counts)
    firsts = [f for f, _, _, _ in blocks]
    assert firsts == [sum(counts[:i]) for i in range(len(counts))]


@pytest.mark.parametrize("path", GOOD, ids=[p.name for p in GOOD])
def test_fast_and_streaming_paths_store_the_same_rows(store, path):
    fast, slow = both_ways(store, path, workers=0, block_size=4096)
    assert (fast.entries, fast.warnings) == (slow.entries, slow.warnings)
    assert stored_rows(store, fast.capture_id) == stored_rows(store, slow.capture_id)
    assert capture_sha(store, fast.capture_id) == capture_sha(store, slow.capture_id)


def entry(i: int, extra: dict | None = None) -> dict:
    return {
        "startedDateTime": f"2026-11-01T00:00:{i % 60:02d}.{i:06d}Z",
        "time": 1,
        "request": {
            "method": "POST" if i % 3 == 0 else "GET",
            "url": f"https://a.test/p/{i}?token=t{i}",
            "httpVersion": "HTTP/1.1",
            "headers": [
                {"name": "Authorization", "value": f"Bearer {i}"},
                {"name": "Accept", "value": "*/*"},
            ],
            "postData": {"mimeType": "text/plain", "text": '}, {"time": 1}'} if i % 3 == 0 else None,
        },
        "response": {
            "status": 302 if i % 4 == 0 else 200,
            "statusText": "",
            "httpVersion": "HTTP/1.1",
            "headers": [{"name": "Location", "value": f"/p/{i + 1}"}] if i % 4 == 0 else [],
            "content": {"size": 3, "mimeType": "text/plain", "text": "abc"},
            "redirectURL": "",
        },
        "timings": {"send": 0, "wait": 1, "receive": 0},
        **(extra or {}),
    }


def write_har(path, entries: list[dict], tail: str = "") -> None:
    path.write_text(
        json.dumps({"log": {"version": "1.2", "creator": {"name": "t", "version": "1"}, "entries": entries}})[
            :-2
        ]
        + tail
        + "}}"
    )


def test_worker_processes_store_the_same_rows_as_the_streaming_parser(store, tmp_path):
    path = tmp_path / "many.har"
    write_har(path, [entry(i) for i in range(3000)])
    fast, slow = both_ways(store, path, workers=2, block_size=16 * 1024)
    assert fast.entries == slow.entries == 3000
    assert stored_rows(store, fast.capture_id) == stored_rows(store, slow.capture_id)


def test_lookalike_entry_boundaries_inside_entries_do_not_fool_the_cutter(store, tmp_path):
    # Arrays of objects whose first key is an entry key ("time", "_x") sit inside the
    # entries, and strings hold "}, {" too; a cut there must fail verification.
    nested = {
        "_webSocketMessages": [{"time": n, "opcode": 1, "data": "x"} for n in range(40)],
        "_meta": [{"_a": 1}, {"_b": 2}] * 20,
    }
    path = tmp_path / "lookalike.har"
    write_har(path, [entry(i, nested) for i in range(400)])
    fast, slow = both_ways(store, path, workers=0, block_size=2048)
    assert fast.entries == slow.entries == 400
    assert stored_rows(store, fast.capture_id) == stored_rows(store, slow.capture_id)


def test_entries_followed_by_more_log_fields_import(store, tmp_path):
    path = tmp_path / "pages-after.har"
    write_har(path, [entry(i) for i in range(50)], tail=', "pages": [{"id": "p", "startedDateTime": "x"}]')
    result = import_har(store, path, workers=0, block_size=1024)
    assert result.entries == 50


@pytest.mark.parametrize(
    "cut, kept, damage",
    [
        (lambda text: text[:-1], 200, "after its entries"),  # the final brace is missing
        (lambda text: text.replace("]}}", "] }"), 200, "after its entries"),
        (lambda text: text[: text.index('"startedDateTime"', 20000)], None, "in entry "),  # cut mid-entries
    ],
)
def test_broken_files_are_refused_by_the_fast_path_with_strict_and_salvaged_without(
    store, tmp_path, cut, kept, damage
):
    """The block reader writes entries before it meets the damage: with --strict the
    file is refused and nothing of it stays; without, the complete entries stay."""
    path = tmp_path / "broken.har"
    write_har(path, [entry(i) for i in range(200)])
    path.write_text(cut(path.read_text()))
    with pytest.raises(ImportError_, match="refused \\(--strict\\)"):
        import_har(store, path, workers=0, block_size=1024, strict=True)
    with store.begin() as conn:
        assert conn.execute(select(exchanges.c.id)).first() is None
        assert conn.execute(select(captures.c.id)).first() is None
    result = import_har(store, path, workers=0, block_size=1024)
    assert result.damage is not None and damage in result.damage, result.damage
    assert kept is None or result.entries == kept
    assert 0 < result.entries <= 200


def test_a_non_object_entry_is_named_with_its_index(store, tmp_path):
    path = tmp_path / "odd.har"
    write_har(path, [entry(0), entry(1), 7, entry(3)])
    with pytest.raises(ImportError_, match="entry 2 is not an object"):
        import_har(store, path, workers=0)


def test_without_recognizable_boundaries_the_whole_array_is_verified_as_one(tmp_path):
    path = tmp_path / "unknown-keys.har"
    path.write_text('{"log": {"entries": [' + ", ".join(f'{{"x": {i}}}' for i in range(5000)) + "]}}")
    with open(path, "rb") as fh:
        start = entries_offset(fh, 1 << 26)
        fh.seek(start)
        blocks = list(Blocks(fh, start, block=1024))
    assert [(first, count) for first, _, count, _ in blocks] == [(0, 5000)]


def test_what_the_block_parser_refuses_goes_to_the_streaming_parser(store, tmp_path):
    # A lone surrogate escape (a JS string cut in half) is JSON that ijson takes and
    # msgspec does not: the file is imported by ijson instead, with nothing lost.
    path = tmp_path / "lone-surrogate.har"
    write_har(path, [entry(i) for i in range(3000)])
    text = path.read_text()
    at = text.index('"text": "abc"', len(text) // 2)
    path.write_text(text[:at] + '"text": "ab\\ud800c"' + text[at + len('"text": "abc"') :])
    for workers in (0, 2):
        fast, slow = both_ways(store, path, workers=workers, block_size=16 * 1024)
        assert fast.entries == slow.entries == 3000
        assert stored_rows(store, fast.capture_id) == stored_rows(store, slow.capture_id)


def test_a_number_neither_parser_can_hold_is_refused_cleanly(store, tmp_path):
    # In a field the importer reads; one it skips (`time`) the typed block decoder never parses.
    path = tmp_path / "huge-number.har"
    write_har(path, [entry(i) for i in range(300)])
    path.write_text(path.read_text().replace('"wait": 1,', '"wait": 1e400,', 1))
    with pytest.raises(ImportError_, match=r"huge-number\.har: not valid JSON: .*overflow"):
        import_har(store, path, workers=0, block_size=1024)
    with store.begin() as conn:
        assert conn.execute(select(captures.c.id)).first() is None


def test_integers_beyond_64_bits_are_left_empty_not_fatal(store, tmp_path):
    path = tmp_path / "big-int.har"
    write_har(path, [entry(i) for i in range(10)])
    path.write_text(
        path.read_text().replace(
            '"size": 3, "mimeType": "text/plain", "text": "abc"',
            '"size": 123456789012345678901234, "mimeType": "text/plain"',
            1,
        )
    )
    result = import_har(store, path, workers=0)
    assert result.entries == 10
    with store.begin() as conn:
        sizes = conn.execute(select(exchanges.c.resp_body_len).order_by(exchanges.c.seq)).scalars().all()
    assert sizes[0] is None and sizes[1:] == [3] * 9


def test_containers_of_the_wrong_type_are_read_as_absent_by_both_paths(store, tmp_path):
    # The block decoder is typed; one odd container sends its block to the generic
    # decoder, which must read it exactly as the streaming parser does.
    odd = [
        entry(0, {"request": "GET /"}),
        entry(1, {"response": ["200"]}),
        entry(2, {"timings": "fast"}),
        entry(3),
        entry(4),
    ]
    odd[3]["request"]["headers"] = [{"name": "X-Count", "value": 5}, "Accept: */*", {"name": "Accept"}]
    odd[3]["request"]["postData"] = ["a=1"]
    odd[4]["response"]["headers"] = {"Location": "/elsewhere"}
    odd[4]["response"]["content"] = "abc"
    path = tmp_path / "odd-shapes.har"
    write_har(path, odd + [entry(i) for i in range(5, 300)])
    fast, slow = both_ways(store, path, workers=0, block_size=1024)
    assert fast.entries == slow.entries == 300
    rows = stored_rows(store, fast.capture_id)
    assert rows == stored_rows(store, slow.capture_id)
    col = {name: COMPARED.index(name) for name in COMPARED}
    first, second, third, fourth, fifth = rows[:5]
    assert (first[col["method"]], first[col["url"]], first[col["status"]]) == ("GET", "", 302)
    assert (second[col["status"]], second[col["error"]]) == (None, "no response")
    assert third[col["response_started_at"]] == third[col["started_at"]]
    assert json.loads(fourth[col["request_headers"]]) == [["X-Count", "5"], ["Accept", ""]]
    assert (fourth[col["req_body_len"]], fourth[col["req_body_sha256"]]) == (None, None)
    assert (fifth[col["status"]], fifth[col["location"]], fifth[col["resp_body_len"]]) == (302, None, None)
