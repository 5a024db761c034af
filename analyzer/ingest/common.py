"""What every capture format shares: options, header lookups, body summaries."""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from analyzer.errors import ReportedError
from analyzer.model import DATE_RANGE, Body
from analyzer.secrets import SecretPolicy, body_digest, policy_for, redact_body
from analyzer.store import captures, exchanges

DEFAULT_BODY_CAP = 64 * 1024
IDEMPOTENCY_HEADERS = ("idempotency-key", "x-idempotency-key")
# What one exchange of an imported file may hold: past these it is no request or response
# a browser or server exchanges, and a store, `chains` and every report would carry it.
MAX_URL = 2 * 1024 * 1024  # characters of a URL: Chrome's limit, the most generous browser's
MAX_HEADER_CHARS = (
    256 * 1024
)  # characters of one side's header names and values: Chrome's cap on a response's
MAX_HEADERS = 2_000  # header fields on one side: Node's default cap on an incoming message's


def url_too_long(length: int) -> str:
    return (
        f"its URL is {length:,} characters long, over the limit of {MAX_URL:,} "
        "(2 MiB, the longest URL a browser sends)"
    )


def headers_too_large(side: str, count: int, chars: int) -> str | None:
    """What is wrong with one side's headers (`side`: "request" or "response"), or None."""
    if count > MAX_HEADERS:
        return f"its {side} has {count:,} header fields, over the limit of {MAX_HEADERS:,}"
    if chars > MAX_HEADER_CHARS:
        return (
            f"its {side} headers hold {chars:,} characters, over the limit of {MAX_HEADER_CHARS:,} "
            "(256 KiB, the most a browser accepts in a response's headers)"
        )
    return None


class ImportError_(ReportedError):
    """A capture that cannot be imported; str() is one line naming the file and the problem."""


class AlreadyImported(Exception):
    """This content is in the store already; str() is the one line that says so."""

    def __init__(self, name: str, capture_id: int, imported_at: float):
        super().__init__(name, capture_id, imported_at)
        self.name, self.capture_id, self.imported_at = name, capture_id, imported_at

    def __str__(self) -> str:
        when = datetime.fromtimestamp(self.imported_at, UTC).strftime("%Y-%m-%d %H:%M UTC")
        return f"{self.name}: already imported as capture {self.capture_id} on {when}; --force to import it again"


def file_sha256(path: str) -> str:
    """SHA-256 of a file's content: what makes two files the same capture, whatever their names."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def refuse_reimport(conn: Connection, name: str, sha256: str, this_capture: int | None = None) -> None:
    """Raise AlreadyImported when another capture of the store has this content."""
    stmt = select(captures.c.id, captures.c.imported_at).where(captures.c.sha256 == sha256)
    if this_capture is not None:
        stmt = stmt.where(captures.c.id != this_capture)
    first = conn.execute(stmt.order_by(captures.c.id).limit(1)).first()
    if first is not None:
        raise AlreadyImported(name, first.id, first.imported_at)


@dataclass(frozen=True)
class CaptureOptions:
    """What to keep beyond the default (fingerprints, lengths and hashes)."""

    keep_bodies: bool = False
    body_cap: int = DEFAULT_BODY_CAP
    secret_fields: tuple[str, ...] = ()  # field names protected beyond secrets.SECRET_FIELDS

    def __post_init__(self) -> None:
        if self.body_cap < 0:
            raise ValueError("body cap must be >= 0")

    @property
    def policy(self) -> SecretPolicy:
        return policy_for(self.secret_fields)


@dataclass(frozen=True)
class ImportResult:
    path: str
    capture_id: int
    entries: int
    warnings: int
    odd_dates: tuple[int, list[tuple[int, float]]] = (0, [])  # see dates_out_of_range()
    damage: str | None = None  # a file cut off or damaged part way: where, and what was kept


def dates_out_of_range(conn: Connection, capture_id: int) -> tuple[int, list[tuple[int, float]]]:
    """How many exchanges of a capture start outside DATE_RANGE, and the first few (seq,
    seconds). They are kept as given; every report shows them as best it can."""
    low, high = DATE_RANGE
    odd = (exchanges.c.capture_id == capture_id) & (
        (exchanges.c.started_at < low) | (exchanges.c.started_at > high)
    )
    count = conn.execute(select(func.count()).select_from(exchanges).where(odd)).scalar_one()
    first = (
        conn.execute(
            select(exchanges.c.seq, exchanges.c.started_at).where(odd).order_by(exchanges.c.seq).limit(3)
        ).all()
        if count
        else []
    )
    return count, [tuple(r) for r in first]


def summarize_body(raw: bytes, content_type: str | None, options: CaptureOptions, key: bytes) -> Body:
    """Length and keyed digest always; the bytes themselves only on opt-in, with every
    secret field protected first and then capped (a cut JSON body is still redacted)."""
    kept = None
    if options.keep_bodies:
        kept = redact_body(raw, content_type, key, options.policy)[: options.body_cap]
    return Body(length=len(raw), sha256=body_digest(key, raw), content_type=content_type, raw=kept)


def empty_body(key: bytes, content_type: str | None) -> Body:
    """A body known to be empty (Content-Length: 0): the same digest as summarize_body(b"")."""
    return Body(length=0, sha256=_empty_digest(key), content_type=content_type)


@functools.lru_cache(maxsize=8)
def _empty_digest(key: bytes) -> str:
    return body_digest(key, b"")  # most requests have no body: one HMAC per store, not per request
