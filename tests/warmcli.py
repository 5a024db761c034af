"""The command line in a child process of its own, started warm.

A test that runs `redirect-audit …` as a user does pays Python's start and the imports
(SQLAlchemy, click, rich; pandas and matplotlib for some commands) in every child: about
0.5 s of CPU, most of the suite's time. Here a server process imports them once and forks
one child per command. The child is what `python -m analyzer ARGS` would be: a process of
its own with the test's environment, working directory and stdin, its stdout and stderr on
pipes, the real entry point (`analyzer.__main__.main`), atexit handlers run, the exit status
as the test sees it. Only the interpreter's start and the imports are shared.

Where the server cannot run (not Linux), `run` falls back to a fresh interpreter.
"""

from __future__ import annotations

import atexit
import json
import os
import selectors
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

# What the commands import on their way (the server imports them before forking).
PRELOAD = (
    "analyzer.cli",
    "analyzer.store",
    "analyzer.storeread",
    "analyzer.current",
    "analyzer.ingest",
    "analyzer.ingest.har",
    "analyzer.analysis",
    "analyzer.report",
    "analyzer.exports",
    "analyzer.frames",
    "analyzer.plots",
    "analyzer.htmlreport",
    "analyzer.migrate",
    "rich.console",
    "rich.table",
    "sqlalchemy.dialects.sqlite",
)

SERVER = r"""
import atexit, io, json, os, selectors, signal, socket, sys, traceback
import importlib

for name in sys.argv[2].split(","):
    importlib.import_module(name)
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(sys.argv[1])
listener.listen(64)
print("ready", flush=True)
STDIO = [(s.encoding, s.errors) for s in (sys.stdin, sys.stdout, sys.stderr)]


def child(request, fds):
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    signal.signal(signal.SIGINT, signal.default_int_handler)
    (ienc, ierr), (oenc, oerr), (eenc, eerr) = STDIO
    sys.stdin = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r", closefd=False)), ienc, ierr)
    sys.stdout = io.TextIOWrapper(io.BufferedWriter(io.FileIO(1, "w", closefd=False)), oenc, oerr)
    sys.stderr = io.TextIOWrapper(
        io.BufferedWriter(io.FileIO(2, "w", closefd=False)), eenc, eerr, line_buffering=True
    )
    sys.argv = [os.path.join(os.path.dirname(sys.modules["analyzer"].__file__), "__main__.py"), *request["args"]]
    code = 0
    try:
        from analyzer.__main__ import main
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, int) and exc.code is not None:
            print(exc.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


selector = selectors.DefaultSelector()
selector.register(listener, selectors.EVENT_READ, None)
while True:
    for key, _ in selector.select():
        if key.data is None:
            conn, _ = listener.accept()
            message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
            request = json.loads(message)
            pid = os.fork()
            if pid == 0:
                selector.close()
                listener.close()
                conn.close()
                child(request, fds)
            for fd in fds:
                os.close(fd)
            conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
            selector.register(os.pidfd_open(pid), selectors.EVENT_READ, (pid, conn))
        else:
            pid, conn = key.data
            selector.unregister(key.fileobj)
            os.close(key.fileobj)
            _, status = os.waitpid(pid, 0)
            try:
                conn.sendall(json.dumps({"status": os.waitstatus_to_exitcode(status)}).encode() + b"\n")
            except OSError:
                pass
            conn.close()
"""


class WarmServer:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="ra-warmcli-"))
        self.path = str(self.dir / "sock")
        self.process = subprocess.Popen(
            [sys.executable, "-c", SERVER, self.path, ",".join(PRELOAD)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parent.parent,
        )
        assert self.process.stdout is not None
        if self.process.stdout.readline().strip() != "ready":
            raise RuntimeError("the warm command-line server did not start")

    def run(
        self,
        args: list[str],
        env: dict[str, str],
        cwd: str,
        input: str | None,
        timeout: float,
        stdout: int | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """`stdout`: a descriptor for the child's stdout (the caller's pipe, say) instead of one read here."""
        out_r, out_w = os.pipe() if stdout is None else (-1, os.dup(stdout))
        err_r, err_w = os.pipe()
        stdin = tempfile.TemporaryFile() if input is not None else open(os.devnull, "rb")  # noqa: SIM115
        with stdin:
            if input is not None:
                stdin.write(input.encode())
                stdin.seek(0)
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.connect(self.path)
            request = {"args": args, "env": env, "cwd": str(cwd)}
            socket.send_fds(conn, [json.dumps(request).encode()], [stdin.fileno(), out_w, err_w])
        os.close(out_w)
        os.close(err_w)
        return _collect(args, conn, out_r, err_r, timeout)


def _collect(
    args: list[str], conn: socket.socket, out_r: int, err_r: int, timeout: float
) -> subprocess.CompletedProcess[str]:
    """Read the child's stdout and stderr to their end and its status, as communicate() does."""
    chunks: dict[int, list[bytes]] = {out_r: [], err_r: []}
    replies = b""
    pid = status = None
    selector = selectors.DefaultSelector()
    for fd in (out_r, err_r):
        if fd >= 0:
            selector.register(fd, selectors.EVENT_READ)
    selector.register(conn, selectors.EVENT_READ)
    deadline = _now() + timeout
    try:
        while status is None or len(selector.get_map()) > 1:
            ready = selector.select(max(0.0, deadline - _now()))
            if not ready:
                if pid is not None:
                    os.kill(pid, 9)
                raise subprocess.TimeoutExpired(["redirect-audit", *args], timeout)
            for key, _ in ready:
                if key.fileobj is conn:
                    data = conn.recv(65536)
                    if not data:
                        raise RuntimeError("the warm command-line server went away")
                    replies += data
                    *lines, replies = replies.split(b"\n")
                    for line in lines:
                        reply = json.loads(line)
                        pid = reply.get("pid", pid)
                        status = reply.get("status", status)
                    continue
                fd = key.fd
                data = os.read(fd, 65536)
                if data:
                    chunks[fd].append(data)
                else:
                    selector.unregister(fd)
    finally:
        selector.close()
        conn.close()
        for fd in (out_r, err_r):
            if fd >= 0:
                os.close(fd)
    return subprocess.CompletedProcess(
        ["redirect-audit", *args], status, _text(chunks[out_r]), _text(chunks[err_r])
    )


def _text(chunks: list[bytes]) -> str:
    """As subprocess's text mode reads a pipe: the locale's encoding, universal newlines."""
    import locale

    text = b"".join(chunks).decode(locale.getpreferredencoding(False))
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _now() -> float:
    import time

    return time.monotonic()


_server: WarmServer | None = None
_lock = threading.Lock()


def server() -> WarmServer | None:
    """This process's server, started on first use (None where it cannot run)."""
    global _server
    if not hasattr(os, "pidfd_open") or not hasattr(socket, "send_fds"):
        return None
    with _lock:
        if _server is None or _server.process.poll() is not None:
            _server = WarmServer()
            atexit.register(_stop, _server)
        return _server


def _stop(warm: WarmServer) -> None:
    warm.process.kill()
    warm.process.wait()
    import shutil

    shutil.rmtree(warm.dir, ignore_errors=True)
