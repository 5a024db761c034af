"""Which way worker processes start: fork when it is safe, else a fork server."""

from __future__ import annotations

import os
import threading


def single_threaded() -> bool:
    """Does this process have one thread, as the operating system counts them? Python's
    own count misses threads that C libraries start (OpenBLAS under numpy, a driver's I/O
    thread); Python 3.12 counts them too, and warns about a fork with any of them alive,
    since a lock one of them held would be copied into the child, held forever."""
    if threading.active_count() != 1:
        return False
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:  # no /proc (not Linux): Python's count is what there is
        return True


def start_method() -> str:
    """fork (workers start at once and share the imported code) while it is safe, else forkserver."""
    return "fork" if single_threaded() else "forkserver"
