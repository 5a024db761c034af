"""What a detector is: a rule (id, slug, severity, docs) and a pure check over chains."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from types import ModuleType
from typing import TYPE_CHECKING, Any

from analyzer.model import Chain, Exchange, Finding, Hop, Severity
from analyzer.urls import endpoint

if TYPE_CHECKING:
    from publicsuffixlist import PublicSuffixList

    from analyzer.party import Parties

DEFAULT_STALE_AFTER_DAYS = 7.0
DEFAULT_DUPLICATE_WINDOW = 600.0  # seconds between two deliveries of one logical write
DEFAULT_MAX_REDIRECTS = 20  # Fetch, HTTP-redirect fetch: a network error once 20 redirects were followed
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
SAFE_RETRIEVAL = frozenset({"GET", "HEAD"})
# Headers that describe a request body; Fetch's "request-body-header names" (HTTP-redirect
# fetch step 12) plus Content-Length, which RFC 9110 15.4 lists with them.
REQUEST_BODY_HEADERS = ("content-type", "content-encoding", "content-language", "content-location")


@dataclass(frozen=True)
class DetectorOptions:
    """Thresholds the rules share; every one has a default."""

    stale_after_days: float = DEFAULT_STALE_AFTER_DAYS
    duplicate_window: float = DEFAULT_DUPLICATE_WINDOW
    max_redirects: int = DEFAULT_MAX_REDIRECTS

    def __post_init__(self) -> None:
        if self.stale_after_days <= 0:
            raise ValueError("stale threshold must be > 0 days")
        if self.duplicate_window <= 0:
            raise ValueError("duplicate window must be > 0 seconds")
        if self.max_redirects < 1:
            raise ValueError("redirect limit must be at least 1")


@dataclass
class Context:
    """Everything a check may look at besides the chains."""

    options: DetectorOptions = field(default_factory=DetectorOptions)
    writes: Sequence[Exchange] = ()  # accepted write requests that may repeat, chained or not
    # exchange id -> (chain, hop index) where that exchange is the follow-up
    arrivals: dict[int, tuple[Chain, int]] = field(default_factory=dict)
    parties: Parties | None = None  # the first-party sites of each browser page (analyzer.party)
    # requests of the clients to URLs their redirects pointed at, followed or not (a retry
    # after a challenge is one); see retry_of
    requests: Sequence[Exchange] = ()
    _by_url: dict[tuple[str, str], list[Exchange]] | None = None

    def retry_of(self, ex: Exchange, within: float) -> Exchange | None:
        """The first later request of `ex`'s client to `ex`'s URL, within `within` seconds
        (a client answering a 401's challenge sends the request again)."""
        if self._by_url is None:
            self._by_url = {}
            for other in self.requests:
                self._by_url.setdefault((other.client, other.url_norm), []).append(other)
            for same in self._by_url.values():
                same.sort(key=lambda e: (e.started_at or 0.0, e.capture_id, e.seq))
        if ex.started_at is None:
            return None
        for other in self._by_url.get((ex.client, ex.url_norm), ()):
            if other.id == ex.id or other.started_at is None or other.started_at <= ex.started_at:
                continue
            if other.started_at - ex.started_at > within:
                break
            return other
        return None

    def third_party(self, chain: Chain, hop: Hop) -> bool | None:
        """Is this hop between third parties of its page? None: not a page, cannot tell."""
        if self.parties is None:
            return None
        target = hop.target.url if hop.target is not None else hop.source.location_resolved
        return self.parties.third_party_hop(chain.root.client, hop.source, target)

    def arrival(self, ex: Exchange) -> tuple[Chain, int] | None:
        """The chain and hop that led to `ex`, if a redirect did."""
        return None if ex.id is None else self.arrivals.get(ex.id)


Check = Callable[[Sequence[Chain], Context], Iterator[Finding]]


@dataclass(frozen=True)
class Rule:
    id: str
    slug: str
    severity: Severity
    summary: str
    fix: str  # the fix in one line (the README's table); the docstring says it in full
    doc: str
    check: Check


def rule_from_module(module: ModuleType) -> Rule:
    """A detector module declares RULE_ID, SLUG, SEVERITY, SUMMARY, FIX and check()."""
    return Rule(
        id=module.RULE_ID,
        slug=module.SLUG,
        severity=module.SEVERITY,
        summary=module.SUMMARY,
        fix=module.FIX,
        doc=(module.__doc__ or "").strip(),
        check=module.check,
    )


def hop_finding(
    module: ModuleType,
    hop: Hop,
    chain: Chain,
    message: str,
    evidence: dict[str, Any],
    *,
    severity: Severity | None = None,
    confidence: float | None = None,
) -> Finding:
    """A finding about one followed hop, pointing at its follow-up request."""
    return Finding(
        rule=module.SLUG,
        rule_id=module.RULE_ID,
        severity=severity if severity is not None else module.SEVERITY,
        confidence=hop.confidence if confidence is None else confidence,
        message=message,
        chain=chain,
        hop=hop.index,
        evidence=evidence,
        exchange=hop.target if hop.target is not None else hop.source,
    )


def followed_hops(chains: Sequence[Chain]) -> Iterator[tuple[Chain, Hop, Exchange, Exchange]]:
    for chain in chains:
        for hop in chain.hops:
            if hop.target is not None:
                yield chain, hop, hop.source, hop.target


def media_type(value: str | None) -> str | None:
    """Content-Type compared without case or spacing differences."""
    if not value:
        return None
    return ";".join(part.strip() for part in value.lower().split(";") if part.strip())


def is_upgrade(before: str, after: str) -> bool:
    """Same host, http on its default port to https on its default port (RFC 9110 4.2)."""
    b, a = endpoint(before), endpoint(after)
    return b == ("http", a[1], 80) and a == ("https", b[1], 443)


def body_headers(headers: Iterable[tuple[str, str]]) -> list[str]:
    """The request-body headers among these, lower-cased, once each (Content-Length only when > 0)."""
    found: list[str] = []
    for name, value in headers:
        lname = name.lower()
        has_body = lname in REQUEST_BODY_HEADERS or (
            lname == "content-length" and str(value).strip() not in ("", "0")
        )
        if has_body and lname not in found:
            found.append(lname)
    return found


def carries_body_headers(ex: Exchange) -> list[str]:
    return body_headers(ex.request_headers)


def every_hop(chains: Sequence[Chain]) -> Iterator[tuple[Chain, Hop]]:
    for chain in chains:
        for hop in chain.hops:
            yield chain, hop


@lru_cache(maxsize=4096)
def site(host: str) -> str:
    """The registrable domain of a host (Public Suffix List snapshot, never fetched), else the host.

    `www.example.co.uk` and `api.example.co.uk` share the site `example.co.uk`; IP
    addresses, `localhost` and private names (a top-level label the list does not know,
    such as `.internal`) are their own site.
    """
    return _suffixes().privatesuffix(host, accept_unknown=False) or host


@lru_cache(maxsize=1)
def _suffixes() -> PublicSuffixList:
    # publicsuffixlist ships its own snapshot of the list and never fetches or caches
    # anything. The whole list, private section included, as browsers use it for
    # cookies: alice.github.io and bob.github.io are two sites. tldextract,
    # used before, imports filelock, which installs a Python audit hook for the rest of
    # the process: in the proxy that hook ran on every audited call mitmproxy makes
    # (id(), socket calls), about 1% more CPU per request (callgrind, 400 requests).
    from publicsuffixlist import PublicSuffixList

    return PublicSuffixList()
