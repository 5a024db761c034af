"""`export-tests`: contract tests written from captured chains.

One pytest module per selection, one test per chain. For each hop the test sends the
hop's request without following redirects (method, URL re-based on --base-url, the
captured headers that are not credentials, hop-by-hop or computed, and the body when
the capture kept it) and asserts what the capture and RFC 9110 say the server must do:
the same redirect status and a `Location` matching the captured one (ids as patterns).
Then it sends the follow-up the spec requires (the same method and body after 307/308
and on a kept method; GET after 303, and after a 301/302 to a POST, as Fetch does) and
asserts the target accepts it (< 400). The next hop's request is that follow-up.

Credentials are never written into the module: each distinct one becomes an environment
variable the test reads (`REDIRECT_AUDIT_AUTH_1`, ...), listed in the module docstring.
The generated code uses `requests` only and passes ruff.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import urlsplit

from analyzer.secrets import CREDENTIAL_HEADERS, FINGERPRINT_PREFIX, is_secret_header
from analyzer.storeread import Reader

# Not sent as captured: hop-by-hop or computed by the HTTP library, proxies' own, HTTP/2 pseudo-headers.
SKIPPED_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "transfer-encoding",
        "upgrade",
        "accept-encoding",
        "proxy-authorization",
        "trailer",
    }
)
# A path segment or query value that names one object: digits, UUIDs, long hex or base64-ish tokens.
ID_LIKE = re.compile(
    r"\d+|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
    r"|[0-9a-fA-F]{16,}|[A-Za-z0-9_-]{24,}"
)
ENV_PREFIX = "REDIRECT_AUDIT_AUTH_"
# Request headers the store keeps as fingerprints only: each is read from a variable.
_CREDENTIALS = CREDENTIAL_HEADERS - {"set-cookie", "set-cookie2"}
BASE_ENV = "REDIRECT_AUDIT_BASE_URL"


@dataclass
class Request:
    method: str
    url: str
    headers: list[tuple[str, str]]
    body: bytes | None  # None: no body
    body_missing: int | None = None  # bytes the capture did not keep
    content_type: str | None = None
    source: str = "har"  # the capture's: har | flows | proxy | pytest (how to keep bodies next time)


@dataclass
class Step:
    request: Request
    status: int
    location: str | None  # resolved, as captured


@dataclass
class ChainTest:
    chain_id: int
    steps: list[Step]
    end: str


@dataclass
class Module:
    selection: str
    store: str
    base_origin: str | None
    base_url: str | None
    tests: list[ChainTest] = field(default_factory=list)
    secrets: dict[tuple[str, str], str] = field(default_factory=dict)  # (header, fingerprint) -> variable
    secret_origins: dict[str, str] = field(default_factory=dict)  # variable -> where it was seen


def follow_up_method(status: int, method: str) -> str:
    """The follow-up's method RFC 9110 15.4 requires (Fetch's choice where it leaves one)."""
    if status == 303 and method not in ("GET", "HEAD"):
        return "GET"
    if status in (301, 302) and method == "POST":
        return "GET"
    return method


def load(reader: Reader, chain_ids: list[int]) -> list[ChainTest]:
    """The chains' hops with each request as captured (headers and kept bodies)."""
    out = []
    for chain_id in chain_ids:
        rows = reader.rows(
            "SELECT h.idx, h.status, e.method, e.url, e.request_headers, e.req_body, e.req_body_len, "
            "e.req_content_type, e.location_resolved, e.location, c.source, e.client FROM hops h JOIN exchanges e "
            "ON e.id = h.from_exchange_id JOIN captures c ON c.id = e.capture_id "
            "WHERE h.chain_id = :chain ORDER BY h.idx",
            chain=chain_id,
        )
        end = reader.rows("SELECT end_reason FROM chains WHERE id = :chain", chain=chain_id)
        steps = []
        for _, status, method, url, headers, body, length, ctype, resolved, location, source, client in rows:
            kept = bytes(body) if body is not None else (b"" if length == 0 else None)
            request = Request(
                method,
                url,
                [tuple(h) for h in json.loads(headers or "[]")],
                kept if kept else None,
                None if kept is not None or not length else int(length),
                ctype,
                "pytest" if PYTEST_CLIENT.match(client or "") else source,
            )
            steps.append(Step(request, int(status), resolved or location))
        if steps:
            out.append(ChainTest(chain_id, steps, end[0][0] if end else ""))
    return out


def location_pattern(url: str) -> str:
    """A regular expression for a Location: literal, with id-like segments and values as wildcards."""
    parts = re.split(r"([/?&=#])", url)
    pattern = []
    for i, part in enumerate(parts):
        if part in ("/", "?", "&", "=", "#") or i < 5:  # the delimiters, and scheme://host
            pattern.append(re.escape(part))
        elif part and (
            ID_LIKE.fullmatch(part) or part.startswith("hmac:")
        ):  # an id, or a secret kept as its fingerprint
            pattern.append(r"[^/?&#]+")
        else:
            pattern.append(re.escape(part))
    return "".join(pattern)


def render(module: Module) -> str:
    """The module's source."""
    lines_tests = [_render_test(module, test) for test in module.tests]
    when = datetime.now(UTC).strftime("%Y-%m-%d")
    secrets = (
        "\n".join(f"    {name}  {where}" for name, where in module.secret_origins.items()) or "    (none)"
    )
    base = module.base_url or ""
    head = f'''"""Redirect contract tests exported by redirect-audit on {when}.

Selection: {module.selection}; store: {module.store}.
One test per captured chain: each hop's request is sent without following redirects,
the redirect status and Location are asserted as captured, then the follow-up RFC 9110
requires is sent and must be accepted (status below 400).

Where to send them: {BASE_ENV} (an origin, e.g. https://staging.example.com) replaces
the origin {module.base_origin or "the chains started at"}{f"; default {base}" if base else ""}.
Credentials are never written here; set these environment variables (a test that needs
one that is not set is skipped):
{secrets}
"""

import os
import re
from urllib.parse import urljoin

import pytest
import requests

CAPTURED_ORIGIN = {module.base_origin!r}
BASE_URL = os.environ.get("{BASE_ENV}", {base!r}).rstrip("/")
TIMEOUT = 30


def url(captured: str) -> str:
    """A captured URL, moved to BASE_URL when it was on the captured origin."""
    if BASE_URL and CAPTURED_ORIGIN and captured.startswith(CAPTURED_ORIGIN):
        return BASE_URL + captured[len(CAPTURED_ORIGIN):]
    return captured


def secret(name: str) -> str:
    value = os.environ.get(name)
    if value is None:
        pytest.skip(f"set {{name}} to run this test (see the module docstring)")
    return value


def send(method: str, target: str, headers: dict, body: bytes | None) -> requests.Response:
    return requests.request(method, target, headers=headers, data=body, allow_redirects=False, timeout=TIMEOUT)


def check_redirect(hop: str, answer: requests.Response, status: int, location: str) -> str:
    """The redirect as captured: its status, and a Location matching the captured one."""
    assert answer.status_code == status, f"{{hop}}: expected {{status}}, got {{answer.status_code}}"
    where = answer.headers.get("Location")
    assert where is not None, f"{{hop}}: answered {{status}} without a Location"
    resolved = urljoin(answer.url, where)
    assert re.fullmatch(url_pattern(location), resolved), f"{{hop}}: Location {{resolved}} does not match {{location}}"
    return resolved


def url_pattern(pattern: str) -> str:
    """A Location pattern, its origin moved to BASE_URL like the URLs."""
    origin = re.escape(CAPTURED_ORIGIN) if CAPTURED_ORIGIN else None
    if BASE_URL and origin and pattern.startswith(origin):
        return re.escape(BASE_URL) + pattern[len(origin):]
    return pattern


def check_accepted(hop: str, answer: requests.Response) -> None:
    assert answer.status_code < 400, (
        f"{{hop}}: the target refused the follow-up {{answer.request.method}} {{answer.url}}: {{answer.status_code}}")
'''
    return head + "".join(lines_tests)


def _render_test(module: Module, test: ChainTest) -> str:
    first = test.steps[0]
    name = _test_name(test.chain_id, first.request.method, first.request.url, first.status)
    lines = [f"\n\ndef {name}():", f'    """Chain {test.chain_id}: {_summary(test)}."""']
    request = first.request
    if "hmac:" in request.url:
        lines.append(
            "    # the capture kept secret values of this URL as fingerprints (hmac:...): put real ones in"
        )
    lines += _request_lines(module, request, f"url({request.url!r})")
    for index, step in enumerate(test.steps):
        hop = f"hop {index} ({step.request.method} {_short(step.request.url)} -> {step.status})"
        if step.location is None:
            lines.append(
                f"    assert answer.status_code == {step.status}, "
                f'f"{hop}: expected {step.status}, got {{answer.status_code}}"'
            )
            break
        lines.append(
            f"    target = check_redirect({hop!r}, answer, {step.status}, {location_pattern(step.location)!r})"
        )
        method = follow_up_method(step.status, step.request.method)
        nxt = test.steps[index + 1] if index + 1 < len(test.steps) else None
        if method == step.request.method:
            body_name = "body" if step.request.body is not None or step.request.body_missing else "None"
            why = f"after {step.status} the same method" + (" and body" if body_name == "body" else "")
        else:
            body_name = "None"
            why = f"after {step.status} to a {step.request.method}: GET without the body"
        lines.append(f"    # the follow-up RFC 9110 requires {why}")
        if method != step.request.method:  # the body's headers go with the body (RFC 9110 15.4)
            lines.append(
                '    headers = {k: v for k, v in headers.items() if not k.lower().startswith("content-")}'
            )
        if _origin(step.location) != _origin(step.request.url) and any(
            name.lower() in CREDENTIAL_HEADERS for name, _ in step.request.headers
        ):
            lines.append("    # to another origin: no credentials (Fetch drops Authorization there)")
            lines.append(
                f"    headers = {{k: v for k, v in headers.items() if k.lower() not in {sorted(_CREDENTIALS)!r}}}"
            )
        lines.append(f"    answer = send({method!r}, target, headers, {body_name})")
        if nxt is None:
            lines.append(f"    check_accepted({hop!r}, answer)")
        elif nxt.request.method != method:
            lines.append(f"    # (the capture's client sent {nxt.request.method} here)")
    return "\n".join(lines) + "\n"


def _request_lines(module: Module, request: Request, target: str) -> list[str]:
    headers, secrets = [], []
    for name, value in request.headers:
        lower = name.lower()
        if lower in SKIPPED_HEADERS or lower.startswith(":"):
            continue
        if is_secret_header(lower) or FINGERPRINT_PREFIX in value:
            variable = module.secrets.setdefault((lower, value), f"{ENV_PREFIX}{len(module.secrets) + 1}")
            module.secret_origins.setdefault(variable, f"{name} sent to {_origin(request.url)}")
            secrets.append((name, variable))
            continue
        headers.append((name, value))
    out = ["    headers = {"] + [f"        {n!r}: {v!r}," for n, v in headers] + ["    }"]
    if len(headers) == 0:
        out = ["    headers = {}"]
    for name, variable in secrets:
        out.append(f"    headers[{name!r}] = secret({variable!r})")
    if request.body is not None:
        out.append(f"    body = {request.body!r}")
    elif request.body_missing:
        lacks = (
            f"the {request.method} to {_short(request.url)} needs its {request.body_missing}-byte body "
            f"({request.content_type or 'no content type'}), which the capture did not keep: paste it into "
            f"`body`, or {KEEP_BODIES.get(request.source, KEEP_BODIES['proxy'])}"
        )
        out += [
            "    body = None  # TODO: see the skip below",
            "    if body is None:",
            f"        pytest.skip({lacks!r})",
        ]
    else:
        out.append("    body = None")
    out.append(f"    answer = send({request.method!r}, {target}, headers, body)")
    return out


KEEP_BODIES = {  # how a capture of each source keeps request bodies next time
    "har": "import the HAR again with `redirect-audit import-har --keep-bodies`",
    "flows": "import the flows again with `redirect-audit import-flows --keep-bodies`",
    "proxy": "record again with `redirect-audit run --keep-bodies -- CMD` (or `proxy --keep-bodies`)",
    "pytest": "run the tests again with `pytest --redirect-audit --redirect-audit-keep-bodies` (under "
    "`redirect-audit run`: `run --keep-bodies -- pytest`)",
}
# A client the pytest plugin labelled (pytest-<worker>-<session>-t<test>): recorded by the plugin,
# or by `run` for a suite under it
PYTEST_CLIENT = re.compile(r"pytest-[\w.-]+-[0-9a-f]{8}-t\d+$")


def _test_name(chain_id: int, method: str, url: str, status: int) -> str:
    parts = urlsplit(url)
    words = re.sub(r"[^0-9a-zA-Z]+", "_", f"{parts.hostname or ''}{parts.path}").strip("_").lower()
    return f"test_chain_{chain_id}_{method.lower()}_{words[:60].rstrip('_')}_{status}"


def _summary(test: ChainTest) -> str:
    parts = [f"{test.steps[0].request.method} {_short(test.steps[0].request.url)}"]
    for step in test.steps:
        parts.append(str(step.status))
        parts.append(_short(step.location) if step.location else "(no Location)")
    return " -> ".join(parts) + ("" if test.end in ("final", "") else f" ({test.end})")


def _short(url: str | None) -> str:
    return (url or "")[:120]


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"
