"""Canaries: distinctive strings put where secrets sit, and the search for them.

Shared by the secret tests and benchmarks/canary_table.py. A name is spelled the ways
real APIs spell it (`api_key`, `ApiKey`, `X-Api-Key`, `API.KEY`, `clientSecret`), from
the words that make a field secret and the words that often sit next to them; a
placement is one of the places a secret travels (query, header, JSON key, form field,
XML element, GraphQL argument, `k=v` text, multipart part).
"""

from __future__ import annotations

import base64
import json
import random
import uuid
from urllib.parse import quote

# The words that make a field secret (issue 29: token, secret, password..., api + key...)
SECRET_TERMS = (
    ("token",),
    ("secret",),
    ("password",),
    ("passwd",),
    ("passcode",),
    ("pwd",),
    ("signature",),
    ("credential",),
    ("credentials",),
    ("session",),
    ("auth",),
    ("authentication",),
    ("api", "key"),
    ("access", "key"),
    ("private", "key"),
    ("client", "secret"),
    ("access", "token"),
    ("refresh", "token"),
    ("session", "token"),
    ("api", "token"),
    ("auth", "key"),
    ("sas", "token"),
)
# Words seen next to them in real names; none of them turns a secret into a count or a type
AFFIXES = ("x", "user", "client", "my", "app", "shopify", "admin", "service", "new", "old", "live", "github")
SEPARATORS = ("_", "-", "", ".")
CASES = ("lower", "upper", "title", "camel")
PLACEMENTS = (
    "query",
    "header",
    "json",
    "json-escaped",
    "form",
    "form-encoded",
    "xml",
    "graphql",
    "text",
    "multipart",
)


def spell(words: list[str], separator: str, case: str) -> str:
    if case == "upper":
        words = [w.upper() for w in words]
    elif case == "title":
        words = [w.title() for w in words]
    elif case == "camel":
        words = [words[0].lower(), *(w.title() for w in words[1:])]
        separator = ""
    return separator.join(words)


# Short words that are secrets only standing alone: glued to others (`authadmin`,
# `sessionlive`) they cannot be told from `author` or `possession`, so a name glued
# from them is spelled with a separator here (the classifier's documented limit).
WEAK = frozenset({("session",), ("auth",), ("pwd",)})


def name_of(term: tuple[str, ...], before: list[str], after: list[str], separator: str, case: str) -> str:
    if separator in ("", ".") and case != "camel" and term in WEAK and (before or after):
        separator = "_"
    return spell([*before, *term, *after], separator, case)


def random_cases(count: int, seed: int) -> list[tuple[str, str]]:
    """(placement, name) pairs drawn as the Hypothesis strategies draw them, from a seed
    (for the slow tests); every placement in turn."""
    rng = random.Random(seed)
    cases = []
    for i in range(count):
        where = PLACEMENTS[i % len(PLACEMENTS)]
        before = rng.sample(AFFIXES, rng.randint(0, 1))
        after = rng.sample(AFFIXES, rng.randint(0, 1))
        if where == "header":  # see HEADER_SPELLINGS
            separator, case = rng.choice(HEADER_SPELLINGS[0]), rng.choice(HEADER_SPELLINGS[1])
        else:
            separator, case = rng.choice(SEPARATORS), rng.choice(CASES)
        cases.append((where, name_of(rng.choice(SECRET_TERMS), before, after, separator, case)))
    return cases


# HTTP/2 sends header names in lower case, so a header name's words survive only as
# separators: `X-Session-Token`, `x_session_token` (camelCase is not a header spelling)
HEADER_SPELLINGS = (("-", "_"), ("lower", "title"))


def canary(tag: str = "") -> str:
    return f"CANARY{tag}x{uuid.uuid4().hex[:10]}"


def forms(secret: str) -> list[bytes]:
    """How a secret could be written down: as is, percent-encoded, base64 (alone and in a
    Basic credential)."""
    raw = secret.encode()
    return [raw, quote(secret, safe="").encode(), base64.b64encode(raw), base64.b64encode(b"user:" + raw)]


def leaks(blob: bytes, secrets: dict[str, str]) -> list[str]:
    """Which canaries appear in `blob`, in any of their forms."""
    return [where for where, secret in secrets.items() if any(form in blob for form in forms(secret))]


def escaped_json_key(name: str) -> str:
    """The name as JSON text with its last letter written as a \\u escape (pass\\u0077ord)."""
    i = max(i for i, ch in enumerate(name) if ch.isalpha())
    return json.dumps(name[:i])[:-1] + f"\\u{ord(name[i]):04x}" + json.dumps(name[i + 1 :])[1:]


def percent_encoded_name(name: str) -> str:
    i = max(i for i, ch in enumerate(name) if ch.isalpha())
    return name[:i] + f"%{ord(name[i]):02X}" + name[i + 1 :]


def placed(placement: str, name: str, value: str) -> tuple[str, list[tuple[str, str]], str | None, bytes]:
    """One request carrying `value` under `name`: (path and query, headers, content type, body)."""
    if placement == "query":
        return f"/p?id=42&{name}={value}", [], None, b""
    if placement == "header":
        return "/p", [(name, value)], None, b""
    if placement in ("json", "json-escaped"):
        key = escaped_json_key(name) if placement == "json-escaped" else json.dumps(name)
        body = '{"id": 42, ' + key + ": " + json.dumps(value) + "}"
        return "/p", [("Content-Type", "application/json")], "application/json", body.encode()
    if placement in ("form", "form-encoded"):
        field = percent_encoded_name(name) if placement == "form-encoded" else quote(name, safe="")
        ctype = "application/x-www-form-urlencoded"
        return "/p", [("Content-Type", ctype)], ctype, f"id=42&{field}={quote(value, safe='')}".encode()
    if placement == "xml":
        body = f"<req><id>42</id><{name}>{value}</{name}></req>"
        return "/p", [("Content-Type", "application/xml")], "application/xml", body.encode()
    if placement == "graphql":
        arg = name.replace("-", "_").replace(".", "_")
        query = f'mutation {{ login(id: 42, user: "u", {arg}: "{value}") {{ ok }} }}'
        return (
            "/graphql",
            [("Content-Type", "application/json")],
            "application/json",
            json.dumps({"query": query}).encode(),
        )
    if placement == "text":
        return "/p", [("Content-Type", "text/plain")], "text/plain", f"id=42\n{name}={value}\n".encode()
    if placement == "multipart":
        ctype = "multipart/form-data; boundary=B"
        body = (
            '--B\r\nContent-Disposition: form-data; name="id"\r\n\r\n42\r\n'
            f'--B\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n--B--\r\n'
        )
        return "/p", [("Content-Type", ctype)], ctype, body.encode()
    raise ValueError(placement)
