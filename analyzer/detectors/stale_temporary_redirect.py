"""stale-temporary-redirect (RA104): a "temporary" redirect that never went away.

What fires
    A temporary redirect, that is 302, 307, or 303 answering GET/HEAD, from one source URL
    to one target that
    * has been served for at least the stale threshold (default 7 days) from first to last
      sighting, across all captures in the store;
    * is still served after its own `Retry-After` ran out (RFC 9110 10.2.3: with a 3xx it
      is the time to wait before following, so a redirect past it is no longer the
      short-lived detour it announced); or
    * is explicitly cacheable (`Cache-Control: max-age`/`s-maxage` > 0, or `Expires` later
      than `Date`): RFC 9111 4.2 lets caches store and replay it, so clients keep being
      sent away long after the incident is over (RFC 9110 15.4.3/15.4.8 say temporary
      redirects are not to be relied on, and are only cached when told to).

Not flagged
    303 after POST (the Post/Redirect/Get pattern is meant to last), 301/308 (permanent by
    design), and redirects sighted only within the threshold.

How to fix
    Turn the detour into a permanent redirect (301/308) if it is here to stay, or remove it;
    never send a temporary redirect with a long max-age.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any

from analyzer.detectors.base import Context, DetectorOptions
from analyzer.model import Chain, Exchange, Finding, Hop, Severity, header

RULE_ID = "RA104"
SLUG = "stale-temporary-redirect"
SEVERITY = Severity.MEDIUM
SUMMARY = "A temporary redirect is still served long after 'temporary' should have ended."
FIX = "Make the detour permanent (301/308) if it stays, or remove it."

ALWAYS_TEMPORARY = frozenset({302, 307})
SAFE_METHODS = frozenset({"GET", "HEAD"})
DAY = 86400.0


@dataclass(slots=True)
class Sightings:
    """What the rule keeps of one (source, target) group, one sighting at a time: a
    constant amount, so `analyze` can judge a month of a fleet's redirects as a stream
    (analysis.stale_findings), and the proxy can start from the store's summary of its
    history instead of the history (analysis.stale_history), with the very code the
    in-memory check uses."""

    count: int = 0
    statuses: tuple[int, ...] = ()  # the distinct statuses, in order (a tuple: live keeps many)
    first: float | None = None
    last: float | None = None
    earliest_deadline: float | None = None  # the soonest a sighting's Retry-After ran out
    lifetime: float = 0.0  # the longest a sighting may be cached
    latest: Exchange | None = None  # the finding points at the latest sighting (None: only summarized)
    latest_at: float = float("-inf")
    latest_status: int | None = None

    def add(self, ex: Exchange) -> None:
        if ex.status is None:  # only answered redirects are sighted
            return
        self.count_sighting(ex.status, ex.started_at, ex)
        self.note_headers(ex)

    def count_sighting(
        self,
        status: int,
        at: float | None,
        ex: Exchange | None = None,
        times: int = 1,
        first: float | None = None,
    ) -> None:
        """`times` sightings of this status, the earliest at `first` (default `at`), the latest at `at`."""
        self.count += times
        if status not in self.statuses:
            self.statuses = tuple(sorted((*self.statuses, status)))
        first = at if first is None else first
        if first is not None:
            self.first = first if self.first is None else min(self.first, first)
        if at is not None:
            self.last = at if self.last is None else max(self.last, at)
        key = at or 0.0
        if self.latest_status is None or key > self.latest_at:  # the first of equals stays, as max() picks
            self.latest, self.latest_at, self.latest_status = ex, key, status

    def note_headers(self, ex: Exchange) -> None:
        deadline = retry_deadline(ex)
        if deadline is not None and (self.earliest_deadline is None or deadline < self.earliest_deadline):
            self.earliest_deadline = deadline
        self.lifetime = max(self.lifetime, _cache_lifetime(ex))


def check(chains: Sequence[Chain], context: Context) -> Iterator[Finding]:
    groups: dict[tuple[str, str], Sightings] = {}
    where: dict[int, tuple[Chain, Hop]] = {}
    for chain in chains:
        for hop in chain.hops:
            ex = hop.source
            target = ex.location_resolved or ex.location
            if is_temporary(ex) and target:
                groups.setdefault((ex.url_norm, target), Sightings()).add(ex)
                where[id(ex)] = (chain, hop)
    for (source, target), sightings in groups.items():
        judged = judge(source, target, sightings, context.options)
        if judged is not None and sightings.latest is not None:
            message, evidence = judged
            chain, hop = where[id(sightings.latest)]
            yield stale_finding(message, evidence, sightings.latest, chain, hop.index)


def is_temporary(ex: Exchange) -> bool:
    return not ex.synthetic and (
        ex.status in ALWAYS_TEMPORARY or (ex.status == 303 and ex.method in SAFE_METHODS)
    )


def stale_finding(
    message: str, evidence: dict[str, Any], ex: Exchange, chain: Chain | None, hop: int
) -> Finding:
    return Finding(
        rule=SLUG,
        rule_id=RULE_ID,
        severity=SEVERITY,
        confidence=1.0,
        message=message,
        chain=chain,
        hop=hop,
        evidence=evidence,
        exchange=ex,
    )


def judge(
    source: str, target: str, sightings: Sightings, options: DetectorOptions
) -> tuple[str, dict[str, Any]] | None:
    """The finding's message and evidence for one group, or None when it is not stale."""
    first, last = sightings.first, sightings.last
    reasons: list[str] = []
    evidence: dict[str, Any] = {
        "source": source,
        "target": target,
        "sightings": sightings.count,
        "statuses": sorted(sightings.statuses),
        "first_seen": first,
        "last_seen": last,
    }
    threshold = options.stale_after_days * DAY
    if first is not None and last is not None and last - first >= threshold:
        days = (last - first) / DAY
        reasons.append(f"served for {days:.1f} days (threshold {options.stale_after_days:g})")
        evidence["age_days"] = round(days, 3)
    if last is not None and sightings.earliest_deadline is not None and last > sightings.earliest_deadline:
        outlived = last - sightings.earliest_deadline
        reasons.append(f"still served {outlived:.0f} s after its Retry-After ran out")
        evidence["retry_after_exceeded_seconds"] = round(outlived, 3)
    if sightings.lifetime > 0:
        reasons.append(f"cacheable for {sightings.lifetime:.0f} s, so caches replay it")
        evidence["cache_lifetime_seconds"] = sightings.lifetime
    if not reasons:
        return None
    message = (
        f"temporary {sightings.latest_status} {source} -> {target}: "
        + "; ".join(reasons)
        + "; make it permanent (301/308) or remove it"
    )
    return message, evidence


def retry_deadline(ex: Exchange) -> float | None:
    value = header(ex.response_headers, "retry-after")
    if value is None or ex.started_at is None:
        return None
    value = value.strip()
    if value.isdigit():
        return ex.started_at + int(value)
    return _http_date(value)


def _cache_lifetime(ex: Exchange) -> float:
    """Seconds a shared or private cache may reuse this response (0: not explicitly cacheable)."""
    control = (header(ex.response_headers, "cache-control") or "").lower()
    directives = dict(_directive(d) for d in control.split(",") if d.strip())
    if "no-store" in directives or "no-cache" in directives:
        return 0.0
    for name in ("s-maxage", "max-age"):
        if name in directives:
            try:
                return max(0.0, float(int(directives[name])))
            except ValueError:
                return 0.0
    expires = _http_date(header(ex.response_headers, "expires") or "")
    date = _http_date(header(ex.response_headers, "date") or "") or ex.started_at
    if expires is not None and date is not None:
        return max(0.0, expires - date)
    return 0.0


def _directive(text: str) -> tuple[str, str]:
    name, _, value = text.strip().partition("=")
    return name.strip(), value.strip().strip('"')


def _http_date(value: str) -> float | None:
    if not value:
        return None
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()
