"""A recorder for one command or one test session: `redirect-audit run` and the pytest plugin.

`Recording` starts mitmdump with the recorder addon on a free loopback port, in a
session of its own (a Ctrl-C at the terminal reaches the command under test, not the
proxy), and waits until the addon answers its control request. `environ()` is what a
child needs to send its traffic through it and still trust everything it trusted:

* the proxy, in every variable clients read (`HTTP_PROXY`, `HTTPS_PROXY`, `ALL_PROXY`,
  each in both cases); with a client label, a port of the label's own (the recorder's
  `/listen`), so that no credential is in the URL and no header the child sends changes;
* one CA bundle, the trust the child had (`SSL_CERT_FILE`, else the system's) plus
  mitmproxy's CA, for `SSL_CERT_FILE`, `REQUESTS_CA_BUNDLE` and `CURL_CA_BUNDLE`: these
  replace the trust store, so mitmproxy's CA alone would break the child's other HTTPS;
  `NODE_EXTRA_CA_CERTS` adds to Node's, so it gets mitmproxy's CA (and what it had);
* `NO_PROXY` without the entries that send loopback around the proxy (the systems
  under test in a test suite are mostly on loopback);
* a preload in `NODE_OPTIONS` (analyzer/preload/node.cjs): Node before 22.21 reads no
  proxy variable, so its fetch and http/https are routed through the recorder there,
  and each Node process leaves a line in the run's directory as it exits (`runtimes()`);
* `JAVA_TOOL_OPTIONS` with the proxy as Java's system properties (loopback included) and
  the bundle as a PKCS#12 truststore.

`flush()` returns once the recorder has stored every exchange it has seen (the addon's
`/flush` control request); `stop()` stops mitmdump, which drains its writer first.
`run_command()` runs a child with signals handled as a wrapper should.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import os
import re
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

from analyzer.errors import ReportedError
from analyzer.files import write_private
from analyzer.netns import RECORDER_GID
from analyzer.proxy import CA_FILE, CLIENT_PROXY_VARS, ProxyPlan
from analyzer.storeread import DB_ENV

CONTROL_HOST = "redirect-audit.invalid"  # answered by the addon (addons/redirect_recorder.py)
PROXY_ENV = "REDIRECT_AUDIT_RECORDER"  # set for the child: the recorder a nested plugin can use
# no name ends in `_proxy`: Python's urllib takes any such variable for a proxy (of a scheme
# "redirect_audit"), which a test asserting getproxies() == {} would see
NODE_PROXY_ENV = "REDIRECT_AUDIT_NODE_RECORDER"  # the proxy (with its label) for the Node preload
RUNTIMES_ENV = "REDIRECT_AUDIT_RUNTIMES"  # where preloaded runtimes report that they ran
TRANSPARENT_ENV = "REDIRECT_AUDIT_TRANSPARENT"  # under `run --transparent`: its transparent listener's port
# this redirect-audit, for the pytest plugin in a test environment without it (the plugin's
# tool.py: after the user's REDIRECT_AUDIT_TOOL and a redirect-audit installed with the tests)
RUN_TOOL_ENV = "REDIRECT_AUDIT_RUN_TOOL"
LISTEN_FD_ENV = "REDIRECT_AUDIT_LISTEN_FD"  # the listening socket handed to mitmdump (prebind)
PROXY_VARS = (*CLIENT_PROXY_VARS, "ALL_PROXY", "all_proxy")
TRUST_VARS = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")
JAVA_STORE_PASSWORD = b"changeit"  # the JDK's usual one: the truststore holds public certificates only
NO_PROXY_VARS = ("NO_PROXY", "no_proxy")
START_TIMEOUT = 60.0  # seconds mitmdump gets to answer its first control request
STOP_TIMEOUT = 60.0  # seconds it gets to drain and exit before it is killed
TOTALS = re.compile(r"redirect-audit: saw (\d+) exchanges, stored (\d+)")


class SessionError(ReportedError):
    """The recorder could not start, answer or stop as asked; one line."""


def free_port(host: str = "127.0.0.1") -> int:
    import socket

    with socket.socket() as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def proxy_url(port: int, label: str | None = None, host: str = "127.0.0.1") -> str:
    """The proxy as clients are given it. A label goes in as the user name, with a
    placeholder password, since some clients (urllib) only send credentials that have one."""
    who = f"{quote(label, safe='')}:x@" if label else ""
    return f"http://{who}{host}:{port}"


def system_trust() -> Path | None:
    """The CA bundle a child would trust without us: SSL_CERT_FILE if set, else OpenSSL's
    default file (Debian: /usr/lib/ssl/cert.pem, the system's CAs), else certifi's."""
    given = os.environ.get("SSL_CERT_FILE")
    if given and Path(given).is_file():
        return Path(given)
    default = ssl.get_default_verify_paths().cafile
    if default and Path(default).is_file():
        return Path(default)
    try:
        import certifi  # a dependency of mitmproxy
    except ImportError:
        return None
    return Path(certifi.where())


def is_loopback_entry(entry: str) -> bool:
    """Does a NO_PROXY entry send loopback traffic around the proxy?"""
    value = entry.strip().lower().strip("[]")
    if not value:
        return False
    if value in ("*", "localhost") or value.endswith(".localhost"):  # "*": everything, loopback too
        return True
    host = value.rsplit(":", 1)[0] if value.count(":") == 1 else value  # host:port
    if host.startswith("127.") and host.replace(".", "").replace("*", "").isdigit():
        return True  # 127.0.0.1, 127.*, 127.0.0.0 as a prefix
    try:
        network = ipaddress.ip_network(host.strip("[]"), strict=False)
    except ValueError:
        return False
    return (
        network.overlaps(ipaddress.ip_network("127.0.0.0/8"))
        if network.version == 4
        else network.overlaps(ipaddress.ip_network("::1/128"))
    )


def without_loopback(value: str) -> str:
    return ",".join(e.strip() for e in value.split(",") if e.strip() and not is_loopback_entry(e))


@dataclass
class Recording:
    """mitmdump with the recorder, for one command or one test session."""

    db_url: str
    workdir: Path  # the CA bundle and mitmdump's log go here
    label: str | None = None  # the client label in the proxy URL children get
    proxy_id: str = ""  # the recorder's name (default: host name:port)
    confdir: Path = Path("~/.mitmproxy").expanduser()
    keep_bodies: bool = False
    live: bool = True
    settings: list[str] = field(default_factory=list)  # mitmproxy options, NAME=VALUE
    key_file: str | None = None
    spool_dir: str | None = None  # where exchanges wait when the store cannot take them
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    attached: bool = False  # a recorder someone else started (REDIRECT_AUDIT_RECORDER): never stopped here
    client_port: int = 0  # the listener whose traffic is recorded under `label` (the recorder's /listen)
    _launch_env: dict[str, str] = field(default_factory=dict, repr=False)
    _attempts: int = 0
    _control_conn: http.client.HTTPConnection | None = field(default=None, repr=False)
    _stopping: bool = field(default=False, repr=False)  # SIGTERM sent
    # `run --transparent`: the recorder runs under netns.RECORDER_GID and listens transparently
    # on this port, where the kernel redirects every connection the command opens
    transparent: bool = False
    transparent_port: int = 0
    # the listening socket is bound here and handed to mitmdump (the addon adopts it): the
    # command can start before mitmdump is up, its connections queued by the kernel meanwhile
    prebind: bool = False

    @property
    def log(self) -> Path:
        return self.workdir / "proxy.log"

    @property
    def running(self) -> bool:
        """This object's mitmdump was started and has not exited."""
        return self.process is not None and self.process.poll() is None

    @property
    def url(self) -> str:
        """The proxy as the child is given it: the label's own listener, so that the URL
        carries no credential (nothing of the label reaches a header the child sends)."""
        return proxy_url(self.client_port or self.port)

    def listen(self) -> None:
        """Ask the recorder for a listener of the label's own (no label: the main port); with
        `transparent`, for its transparent listener (labelled, if there is a label)."""
        if self.transparent:
            if not self.transparent_port:
                from urllib.parse import urlencode

                query = urlencode({"label": self.label or "", "mode": "transparent"})
                self.transparent_port = int(self.control("/listen?" + query)["port"])
            return
        if self.label and not self.client_port:
            from urllib.parse import urlencode

            self.client_port = int(self.control("/listen?" + urlencode({"label": self.label}))["port"])

    @property
    def ca(self) -> Path:
        return self.confdir / CA_FILE

    def plan(self) -> ProxyPlan:
        """The recorder as `redirect-audit proxy` would run it on this port: one command
        line and one environment for both (the user's `--set`s last, so they win)."""
        return ProxyPlan(
            db_url=self.db_url,
            port=self.port,
            keep_bodies=self.keep_bodies,
            live=self.live,
            confdir=self.confdir,
            key_file=self.key_file,
            proxy_id=self.proxy_id,
            spool_dir=self.spool_dir,
            # transparently, a client's request is read before its server is connected (as a
            # proxy client's is), so that a request to a server out of reach is still recorded
            extra=[
                arg
                for setting in (["connection_strategy=lazy"] if self.transparent else []) + self.settings
                for arg in ("--set", setting)
            ],
        )

    def start(
        self, timeout: float = START_TIMEOUT, while_starting: Callable[[], object] | None = None
    ) -> None:
        """Start mitmdump and wait until the recorder answers; a port someone took between
        our choice and mitmdump's bind costs a retry, not the run. `while_starting` runs
        while mitmdump boots (about 2 s of imports): what the caller has to do anyway
        (open the store) costs no extra time; if it raises, mitmdump is stopped."""
        self.launch()
        if while_starting is not None:
            try:
                while_starting()
            except BaseException:
                self._kill()
                raise
        self.ready(timeout)

    def launch(self) -> None:
        """Start mitmdump without waiting for it: `ready()` waits (the pytest plugin lets
        the first tests run meanwhile)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.confdir.mkdir(parents=True, exist_ok=True)
        env = {**self.plan().environ(), "PYTHONUNBUFFERED": "1"}
        for name in (*PROXY_VARS, PROXY_ENV):  # mitmdump's own traffic goes straight out
            env.pop(name, None)
        self._launch_env, self._attempts = env, 0
        self._spawn()

    def _spawn(self) -> None:
        env, kept = self._launch_env, tuple[int, ...]()
        listener = None
        if self.prebind:
            listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
            self.port = listener.getsockname()[1]
        else:
            self.port = free_port()
        argv = self.plan().argv()
        if listener is not None:  # mitmdump that adopts the socket (addons/adopt.py)
            env, kept = {**env, LISTEN_FD_ENV: str(listener.fileno())}, (listener.fileno(),)
            argv = [sys.executable, "-m", "addons.adopt", *argv[1:]]
        try:
            with open(self.log, "ab") as log:
                self.process = self._popen(argv, log, env, RECORDER_GID if self.transparent else None, kept)
        finally:
            if (
                listener is not None
            ):  # mitmdump's alone now: if it dies, clients are refused, not left waiting
                listener.close()

    def untouched(self) -> bool:
        """Nothing ever connected to the recorder's port: the kernel knows no connection to
        or from it in any state (one that ended stays in TIME_WAIT for a minute), only the
        listener. Linux only (/proc/net/tcp); elsewhere it cannot be told: False."""
        port = f":{self.port:04X}"
        try:
            tables = [Path("/proc/net/tcp").read_text()]
        except OSError:
            return False
        try:
            tables.append(Path("/proc/net/tcp6").read_text())
        except OSError:
            pass  # no IPv6
        for table in tables:
            for line in table.splitlines()[1:]:
                fields = line.split()
                if (
                    len(fields) > 3
                    and fields[3] != "0A"
                    and (fields[1].endswith(port) or fields[2].endswith(port))
                ):
                    return False  # 0A: LISTEN
        return True

    def stop_unused(self) -> bool:
        """Stop a recorder that nothing connected to (`untouched`), without waiting for it to
        finish starting: still booting, SIGTERM ends it before it has written anything; up
        already, it stops as always. True when it ended either way, having recorded nothing."""
        status = self.stop()
        return status == 0 or (status == -signal.SIGTERM and self.totals() is None)

    def ready(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until the recorder launched answers (and listens for the label)."""
        while True:
            if self._answers(timeout):
                self.listen()
                return
            output = self.output()
            if "address already in use" in output.lower() and self._attempts < 2:
                self._attempts += 1
                self._spawn()
                continue
            raise SessionError(f"the recorder could not start: {last_error(output)} (log: {self.log})")

    @staticmethod
    def _popen(
        argv: list[str],
        log: IO[bytes],
        env: dict[str, str],
        gid: int | None = None,
        kept: tuple[int, ...] = (),
    ) -> subprocess.Popen[bytes]:
        """mitmdump, in a session of its own, its output in the log (under group `gid`, if
        given), with the descriptors `kept` open."""
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            group=gid,
            extra_groups=[] if gid is not None else None,
            pass_fds=kept,
            preexec_fn=_end_with_parent,
        )

    def _answers(self, timeout: float) -> bool:
        """Wait for the recorder's answer to /ping: True once it answers, False if mitmdump exited."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                return False
            try:
                self.control("/ping", timeout=2.0)
                return True
            except (OSError, http.client.HTTPException, SessionError):
                time.sleep(0.02)
        self._kill()
        raise SessionError(f"the recorder did not answer within {timeout:.0f} s; its log: {self.log}")

    def record(self, captures: list[dict[str, Any]], timeout: float = 60.0) -> dict[str, Any]:
        """Hand the recorder exchanges recorded in process (analyzer/inprocess.py)."""
        return self.control("/record", timeout=timeout, body=json.dumps(captures).encode())

    def control(self, path: str, timeout: float = 60.0, body: bytes | None = None) -> dict[str, Any]:
        """Send a control request through the proxy; the addon answers it itself. One
        connection is kept for them (a new one costs a few ms, twice per test)."""
        for attempt in (0, 1):
            conn = self._control_conn
            if conn is None or conn.port != self.port:
                conn = self._control_conn = http.client.HTTPConnection(
                    "127.0.0.1", self.port, timeout=timeout
                )
            conn.timeout = timeout
            if conn.sock is not None:
                conn.sock.settimeout(timeout)
            try:
                conn.request(
                    "GET" if body is None else "POST",
                    f"http://{CONTROL_HOST}{path}",
                    body=body,
                    headers={"Host": CONTROL_HOST, "Content-Type": "application/json"},
                )
                response = conn.getresponse()
                answer_body = response.read()
                break
            except (OSError, http.client.HTTPException):
                conn.close()
                self._control_conn = None
                if attempt or (self.process is not None and self.process.poll() is not None):
                    raise
        try:
            answer: dict[str, Any] = json.loads(answer_body)
        except ValueError:
            raise SessionError(
                f"the proxy on port {self.port} is not a redirect-audit recorder "
                f"(it answered {response.status} to {path})"
            ) from None
        if response.status != 200:
            raise SessionError(
                f"the recorder answered {response.status} to {path}: {answer.get('error', answer)}"
            )
        return answer

    def relabel(self, label: str, to: str | None) -> dict[str, Any]:
        """Record traffic labelled `label` under `to` from now on (None: as `label` again)."""
        from urllib.parse import urlencode

        return self.control("/label?" + urlencode({"from": label, "to": to or ""}), timeout=30.0)

    def flush(self, timeout: float = 60.0) -> dict[str, Any]:
        """Once this returns, every exchange the proxy finished before the call is stored."""
        return self.control("/flush", timeout=timeout)

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def totals(self) -> tuple[int, int] | None:
        """(seen, stored) as the recorder last logged them, once it has stopped."""
        found = TOTALS.findall(self.output())
        return (int(found[-1][0]), int(found[-1][1])) if found else None

    def stop(self, timeout: float = STOP_TIMEOUT, wait: bool = True) -> int | None:
        """Stop mitmdump; it stores what it holds before it exits. Its exit status (with
        `wait=False`, the signal is sent and None returned: a later stop() waits)."""
        if self._control_conn is not None:
            self._control_conn.close()
            self._control_conn = None
        if self.process is None or self.attached:
            return None
        if self.process.poll() is None:
            if not self._stopping:
                self.process.send_signal(signal.SIGTERM)
                self._stopping = True
            if not wait:
                return None
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._kill()
        return self.process.returncode

    def _kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    # ---- the child's environment ------------------------------------------------------

    def environ(self, base: dict[str, str] | None = None) -> tuple[dict[str, str], list[str]]:
        """(environment, names of the variables changed) for a child whose traffic is recorded."""
        env = dict(os.environ if base is None else base)
        before = dict(env)
        if self.transparent:
            return self._transparent_environ(env, before)
        url = self.url
        for name in PROXY_VARS:
            env[name] = url
        bundle = self.trust_bundle(env)
        for name in TRUST_VARS:
            env[name] = str(bundle)
        env["NODE_EXTRA_CA_CERTS"] = str(self.node_extra(env))
        env["NODE_USE_ENV_PROXY"] = "1"  # Node 24 (and 22.21+): fetch and http honour HTTP(S)_PROXY
        # Node before that reads no proxy variable: a preload routes fetch and http/https
        env["NODE_OPTIONS"] = node_options(env.get("NODE_OPTIONS", ""))
        env[NODE_PROXY_ENV] = url
        env[RUNTIMES_ENV] = str(self.runtimes_dir())
        # Java reads no proxy variable: system properties, with loopback no longer excluded
        # (an empty http.nonProxyHosts; a non-empty one gets the JDK's loopback entries added
        # back), and a truststore with the same CAs as the bundle
        env["JAVA_TOOL_OPTIONS"] = java_options(
            env.get("JAVA_TOOL_OPTIONS", ""), self.client_port or self.port, self.java_truststore(bundle)
        )
        for name in NO_PROXY_VARS:
            if name in env:
                kept = without_loopback(env[name])
                if kept:
                    env[name] = kept
                else:
                    del env[name]
        env[PROXY_ENV] = proxy_url(self.port)
        env[DB_ENV] = self.db_url
        env[RUN_TOOL_ENV] = tool_command()
        changed = sorted(n for n in set(env) | set(before) if env.get(n) != before.get(n))
        return env, changed

    def _transparent_environ(
        self, env: dict[str, str], before: dict[str, str]
    ) -> tuple[dict[str, str], list[str]]:
        """`run --transparent`: the kernel sends every connection to the recorder, so the child
        gets no proxy (one would be unreachable from its namespace anyway), only the trust:
        the CA bundle, Node's extra CAs, Java's truststore."""
        for name in (*PROXY_VARS, *NO_PROXY_VARS):
            env.pop(name, None)
        bundle = self.trust_bundle(env)
        for name in TRUST_VARS:
            env[name] = str(bundle)
        env["NODE_EXTRA_CA_CERTS"] = str(self.node_extra(env))
        env["JAVA_TOOL_OPTIONS"] = java_options(
            env.get("JAVA_TOOL_OPTIONS", ""), None, self.java_truststore(bundle)
        )
        env[PROXY_ENV] = proxy_url(self.port)
        env[TRANSPARENT_ENV] = str(self.transparent_port)
        env[DB_ENV] = self.db_url
        env[RUN_TOOL_ENV] = tool_command()
        changed = sorted(n for n in set(env) | set(before) if env.get(n) != before.get(n))
        return env, changed

    def runtimes_dir(self) -> Path:
        """Where the runtimes a preload reached say, as they exit, that they ran."""
        path = self.workdir / "runtimes"
        path.mkdir(mode=0o700, exist_ok=True)
        return path

    def runtimes(self) -> list[dict[str, Any]]:
        """What each preloaded process said when it exited (runtime, script, tunnels opened)."""
        found = []
        for report in sorted((self.workdir / "runtimes").glob("*.json")):
            try:
                found.append(json.loads(report.read_text()))
            except (OSError, ValueError):
                continue  # one cut short by a kill: the others still count
        return found

    def trust_bundle(self, env: dict[str, str]) -> Path:
        """What the child trusted, plus mitmproxy's CA, in one file."""
        given = env.get("SSL_CERT_FILE")
        base = Path(given) if given and Path(given).is_file() else system_trust()
        parts = [base.read_text(errors="replace")] if base is not None else []
        parts.append(self.ca.read_text())
        path = self.workdir / "ca-bundle.pem"
        write_private(str(path), "\n".join(p.rstrip("\n") + "\n" for p in parts))
        return path

    def java_truststore(self, bundle: Path) -> Path:
        """The CA bundle as a PKCS#12 truststore, in the form Java reads (trusted entries)."""
        import warnings

        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import BestAvailableEncryption, pkcs12

        certificates = []
        blocks = re.findall(
            rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", bundle.read_bytes(), re.S
        )
        for index, block in enumerate(blocks):
            with warnings.catch_warnings():  # a system CA with a negative serial: Java takes it, so do we
                warnings.simplefilter("ignore")
                try:
                    cert = x509.load_pem_x509_certificate(block)
                except ValueError:
                    continue  # one the parser refuses: left out, the rest still trusted
            certificates.append(pkcs12.PKCS12Certificate(cert, f"ca-{index}".encode()))
        data = pkcs12.serialize_java_truststore(certificates, BestAvailableEncryption(JAVA_STORE_PASSWORD))
        path = self.workdir / "java-truststore.p12"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        return path

    def node_extra(self, env: dict[str, str]) -> Path:
        given = env.get("NODE_EXTRA_CA_CERTS")
        if not given or not Path(given).is_file():
            return self.ca
        path = self.workdir / "node-extra-ca.pem"
        write_private(
            str(path), Path(given).read_text(errors="replace").rstrip("\n") + "\n" + self.ca.read_text()
        )
        return path


def _end_with_parent() -> None:
    """In the recorder's process, before it runs: SIGTERM it when the process that started
    it dies without stopping it (killed, or a crash), so that no recorder outlives its
    session (a clean SIGTERM: it stores what it holds). Linux's PR_SET_PDEATHSIG."""
    if sys.platform != "linux":
        return
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass  # not available: a recorder left behind is stopped by hand, as before


def tool_command() -> str:
    """This redirect-audit as a command line: the pytest plugin under `run` (in a test
    environment that has only the plugin) records and judges through the same tool."""
    return shlex.join([sys.executable, "-m", "analyzer"])


def java_options(given: str, port: int | None, truststore: Path) -> str:
    """JAVA_TOOL_OPTIONS with the recorder as Java's proxy (unless `port` is None) and its
    truststore (the user's own options after ours, so that theirs win)."""
    proxy = [
        f"-Dhttp.proxyHost=127.0.0.1 -Dhttp.proxyPort={port}",
        f"-Dhttps.proxyHost=127.0.0.1 -Dhttps.proxyPort={port}",
        "-Dhttp.nonProxyHosts=",
    ]
    ours = [
        *(proxy if port is not None else []),
        f"-Djavax.net.ssl.trustStore={truststore} -Djavax.net.ssl.trustStoreType=PKCS12",
        f"-Djavax.net.ssl.trustStorePassword={JAVA_STORE_PASSWORD.decode()}",
    ]
    return " ".join([*ours, given]).strip()


def node_preload() -> Path:
    return Path(__file__).parent / "preload" / "node.cjs"


def node_options(given: str) -> str:
    """NODE_OPTIONS with the preload required first (once, whatever was there)."""
    path = str(node_preload())
    required = f'--require "{path}"' if " " in path else f"--require {path}"
    if path in given:
        return given
    return f"{required} {given}".strip()


def attach(
    proxy: str, db_url: str, workdir: Path, label: str | None, confdir: Path, check: bool = True
) -> Recording:
    """A recording on a recorder that already runs (`redirect-audit run -- pytest --redirect-audit`);
    `check`: asked now whether it answers, and for the label's listener (else by the caller,
    when first needed: `run` may still be starting it)."""
    port = int(proxy.rsplit(":", 1)[1].strip("/"))
    recording = Recording(
        db_url=db_url, workdir=workdir, label=label, confdir=confdir, port=port, attached=True
    )
    transparent = os.environ.get(TRANSPARENT_ENV, "")
    if transparent.isdigit():  # under `run --transparent`: its children are redirected already
        recording.transparent, recording.transparent_port = True, int(transparent)
    if check:
        recording.control("/ping", timeout=10.0)
        recording.listen()
    return recording


def last_error(output: str) -> str:
    """The line of mitmdump's output that says why it stopped."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in reversed(lines):
        if "rror" in line or "redirect_audit" in line:
            return line[-300:]
    return lines[-1][-300:] if lines else "no output"


# ---- running the child ------------------------------------------------------------------

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclass
class ChildResult:
    status: int  # the exit status, or 128 + the signal that ended it (as a shell says it)
    interrupted: bool  # a signal came while it ran


def run_command(argv: list[str], env: dict[str, str]) -> ChildResult:
    """Run the child in our process group and wait for it. A Ctrl-C at the terminal reaches
    it directly (and not the proxy, which has a session of its own); a signal sent to us
    alone (`kill -INT`, a CI runner's cancel) is passed on to it. Either way we keep
    waiting, so that what it did is analyzed once it has ended; a third signal kills it."""
    watched = {*FORWARDED, signal.SIGCHLD}
    signal.pthread_sigmask(signal.SIG_BLOCK, watched)
    interrupted = 0
    try:
        try:
            child = subprocess.Popen(argv, env=env, preexec_fn=_unblock)
        except FileNotFoundError:
            raise SessionError(f"{argv[0]}: command not found") from None
        except PermissionError:
            raise SessionError(f"{argv[0]}: permission denied") from None
        while child.poll() is None:
            info = signal.sigtimedwait(watched, 0.2)
            if info is None or info.si_signo == signal.SIGCHLD:
                continue
            interrupted += 1
            if interrupted >= 3:
                child.kill()
            elif info.si_code <= 0:  # sent by a process (kill), not by the terminal to the whole group
                child.send_signal(info.si_signo)
        while signal.sigtimedwait(watched, 0) is not None:  # nothing left pending when unblocked
            pass
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, watched)
    code = child.returncode
    return ChildResult(128 - code if code < 0 else code, interrupted > 0)


def _unblock() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {*FORWARDED, signal.SIGCHLD})
