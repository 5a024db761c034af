"""body-on-get (RA107): a follow-up that became GET or HEAD still carries a body or body headers.

What fires
    A hop where the method changed to GET or HEAD (a 303, or a 301/302 POST rewrite) and
    the follow-up still carries
    * a request body, or `Content-Length` above 0 (high: the payload was sent to a URL
      that does not expect it, possibly on another origin);
    * only request-body headers: `Content-Type`, `Content-Encoding`, `Content-Language`,
      `Content-Location` (low).
    RFC 9110 15.4 says a user agent that changes the method to GET should remove the
    request content and those headers; Fetch's HTTP-redirect fetch step 12 removes the
    body and every request-body header name.

Not flagged
    A follow-up whose method did not change (a GET that was a GET), and headers the
    capture could not see.

How to fix
    Clients: when a redirect turns the request into GET, drop the body and the
    Content-* headers that describe it (httpx keeps Content-Type; requests, urllib3 and
    Fetch drop it).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence

from analyzer.detectors.base import SAFE_RETRIEVAL, Context, carries_body_headers, followed_hops, hop_finding
from analyzer.model import Chain, Finding, Severity, header

RULE_ID = "RA107"
SLUG = "body-on-get"
SEVERITY = Severity.HIGH
SUMMARY = "A follow-up that became GET or HEAD still carried a body or request-body headers."
FIX = "When a redirect turns the request into GET, drop the body and its Content-* headers."


def check(chains: Sequence[Chain], context: Context) -> Iterator[Finding]:
    module = sys.modules[__name__]
    for chain, hop, source, target in followed_hops(chains):
        if target.method not in SAFE_RETRIEVAL or source.method == target.method:
            continue
        kept = carries_body_headers(target)
        body = target.request_body
        if not body.is_present and not kept:
            continue
        evidence = {
            "status": source.status,
            "method_before": source.method,
            "method_after": target.method,
            "body_length_after": body.length,
            "headers_kept": kept,
        }
        where = f"{source.status} turned {source.method} into {target.method}"
        if body.is_present or "content-length" in kept:
            seen = body.is_present and body.sha256 is not None  # else only its length was declared
            carried = (
                f"still carried a body ({body.length} bytes)"
                if seen
                else f"still declared a body of {body.length or header(target.request_headers, 'content-length')} "
                "bytes (Content-Length; the capture does not show the bytes)"
            )
            yield hop_finding(
                module,
                hop,
                chain,
                f"{where} but the follow-up {carried}: RFC 9110 15.4 and Fetch step 12 remove it with the "
                "method change",
                evidence,
            )
        else:
            yield hop_finding(
                module,
                hop,
                chain,
                f"{where} but kept the body header{'s' if len(kept) > 1 else ''} {', '.join(kept)} "
                + (
                    "with no body"
                    if body.is_known
                    else "(the capture does not show whether a body went with it)"
                )
                + " (RFC 9110 15.4, Fetch HTTP-redirect fetch step 12)",
                evidence,
                severity=Severity.LOW,
            )
