"""Many writers, one PostgreSQL store: three real proxies under load and a HAR import at
once, then exact counts and chains that never cross proxies.

The traffic is made to tempt a linker that knows clients by address alone: every
client is 127.0.0.1, and a redirect answered through one proxy is never followed there,
while the URL it names is requested through another proxy a moment later.
"""

from __future__ import annotations

import http.client
import json
import threading
import time

import pytest
from conftest import run_cli
from proxyrun import Mitmdump
from sqlalchemy import func, select
from upstream import Upstream

from analyzer.store import captures, exchanges, open_store

pytestmark = pytest.mark.slow

ROUNDS = 120  # per proxy; bounded in count and in time (DEADLINE)
DEADLINE = 120.0


def send(port: int, method: str, url: str, headers: dict | None = None, body: bytes | None = None) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, url, body=body, headers=headers or {})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def big_har(tmp_path, entries: int = 3000):
    items = []
    for i in range(entries):
        items.append(
            {
                "startedDateTime": f"2026-03-01T12:{i // 60 % 60:02d}:{i % 60:02d}.000Z",
                "time": 1,
                "request": {
                    "method": "GET",
                    "url": f"https://har.test/page/{i}",
                    "httpVersion": "HTTP/1.1",
                    "headers": [{"name": "Accept", "value": "*/*"}],
                },
                "response": {"status": 200, "headers": []},
            }
        )
    path = tmp_path / "fleet.har"
    path.write_text(
        json.dumps({"log": {"version": "1.2", "creator": {"name": "t", "version": "1"}, "entries": items}})
    )
    return path


def test_three_proxies_and_an_import_into_one_postgresql_lose_nothing_and_never_cross(tmp_path, pg_cluster):
    db = pg_cluster.new_database()
    assert run_cli("import-har", str(big_har(tmp_path, 10)), "--db", db).returncode == 0  # the store exists
    upstream = Upstream()
    proxies = [
        Mitmdump(tmp_path / f"mitm{i}", db=db, extra=["--set", f"redirect_audit_proxy_id=runner-{i}"])
        for i in range(3)
    ]
    sent = [0, 0, 0]
    failures: list[str] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + DEADLINE

    def load(i: int) -> None:
        me, next_one = proxies[i].port, proxies[(i + 1) % 3].port
        for n in range(ROUNDS):
            if time.monotonic() > stop_at:
                return
            case = f"p{i}-{n}"
            try:
                # A 307 here, never followed here; the very URL it names goes through the next proxy.
                assert send(me, "POST", f"{upstream.origin}/r/307/{case}", body=b'{"n": 1}') == 307
                assert send(next_one, "POST", f"{upstream.origin}/echo/{case}", body=b'{"n": 1}') == 200
                # A chain followed through one proxy, with a credential every proxy fingerprints alike.
                assert (
                    send(
                        me,
                        "GET",
                        f"{upstream.origin}/r/302/f{case}",
                        headers={"Authorization": "Bearer fleet-token"},
                    )
                    == 302
                )
                assert (
                    send(
                        me,
                        "GET",
                        f"{upstream.origin}/echo/f{case}",
                        headers={"Authorization": "Bearer fleet-token"},
                    )
                    == 200
                )
            except (AssertionError, OSError) as exc:
                with lock:
                    failures.append(f"{case}: {exc!r}")
                return
            with lock:
                sent[i] += 3
                sent[(i + 1) % 3] += 1

    har = big_har(tmp_path)
    workers = [threading.Thread(target=load, args=(i,)) for i in range(3)]
    try:
        for w in workers:
            w.start()
        imported = run_cli("import-har", str(har), "--db", db, timeout=300)
        for w in workers:
            w.join(timeout=DEADLINE + 30)
    finally:
        outputs = [p.stop() for p in proxies]
        upstream.close()
    assert not failures, failures[:5]
    assert imported.returncode == 0, imported.stderr
    assert "imported 3000 entries" in imported.stdout
    assert sent == [ROUNDS * 4] * 3

    store = open_store(db, create=False)
    try:
        with store.begin() as conn:
            per_capture = dict(
                conn.execute(
                    select(captures.c.source, func.count(exchanges.c.id))
                    .join(exchanges)
                    .group_by(captures.c.id, captures.c.source)
                    .where(captures.c.source == "proxy")
                ).all()
                or []
            )
            counts = conn.execute(
                select(exchanges.c.client, func.count())
                .where(exchanges.c.client.like("proxy:%"))
                .group_by(exchanges.c.client)
            ).all()
            har_count = conn.execute(
                select(func.count()).select_from(exchanges).join(captures).where(captures.c.source == "har")
            ).scalar()
            auth = set(
                conn.execute(
                    select(exchanges.c.request_headers).where(exchanges.c.url.like("%/echo/fp%"))
                ).scalars()
            )
    finally:
        store.close()
    assert per_capture  # three proxy runs recorded
    assert sorted(counts) == [(f"proxy:runner-{i}/127.0.0.1", ROUNDS * 4) for i in range(3)], outputs
    assert har_count == 3000 + 10
    tokens = {h for headers in auth for name, h in json.loads(headers) if name.lower() == "authorization"}
    assert len(tokens) == 1 and next(iter(tokens)).startswith("Bearer hmac:")  # one key, one fingerprint

    chains = json.loads(run_cli("chains", "-f", "json", "--db", db, timeout=300).stdout)
    proxy_chains = [c for c in chains if c["client"].startswith("proxy:")]
    assert len(proxy_chains) == ROUNDS * 2 * 3
    for chain in proxy_chains:
        for hop in chain["hops"]:
            ends = [hop["from"]] + ([hop["to"]] if hop.get("to") else [])
            assert {e["capture"]["flow_id"] is not None for e in ends} == {True}
        hop = chain["hops"][0]
        if "/r/307/" in hop["from"]["url"]:
            assert hop["followed"] is False, chain  # its URL went through another proxy: not a follow-up
        else:
            assert hop["followed"] is True and hop["to"]["url"].endswith(
                hop["from"]["url"].split("/r/302/")[1]
            )
    lost = [
        f
        for f in json.loads(run_cli("findings", "-f", "json", "--db", db).stdout)
        if f["rule"] == "lost-write" and f["client"].startswith("proxy:")
    ]
    assert len(lost) == ROUNDS * 3  # every unfollowed 307 POST is a write that reached no one, per proxy
