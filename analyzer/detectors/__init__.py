"""The rules. Each module is one detector; RULES lists them in id order."""

from __future__ import annotations

from collections.abc import Sequence

from analyzer.detectors import dropped_body, duplicate_write, method_downgrade, stale_temporary_redirect
from analyzer.detectors.base import Context, DetectorOptions, Rule, rule_from_module
from analyzer.model import Chain, Exchange, Finding

RULES: tuple[Rule, ...] = tuple(
    rule_from_module(m) for m in (method_downgrade, dropped_body, duplicate_write, stale_temporary_redirect)
)
RULES_BY_SLUG = {rule.slug: rule for rule in RULES}


def arrivals_of(chains: Sequence[Chain]) -> dict[int, tuple[Chain, int]]:
    """Map each follow-up exchange id to the chain and hop that led to it."""
    return {hop.target.id: (chain, hop.index) for chain in chains for hop in chain.hops if hop.target is not None}


def run_detectors(
    chains: Sequence[Chain],
    writes: Sequence[Exchange] = (),
    options: DetectorOptions = DetectorOptions(),
    rules: Sequence[Rule] = RULES,
) -> list[Finding]:
    """Run every rule; findings come back ordered by time, chain and hop."""
    context = Context(options=options, writes=writes, arrivals=arrivals_of(chains))
    found = [finding for rule in rules for finding in rule.check(chains, context)]
    found.sort(key=lambda f: (f.exchange.started_at or 0.0, f.exchange.capture_id, f.exchange.seq, f.rule_id))
    return found


__all__ = ["RULES", "RULES_BY_SLUG", "DetectorOptions", "Rule", "run_detectors", "arrivals_of"]
