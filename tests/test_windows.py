"""Analysis in time windows (analyzer.windows) gives the results of analysis in one piece,
ids included, whatever the window size: on the corpus, the rule fixtures, and generated
traffic that crosses every window edge a rule can (chains, duplicate writes, retries
after a challenge, browser pages whose navigation is a redirect)."""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest
from conftest import corpus_store, run_cli
from sqlalchemy import select, text

from analyzer import analysis
from analyzer import windows as chainstream
from analyzer.analysis import _WindowPlan, analyze
from analyzer.ingest.har import import_har
from analyzer.model import Exchange
from analyzer.party import site_of
from analyzer.store import (
    add_capture,
    exchange_row,
    exchanges,
    finish_capture,
    load_exchanges,
    open_store,
    write_exchanges,
)
from analyzer.windows import Snapshot, read_snapshot

WHOLE = 10**9  # a window bigger than any store here: the batch in one piece


def results(db: Path | str) -> dict[str, list[tuple]]:
    """Every stored result, every column, ids included."""
    store = open_store(str(db), create=False)
    with store.engine.connect() as conn:
        out = {
            table: [tuple(row) for row in conn.execute(text(f"SELECT * FROM {table} ORDER BY {order}"))]
            for table, order in (("chains", "id"), ("hops", "chain_id, idx"), ("findings", "id"))
        }
    store.engine.dispose()
    return out


def analyzed(base: Path, tmp_path: Path, window: int, batch: int = 200_000) -> dict[str, list[tuple]]:
    """A copy of the store, analyzed afresh with this window size."""
    db = tmp_path / f"w{window}-b{batch}.db"
    shutil.copy(base, db)
    store = open_store(str(db), create=False)
    analyze(store, full=True, window_exchanges=window, batch_exchanges=batch)
    store.engine.dispose()
    return results(db)


def windows_of(db: Path, window: int) -> int:
    """How many windows the store's (single) batch is cut into."""
    store = open_store(str(db), create=False)
    with store.engine.connect() as conn:
        clients = sorted(set(conn.execute(select(exchanges.c.client)).scalars()))
        sizes = Counter(conn.execute(select(exchanges.c.client)).scalars())
        count = len(_WindowPlan(dict(sizes), window).windows(conn, clients))
    store.engine.dispose()
    return count


def third_party_by_navigation(db: Path) -> dict[int, bool]:
    """Each page chain's verdict worked out here from the generator's design: a page's
    first-party sites are those of its navigation (its first exchange) and, when that is
    a redirect, of the chain it starts; a chain is third party when no hop has an end on one."""
    store = open_store(str(db), create=False)
    with store.engine.connect() as conn:
        hops = conn.execute(
            text(
                "SELECT c.id, c.client, s.url, t.url, s.location_resolved FROM chains c "
                "JOIN hops h ON h.chain_id = c.id JOIN exchanges s ON s.id = h.from_exchange_id "
                "LEFT JOIN exchanges t ON t.id = h.to_exchange_id WHERE c.client LIKE 'har:%/%' ORDER BY c.id, h.idx"
            )
        ).all()
        firsts = dict(
            conn.execute(
                text(
                    "SELECT client, id FROM exchanges e WHERE client LIKE 'har:%/%' AND started_at = "
                    "(SELECT min(started_at) FROM exchanges f WHERE f.client = e.client)"
                )
            ).all()
        )
        navigation_urls = {
            client: {url for chain, c, *urls in hops if chain == first and c == client for url in urls if url}
            or set(conn.execute(text("SELECT url FROM exchanges WHERE id = :i"), {"i": first}).scalars())
            for client, first in firsts.items()
        }
    store.engine.dispose()
    sites = {client: {site_of(url) for url in urls} for client, urls in navigation_urls.items()}
    verdict: dict[int, bool] = {}
    for chain, client, source, target, location in hops:
        third = site_of(source) not in sites[client] and site_of(target or location) not in sites[client]
        verdict[chain] = verdict.get(chain, True) and third
    return verdict


# ---- generated traffic ----------------------------------------------------------------


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Traffic:
    """One client's HAR: redirect chains (some hops not followed, some follow-ups are
    redirects again), writes repeated within and across the duplicate window, 401s retried,
    all interleaved in time on a few connections, the URLs drawn from a small pool so that
    candidates compete."""

    PATHS = ("/a", "/b", "/c", "/login", "/pay", "/api/items", "/done")

    def __init__(self, seed: int, start: float, pages: int = 0) -> None:
        self.rng = random.Random(seed)
        self.entries: list[dict] = []
        self.t = start
        self.pages = [f"page_{i}" for i in range(pages)]
        self.host = self.rng.choice(["https://shop.example.test", "https://api.example.test"])

    def entry(self, at: float, method: str, url: str, status: int, **kw) -> dict:
        headers = [{"name": "Accept", "value": "*/*"}]
        for name in kw.get("credentials", ()):
            headers.append({"name": name, "value": "secret-value"})
        request = {
            "method": method,
            "url": url,
            "httpVersion": "HTTP/1.1",
            "headers": headers,
            "queryString": [],
            "cookies": [],
            "headersSize": -1,
            "bodySize": len(kw.get("body", "")),
        }
        if kw.get("body"):
            request["postData"] = {"mimeType": "application/json", "text": kw["body"]}
            headers.append({"name": "Content-Type", "value": "application/json"})
        response_headers = []
        if kw.get("location") is not None:
            response_headers.append({"name": "Location", "value": kw["location"]})
        entry = {
            "startedDateTime": _iso(at),
            "time": 5,
            "request": request,
            "response": {
                "status": status,
                "statusText": "",
                "httpVersion": "HTTP/1.1",
                "headers": response_headers,
                "cookies": [],
                "content": {"size": 2, "mimeType": "application/json", "text": kw.get("answer", "{}")},
                "redirectURL": kw.get("location") or "",
                "headersSize": -1,
                "bodySize": 2,
            },
            "cache": {},
            "timings": {"send": 1, "wait": 3, "receive": 1},
            "connection": str(self.rng.choice([11, 12, 13])),
        }
        if self.pages:
            entry["pageref"] = kw.get("page") or self.pages[-1]
        self.entries.append(entry)
        return entry

    def url(self, page: str | None = None) -> str:
        if self.pages and self.rng.random() < 0.5:  # a page pulls in third parties' redirects
            host = self.rng.choice(["https://ads.tracker.test", "https://sync.adnet.test"])
        else:
            host = self.host
        return host + self.rng.choice(self.PATHS)

    def chain(self, at: float, page: str | None = None) -> None:
        rng = self.rng
        method = rng.choice(["GET", "POST", "POST", "PUT"])
        body = rng.choice(['{"n":1}', '{"n":2}']) if method != "GET" else ""
        credentials = rng.choice([(), ("Authorization",), ("Cookie",)])
        url = self.url(page)
        for _ in range(rng.randint(1, 4)):
            status = rng.choice([301, 302, 303, 307, 308, 307])
            if rng.random() < 0.05:
                self.entry(at, method, url, status, body=body, page=page, credentials=credentials)
                return  # no Location
            target = (
                self.url(page) if rng.random() < 0.7 else rng.choice(["https://other.example.org/x", url])
            )
            self.entry(
                at, method, url, status, body=body, location=target, page=page, credentials=credentials
            )
            if rng.random() < 0.12:
                return  # not followed
            at += rng.choice([0.01, 0.2, 1.0, 3.0, 12.0, 29.0, 31.0])
            if status == 303 or (status in (301, 302) and method == "POST"):
                method, body = "GET", ""
            if rng.random() < 0.3:
                credentials = ()
            url = target
        final = rng.choice([200, 200, 201, 401, 403, 500])
        self.entry(at, method, url, final, body=body, page=page, credentials=credentials)
        if final in (401, 403) and rng.random() < 0.6:
            self.entry(at + rng.choice([0.5, 10.0, 29.5, 35.0]), method, url, 200, body=body, page=page)

    def build(self, events: int) -> dict:
        rng = self.rng
        for i, page in enumerate(self.pages):  # each page opens with a navigation
            if i % 2 == 0:  # a redirect whose chain ends after the page's other chains began
                self.host = "https://www.site-a.test"
                nav = self.host + "/start"
                self.entry(self.t, "GET", nav, 302, page=page, location="https://sso.site-b.test/login")
                self.entry(
                    self.t + 25, "GET", "https://sso.site-b.test/login", 302, page=page, location=nav + "?ok"
                )
                self.entry(self.t + 50, "GET", nav + "?ok", 200, page=page)
                for k in range(3):
                    self.chain(self.t + 1 + k, page=page)
            else:
                self.host = "https://shop.site-c.test"
                self.entry(self.t, "GET", self.url(), 200, page=page)
            self.t += 60
        for _ in range(events):
            # gaps around the link window (30 s) and the duplicate window (600 s) too
            self.t += rng.choice([0.01, 0.3, 2.0, 8.0, 25.0, 31.0, 40.0, 250.0, 598.0, 601.0])
            kind = rng.random()
            if kind < 0.55:
                self.chain(self.t)
            elif kind < 0.85:  # a write that may repeat, directly or after a failover
                body = rng.choice(['{"order":1}', '{"order":2}'])
                orders = self.host + "/orders"
                if rng.random() < 0.3:  # the primary hands it to the replica, which takes it
                    replica = "https://replica.example.test/orders"
                    self.entry(self.t, "POST", orders, 307, body=body, location=replica)
                    self.entry(self.t + rng.choice([0.01, 0.5]), "POST", replica, 201, body=body)
                    continue
                entry = self.entry(self.t, "POST", orders, rng.choice([200, 201]), body=body)
                if rng.random() < 0.5:
                    entry["request"]["headers"].append({"name": "Idempotency-Key", "value": "k-1"})
            else:
                self.entry(self.t, "GET", self.url(), rng.choice([200, 404]))
        self.entries.sort(key=lambda e: e["startedDateTime"])
        log = {"version": "1.2", "creator": {"name": "test_windows", "version": "1"}, "entries": self.entries}
        if self.pages:
            log["pages"] = [
                {"id": p, "title": p, "startedDateTime": _iso(self.t), "pageTimings": {}} for p in self.pages
            ]
        return {"log": log}


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three clients (two plain, one with three pages) in one store."""
    where = tmp_path_factory.mktemp("generated")
    db = where / "base.db"
    store = open_store(str(db))
    for seed, pages in ((1, 0), (2, 3), (3, 0)):
        har = where / f"traffic-{seed}.har"
        har.write_text(json.dumps(Traffic(seed, 1_700_000_000.0 + seed, pages).build(250)))
        import_har(store, har, workers=0)
    store.engine.dispose()
    return db


def test_generated_traffic_gives_the_same_results_ids_included_whatever_the_window(
    generated, tmp_path, monkeypatch
):
    # the one-delivery clusters left encoded are pruned whenever they have doubled (not
    # only past thousands): what the windows wake must survive the prunes
    monkeypatch.setattr(chainstream, "DORMANT_PRUNE_AT", 1)
    whole = analyzed(generated, tmp_path, WHOLE)
    rules = Counter(row[1] for row in whole["findings"])
    # the traffic reaches what windows must carry: long chains, duplicate writes, retries, pages
    assert {"duplicate-write", "credential-dropped", "lost-write", "method-downgrade"} <= set(rules), rules
    assert max(row[2] for row in whole["chains"]) >= 3
    routes = {
        r for row in whole["findings"] if row[1] == "duplicate-write" for r in json.loads(row[12])["routes"]
    }
    assert routes == {"direct", "via redirect"}
    # a page's chains know their party: the navigation's sites are first party
    assert {row[6] for row in whole["chains"]} == {None, True, False}
    with open_store(str(tmp_path / f"w{WHOLE}-b200000.db"), create=False).engine.connect() as conn:
        on_pages = conn.execute(
            text("SELECT rule, third_party FROM findings WHERE client LIKE 'har:%/%' ORDER BY id")
        ).all()
    assert "duplicate-write" in {rule for rule, _ in on_pages}
    assert None not in {third for _, third in on_pages}  # every finding on a page knows its party
    assert third_party_by_navigation(tmp_path / f"w{WHOLE}-b200000.db") == {
        chain: row[6] for row in whole["chains"] for chain in [row[0]] if row[6] is not None
    }
    for window in (1, 7, 60):
        assert windows_of(generated, window) > 1
        assert analyzed(generated, tmp_path, window) == whole, window


def test_a_client_alone_in_its_batch_windowed_gives_the_same_results(generated, tmp_path):
    whole = analyzed(generated, tmp_path, WHOLE, batch=1)
    for window in (1, 25):
        assert analyzed(generated, tmp_path, window, batch=1) == whole, window


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every HAR of the corpus and every rule fixture, in one store."""
    db = tmp_path_factory.mktemp("corpus") / "base.db"
    corpus_store(db).engine.dispose()
    return db


def test_the_corpus_and_the_rule_fixtures_give_the_same_results_whatever_the_window(corpus, tmp_path):
    # Each client its own batch: a batch holding an undated exchange (five in the corpus)
    # is analyzed in one piece, so whole-store batches would not be cut at all.
    whole = analyzed(corpus, tmp_path, WHOLE, batch=1)
    assert len(whole["findings"]) > 100 and len(whole["chains"]) > 150
    for window in (1, 3, 40):
        assert analyzed(corpus, tmp_path, window, batch=1) == whole, window


def test_a_batch_with_an_undated_exchange_is_analyzed_in_one_piece(corpus):
    # an undated redirect may be linked to any later request: no window would hold it
    assert windows_of(corpus, 1) == 1


# ---- taken up at a checkpoint ------------------------------------------------------------


def _append(db: Path | str, part: list[Exchange]) -> None:
    """These exchanges as a new capture of the store, as a proxy run appends them."""
    store = open_store(str(db))
    with store.begin() as conn:
        capture = add_capture(conn, source="proxy", path=None)
        rows = [
            exchange_row(msgspec.structs.replace(ex, capture_id=capture, seq=i, id=None))
            for i, ex in enumerate(part)
        ]
        finish_capture(conn, capture, entries=write_exchanges(conn, rows))
    store.engine.dispose()


@pytest.fixture(scope="module")
def month(generated: Path) -> list[Exchange]:
    """The generated traffic of the two plain HARs as one proxy client's, in time order."""
    store = open_store(str(generated), create=False)
    with store.engine.connect() as conn:
        found = load_exchanges(conn, exchanges.c.client.not_like("har:%/%"))
    store.engine.dispose()
    found.sort(key=lambda ex: (ex.started_at, ex.capture_id, ex.seq))
    return [
        msgspec.structs.replace(ex, client="10.1.2.3", connection=f"{ex.capture_id}:{ex.connection}")
        for ex in found
    ]


@pytest.mark.parametrize(
    ("share", "engine"), [(0.97, "sqlite"), (0.8, "sqlite"), (0.5, "sqlite"), (0.8, "postgresql")]
)
def test_traffic_appended_to_a_big_client_is_analyzed_from_a_checkpoint_with_the_same_results(
    month, tmp_path, monkeypatch, share, engine, request
):
    split = month[int(len(month) * share)].started_at
    before = [ex for ex in month if ex.started_at < split]
    after = [ex for ex in month if ex.started_at >= split]
    taken_up = _taken_up(monkeypatch)
    windows_read = Counter()
    real_redirects = analysis.WindowLoader.redirects

    def counted(self, lo, hi):
        windows_read[kept] += 1
        return real_redirects(self, lo, hi)

    monkeypatch.setattr(analysis.WindowLoader, "redirects", counted)
    out = {}
    checkpoints = analysis.CHECKPOINTS_KEPT
    for kept in (checkpoints, 0):  # with checkpoints, and without: from the start
        monkeypatch.setattr(analysis, "CHECKPOINTS_KEPT", kept)
        db = tmp_path / f"kept{kept}.db"
        if engine == "postgresql":
            db = request.getfixturevalue("pg_cluster").new_database()
        _append(db, before)
        store = open_store(str(db), create=False)
        analyze(store, window_exchanges=40, batch_exchanges=100)
        store.engine.dispose()
        windows_read[kept] = 0
        _append(db, after)
        store = open_store(str(db), create=False)
        result = analyze(store, window_exchanges=40, batch_exchanges=100)
        store.engine.dispose()
        assert not result.full and result.clients_analyzed == 1
        out[kept] = results(db)
    assert out[checkpoints] == out[0]  # chains, hops and findings, ids included
    assert len(taken_up) == 1 and taken_up[0] < split - 30  # from a checkpoint the new traffic cannot reach
    # and read only the windows from there: about the new traffic's share, plus a window's reach
    assert windows_read[checkpoints] <= windows_read[0] * (1 - share) + 4, windows_read
    rules = {row[1] for row in out[0]["findings"]}
    assert {"duplicate-write", "credential-dropped", "method-downgrade"} <= rules


def _every_boundary_kept(monkeypatch) -> None:
    monkeypatch.setattr(analysis, "_checkpoints", lambda clients, windows: [hi for _, hi in windows if hi])
    monkeypatch.setattr(analysis, "CHECKPOINTS_KEPT", 10**6)


def _kept_states(db: Path) -> list[tuple[float, Snapshot]]:
    store = open_store(str(db), create=False)
    with store.engine.connect() as conn:
        kept = conn.execute(text("SELECT boundary, state FROM analysis_checkpoints ORDER BY boundary")).all()
    store.engine.dispose()
    return [(boundary, read_snapshot(blob)) for boundary, blob in kept]


def _taken_up(monkeypatch) -> list[float]:
    """The boundaries of the checkpoints the analyses take up, as they do."""
    taken: list[float] = []
    real_resume = analysis.resume

    def spy(link, detect, state, load):
        taken.append(state.boundary)
        return real_resume(link, detect, state, load)

    monkeypatch.setattr(analysis, "resume", spy)
    return taken


def _appended_both_ways(
    tmp_path: Path, before: list[Exchange], after: list[Exchange], window: int
) -> tuple[dict[str, dict[str, list[tuple]]], list[tuple[float, Snapshot]]]:
    """`before` analyzed, then `after` appended and analyzed: from the checkpoints, and from
    the client's first exchange (checkpoints deleted). Both results, and the checkpoints
    the first analysis kept."""
    out, states = {}, []
    for way in ("checkpoints", "from the start"):
        db = tmp_path / f"{way}.db"
        _append(db, before)
        store = open_store(str(db), create=False)
        analyze(store, window_exchanges=window, batch_exchanges=100)
        if way == "checkpoints":
            states = _kept_states(db)
        else:
            with store.begin() as conn:
                conn.execute(text("DELETE FROM analysis_checkpoints"))
        store.engine.dispose()
        _append(db, after)
        store = open_store(str(db), create=False)
        analyze(store, window_exchanges=window, batch_exchanges=100)
        store.engine.dispose()
        out[way] = results(db)
    return out, states


def _challenged_tail(month: list[Exchange], tmp_path: Path) -> list[Exchange]:
    """After the month: a redirect whose same-origin follow-up dropped `Authorization` and
    was answered 401 3 s later, retried 29 s after that and answered 200 (RA115: low, the
    client recovered; without the retry: high), with other requests in between."""
    traffic = Traffic(9, month[-1].started_at + 100)
    t = traffic.t
    api = "https://api.example.test"
    traffic.entry(t, "GET", api + "/a", 302, location=api + "/b", credentials=("Authorization",))
    for k in range(1, 20):
        traffic.entry(t + k * 0.1, "GET", api + "/c", 200)
    traffic.entry(t + 3, "GET", api + "/b", 401)
    traffic.entry(t + 32, "GET", api + "/b", 200)
    traffic.entries.sort(key=lambda e: e["startedDateTime"])
    har = tmp_path / "tail.har"
    har.write_text(
        json.dumps(
            {"log": {"version": "1.2", "creator": {"name": "t", "version": "1"}, "entries": traffic.entries}}
        )
    )
    db = tmp_path / "tail.db"
    store = open_store(str(db))
    import_har(store, har, workers=0)
    with store.engine.connect() as conn:
        found = load_exchanges(conn, exchanges.c.id.is_not(None))
    store.engine.dispose()
    found.sort(key=lambda ex: (ex.started_at, ex.seq))
    return [msgspec.structs.replace(ex, client="10.1.2.3", connection=None) for ex in found]


def test_a_checkpoint_whose_denied_follow_up_the_new_traffic_may_answer_is_passed_over(
    month, tmp_path, monkeypatch
):
    """A checkpoint a link window before the new traffic is taken up, unless a 401/403
    follow-up linked before it can still be answered by a retry among the new exchanges
    (RA115 looks 30 s past the follow-up): then an earlier one is, and the results are
    those of an analysis from the client's first exchange."""
    _every_boundary_kept(monkeypatch)
    traffic = month[-60:] + _challenged_tail(month, tmp_path)  # the month's end: a few windows before it
    retry = traffic[-1]
    assert retry.status == 200 and traffic[-2].status == 401
    split = retry.started_at  # the retry arrives with the new traffic
    link = analysis.LinkOptions()
    taken_up = _taken_up(monkeypatch)
    before = [ex for ex in traffic if ex.started_at < split]
    out, states = _appended_both_ways(tmp_path, before, traffic[len(before) :], 3)
    assert out["checkpoints"] == out["from the start"]  # chains, hops and findings, ids included
    # the tail's is the latest credential-dropped finding: the client recovered
    tail = [row for row in out["checkpoints"]["findings"] if row[1] == "credential-dropped"][-1]
    assert tail[3] == "low" and "which the client answered" in tail[6], tail
    # checkpoints between the redirect and its follow-up lay a link window before the retry,
    # but their horizon reached it: the one taken up is the latest whose horizon does not
    naive = max(b for b, _ in states if b < split - link.window)
    assert [s.horizon(link) >= split for b, s in states if b == naive] == [True]
    assert taken_up == [max(b for b, s in states if s.horizon(link) < split)]
    assert taken_up[0] < naive


def test_traffic_appended_after_a_pause_is_taken_up_after_the_last_exchange(month, tmp_path, monkeypatch):
    """New traffic that starts more than a link window after the last analyzed exchange
    (the next CI run, the next day) cannot change anything before it: the analysis is
    taken up at the checkpoint just after the last exchange and reads none of the old."""
    before = month[: len(month) * 3 // 4]
    gap = before[-1].started_at + 45 - month[len(before)].started_at
    after = [msgspec.structs.replace(ex, started_at=ex.started_at + gap) for ex in month[len(before) :]]
    taken_up = _taken_up(monkeypatch)
    out, _ = _appended_both_ways(tmp_path, before, after, 40)
    assert out["checkpoints"] == out["from the start"]
    assert len(taken_up) == 1 and before[-1].started_at < taken_up[0] < after[0].started_at


def test_a_checkpoint_stored_before_its_horizon_was_kept_is_read_as_reaching_a_whole_window():
    state = Snapshot(10.0, (0.0, 0, 0), [], {}, [], [], [], [], [], [])
    old = msgspec.msgpack.encode(msgspec.to_builtins(state)[:-1])  # the fields of the release before
    read = read_snapshot(old)
    assert read.denied_until is None and read.horizon(analysis.LinkOptions()) == 10.0 + 30 + 30
    kept = read_snapshot(msgspec.msgpack.encode(msgspec.structs.replace(state, denied_until=42.0)))
    assert kept.denied_until == 42.0 and kept.horizon(analysis.LinkOptions()) == 42.0
    assert msgspec.structs.replace(kept, denied_until=12.0).horizon(analysis.LinkOptions()) == 10.0 + 30


def test_a_checkpoint_is_not_used_when_new_traffic_reaches_before_it(month, tmp_path, monkeypatch):
    """An exchange appended with an early start (a late capture of old traffic) is read by
    windows before every checkpoint: the client is analyzed from its start."""
    late = month[len(month) // 3 :: 7]
    rest = [ex for ex in month if ex not in late]
    calls = []
    monkeypatch.setattr(analysis, "resume", lambda *a: calls.append(a))
    db = tmp_path / "s.db"
    _append(db, rest)
    store = open_store(str(db), create=False)
    analyze(store, window_exchanges=40, batch_exchanges=100)
    with store.engine.connect() as conn:
        assert (
            conn.execute(text("SELECT count(*) FROM analysis_checkpoints")).scalar()
            == analysis.CHECKPOINTS_KEPT
        )
    _append(db, late)
    analyze(store, window_exchanges=40, batch_exchanges=100)
    store.engine.dispose()
    assert calls == []
    whole = tmp_path / "whole.db"
    _append(whole, month)
    store = open_store(str(whole), create=False)
    analyze(store, window_exchanges=40, batch_exchanges=100)
    store.engine.dispose()
    mine, theirs = results(db), results(whole)
    # the same chains and findings (ids differ: the exchanges were stored in another order)
    assert Counter((row[2], row[3]) for row in mine["chains"]) == Counter(
        (row[2], row[3]) for row in theirs["chains"]
    )
    assert Counter(row[1] for row in mine["findings"]) == Counter(row[1] for row in theirs["findings"])


def test_the_analysis_taken_up_at_any_boundary_ends_as_it_would_have(month, tmp_path, monkeypatch):
    """Snapshot at every window boundary of one client's month, then take the analysis up
    from each: the store ends as the uninterrupted analysis left it, ids included. What a
    boundary cuts across (open chains, follow-ups taken, retries, write clusters, held
    findings) is all in the snapshot or the analysis differs. A one-delivery write cluster
    stays encoded until a later write repeats it: some are woken, some pass unread."""
    _every_boundary_kept(monkeypatch)
    woken = Counter()
    real_take = chainstream._Dormant.take

    def take(self, key):
        found = real_take(self, key)
        woken[found is not None] += 1
        return found

    monkeypatch.setattr(chainstream._Dormant, "take", take)
    db = tmp_path / "month.db"
    _append(db, month)
    store = open_store(str(db), create=False)
    analyze(store, window_exchanges=25, batch_exchanges=100)
    with store.engine.connect() as conn:
        kept = conn.execute(text("SELECT boundary, state FROM analysis_checkpoints ORDER BY boundary")).all()
    store.engine.dispose()
    uninterrupted = results(db)
    assert len(kept) > 20
    carried = Counter()
    for boundary, blob in kept:
        state = read_snapshot(blob)
        carried.update(
            name
            for name in ("claimed", "open", "arrivals", "answers", "clusters", "held", "handed", "singles")
            if getattr(state, name)
        )
        copy = tmp_path / "copy.db"
        shutil.copy(db, copy)
        store = open_store(str(copy), create=False)
        with store.engine.connect() as conn:
            plan = _WindowPlan({"10.1.2.3": len(month)}, 25)
            windows = plan.windows(conn, ["10.1.2.3"], since=boundary)
            resumed = analysis.Resumed(state, [chain for _, chain in state.open])
            outs = list(
                analysis.analyze_batch(
                    conn, ["10.1.2.3"], analysis.AnalysisOptions(), windows, resumed=resumed
                )
            )
        ids = analysis._FindingIds()
        for out in outs:
            with store.begin() as conn:
                analysis._replace(conn, out, ids)
        store.engine.dispose()
        assert results(copy) == uninterrupted, boundary
    # every kind of state was carried across some boundary
    assert set(carried) == {
        "claimed",
        "open",
        "arrivals",
        "answers",
        "clusters",
        "held",
        "handed",
        "singles",
    }, carried
    assert woken[True] > 0 and woken[False] > 0, woken


def test_analyze_window_option_reads_in_windows_and_says_a_bad_size(generated, tmp_path):
    db = tmp_path / "c.db"
    shutil.copy(generated, db)
    assert windows_of(db, 3) > 100
    done = run_cli("analyze", "--window", "3", "--db", str(db))
    assert done.returncode == 0, done.stderr
    windowed = run_cli("findings", "-f", "json", "--db", str(db)).stdout
    assert run_cli("analyze", "--full", "--db", str(db)).returncode == 0
    assert run_cli("findings", "-f", "json", "--db", str(db)).stdout == windowed
    bad = run_cli("analyze", "--window", "0", "--db", str(db))
    assert bad.returncode == 2
    assert "Invalid value for '--window': 0 is not in the range x>=1" in bad.stderr


def test_windowed_batches_run_here_while_workers_take_the_others_same_results(generated, tmp_path):
    """With --jobs 2, a batch bigger than a window is read in this process when its turn
    comes, the others in workers: the results are those of one process, ids included."""
    one = analyzed(generated, tmp_path, 40, batch=300)
    db = tmp_path / "jobs.db"
    shutil.copy(generated, db)
    store = open_store(str(db), create=False)
    analyze(store, full=True, window_exchanges=40, batch_exchanges=300, jobs=2)
    store.engine.dispose()
    assert results(db) == one


def test_removing_a_capture_drops_the_client_s_checkpoints(month, tmp_path):
    from analyzer.store import remove_captures

    db = tmp_path / "r.db"
    half = len(month) // 2
    _append(db, month[:half])
    _append(db, month[half:])
    store = open_store(str(db), create=False)
    analyze(store, window_exchanges=40, batch_exchanges=100)
    with store.begin() as conn:
        assert conn.execute(text("SELECT count(*) FROM analysis_checkpoints")).scalar() > 0
        remove_captures(conn, [2])
        assert conn.execute(text("SELECT count(*) FROM analysis_checkpoints")).scalar() == 0
    analyze(store, window_exchanges=40, batch_exchanges=100)
    store.engine.dispose()
    fresh = tmp_path / "fresh.db"
    _append(fresh, month[:half])
    store = open_store(str(fresh), create=False)
    analyze(store, window_exchanges=40, batch_exchanges=100)
    store.engine.dispose()
    mine, theirs = results(db), results(fresh)
    assert [r[2:] for r in mine["chains"]] == [r[2:] for r in theirs["chains"]]
    assert [r[1:5] for r in mine["findings"]] == [r[1:5] for r in theirs["findings"]]


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_a_full_run_packs_its_batches_as_a_sorted_list_of_clients_made_them(engine, request, tmp_path):
    """A full run holds every client's name packed, batch by batch, instead of a map of
    sizes, a set and a sorted list of them: the batches must be those, in that order
    (Python's code-point order, which the new findings' ids follow), sizes included,
    whatever the names hold (a NUL is stored as the four characters `\\x00`)."""
    rng = random.Random(7)
    names = ["a", "B", "b", "é", "Ä", "z", "10.0.0.10", "10.0.0.2", "proxy:r/1", "日本", "𝔘"]
    names.append("nul\0inside")
    names += [f"proxy:ci-{rng.randrange(50)}:8080/10.0.{rng.randrange(9)}.{i}" for i in range(60)]
    sizes = {name: rng.randint(1, 6) for name in names}
    db = (
        str(tmp_path / "p.db") if engine == "sqlite" else request.getfixturevalue("pg_cluster").new_database()
    )
    store = open_store(db)
    with store.begin() as conn:
        capture = add_capture(conn, source="proxy", path=None)
        rows, seq = [], 0
        for name, n in sizes.items():
            for _ in range(n):
                url = f"https://a.test/{seq}"
                ex = Exchange(capture_id=capture, seq=seq, client=name, method="GET", url=url, url_norm=url)
                rows.append(exchange_row(ex))
                seq += 1
        finish_capture(conn, capture, entries=write_exchanges(conn, rows))
    sizes = {name.replace("\0", "\\x00"): n for name, n in sizes.items()}  # as stored
    names = list(sizes)
    for limit in (1, 7, 40, 10_000):
        with store.engine.connect() as conn:
            packed = analysis._PackedBatches.read(conn, limit)
        expected = list(analysis._batches(sorted(names), sizes, limit))
        assert [list(batch) for batch in packed] == expected, limit
        assert [batch.exchanges for batch in packed] == [sum(sizes[c] for c in b) for b in expected]
        assert packed.clients == len(names) and len(packed) == len(expected)
    store.engine.dispose()
