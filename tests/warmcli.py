"""Child processes that start warm: the command line, mitmdump, a Python script.

A test that runs `redirect-audit …` or `mitmdump` as a user does pays Python's start and
the imports (SQLAlchemy, click, rich, mitmproxy)
in every child: about 0.5 s of CPU a command and 1.5 s a proxy, most of the suite's time.
Here a server process imports them once and forks one child per program. The child is what
the program would be: a process of its own with the test's environment, working directory
and descriptors, the program's real entry point (`analyzer.__main__.main`, mitmproxy's
`mitmdump()`), its atexit handlers run, signals and exit status as the test sees them.
Only the interpreter's start and the imports are shared.

Where the server cannot run (not Linux), callers fall back to a fresh interpreter.
"""

from __future__ import annotations

import atexit
import json
import locale
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO

# What the programs import on their way (the server imports them before it forks). Not
# pandas: it imports pyarrow, which starts a thread, and a fork must find none.
PRELOAD = (
    "analyzer.cli",
    "analyzer.session",
    "analyzer.store",
    "analyzer.storeread",
    "analyzer.current",
    "analyzer.ingest",
    "analyzer.ingest.har",
    "analyzer.ingest.flows",
    "analyzer.ingest.recorder",
    "analyzer.analysis",
    "analyzer.live",
    "analyzer.report",
    "analyzer.exports",
    "analyzer.migrate",
    "rich.console",
    "rich.table",
    "sqlalchemy.dialects.sqlite",
    "sqlalchemy.dialects.postgresql.psycopg",
    "psycopg",
    "mitmproxy.tools.main",
    "mitmproxy.tools.dump",
    "mitmproxy.addons",
)

SERVER = r"""
import atexit, io, json, os, selectors, signal, socket, sys, threading, traceback
import importlib

for name in sys.argv[2].split(","):
    importlib.import_module(name)
if len(os.listdir("/proc/self/task")) != 1:  # a fork with another thread alive could copy a held lock
    sys.exit("the warm server has threads after its imports: " + str(threading.enumerate()))

listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(sys.argv[1])
listener.listen(64)
print("ready", flush=True)
STDIO = [(s.encoding, s.errors) for s in (sys.stdin, sys.stdout, sys.stderr)]


def stdio(env):
    # as the interpreter sets them up: stdout block-buffered on a pipe (unless
    # PYTHONUNBUFFERED), stderr line-buffered
    unbuffered = bool(env.get("PYTHONUNBUFFERED"))

    def writer(fd, encoding, errors, line_buffering):
        raw = io.FileIO(fd, "w", closefd=False)
        if unbuffered:  # as -u: no binary buffer at all, every write goes straight out
            return io.TextIOWrapper(raw, encoding, errors, write_through=True)
        return io.TextIOWrapper(io.BufferedWriter(raw), encoding, errors, line_buffering=line_buffering)

    (ienc, ierr), (oenc, oerr), (eenc, eerr) = STDIO
    sys.stdin = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r", closefd=False)), ienc, ierr)
    sys.stdout = writer(1, oenc, oerr, False)
    sys.stderr = writer(2, eenc, eerr, True)


def finish(code):
    # as the interpreter ends a program: its exit handlers, its output flushed, then gone
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


class Forked:
    # A mitmdump forked from a warm command (the part of subprocess.Popen the recorder uses).

    def __init__(self, pid):
        self.pid, self.returncode = pid, None

    def poll(self):
        if self.returncode is None:
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout=None):
        import subprocess, time
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired("mitmdump", timeout)
            time.sleep(0.005)
        return self.returncode

    def send_signal(self, sig):
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self):
        self.send_signal(signal.SIGTERM)

    def kill(self):
        self.send_signal(signal.SIGKILL)


def forked_mitmdump(argv, log, env, gid=None, kept=()):  # a fork keeps every descriptor anyway
    # The recorder's mitmdump, forked from this warm command instead of started cold:
    # mitmproxy is imported already. The same program, arguments, environment, output and group.
    pid = os.fork()
    if pid:
        return Forked(pid)
    code = 1
    try:
        os.setsid()
        if gid is not None:
            os.setgroups([])
            os.setgid(gid)
        atexit._clear()  # the command's exit handlers are not mitmdump's
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        os.environ.clear()
        os.environ.update(env)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        stdio(env)
        if list(argv[1:3]) == ["-m", "addons.adopt"]:  # python -m addons.adopt ARGS: as it would run
            sys.argv = [argv[0], *argv[3:]]
            from addons.adopt import adopt_listener
            adopt_listener()
        else:
            sys.argv = list(argv)
        from mitmproxy.tools.main import mitmdump
        code = mitmdump() or 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finish(code)


def entry(request):
    kind = request["kind"]
    if kind == "analyzer":
        sys.argv = [os.path.join(os.path.dirname(sys.modules["analyzer"].__file__), "__main__.py"), *request["args"]]
        import analyzer.session
        analyzer.session.Recording._popen = staticmethod(forked_mitmdump)  # `run`'s recorder starts warm too
        from analyzer.__main__ import main
        main()
    elif kind == "mitmdump":
        sys.argv = [os.path.join(os.path.dirname(sys.executable), "mitmdump"), *request["args"]]
        from mitmproxy.tools.main import mitmdump
        sys.exit(mitmdump())
    else:
        sys.argv = ["-c", *request["args"]]
        if request.get("warm_recorder"):  # a pytest session whose plugin starts a recorder
            import analyzer.session
            analyzer.session.Recording._popen = staticmethod(forked_mitmdump)
        exec(compile(request["code"], "<string>", "exec"), {"__name__": "__main__"})


def child(request, fds):
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    import tempfile
    tempfile.tempdir = None  # found again from this environment's TMPDIR, as a new process would
    if request.get("new_session"):
        os.setsid()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    stdio(request["env"])
    code = 0
    try:
        entry(request)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, int) and exc.code is not None:
            print(exc.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    finish(code)


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


class WarmProcess:
    """A child of the warm server, as much of `subprocess.Popen` as the tests use."""

    def __init__(self, args: list[str], conn: socket.socket) -> None:
        self.args = args
        self.conn = conn
        self.returncode: int | None = None
        self.outputs: tuple[IO[bytes], IO[bytes]] | None = None
        self._replies = b""
        reply = self._next(None)
        self.pid: int = reply["pid"]

    def _next(self, timeout: float | None) -> dict:
        while b"\n" not in self._replies:
            self.conn.settimeout(timeout)
            try:
                data = self.conn.recv(4096)
            except TimeoutError:
                raise subprocess.TimeoutExpired(self.args, timeout or 0) from None
            if not data:
                raise RuntimeError("the warm server went away")
            self._replies += data
        line, self._replies = self._replies.split(b"\n", 1)
        return json.loads(line)

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                self.wait(timeout=0.0001)
            except subprocess.TimeoutExpired:
                return None
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.returncode = self._next(timeout)["status"]
            self.conn.close()
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """(stdout, stderr) of a child started by `start()`, once it has exited."""
        self.wait(timeout)
        assert self.outputs is not None, "started without captured output"
        texts = []
        for handle in self.outputs:
            with handle:
                handle.seek(0)
                texts.append(_text([handle.read()]))
        self.outputs = None
        return texts[0], texts[1]

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class WarmServer:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="ra-warm-"))
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
            raise RuntimeError("the warm server did not start")

    def popen(
        self,
        kind: str,
        args: list[str],
        *,
        env: dict[str, str],
        cwd: str | Path,
        stdin: int,
        stdout: int,
        stderr: int,
        code: str = "",
        new_session: bool = False,
        warm_recorder: bool = False,
    ) -> WarmProcess:
        """Start `kind` ("analyzer", "mitmdump", or "python" running `code`) on these descriptors;
        `warm_recorder`: a recorder the Python code starts forks warm too (as `analyzer`'s does)."""
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(self.path)
        request = {
            "kind": kind,
            "args": args,
            "code": code,
            "env": env,
            "cwd": str(cwd),
            "new_session": new_session,
            "warm_recorder": warm_recorder,
        }
        socket.send_fds(conn, [json.dumps(request).encode()], [stdin, stdout, stderr])
        return WarmProcess([kind, *args], conn)

    def start(self, kind: str, args: list[str], *, cwd: str | Path, code: str = "") -> WarmProcess:
        """A child with stdin closed and its output kept for `communicate()`, as
        `Popen(stdout=PIPE, stderr=PIPE, text=True)` gives it (in this process's environment)."""
        out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()  # noqa: SIM115 - closed by communicate()
        with open(os.devnull, "rb") as nothing:
            child = self.popen(
                kind,
                args,
                env=dict(os.environ),
                cwd=cwd,
                stdin=nothing.fileno(),
                stdout=out.fileno(),
                stderr=err.fileno(),
                code=code,
            )
        child.outputs = (out, err)
        return child

    def run(
        self,
        args: list[str],
        env: dict[str, str],
        cwd: str,
        input: str | None,
        timeout: float,
        stdout: int | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """The command line, as `subprocess.run(capture_output=True, text=True)` runs it;
        `stdout`: a descriptor for its stdout (the caller's pipe, say) instead of one read here."""
        out_r, out_w = os.pipe() if stdout is None else (-1, os.dup(stdout))
        err_r, err_w = os.pipe()
        source = tempfile.TemporaryFile() if input is not None else open(os.devnull, "rb")  # noqa: SIM115
        try:
            with source:
                if input is not None:
                    source.write(input.encode())
                    source.seek(0)
                child = self.popen(
                    "analyzer", args, env=env, cwd=cwd, stdin=source.fileno(), stdout=out_w, stderr=err_w
                )
        finally:
            os.close(out_w)
            os.close(err_w)
        return _collect(child, out_r, err_r, timeout)

    def run_python(
        self, code: str, args: list[str], env: dict[str, str], cwd: str, timeout: float
    ) -> subprocess.CompletedProcess[str]:
        """`python -c CODE ARGS`, as `subprocess.run(capture_output=True, text=True)` runs it,
        with a recorder it starts forked warm."""
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            with open(os.devnull, "rb") as nothing:
                child = self.popen(
                    "python",
                    args,
                    env=env,
                    cwd=cwd,
                    stdin=nothing.fileno(),
                    stdout=out_w,
                    stderr=err_w,
                    code=code,
                    warm_recorder=True,
                )
        finally:
            os.close(out_w)
            os.close(err_w)
        return _collect(child, out_r, err_r, timeout)


def _collect(child: WarmProcess, out_r: int, err_r: int, timeout: float) -> subprocess.CompletedProcess[str]:
    """Read the child's stdout and stderr to their end, then its status, as communicate() does."""
    chunks: dict[int, list[bytes]] = {out_r: [], err_r: []}
    selector = selectors.DefaultSelector()
    for fd in (out_r, err_r):
        if fd >= 0:
            selector.register(fd, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    try:
        while selector.get_map():
            ready = selector.select(max(0.0, deadline - time.monotonic()))
            if not ready:
                child.kill()
                raise subprocess.TimeoutExpired(child.args, timeout)
            for key, _ in ready:
                data = os.read(key.fd, 65536)
                if data:
                    chunks[key.fd].append(data)
                else:
                    selector.unregister(key.fd)
        status = child.wait(max(0.1, deadline - time.monotonic()))
    finally:
        selector.close()
        for fd in (out_r, err_r):
            if fd >= 0:
                os.close(fd)
    return subprocess.CompletedProcess(
        ["redirect-audit", *child.args[1:]], status, _text(chunks[out_r]), _text(chunks[err_r])
    )


def _text(chunks: list[bytes]) -> str:
    """As subprocess's text mode reads a pipe: the locale's encoding, universal newlines."""
    text = b"".join(chunks).decode(locale.getpreferredencoding(False))
    return text.replace("\r\n", "\n").replace("\r", "\n")


_server: WarmServer | None = None
_lock = threading.Lock()


def server() -> WarmServer | None:
    """This process's server, started on first use (None where it cannot run, or when
    REDIRECT_AUDIT_TEST_COLD=1 asks for fresh interpreters)."""
    global _server
    if os.environ.get("REDIRECT_AUDIT_TEST_COLD"):
        return None
    if not hasattr(os, "pidfd_open") or not hasattr(socket, "send_fds"):
        return None
    with _lock:
        if _server is None or _server.process.poll() is not None:
            try:
                _server = WarmServer()
            except RuntimeError as exc:  # slower, not wrong: fresh interpreters from here on
                print(f"tests/warmcli.py: {exc}; children start cold", file=sys.stderr)
                os.environ["REDIRECT_AUDIT_TEST_COLD"] = "1"
                return None
            atexit.register(_stop, _server)
        return _server


def _stop(warm: WarmServer) -> None:
    warm.process.kill()
    warm.process.wait()
    shutil.rmtree(warm.dir, ignore_errors=True)
