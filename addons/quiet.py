"""mitmdump or mitmweb for `redirect-audit proxy`: Ctrl-C at any moment of its life exits 130.

`python -m addons.quiet mitmdump|mitmweb ARGS`. Run as mitmproxy's own scripts, a Ctrl-C
while mitmproxy still loads its modules ends in a `KeyboardInterrupt` traceback, and one
once it runs ends with status 0, as if it had stopped on its own. Here the first is one
line and status 130, and so is the second, after mitmproxy's own orderly shutdown (the
recorder stores what it holds first): a shell, a CI step or a supervisor can tell that
it was interrupted. SIGTERM is still a clean stop with status 0.
"""

from __future__ import annotations

import _signal  # before anything loads: a Ctrl-C from the first instant is ours to handle
import os
import sys

EXIT_INTERRUPTED = 130
_interrupted = False


def _while_loading(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _note_interrupt() -> None:
    """Wrap mitmproxy's SIGINT handler on its event loop so that a Ctrl-C is remembered."""
    import asyncio
    import signal

    loop_class = asyncio.get_event_loop_policy().new_event_loop().__class__
    original = loop_class.add_signal_handler

    def add_signal_handler(self: asyncio.AbstractEventLoop, sig: int, callback, *args):  # type: ignore[no-untyped-def]  # asyncio's own signature
        if sig != signal.SIGINT:
            return original(self, sig, callback, *args)

        def interrupted(*given: object) -> None:
            global _interrupted
            _interrupted = True
            callback(*given)

        return original(self, sig, interrupted, *args)

    loop_class.add_signal_handler = add_signal_handler  # type: ignore[method-assign,assignment]  # once, before mitmproxy's loop starts


def main() -> None:
    if _signal.getsignal(_signal.SIGINT) is not _signal.SIG_IGN:  # a background job keeps ignoring it
        _signal.signal(_signal.SIGINT, _while_loading)
    tool = sys.argv[1] if len(sys.argv) > 1 else "mitmdump"
    sys.argv = [tool, *sys.argv[2:]]
    try:
        # blocked by `proxy` before its exec: a Ctrl-C that waited arrives here, in the try
        _signal.pthread_sigmask(_signal.SIG_UNBLOCK, {_signal.SIGINT})
        _note_interrupt()
        from mitmproxy.tools.main import mitmdump, mitmweb

        status = (mitmweb if tool == "mitmweb" else mitmdump)()
    except KeyboardInterrupt:
        # Before mitmproxy's own handler is set (it is set before any addon, the recorder
        # included, starts): nothing to store. os._exit: the interpreter would otherwise
        # end itself with SIGINT at exit, having seen a KeyboardInterrupt leave code it ran.
        _signal.signal(_signal.SIGINT, _signal.SIG_IGN)
        sys.stdout.flush()
        os.write(2, b"\nredirect-audit: interrupted while the proxy started; nothing was recorded\n")
        os._exit(EXIT_INTERRUPTED)
    if _interrupted:
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(status)


if __name__ == "__main__":
    main()
