"""dropped-body (RA102): a hop that must keep the request body lost or changed it.

What fires
    A hop that kept the request's method, when that is 307 or 308 whatever the method
    (RFC 9110 15.4.8/15.4.9: the request is repeated as sent), or any other redirect status
    where the client kept POST, PUT or PATCH (Fetch keeps the body whenever it keeps the
    method), whose original request carried a body and whose follow-up:
    * carries no body (high; medium after a 303, which asked for a GET: non-get-after-303
      reports the kept method, this rule the empty request the server then received, as
      `curl -X POST -L` sends it),
    * carries a different body, by SHA-256 or by length (high),
    * carries the same bytes under another Content-Type (medium).

Not flagged
    A follow-up whose body the capture could not see (a HAR entry without `postData`):
    unknown is not empty, so the rule stays quiet and the chain view says "not captured".
    Hops where the method changed (see method-downgrade) drop the body on purpose.

How to fix
    Clients: re-send the stored body on 307/308 (for streamed bodies, buffer or make them
    replayable, e.g. a `body` factory). Servers behind a redirect that cannot take the body
    again: answer 303 and accept the request at the first URL.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence

from analyzer.detectors.base import Context, followed_hops, hop_finding, media_type
from analyzer.model import Body, Chain, Finding, Severity

RULE_ID = "RA102"
SLUG = "dropped-body"
SEVERITY = Severity.HIGH
SUMMARY = (
    "A follow-up that kept the request's method (307/308, or POST/PUT/PATCH kept) lost or changed its body."
)
FIX = "Clients re-send the body on 307/308 (make streamed bodies replayable); a server that cannot take it again answers 303."

METHOD_PRESERVING = frozenset({307, 308})
SEE_OTHER = 303
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def check(chains: Sequence[Chain], context: Context) -> Iterator[Finding]:
    module = sys.modules[__name__]
    for chain, hop, source, target in followed_hops(chains):
        if source.method != target.method or not _preserves_body(source.status, source.method):
            continue
        before, after = source.request_body, target.request_body
        if not before.is_present or not after.is_known:
            continue  # nothing to lose, or we cannot see what was sent
        evidence = {
            "status": source.status,
            "method": source.method,
            "length_before": before.length,
            "length_after": after.length,
            "sha256_before": before.sha256,
            "sha256_after": after.sha256,
            "content_type_before": before.content_type,
            "content_type_after": after.content_type,
        }
        where = f"{source.status} after {source.method}"
        if after.length == 0:
            asked_for_get = source.status == SEE_OTHER
            yield hop_finding(
                module,
                hop,
                chain,
                f"{where} was followed with {target.method} and no body (the original had {before.length} bytes): "
                + (
                    "the server asked for a GET and received an empty " + target.method
                    if asked_for_get
                    else "the payload was lost"
                ),
                evidence,
                severity=Severity.MEDIUM if asked_for_get else None,
            )
        elif _differs(before, after):
            yield hop_finding(
                module,
                hop,
                chain,
                f"{where} was followed with a different body ({before.length} -> {after.length} bytes): "
                "the request was not repeated as sent (RFC 9110 15.4.8/15.4.9)",
                evidence,
            )
        elif media_type(before.content_type) and media_type(before.content_type) != media_type(
            after.content_type
        ):
            yield hop_finding(
                module,
                hop,
                chain,
                f"{where} was followed with Content-Type {after.content_type!r} instead of {before.content_type!r}",
                evidence,
                severity=Severity.MEDIUM,
            )


def _preserves_body(status: int | None, method: str) -> bool:
    """Whether a follow-up that kept `method` after `status` should carry the body again."""
    return status in METHOD_PRESERVING or method in BODY_METHODS


def _differs(before: Body, after: Body) -> bool:
    if before.sha256 and after.sha256:
        return before.sha256 != after.sha256
    return before.length != after.length
