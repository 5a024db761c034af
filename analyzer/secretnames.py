"""Which names and values are secrets: by the words of a name, and by the shape of a value.

A list of field names misses the names nobody listed (`x-signature`, `secretToken`,
`X-Shopify-Access-Token`, `AWSAccessKeyId`). So a name is split into its words
(camelCase, snake_case, kebab-case, dots: `AWSAccessKeyId` -> aws access key id) after
decoding it as a server would (percent-encoding, JSON escapes, case), and it is secret
when its words say so:

* a word that is a secret on its own: token, secret, password (passwd, passcode, pwd,
  passphrase), signature (sig), credential, session (sid), auth (authentication,
  authorization), jwt, otp, cvv, cvc, ssn, apikey, bearer;
* a key that something makes secret: api, access, private, secret, auth, account,
  client, master, signing, encryption, session or sas followed by key (`auth_key`,
  `AccessKey`), and client followed by secret;
* a long secret word inside words written together (`csrftoken`, `APIKEYLIVE`,
  `xauthkey`: a lower-cased header name has no separators left), unless what follows
  makes another word (`secretary`, `tokenizer`, `passwordless`), says what the secret
  is about (`tokencount`) or what precedes is pagination (`pagetoken`);
* a whole name that is a secret by convention (OAuth's `code`, `state`, `nonce`, SAML's
  `SAMLResponse`, `RelayState`, `ticket`, `key`, `pin`, `assertion`, card numbers).

Exceptions, so that ordinary values stay readable:

* a word only counts whole: `author`, `keyword`, `monkey`, `passenger` are not secrets;
* a name whose last word says it is about a secret rather than the secret itself:
  `token_type`, `page_token_count`, `password_length`, `session_expires`, `token_url`
  (count, length, size, type, kind, name, url, uri, endpoint, expires, expiry, ttl,
  lifetime, format, policy, hint, required, enabled, version);
* pagination cursors: a token next to page, next, prev, cursor, continuation or sync
  (`page_token`, `nextPageToken`, `continuation_token`) is a position in a list;
* a cookie is a credential in the `Cookie` header, but a parameter about cookies
  (`AspxAutoDetectCookieSupport=1`) is not; and two names real traffic showed to hold
  no secret (`Postman-Token`, a per-request id; `X-Goog-AuthUser`, an account index).

Values are secret by shape wherever they stand, whatever their name: JSON Web Tokens
(`eyJ...`), AWS access key ids (`AKIA...`), PEM private keys, and the password of URL
userinfo (`https://user:pw@host/`).
"""

from __future__ import annotations

import functools
import json
import re
from urllib.parse import unquote

SECRET_WORDS = frozenset(
    {
        "token",
        "tokens",
        "secret",
        "secrets",
        "password",
        "passwords",
        "passwd",
        "passcode",
        "pwd",
        "passphrase",
        "signature",
        "sig",
        "credential",
        "credentials",
        "cred",
        "creds",
        "session",
        "sessionid",
        "sid",
        "jsessionid",
        "phpsessid",
        "auth",
        "authentication",
        "authorization",
        "jwt",
        "otp",
        "cvv",
        "cvc",
        "ssn",
        "apikey",
        "bearer",
        "privatekey",
        "accesskey",
        "secretkey",
    }
)
KEY_MAKERS = frozenset(
    {
        "api",
        "access",
        "private",
        "secret",
        "auth",
        "account",
        "client",
        "master",
        "signing",
        "encryption",
        "session",
        "sas",
        "subscription",
        "license",
        "app",
    }
)
WHOLE_NAMES = frozenset(
    {
        "code",
        "state",
        "nonce",
        "ticket",
        "samlresponse",
        "samlrequest",
        "relaystate",
        "assertion",
        "key",
        "pin",
        "card_number",
        "cardnumber",
        "code_verifier",
        "x-amz-credential",
        "x-goog-credential",
    }
)
ABOUT_A_SECRET = frozenset(
    {
        "count",
        "length",
        "len",
        "size",
        "type",
        "types",
        "kind",
        "name",
        "names",
        "url",
        "uri",
        "endpoint",
        "expires",
        "expiry",
        "expiration",
        "ttl",
        "lifetime",
        "format",
        "policy",
        "hint",
        "required",
        "enabled",
        "version",
        "timeout",
        "age",
    }
)
# Names with a secret word that hold none, seen on real traffic (benchmarks/secret_fields_corpus.py):
# Postman's per-request id, Google's signed-in account index.
NOT_SECRET = frozenset({"postman-token", "x-goog-authuser"})
PAGINATION = frozenset({"page", "next", "prev", "previous", "cursor", "continuation", "sync", "pagination"})

_PARTS = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")
_JSON_ESCAPE = re.compile(r"\\u[0-9a-fA-F]{4}|\\[\"\\/bfnrt]")


def decoded_name(name: str) -> str:
    """A field name as a server reads it: percent-decoded and JSON-unescaped."""
    if "%" in name:
        name = unquote(name)
    if "\\" in name and _JSON_ESCAPE.search(name):
        try:
            name = json.loads(f'"{name}"')
        except ValueError:
            pass
    return name


def name_words(name: str) -> list[str]:
    """`AWSAccessKeyId` -> ['aws', 'access', 'key', 'id']; `X-Session-Token` -> ['x',
    'session', 'token']; `page_token_count` -> ['page', 'token', 'count']."""
    return [w.lower() for w in _PARTS.findall(decoded_name(name))]


@functools.lru_cache(maxsize=16384)
def is_secret_name(name: str, extra: frozenset[str] = frozenset()) -> bool:
    """Whether a field (query parameter, form or JSON key, header) holds a secret."""
    plain = decoded_name(name).strip().lower()
    if not plain or plain in NOT_SECRET:
        return False
    if plain in WHOLE_NAMES or plain in extra:
        return True
    words = name_words(name)
    if not words:
        return False
    if words[-1] in ABOUT_A_SECRET and len(words) > 1:
        return False
    for i, word in enumerate(words):
        if word in SECRET_WORDS:
            if word in ("token", "tokens") and PAGINATION.intersection(words):
                continue
            return True
        if word == "key" and i > 0 and words[i - 1] in KEY_MAKERS:
            return True
        if word == "secret" or (word == "secret" and i > 0 and words[i - 1] == "client"):
            return True
    # a run of words written together, as a lower-cased header name has them
    # (`sessiontoken`, `csrftoken`, `APIKEYLIVE`): a long secret word inside it, unless
    # what follows makes another word (`secretary`, `tokenizer`, `passwordless`) or says
    # what the secret is about (`tokencount`), or what precedes is pagination (`pagetoken`)
    for word in words:
        for strong in GLUED:
            at = word.find(strong)
            if at < 0 or (word == strong and word in SECRET_WORDS):  # a word alone: judged above
                continue
            rest = word[at + len(strong) :]
            if (
                word[:at] in PAGINATION
                or rest in ABOUT_A_SECRET
                or rest.startswith(NOT_A_SECRET_WORD_GOES_ON)
            ):
                continue
            return True
    return "".join(words) in WHOLE_NAMES


# What, written right after a secret word, makes it another word
NOT_A_SECRET_WORD_GOES_ON = ("ary", "aries", "iz", "is", "less", "ful")
GLUED = (
    "authentication",
    "authkey",
    "sessionkey",
    "token",
    "tokens",
    "secret",
    "password",
    "passwd",
    "passcode",
    "apikey",
    "signature",
    "credentials",
    "credential",
    "sessionid",
    "accesskey",
    "secretkey",
    "privatekey",
)


# ---- values by shape ---------------------------------------------------------------------

JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")
AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b")  # long-term and temporary access key ids
PEM_PRIVATE = re.compile(
    r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----.*?(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----|\Z)", re.S
)
SHAPES = (JWT, AWS_KEY_ID, PEM_PRIVATE)


def may_hold_shapes(text: str) -> bool:
    """The cheap test before the shapes are searched for: substring tests in C (an
    alternation in `re` costs ~2 µs a header, on every header the proxy sees)."""
    return "eyJ" in text or "AKIA" in text or "ASIA" in text or "-----BEGIN" in text


def secret_shapes(text: str) -> list[tuple[int, int]]:
    """(start, end) of every secret-shaped value in a text."""
    if not may_hold_shapes(text):
        return []
    return [m.span() for shape in SHAPES for m in shape.finditer(text)]
