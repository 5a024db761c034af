"""Per-client redirect conformance without pandas: what `clients` prints and
`frames.clients` frames.

One row per (client, status, method) the store shows a client met. `did_*` is what the
client did on the follow-ups (a value, or each value with its count when it varied),
`should_*` what RFC 9110 15.4 and Fetch's HTTP-redirect fetch prescribe.
`body_headers_kept` counts follow-ups switched to GET/HEAD that still carried Content-*
headers; `credentials_cross_origin` counts follow-ups to another origin that carried an
Authorization, Proxy-Authorization or Cookie value sent before (Fetch drops
Authorization there). `auth_same_origin` and `auth_cross_origin` tally what the client
did with the request's Authorization or API key on follow-ups to the same and to another
origin (kept, dropped, replaced, re-added; "-" when none carried one); Fetch keeps it on
the same origin and drops it on another. `rules` lists the findings on these hops.

The per-hop facts (`body_change`, `auth_outcomes`, the fingerprints) are shared with
`frames.hops`, which adds what the figures need. Plain SQL through `storeread.Reader`, so
the command answers without importing pandas (about 0.7 s of a 2-core machine's time).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from analyzer.clientnames import client_name
from analyzer.detectors.base import SAFE_RETRIEVAL, body_headers
from analyzer.detectors.credential_cross_origin import watched
from analyzer.detectors.credential_dropped import API_KEY_HEADERS
from analyzer.detectors.verdict import hop_verdict, worst
from analyzer.storeread import Reader
from analyzer.urls import origin_of

Record = dict[str, Any]
HopFindings = dict[tuple[int, int], list[tuple[str, str, str, dict[str, Any]]]]

COLUMNS = [
    "client_name",
    "status",
    "method",
    "hops",
    "followed",
    "did_method",
    "should_method",
    "did_body",
    "should_body",
    "body_headers_kept",
    "cross_origin_hops",
    "credentials_cross_origin",
    "auth_same_origin",
    "auth_cross_origin",
    "verdict",
    "deviated",
    "rules",
]
AUTH_HEADERS = frozenset({"authorization", *API_KEY_HEADERS})

HOPS_SQL = """
SELECT h.chain_id, h.idx, h.status, h.to_exchange_id, a.method, b.method, a.url_norm,
       COALESCE(b.url_norm, a.location_resolved), a.req_body_len, b.req_body_len,
       a.req_body_sha256, b.req_body_sha256, a.request_headers, b.request_headers,
       a.user_agent, c.creator, c.browser, c.source
FROM hops h JOIN exchanges a ON a.id = h.from_exchange_id
LEFT JOIN exchanges b ON b.id = h.to_exchange_id
JOIN captures c ON c.id = a.capture_id
ORDER BY h.chain_id, h.idx
"""


def known(value: Any) -> bool:
    """Neither None nor a frame's NaN."""
    return value is not None and value == value


def prescribed_method(status: object, method: str) -> str:
    """The follow-up's method per RFC 9110 15.4 and Fetch's HTTP-redirect fetch."""
    if status in (301, 302) and method == "POST":
        return "GET"  # "for historical reasons"; Fetch rewrites POST only
    if status == 303 and method not in SAFE_RETRIEVAL:
        return "GET"
    return method


def body_change(
    followed: object, len_before: Any, len_after: Any, sha_before: str | None, sha_after: str | None
) -> str:
    """What happened to the request body on one hop: kept, changed, dropped, added, none."""
    if not followed:
        return "-"
    sha_before, sha_after = (sha if known(sha) else None for sha in (sha_before, sha_after))
    had = known(len_before) and len_before > 0
    if not had:
        return "added" if known(len_after) and len_after > 0 else "none"
    if not known(len_after):
        return "not captured"
    if not len_after:
        return "dropped"
    if (sha_before and sha_after and sha_before != sha_after) or (
        not (sha_before and sha_after) and len_before != len_after
    ):
        return "changed"
    return "kept"


def auth_fingerprints(text: str | None) -> frozenset[str] | None:
    """'name=fingerprint' of each Authorization or API-key header a request carried; None
    when the capture kept no request header at all (unknown is not empty)."""
    headers = json.loads(text) if isinstance(text, str) and text else []
    if not headers:
        return None
    return frozenset(f"{name.lower()}={value}" for name, value in headers if name.lower() in AUTH_HEADERS)


def auth_outcomes(
    chain_ids: Iterable[Any],
    followed: Iterable[Any],
    before: Iterable[frozenset[str] | None],
    after: Iterable[frozenset[str] | None],
) -> list[str | None]:
    """What the client did on each followed hop (in chain and hop order) with the
    Authorization or API key of the chain: 'kept' (the same value went on), 'dropped',
    'replaced' (another value of the same header), 're-added' (a value the request before
    did not carry, sent earlier in the chain); None when neither side had one."""
    out: list[str | None] = []
    seen: set[str] = set()
    chain = None
    for chain_id, went, sent, got in zip(chain_ids, followed, before, after, strict=False):
        if chain_id != chain:
            chain, seen = chain_id, set()
        sent = sent or frozenset()
        seen |= sent
        if not went or got is None:
            out.append(None)
            continue
        if (got - sent) & seen:
            out.append("re-added")
        elif not sent:
            out.append(None)
        elif sent <= got:
            out.append("kept")
        elif {c.partition("=")[0] for c in sent} & {c.partition("=")[0] for c in got}:
            out.append("replaced")
        else:
            out.append("dropped")
        seen |= got
    return out


def body_headers_of(text: str | None) -> list[str]:
    """Request-body headers a follow-up carries (Content-Length only when above 0)."""
    return body_headers(json.loads(text)) if isinstance(text, str) and text else []


def credential_fingerprints(text: str | None) -> list[str]:
    """'name=fingerprint' of each credential header (values are already keyed fingerprints)."""
    if not isinstance(text, str) or not text:
        return []
    return [f"{name}={value}" for name, value in watched(json.loads(text))]


def hop_findings(reader: Reader) -> HopFindings:
    """(rule, rule id, severity, evidence) of the findings on each (chain, hop)."""
    out: HopFindings = {}
    for chain_id, hop, rule, rule_id, severity, evidence in reader.rows(
        "SELECT chain_id, hop, rule, rule_id, severity, evidence FROM findings "
        "WHERE chain_id IS NOT NULL ORDER BY id"
    ):
        found = (str(rule), str(rule_id), str(severity), json.loads(evidence) if evidence else {})
        out.setdefault((int(chain_id), int(hop)), []).append(found)
    return out


def tally(values: Sequence[Any]) -> str:
    """The one value, or each value with its count, most frequent first."""
    counts = Counter(values)
    if len(counts) == 1:
        return str(next(iter(counts)))
    ranked = sorted(counts.items(), key=lambda item: -item[1])  # ties: in order of first sight
    return ", ".join(f"{value} ({count})" for value, count in ranked)


def _tally_or_none(values: Iterable[Any]) -> str:
    present = [str(v) for v in values if known(v)]
    return tally(present) if present else "-"


def _hops(reader: Reader) -> list[Record]:
    """Each hop with what the conformance table reads of it."""
    rows = reader.rows(HOPS_SQL)
    found = hop_findings(reader)
    hops = []
    for (
        chain,
        idx,
        status,
        target,
        method_before,
        method_after,
        from_url,
        to_url,
        len_before,
        len_after,
        sha_before,
        sha_after,
        headers_before,
        headers_after,
        agent,
        creator,
        browser,
        source,
    ) in rows:
        followed = target is not None
        on_hop = found.get((chain, idx), ())
        cross = (origin_of(from_url) if from_url else None) != (origin_of(to_url) if to_url else None)
        forwarded = (
            sorted(set(credential_fingerprints(headers_before)) & set(credential_fingerprints(headers_after)))
            if followed
            else []
        )
        hops.append(
            {
                "chain_id": chain,
                "client_name": client_name(agent, creator, browser, source),
                "status": status,
                "method_before": str(method_before),
                "method_after": str(method_after),
                "followed": followed,
                "had_body": known(len_before) and len_before > 0,
                "body_after": body_change(followed, len_before, len_after, sha_before, sha_after),
                "body_headers_after": body_headers_of(headers_after),
                "cross_origin": cross,
                "credentials_cross_origin": forwarded if cross else [],
                "auth_before": auth_fingerprints(headers_before),
                "auth_after": auth_fingerprints(headers_after),
                "verdict": hop_verdict(
                    followed,
                    [(rule_id, severity, evidence) for _, rule_id, severity, evidence in on_hop],
                    known(len_before) and len_before > 0,
                ),
                "rules": tuple(rule for rule, _, _, _ in on_hop),
            }
        )
    outcomes = auth_outcomes(
        (h["chain_id"] for h in hops),
        (h["followed"] for h in hops),
        (h["auth_before"] for h in hops),
        (h["auth_after"] for h in hops),
    )
    for hop, outcome in zip(hops, outcomes, strict=True):
        hop["auth"] = outcome
    return hops


def client_rows(reader: Reader) -> list[Record]:
    """The conformance table (see the module doc), sorted by client, status and method."""
    groups: dict[tuple[str, int, str], list[Record]] = {}
    for hop in _hops(reader):
        groups.setdefault((hop["client_name"], hop["status"], hop["method_before"]), []).append(hop)
    rows = []
    for (name, status, method), group in sorted(groups.items(), key=lambda item: item[0]):
        followed = [h for h in group if h["followed"]]
        should = prescribed_method(status, method)
        switched = [
            h for h in followed if h["method_after"] in SAFE_RETRIEVAL and h["method_after"] != method
        ]
        rows.append(
            {
                "client_name": name,
                "status": int(status),
                "method": method,
                "hops": len(group),
                "followed": len(followed),
                "did_method": tally([h["method_after"] for h in followed]) if followed else "not followed",
                "should_method": should,
                "did_body": tally([h["body_after"] for h in followed]) if followed else "-",
                "should_body": ("kept" if should == method else "dropped")
                if any(h["had_body"] for h in group)
                else "none",
                "body_headers_kept": sum(1 for h in switched if h["body_headers_after"]),
                "cross_origin_hops": sum(1 for h in followed if h["cross_origin"]),
                "credentials_cross_origin": sum(1 for h in followed if h["credentials_cross_origin"]),
                "auth_same_origin": _tally_or_none(h["auth"] for h in followed if not h["cross_origin"]),
                "auth_cross_origin": _tally_or_none(h["auth"] for h in followed if h["cross_origin"]),
                "verdict": worst({h["verdict"] for h in group}),
                "deviated": sum(1 for h in group if h["verdict"] == "deviated"),
                "rules": sorted({r for h in group for r in h["rules"]}),
            }
        )
    return rows
