"""URL rules for linking hops: WHATWG resolution of Location, plus design.md's normalization.

Normalization lower-cases scheme and host, drops the default port and the fragment,
and turns an empty path into "/". Percent-escapes and `;params` are kept exactly as
they are: two URLs that differ only in escaping are different requests on the wire.

A Location is resolved as the WHATWG URL parser does (ada, the parser Node uses): raw
non-ASCII and spaces percent-encoded as UTF-8, `\\` read as `/` in http(s) URLs, tabs and
newlines dropped, the scheme and host lower-cased, an internationalized host turned into
punycode. That is what browsers and Node send. Other clients repair an odd Location their
own way (requests percent-encodes a backslash and resolves by RFC 3986, curl writes its
escapes in lower case and a space in the query as `+`, mitmproxy records an IDN host in
Unicode): `location_alternates` gives those forms, which linking tries when the WHATWG
form finds no follow-up.
"""

from __future__ import annotations

import re
from urllib.parse import quote, urljoin, urlsplit, urlunsplit

import ada_url

DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
# The everyday shape (scheme://host[:port]... with a plain host, no userinfo, no IPv6
# literal, no characters urlsplit would strip) takes a fast path with the same result.
_PLAIN = re.compile(r"(?i)(https?|wss?)://([a-z0-9.\-_]+)(?::([0-9]{1,5}))?(?=[/?#]|\Z)")
_URL_JUNK = re.compile(r"[\t\r\n]")


class BadURL(ValueError):
    """A URL (or a Location) that cannot be parsed or resolved."""


def normalize_url(url: str) -> str:
    """Return the comparison form of an absolute URL; raise BadURL if it is not one."""
    plain = _PLAIN.match(url)
    if plain is not None and url == url.strip() and not _URL_JUNK.search(url):
        scheme, host, port = plain[1].lower(), plain[2].lower(), plain[3]
        if port is None or int(port) <= 65535:
            if port is not None and int(port) != DEFAULT_PORTS[scheme]:
                host = f"{host}:{int(port)}"
            path, _, query = url[plain.end() :].partition("#")[0].partition("?")
            return f"{scheme}://{host}{path or '/'}{'?' + query if query else ''}"
    return _normalize_general(url)


def _normalize_general(url: str) -> str:
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise BadURL(f"{url!r}: {exc}") from None
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if not scheme or not host:
        raise BadURL(f"{url!r} is not an absolute URL")
    if ":" in host:  # IPv6 literal keeps its brackets
        host = f"[{host}]"
    if port is not None and port != DEFAULT_PORTS.get(scheme):
        host = f"{host}:{port}"
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@{host}" if userinfo else host
    return urlunsplit((scheme, netloc, parts.path or "/", parts.query, ""))


def resolve_location(base: str, location: str) -> str:
    """Resolve a Location value against the request URL as the WHATWG URL parser does
    (RFC 9110 10.2.2 leaves the repair of invalid references to the client; Fetch's
    "location URL" uses the URL parser); fall back to RFC 3986 resolution where that parser
    refuses what a lenient client may still follow."""
    value = location.strip()
    if not value:
        raise BadURL("empty Location")
    if _is_plain(value):
        try:
            return normalize_url(urljoin(base, value))
        except ValueError as exc:
            raise BadURL(f"Location {location!r}: {exc}") from None
    try:
        return normalize_url(ada_url.join_url(base, value))
    except ValueError:
        pass
    try:
        return normalize_url(urljoin(base, value))
    except ValueError as exc:
        raise BadURL(f"Location {location!r}: {exc}") from None


# A Location every parser reads alike: only the characters RFC 3986 allows (no spaces,
# quotes, backslashes, braces, pipes or carets, which clients percent-encode their own
# ways), and a lower-case scheme and host that is not punycode (a scheme's case and an IDN
# host are the other repairs clients make).
_ODD = re.compile(r"[^A-Za-z0-9!#$%&'()*+,\-./:;=?@\[\]_~]")  # RFC 3986's characters, nothing clients repair
_HEAD = re.compile(r"(?:([A-Za-z][A-Za-z0-9+.-]*):)?(//[^/?#]*)?")


def _is_plain(location: str) -> bool:
    if not location.isascii() or _ODD.search(location) is not None:
        return False
    head = _HEAD.match(location)
    assert head is not None  # every part of the pattern is optional
    scheme, authority = head[1] or "", head[2] or ""
    return scheme == scheme.lower() and authority == authority.lower() and "xn--" not in authority


def location_alternates(base: str, location: str, primary: str | None = None) -> tuple[str, ...]:
    """Other normalized URLs a client may send after `location` than the WHATWG one
    (`primary`, as `resolve_location` gave it), most common first; none for a Location every
    parser reads alike."""
    value = location.strip()
    if not value or _is_plain(value):
        return ()
    forms: list[str] = []
    for make in (_whatwg, _requoted, _rfc3986):
        try:
            url = make(base, value)
        except ValueError:
            continue
        forms += [url, _lower_escapes(url), _query_space_plus(url), _unicode_host(url)]
    out: list[str] = []
    for url in forms:
        try:
            norm = normalize_url(url)
        except BadURL:
            continue
        if norm != primary and norm not in out:
            out.append(norm)
    return tuple(out)


def _whatwg(base: str, value: str) -> str:
    return str(ada_url.join_url(base, value))


def _requoted(base: str, value: str) -> str:
    """requests: percent-encode what is not allowed in a URI (UTF-8), then RFC 3986."""
    return urljoin(base, quote(value, safe="!#$%&'()*+,/:;=?@[]~"))


def _rfc3986(base: str, value: str) -> str:
    return urljoin(base, value)


_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")


def _lower_escapes(url: str) -> str:
    return _ESCAPE.sub(lambda m: m[0].lower(), url)


def _query_space_plus(url: str) -> str:
    """curl: a space in the query as `+`, its own escapes in lower case."""
    head, mark, query = url.partition("?")
    return _lower_escapes(head + mark + query.replace("%20", "+")) if mark else url


def _unicode_host(url: str) -> str:
    """The host as mitmproxy records it: an IDN in Unicode."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if "xn--" not in host:
        return url
    try:
        unicode = host.encode("ascii").decode("idna")
    except UnicodeError:
        return url
    netloc = parts.netloc.replace(host, unicode, 1)
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def origin_of(url: str) -> str:
    """scheme://host[:port] of a normalized URL (of a broken one, what stands before its path)."""
    try:
        parts = urlsplit(url)
    except ValueError:  # stored as given when it could not be normalized ("http://[::1")
        scheme, _, rest = url.partition("://")
        return f"{scheme}://{rest.split('/', 1)[0].rpartition('@')[2]}"
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def endpoint(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) of a URL, the default port spelled out (IPv6 hosts keep brackets)."""
    try:
        parts = urlsplit(url)
    except ValueError:  # a URL kept as given because it could not be parsed
        scheme, _, rest = url.partition("://")
        return scheme.lower(), rest.split("/", 1)[0].lower(), None
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    return (
        scheme,
        f"[{host}]" if ":" in host else host,
        port if port is not None else DEFAULT_PORTS.get(scheme),
    )


def origin_with_port(url: str) -> str:
    """scheme://host:port, the port always written: two origins compare as strings."""
    scheme, host, port = endpoint(url)
    return f"{scheme}://{host}:{port}"
