"""Files written for the user (reports, baselines): readable by their owner only when new.

What a capture holds is protected before it is stored, but a report still names hosts,
paths and clients; it is the user's to share, not every local account's. A file that
already exists keeps the permissions its owner gave it.
"""

from __future__ import annotations

import os
from pathlib import Path


def private_directory(path: str | os.PathLike[str]) -> None:
    """Make `path` and its missing parents readable by the owner only (0700); a directory
    that exists already is left as it is."""
    missing = []
    here = Path(path)
    while not here.exists():
        missing.append(here)
        here = here.parent
    for directory in reversed(missing):
        directory.mkdir(mode=0o700)
        os.chmod(directory, 0o700)  # mkdir's mode goes through the umask


def write_private(path: str | os.PathLike[str], text: str) -> None:
    """Write `text` (UTF-8) to `path`: created 0600 if new, truncated if it exists."""
    fd = os.open(Path(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
