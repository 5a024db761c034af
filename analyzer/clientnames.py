"""Clients by names people read: product and version from the User-Agent, and the label.

A client id is what the store groups exchanges by (`proxy:<recorder>/<address>`,
`har:<capture>/<page>`, a label such as the pytest plugin's `pytest-gw0-1a2b3c4d-t12`);
`--client` takes it. People read `requests 2.32 · pytest gw0 · tests/test_pay.py::test_refund`.
Standard library and ua-parser only: every output format and frame imports it.
"""

from __future__ import annotations

import re
from functools import lru_cache

PLUGIN_LABEL = re.compile(r"^pytest-(?P<worker>[\w.-]+?)-(?P<session>[0-9a-f]{8})(?:-t(?P<test>\d+))?$")


@lru_cache(maxsize=1024)
def product(user_agent: str | None) -> str:
    """A client's product and version from its User-Agent: 'requests 2.32', 'curl 8.5',
    'Chrome 130'. Browsers by ua-parser's family (their first token is always Mozilla);
    everything else by its first product token, with a `python-` prefix dropped."""
    if not user_agent or not user_agent.strip():
        return "no User-Agent"
    if user_agent.startswith("Mozilla/"):
        from ua_parser import parse

        agent = parse(user_agent).user_agent
        if agent is not None and agent.family != "Other":
            return f"{agent.family} {agent.major}" if agent.major else agent.family
    token = user_agent.split()[0]
    name, _, version = token.partition("/")
    if name.lower().startswith("python-") and name[7:].islower():
        name = name[7:]  # python-requests, python-httpx: the library's own name
    parts = re.findall(r"\d+", version)[:2]
    return f"{name} {'.'.join(parts)}" if parts else name


def client_name(
    user_agent: str | None, creator: str | None = None, browser: str | None = None, source: str | None = None
) -> str:
    """The client's product and version ('requests 2.32', 'curl 8.5', 'Chrome 130'), else the
    HAR's browser or creator: what the frames and the HTML report name a hop's client by.
    Anything but a non-empty string is missing (a frame's NULL is a float NaN)."""
    if isinstance(user_agent, str) and user_agent:
        return product(user_agent)
    named = [name for name in (browser, creator) if isinstance(name, str) and name]
    if source == "har" and named:
        return named[0]
    return "unknown"


def label_words(client: str) -> str:
    """The label a client was recorded under, in words: 'pytest gw0' for the plugin's,
    '' for traffic without one (a recorder's name and the client's address)."""
    if client.startswith("proxy:"):
        return ""
    found = PLUGIN_LABEL.match(client)
    if found:
        return f"pytest {found['worker']}"
    return client


def readable(
    client: str | None,
    user_agent: str | None,
    test: str | None = None,
    *,
    browser: str | None = None,
    creator: str | None = None,
) -> str:
    """`requests 2.32 · pytest gw0 · tests/test_pay.py::test_refund`; a HAR without a
    User-Agent by the browser or tool that wrote it, a page by its HAR page id."""
    if user_agent and user_agent.strip():
        parts = [product(user_agent)]
    elif browser or creator:
        parts = [str(browser or creator)]
    else:
        parts = ["no User-Agent"]
    label = label_words(client or "")
    if label.startswith("har:"):
        page = label.partition("/")[2]
        label = (page if page.lower().startswith("page") else f"page {page}") if page else ""
    if label:
        parts.append(label)
    if test:
        parts.append(test)
    return " · ".join(parts)
