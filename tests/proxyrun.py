"""A real mitmdump with the recorder addon, on loopback, for tests and benchmarks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import warmcli

ROOT = Path(__file__).resolve().parent.parent
ADDON = ROOT / "addons" / "redirect_recorder.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


class Mitmdump:
    """mitmdump as a child process; `stop()` sends SIGTERM and returns its output."""

    def __init__(self, confdir: Path, *, db: str | None, extra: list[str] = (), log: Path | None = None):
        self.port = free_port()
        self.confdir = confdir
        confdir.mkdir(parents=True, exist_ok=True)
        program = Path(sys.executable).parent / "mitmdump"
        args = [
            str(program),
            "--listen-host",
            "127.0.0.1",
            "--listen-port",
            str(self.port),
            "--set",
            f"confdir={confdir}",
            "--set",
            "ssl_insecure=true",
            "--set",
            "flow_detail=0",
        ]
        if db is not None:
            args += ["-s", str(ADDON), "--set", f"redirect_audit_db={db}"]
        self.log = log or confdir / f"mitmdump-{self.port}.log"
        self._out = open(self.log, "wb")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        warm = warmcli.server()  # mitmproxy imported already: a second or two less per proxy
        if warm is not None:
            with open(os.devnull, "rb") as nothing:
                self.process: warmcli.WarmProcess | subprocess.Popen = warm.popen(
                    "mitmdump",
                    [*args[1:], *extra],
                    env=env,
                    cwd=os.getcwd(),
                    stdin=nothing.fileno(),
                    stdout=self._out.fileno(),
                    stderr=self._out.fileno(),
                )
        else:
            self.process = subprocess.Popen(
                [*args, *extra], stdout=self._out, stderr=subprocess.STDOUT, env=env
            )
        try:
            wait_for_port(self.port)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"mitmdump did not start:\n{self.output()}") from None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ca(self) -> Path:
        return self.confdir / "mitmproxy-ca-cert.pem"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 60.0) -> str:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._out.close()
        return self.output()
