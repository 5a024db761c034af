"""Mutation fuzzing of the importers, with fixed seeds, and properties of the core.

Every mutant of a real HAR file (or flow dump) must end one of two ways:

* imported cleanly, and then every report and frame works on the store; or
* refused with exit status 2 and exactly one line naming the file, with nothing stored.

Anything else (a traceback, "internal error", a second line, a half-stored file) is a
failure that names the seed and mutation, so it can be replayed:
`pytest tests/test_fuzz.py -k "deep-seed-0"`. The mutations are the ones hostile or broken
exporters produce: truncation, flipped bytes, deleted and retyped fields, huge numbers,
deep nesting, huge values, bad UTF-8, surrogates, NUL, odd timestamps and URLs, a
Location with CRLF, odd statuses.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import sqlite3
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from conftest import CORPUS, RULE_FIXTURES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SEEDS_HAR = [
    CORPUS / "good" / name
    for name in (
        "chrome-har__sitespeedio__redirect-and-back.har",
        "charles42__gatling__redirect-post-303.har",
        "firefox126__zaproxy__noresponse.har",
        "chrome__mitmproxy__timed-out.har",
        "handwritten__grafana__request-only-multipart.har",
        "safari__mitmproxy__safari.har",
    )
] + [
    RULE_FIXTURES / name
    for name in (
        "md-307-post-to-get.har",
        "dw-failover.har",
        "st-7-days.har",
        "cc-authorization-other-host.har",
    )
]
HAR_DAMAGE = (
    "truncate",
    "flip",
    "bad-utf8",
    "cut-range",
    "delete",
    "retype",
    "huge-number",
    "deep",
    "date",
    "url",
    "location-crlf",
    "status",
    "surrogate",
    "nul",
)
FLOW_DAMAGE = ("truncate", "flip", "retype", "huge-int", "deep", "length")
# Every kind of damage, each on several seed files and every seed file under several kinds.
# The default profile (ci) applies each kind to SEEDS_PER_KIND seed files, taken in turn so
# that every seed file meets 4 or 5 kinds; --hypothesis-profile=deep applies every kind to
# every seed file, ten times. REDIRECT_AUDIT_FUZZ_MUTANTS sets the count per (seed, kind);
# the seeds stay fixed, so a failure replays.
DEEP = settings().max_examples > 200
MUTANTS_PER_KIND = int(os.environ.get("REDIRECT_AUDIT_FUZZ_MUTANTS") or (10 if DEEP else 1))
SEEDS_PER_KIND = None if DEEP or os.environ.get("REDIRECT_AUDIT_FUZZ_MUTANTS") else 3
ODD_VALUES = [
    None,
    True,
    0,
    -1,
    1e308,
    10**40,
    2**63,
    -(2**63) - 1,
    301.5,
    "",
    "x" * 300_000,
    [],
    {},
    [[[]]],
    "\ud800",
    "a\u0000b",
    "\u202e",
    "1e400",
]
ODD_DATES = [
    "9999-12-31T23:59:59-14:00",
    "0001-01-01T00:00:00Z",
    "not a date",
    12345,
    "2026-13-45T99:99:99Z",
    "1500-06-01T00:00:00+00:00",
    "",
]
ODD_URLS = [
    "",
    "http://",
    "//x.test/a",
    "javascript:alert(1)",
    "http://[::1",
    "http://h.test:99999/",
    "https://h.test/" + "a" * 20_000,
    "https://h.test/a b\r\nX: y",
    "https://bücher.test/ü?ä=1",
    "https://h.test/\x1b[2J",
    "data:text/html,<script>",
]
ODD_STATUSES = [0, -1, 999, "301", 301.5, None, 10**10, 307]


# ---- mutations --------------------------------------------------------------------------------


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value[:5]):
            yield from _paths(v, (*prefix, i))


def _set(doc, path, value):
    target = doc
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value


def _delete(doc, path):
    target = doc
    for step in path[:-1]:
        target = target[step]
    del target[path[-1]]


def _nested(depth: int, inner) -> object:
    for _ in range(depth):
        inner = [inner]
    return inner


def mutate(raw: bytes, rng: random.Random, kind: str) -> tuple[str, bytes]:
    """One mutation of a HAR file's bytes of the given kind; returns (what was done, the new bytes)."""
    if kind == "truncate":
        at = rng.randrange(1, len(raw))
        return f"truncate@{at}", raw[:at]
    if kind == "flip":
        data = bytearray(raw)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return kind, bytes(data)
    if kind == "bad-utf8":
        at = rng.randrange(len(raw))
        return f"bad-utf8@{at}", raw[:at] + rng.choice(
            [b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xe2\x82"]
        ) + raw[at:]
    if kind == "cut-range":
        a = rng.randrange(len(raw))
        return f"cut@{a}", raw[:a] + raw[a + rng.randint(1, 400) :]
    doc = json.loads(raw.decode("utf-8-sig"))
    entries = doc["log"]["entries"]
    paths = [p for p in _paths(doc) if p]
    if kind == "delete":
        path = rng.choice(paths)
        _delete(doc, path)
        return f"delete {'.'.join(map(str, path))}", json.dumps(doc).encode()
    if kind == "retype":
        path = rng.choice(paths)
        _set(doc, path, rng.choice(ODD_VALUES))
        return f"retype {'.'.join(map(str, path))}", json.dumps(doc).encode()
    if kind == "huge-number":
        path = rng.choice(paths)
        _set(doc, path, rng.choice([10**64, 1e308, -(10**30)]))
        return f"huge-number {'.'.join(map(str, path))}", json.dumps(doc).encode()
    if kind == "deep":
        path = rng.choice(paths)
        depth = rng.choice([63, 70, 500, 5000, 100_000])
        text = json.dumps(doc)
        marker = '"__DEEP__"'
        _set(doc, path, "__DEEP__")
        text = json.dumps(doc).replace(marker, "[" * depth + "]" * depth, 1)
        return f"deep{depth} {'.'.join(map(str, path))}", text.encode()
    if not entries:
        return "as-is", raw
    entry = rng.choice(entries)
    if kind == "date":
        entry["startedDateTime"] = rng.choice(ODD_DATES)
    elif kind == "url":
        entry.setdefault("request", {})["url"] = rng.choice(ODD_URLS)
    elif kind == "location-crlf":
        entry.setdefault("response", {}).setdefault("headers", []).append(
            {"name": "Location", "value": "/next\r\nSet-Cookie: injected=1"}
        )
        entry["response"]["status"] = 302
    elif kind == "status":
        entry.setdefault("response", {})["status"] = rng.choice(ODD_STATUSES)
    elif kind == "surrogate":
        entry.setdefault("request", {})["url"] = "https://h.test/\ud83d" + "x"
    elif kind == "nul":
        entry.setdefault("request", {}).setdefault("headers", []).append(
            {"name": "User-Agent", "value": "a\x00b"}
        )
    return kind, json.dumps(doc).encode()


# ---- the oracle --------------------------------------------------------------------------------


def run(args: list[str]) -> tuple[int, str, str]:
    """The command line in this process (fast enough for hundreds of mutants)."""
    from analyzer import cli

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            cli.main(args)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 0
    return code, out.getvalue(), err.getvalue()


def exchanges_in(db: Path) -> int:
    if not db.exists():
        return 0
    with sqlite3.connect(db) as conn:
        return conn.execute("select count(*) from exchanges").fetchone()[0]


BYTES_REPR = re.compile(r"""(?<![\w'"])b['"]""")  # a Python bytes literal, as a parser's message may hold


def judge(path: Path, db: Path, what: str, command: str = "import-har", html: bool = False) -> None:
    code, _out, err = run(
        [command, str(path), "--db", str(db), "--workers", "0"]
        if command == "import-har"
        else [command, str(path), "--db", str(db)]
    )
    assert "Traceback" not in err and "internal error" not in err, f"{what}: {err}"
    if code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"redirect-audit: error: {path}: "), f"{what}: {err!r}"
        assert BYTES_REPR.search(lines[0][len(str(path)) :]) is None, (
            f"{what}: a bytes repr: {err!r}"
        )  # words
        assert exchanges_in(db) == 0, f"{what}: refused but stored"
        return
    assert code == 0, f"{what}: exit {code}: {err}"
    assert [line for line in err.splitlines() if not line.startswith("redirect-audit: warning:")] == [], what
    for args in (
        ["findings", "-f", "json"],
        ["findings"],
        ["findings", "-f", "sarif"],
        ["findings", "-f", "junit"],
        ["findings", "-f", "markdown"],
        ["chains", "-f", "json"],
        ["chains"],
        ["captures"],
        ["check", "--allow-empty", "--fail-on", "high"],
    ):
        code, _out, err = run([*args, "--db", str(db)])
        assert code in (0, 1) and "Traceback" not in err and "error" not in err, f"{what}: {args}: {err}"
    from analyzer import frames

    for frame in (
        frames.exchanges,
        frames.hops,
        frames.chains,
        frames.findings,
        frames.clients,
        frames.temporary_redirects,
        frames.client_summary,
    ):
        frame(str(db))
    if html:
        code, _out, err = run(["findings", "-f", "html", "-o", str(db.with_suffix(".html")), "--db", str(db)])
        assert code == 0 and "Warning" not in err, f"{what}: html: {err}"


def _seeds_for(index: int) -> list[Path]:
    """The seed files kind number `index` damages: all, or SEEDS_PER_KIND of them in turn."""
    if SEEDS_PER_KIND is None:
        return SEEDS_HAR
    return [SEEDS_HAR[(index * SEEDS_PER_KIND + k) % len(SEEDS_HAR)] for k in range(SEEDS_PER_KIND)]


CASES = [
    (seed, kind, n)
    for i, kind in enumerate(HAR_DAMAGE)
    for seed in _seeds_for(i)
    for n in range(MUTANTS_PER_KIND)
]
HTML_ONCE = {seed: (seed, kind, n) for seed, kind, n in reversed(CASES)}  # each seed's first case


@pytest.mark.parametrize(
    "seed, kind, n", CASES, ids=[f"{s.stem[:24]}-{kind}-seed-{n}" for s, kind, n in CASES]
)
def test_a_har_mutant_imports_cleanly_or_is_refused_in_one_line(tmp_path, seed, kind, n):
    rng = random.Random(f"{seed.name}/{kind}/{n}")
    what, data = mutate(seed.read_bytes(), rng, kind)
    path = tmp_path / f"mutant-{n}.har"
    path.write_bytes(data)
    # the HTML report (pandas and matplotlib over the store) once per seed file
    judge(path, tmp_path / "m.db", f"{seed.name} #{n}: {what}", html=HTML_ONCE[seed] == (seed, kind, n))


def _flow_dump(rng: random.Random, kind: str) -> tuple[str, bytes]:
    from mitmproxy import io as mio
    from mitmproxy.io import tnetstring
    from mitmproxy.test import tflow

    states = []
    for i in range(3):
        f = tflow.tflow(resp=True)
        f.request.path = f"/p/{i}?access_token=t{i}"
        if i == 1:
            f.response.status_code = 307
            f.response.headers["Location"] = "/p/2"
        states.append(f.get_state())
    what = kind
    if kind in ("retype", "huge-int", "deep"):
        state = rng.choice(states)
        section = rng.choice(["request", "response"])
        key = rng.choice(sorted(state[section]))
        state[section][key] = {
            "retype": rng.choice([None, -1, "x", [1, 2], {b"a": 1}, 1.5e308]),
            "huge-int": int("9" * rng.choice([19, 64, 400])),
            "deep": _nested(rng.choice([70, 900]), 1),
        }[kind]
        what = f"{kind} {section}.{key}"
    buf = io.BytesIO()
    for state in states:
        try:
            buf.write(tnetstring.dumps(state))
        except (ValueError, TypeError, RecursionError):
            mio.FlowWriter(buf)  # a state tnetstring cannot even write: keep the others
    data = buf.getvalue()
    if kind == "truncate":
        at = rng.randrange(1, len(data))
        data, what = data[:at], f"truncate@{at}"
    elif kind == "flip":
        raw = bytearray(data)
        for _ in range(rng.randint(1, 6)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        data = bytes(raw)
    elif kind == "length":
        data, what = b"99999999999:" + data[data.index(b":") + 1 :], "length prefix"
    return what, data


FLOW_CASES = [(kind, n) for kind in FLOW_DAMAGE for n in range(3 * MUTANTS_PER_KIND)]


def test_every_kind_of_damage_meets_several_seed_files_and_every_seed_file_several_kinds():
    kinds_of: dict[Path, set[str]] = {}
    for seed, kind, _ in CASES:
        kinds_of.setdefault(seed, set()).add(kind)
    assert set(kinds_of) == set(SEEDS_HAR)
    assert min(len(k) for k in kinds_of.values()) >= 4
    assert {kind for _, kind, _ in CASES} == set(HAR_DAMAGE)


@pytest.mark.parametrize("kind, n", FLOW_CASES, ids=[f"{kind}-seed-{n}" for kind, n in FLOW_CASES])
def test_a_flow_dump_mutant_imports_cleanly_or_is_refused_in_one_line(tmp_path, kind, n):
    rng = random.Random(f"flows/{kind}/{n}")
    what, data = _flow_dump(rng, kind)
    path = tmp_path / f"mutant-{n}.mitm"
    path.write_bytes(data)
    judge(path, tmp_path / "f.db", f"flows #{n}: {what}", command="import-flows")


# ---- properties of the core -------------------------------------------------------------------------

HOSTS = st.sampled_from(["a.test", "B.test", "xn--bcher-kva.test", "127.0.0.1", "[::1]"])
SEGMENT = st.text(alphabet="abc%2F-._~!$&'()*+,;=:@", max_size=6)
URLS = st.builds(
    lambda scheme, host, port, segs, q: f"{scheme}://{host}{port}/{'/'.join(segs)}{q}",
    st.sampled_from(["http", "https", "HTTPS"]),
    HOSTS,
    st.sampled_from(["", ":80", ":443", ":8080"]),
    st.lists(SEGMENT, max_size=3),
    st.sampled_from(["", "?", "?a=1", "?a=1&access_token=x", "#f"]),
)
LOCATIONS = st.one_of(
    URLS,
    st.builds(lambda s: "/" + s, SEGMENT),
    st.builds(lambda s: "//h.test/" + s, SEGMENT),
    st.sampled_from(
        [
            "",
            "?q=1",
            "#frag",
            "../up",
            ".",
            "http://",
            "http://h:99999/",
            " /x ",
            "https://h.test/\r\n",
            "mailto:x@y",
        ]
    ),
)


@given(URLS, LOCATIONS)
def test_a_location_resolves_to_a_normal_absolute_url_or_is_refused(base, location):
    from analyzer.urls import BadURL, normalize_url, resolve_location

    try:
        base_norm = normalize_url(base)
        resolved = resolve_location(base_norm, location)
    except BadURL:
        return
    assert "://" in resolved and "#" not in resolved
    assert normalize_url(resolved) == resolved  # already normal: linking compares these strings


@given(st.one_of(URLS, st.text(max_size=60)))
def test_protecting_a_url_is_idempotent_and_keeps_ordinary_urls(url):
    from analyzer.secrets import protect_url

    key = b"k" * 32
    once = protect_url(url, key)
    assert protect_url(once, key) == once
    if "access_token" not in url.lower() and "%" not in url and "=" not in url:
        assert once == url


EXCHANGES = st.lists(
    st.tuples(
        st.sampled_from(["alice", "bob"]),
        st.integers(0, 3),
        st.integers(0, 3),
        st.sampled_from([200, 301, 302, 307, 308]),
        st.floats(0, 60),
    ),
    min_size=1,
    max_size=14,
)


def _exchanges(spec):
    from analyzer.model import Exchange

    out = []
    for i, (client, path, to, status, at) in enumerate(spec):
        url = f"https://h.test/p{path}"
        redirect = status != 200
        out.append(
            Exchange(
                capture_id=1,
                seq=i,
                method="GET",
                url=url,
                url_norm=url,
                started_at=at,
                client=client,
                status=status,
                location=f"/p{to}" if redirect else None,
                location_resolved=f"https://h.test/p{to}" if redirect else None,
                id=i + 1,
            )
        )
    return out


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(EXCHANGES, st.randoms(use_true_random=False))
def test_a_chain_never_crosses_clients_and_does_not_depend_on_entry_order(spec, shuffler):
    from analyzer.chains import build_chains

    exchanges = _exchanges(spec)
    chains = build_chains(exchanges)
    for chain in chains:
        clients = {hop.source.client for hop in chain.hops} | {
            hop.target.client for hop in chain.hops if hop.target
        }
        assert len(clients) == 1
    shuffled = list(exchanges)
    shuffler.shuffle(shuffled)

    def shape(found):
        return sorted(
            (tuple((h.source.id, h.target.id if h.target else None) for h in c.hops)) for c in found
        )

    assert shape(build_chains(shuffled)) == shape(chains)
