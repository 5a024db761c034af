"""head-to-get (RA108): a HEAD request came back from a redirect as GET.

What fires
    Any hop whose original request was HEAD and whose follow-up is GET. RFC 9110
    15.4.2/15.4.3 allow only POST to be rewritten on 301/302; on 303 the client performs
    a retrieval request, and Fetch (HTTP-redirect fetch step 12) keeps HEAD as HEAD;
    307/308 forbid any change (there method-downgrade reports it as well, high). A GET
    downloads the whole representation the caller only wanted the headers of, and
    answers a question the caller did not ask.

Not flagged
    HEAD staying HEAD, and every other method change (method-downgrade,
    non-get-after-303).

How to fix
    Clients: keep HEAD on every redirect (urllib before CPython 3.13 and urllib3 on 303
    switch it to GET).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence

from analyzer.detectors.base import Context, followed_hops, hop_finding
from analyzer.model import Chain, Finding, Severity

RULE_ID = "RA108"
SLUG = "head-to-get"
SEVERITY = Severity.MEDIUM
SUMMARY = "A HEAD request came back from a redirect as GET."
FIX = "Keep HEAD on every redirect."


def check(chains: Sequence[Chain], context: Context) -> Iterator[Finding]:
    module = sys.modules[__name__]
    for chain, hop, source, target in followed_hops(chains):
        if source.method == "HEAD" and target.method == "GET":
            yield hop_finding(
                module,
                hop,
                chain,
                f"{source.status} after HEAD was followed with GET: HEAD must stay HEAD (RFC 9110 15.4, Fetch "
                "HTTP-redirect fetch step 12); the client fetched a body it never asked for",
                {"status": source.status, "method_before": "HEAD", "method_after": "GET"},
            )
