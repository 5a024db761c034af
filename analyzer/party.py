"""First party and third party: whose redirect is it, seen from the page the user opened?

A browser capture mixes the site the user visited with the ad-tech, cookie-sync and
tracker redirects its page pulls in. Those redirects are real, but they are not the
visited site's to fix, and on an everyday page they outnumber its own. So each exchange
of a page knows its page's first-party sites, and a hop is third party when neither its
request nor its target is on one of them.

Where a page is known
    A HAR entry names its page (`pageref`); each page is one client (`har:<capture>/<page>`).
    The page's first exchange (in time, then entry order) is its navigation: the sites
    of every URL of the chain that starts there (the navigation's own redirects, say
    `example.com -> www.example.com`, or a link shortener's) are the page's first-party
    sites. Sites are registrable domains (the Public Suffix List snapshot the rules use),
    so `static.example.com` is first party on `www.example.com` (and, with a top-level
    label the list does not know, `api.example.test` on `shop.example.test`).

Where it is not
    Everything else: HAR entries without a page, flows, and the proxy. Their clients are
    programs under test (or a browser whose tabs the proxy cannot tell apart), and
    every redirect is judged as first party would be; `third_party` stays None.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from analyzer.detectors.base import _suffixes
from analyzer.model import Chain, Exchange
from analyzer.urls import endpoint


def is_page_client(client: str) -> bool:
    """A HAR page: its entries named a `pageref`."""
    return client.startswith("har:") and "/" in client


def site_of(url: str | None) -> str | None:
    if not url:
        return None
    host = endpoint(url)[1]
    return party_site(host) if host else None


@lru_cache(maxsize=4096)
def party_site(host: str) -> str:
    """The registrable domain, a top-level label the list does not know counting as a
    public suffix (`shop.example.test` and `api.example.test` are one party, as
    `a.corp.internal` and `b.corp.internal` are); an IP address or a single label is its
    own. The credential rules are stricter (detectors.base.site): there an unknown suffix
    makes each host its own site, since a cookie jar would not share cookies across them."""
    bare = host.strip("[]")
    try:
        ipaddress.ip_address(bare)
        return bare
    except ValueError:
        pass
    return _suffixes().privatesuffix(host, accept_unknown=True) or host


@dataclass(frozen=True)
class Parties:
    """The first-party sites of each page client."""

    sites: dict[str, frozenset[str]]

    @classmethod
    def of(cls, navigations: Iterable[Exchange], chains: Sequence[Chain]) -> Parties:
        """`navigations`: the first exchange of each page client."""
        by_root = {chain.root.id: chain for chain in chains}
        urls: dict[str, list[str]] = {}
        for first in navigations:
            chain = by_root.get(first.id)
            urls[first.client] = [first.url] if chain is None else [ex.url for ex in chain.exchanges]
            if chain is not None and chain.hops[-1].target is None:
                urls[first.client].append(chain.hops[-1].source.location_resolved or "")
        return cls.of_urls(urls)

    @classmethod
    def of_urls(cls, urls: dict[str, list[str]]) -> Parties:
        """From the URLs of each page's navigation chain."""
        return cls({client: frozenset(s for s in map(site_of, mine) if s) for client, mine in urls.items()})

    def third_party_hop(self, client: str, source: Exchange, target_url: str | None) -> bool | None:
        """None when the client is not a page; else whether neither end is first party."""
        mine = self.sites.get(client)
        if mine is None:
            return None
        return site_of(source.url) not in mine and site_of(target_url) not in mine

    def third_party_chain(self, chain: Chain) -> bool | None:
        """A chain is third party when every hop of it is."""
        verdicts = [
            self.third_party_hop(chain.root.client, hop.source, _target_url(hop.source, hop.target))
            for hop in chain.hops
        ]
        if any(v is None for v in verdicts):
            return None
        return all(verdicts)

    def third_party_exchange(self, ex: Exchange) -> bool | None:
        mine = self.sites.get(ex.client)
        return None if mine is None else site_of(ex.url) not in mine


def _target_url(source: Exchange, target: Exchange | None) -> str | None:
    return target.url if target is not None else source.location_resolved


NO_PARTIES = Parties({})
