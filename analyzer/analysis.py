"""`analyze`: rebuild every chain in the store, run the rules, store the results.

Idempotent: previous chains, hops and findings are replaced in the same transaction.
Only what the rules need is loaded: redirects, the requests that could have followed
them, and write requests. A store of a million exchanges is mostly never turned into
Python objects.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field

from sqlalchemy import func, insert, select
from sqlalchemy.engine import Connection

from analyzer.chains import LinkOptions, assemble_chains, link_redirects
from analyzer.detectors import DetectorOptions, run_detectors
from analyzer.detectors.base import WRITE_METHODS
from analyzer.gcpause import cycle_collection_paused
from analyzer.model import REDIRECT_STATUSES, Chain, Exchange, Finding
from analyzer.store import Store, chains as chains_t, clear_analysis, exchanges as ex_t, findings as findings_t
from analyzer.store import hops as hops_t, insert_tuples, load_exchanges, read_generation, record_analysis

ID_CHUNK = 500  # ids per IN (...) list: well under every backend's parameter limit


@dataclass(frozen=True)
class AnalysisOptions:
    link: LinkOptions = field(default_factory=LinkOptions)
    detect: DetectorOptions = field(default_factory=DetectorOptions)

    def as_dict(self) -> dict:
        """The options as stored with the results, so that a re-analysis on its own uses them again."""
        d = self.detect
        return {"link_window": self.link.window, "stale_after_days": d.stale_after_days,
                "duplicate_window": d.duplicate_window, "max_redirects": d.max_redirects}

    @classmethod
    def from_dict(cls, stored: dict | None) -> AnalysisOptions:
        """Options stored by as_dict(); what is missing or unreadable takes its default."""
        stored = stored or {}
        defaults = cls().as_dict()
        values = {k: stored[k] if isinstance(stored.get(k), int | float) else v for k, v in defaults.items()}
        try:
            return cls(link=LinkOptions(window=values["link_window"]),
                       detect=DetectorOptions(stale_after_days=values["stale_after_days"],
                                              duplicate_window=values["duplicate_window"],
                                              max_redirects=int(values["max_redirects"])))
        except ValueError:
            return cls()


@dataclass
class AnalysisResult:
    chains: list[Chain]
    findings: list[Finding]

    @property
    def by_severity(self) -> Counter:
        return Counter(str(f.severity) for f in self.findings)


def analyze(store: Store, options: AnalysisOptions = AnalysisOptions()) -> AnalysisResult:
    """Rebuild chains and findings for the whole store, replacing earlier results.

    The results are recorded as describing the store's generation as it was before
    anything was read, so that exchanges committed while this runs make them stale.
    """
    with cycle_collection_paused(), store.begin() as conn:
        generation = read_generation(conn)
        chains, writes = rebuild_chains(conn, options.link)
        found = run_detectors(chains, writes, options.detect)
        clear_analysis(conn)
        save_results(conn, chains, found)
        record_analysis(conn, generation, options.as_dict())
    return AnalysisResult(chains, found)


def rebuild_chains(conn: Connection, options: LinkOptions) -> tuple[list[Chain], list[Exchange]]:
    redirects = load_exchanges(conn, ex_t.c.status.in_(REDIRECT_STATUSES))
    targets = select(ex_t.c.location_resolved).where(
        ex_t.c.status.in_(REDIRECT_STATUSES), ex_t.c.location_resolved.is_not(None)
    )
    candidates = load_exchanges(conn, ex_t.c.url_norm.in_(targets), light=True)
    links = link_redirects(redirects, candidates, options)
    by_id = {ex.id: ex for ex in redirects}
    # Follow-ups are loaded whole: credentials, Referer and body headers are judged on them.
    missing = [link.target_id for link in links.values() if link.target_id not in by_id]
    for start in range(0, len(missing), ID_CHUNK):
        chunk = missing[start : start + ID_CHUNK]
        by_id.update((ex.id, ex) for ex in load_exchanges(conn, ex_t.c.id.in_(chunk)))
    # Writes are compared by body, not headers: skip decoding those where not loaded already.
    writes = load_exchanges(conn, ex_t.c.id.in_(repeated_writes()), headers=False)
    writes = [by_id.setdefault(ex.id, ex) for ex in writes]  # one object per exchange
    return assemble_chains(by_id, links), writes


def repeated_writes():
    """Ids of accepted writes whose (client, method, body hash) occurs more than once.

    Only these can be duplicate deliveries, so only these are loaded; portable SQL.
    """
    accepted = (
        ex_t.c.method.in_(WRITE_METHODS), ex_t.c.status >= 200, ex_t.c.status < 300,
        ex_t.c.req_body_sha256.is_not(None), ex_t.c.req_body_len > 0,
    )
    repeated = (
        select(ex_t.c.client, ex_t.c.method, ex_t.c.req_body_sha256)
        .where(*accepted)
        .group_by(ex_t.c.client, ex_t.c.method, ex_t.c.req_body_sha256)
        .having(func.count() > 1)
        .subquery()
    )
    return select(ex_t.c.id).join(
        repeated,
        (repeated.c.client == ex_t.c.client) & (repeated.c.method == ex_t.c.method)
        & (repeated.c.req_body_sha256 == ex_t.c.req_body_sha256),
    ).where(*accepted)


CHAIN_COLUMNS = ("id", "root_exchange_id", "hops", "end_reason", "client", "started_at")
HOP_COLUMNS = ("chain_id", "idx", "from_exchange_id", "to_exchange_id", "status", "link", "confidence")


def save_results(conn: Connection, chains: list[Chain], found: list[Finding]) -> None:
    chain_rows, hop_rows = [], []
    for number, chain in enumerate(chains, start=1):
        chain.id = number
        root = chain.root
        chain_rows.append((number, root.id, len(chain.hops), chain.end, root.client, root.started_at))
        hop_rows.extend(
            (number, hop.index, hop.source.id, hop.target.id if hop.target else None, hop.source.status,
             hop.link, hop.confidence)
            for hop in chain.hops
        )
    insert_tuples(conn, chains_t, CHAIN_COLUMNS, chain_rows)
    insert_tuples(conn, hops_t, HOP_COLUMNS, hop_rows)
    if found:
        conn.execute(insert(findings_t), [_finding_row(n, f) for n, f in enumerate(found, start=1)])


def _finding_row(number: int, finding: Finding) -> dict:
    source = finding.chain.hops[finding.hop].source if finding.chain else finding.exchange
    return {
        "id": number, "rule": finding.rule, "rule_id": finding.rule_id, "severity": str(finding.severity),
        "severity_rank": int(finding.severity), "confidence": finding.confidence, "message": finding.message,
        "chain_id": finding.chain.id if finding.chain else None, "hop": finding.hop,
        "from_exchange_id": source.id, "to_exchange_id": finding.exchange.id,
        "observed_at": finding.exchange.started_at, "evidence": json.dumps(finding.evidence, sort_keys=True),
        "fingerprint": finding_fingerprint(finding.rule, source, finding.exchange),
    }


def finding_fingerprint(rule: str, source: Exchange, target: Exchange) -> str:
    """Stable identity of a finding across captures and re-imports, for baselines."""
    parts = [rule, str(source.status), source.method, target.method, source.url_norm, target.url_norm]
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]
