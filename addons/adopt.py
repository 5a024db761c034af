"""mitmdump on a listening socket bound by its parent (`python -m addons.adopt ARGS`).

`redirect-audit run` binds the proxy's port itself and hands the socket down (its
descriptor in REDIRECT_AUDIT_LISTEN_FD; analyzer/session.py, `Recording.prebind`), so
that the command starts at once: the connections it opens while mitmdump boots wait in
the socket's queue. The server mitmproxy starts on that port takes the socket instead of
binding one; any other listener (a label's, a later restart) binds as usual. It is
patched here, before mitmproxy starts: an addon script loads too late (mitmproxy loads
scripts in a task that races the one starting the servers).
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from typing import Any

LISTEN_FD_ENV = "REDIRECT_AUDIT_LISTEN_FD"


def adopt_listener() -> None:
    given = os.environ.pop(LISTEN_FD_ENV, "")
    if not given.isdigit():
        return
    from mitmproxy.proxy.mode_servers import AsyncioServerInstance

    inherited = [socket.socket(fileno=int(given))]
    port = inherited[0].getsockname()[1]
    original = AsyncioServerInstance.listen

    async def listen(self: Any, host: str, at: int) -> Any:
        if inherited and at == port and self.mode.transport_protocol == "tcp":
            return [await asyncio.start_server(self.handle_stream, sock=inherited.pop())]
        return await original(self, host, at)

    AsyncioServerInstance.listen = listen  # type: ignore[method-assign,assignment]  # before any server starts; once per process


def main() -> None:
    adopt_listener()
    from mitmproxy.tools.main import mitmdump

    sys.exit(mitmdump())


if __name__ == "__main__":
    main()
