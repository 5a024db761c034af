"""`redirect-audit proxy`: mitmdump (or mitmweb) with the recorder addon loaded.

The proxy runs as mitmproxy's own program, in place of this process (exec), so its
signals, exit status and options are exactly mitmproxy's. This module only decides
the command line and says, before handing over, where the proxy listens, where the
exchanges go, and how a client is made to trust mitmproxy's CA for HTTPS.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import shlex
import shutil
import signal
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from analyzer.errors import ReportedError
from analyzer.keys import KEY_FILE_ENV
from analyzer.storeread import DB_ENV, safe_url

# Both spellings: curl reads only the lower-case http_proxy (an upper-case HTTP_PROXY can
# come from a request's Proxy header in CGI, CVE-2016-5385); some clients read only upper case.
CLIENT_PROXY_VARS = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")

ADDON_MODULE = "addons.redirect_recorder"
CA_FILE = "mitmproxy-ca-cert.pem"


class ProxyError(ReportedError):
    """The proxy cannot start as asked (a conflicting option, a busy port, mitmproxy missing); one line."""


# mitmproxy options that `proxy` sets itself, and where to give them instead.
OWN_FLAGS = {
    "--listen-port": "-p/--port",
    "--listen-host": "--listen-host (before any mitmproxy option)",
    "--mode": "-m/--mode",
    "--confdir": "--confdir",
}
OWN_SETTINGS = {
    "listen_port": "-p/--port",
    "listen_host": "--listen-host",
    "mode": "-m/--mode",
    "confdir": "--confdir",
    "scripts": "-s for scripts of your own (the recorder is already loaded)",
    "redirect_audit_db": "--db",
    "redirect_audit_bodies": "--keep-bodies",
    "redirect_audit_body_cap": "--body-cap",
    "redirect_audit_live": "--live/--no-live",
    "redirect_audit_secret_fields": "--secret-field",
    "redirect_audit_proxy_id": "--proxy-id",
    "redirect_audit_spool": "--spool-dir",
}


def addon_path() -> Path:
    """The recorder addon's file, located without importing it (it imports mitmproxy)."""
    spec = importlib.util.find_spec(ADDON_MODULE)
    if spec is None or spec.origin is None:
        raise ProxyError(f"the recorder addon ({ADDON_MODULE}) is not installed with this redirect-audit")
    return Path(spec.origin)


def mitmproxy_program(name: str) -> str:
    """mitmdump/mitmweb from this environment first, then from PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise ProxyError(f"{name} not found: mitmproxy is a dependency of redirect-audit, reinstall it")
    return found


@dataclass
class ProxyPlan:
    db_url: str
    listen_host: str = "127.0.0.1"
    port: int = 8080
    modes: list[str] = field(default_factory=list)
    web: bool = False
    keep_bodies: bool = False
    body_cap: int = 64 * 1024
    live: bool = True
    confdir: Path = Path("~/.mitmproxy").expanduser()
    extra: list[str] = field(default_factory=list)
    then: str = "redirect-audit findings"  # the command that shows the findings afterwards
    secret_fields: tuple[str, ...] = ()
    key_file: str | None = None
    proxy_id: str = ""  # empty: the addon's default, host name:port
    spool_dir: str | None = None  # None: next to the store, moved off its filesystem when full

    def check(self) -> None:
        """Refuse pass-through options that would contradict proxy's own, and a port that is taken."""
        for problem in self._conflicts():
            raise ProxyError(problem)
        self._check_port()

    def _conflicts(self) -> Iterator[str]:
        args = self.extra
        recorder = addon_path().resolve()
        for i, arg in enumerate(args):
            flag, _, inline = arg.partition("=")
            if flag in OWN_FLAGS:
                yield f"{flag} is set by redirect-audit proxy; give it as proxy's {OWN_FLAGS[flag]}"
            elif flag in ("-s", "--scripts"):
                script = inline or (args[i + 1] if i + 1 < len(args) else "")
                if script and Path(script).expanduser().resolve() == recorder:
                    yield (
                        "-s: the recorder addon is already loaded by redirect-audit proxy; loaded twice, "
                        "it would record every exchange twice"
                    )
            elif flag == "--set" and (inline or i + 1 < len(args)):
                setting = (inline or args[i + 1]).split("=", 1)[0]
                if setting in OWN_SETTINGS:
                    yield f"--set {setting} is set by redirect-audit proxy; give it as proxy's {OWN_SETTINGS[setting]}"

    def _check_port(self) -> None:
        """Bind the port as mitmproxy will (address reuse on, as asyncio does), then let it go."""
        if self.port == 0 or any("@" in m for m in self.modes):  # any port, or ports set per mode
            return
        try:
            infos = socket.getaddrinfo(
                self.listen_host or None, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
        except socket.gaierror as exc:
            raise ProxyError(
                f"--listen-host {self.listen_host}: not an address this machine has ({exc.strerror})"
            ) from None
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                where = f"{self.listen_host}:{self.port}"
                if exc.errno == errno.EADDRINUSE:
                    raise ProxyError(
                        f"port {self.port} is already in use on {self.listen_host} (another proxy?); "
                        f"choose another with -p PORT"
                    ) from None
                if exc.errno == errno.EACCES:
                    raise ProxyError(
                        f"cannot listen on {where}: permission denied (ports below 1024 need "
                        f"privileges); choose another with -p PORT"
                    ) from None
                raise ProxyError(f"cannot listen on {where}: {exc.strerror}") from None

    @property
    def program(self) -> str:
        return "mitmweb" if self.web else "mitmdump"

    def argv(self) -> list[str]:
        """mitmproxy's command line. The store's URL is not on it (it may hold a password, and
        a command line is visible to every user in `ps`): the addon reads it from the
        environment (environ()). mitmdump's own flow log is off, since it prints every
        request line, secret query values included; `--set flow_detail=1` turns it back on."""
        args = [
            mitmproxy_program(self.program),
            "--listen-host",
            self.listen_host,
            "--listen-port",
            str(self.port),
            "--set",
            f"confdir={self.confdir}",
            "-s",
            str(addon_path()),
            "--set",
            f"redirect_audit_bodies={str(self.keep_bodies).lower()}",
            "--set",
            f"redirect_audit_body_cap={self.body_cap}",
            "--set",
            f"redirect_audit_live={str(self.live).lower()}",
        ]
        if self.secret_fields:
            args += ["--set", f"redirect_audit_secret_fields={','.join(self.secret_fields)}"]
        if self.proxy_id:
            args += ["--set", f"redirect_audit_proxy_id={self.proxy_id}"]
        if self.spool_dir:
            args += ["--set", f"redirect_audit_spool={Path(self.spool_dir).expanduser().resolve()}"]
        for mode in self.modes:
            args += ["--mode", mode]
        if self.web:
            args += ["--set", "web_open_browser=false"]
        else:
            args += ["--set", "flow_detail=0"]
        return args + self.extra

    def environ(self) -> dict[str, str]:
        """The environment mitmproxy runs with: this one, with the store's URL (and key file) in it."""
        env = {**os.environ, DB_ENV: self.db_url}
        if self.key_file:
            env[KEY_FILE_ENV] = str(Path(self.key_file).expanduser().resolve())
        return env

    def banner(self) -> str:
        ca = self.confdir / CA_FILE
        proxy = f"http://{self.listen_host}:{self.port}"
        where = "exists" if ca.exists() else "created when the proxy first starts"
        modes = ", ".join(self.modes) or "regular (clients set it as their HTTP/HTTPS proxy)"
        lines = [
            f"redirect-audit proxy: {self.program} listening on {self.listen_host}:{self.port}, mode {modes}",
            f"  exchanges go to  {safe_url(self.db_url)}",
            f"  mitmproxy CA     {ca} ({where})",
            "  make a client use the proxy and trust the CA:",
            "    export " + " ".join(f"{name}={proxy}" for name in CLIENT_PROXY_VARS),
            f"    a client label (its name in every output): http://NAME@{self.listen_host}:{self.port}",
            f"    curl --proxy {proxy} --cacert {ca} https://...",
            f"    Python requests/httpx/urllib: SSL_CERT_FILE={ca} REQUESTS_CA_BUNDLE={ca}",
            f"    Node.js: NODE_EXTRA_CA_CERTS={ca}",
            "    system-wide (Debian/Ubuntu): cp the CA to /usr/local/share/ca-certificates/mitmproxy.crt"
            " and run update-ca-certificates",
        ]
        if self.web:
            lines.append("  flows in the browser: http://127.0.0.1:8081 (findings are marked and commented)")
        lines.append(f"  stop with Ctrl-C; then: {self.then}")
        return "\n".join(lines)

    def command_line(self) -> str:
        return shlex.join(self.argv())

    def exec(self) -> None:
        """Become mitmdump (or mitmweb), through addons/quiet.py: a Ctrl-C at any moment of its
        life, start-up included, exits 130 without a traceback."""
        argv = self.argv()
        quiet = [sys.executable, "-m", "addons.quiet", Path(argv[0]).name, *argv[1:]]
        # Ctrl-C waits (blocked, not lost) from here until quiet.py's handler is set: a mask
        # outlives exec, and the interpreter would otherwise meet it before any of our code
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        os.execve(sys.executable, quiet, self.environ())
