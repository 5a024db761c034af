"""duplicate-write (RA103): one logical write reached servers, and succeeded, more than once.

What fires
    The same client sent the same non-idempotent request, with the same body, to the same
    logical target (the URL it first addressed, before any redirect), and two or more of
    those deliveries got a 2xx answer within the duplicate window (default 10 minutes).
    Deliveries count whether they went straight to the target or through a redirect chain:
    a 307 failover that re-sends a write the client had already got accepted is the case
    this rule exists for.

    Severity: POST and PATCH are not idempotent (RFC 9110 9.2.2), so a repeat is a second
    order, a second payment: high. PUT and DELETE are idempotent by definition, so a repeat
    is usually harmless: low. With an `Idempotency-Key` on every delivery the server had
    the means to deduplicate; when it answered differently anyway, the finding stays but
    one step lower.

Not flagged
    Deliveries carrying the same `Idempotency-Key` that got byte-identical answers (same
    status, same response body hash): the server replayed its first answer, as the
    Idempotency-Key draft intends. Requests whose body the capture could not see, and
    empty-bodied requests (beacons and pings send those by the dozen; with no payload
    there is nothing to tell one write from two).

How to fix
    Send an `Idempotency-Key` with every write and honour it on the server; do not retry a
    write automatically after it was accepted; make failover redirects (307) come from a
    component that knows whether the primary took the write.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from analyzer.detectors.base import Context
from analyzer.model import Chain, Exchange, Finding, Severity

RULE_ID = "RA103"
SLUG = "duplicate-write"
SEVERITY = Severity.HIGH
SUMMARY = "The same write was delivered and accepted more than once."
FIX = "Send an Idempotency-Key with every write and honour it; never retry a write that was accepted."

METHOD_SEVERITY = {"POST": Severity.HIGH, "PATCH": Severity.HIGH, "PUT": Severity.LOW, "DELETE": Severity.LOW}


def check(chains: Sequence[Chain], context: Context) -> Iterator[Finding]:
    groups: dict[WriteKey, list[Exchange]] = {}
    for ex in context.writes:
        key = write_key(ex, context)
        if key is not None:
            groups.setdefault(key, []).append(ex)
    for deliveries in groups.values():
        if len(deliveries) > 1:
            deliveries.sort(key=lambda ex: (ex.started_at or 0.0, ex.capture_id, ex.seq))
            yield from _clusters(deliveries, context)


WriteKey = tuple[str, str, str, str]


def write_key(ex: Exchange, context: Context) -> WriteKey | None:
    """What makes deliveries one logical write: client, method, where the client meant to
    send it, body. None for an exchange that is not an accepted write with a body."""
    if ex.method in METHOD_SEVERITY and succeeded(ex) and ex.request_body.sha256 and ex.request_body.length:
        return (ex.client, ex.method, logical_target(ex, context), ex.request_body.sha256)
    return None


def succeeded(ex: Exchange) -> bool:
    return ex.status is not None and 200 <= ex.status < 300


def logical_target(ex: Exchange, context: Context) -> str:
    arrival = context.arrival(ex)
    return arrival[0].root.url_norm if arrival else ex.url_norm


def _clusters(deliveries: list[Exchange], context: Context) -> Iterator[Finding]:
    window = context.options.duplicate_window
    start = 0
    for i in range(1, len(deliveries) + 1):
        if i == len(deliveries) or gap(deliveries[start], deliveries[i]) > window:
            if i - start > 1:
                finding = judge(deliveries[start:i], context)
                if finding is not None:
                    yield finding
            start = i


def gap(first: Exchange, later: Exchange) -> float:
    if first.started_at is None or later.started_at is None:
        return 0.0
    return later.started_at - first.started_at


def judge(group: list[Exchange], context: Context) -> Finding | None:
    """The finding about one cluster of deliveries of a write (in time order), if any."""
    keys = {ex.idempotency_key for ex in group}
    keyed = None not in keys and len(keys) == 1
    answers = {(ex.status, ex.response_body.sha256) for ex in group}
    if keyed and len(answers) == 1 and None not in {sha for _, sha in answers}:
        return None  # same key, same answer: the server replayed, nothing was written twice
    first, repeat = group[0], group[1]
    severity = METHOD_SEVERITY[first.method]
    if keyed:
        severity = Severity(max(Severity.LOW, severity - 1))
    routes = ["via redirect" if ex.id in context.arrivals else "direct" for ex in group]
    key_note = (
        f"all carried Idempotency-Key but the answers differ ({len(answers)} distinct)"
        if keyed
        else "no shared Idempotency-Key"
    )
    arrival = context.arrival(repeat)
    chain, hop = arrival if arrival else (None, 0)
    return Finding(
        rule=SLUG,
        rule_id=RULE_ID,
        severity=severity,
        confidence=_confidence(group, chain, hop),
        message=(
            f"{first.method} {logical_target(first, context)} with the same body was accepted "
            f"{len(group)} times ({', '.join(routes)}; statuses {', '.join(str(ex.status) for ex in group)}); "
            f"{key_note}"
        ),
        chain=chain,
        hop=hop,
        evidence={
            "method": first.method,
            "deliveries": len(group),
            "statuses": [ex.status for ex in group],
            "urls": [ex.url_norm for ex in group],
            "routes": routes,
            "body_sha256": first.request_body.sha256,
            "idempotency_key": sorted(k for k in keys if k) or None,
            "first_at": first.started_at,
            "span_seconds": gap(first, group[-1]),
        },
        exchange=repeat,
    )


def _confidence(group: list[Exchange], chain: Chain | None, hop: int) -> float:
    # Linking is inference: a delivery that arrived through a hop is only as sure as the hop.
    return round(chain.hops[hop].confidence, 3) if chain is not None else 1.0
