"""The real HAR corpus: every good file imports, every bad one is refused cleanly."""

from __future__ import annotations

import json

import pytest
from conftest import CORPUS, corpus_facts, require_corpus
from sqlalchemy import func, select

from analyzer.analysis import analyze
from analyzer.ingest import ImportError_, import_har
from analyzer.store import captures, exchanges

GOOD = sorted((CORPUS / "good").glob("*.har"))
BAD = sorted((CORPUS / "bad").glob("*.har"))
THREE_WAY = [
    "chrome61__gatling__redirect-post-303.har",
    "firefox56__gatling__redirect-post-303.har",
    "charles42__gatling__redirect-post-303.har",
]


def count(store, table) -> int:
    with store.begin() as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar_one()


def test_corpus_is_present():
    require_corpus()
    assert len(GOOD) >= 30 and len(BAD) >= 5


@pytest.mark.parametrize("path", GOOD, ids=[p.name for p in GOOD])
def test_good_file_imports_with_its_entry_count(store, path):
    result = import_har(store, path)
    assert result.entries == corpus_facts()[path.name]["entries"]
    assert count(store, exchanges) == result.entries
    analyze(store)  # and every quirk survives analysis


@pytest.mark.parametrize("path", BAD, ids=[p.name for p in BAD])
def test_bad_file_is_refused_and_leaves_nothing(store, path):
    import_har(store, CORPUS / "good" / THREE_WAY[0])
    before = (count(store, captures), count(store, exchanges))
    with pytest.raises(ImportError_) as info:
        import_har(store, path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path))
    assert (count(store, captures), count(store, exchanges)) == before


def test_a_truncated_file_refused_with_strict_rolls_back_entries_already_read(store, tmp_path):
    source = json.loads((CORPUS / "good" / "chrome-har__sitespeedio__yahoo-devtoolslog.har").read_text())
    text = json.dumps(source)
    broken = tmp_path / "cut.har"
    broken.write_text(text[: int(len(text) * 0.8)])
    with pytest.raises(ImportError_, match="before its JSON is complete: refused \\(--strict\\)"):
        import_har(store, broken, strict=True)
    assert count(store, exchanges) == 0 and count(store, captures) == 0
    salvaged = import_har(store, broken)  # without: the complete entries, and where it broke
    assert 0 < salvaged.entries < len(source["log"]["entries"])
    assert count(store, exchanges) == salvaged.entries and count(store, captures) == 1


def test_three_exporters_give_the_same_post_303_get_chain(store):
    shapes = []
    for name in THREE_WAY:
        import_har(store, CORPUS / "good" / name)
    result = analyze(store, keep=True)
    for chain in result.chains:
        shapes.append(
            [
                (
                    h.source.method,
                    h.source.url_norm,
                    h.source.status,
                    h.target.method,
                    h.target.url_norm,
                    h.target.status,
                )
                for h in chain.hops
            ]
        )
    assert len(shapes) == 3
    assert (
        shapes[0]
        == shapes[1]
        == shapes[2]
        == [
            (
                "POST",
                "http://computer-database.gatling.io/computers",
                303,
                "GET",
                "http://computer-database.gatling.io/computers",
                200,
            )
        ]
    )
    assert result.findings == []


def test_chrome_internal_hsts_redirect_is_a_synthesized_hop(store):
    import_har(store, CORPUS / "good" / "chrome-har__sitespeedio__hsts-internal-redirect.har")
    chains = analyze(store, keep=True).chains
    internal = [h for c in chains for h in c.hops if h.source.synthetic]
    assert len(internal) == 2
    for hop in internal:
        assert hop.link == "browser-internal" and hop.target is not None
        assert hop.source.url_norm.startswith("http://") and hop.target.url_norm.startswith("https://")


def test_empty_redirect_url_falls_back_to_location_and_vice_versa(store):
    # Fiddler 2.3 leaves redirectURL empty; Chrome's all-status file has neither: no-location chains.
    import_har(store, CORPUS / "good" / "fiddler23__janodvarko__cnn.har")
    import_har(store, CORPUS / "good" / "chrome__jonluca__all-status-and-methods.har")
    ends = [c.end for c in analyze(store, keep=True).chains]
    assert ends.count("no-location") == 55 and ends.count("final") >= 2


def test_redirects_with_location_are_all_chained(store):
    facts = corpus_facts()
    for path in GOOD:
        import_har(store, path)
    chains = analyze(store, keep=True).chains
    redirect_sources = sum(1 for c in chains for h in c.hops if h.source.location is not None)
    assert redirect_sources == sum(f["redirects_with_location_or_redirectURL"] for f in facts.values())


def test_credentials_never_reach_the_database_in_clear(tmp_path):
    from analyzer.store import open_store

    db = tmp_path / "s.db"
    store = open_store(str(db))
    path = CORPUS / "good" / THREE_WAY[0]
    import_har(store, path)
    store.close()
    cookie = next(
        h["value"]
        for e in json.loads(path.read_text())["log"]["entries"]
        for h in e["request"]["headers"]
        if h["name"].lower() == "cookie"
    )
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert cookie.encode() not in raw and b"hmac:" in raw


def test_every_corpus_file_keeps_its_source_and_licence():
    """A file moved into the repository keeps its credit: listed in SOURCES.tsv and NOTICE.md,
    with the text of its licence beside it."""
    import csv

    sources = {row["file"]: row for row in csv.DictReader((CORPUS / "SOURCES.tsv").open(), delimiter="\t")}
    notice = (CORPUS.parent / "NOTICE.md").read_text()
    for path in GOOD + BAD:
        row = sources.get(path.name)
        assert row is not None, f"{path.name} is not in SOURCES.tsv"
        assert row["folder"] == path.parent.name and len(row["commit"]) == 40
        assert f"`{path.parent.name}/{path.name}`" in notice, f"{path.name} has no notice"
        licence = row["license"].split()[0]
        assert (CORPUS.parent / "LICENSES" / f"{licence}.txt").exists(), licence
