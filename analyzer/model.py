"""Plain data: what one exchange looked like, how hops link, what a finding says.

No I/O here. Every other layer speaks in these types.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import msgspec

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# The moments pandas (nanoseconds since 1970 in 64 bits), and so the frames and plots, can
# hold: 1677-2262, as epoch seconds. A capture may hold any number; the store keeps it.
DATE_RANGE = (-9_223_372_036.0, 9_223_372_036.0)


def header(headers: list[tuple[str, str]], name: str) -> str | None:
    """First value of a header, case-insensitively (`name` must be lower-case)."""
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


class Severity(enum.IntEnum):
    """Ordered so that `>=` means "at least as bad"."""

    INFO = 0
    LOW = 1
    MEDIUM = 2
    HIGH = 3

    @classmethod
    def parse(cls, text: str) -> Severity:
        try:
            return cls[text.strip().upper()]
        except KeyError:
            names = ", ".join(s.name.lower() for s in cls)
            raise ValueError(f"unknown severity {text!r} (expected one of {names})") from None

    def __str__(self) -> str:
        return self.name.lower()


class Body(msgspec.Struct, gc=False):
    """What the capture knows about a body. `length is None` means unknown, not empty."""

    length: int | None = None
    sha256: str | None = None
    content_type: str | None = None
    raw: bytes | None = None

    @property
    def is_known(self) -> bool:
        return self.length is not None

    @property
    def is_present(self) -> bool:
        return bool(self.length)


class Exchange(msgspec.Struct, kw_only=True):
    """One request and its response (or the error that ended it).

    A msgspec Struct rather than a dataclass: its constructor runs in C, and importers
    and the proxy build one per exchange (about a fifth of a slotted dataclass's cost).
    """

    capture_id: int
    seq: int  # 0-based position in the capture (HAR entry index, flow order)
    method: str
    url: str
    url_norm: str
    started_at: float | None = None  # epoch seconds, UTC
    response_started_at: float | None = None
    client: str = ""  # peer IP for proxy captures, "har:<capture>/<page>" for HAR
    connection: str | None = None
    flow_id: str | None = None
    http_version: str | None = None
    status: int | None = None  # None: no response was seen
    status_text: str | None = None
    location: str | None = None
    location_resolved: str | None = None
    location_error: str | None = None
    synthetic: bool = False  # a browser-made redirect (Chrome "307 Internal Redirect")
    error: str | None = None
    request_headers: list[tuple[str, str]] = msgspec.field(default_factory=list)
    response_headers: list[tuple[str, str]] = msgspec.field(default_factory=list)
    request_body: Body = msgspec.field(default_factory=Body)
    response_body: Body = msgspec.field(default_factory=Body)
    user_agent: str | None = None
    idempotency_key: str | None = None
    from_cache: bool = False
    id: int | None = None

    @property
    def is_redirect(self) -> bool:
        return self.status in REDIRECT_STATUSES


@dataclass(slots=True)
class Hop:
    """Exchange `source` answered with a redirect; `target` is the request that followed it.

    `target is None` means the redirect was not followed (or could not be: no Location).
    """

    index: int
    source: Exchange
    target: Exchange | None
    link: str  # how it was linked: "same-connection", "same-client", "not-followed", ...
    confidence: float


@dataclass(slots=True)
class Chain:
    """A root request and every redirect hop that followed it, in order."""

    hops: list[Hop]
    end: str  # "final", "not-followed", "no-location", "error", "bad-location"
    id: int | None = None
    third_party: bool | None = None  # every hop between third parties of its page (None: no page)

    @property
    def root(self) -> Exchange:
        return self.hops[0].source

    @property
    def exchanges(self) -> list[Exchange]:
        out = [h.source for h in self.hops]
        last = self.hops[-1].target
        if last is not None:
            out.append(last)
        return out


@dataclass(slots=True)
class Finding:
    """One rule that fired on one hop of one chain."""

    rule: str
    rule_id: str
    severity: Severity
    confidence: float
    message: str
    chain: Chain | None  # None for a finding about a request that was not part of a chain
    hop: int
    evidence: dict[str, Any]
    exchange: Exchange  # the exchange the finding points at (usually the follow-up)
    third_party: bool | None = None  # about a hop between third parties of its page (None: no page)
