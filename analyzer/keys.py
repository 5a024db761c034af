"""The key that fingerprints secrets, and where it may live instead of the store.

By default each store keeps a random key in its `meta` table: whoever has the store can
recompute a fingerprint, so a guessed password can be confirmed against it. A team that
shares a store (or hands it around) can keep the key outside it: `--key-file PATH` or
`$REDIRECT_AUDIT_KEY_FILE` when the store is created. The store then records only the
key's id, and commands that need the key (imports, the proxy) must be given the file.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

from analyzer.errors import ReportedError

KEY_FILE_ENV = "REDIRECT_AUDIT_KEY_FILE"
KEY_BYTES = 32


class KeyError_(ReportedError):
    """The key file cannot be read, made or used; one line."""


def key_file_from(given: str | None) -> Path | None:
    """--key-file, else $REDIRECT_AUDIT_KEY_FILE, else None."""
    value = given or os.environ.get(KEY_FILE_ENV)
    return Path(value).expanduser() if value else None


def key_id(key: bytes) -> str:
    """What the store records of an outside key, to tell the right file from a wrong one."""
    return hashlib.sha256(b"redirect-audit key id\0" + key).hexdigest()[:16]


def new_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def read_key(path: Path) -> bytes:
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise KeyError_(f"key file {path}: cannot read: {exc.strerror or exc}") from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise KeyError_(f"key file {path}: not a redirect-audit key ({KEY_BYTES * 2} hex digits)")
    return key


def read_or_create_key(path: Path) -> bytes:
    """The key in `path`, created there (readable by its owner only) if the file does not exist."""
    if path.exists():
        return read_key(path)
    key = new_key()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it meanwhile
        return read_key(path)
    except OSError as exc:
        raise KeyError_(f"key file {path}: cannot create: {exc.strerror or exc}") from None
    with os.fdopen(fd, "w") as fh:
        fh.write(key.hex() + "\n")
    return key
