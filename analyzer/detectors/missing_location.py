"""missing-location (RA112): a redirect without a usable Location.

What fires
    A 301, 302, 303, 307 or 308 answer that
    * has no `Location` header (RFC 9110 15.4.2-15.4.9: the server SHOULD send one; a
      client has nowhere to go and shows the caller the redirect's own body), or
    * has one that cannot be parsed or resolved against the request URL (RFC 9110
      10.2.2, RFC 3986 5), such as an empty value, a bad port or a broken host.
    Medium, with full confidence: the answer itself shows it.

Not flagged
    300 Multiple Choices and 304 Not Modified, which need no Location.

How to fix
    Servers: always send an absolute or correctly relative `Location` with a redirect;
    check the framework's redirect helper gets a URL, not an empty string.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence

from analyzer.detectors.base import Context, hop_finding
from analyzer.model import Chain, Finding, Severity

RULE_ID = "RA112"
SLUG = "missing-location"
SEVERITY = Severity.MEDIUM
SUMMARY = "A redirect answer had no Location, or one that cannot be resolved."
FIX = "Always send a `Location` that resolves with a redirect."


def check(chains: Sequence[Chain], context: Context) -> Iterator[Finding]:
    module = sys.modules[__name__]
    for chain in chains:
        hop = chain.hops[-1]
        source = hop.source
        if hop.target is not None or not source.is_redirect:
            continue
        if source.location is None:
            yield hop_finding(
                module,
                hop,
                chain,
                f"{source.status} after {source.method} came without a Location header: no client can follow it "
                "(RFC 9110 15.4)",
                {"status": source.status, "location": None},
                confidence=1.0,
            )
        elif source.location_resolved is None:
            yield hop_finding(
                module,
                hop,
                chain,
                f"{source.status} after {source.method} has a Location that cannot be resolved against "
                f"{source.url_norm}: {source.location_error or 'unusable value'} (RFC 9110 10.2.2, RFC 3986 5)",
                {"status": source.status, "location": source.location, "error": source.location_error},
                confidence=1.0,
            )
