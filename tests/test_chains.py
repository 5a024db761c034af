"""Chain linking rules from design.md, one boundary per test."""

from __future__ import annotations

import itertools

from analyzer.chains import LinkOptions, build_chains
from analyzer.live import LiveAnalyzer
from analyzer.model import Exchange
from analyzer.urls import normalize_url, resolve_location

_ids = itertools.count(1)


def ex(t, method, url, status=200, location=None, client="c1", conn=None, seq=None):
    n = next(_ids)
    e = Exchange(
        capture_id=1,
        seq=n if seq is None else seq,
        method=method,
        url=url,
        url_norm=normalize_url(url),
        started_at=t,
        client=client,
        connection=conn,
        status=status,
        location=location,
        id=n,
    )
    if location is not None:
        e.location_resolved = resolve_location(url, location)
    return e


def shape(chains):
    return [[(h.source.id, h.target.id if h.target else None, h.link) for h in c.hops] for c in chains]


def test_simple_hop_and_end_reasons():
    a, b = ex(0, "GET", "http://h/a", 302, "/b"), ex(1, "GET", "http://h/b")
    c = ex(2, "POST", "http://h/c", 307, "/d")
    d = ex(3, "GET", "http://h/e", 301)
    chains = build_chains([a, b, c, d])
    assert [ch.end for ch in chains] == ["final", "not-followed", "no-location"]
    assert chains[0].hops[0].target is b


def test_revisit_is_not_linked_to_itself_or_an_earlier_twin():
    # A -> SSO -> A: the second A must link forward, never back to the first A.
    a1 = ex(0, "GET", "http://app/x", 302, "http://sso/login")
    sso = ex(1, "GET", "http://sso/login", 302, "http://app/x")
    a2 = ex(2, "GET", "http://app/x", 200)
    chains = build_chains([a2, sso, a1])  # input order must not matter
    assert shape(chains) == [[(a1.id, sso.id, "same-client"), (sso.id, a2.id, "same-client")]]


def test_self_redirect_links_forward_not_to_itself():
    a1 = ex(0, "GET", "http://h/login", 302, "/login")
    a2 = ex(1, "GET", "http://h/login", 200)
    assert shape(build_chains([a1, a2])) == [[(a1.id, a2.id, "same-client")]]


def test_follow_up_must_be_within_the_window():
    a, b = ex(0, "GET", "http://h/a", 302, "/b"), ex(31, "GET", "http://h/b")
    assert build_chains([a, b])[0].end == "not-followed"
    assert build_chains([a, b], LinkOptions(window=60))[0].end == "final"


def test_follow_up_must_not_start_before_the_redirect():
    b = ex(0, "GET", "http://h/b")
    a = ex(1, "GET", "http://h/a", 302, "/b")
    assert build_chains([a, b])[0].end == "not-followed"


def test_other_clients_are_never_linked():
    a, b = ex(0, "GET", "http://h/a", 302, "/b", client="c1"), ex(1, "GET", "http://h/b", client="c2")
    assert build_chains([a, b])[0].end == "not-followed"


def test_a_claimed_request_is_not_linked_twice():
    a1 = ex(0, "GET", "http://h/a", 302, "/b")
    a2 = ex(0.5, "GET", "http://h/a2", 302, "/b")
    b1, b2 = ex(1, "GET", "http://h/b"), ex(2, "GET", "http://h/b")
    chains = build_chains([a1, a2, b1, b2])
    assert [c.hops[0].target for c in chains] == [b1, b2]


def test_same_connection_wins_over_earlier():
    a = ex(0, "GET", "http://h/a", 302, "/b", conn="k2")
    other, mine = ex(1, "GET", "http://h/b", conn="k1"), ex(2, "GET", "http://h/b", conn="k2")
    hop = build_chains([a, other, mine])[0].hops[0]
    assert hop.target is mine and hop.link == "same-connection" and hop.confidence == 1.0


def test_ambiguous_pick_lowers_confidence():
    a = ex(0, "GET", "http://h/a", 302, "/b")
    b1, b2 = ex(1, "GET", "http://h/b"), ex(2, "GET", "http://h/b")
    hop = build_chains([a, b1, b2])[0].hops[0]
    assert hop.target is b1 and hop.confidence < 0.9


def test_relative_protocol_relative_and_default_port_locations():
    a = ex(0, "GET", "https://h/dir/a", 302, "//cdn.h:443/x?q=1#frag")
    b = ex(1, "GET", "https://CDN.h/x?q=1")
    c = ex(2, "GET", "http://h:80/p", 301, "../q")
    d = ex(3, "GET", "http://h/q")
    assert [ch.end for ch in build_chains([a, b, c, d])] == ["final", "final"]


def test_many_twins_link_in_order():
    # 2,000 redirects to one URL, each followed: every one links to its own follow-up.
    items = []
    for i in range(2000):
        items += [ex(i, "GET", "http://h/a", 302, "/b"), ex(i + 0.5, "GET", "http://h/b")]
    chains = build_chains(items)
    assert all(c.hops[0].target.started_at == c.hops[0].source.started_at + 0.5 for c in chains)
    assert len(chains) == 2000


def test_a_connection_that_carried_another_redirect_since_does_not_win():
    # undici follows a redirect loop over two keep-alive connections, and may change
    # which one it uses halfway: a's own connection k1 then carries the later redirect
    # r, and the request on k1 to /b answers r's successor, not a.
    a = ex(0, "GET", "http://h/a", 302, "/b", conn="k1")
    r = ex(0.5, "GET", "http://h/x", 302, "/y", conn="k1")
    mine = ex(1, "GET", "http://h/b", conn="k2")
    later = ex(2, "GET", "http://h/b", conn="k1")
    hop = next(c for c in build_chains([a, r, mine, later]) if c.root is a).hops[0]
    assert hop.target is mine and hop.link == "same-client"


def test_live_linking_makes_the_same_choices():
    def run():
        return [
            ex(0, "GET", "http://h/a", 302, "/b", conn="k1"),
            ex(0.5, "GET", "http://h/x", 302, "/y", conn="k1"),
            ex(1, "GET", "http://h/b", conn="k2"),
            ex(2, "GET", "http://h/b", conn="k1"),
        ]

    batch = run()
    linked = {(h.source.url, h.target.started_at) for c in build_chains(batch) for h in c.hops if h.target}
    seen = set()

    class Watched(LiveAnalyzer):
        def linked(self, chain, hop):
            seen.add((chain.hops[hop].source.url, chain.hops[hop].target.started_at))

    live = Watched()
    for e in run():
        live.add(e, now=e.started_at)
    assert linked == seen == {("http://h/a", 1)}
