"""The `redirect-audit` command (and `python -m analyzer`).

Kept to the standard library so that Ctrl-C is handled before anything heavy loads:
the first Ctrl-C interrupts the work in hand, which then rolls back and says what was
stored (one line, exit 130); a second one while that happens stops at once.
"""

from __future__ import annotations

import os
import signal
import sys

EXIT_INTERRUPTED = 130
_interrupted = False


def _on_sigint(signum, frame) -> None:
    global _interrupted
    if _interrupted:  # the user insists: leave now; an open transaction is rolled back by the database
        os.write(2, b"\nredirect-audit: interrupted again: stopping now\n")
        os._exit(EXIT_INTERRUPTED)
    _interrupted = True
    raise KeyboardInterrupt


def main() -> None:
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not when Ctrl-C is ignored
        signal.signal(signal.SIGINT, _on_sigint)
    try:
        from analyzer.cli import main as run
    except KeyboardInterrupt:
        sys.stderr.write("\nredirect-audit: interrupted\n")
        sys.exit(EXIT_INTERRUPTED)
    run()


if __name__ == "__main__":
    main()
