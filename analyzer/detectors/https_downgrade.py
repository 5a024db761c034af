"""https-downgrade (RA106): a followed redirect went from https to plain http.

What fires
    A hop whose redirecting request was https and whose follow-up was sent over http:
    everything on the follow-up, and its answer, crossed the network in clear and can be
    read or changed by anyone on the path (RFC 9110 4.2.2).

    Severity: medium; high when something worth protecting travelled on the http request:
    a credential header (RFC 9110 17, security considerations), a request body, or a `Referer` naming the https
    page (RFC 9110 10.1.3: a user agent MUST NOT send Referer on an unsecured request when
    the referring resource was accessed securely).

Not flagged
    Redirects from https to http that the client did not follow (the server's mistake is
    still there; the chain view shows it), and http -> https upgrades.

How to fix
    Servers: never answer an https request with an http `Location`; fix absolute URLs
    built from a TLS-terminating proxy's view (honour `X-Forwarded-Proto`), and send HSTS.
    Clients that carry secrets: refuse https -> http redirects (curl's `--proto-redir`,
    a response hook in requests/httpx).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence

from analyzer.detectors.base import Context, followed_hops, hop_finding
from analyzer.model import Chain, Finding, Severity, header
from analyzer.secrets import is_secret_header

RULE_ID = "RA106"
SLUG = "https-downgrade"
SEVERITY = Severity.MEDIUM
SUMMARY = "A followed redirect left https for plain http."
FIX = "Never put an http `Location` in an https answer (honour `X-Forwarded-Proto`, send HSTS); clients refuse https → http."


def check(chains: Sequence[Chain], context: Context) -> Iterator[Finding]:
    module = sys.modules[__name__]
    for chain, hop, source, target in followed_hops(chains):
        if not (source.url_norm.startswith("https:") and target.url_norm.startswith("http:")):
            continue
        exposed = sorted(
            {name.lower() for name, _ in target.request_headers if is_secret_header(name.lower())}
        )
        if target.request_body.is_present:
            exposed.append(f"request body ({target.request_body.length} bytes)")
        referer = header(target.request_headers, "referer")
        if referer and referer.lower().startswith("https:"):
            exposed.append("referer")
        evidence = {
            "status": source.status,
            "from_url": source.url_norm,
            "to_url": target.url_norm,
            "exposed": exposed,
        }
        if exposed:
            yield hop_finding(
                module,
                hop,
                chain,
                f"{source.status} sent the client from https to {target.url_norm} and it followed in clear, "
                f"carrying {', '.join(exposed)} (RFC 9110 4.2.2, 10.1.3)",
                evidence,
                severity=Severity.HIGH,
            )
        else:
            yield hop_finding(
                module,
                hop,
                chain,
                f"{source.status} sent the client from https to {target.url_norm} and it followed in clear: the "
                "request and its answer can be read and changed on the path (RFC 9110 4.2.2)",
                evidence,
            )
