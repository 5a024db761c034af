"""redirect-loop (RA110): a chain came back to a request it had already made, and went round again.

What fires
    A follow-up repeats the method and URL of an earlier request in the same chain, and
    the server answered the repeat with the same redirect (status and Location) as the
    first time: the client is going round a cycle that only its redirect limit ends
    (Fetch: a network error after 20 redirects; RFC 9110 15.4: a client should detect
    cycles). Reported once per chain, on the hop that closed the cycle first.

Not flagged
    A -> SSO -> A, where the second visit to A is answered differently (the login set a
    cookie and A now answers 200): a revisit that makes progress is no loop.

How to fix
    Servers: look for the condition that keeps redirecting (a cookie that is never set,
    an http/https or www/non-www rule pair that contradict, a load balancer and an app
    disagreeing about the scheme).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence

from analyzer.detectors.base import Context, hop_finding
from analyzer.model import Chain, Exchange, Finding, Severity

RULE_ID = "RA110"
SLUG = "redirect-loop"
SEVERITY = Severity.MEDIUM
SUMMARY = "A redirect chain went round a cycle."
FIX = "Find the condition that keeps redirecting (a cookie never set, contradicting http/https or www rules)."


def check(chains: Sequence[Chain], context: Context) -> Iterator[Finding]:
    module = sys.modules[__name__]
    for chain in chains:
        seen: dict[tuple[str, str], int] = {(chain.root.method, chain.root.url_norm): 0}
        for hop in chain.hops:
            target = hop.target
            if target is None:
                break
            key = (target.method, target.url_norm)
            first = seen.get(key)
            if first is not None:
                if _same_answer(chain.hops[first].source, target):  # exchange `first` of the chain
                    yield hop_finding(
                        module,
                        hop,
                        chain,
                        f"{target.method} {target.url_norm} was requested again after {hop.index + 1 - first} "
                        f"redirect(s) and answered with the same {target.status} to {target.location_resolved}: "
                        "the chain is a loop only the client's redirect limit ends",
                        {
                            "url": target.url_norm,
                            "method": target.method,
                            "first_seen_hop": first,
                            "cycle_length": hop.index + 1 - first,
                            "status": target.status,
                            "location": target.location_resolved,
                        },
                    )
                    break
            else:
                seen[key] = hop.index + 1


def _same_answer(a: Exchange, b: Exchange) -> bool:
    return a.status == b.status and a.is_redirect and a.location_resolved == b.location_resolved
