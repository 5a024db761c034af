"""Client labels and control requests, through a real mitmdump with the recorder.

A client that gives `http://LABEL@127.0.0.1:PORT` as its proxy is recorded under LABEL,
over plain HTTP (the label rides on every request) and over HTTPS (it rides on the
CONNECT); the proxy credential is never forwarded or stored; two labels on one address
are two clients. `/ping` and `/flush` at redirect-audit.invalid are answered by the
recorder and never recorded.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess

import pytest
import requests
from conftest import require_program, run_cli
from proxyrun import Mitmdump
from upstream import Upstream, self_signed_context

pytestmark = pytest.mark.slow


@pytest.fixture
def proxy(tmp_path):
    dump = Mitmdump(tmp_path / "conf", db=str(tmp_path / "labels.db"))
    yield dump
    dump.stop()


def rows(db, sql: str) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql).fetchall()


def flush(proxy) -> dict:
    answer = requests.get("http://redirect-audit.invalid/flush", proxies={"http": proxy.url}, timeout=30)
    assert answer.status_code == 200
    return answer.json()


def test_labels_name_clients_over_http_and_https_and_are_never_forwarded(proxy, upstream, tmp_path):
    curl = require_program("curl", "apt-get install curl")
    secure = Upstream(tls=self_signed_context(tmp_path))
    try:
        port = proxy.port
        plain = subprocess.run(
            [curl, "-s", "-L", "-x", f"http://alpha@127.0.0.1:{port}", f"{upstream.origin}/r/301/a"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        tls = subprocess.run(
            [
                curl,
                "-s",
                "-L",
                "--cacert",
                str(proxy.ca),
                "-x",
                f"http://beta:secret@127.0.0.1:{port}",
                f"{secure.origin}/r/308/b",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        via_requests = requests.get(
            f"{upstream.origin}/r/302/c", timeout=30, proxies={"http": f"http://gamma:x@127.0.0.1:{port}"}
        )
        unlabelled = requests.get(f"{upstream.origin}/echo/d", proxies={"http": proxy.url}, timeout=30)
    finally:
        secure.close()
    for answer in (json.loads(plain.stdout), json.loads(tls.stdout), via_requests.json(), unlabelled.json()):
        assert not any(h.lower() == "proxy-authorization" for h in answer["headers"])  # never forwarded
    assert flush(proxy)["flushed"] is True
    db = tmp_path / "labels.db"
    got = rows(db, "SELECT client, method, url FROM exchanges ORDER BY id")
    assert [(c, u.rsplit("/", 2)[-2:]) for c, _, u in got] == [
        ("alpha", ["301", "a"]),
        ("alpha", ["echo", "a"]),
        ("beta", ["308", "b"]),
        ("beta", ["echo", "b"]),
        ("gamma", ["302", "c"]),
        ("gamma", ["echo", "c"]),
        (got[-1][0], ["echo", "d"]),
    ]
    assert got[-1][0].startswith("proxy:") and got[-1][0].endswith("/127.0.0.1")  # no label: as before
    stored = "".join(h for (h,) in rows(db, "SELECT request_headers FROM exchanges")).lower()
    assert "proxy-authorization" not in stored and "secret" not in stored
    listed = json.loads(run_cli("chains", "-f", "json", "--db", str(db)).stdout)
    assert sorted(c["client"] for c in listed) == ["alpha", "beta", "gamma"]
    trees = run_cli("chains", "--db", str(db)).stdout  # the tree names the label too
    assert all(f" · {label} · " in trees for label in ("alpha", "beta", "gamma")), trees


def test_two_labels_on_one_address_are_never_linked(proxy, upstream, tmp_path):
    """One client's redirect and another's request for its Location, from one address:
    without labels they would make one chain (and a 307 POST -> GET finding)."""
    port = proxy.port
    answer = requests.post(
        f"{upstream.origin}/r/307/shared",
        data=b"x=1",
        allow_redirects=False,
        timeout=30,
        proxies={"http": f"http://writer:x@127.0.0.1:{port}"},
    )
    assert answer.status_code == 307
    requests.get(
        f"{upstream.origin}/echo/shared", timeout=30, proxies={"http": f"http://reader:x@127.0.0.1:{port}"}
    )
    flush(proxy)
    db = str(tmp_path / "labels.db")
    findings = json.loads(run_cli("findings", "-f", "json", "--db", db).stdout)
    assert [(f["rule"], f["client"], f["followed"]) for f in findings] == [("lost-write", "writer", False)]
    chains = json.loads(run_cli("chains", "-f", "json", "--db", db).stdout)
    assert [(c["client"], c["hops"][0]["followed"]) for c in chains] == [("writer", False)]


def test_control_requests_are_answered_by_the_recorder_and_never_recorded(proxy, upstream, tmp_path):
    via = {"http": proxy.url}
    assert requests.get("http://redirect-audit.invalid/ping", proxies=via, timeout=30).json() == {
        "ready": True
    }
    requests.get(f"{upstream.origin}/r/302/x", proxies=via, timeout=30)
    done = flush(proxy)
    assert done["flushed"] is True and done["seen"] == 2 and done["stored"] == 2
    labelled = {"http": f"http://alpha:x@127.0.0.1:{proxy.port}"}
    control = "http://redirect-audit.invalid/label"
    assert requests.get(
        control, params={"from": "alpha", "to": "alpha-t1"}, proxies=via, timeout=30
    ).json() == {"from": "alpha", "to": "alpha-t1"}
    requests.get(f"{upstream.origin}/echo/renamed", proxies=labelled, timeout=30)
    requests.get(control, params={"from": "alpha"}, proxies=via, timeout=30)  # no `to`: as given again
    requests.get(f"{upstream.origin}/echo/as-given", proxies=labelled, timeout=30)
    assert requests.get(control, proxies=via, timeout=30).status_code == 400
    flush(proxy)
    assert rows(
        tmp_path / "labels.db",
        "SELECT client FROM exchanges WHERE url LIKE '%/echo/renamed' OR url LIKE '%/echo/as-given' ORDER BY id",
    ) == [("alpha-t1",), ("alpha",)]
    unknown = requests.get("http://redirect-audit.invalid/nothing", proxies=via, timeout=30)
    assert unknown.status_code == 404 and "known: /ping, /flush, /label" in unknown.json()["error"]
    assert rows(
        tmp_path / "labels.db", "SELECT count(*) FROM exchanges WHERE url LIKE '%redirect-audit.invalid%'"
    ) == [(0,)]
    assert rows(tmp_path / "labels.db", "SELECT count(*) FROM exchanges") == [(4,)]
