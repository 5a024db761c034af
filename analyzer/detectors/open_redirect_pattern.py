"""open-redirect-pattern (RA114): the request named the other origin it was then redirected to.

What fires
    A redirect to another origin whose target origin is spelled out in the request
    itself: a query parameter (`?next=https://elsewhere/...`, `?to=//elsewhere`) or, when
    bodies are kept, a form or JSON field, holding an absolute or scheme-relative URL on
    the same origin as the `Location`. That is the shape of an open redirect (CWE-601,
    RFC 9110 17, security considerations, and RFC 6749 10.15 for OAuth): whoever writes
    the link picks where the trusted site sends its users, and credentials or tokens
    that follow redirects go with them.

    Severity: medium. Confidence 0.5: OAuth's `redirect_uri` and login `next=` parameters
    have this shape too and are fine when the server checks the target against an
    allow-list, which the wire cannot show. In a browser capture with pages
    (analyzer.party), 1.0 when the redirect is the visited site's own (first party), and
    0.25 when it is between third parties of the page: ad-tech and cookie-sync redirects
    name their next hop in the URL by design, and the page's owner cannot fix them.

Not flagged
    Same-origin targets, relative paths in parameters (`?next=/account`), and parameters
    that mention the target only as text (a host name without a scheme or `//`).

How to fix
    Servers: redirect only to relative paths or to origins on an allow-list, and
    reject everything else; for OAuth, match `redirect_uri` exactly against the
    registered value.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from urllib.parse import parse_qsl, unquote, urljoin, urlsplit

from analyzer.detectors.base import Context, every_hop, hop_finding
from analyzer.model import Chain, Exchange, Finding, Severity
from analyzer.urls import BadURL, normalize_url
from analyzer.urls import origin_with_port as origin

RULE_ID = "RA114"
SLUG = "open-redirect-pattern"
SEVERITY = Severity.MEDIUM
SUMMARY = "A redirect went to another origin named by the request's own parameters."
FIX = "Redirect only to relative paths or allow-listed origins; match OAuth `redirect_uri` exactly."

CONFIDENCE = 0.5  # the redirect's party unknown (no browser page)
FIRST_PARTY_CONFIDENCE = 1.0
THIRD_PARTY_CONFIDENCE = 0.25


def check(chains: Sequence[Chain], context: Context) -> Iterator[Finding]:
    module = sys.modules[__name__]
    for chain, hop in every_hop(chains):
        source = hop.source
        target = source.location_resolved
        if not source.is_redirect or target is None:
            continue
        there = origin(target)
        if there == origin(source.url_norm):
            continue
        for where, name, value in _parameters(source):
            named = _absolute(source.url, value)
            if named is not None and origin(named) == there:
                third = context.third_party(chain, hop)
                confidence = (
                    CONFIDENCE
                    if third is None
                    else THIRD_PARTY_CONFIDENCE
                    if third
                    else FIRST_PARTY_CONFIDENCE
                )
                yield hop_finding(
                    module,
                    hop,
                    chain,
                    f"{source.status} sent the client to {there}, which the request itself named in {where} "
                    f"parameter {name!r}: the shape of an open redirect (CWE-601); fine only if the server checks "
                    "the target against an allow-list"
                    + (
                        ", and a redirect between third parties of the page, not the visited site's"
                        if third
                        else ""
                    ),
                    {
                        "status": source.status,
                        "parameter": name,
                        "in": where,
                        "to_origin": there,
                        "location": target,
                    },
                    confidence=confidence,
                )
                break


def _parameters(ex: Exchange) -> Iterator[tuple[str, str, str]]:
    query = urlsplit(ex.url).query
    for name, value in parse_qsl(query, keep_blank_values=False):
        yield "query", name, value
    raw = ex.request_body.raw
    if not raw:
        return
    text = raw.decode("utf-8", "replace")
    ctype = (ex.request_body.content_type or "").split(";")[0].strip().lower()
    if ctype == "application/x-www-form-urlencoded":
        for name, value in parse_qsl(text, keep_blank_values=False):
            yield "body", name, value
    elif ctype == "application/json" or ctype.endswith("+json"):
        try:
            data = json.loads(text)
        except ValueError:
            return
        if isinstance(data, dict):
            for name, value in data.items():
                if isinstance(value, str):
                    yield "body", str(name), value


def _absolute(base: str, value: str) -> str | None:
    """The URL a parameter names, if it names one with its own origin (absolute or //host)."""
    for candidate in (value, unquote(value)):
        text = candidate.strip()
        lowered = text.lower()
        if lowered.startswith(("http://", "https://", "//")):
            try:
                return normalize_url(urljoin(base, text))
            except (BadURL, ValueError):
                return None
    return None
