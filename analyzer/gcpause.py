"""Pausing Python's cycle collector around bulk work that creates no cycles."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def cycle_collection_paused() -> Iterator[None]:
    """Run a block with the cycle collector off, restoring its state afterwards.

    An import or an analysis allocates millions of objects that hold no reference
    cycles (parsed entries, rows, exchanges, chains) and that reference counting frees;
    each collector pass would walk all of them again, repeatedly, as they pile up.
    Measured: about a third of a HAR import, a fifth of `analyze` on 1M exchanges.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
