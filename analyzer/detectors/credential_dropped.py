"""credential-dropped (RA115): a credential the request carried was missing on the follow-up.

What fires
    A followed hop whose follow-up lacks a credential header the redirected request
    carried: `Authorization`, or an API-key header (`X-Api-Key`, `Api-Key`, `Apikey`,
    `X-Auth-Token`, `X-Access-Token`, `X-Goog-Api-Key`, `Private-Token`,
    `X-Vault-Token`, `Ocp-Apim-Subscription-Key`, `X-Amz-Security-Token`), or a `Cookie`.

    Same origin (scheme, host and port): Fetch's HTTP-redirect fetch removes
    `Authorization` only when the origin changes (step 13) and RFC 9110 15.4 leaves
    every other header to the client, so a client that drops the credential here is at
    fault: medium, and high when the follow-up was answered 401 or 403 (the call failed
    because of it). When the client then answered that challenge (a retry of the same
    URL within 30 s that got neither 401 nor 403 nor any other error: Digest, NTLM or a
    token refresh), the call went through one round trip later: low, the recovery named.

    Another origin (an http -> https upgrade of the same host included, which Fetch
    counts as another origin): dropping `Authorization` is what a conforming client
    does, so the rule stays quiet when the follow-up succeeded. When it was answered
    401 or 403, the redirect is the server's design problem (medium): an authenticated
    call redirected across origins can only fail, or leak the credential to a client
    that keeps it.

    `Cookie`: the cookie jar decides per request (domain, path, expiry, SameSite;
    RFC 6265 5.4), so a missing cookie is only reported when the follow-up was answered
    401 or 403, at low severity, as a hint of where the session went missing (info when
    a retry recovered). Across origins, a 401 the client recovered from is info.

Not flagged
    A follow-up that carries a credential of the same kind with another value (the
    client authenticated at the target), a redirect nobody followed, a follow-up whose
    request headers the capture did not keep (a HAR entry without any: unknown is not
    empty), a hop the browser synthesized (Chrome's `307 Internal Redirect`), and
    `Proxy-Authorization`, which is addressed to a proxy, not to the server.

How to fix
    Same origin: fix the client (or its redirect hook) so that it re-sends the request's
    headers on a same-origin redirect, as Fetch and every mainstream HTTP library do.
    Another origin: serve the authenticated call at the origin the client authenticated
    to (proxy it there instead of redirecting), or have the client authenticate at the
    target explicitly (a token for that origin, or a signed URL in the `Location`).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Sequence
from types import ModuleType

from analyzer.detectors.base import Context, hop_finding
from analyzer.model import Chain, Finding, Hop, Severity
from analyzer.urls import origin_with_port as origin

RULE_ID = "RA115"
SLUG = "credential-dropped"
SEVERITY = Severity.MEDIUM
SUMMARY = "A credential the request carried was missing on the follow-up of a redirect."
FIX = "Same origin: fix the client to keep the header; another origin: serve the call where the client authenticated, or authenticate at the target."

API_KEY_HEADERS = (
    "x-api-key",
    "api-key",
    "apikey",
    "x-auth-token",
    "x-access-token",
    "x-goog-api-key",
    "private-token",
    "x-vault-token",
    "ocp-apim-subscription-key",
    "x-amz-security-token",
)
WATCHED = ("authorization", *API_KEY_HEADERS, "cookie")
DENIED = (401, 403)
RECOVERY_WINDOW = 30.0  # seconds from a 401/403 to the retry that answers its challenge


def carried(headers: Iterable[tuple[str, str]]) -> set[str]:
    """The watched credential headers a request carried (lower-case names)."""
    return {name.lower() for name, _ in headers if name.lower() in WATCHED}


def check(chains: Sequence[Chain], context: Context) -> Iterator[Finding]:
    module = sys.modules[__name__]
    for chain in chains:
        for hop in chain.hops:
            source, target = hop.source, hop.target
            if target is None or source.synthetic or target.synthetic or not target.request_headers:
                continue
            missing = carried(source.request_headers) - carried(target.request_headers)
            for name in sorted(missing):
                finding = _judge(module, chain, hop, name, context)
                if finding is not None:
                    yield finding


def _judge(module: ModuleType, chain: Chain, hop: Hop, name: str, context: Context) -> Finding | None:
    source, target = hop.source, hop.target
    if target is None:
        return None
    before, after = origin(source.url_norm), origin(target.url_norm)
    denied = target.status in DENIED
    retry = context.retry_of(target, RECOVERY_WINDOW) if denied else None
    recovered = (
        retry is not None and retry.status is not None and retry.status < 400 and retry.status not in DENIED
    )
    title = "-".join(part.capitalize() for part in name.split("-"))
    evidence = {
        "header": name,
        "from_origin": before,
        "to_origin": after,
        "status": source.status,
        "follow_up_status": target.status,
        "same_origin": before == after,
    }
    answered = f" and the follow-up was answered {target.status}" if denied else ""
    if recovered:
        assert retry is not None
        evidence["recovered_status"] = retry.status
        answered += (
            f", which the client answered: its retry of {target.url} got {retry.status}, so the call went "
            "through one round trip later"
        )
    if name == "cookie":
        if not denied:
            return None
        return hop_finding(
            module,
            hop,
            chain,
            f"Cookie sent to {before} was not sent on the follow-up to {after} after a {source.status}{answered}: "
            "which cookies go with a request is the cookie jar's decision (domain, path, expiry, SameSite; "
            "RFC 6265 5.4), so check that the session cookie's scope covers the redirect's target",
            evidence,
            severity=Severity.INFO if recovered else Severity.LOW,
        )
    if before == after:
        return hop_finding(
            module,
            hop,
            chain,
            f"{title} sent to {before} was dropped on the follow-up to the same origin after a "
            f"{source.status}{answered}: Fetch keeps it on a same-origin redirect (HTTP-redirect fetch step 13 "
            "removes Authorization only when the origin changes), so the client lost it; fix the client to "
            "re-send the request's headers on a same-origin redirect",
            evidence,
            severity=Severity.LOW if recovered else Severity.HIGH if denied else Severity.MEDIUM,
        )
    if not denied:
        return None  # what a conforming client does; the target let the call through without it
    return hop_finding(
        module,
        hop,
        chain,
        f"{title} sent to {before} was dropped, as it should be, on the {source.status} to {after}, which then "
        f"answered {target.status}"
        + (
            f"; the client answered the challenge (its retry got {evidence['recovered_status']}), at the cost of "
            "a round trip"
            if recovered
            else ": an authenticated call redirected across origins can only fail or leak the credential"
        )
        + f"; serve the call at {before}, or have the client authenticate at {after} explicitly "
        "(a token for that origin, or a signed URL in the Location)",
        evidence,
        severity=Severity.INFO if recovered else Severity.MEDIUM,
    )
