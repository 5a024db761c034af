"""credential-cross-origin (RA105): a credential followed a redirect to another origin.

What fires
    A follow-up request to another origin (scheme, host and port, default ports
    normalized) carries an `Authorization`, `Proxy-Authorization` or `Cookie` header with
    the same value (the same keyed fingerprint) as an earlier request of the chain sent to
    a different origin. Fetch's HTTP-redirect fetch (step 13) removes `Authorization` when
    the origin changes, and RFC 9110 15.4 says a client should consider removing
    credentials it would not send to the new target on its own. A credential dropped on
    one hop that comes back on a later hop to a new origin counts too: the client kept it
    and re-attached it.

    Severity: `Authorization` and `Proxy-Authorization` high. `Cookie` medium when it
    went to another site (registrable domain, by the Public Suffix List), and low when it
    stayed on the site: a cookie jar sends a `Domain=example.com` cookie to both
    `example.com` and `www.example.com` on its own (RFC 6265 5.4), and cookies do not
    isolate ports (RFC 6265 8.5), so there only a caller-set header is a leak. A
    same-host upgrade from http (port 80) to https (port 443) is reported apart, low:
    several clients treat it as the same site on purpose (requests, httpx).

Not flagged
    Credentials that differ from those sent before (a new token the client got for the
    new origin), credentials on a follow-up to an origin the same credential was already
    sent to in this chain, and every other header. The evidence names the header and the
    origins, never the value: only its fingerprint is ever stored.

How to fix
    Clients: strip `Authorization`, `Proxy-Authorization` and caller-set `Cookie` headers
    when a redirect leaves the origin (curl >= 7.83, requests, httpx and Fetch do), and
    attach credentials per origin from a credential store instead. Servers: do not
    redirect authenticated API calls to third-party hosts; hand out a signed URL instead.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Sequence
from types import ModuleType

from analyzer.detectors.base import Context, hop_finding, is_upgrade, site
from analyzer.model import Chain, Exchange, Finding, Hop, Severity
from analyzer.urls import endpoint
from analyzer.urls import origin_with_port as origin

RULE_ID = "RA105"
SLUG = "credential-cross-origin"
SEVERITY = Severity.HIGH
SUMMARY = "A credential header was forwarded on a redirect to another origin."
FIX = "Clients strip credentials when a redirect leaves the origin; servers hand out a signed URL instead of redirecting authenticated calls."

WATCHED = ("authorization", "proxy-authorization", "cookie")


def watched(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """(lower-case header, fingerprint) of each watched credential header, in order."""
    return [(name.lower(), value) for name, value in headers if name.lower() in WATCHED]


def credentials(ex: Exchange) -> set[tuple[str, str]]:
    return set(watched(ex.request_headers))


def conforming_client_drops(name: str, before: str, after: str) -> bool:
    """Would a conforming client have dropped this credential on the hop before -> after?

    Authorization and Proxy-Authorization on any new origin but a same-host http -> https
    upgrade (Fetch); a Cookie only when it leaves its site (a cookie jar sends `Domain=`
    cookies to every host of a site, RFC 6265 5.4). The rule's severity and the
    conformance verdict (`frames`) both come from here.
    """
    if is_upgrade(before, after):
        return False
    return name != "cookie" or site(endpoint(before)[1]) != site(endpoint(after)[1])


def check(chains: Sequence[Chain], context: Context) -> Iterator[Finding]:
    module = sys.modules[__name__]
    for chain in chains:
        sent: dict[tuple[str, str], list[str]] = {}  # credential -> URLs it went to, in order
        root = chain.root
        for cred in credentials(root):
            sent[cred] = [root.url_norm]
        for hop in chain.hops:
            target = hop.target
            if target is None:
                break
            here = origin(target.url_norm)
            for name, value in sorted(credentials(target)):
                earlier = sent.setdefault((name, value), [])
                if earlier and all(origin(url) != here for url in earlier):
                    yield _finding(module, chain, hop, name, earlier[-1], target.url_norm)
                earlier.append(target.url_norm)


def _finding(module: ModuleType, chain: Chain, hop: Hop, name: str, before: str, after: str) -> Finding:
    evidence = {
        "header": name,
        "from_origin": origin(before),
        "to_origin": origin(after),
        "status": hop.source.status,
        "hop_source_url": hop.source.url_norm,
    }
    if is_upgrade(before, after):
        evidence["kind"] = "https-upgrade"
        return hop_finding(
            module,
            hop,
            chain,
            f"{_title(name)} was sent again after an upgrade from {origin(before)} to {origin(after)}: the same "
            "host over https, which several clients treat as the same site on purpose; Fetch counts it as "
            "another origin and drops Authorization",
            evidence,
            severity=Severity.LOW,
        )
    b, a = endpoint(before)[1], endpoint(after)[1]
    dropped = conforming_client_drops(name, before, after)
    evidence["kind"] = (
        "other-site" if site(b) != site(a) else ("other-host" if b != a else "other-port-or-scheme")
    )
    if name == "cookie":
        severity = Severity.MEDIUM if dropped else Severity.LOW
        why = (
            (
                "a Cookie header set by the caller leaks this way; no cookie jar sends one site's cookie to "
                "another site (RFC 6265 5.4)"
            )
            if dropped
            else (
                "a cookie jar may send a domain cookie to every host of the site and cookies do not isolate ports "
                "(RFC 6265 5.4, 8.5), but a Cookie header set by the caller should not follow the request to "
                "another origin"
            )
        )
    else:
        severity = Severity.HIGH
        why = (
            "Fetch removes Authorization when a redirect changes origin (HTTP-redirect fetch step 13) and "
            "RFC 9110 15.4 tells clients to consider dropping credentials"
        )
    return hop_finding(
        module,
        hop,
        chain,
        f"{_title(name)} sent to {origin(before)} was forwarded to {origin(after)} after a {hop.source.status}: "
        f"{why}",
        evidence,
        severity=severity,
    )


def _title(name: str) -> str:
    return "-".join(part.capitalize() for part in name.split("-"))
