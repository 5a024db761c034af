"""The one exception type the command line reports as a plain line instead of a bug."""

from __future__ import annotations


class ReportedError(Exception):
    """A failure whose message is one line a user can act on (a bad file, a busy store, a
    bad option value): the command line prints it and exits with status 2, no traceback."""
