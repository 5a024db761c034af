"""method-downgrade (RA101): the follow-up used a method the redirect status does not allow.

What fires
    * 307 or 308 followed with any other method (high). RFC 9110 15.4.8 and 15.4.9: the
      user agent MUST NOT change the request method; Fetch keeps it too.
    * 301 or 302 after PUT, PATCH or DELETE followed with GET (medium). RFC 9110 15.4.2 and
      15.4.3 allow the POST -> GET rewrite "for historical reasons" only; Fetch's HTTP-redirect
      fetch (step 12) rewrites POST alone and keeps every other method and its body.
    * 301 or 302 after POST followed with GET (low). Legal, and what browsers do, but the
      request body is gone: the server meant a temporary/permanent move, not "go and GET".
    * any other method change on 301/302 (medium).

Not flagged here
    303 (a switch to GET is its meaning; a non-GET after 303 is non-get-after-303) and
    HEAD becoming GET on 301/302 (head-to-get). On 307/308 every change is this rule's,
    HEAD -> GET included (head-to-get reports that hop too).

How to fix
    If the resource moved and the request must arrive as sent, answer 307 (temporary) or
    308 (permanent). If the server wants the client to fetch a result page, answer 303.
    A client that changes the method on 307/308 is broken: fix or replace it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import Any

from analyzer.detectors.base import Context, followed_hops, hop_finding
from analyzer.model import Chain, Finding, Hop, Severity

RULE_ID = "RA101"
SLUG = "method-downgrade"
SEVERITY = Severity.HIGH
SUMMARY = "The follow-up request used another method than the redirect status allows."
FIX = "Answer 307/308 when the request must arrive as sent, 303 for a result page; a client that changes the method on 307/308 is broken."

METHOD_PRESERVING = frozenset({307, 308})
HISTORICAL_REWRITE = frozenset({301, 302})  # POST -> GET tolerated, RFC 9110 15.4.2/15.4.3
KEEP_METHOD_ON_HISTORICAL = frozenset({"PUT", "PATCH", "DELETE"})


def check(chains: Sequence[Chain], context: Context) -> Iterator[Finding]:
    module = sys.modules[__name__]
    for chain, hop, source, target in followed_hops(chains):
        before, after, status = source.method, target.method, source.status
        if before == after:
            continue
        evidence = {"status": status, "method_before": before, "method_after": after}
        if status in METHOD_PRESERVING:
            yield hop_finding(
                module,
                hop,
                chain,
                f"{status} after {before} was followed with {after}: {status} forbids changing the method "
                f"(RFC 9110 15.4.{8 if status == 307 else 9}); the request was not delivered as sent",
                evidence,
                severity=Severity.HIGH,
            )
        elif status in HISTORICAL_REWRITE and not (before == "HEAD" and after == "GET"):
            yield _historical(module, hop, chain, before, after, status, evidence)


def _historical(
    module: ModuleType,
    hop: Hop,
    chain: Chain,
    before: str,
    after: str,
    status: int,
    evidence: dict[str, Any],
) -> Finding:
    if before == "POST" and after == "GET":
        # what the capture shows of the body, and no more: it had one, it had none, or it does not say
        length = hop.source.request_body.length
        if length is None:
            lost = "any POST body was dropped (the capture does not say whether there was one)"
        elif length == 0:
            lost = "this POST had no body, so nothing was lost this time, but a body would be"
        else:
            lost = f"the POST body ({length} bytes) was dropped"
        return hop_finding(
            module,
            hop,
            chain,
            f"{status} after POST was followed with GET: allowed for historical reasons (RFC 9110 "
            f"15.4.{2 if status == 301 else 3}) but {lost}; answer 307/308 to keep it, "
            "or 303 if the switch to GET is meant",
            evidence,
            severity=Severity.LOW,
        )
    return hop_finding(
        module,
        hop,
        chain,
        f"{status} after {before} was followed with {after}: only POST may be rewritten on {status} "
        "(RFC 9110 15.4, Fetch HTTP-redirect fetch step 12); the write never reached the new location",
        evidence,
        severity=Severity.MEDIUM,
    )
