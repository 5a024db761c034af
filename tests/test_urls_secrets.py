from __future__ import annotations

import json

import pytest

from analyzer.secrets import fingerprint, protect_headers, protect_url, redact_body
from analyzer.urls import BadURL, normalize_url, resolve_location


@pytest.mark.parametrize(
    "raw, norm",
    [
        ("HTTP://Example.COM", "http://example.com/"),
        ("https://example.com:443/a#top", "https://example.com/a"),
        ("https://example.com:8443/a", "https://example.com:8443/a"),
        ("http://example.com/a%2Fb;p=1?q=%7E", "http://example.com/a%2Fb;p=1?q=%7E"),
        ("http://[::1]:8080/x", "http://[::1]:8080/x"),
    ],
)
def test_normalize(raw, norm):
    assert normalize_url(raw) == norm


@pytest.mark.parametrize(
    "location, resolved",
    [
        ("/b", "https://h/b"),
        ("b?x=1", "https://h/dir/b?x=1"),
        ("//other:443/c", "https://other/c"),
        ("http://X/", "http://x/"),
    ],
)
def test_resolve(location, resolved):
    assert resolve_location("https://h/dir/a", location) == resolved


@pytest.mark.parametrize("location", ["", "   ", "http://[bad"])
def test_bad_locations(location):
    with pytest.raises(BadURL):
        resolve_location("https://h/", location)


def test_credential_headers_are_fingerprinted_consistently():
    key = b"k" * 32
    out = protect_headers([("Authorization", "Bearer s3cret"), ("Accept", "*/*"), ("cookie", "sid=1")], key)
    assert out[1] == ("Accept", "*/*")
    assert out[0][1] == "Bearer " + fingerprint(key, "s3cret") and "s3cret" not in out[0][1]
    assert "sid=1" not in out[2][1]
    assert "Bearer " + fingerprint(b"other" * 8, "s3cret") != out[0][1]
    # the scheme stays readable; the token's fingerprint is the one it gets anywhere else
    assert fingerprint(key, "s3cret") in protect_url("https://h/?access_token=s3cret", key)


def test_secret_query_values_are_fingerprinted():
    url = protect_url("https://h/cb?code=1&access_token=abc.def&x=2", b"k" * 32)
    assert "abc.def" not in url and "x=2" in url and "access_token=hmac:" in url


def test_kept_bodies_are_redacted():
    key = b"k" * 32
    assert b"hunter2" not in redact_body(
        b"user=ada&password=hunter2", "application/x-www-form-urlencoded", key
    )
    assert b"zq9x" not in redact_body(
        b'{"a": {"token": "zq9x"}, "b": 1}', "application/json; charset=utf-8", key
    )


def test_fast_url_normalization_agrees_with_the_general_one():
    from conftest import CORPUS

    from analyzer.urls import _normalize_general

    urls = [
        "http://A.example:80",
        "https://a.example:0443/x?y#z",
        "http://a:65536/",
        "http://a:/",
        "HTTP://a.b/c?",
        "http://a/b?#c",
        "http://a?x",
        "https://a.b_c-d.e/%7e?q=%41",
        " http://a/",
        "http://a/\t",
        "http://a\n.b/",
        "wss://x:443",
        "ws://x:443/a",
        "http://a.example:8080?x=1",
        "http://a/b#?c",
        "http://1.2.3.4:99999",
        "https://h.test:00080/",
        "http://a.example\u3000",
        "http://[::1]:8080/x",
        "http://u:p@h/",
    ]
    for har in sorted((CORPUS / "good").glob("*.har")):
        for entry in json.loads(har.read_text(encoding="utf-8-sig"))["log"].get("entries") or []:
            url = ((entry or {}).get("request") or {}).get("url")
            if isinstance(url, str):
                urls.append(url)
    assert len(urls) > 1000

    def outcome(fn, url):
        try:
            return fn(url)
        except BadURL:
            return "BadURL"

    assert [outcome(normalize_url, u) for u in urls] == [outcome(_normalize_general, u) for u in urls]


def test_the_body_digest_is_hmac_sha256_under_the_key():
    import hashlib
    import hmac

    from analyzer.secrets import body_digest

    for key in (b"k" * 32, b"x" * 80, b""):
        for body in (b"", b"user=ada&password=hunter2", bytes(range(256)) * 40):
            assert body_digest(key, body) == hmac.new(key, body, hashlib.sha256).hexdigest()
    assert body_digest(b"a" * 32, b"same") != body_digest(b"b" * 32, b"same")


@pytest.mark.parametrize(
    "location, resolved",
    [
        ("/land/š", "https://h.test/land/%C5%A1"),  # raw UTF-8: percent-encoded, as browsers send it
        ("/a b?x=ä y", "https://h.test/a%20b?x=%C3%A4%20y"),
        ("\\back\\slash", "https://h.test/back/slash"),  # WHATWG: "\" is "/" in an http(s) URL
        ("HTTPS://Other.TEST/x", "https://other.test/x"),
        ("http://bücher.test/", "http://xn--bcher-kva.test/"),
        ("/p?q=%2F&r=1", "https://h.test/p?q=%2F&r=1"),  # escapes kept as sent
        ("../up", "https://h.test/up"),
    ],
)
def test_a_location_resolves_as_the_whatwg_parser_does(location, resolved):
    from analyzer.urls import resolve_location

    assert resolve_location("https://h.test/dir/page", location) == resolved


# ---- names by their words, however they are spelled -----------------------------------------

KEY = b"k" * 32
SECRET_PHRASES = [
    ("session", "token"),
    ("access", "token"),
    ("client", "secret"),
    ("api", "key"),
    ("private", "key"),
    ("auth",),
    ("password",),
    ("signature",),
    ("aws", "secret", "access", "key"),
]
ORDINARY_PHRASES = [
    ("author",),
    ("keyword",),
    ("page", "token"),
    ("next", "page", "token"),
    ("token", "type"),
    ("user", "id"),
]


def _spellings():
    from hypothesis import strategies as st

    def spell(words: tuple[str, ...], style: str, prefix: str) -> str:
        if style == "camel":
            name = words[0] + "".join(w.capitalize() for w in words[1:])
        elif style == "pascal":
            name = "".join(w.capitalize() for w in words)
        elif style == "upper":
            name = "_".join(words).upper()
        else:
            name = style.join(words)
        return prefix + name

    styles = st.sampled_from(["camel", "pascal", "upper", "_", "-", "."])
    prefixes = st.sampled_from(["", "x-", "X-", "my_"])
    return spell, styles, prefixes


def test_secret_names_are_found_however_they_are_spelled_and_placed():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from analyzer.secrets import protect_headers, protect_url, redact_body

    spell, styles, prefixes = _spellings()

    @settings(max_examples=300, deadline=None)
    @given(
        st.sampled_from(SECRET_PHRASES),
        styles,
        prefixes,
        st.sampled_from(["query", "header", "json", "form", "xml"]),
    )
    def secret(words, style, prefix, where):
        name = spell(words, style, prefix)
        value = "CANARYv4lue"
        if where == "query":
            out = protect_url(f"https://h.test/p?id=1&{name}={value}", KEY)
        elif where == "header":
            out = str(protect_headers([(name, value)], KEY))
        elif where == "json":
            out = redact_body(json.dumps({"id": 1, name: value}).encode(), "application/json", KEY).decode()
            json.loads(out)  # still JSON
        elif where == "form":
            out = redact_body(
                f"id=1&{name}={value}".encode(), "application/x-www-form-urlencoded", KEY
            ).decode()
        else:
            tag = name.replace(".", "_")
            out = redact_body(f"<r><{tag}>{value}</{tag}></r>".encode(), "application/xml", KEY).decode()
        assert value not in out, (name, where, out)

    @settings(max_examples=200, deadline=None)
    @given(st.sampled_from(ORDINARY_PHRASES), styles, st.sampled_from(["query", "json"]))
    def ordinary(words, style, where):
        name = spell(words, style, "")
        if where == "query":
            out = protect_url(f"https://h.test/p?{name}=plainvalue", KEY)
        else:
            out = redact_body(json.dumps({name: "plainvalue"}).encode(), "application/json", KEY).decode()
        assert "plainvalue" in out, (name, where, out)

    secret()
    ordinary()
