"""Results that are never stale: what every reading command and every frame goes through.

A store records which generation of its exchanges the last analysis described
(`analyzer.storeread`). Before anything reads results, `open_current` compares: when
exchanges were added or removed since, the analysis runs again on its own, with the
options it last ran with, and says so in one line on stderr. The analysis is imported
only then, so that answering from current results stays cheap.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextvars import ContextVar

from analyzer.storeread import DEFAULT_WAIT, Reader, StoreState, open_reader, store_state

# Whether a stale store is analyzed again before it is read (the command line's
# --no-analyze sets it off for the whole command, frames included).
ANALYZE_WHEN_STALE: ContextVar[bool] = ContextVar("analyze_when_stale", default=True)


def say_on_stderr(line: str) -> None:
    print(f"redirect-audit: {line}", file=sys.stderr, flush=True)


def open_current(
    db: str | None,
    *,
    reanalyze: bool | None = None,
    wait: float = DEFAULT_WAIT,
    say: Callable[[str], None] = say_on_stderr,
    count: bool = True,
) -> tuple[Reader, StoreState]:
    """A reader on an existing store whose results describe its current exchanges.

    With `reanalyze=False` (default: ANALYZE_WHEN_STALE) stale results are read as they
    are, with a line saying so.
    """
    if reanalyze is None:
        reanalyze = ANALYZE_WHEN_STALE.get()
    reader = open_reader(db, wait)
    try:
        state = store_state(reader, count=count)
        if state.is_current:
            return reader, state
        if not reanalyze:
            say(
                "note: the store changed since its last analysis; these results do not include that change "
                "(leave out --no-analyze to analyze it now)"
            )
            return reader, state
        why = (
            "has never been analyzed"
            if state.analyzed is None
            else "was analyzed by an older redirect-audit"
            if state.older_engine and state.analyzed == state.generation
            else "changed since its last analysis"
        )
        say(f"the store {why}; analyzing it now")
        reanalyze_store(db, state, wait)
        return reader, store_state(reader, count=count)
    except BaseException:
        reader.close()
        raise


def reanalyze_store(db: str | None, state: StoreState, wait: float) -> None:
    """Run the analysis again with the options the store's results were last made with."""
    from analyzer.analysis import AnalysisOptions, analyze
    from analyzer.store import open_store

    store = open_store(db, create=False, wait=wait)
    try:
        analyze(store, AnalysisOptions.from_dict(state.options))
    finally:
        store.close()


def ensure_current(
    db: str | None, *, wait: float = DEFAULT_WAIT, say: Callable[[str], None] = say_on_stderr
) -> None:
    """Re-analyze the store if its results are stale (the frames call this before reading).
    With ANALYZE_WHEN_STALE off, stale results stay and nothing is said: the command that
    set it has said so once."""
    if not ANALYZE_WHEN_STALE.get():
        open_reader(db, wait).close()  # still refuse a store that does not exist
        return
    reader, _ = open_current(db, wait=wait, say=say, count=False)
    reader.close()
