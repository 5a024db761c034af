"""Keep secrets out of the store, wherever they sit, while still letting rules compare them.

One mechanism for every place a secret can be: a secret value is replaced by a keyed
fingerprint, ``hmac:<hex>`` (HMAC-SHA256 under the store's key). The same value gives the
same fingerprint wherever it appears (a header, a query string, a fragment, a body
field), so "the token followed the redirect to another origin" can be told without the
token ever being written down. What is protected:

* credential headers (CREDENTIAL_HEADERS): the whole value, except that `Authorization`
  and `Proxy-Authorization` keep their scheme in clear (`Bearer hmac:...`): the token's
  fingerprint is then the same as in `?access_token=` or a JSON body;
* headers that carry URLs (URL_HEADERS: Location, Referer, Content-Location, Link,
  Refresh): the URLs in them, as below;
* URLs: the value of every parameter whose name is a secret field (SECRET_FIELDS, plus
  what the user adds), in the query, in `;params` and in the fragment (`#access_token=`,
  the OAuth implicit flow), also inside a URL percent-encoded into another parameter
  (`next=https%3A%2F%2Fx%2F%3Faccess_token%3D...`), to three levels;
* bodies kept with --keep-bodies: secret fields in JSON (whatever the declared type),
  form and multipart bodies, before the size cap cuts them; scanned as text, so depth,
  broken syntax and a cut do not matter.

Extend the field list with `--secret-field NAME` (import-har, import-flows, proxy) or the
addon option `redirect_audit_secret_fields` (mitmproxy's config.yaml takes it too).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote

from analyzer.secretnames import decoded_name, is_secret_name, may_hold_shapes, secret_shapes

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

# Headers whose value is, or holds, a URL that may carry secrets of its own.
URL_HEADERS = frozenset({"location", "referer", "content-location", "link", "refresh"})

# Field names whose values are secrets, in URLs and in bodies (compared case-insensitively).
SECRET_FIELDS = frozenset(
    {
        # passwords and keys
        "password",
        "passwd",
        "pwd",
        "passphrase",
        "secret",
        "client_secret",
        "api_key",
        "apikey",
        "key",
        "access_key",
        "secret_key",
        "private_key",
        "otp",
        "pin",
        "cvv",
        "cvc",
        "card_number",
        "ssn",
        # tokens, OAuth and OpenID Connect (RFC 6749, 7636; OIDC Core)
        "token",
        "access_token",
        "refresh_token",
        "id_token",
        "auth",
        "authorization",
        "code",
        "state",
        "nonce",
        "code_verifier",
        "session_state",
        "assertion",
        "client_assertion",
        "jwt",
        # sessions and single sign-on
        "session",
        "sessionid",
        "session_id",
        "jsessionid",
        "phpsessid",
        "sid",
        "ticket",
        "samlresponse",
        "samlrequest",
        "relaystate",
        # signed URLs (AWS SigV4, Google, Azure SAS, generic)
        "x-amz-signature",
        "x-amz-credential",
        "x-amz-security-token",
        "x-goog-signature",
        "x-goog-credential",
        "signature",
        "sig",
    }
)
FINGERPRINT_PREFIX = "hmac:"
NESTED_LEVELS = 3  # URLs percent-encoded inside URLs, looked into this deep

# Bodies of these types hold no fields; they are kept as they are (capped).
_OPAQUE_TYPES = (
    "image/",
    "audio/",
    "video/",
    "font/",
    "application/octet-stream",
    "application/zip",
    "application/pdf",
    "application/gzip",
)


@functools.lru_cache(maxsize=4096)
def fingerprint(key: bytes, value: str) -> str:
    """Keyed, non-reversible stand-in for a secret value.

    Cached: a capture sends the same Cookie or Authorization value with request after
    request, and a cache hit costs a seventh of the HMAC. The cache lives in memory
    only, as the values themselves already do while a capture is converted.
    """
    return FINGERPRINT_PREFIX + hmac.digest(key, value.encode("utf-8", "surrogatepass"), "sha256")[:16].hex()


def body_digest(key: bytes, raw: bytes) -> str:
    """A body's keyed digest (HMAC-SHA256, hex): equal bodies compare equal, but a guessed
    body cannot be confirmed against the store without the key.

    HMAC computed from the key's two padded SHA-256 states, made once per key and copied:
    0.7 µs a body here, against 1.8 µs for `hmac.digest` (two per flow on the proxy's
    thread); the result is the same (a test compares)."""
    inner, outer = _pads(key)
    state = inner.copy()
    state.update(raw)
    result = outer.copy()
    result.update(state.digest())
    digest: str = result.hexdigest()
    return digest


@functools.lru_cache(maxsize=8)
def _pads(key: bytes) -> tuple[hashlib._Hash, hashlib._Hash]:
    block = (hashlib.sha256(key).digest() if len(key) > 64 else key).ljust(64, b"\0")
    return hashlib.sha256(bytes(b ^ 0x36 for b in block)), hashlib.sha256(bytes(b ^ 0x5C for b in block))


@dataclass(frozen=True)
class SecretPolicy:
    """Which field names are secret: those whose words say so (analyzer.secretnames), the
    SECRET_FIELDS convention names, and the user's own."""

    fields: frozenset[str]
    # header name (lower-case) -> how its value is protected; filled as names are met
    header_kinds: dict[str, str] = field(default_factory=dict, compare=False, hash=False, repr=False)

    def is_secret(self, name: str) -> bool:
        return is_secret_name(name, self.fields)

    @functools.cached_property
    def url_param(self) -> re.Pattern[str]:
        # name=value after ? & or # (a `;param` in a path also ends at ? and /); the value
        # ends where the URL, the parameter or the header holding it (Link's `>`, quotes,
        # blanks) ends. Every name is matched; is_secret decides.
        return re.compile(
            r"(^|[?&#]|;(?=[^?]*$))([^=&;#?/\s<>\"']+)=([^&;#\s>\"']*)|"
            r"(;)([^=&;#?/\s<>\"']+)=([^&;#?/\s>\"']*)"
        )

    def names_secret(self, text: str) -> bool:
        """Whether some `name=` in a URL-like text is a secret field."""
        return any(self.is_secret(name) for name in _PARAM_NAME.findall(text))

    @functools.cached_property
    def json_field(self) -> re.Pattern[str]:
        # "name": "value" (escapes kept whole) or "name": literal; objects and arrays are
        # left to their own keys (a text that does not parse as JSON is redacted this way)
        return re.compile(r'("((?:[^"\\]|\\.)*)"\s*:\s*)("(?:[^"\\]|\\.)*"|[^\s,}\]"{\[]+)')

    @functools.cached_property
    def form_field(self) -> re.Pattern[str]:
        return re.compile(r"(^|[&;\s])([^=&;\s]+)(=)([^&;\s]*)")

    @functools.cached_property
    def multipart_field(self) -> re.Pattern[str]:
        # a part, its name, its headers, the blank line, its value up to the boundary
        return re.compile(
            r'(?is)(content-disposition:[^\r\n]*\bname="?([^";\r\n]*)"?[^\r\n]*\r?\n'
            r"(?:[^\r\n]+\r?\n)*\r?\n)(.*?)(?=\r?\n--)"
        )


DEFAULT_POLICY = SecretPolicy(SECRET_FIELDS)


@functools.lru_cache(maxsize=32)
def policy_for(extra: tuple[str, ...] = ()) -> SecretPolicy:
    """The default policy with the user's own field names added."""
    if not extra:
        return DEFAULT_POLICY
    return SecretPolicy(SECRET_FIELDS | {name.strip().lower() for name in extra if name.strip()})


def is_credential_header(name: str) -> bool:
    return name.lower() in CREDENTIAL_HEADERS


def protect_headers(
    headers: Iterable[tuple[str, str]], key: bytes, policy: SecretPolicy = DEFAULT_POLICY
) -> list[tuple[str, str]]:
    """Every credential header fingerprinted, every URL in a URL header protected."""
    return protect_and_index(headers, key, policy)[0]


def protect_and_index(
    headers: Iterable[tuple[str, str]], key: bytes, policy: SecretPolicy = DEFAULT_POLICY
) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """Headers as stored (secrets protected) plus a lower-case lookup of first values."""
    pairs: list[tuple[str, str]] = []
    lookup: dict[str, str] = {}
    for pair in headers:
        name, value = pair
        lname = name.lower()
        protected = protect_header_value(lname, value, key, policy)
        if protected is not value:
            value = protected
            pair = (name, value)
        pairs.append(pair)  # the caller's own pair unless something was protected: the proxy's hot path
        if lname not in lookup:
            lookup[lname] = value
    return pairs, lookup


def is_secret_header(lname: str, policy: SecretPolicy = DEFAULT_POLICY) -> bool:
    """A header whose whole value is a credential: the known ones, and any whose name says
    so (`X-Token`, `X-Session-Token`, `Authentication`, `X-Shopify-Access-Token`)."""
    return lname in CREDENTIAL_HEADERS or (
        not lname.startswith(NOT_CREDENTIAL_PREFIXES) and policy.is_secret(lname)
    )


# CORS headers name credentials without holding any (Access-Control-Allow-Credentials: true)
NOT_CREDENTIAL_PREFIXES = ("access-control-",)


def protect_header_value(lname: str, value: str, key: bytes, policy: SecretPolicy = DEFAULT_POLICY) -> str:
    """One header's value as stored; `value` itself when nothing in it is secret. A
    credential header is fingerprinted (its auth scheme kept); a URL header's URLs are
    protected; any other header's secret-named parameters (`token=` of WWW-Authenticate)
    and secret-shaped values (JWTs, AWS key ids, PEM keys) are fingerprinted."""
    kind = policy.header_kinds.get(lname)
    if kind is None:
        kind = policy.header_kinds[lname] = (
            _CREDENTIAL if is_secret_header(lname, policy) else _URLS if lname in URL_HEADERS else _OTHER
        )
    if kind is _CREDENTIAL:
        return protect_credential(lname, value, key)
    if kind is _URLS:
        return protect_url(value, key, policy)
    protected = value
    if "=" in value and any(policy.is_secret(name) for name in _HEADER_PARAM_NAME.findall(value)):
        protected = _HEADER_PARAM.sub(lambda m: _header_param(m, key, policy), value)
    if may_hold_shapes(protected):
        protected = _protect_shapes(protected, key)
    return value if protected == value else protected


_CREDENTIAL, _URLS, _OTHER = "credential", "urls", "other"
_HEADER_PARAM_NAME = re.compile(r"([\w.-]+)\s*=")


_HEADER_PARAM = re.compile(r"(^|[\s,;])([\w.-]+)(\s*=\s*)(\"(?:[^\"\\]|\\.)*\"|[^\s,;]+)")


def _header_param(m: re.Match[str], key: bytes, policy: SecretPolicy) -> str:
    if not policy.is_secret(m[2]):
        return m[0]
    value = m[4]
    if value.startswith('"') and value.endswith('"') and len(value) > 1:
        return f'{m[1]}{m[2]}{m[3]}"{_fingerprint_as_is(key, value[1:-1])}"'
    return f"{m[1]}{m[2]}{m[3]}{_fingerprint_as_is(key, value)}"


def _protect_shapes(text: str, key: bytes) -> str:
    """Every JWT, AWS access key id and PEM private key in a text, fingerprinted."""
    spans = secret_shapes(text)
    if not spans:
        return text
    out, last = [], 0
    for start, end in sorted(spans):
        if start < last:
            continue  # inside one replaced already
        out += [text[last:start], _fingerprint_as_is(key, text[start:end])]
        last = end
    out.append(text[last:])
    return "".join(out)


_SCHEMED = frozenset({"authorization", "proxy-authorization"})
# HTTP authentication schemes (IANA registry, and the common `Token`): kept in clear
# before a credential in any secret header (`Authentication: Bearer ...`)
AUTH_SCHEMES = frozenset(
    {
        "basic",
        "bearer",
        "digest",
        "dpop",
        "hoba",
        "mutual",
        "negotiate",
        "ntlm",
        "token",
        "hmac",
        "aws4-hmac-sha256",
    }
)


def protect_credential(lname: str, value: str, key: bytes) -> str:
    """A credential header's value as stored: fingerprinted, an auth scheme kept in clear."""
    scheme, _, credentials = value.partition(" ")
    if (
        credentials
        and ((lname in _SCHEMED and scheme.isalnum()) or scheme.lower() in AUTH_SCHEMES)
        and not scheme.startswith(FINGERPRINT_PREFIX)
    ):
        return f"{scheme} {_fingerprint_as_is(key, credentials.strip())}"
    return value if value.startswith(FINGERPRINT_PREFIX) else fingerprint(key, value)


def protect_url(url: str, key: bytes, policy: SecretPolicy = DEFAULT_POLICY, _level: int = 0) -> str:
    """The URL (or a text holding URLs) with the values of secret parameters fingerprinted,
    in the query, in `;params`, in the fragment and inside percent-encoded nested URLs.
    Returns `url` itself (the same object) when there is nothing to protect."""
    protected = url
    if "@" in url:
        protected = _USERINFO.sub(lambda m: m[1] + _fingerprint_as_is(key, m[2]) + "@", protected)
    if may_hold_shapes(protected):
        protected = _protect_shapes(protected, key)
    if "=" not in protected:
        return url if protected == url else protected
    nested = _level < NESTED_LEVELS and "%" in protected and _ENCODED_NESTED.search(protected) is not None
    if not nested and not policy.names_secret(protected):  # most URLs: no secret parameter at all
        return url if protected == url else protected
    protected = policy.url_param.sub(_url_value(key, policy), protected)
    if nested:
        protected = _NESTED_PARAM.sub(lambda m: m[1] + _protect_nested(m[2], key, policy, _level), protected)
    return url if protected == url else protected


# scheme://user:password@host: the password (userinfo's part after the first colon)
_USERINFO = re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://[^/?#@\s:]*:)([^/?#@\s]+)@")


# '=' or '@' percent-encoded once or more: a URL inside a parameter, with a query or with
# userinfo (?to=http%3A%2F%2Fu%3Apw%40h)
_ENCODED_NESTED = re.compile(r"%(?:25)*(?:3[dD]|40)")
_PARAM_NAME = re.compile(r"(?:^|[?&;#\s])([^=&;#?\s<>\"']+)=")
_NESTED_PARAM = re.compile(r"(=)([^&;#\s>\"']*%(?:25)*(?:3[dD]|40)[^&;#\s>\"']*)")


def _protect_nested(value: str, key: bytes, policy: SecretPolicy, level: int) -> str:
    """A parameter value holding a percent-encoded URL (encoded once or more), protected."""
    inner = unquote(value)
    protected = protect_url(inner, key, policy, level + 1)
    if protected is inner and level + 1 < NESTED_LEVELS and _ENCODED_NESTED.search(inner):
        protected = _protect_nested(inner, key, policy, level + 1)  # encoded twice: decode again
        if protected == inner:
            protected = inner
    return value if protected is inner else quote(protected, safe="")


def _url_value(key: bytes, policy: SecretPolicy) -> Callable[[re.Match[str]], str]:
    def replace(m: re.Match[str]) -> str:
        if m[2] is not None:
            return f"{m[1]}{m[2]}={_fingerprinted(key, m[3])}" if policy.is_secret(m[2]) else m[0]
        return f"{m[4]}{m[5]}={_fingerprinted(key, m[6])}" if policy.is_secret(m[5]) else m[0]

    return replace


def _fingerprinted(key: bytes, value: str) -> str:
    """A secret value's fingerprint; one that already is a fingerprint stays as it is."""
    if value.startswith(FINGERPRINT_PREFIX) or not value:
        return value
    return fingerprint(key, unquote(value))


def redact_body(
    raw: bytes, content_type: str | None, key: bytes, policy: SecretPolicy = DEFAULT_POLICY
) -> bytes:
    """A body with every secret fingerprinted, whatever the declared type: the values of
    secret-named fields in JSON (GraphQL variables included), forms, multipart parts, XML
    elements, `k=v` text and GraphQL arguments (`password: "..."`), and secret-shaped
    values anywhere. JSON that parses stays JSON: a secret object or array becomes one
    fingerprint string. Text that does not parse (broken, cut) is redacted as text."""
    ctype = (content_type or "").split(";")[0].strip().lower()
    if not raw or ctype.startswith(_OPAQUE_TYPES):
        return raw
    text = raw.decode("utf-8", "surrogateescape")
    stripped = text.lstrip()
    if stripped[:1] in ("{", "["):  # JSON first: redacted, it stays JSON
        try:
            data = json.loads(text)
            redacted = _redact_json(data, key, policy)
        except (ValueError, RecursionError, _TooDeep):  # not JSON, or deeper than is sane: as text
            pass
        else:
            if redacted == data:
                return raw
            return _json_like(redacted, text).encode("utf-8", "surrogateescape")
    redacted_text = _redact_text(text, key, policy)
    return raw if redacted_text == text else redacted_text.encode("utf-8", "surrogateescape")


_NOT_JSON = object()


def _json_like(data: Any, original: str) -> str:
    """`data` as JSON written the way `original` was: compact, spaced or indented."""
    lines = original.strip().splitlines()
    if len(lines) > 1:
        second = lines[1]
        indent = len(second) - len(second.lstrip(" "))
        return json.dumps(data, ensure_ascii=False, indent=indent or None)
    spaced = '": ' in original or '", "' in original
    separators = (", ", ": ") if spaced else (",", ":")
    return json.dumps(data, ensure_ascii=False, separators=separators)


class _TooDeep(Exception):
    """JSON nested deeper than any real payload: redacted as text instead (any depth)."""


def _redact_json(data: Any, key: bytes, policy: SecretPolicy, depth: int = 0) -> Any:
    if depth > 64:
        raise _TooDeep
    if isinstance(data, dict):
        out = {}
        for name, value in data.items():
            if isinstance(name, str) and policy.is_secret(name) and value not in (None, "", [], {}):
                text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
                out[name] = _fingerprint_as_is(key, text)
            else:
                out[name] = _redact_json(value, key, policy, depth + 1)
        return out
    if isinstance(data, list):
        return [_redact_json(v, key, policy, depth + 1) for v in data]
    if isinstance(data, str):
        return _redact_text(data, key, policy) if len(data) > 3 else data
    return data


def _redact_text(text: str, key: bytes, policy: SecretPolicy) -> str:
    """Secrets in a text that is not (or no longer) JSON: fields by name, values by shape."""
    if "=" in text:
        text = policy.form_field.sub(lambda m: _form_pair(m, key, policy), text)
    if '"' in text and ":" in text:
        text = policy.json_field.sub(lambda m: _json_pair(m, key, policy), text)
        text = _GRAPHQL_ARG.sub(lambda m: _graphql_arg(m, key, policy), text)
    if "<" in text:
        text = _XML_ELEMENT.sub(lambda m: _xml_element(m, key, policy), text)
    if "content-disposition" in text.lower():
        text = policy.multipart_field.sub(
            lambda m: m[1] + (_fingerprint_as_is(key, m[3]) if policy.is_secret(m[2]) else m[3]), text
        )
    return _protect_shapes(text, key)


def _form_pair(m: re.Match[str], key: bytes, policy: SecretPolicy) -> str:
    if not policy.is_secret(m[2].replace("+", " ")):
        return m[0]
    return m[1] + m[2] + m[3] + _fingerprinted(key, m[4])


def _json_pair(m: re.Match[str], key: bytes, policy: SecretPolicy) -> str:
    if not policy.is_secret(decoded_name(m[2])):
        return m[0]
    return m[1] + _json_value(key, m[3])


# GraphQL arguments and input fields: name: "string"
_GRAPHQL_ARG = re.compile(r'(\b[_A-Za-z][_0-9A-Za-z]*)(\s*:\s*)"((?:[^"\\]|\\.)*)"')


def _graphql_arg(m: re.Match[str], key: bytes, policy: SecretPolicy) -> str:
    if not policy.is_secret(m[1]) or m[3].startswith(FINGERPRINT_PREFIX):
        return m[0]
    return f'{m[1]}{m[2]}"{fingerprint(key, m[3])}"'


# <password>hunter2</password>, <ns:Password attr="x">...</ns:Password>
_XML_ELEMENT = re.compile(r"<((?:[\w.-]+:)?([\w.-]+))(\s[^>]*)?>([^<]+)</\1\s*>")


def _xml_element(m: re.Match[str], key: bytes, policy: SecretPolicy) -> str:
    if not policy.is_secret(m[2]):
        return m[0]
    return f"<{m[1]}{m[3] or ''}>{_fingerprint_as_is(key, m[4])}</{m[1]}>"


def _fingerprint_as_is(key: bytes, value: str) -> str:
    return value if value.startswith(FINGERPRINT_PREFIX) or not value else fingerprint(key, value)


def _json_value(key: bytes, value: str) -> str:
    literal = value[1:-1] if value.startswith('"') else value
    if literal.startswith(FINGERPRINT_PREFIX):
        return value
    return f'"{fingerprint(key, literal)}"'
