"""The `redirect-audit` command (and `python -m analyzer`).

Kept to built-in modules so that Ctrl-C is handled before anything loads:
the first Ctrl-C interrupts the work in hand, which then rolls back and says what was
stored (one line, exit 130); a second one while that happens stops at once.
"""

from __future__ import annotations

import _signal  # the built-in module under `signal`: nothing to load before the handler is set
import _thread
import os
import sys
import time

TYPE_CHECKING = False  # as typing's, without loading typing before the handler is set
if TYPE_CHECKING:
    from types import FrameType

EXIT_INTERRUPTED = 130
_interrupted = False


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    global _interrupted
    if _interrupted:  # the user insists: leave now; an open transaction is rolled back by the database
        os.write(2, b"\nredirect-audit: interrupted again: stopping now\n")
        os._exit(EXIT_INTERRUPTED)
    _interrupted = True
    raise KeyboardInterrupt


def _unraisable(unraisable: sys.UnraisableHookArgs) -> None:
    """A Ctrl-C that lands while Python runs a finalizer or a weakref callback is printed as
    "Exception ignored" and swallowed: the work would go on. Deliver it again instead."""
    global _interrupted
    if isinstance(unraisable.exc_value, KeyboardInterrupt) and _interrupted:
        _interrupted = False
        _thread.start_new_thread(_redeliver, ())  # from another thread: raised once this callback is over
        return
    _default_unraisable(unraisable)


def _redeliver() -> None:
    time.sleep(0.005)
    _thread.interrupt_main(_signal.SIGINT)


_default_unraisable = sys.unraisablehook


def main() -> None:
    if sys.argv[1:2] == ["pytest-backend"]:  # the pytest plugin's other half (analyzer/testbackend.py)
        _signal.signal(_signal.SIGINT, _signal.SIG_IGN)  # the test process ends it: its stdin closes
        from analyzer.testbackend import serve

        code = serve()  # everything is stored and closed once it returns
        sys.stderr.flush()
        os._exit(code)  # no interpreter teardown to wait for: the test process waits for this exit
    if _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler:  # not when Ctrl-C is ignored
        _signal.signal(_signal.SIGINT, _on_sigint)
        sys.unraisablehook = _unraisable
    try:
        from analyzer.cli import main as run
    except KeyboardInterrupt:
        sys.stderr.write("\nredirect-audit: interrupted\n")
        sys.exit(EXIT_INTERRUPTED)
    run()


if __name__ == "__main__":
    main()
