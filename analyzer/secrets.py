"""Keep credentials out of the store while still letting rules compare them.

A credential header value is replaced by a keyed fingerprint, ``hmac:<hex>``: HMAC-SHA256
under a random key kept in the store. The same token on two hops gives the same
fingerprint, so "the bearer token followed the redirect to another origin" can be told
without the token itself ever being written down.
"""

from __future__ import annotations

import functools
import hmac
import json
import re
from collections.abc import Iterable
from urllib.parse import parse_qsl, urlencode

CREDENTIAL_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "cookie",
        "set-cookie",
        "set-cookie2",
        "x-api-key",
        "api-key",
        "apikey",
        "x-auth-token",
        "x-access-token",
        "x-csrf-token",
        "x-xsrf-token",
        "x-amz-security-token",
        "x-goog-api-key",
        "private-token",
        "x-vault-token",
        "ocp-apim-subscription-key",
    }
)

# Field names whose values are replaced in captured bodies and query strings.
SECRET_FIELDS = frozenset(
    {
        "password",
        "passwd",
        "pwd",
        "secret",
        "client_secret",
        "token",
        "access_token",
        "refresh_token",
        "id_token",
        "api_key",
        "apikey",
        "private_key",
        "otp",
        "pin",
        "cvv",
        "cvc",
        "card_number",
        "ssn",
    }
)
FINGERPRINT_PREFIX = "hmac:"
_SECRET_FIELD_LIST = tuple(SECRET_FIELDS)
REDACTED = "[redacted]"
_QUERY_SECRET = re.compile(
    r"(?i)(^|[?&;])(" + "|".join(sorted(SECRET_FIELDS, key=len, reverse=True)) + r")=([^&;#]*)"
)


@functools.lru_cache(maxsize=4096)
def fingerprint(key: bytes, value: str) -> str:
    """Keyed, non-reversible stand-in for a secret value.

    Cached: a capture sends the same Cookie or Authorization value with request after
    request, and a cache hit costs a seventh of the HMAC. The cache lives in memory
    only, as the values themselves already do while a capture is converted.
    """
    return FINGERPRINT_PREFIX + hmac.digest(key, value.encode("utf-8", "surrogatepass"), "sha256")[:16].hex()


def is_credential_header(name: str) -> bool:
    return name.lower() in CREDENTIAL_HEADERS


def protect_headers(headers: Iterable[tuple[str, str]], key: bytes) -> list[tuple[str, str]]:
    """Replace every credential header value with its fingerprint."""
    return protect_and_index(headers, key)[0]


def protect_and_index(headers: Iterable[tuple[str, str]], key: bytes) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """Headers as stored (credentials fingerprinted) plus a lower-case lookup of first values."""
    pairs: list[tuple[str, str]] = []
    lookup: dict[str, str] = {}
    for pair in headers:
        name, value = pair
        lname = name.lower()
        if lname in CREDENTIAL_HEADERS:
            value = fingerprint(key, value)
            pair = (name, value)
        pairs.append(pair)  # the caller's own pair unless it was a credential: the proxy's hot path
        if lname not in lookup:
            lookup[lname] = value
    return pairs, lookup


def protect_url(url: str, key: bytes) -> str:
    """Fingerprint the values of well-known secret query parameters (access_token=...)."""
    if "=" not in url:
        return url
    # Cheap test first: most URLs do not even contain a secret field name.
    lowered = url.lower()
    for name in _SECRET_FIELD_LIST:
        if name in lowered:
            break
    else:
        return url
    return _QUERY_SECRET.sub(lambda m: f"{m[1]}{m[2]}={fingerprint(key, m[3])}", url)


def redact_body(raw: bytes, content_type: str | None) -> bytes:
    """Blank well-known secret fields in a JSON or form body kept at the user's request."""
    ctype = (content_type or "").split(";")[0].strip().lower()
    try:
        if ctype == "application/x-www-form-urlencoded":
            pairs = parse_qsl(raw.decode("utf-8"), keep_blank_values=True)
            return urlencode([(k, REDACTED if k.lower() in SECRET_FIELDS else v) for k, v in pairs]).encode()
        if ctype == "application/json" or ctype.endswith("+json"):
            return json.dumps(_redact_json(json.loads(raw))).encode()
    except (UnicodeDecodeError, ValueError):
        pass  # not what it claims to be: keep only what the cap allowed, unparsed
    return raw


def _redact_json(value):
    if isinstance(value, dict):
        return {k: REDACTED if str(k).lower() in SECRET_FIELDS else _redact_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_json(v) for v in value]
    return value
