"""too-many-redirects (RA111): a chain made more follow-ups than the redirect limit.

What fires
    A chain with more followed redirects than the limit (default 20, `--max-redirects`):
    Fetch returns a network error once a request's redirect count reaches 20
    (HTTP-redirect fetch: a redirect count of 20 is a network error), browsers stop there too, and RFC 9110 15.4 warns that
    clients should not follow endlessly. A chain this long fails in every browser and costs
    a round trip per hop elsewhere. Reported once, on the first hop past the limit.

Not flagged
    Chains at or under the limit, however slow.

How to fix
    Servers: collapse the chain into one redirect to the final URL (each rewrite rule
    should produce the canonical URL at once, not a step towards it). Loops show up as
    redirect-loop as well.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence

from analyzer.detectors.base import Context, hop_finding
from analyzer.model import Chain, Finding, Severity

RULE_ID = "RA111"
SLUG = "too-many-redirects"
SEVERITY = Severity.MEDIUM
SUMMARY = "A redirect chain was longer than the redirect limit."
FIX = "Collapse the chain into one redirect to the final URL."


def check(chains: Sequence[Chain], context: Context) -> Iterator[Finding]:
    module = sys.modules[__name__]
    limit = context.options.max_redirects
    for chain in chains:
        followed = sum(1 for hop in chain.hops if hop.target is not None)
        if followed <= limit:
            continue
        hop = chain.hops[limit]
        yield hop_finding(
            module,
            hop,
            chain,
            f"the chain made {followed} follow-ups, over the limit of {limit}: Fetch and browsers give up at 20 "
            "(HTTP-redirect fetch: a redirect count of 20 is a network error); collapse it into one redirect to the final URL",
            {"follow_ups": followed, "limit": limit, "root_url": chain.root.url_norm},
        )
