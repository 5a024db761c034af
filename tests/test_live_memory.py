"""Live analysis keeps a window, not a history (issue 29, item 3).

The proxy runs LiveAnalyzer for as long as it records; what it holds must not grow
with the traffic. benchmarks/bench_live_memory.py measures the real proxy's RSS; these
tests hold the analyzer itself to it, by allocation (tracemalloc), not by time.
"""

from __future__ import annotations

import itertools
import tracemalloc

import pytest

from analyzer import live as live_module
from analyzer.live import KEPT_DELIVERIES, LiveAnalyzer
from analyzer.model import Body, Exchange
from analyzer.urls import normalize_url, resolve_location

_ids = itertools.count(1)


def ex(t, method, url, status=200, location=None, body=None, conn="k1"):
    n = next(_ids)
    e = Exchange(
        capture_id=1,
        seq=n,
        method=method,
        url=url,
        url_norm=normalize_url(url),
        started_at=t,
        client="c1",
        connection=conn,
        status=status,
        location=location,
        request_body=Body(length=len(body), sha256=f"{hash(body) & 0xFFFFFFFF:064x}") if body else Body(),
    )
    if location is not None:
        e.location_resolved = resolve_location(url, location)
    return e


def traffic(start: int, stop: int):
    """Every kind live analysis keeps something of, each new every time: a followed
    redirect to a new target, a redirect nobody follows, a write with a new body."""
    for n in range(start, stop):
        t = n * 0.01
        yield ex(t, "GET", f"http://h.test/r/{n}", 302, f"/t/{n}", conn=f"k{n % 7}")
        yield ex(t + 0.001, "GET", f"http://h.test/t/{n}", conn=f"k{n % 7}")
        yield ex(t + 0.002, "GET", f"http://h.test/gone/{n}", 307, f"/x/{n}", conn=f"k{n % 5}")
        yield ex(t + 0.003, "POST", f"http://h.test/pay/{n % 13}", 201, body=f"order {n}")


def fed(live: LiveAnalyzer, exchanges) -> int:
    found = 0
    for e in exchanges:
        found += len(live.add(e))
    return found


def test_what_live_analysis_holds_stops_growing(monkeypatch):
    monkeypatch.setattr(live_module, "LIVE_LIMIT", 100)
    live = LiveAnalyzer()
    fed(live, traffic(0, 1_500))  # past the cap of each kind (the windows are longer than this run)
    tracemalloc.start()
    try:
        fed(live, traffic(1_500, 2_000))
        held_after_8k, _ = tracemalloc.get_traced_memory()
        fed(live, traffic(2_000, 4_500))
        held_after_18k, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # 10,000 exchanges more, every one of them new: a history would hold 1 MB or more (at
    # least 100 bytes each); a window only wobbles (dict tables, longer numbers in URLs)
    assert held_after_18k - held_after_8k < 64 * 1024, (held_after_8k, held_after_18k)
    assert live.trimmed["redirect pairs"] > 0 and live.trimmed["writes"] > 0
    assert len(live._sightings) <= 100 and len(live._writes) <= 100


def test_a_redirect_let_go_of_is_not_called_unfollowed(monkeypatch):
    """The cap lets go of the oldest waiting redirect without judging it: ending its
    chain would call a redirect 'not followed' that may yet be followed."""
    monkeypatch.setattr(live_module, "LIVE_LIMIT", 2)
    live = LiveAnalyzer()
    posts = [ex(i, "POST", f"http://h.test/w/{i}", 307, f"/v2/w/{i}", body=f"b{i}") for i in range(3)]
    found = [f for p in posts for f in live.add(p, now=p.started_at)] + live.close()
    judged = {f.exchange.url for f in found if f.rule == "lost-write"}
    assert judged == {"http://h.test/w/1", "http://h.test/w/2"}
    assert live.trimmed["redirects"] == 1


def test_a_write_repeated_all_day_is_reported_once_and_kept_small():
    live = LiveAnalyzer()
    found = [
        f for i in range(500) for f in live.add(ex(i * 0.5, "POST", "http://h.test/pay", 201, body="same"))
    ]
    assert [f.rule for f in found] == ["duplicate-write"]
    assert found[0].evidence["deliveries"] == 2
    [group] = live._writes.values()
    assert group.count == 500 and len(group.deliveries) == 1 < KEPT_DELIVERIES


@pytest.mark.parametrize("limit", [3, 10_000])
def test_the_cap_keeps_the_most_recently_sighted_redirects(monkeypatch, limit):
    """A temporary redirect served again and again stays judged whatever passes between
    (least recently sighted goes first); with room for all, nothing is let go of."""
    monkeypatch.setattr(live_module, "LIVE_LIMIT", limit)
    live = LiveAnalyzer()
    day = 86400.0
    found = []
    for d in range(9):
        found += live.add(ex(d * day, "GET", "http://h.test/old", 302, "/new"), now=d * day)
        for n in range(2):  # others, once each, between two sightings
            found += live.add(
                ex(d * day + n + 1, "GET", f"http://h.test/o/{d}/{n}", 302, "/new"), now=d * day
            )
    stale = [f for f in found if f.rule == "stale-temporary-redirect"]
    assert [f.exchange.url for f in stale] == ["http://h.test/old"]
    assert stale[0].evidence["sightings"] == 8 and stale[0].evidence["age_days"] == 7.0
    assert (live.trimmed["redirect pairs"] > 0) == (limit == 3)


def test_the_proxy_says_once_per_kind_that_live_analysis_let_go_of_the_oldest(caplog):
    import logging

    from addons.redirect_recorder import RedirectRecorder

    addon, live = RedirectRecorder(), LiveAnalyzer()
    with caplog.at_level(logging.WARNING, logger="redirect_audit"):
        addon._say_trimmed(live)  # nothing let go of: nothing said
        live.trimmed["redirect pairs"] = 3
        for _ in range(3):  # every tick
            addon._say_trimmed(live)
        live.trimmed["writes"] = 1
        addon._say_trimmed(live)
    assert [r.getMessage() for r in caplog.records] == [
        f"redirect-audit: live analysis keeps at most {live_module.LIVE_LIMIT:,} {kind} and let go of the "
        "oldest; `redirect-audit analyze` judges them from the store"
        for kind in ("redirect pairs", "writes")
    ]
