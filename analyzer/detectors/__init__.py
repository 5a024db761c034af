"""The rules. Each module is one detector; RULES lists them in id order."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from analyzer.detectors import (
    body_on_get,
    credential_cross_origin,
    credential_dropped,
    dropped_body,
    duplicate_write,
    head_to_get,
    https_downgrade,
    lost_write,
    method_downgrade,
    missing_location,
    non_get_after_303,
    open_redirect_pattern,
    redirect_loop,
    stale_temporary_redirect,
    too_many_redirects,
)
from analyzer.detectors.base import Context, DetectorOptions, Rule, rule_from_module
from analyzer.model import Chain, Exchange, Finding

if TYPE_CHECKING:
    from analyzer.party import Parties

RULES: tuple[Rule, ...] = tuple(
    rule_from_module(m)
    for m in (
        method_downgrade,
        dropped_body,
        duplicate_write,
        stale_temporary_redirect,  # the mission's four
        credential_cross_origin,
        https_downgrade,
        body_on_get,
        head_to_get,
        non_get_after_303,
        redirect_loop,
        too_many_redirects,
        missing_location,
        lost_write,
        open_redirect_pattern,
        credential_dropped,
    )
)
RULES_BY_SLUG = {rule.slug: rule for rule in RULES}


def arrivals_of(chains: Sequence[Chain]) -> dict[int, tuple[Chain, int]]:
    """Map each follow-up exchange id to the chain and hop that led to it."""
    return {
        hop.target.id: (chain, hop.index)
        for chain in chains
        for hop in chain.hops
        if hop.target is not None and hop.target.id is not None
    }


def run_detectors(
    chains: Sequence[Chain],
    writes: Sequence[Exchange] = (),
    options: DetectorOptions = DetectorOptions(),
    rules: Sequence[Rule] = RULES,
    parties: Parties | None = None,
    requests: Sequence[Exchange] = (),
) -> list[Finding]:
    """Run every rule; findings come back ordered by time, chain and hop, each told
    whether it is about third parties of its page (with `parties`)."""
    context = Context(
        options=options, writes=writes, arrivals=arrivals_of(chains), parties=parties, requests=requests
    )
    found = [finding for rule in rules for finding in rule.check(chains, context)]
    if parties is not None and parties.sites:
        for chain in chains:
            chain.third_party = parties.third_party_chain(chain)
        for f in found:
            if f.chain is not None:
                f.third_party = context.third_party(f.chain, f.chain.hops[f.hop])
            else:
                f.third_party = parties.third_party_exchange(f.exchange)
    found.sort(key=lambda f: (f.exchange.started_at or 0.0, f.exchange.capture_id, f.exchange.seq, f.rule_id))
    return found


__all__ = ["RULES", "RULES_BY_SLUG", "DetectorOptions", "Rule", "arrivals_of", "run_detectors"]
