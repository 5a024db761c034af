"""What a detector is: a rule (id, slug, severity, docs) and a pure check over chains."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import ModuleType

from analyzer.model import Chain, Exchange, Finding, Hop, Severity

DEFAULT_STALE_AFTER_DAYS = 7.0
DEFAULT_DUPLICATE_WINDOW = 600.0  # seconds between two deliveries of one logical write
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@dataclass(frozen=True)
class DetectorOptions:
    """Thresholds the rules share; every one has a default."""

    stale_after_days: float = DEFAULT_STALE_AFTER_DAYS
    duplicate_window: float = DEFAULT_DUPLICATE_WINDOW

    def __post_init__(self) -> None:
        if self.stale_after_days <= 0:
            raise ValueError("stale threshold must be > 0 days")
        if self.duplicate_window <= 0:
            raise ValueError("duplicate window must be > 0 seconds")


@dataclass
class Context:
    """Everything a check may look at besides the chains."""

    options: DetectorOptions = field(default_factory=DetectorOptions)
    writes: Sequence[Exchange] = ()  # accepted write requests that may repeat, chained or not
    # exchange id -> (chain, hop index) where that exchange is the follow-up
    arrivals: dict[int, tuple[Chain, int]] = field(default_factory=dict)


Check = Callable[[Sequence[Chain], Context], Iterator[Finding]]


@dataclass(frozen=True)
class Rule:
    id: str
    slug: str
    severity: Severity
    summary: str
    doc: str
    check: Check


def rule_from_module(module: ModuleType) -> Rule:
    """A detector module declares RULE_ID, SLUG, SEVERITY, SUMMARY and check()."""
    return Rule(
        id=module.RULE_ID,
        slug=module.SLUG,
        severity=module.SEVERITY,
        summary=module.SUMMARY,
        doc=(module.__doc__ or "").strip(),
        check=module.check,
    )


def hop_finding(
    module: ModuleType, hop: Hop, chain: Chain, message: str, evidence: dict, *,
    severity: Severity | None = None, confidence: float | None = None,
) -> Finding:
    """A finding about one followed hop, pointing at its follow-up request."""
    return Finding(
        rule=module.SLUG,
        rule_id=module.RULE_ID,
        severity=severity if severity is not None else module.SEVERITY,
        confidence=hop.confidence if confidence is None else confidence,
        message=message,
        chain=chain,
        hop=hop.index,
        evidence=evidence,
        exchange=hop.target if hop.target is not None else hop.source,
    )


def followed_hops(chains: Sequence[Chain]) -> Iterator[tuple[Chain, Hop, Exchange, Exchange]]:
    for chain in chains:
        for hop in chain.hops:
            if hop.target is not None:
                yield chain, hop, hop.source, hop.target


def media_type(value: str | None) -> str | None:
    """Content-Type compared without case or spacing differences."""
    if not value:
        return None
    return ";".join(part.strip() for part in value.lower().split(";") if part.strip())
