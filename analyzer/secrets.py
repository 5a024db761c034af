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
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import quote, unquote

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
    """Which field names are secret: SECRET_FIELDS plus the user's own."""

    fields: frozenset[str]

    @functools.cached_property
    def _names(self) -> str:
        return "|".join(re.escape(n) for n in sorted(self.fields, key=len, reverse=True))

    @functools.cached_property
    def url_param(self) -> re.Pattern[str]:
        # name=value after ? & or # (a `;param` in a path also ends at ? and /); the value
        # ends where the URL, the parameter or the header holding it (Link's `>`, quotes,
        # blanks) ends.
        return re.compile(
            rf"(?i)(^|[?&#]|;(?=[^?]*$))({self._names})=([^&;#\s>\"']*)|"
            rf"(;)({self._names})=([^&;#?/\s>\"']*)"
        )

    @functools.cached_property
    def quick(self) -> tuple[str, ...]:
        return tuple(n.lower() for n in self.fields)

    def names_secret(self, text: str) -> bool:
        """Whether some `name=` in a URL-like text is a secret field."""
        fields = self.fields
        return any(name.lower() in fields for name in _PARAM_NAME.findall(text))

    @functools.cached_property
    def json_field(self) -> re.Pattern[str]:
        # "name": "value" (escapes kept whole) or "name": literal
        return re.compile(rf'(?i)("(?:{self._names})"\s*:\s*)("(?:[^"\\]|\\.)*"|[^\s,}}\]"]+)')

    @functools.cached_property
    def form_field(self) -> re.Pattern[str]:
        return re.compile(rf"(?i)(^|[&;\s])((?:{self._names})=)([^&;\s]*)")

    @functools.cached_property
    def multipart_field(self) -> re.Pattern[str]:
        # a part whose name is secret: its headers, the blank line, its value up to the boundary
        return re.compile(
            rf'(?is)(content-disposition:[^\r\n]*\bname="?(?:{self._names})"?[^\r\n]*\r?\n'
            rf"(?:[^\r\n]+\r?\n)*\r?\n)(.*?)(?=\r?\n--)"
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
        if lname in CREDENTIAL_HEADERS:
            value = protect_credential(lname, value, key)
            pair = (name, value)
        elif lname in URL_HEADERS:
            protected = protect_url(value, key, policy)
            if protected is not value:
                value = protected
                pair = (name, value)
        pairs.append(pair)  # the caller's own pair unless something was protected: the proxy's hot path
        if lname not in lookup:
            lookup[lname] = value
    return pairs, lookup


_SCHEMED = frozenset({"authorization", "proxy-authorization"})


def protect_credential(lname: str, value: str, key: bytes) -> str:
    """A credential header's value as stored: fingerprinted, an auth scheme kept in clear."""
    if lname in _SCHEMED:
        scheme, _, credentials = value.partition(" ")
        if credentials and scheme.isalnum() and not scheme.startswith(FINGERPRINT_PREFIX):
            return f"{scheme} {_fingerprint_as_is(key, credentials.strip())}"
    return value if value.startswith(FINGERPRINT_PREFIX) else fingerprint(key, value)


def protect_url(url: str, key: bytes, policy: SecretPolicy = DEFAULT_POLICY, _level: int = 0) -> str:
    """The URL (or a text holding URLs) with the values of secret parameters fingerprinted,
    in the query, in `;params`, in the fragment and inside percent-encoded nested URLs.
    Returns `url` itself (the same object) when there is nothing to protect."""
    if "=" not in url:
        return url
    nested = _level < NESTED_LEVELS and "%" in url and _ENCODED_EQUALS.search(url) is not None
    if not nested and not policy.names_secret(url):  # most URLs: no secret parameter at all
        return url
    protected = policy.url_param.sub(_url_value(key), url)
    if nested:
        protected = _NESTED_PARAM.sub(lambda m: m[1] + _protect_nested(m[2], key, policy, _level), protected)
    return url if protected == url else protected


_ENCODED_EQUALS = re.compile(r"%(?:25)*3[dD]")  # '=' percent-encoded once or more: a URL inside a parameter
_PARAM_NAME = re.compile(r"(?:^|[?&;#\s])([^=&;#?\s<>\"']+)=")
_NESTED_PARAM = re.compile(r"(=)([^&;#\s>\"']*%(?:25)*3[dD][^&;#\s>\"']*)")


def _protect_nested(value: str, key: bytes, policy: SecretPolicy, level: int) -> str:
    """A parameter value holding a percent-encoded URL (encoded once or more), protected."""
    inner = unquote(value)
    protected = protect_url(inner, key, policy, level + 1)
    if protected is inner and level + 1 < NESTED_LEVELS and _ENCODED_EQUALS.search(inner):
        protected = _protect_nested(inner, key, policy, level + 1)  # encoded twice: decode again
        if protected == inner:
            protected = inner
    return value if protected is inner else quote(protected, safe="")


def _url_value(key: bytes) -> Callable[[re.Match[str]], str]:
    def replace(m: re.Match[str]) -> str:
        if m[2] is not None:
            return f"{m[1]}{m[2]}={_fingerprinted(key, m[3])}"
        return f"{m[4]}{m[5]}={_fingerprinted(key, m[6])}"

    return replace


def _fingerprinted(key: bytes, value: str) -> str:
    """A secret value's fingerprint; one that already is a fingerprint stays as it is."""
    if value.startswith(FINGERPRINT_PREFIX) or not value:
        return value
    return fingerprint(key, unquote(value))


def redact_body(
    raw: bytes, content_type: str | None, key: bytes, policy: SecretPolicy = DEFAULT_POLICY
) -> bytes:
    """A body with the value of every secret field fingerprinted: JSON, form and multipart
    fields, whatever the declared type. Works on the text, so nesting depth, broken
    syntax and a later cut change nothing; the caller caps the result."""
    ctype = (content_type or "").split(";")[0].strip().lower()
    if not raw or ctype.startswith(_OPAQUE_TYPES):
        return raw
    text = raw.decode("utf-8", "surrogateescape")
    lowered = text.lower()
    if not any(name in lowered for name in policy.quick):
        return raw
    text = policy.json_field.sub(lambda m: m[1] + _json_value(key, m[2]), text)
    text = policy.form_field.sub(lambda m: m[1] + m[2] + _fingerprinted(key, m[3]), text)
    text = policy.multipart_field.sub(lambda m: m[1] + _fingerprint_as_is(key, m[2]), text)
    return text.encode("utf-8", "surrogateescape")


def _fingerprint_as_is(key: bytes, value: str) -> str:
    return value if value.startswith(FINGERPRINT_PREFIX) or not value else fingerprint(key, value)


def _json_value(key: bytes, value: str) -> str:
    literal = value[1:-1] if value.startswith('"') else value
    if literal.startswith(FINGERPRINT_PREFIX):
        return value
    return f'"{fingerprint(key, literal)}"'
