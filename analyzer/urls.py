"""URL rules for linking hops: RFC 3986 resolution plus design.md's normalization.

Normalization lower-cases scheme and host, drops the default port and the fragment,
and turns an empty path into "/". Percent-escapes and `;params` are kept exactly as
they are: two URLs that differ only in escaping are different requests on the wire.
"""

from __future__ import annotations

import re
from urllib.parse import urljoin, urlsplit, urlunsplit

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
    """Resolve a Location value against the request URL (RFC 9110 10.2.2, RFC 3986 5)."""
    value = location.strip()
    if not value:
        raise BadURL("empty Location")
    try:
        joined = urljoin(base, value)
    except ValueError as exc:
        raise BadURL(f"Location {location!r}: {exc}") from None
    return normalize_url(joined)


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
