"""Rebuilding redirect chains: which request did the client send after each 3xx?

A hop links redirect A to request B (design.md, "Rebuilding chains") when:

* B's normalized URL equals A's `Location` resolved against A's URL as the WHATWG URL
  parser does, or, when no request has that URL, one of the forms other clients make of
  an odd Location (`urls.location_alternates`: requests, curl, mitmproxy's IDN hosts);
* B comes from the same client and starts after A, within a window (default 30 s);
* B is not claimed by another hop and is neither A itself nor earlier than A.

A Location's other forms are tried only for a redirect whose WHATWG form its client did
not request at all within the window after it: whether a redirect tries them depends on
the requests around it alone, so the links come out the same whether the client's
traffic is linked whole or in time windows (analyzer.windows).

Redirects are taken in time order; among the unclaimed candidates inside the window a
request on A's own connection wins, then the earliest. A's connection counts only while
it has not carried another redirect of the client since A: a client that alternates
connections through a redirect loop (undici does) would otherwise have A linked to a
request on its connection that answers a later redirect. Candidates for one (client, URL)
sit in a time-sorted list with a "next unclaimed" union-find over it, so finding the
first free candidate after A costs a bisect plus near-constant time however many
twins were claimed before: linking is O(n log n) in the number of exchanges.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Container, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from analyzer.model import REDIRECT_STATUSES, Chain, Exchange, Hop
from analyzer.urls import location_alternates

DEFAULT_LINK_WINDOW = 30.0  # seconds
CONNECTION_SCAN_LIMIT = 16  # unclaimed candidates inspected for a same-connection match

# Link kinds and their confidence; an ambiguous pick (several candidates in the window)
# or an undated exchange lowers it.
SAME_CONNECTION = "same-connection"
SAME_CLIENT = "same-client"
BROWSER_INTERNAL = "browser-internal"
LINK_CONFIDENCE = {SAME_CONNECTION: 1.0, SAME_CLIENT: 0.9, BROWSER_INTERNAL: 1.0}
AMBIGUITY_FACTOR = 0.8
UNDATED_FACTOR = 0.5
UNDATED = -1.0


class Linkable(Protocol):
    """What linking needs to know of an exchange (an Exchange has all of it)."""

    id: int | None
    capture_id: int
    seq: int
    client: str
    connection: str | None
    started_at: float | None
    url: str
    url_norm: str
    status: int | None
    location: str | None
    location_resolved: str | None
    synthetic: bool


@dataclass(frozen=True, slots=True)
class Link:
    target_id: int
    how: str
    confidence: float


@dataclass(frozen=True)
class LinkOptions:
    window: float = DEFAULT_LINK_WINDOW

    def __post_init__(self) -> None:
        if self.window <= 0:
            raise ValueError("link window must be > 0 seconds")


def order_key(ex: Linkable) -> OrderKey:
    """Total order of exchanges: start time, then capture and position in it."""
    start = ex.started_at if ex.started_at is not None else UNDATED
    return (start, ex.capture_id, ex.seq)


OrderKey = tuple[float, int, int]


def stored_id(ex: Linkable) -> int:
    """An exchange's id in the store; linking and chains only deal in stored exchanges."""
    if ex.id is None:
        raise ValueError(f"exchange {ex.capture_id}:{ex.seq} has no id: store it before linking")
    return ex.id


def is_followable(ex: Linkable) -> bool:
    return ex.status in REDIRECT_STATUSES and ex.location_resolved is not None


def follow_up_urls(ex: Linkable) -> Iterator[str]:
    """The normalized URLs a client may have sent after this redirect, WHATWG's first."""
    if ex.location_resolved is not None:
        yield ex.location_resolved
        if ex.location is not None:
            yield from location_alternates(ex.url, ex.location, ex.location_resolved)


class _Candidates:
    """Time-sorted requests for one (client, URL), with next-unclaimed lookup."""

    __slots__ = ("items", "keys", "parent")

    def __init__(self, items: list[Linkable]) -> None:
        self.items = items
        self.keys = [order_key(x) for x in items]
        self.parent = list(range(len(items) + 1))  # index len(items) means "none left"

    def first_free(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:  # path compression
            self.parent[i], i = root, self.parent[i]
        return root

    def claim(self, i: int) -> None:
        self.parent[i] = i + 1


Pools = dict[tuple[str, str | None], _Candidates]


def _pools(candidates: Iterable[Linkable]) -> Pools:
    """Candidates by (client, URL), each pool in time order."""
    groups: dict[tuple[str, str | None], list[Linkable]] = {}
    for ex in candidates:
        groups.setdefault((ex.client, ex.url_norm), []).append(ex)
    return {key: _Candidates(sorted(items, key=order_key)) for key, items in groups.items()}


def link_redirects(
    redirects: Iterable[Linkable],
    candidates: Iterable[Linkable],
    options: LinkOptions = LinkOptions(),
    *,
    claimed: Container[int] = frozenset(),
    later_redirects: Iterable[Linkable] = (),
) -> dict[int, Link]:
    """Map each followable redirect's id to the request that followed it.

    Linking in time windows (analyzer.windows) passes what lies outside the window:
    `claimed`, the ids of candidates earlier windows' redirects took; `later_redirects`,
    the client's redirects after the window that a follow-up inside it may precede
    (read for the same-connection check only, never linked here).
    """
    index = _pools(candidates)
    if claimed:
        for taken in index.values():
            for i, item in enumerate(taken.items):
                if item.id in claimed:
                    taken.claim(i)
    redirects = list(redirects)
    on_connection: dict[
        tuple[str, str | None], list[OrderKey]
    ] = {}  # redirects per (client, connection), in order
    for r in (*redirects, *later_redirects):
        if r.connection is not None:
            on_connection.setdefault((r.client, r.connection), []).append(order_key(r))
    for keys in on_connection.values():
        keys.sort()
    links: dict[int, Link] = {}
    for source in sorted((r for r in redirects if is_followable(r)), key=order_key):
        for url in tried_urls(source, index, options):
            pool = index.get((source.client, url))
            if pool is None:
                continue
            link = _pick(source, pool, options, on_connection.get((source.client, source.connection), []))
            if link is not None:
                links[stored_id(source)] = link
                break
    return links


def tried_urls(source: Linkable, index: Pools, options: LinkOptions) -> Iterator[str]:
    """The follow-up URLs tried for this redirect: the WHATWG form, and the other forms
    only when its client requested the WHATWG form at no time within the window after it."""
    urls = follow_up_urls(source)
    first = next(urls, None)
    if first is None:
        return
    yield first
    if not reached(source, index.get((source.client, first)), options):
        yield from urls


def reached(source: Linkable, pool: _Candidates | None, options: LinkOptions) -> bool:
    """Did the client request this pool's URL after `source` and within the window
    (taken or not)? Undated on either side counts, as linking counts it."""
    if pool is None:
        return False
    i = bisect_right(pool.keys, order_key(source))
    if i == len(pool.items):
        return False
    cand = pool.items[i]
    return (
        source.started_at is None
        or cand.started_at is None
        or cand.started_at - source.started_at <= options.window
    )


def needs_other_forms(
    redirects: Iterable[Linkable], candidates: Iterable[Linkable], options: LinkOptions = LinkOptions()
) -> Iterator[Linkable]:
    """The followable redirects whose client requested their WHATWG form at no time
    within the window after them (among `candidates`): those whose Location's other forms
    are tried, and whose requests to those forms must be loaded too."""
    index = _pools(candidates)
    for source in redirects:
        if is_followable(source) and not reached(
            source, index.get((source.client, source.location_resolved)), options
        ):
            yield source


def _pick(
    source: Linkable, pool: _Candidates, options: LinkOptions, connection_redirects: list[OrderKey]
) -> Link | None:
    """`connection_redirects`: order keys of the client's redirects on source's connection."""
    source_key = order_key(source)
    i = pool.first_free(bisect_right(pool.keys, source_key))
    chosen, seen = None, 0
    while i < len(pool.items) and seen < CONNECTION_SCAN_LIMIT:
        cand = pool.items[i]
        if (
            source.started_at is not None
            and cand.started_at is not None
            and cand.started_at - source.started_at > options.window
        ):
            break
        if chosen is None:
            chosen = i
        seen += 1
        if source.connection is not None and cand.connection == source.connection:
            if bisect_left(connection_redirects, order_key(cand)) <= bisect_right(
                connection_redirects, source_key
            ):
                chosen = i  # the connection carried no other redirect in between
            break
        i = pool.first_free(i + 1)
    if chosen is None:
        return None
    pool.claim(chosen)
    target = pool.items[chosen]
    return Link(stored_id(target), *grade_link(source, target, ambiguous=seen > 1))


def grade_link(source: Linkable, target: Linkable, *, ambiguous: bool) -> tuple[str, float]:
    if source.synthetic:
        how = BROWSER_INTERNAL
    elif source.connection is not None and source.connection == target.connection:
        how = SAME_CONNECTION
    else:
        how = SAME_CLIENT
    confidence = LINK_CONFIDENCE[how]
    if ambiguous and how != SAME_CONNECTION:
        confidence *= AMBIGUITY_FACTOR
    if source.started_at is None or target.started_at is None:
        confidence *= UNDATED_FACTOR
    return how, round(confidence, 3)


def assemble_chains(exchanges: dict[int, Exchange], links: dict[int, Link]) -> list[Chain]:
    """Turn links into chains, each from a redirect nobody redirected to, to its end."""
    targets = {link.target_id for link in links.values()}
    roots = [ex for ex in exchanges.values() if ex.is_redirect and ex.id not in targets]
    chains = [_walk(root, exchanges, links) for root in sorted(roots, key=order_key)]
    return chains


def _walk(root: Exchange, exchanges: dict[int, Exchange], links: dict[int, Link]) -> Chain:
    hops: list[Hop] = []
    current = root
    while True:
        link = links.get(stored_id(current))
        if link is None:
            hops.append(Hop(len(hops), current, None, unfollowed_end(current), 0.0))
            return Chain(hops=hops, end=hops[-1].link)
        target = exchanges[link.target_id]
        hops.append(Hop(len(hops), current, target, link.how, link.confidence))
        if not target.is_redirect:
            return Chain(hops=hops, end="final" if target.status is not None else "error")
        current = target


def unfollowed_end(ex: Exchange) -> str:
    if ex.location is None:
        return "no-location"
    if ex.location_resolved is None:
        return "bad-location"
    return "not-followed"


def build_chains(exchanges: Sequence[Exchange], options: LinkOptions = LinkOptions()) -> list[Chain]:
    """Link and assemble in one call; exchanges must carry distinct ids."""
    by_id = {stored_id(ex): ex for ex in exchanges}
    wanted = {(ex.client, url) for ex in exchanges if is_followable(ex) for url in follow_up_urls(ex)}
    candidates = [ex for ex in exchanges if (ex.client, ex.url_norm) in wanted]
    links = link_redirects((ex for ex in exchanges if ex.is_redirect), candidates, options)
    return assemble_chains(by_id, links)
