"""non-get-after-303 (RA109): a 303 was followed with a method other than GET or HEAD.

What fires
    A hop on 303 whose follow-up is POST, PUT, PATCH, DELETE or anything but GET and HEAD.
    RFC 9110 15.4.4: 303 sends the client to retrieve another resource, with GET (or
    HEAD); Fetch step 12 turns every method but GET and HEAD into GET. Re-sending the write
    to the "see other" URL repeats it against a resource that never expected it.

    Severity: medium; high when the follow-up also carried a request body.

Not flagged
    GET and HEAD follow-ups (HEAD staying HEAD is what Fetch does).

How to fix
    Clients: on 303 switch to GET and drop the body (curl keeps a method forced with
    `-X`; use `--post303` only when you mean it, or `-d` without `-X POST`).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence

from analyzer.detectors.base import SAFE_RETRIEVAL, Context, followed_hops, hop_finding
from analyzer.model import Chain, Finding, Severity

RULE_ID = "RA109"
SLUG = "non-get-after-303"
SEVERITY = Severity.MEDIUM
SUMMARY = "A 303 See Other was followed with a method other than GET or HEAD."
FIX = "On 303 switch to GET and drop the body (curl: no `-X POST` with `-d`)."


def check(chains: Sequence[Chain], context: Context) -> Iterator[Finding]:
    module = sys.modules[__name__]
    for chain, hop, source, target in followed_hops(chains):
        if source.status != 303 or target.method in SAFE_RETRIEVAL:
            continue
        body = target.request_body
        evidence = {
            "status": 303,
            "method_before": source.method,
            "method_after": target.method,
            "body_length_after": body.length,
        }
        message = (
            f"303 after {source.method} was followed with {target.method}: 303 means 'retrieve the result "
            "with GET' (RFC 9110 15.4.4, Fetch HTTP-redirect fetch step 12)"
        )
        if body.is_present:
            yield hop_finding(
                module,
                hop,
                chain,
                f"{message}; the body ({body.length} bytes) was sent again",
                evidence,
                severity=Severity.HIGH,
            )
        else:
            sent = (
                "; it went without a body"
                if body.is_known
                else "; the capture does not show whether a body went with it"
            )
            yield hop_finding(module, hop, chain, message + sent, evidence)
