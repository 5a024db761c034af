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
from dataclasses import dataclass, field
from datetime import UTC
from email.utils import parsedate_to_datetime

from analyzer.detectors.base import Context
from analyzer.model import Chain, Exchange, Finding, Hop, Severity, header

RULE_ID = "RA104"
SLUG = "stale-temporary-redirect"
SEVERITY = Severity.MEDIUM
SUMMARY = "A temporary redirect is still served long after 'temporary' should have ended."

ALWAYS_TEMPORARY = frozenset({302, 307})
SAFE_METHODS = frozenset({"GET", "HEAD"})
DAY = 86400.0


@dataclass
class _Sightings:
    hops: list[tuple[Chain, Hop]] = field(default_factory=list)

    def add(self, chain: Chain, hop: Hop) -> None:
        self.hops.append((chain, hop))

    def times(self) -> list[float]:
        return [h.source.started_at for _, h in self.hops if h.source.started_at is not None]


def check(chains: Sequence[Chain], context: Context) -> Iterator[Finding]:
    groups: dict[tuple[str, str], _Sightings] = {}
    for chain in chains:
        for hop in chain.hops:
            ex = hop.source
            if is_temporary(ex) and (ex.location_resolved or ex.location):
                groups.setdefault((ex.url_norm, ex.location_resolved or ex.location), _Sightings()).add(chain, hop)
    for (source, target), sightings in groups.items():
        finding = _judge(source, target, sightings, context)
        if finding is not None:
            yield finding


def is_temporary(ex: Exchange) -> bool:
    return not ex.synthetic and (
        ex.status in ALWAYS_TEMPORARY or (ex.status == 303 and ex.method in SAFE_METHODS)
    )


def _judge(source: str, target: str, sightings: _Sightings, context: Context) -> Finding | None:
    times = sightings.times()
    first, last = (min(times), max(times)) if times else (None, None)
    reasons: list[str] = []
    evidence: dict = {"source": source, "target": target, "sightings": len(sightings.hops),
                      "statuses": sorted({h.source.status for _, h in sightings.hops}),
                      "first_seen": first, "last_seen": last}
    threshold = context.options.stale_after_days * DAY
    if first is not None and last - first >= threshold:
        days = (last - first) / DAY
        reasons.append(f"served for {days:.1f} days (threshold {context.options.stale_after_days:g})")
        evidence["age_days"] = round(days, 3)
    outlived = _outlived_retry_after(sightings, last)
    if outlived is not None:
        reasons.append(f"still served {outlived:.0f} s after its Retry-After ran out")
        evidence["retry_after_exceeded_seconds"] = round(outlived, 3)
    lifetime = max((_cache_lifetime(h.source) for _, h in sightings.hops), default=0.0)
    if lifetime > 0:
        reasons.append(f"cacheable for {lifetime:.0f} s, so caches replay it")
        evidence["cache_lifetime_seconds"] = lifetime
    if not reasons:
        return None
    chain, hop = max(sightings.hops, key=lambda ch: ch[1].source.started_at or 0.0)
    ex = hop.source
    return Finding(
        rule=SLUG, rule_id=RULE_ID, severity=SEVERITY, confidence=1.0,
        message=f"temporary {ex.status} {source} -> {target}: " + "; ".join(reasons)
        + "; make it permanent (301/308) or remove it",
        chain=chain, hop=hop.index, evidence=evidence, exchange=ex,
    )


def _outlived_retry_after(sightings: _Sightings, last: float | None) -> float | None:
    if last is None:
        return None
    worst = None
    for _, hop in sightings.hops:
        deadline = retry_deadline(hop.source)
        if deadline is not None and last > deadline:
            worst = max(worst or 0.0, last - deadline)
    return worst


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
