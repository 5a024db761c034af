"""lost-write (RA113): a write was answered with a redirect that the client never followed.

What fires
    A POST, PUT, PATCH or DELETE answered 301, 302, 307 or 308 with a usable `Location`,
    and no request from the same client to that Location within the link window: the
    server did not take the write (it said "ask over there") and nobody asked over there,
    so the write reached no one. This is the wire picture of urllib refusing to redirect a
    PUT, or of a client built with redirects turned off.

    Severity: medium, confidence 0.7. A client that hands the 3xx back to its caller on
    purpose (fetch with `redirect: "manual"`, a library with redirects off, a caller
    that re-sends later on another connection or outside the window) looks the same on
    the wire, so the message says so.

Not flagged
    303: it means the server did act on the write and points at the result (RFC 9110
    15.4.4), so not fetching the result loses nothing. Redirects without a usable
    Location are missing-location.

How to fix
    Clients: follow 307/308 for writes, re-sending the body, or surface the 3xx to the
    caller as an error, never as success. Servers: answer a write where it is sent, or use
    307/308 (not 301/302) so every client can re-send it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence

from analyzer.detectors.base import WRITE_METHODS, Context, hop_finding
from analyzer.model import Chain, Finding, Severity

RULE_ID = "RA113"
SLUG = "lost-write"
SEVERITY = Severity.MEDIUM
SUMMARY = "A write was redirected and never re-sent."
FIX = "Clients follow 307/308 for writes with the body, or report the 3xx as an error; servers answer writes where they are sent."

CONFIDENCE = 0.7
STATUSES = frozenset({301, 302, 307, 308})


def check(chains: Sequence[Chain], context: Context) -> Iterator[Finding]:
    module = sys.modules[__name__]
    for chain in chains:
        if chain.end != "not-followed":
            continue
        hop = chain.hops[-1]
        source = hop.source
        if source.method not in WRITE_METHODS or source.status not in STATUSES:
            continue
        yield hop_finding(
            module,
            hop,
            chain,
            f"{source.method} answered {source.status} to {source.location_resolved} was never re-sent there: the "
            "write reached no one, unless the client handed the redirect back to its caller on purpose and the "
            "caller dealt with it",
            {"status": source.status, "method": source.method, "location": source.location_resolved},
            confidence=CONFIDENCE,
        )
