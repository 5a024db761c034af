"""One verdict per hop, read off the rules' findings on it: what the conformance table,
the frames, the notebooks and the HTML report say of a client's handling of a redirect.

The rules are the one statement of what RFC 9110 and Fetch prescribe; nothing here
restates them. A hop the client followed is:

* `deviated` when a finding on it says the client did something the specifications do
  not allow: a method changed where it must not be (method-downgrade above low), a body
  lost or changed (dropped-body), a credential sent to another origin (credential-cross-
  origin at medium or above; a cookie that stayed on its site is low), a body or its
  headers on a GET (body-on-get), HEAD turned into GET (head-to-get), a method kept after
  a 303 (non-get-after-303), Authorization or an API key dropped on the same origin
  (credential-dropped with `same_origin` in its evidence, even when a retry recovered;
  across origins dropping it is what Fetch does, and a missing Cookie is the jar's call);
* `allowed, body lost`: POST answered 301/302 and re-sent as GET with the body dropped,
  which RFC 9110 15.4.2/15.4.3 allow for historical reasons (method-downgrade at low);
  `allowed` when that POST had no body, or the capture could not see one;
* `as specified` otherwise; `not followed` when nothing followed it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from analyzer.model import Severity

AS_SPECIFIED = "as specified"
ALLOWED = "allowed"
ALLOWED_BODY_LOST = "allowed, body lost"
DEVIATED = "deviated"
NOT_FOLLOWED = "not followed"
# A group of hops reads as its worst verdict.
VERDICT_ORDER = (DEVIATED, ALLOWED_BODY_LOST, ALLOWED, AS_SPECIFIED, NOT_FOLLOWED)

# rule id -> the lowest severity at which its finding means the client deviated
DEVIATION_FLOOR = {
    "RA101": Severity.MEDIUM,
    "RA102": Severity.INFO,
    "RA105": Severity.MEDIUM,
    "RA107": Severity.INFO,
    "RA108": Severity.INFO,
    "RA109": Severity.INFO,
    "RA115": Severity.INFO,  # on the same origin, Authorization or an API key (its evidence says)
}
ALLOWING_RULE = "RA101"  # at low: the historical POST -> GET


def hop_verdict(
    followed: bool, findings: Iterable[tuple[str, str, Mapping[str, Any]]], had_body: bool
) -> str:
    """The verdict on one hop from the (rule id, severity, evidence) of each finding on it."""
    if not followed:
        return NOT_FOLLOWED
    allowed = False
    for rule, severity, evidence in findings:
        floor = DEVIATION_FLOOR.get(rule)
        if rule == "RA115" and (not evidence.get("same_origin") or evidence.get("header") == "cookie"):
            continue
        if floor is not None and Severity.parse(severity) >= floor:
            return DEVIATED
        allowed = allowed or rule == ALLOWING_RULE
    if allowed:
        return ALLOWED_BODY_LOST if had_body else ALLOWED
    return AS_SPECIFIED


def worst(verdicts: Iterable[str]) -> str:
    seen = set(verdicts)
    return next((v for v in VERDICT_ORDER if v in seen), NOT_FOLLOWED)
