"""What every capture format shares: options, header lookups, body summaries."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from analyzer.model import Body
from analyzer.secrets import redact_body

DEFAULT_BODY_CAP = 64 * 1024
IDEMPOTENCY_HEADERS = ("idempotency-key", "x-idempotency-key")
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


class ImportError_(Exception):  # noqa: N801 - "ImportError" is a builtin
    """A capture that cannot be imported; str() is one line naming the file and the problem."""


@dataclass(frozen=True)
class CaptureOptions:
    """What to keep beyond the default (fingerprints, lengths and hashes)."""

    keep_bodies: bool = False
    body_cap: int = DEFAULT_BODY_CAP

    def __post_init__(self) -> None:
        if self.body_cap < 0:
            raise ValueError("body cap must be >= 0")


@dataclass(frozen=True)
class ImportResult:
    path: str
    capture_id: int
    entries: int
    warnings: int


def summarize_body(raw: bytes, content_type: str | None, options: CaptureOptions) -> Body:
    """Length + SHA-256 always; the bytes themselves only on opt-in, capped and redacted."""
    kept = None
    if options.keep_bodies:
        kept = redact_body(raw[: options.body_cap], content_type)
    return Body(
        length=len(raw),
        sha256=hashlib.sha256(raw).hexdigest(),
        content_type=content_type,
        raw=kept,
    )
