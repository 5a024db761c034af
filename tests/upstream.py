"""A loopback upstream for the real-client tests: redirects on demand, echoes the rest.

    GET|POST|... /r/<status>/<case>?to=<url>[&cache=<seconds>]
        answers <status> with `Location: <url>` (default /echo/<case>), a short body,
        and, with cache=, `Cache-Control: max-age=<seconds>`;
    GET|POST|... /r/<status>/<case>?via=<peer>
        the same, to /echo/<case> on a peer origin the test named (`peers`), so the
        request does not spell out where it is sent; with `nolocation`, no Location at all;
    GET|POST|... /loop/<status>/<k>/<case>
        a two-step cycle: answers <status> to /loop/<status>/<1-k>/<case>;
    GET|POST|... /hops/<status>/<k>/<case>
        a chain of k redirects: to /hops/<status>/<k-1>/<case>, the last to /echo/<case>;
    GET|POST|... /r/<status>/<case>?...&target=auth
        the same, to /auth/<case> instead of /echo/<case>;
    GET|POST|... /auth/<case>
        401 without an Authorization header, else as /echo/<case>;
    GET|POST|... /echo/<case>
        answers 200 with JSON: what arrived (method, path, headers, body length and
        SHA-256), so a test can compare what the client sent with what was recorded.

HTTP/1.1 with keep-alive; TLS with a throwaway self-signed certificate when asked.
Binds to a loopback address only (127.0.0.1 unless told 127.0.0.2).
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

# At import, not on first use: a pytester test (test_pytest_plugin) drops the modules first
# imported during it, and cryptography imported a second time no longer knows its own curves.
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

LOOPBACK = "127.0.0.1"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # headers and body go out in two writes: with Nagle's algorithm on, the body waits for
    # the client's delayed ACK (40 ms on Linux) on every keep-alive request
    disable_nagle_algorithm = True
    server_version = "upstream/1"

    def log_message(self, format, *args):
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _handle(self) -> None:
        body = self._body()
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        segments = parts.path.strip("/").split("/")
        if segments[0] in ("loop", "hops") and len(segments) == 4:
            status, step, case = int(segments[1]), int(segments[2]), segments[3]
            if segments[0] == "loop":
                location = f"/loop/{status}/{1 - step}/{case}"
            else:
                location = f"/hops/{status}/{step - 1}/{case}" if step > 1 else f"/echo/{case}"
            self._send(status, b"moved\n", {"Location": location, "Content-Type": "text/plain"})
            return
        if segments[0] == "r" and len(segments) >= 3:
            status, case = int(segments[1]), segments[2]
            where = query.get("target", ["echo"])[0]  # echo, or auth (401 without Authorization)
            default = f"/{where}/{case}"
            if "via" in query:
                default = f"{self.server.peers[query['via'][0]]}/{where}/{case}"
            headers = {"Location": query.get("to", [default])[0], "Content-Type": "text/plain"}
            if "nolocation" in query:  # a broken server
                del headers["Location"]
            if "cache" in query:
                headers["Cache-Control"] = f"max-age={int(query['cache'][0])}"
            self._send(status, b"moved\n", headers)
            return
        if segments[0] == "auth" and "Authorization" not in self.headers:  # an API that needs its token
            self._send(
                401,
                b'{"error": "no credentials"}',
                {"Content-Type": "application/json", "WWW-Authenticate": 'Bearer realm="upstream"'},
            )
            return
        if segments[0] in ("echo", "auth"):
            seen = {
                "method": self.command,
                "path": self.path,
                "headers": dict(self.headers.items()),
                "body_len": len(body),
                "body_sha256": hashlib.sha256(body).hexdigest() if body else None,
            }
            self._send(200, json.dumps(seen).encode(), {"Content-Type": "application/json"})
            return
        self._send(404, b"not here\n", {"Content-Type": "text/plain"})

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _handle


class Upstream:
    """One origin: a threaded server on a free loopback port, optionally TLS."""

    def __init__(self, tls: ssl.SSLContext | None = None, host: str = LOOPBACK) -> None:
        self.host = host
        self.server = ThreadingHTTPServer((host, 0), _Handler)
        self.server.daemon_threads = True
        self.server.peers = {}  # name -> origin, for /r/...?via=name
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.scheme = "https" if tls is not None else "http"
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def origin(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    @property
    def peers(self) -> dict[str, str]:
        return self.server.peers

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def self_signed_context(directory: Path) -> ssl.SSLContext:
    """A server context for 127.0.0.1 with a fresh self-signed certificate."""

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "upstream.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(LOOPBACK)), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "upstream-cert.pem", directory / "upstream-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    return context
