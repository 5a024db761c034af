"""Secrets stay secret: a canary in every position a secret can sit, through every way in,
searched for in the store's bytes (and its WAL), every export and the proxy's terminal.

Each canary is a distinctive string; it must not appear anywhere, nor its base64 or
percent-encoded forms. Fingerprints (`hmac:...`) take their place, the same for the same
secret wherever it appeared, so the rules still see where it went.
"""

from __future__ import annotations

import base64
import json
import re
import stat
import uuid
from pathlib import Path
from urllib.parse import quote

import pytest
from conftest import run_cli

from analyzer.secrets import fingerprint, protect_headers, protect_url, redact_body

pytestmark = pytest.mark.slow

KEY = b"k" * 32


def canary(n: int) -> str:
    return f"CANARY{n}x{uuid.uuid4().hex[:8]}"


def forms(secret: str) -> list[bytes]:
    """The ways a secret could be written down: as is, percent-encoded, base64 (alone and
    in a Basic credential)."""
    raw = secret.encode()
    return [raw, quote(secret, safe="").encode(), base64.b64encode(raw), base64.b64encode(b"user:" + raw)]


def leaks(blob: bytes, secrets: dict[str, str]) -> list[str]:
    """Which canaries appear in `blob`, in any of their forms."""
    return [where for where, secret in secrets.items() if any(form in blob for form in forms(secret))]


# ---- the mechanism ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, secret",
    [
        ("https://h/cb?code=SEKRET1&state=x", "SEKRET1"),
        ("https://h/cb?state=SEKRET2", "SEKRET2"),
        ("https://app/cb#access_token=SEKRET3&token_type=bearer", "SEKRET3"),
        ("https://app/home?id_token=SEKRET4", "SEKRET4"),
        ("https://x/login?next=https%3A%2F%2Fy%2F%3Faccess_token%3DSEKRET5%26a%3D1", "SEKRET5"),
        ("https://x/login?next=https%253A%252F%252Fy%252F%253Ftoken%253DSEKRET6", "SEKRET6"),
        ("https://s3.test/b/o?X-Amz-Credential=AKIASEKRET7%2F2026&X-Amz-Signature=abc", "SEKRET7"),
        ("https://s3.test/b/o?X-Amz-Signature=SEKRET8&X-Amz-Date=1", "SEKRET8"),
        ("https://h/a;jsessionid=SEKRET9?b=1", "SEKRET9"),
        ("https://blob.test/c/f?sv=2024&sig=SEKRET10", "SEKRET10"),
        ("https://h/r?to=http%3A%2F%2Fu%3ASEKRET11%40h2%2Fx", "SEKRET11"),  # userinfo, nested
        ("https://h/r?to=http%253A%252F%252Fu%253ASEKRET12%2540h2", "SEKRET12"),  # ... encoded twice
    ],
)
def test_secret_parameters_are_fingerprinted_wherever_they_sit_in_a_url(url, secret):
    protected = protect_url(url, KEY)
    assert (secret not in protected and "hmac:" in protected) or "hmac%" in protected
    assert protect_url(protected, KEY) == protected  # protecting twice changes nothing


def test_ordinary_parameters_are_left_alone_and_the_url_object_is_returned():
    url = "https://shop.test/items?page=2&sort=price#reviews"
    assert protect_url(url, KEY) is url


def test_url_headers_have_their_urls_protected():
    out = dict(
        protect_headers(
            [
                ("Location", "https://app/cb?code=L1"),
                ("Referer", "https://app/home?id_token=R1"),
                ("Content-Location", "https://app/x?sig=C1"),
                ("Link", '<https://h/n?access_token=K1>; rel="next"'),
                ("Refresh", "0; url=https://h/?token=F1"),
                ("Accept", "text/html"),
            ],
            KEY,
        )
    )
    for name, secret in (
        ("Location", "L1"),
        ("Referer", "R1"),
        ("Content-Location", "C1"),
        ("Link", "K1"),
        ("Refresh", "F1"),
    ):
        assert secret not in out[name] and "hmac:" in out[name], name
    assert out["Link"].endswith('>; rel="next"') and out["Accept"] == "text/html"


def test_the_same_secret_gets_the_same_fingerprint_wherever_it_appears():
    token = "abc.DEF-123"
    mark = fingerprint(KEY, token)
    assert mark in protect_url(f"https://h/?access_token={token}", KEY)
    assert mark in protect_url(f"https://h/cb#access_token={token}", KEY)
    assert mark in protect_url(f"https://h/?next={quote(f'https://i/?token={token}', safe='')}", KEY).replace(
        "%3A", ":"
    )
    assert mark.encode() in redact_body(json.dumps({"token": token}).encode(), "text/plain", KEY)
    assert mark.encode() in redact_body(f"a=1&password={token}".encode(), None, KEY)


@pytest.mark.parametrize("content_type", ["application/json", "text/plain", None, "application/vnd.x+json"])
def test_json_bodies_are_redacted_whatever_their_declared_type(content_type):
    out = redact_body(b'{"user": "u", "password": "hun\\"ter2", "n": {"pin": 1234}}', content_type, KEY)
    assert b"hun" not in out and b"1234" not in out and b'"user": "u"' in out


def test_a_body_is_redacted_before_the_cap_cuts_it_and_at_any_depth():
    deep = b'{"a": ' * 1000 + b'{"token": "DEEPSECRET"}' + b"}" * 1000
    assert b"DEEPSECRET" not in redact_body(deep, "application/json", KEY)  # no recursion, no RecursionError
    big = json.dumps({"password": "BIGSECRET", "pad": "x" * 100_000}).encode()
    assert b"BIGSECRET" not in redact_body(big, "application/json", KEY)[:200]


def test_multipart_fields_are_redacted():
    body = (
        b'--B\r\nContent-Disposition: form-data; name="password"\r\n\r\nMPSECRET\r\n'
        b'--B\r\nContent-Disposition: form-data; name="note"\r\n\r\nhello\r\n--B--\r\n'
    )
    out = redact_body(body, "multipart/form-data; boundary=B", KEY)
    assert b"MPSECRET" not in out and b"hello" in out


def test_extra_secret_fields_extend_the_list():
    from analyzer.secrets import policy_for

    policy = policy_for(("x-tenant-ref",))
    assert "T1" not in protect_url("https://h/?x-tenant-ref=T1", KEY, policy)
    assert b"T2" not in redact_body(b'{"X-Tenant-Ref": "T2"}', None, KEY, policy)
    assert protect_url("https://h/?x-tenant-ref=T1", KEY) == "https://h/?x-tenant-ref=T1"


# ---- every way in -------------------------------------------------------------------------


def har_with_canaries(path: Path) -> dict[str, str]:
    c = {
        name: canary(i)
        for i, name in enumerate(
            (
                "authorization",
                "cookie",
                "referer id_token",
                "nested access_token",
                "json password as text/plain",
                "cut json password",
                "location code",
                "location state",
                "location fragment",
                "link",
                "refresh",
                "content-location",
                "set-cookie",
                "response json",
                "amz credential",
                "amz signature",
                "multipart password",
                "deep json token",
                "params password",
                "location access_token",
            )
        )
    }
    deep = '{"a": ' * 200 + json.dumps({"token": c["deep json token"]}) + "}" * 200
    multipart = (
        f'--B\r\nContent-Disposition: form-data; name="password"\r\n\r\n{c["multipart password"]}\r\n'
        '--B\r\nContent-Disposition: form-data; name="file"; filename="a.txt"\r\n\r\nhello\r\n--B--\r\n'
    )

    def entry(i, method, url, status, req_headers=(), resp_headers=(), post=None, content=None):
        return {
            "startedDateTime": f"2026-06-01T10:00:0{i}Z",
            "request": {
                "method": method,
                "url": url,
                "httpVersion": "HTTP/1.1",
                "headers": [{"name": n, "value": v} for n, v in req_headers],
                **({"postData": post} if post else {}),
            },
            "response": {
                "status": status,
                "statusText": "",
                "headers": [{"name": n, "value": v} for n, v in resp_headers],
                "content": content or {"size": 0, "mimeType": "text/plain"},
            },
        }

    callback = f"https://app.test/cb?code={c['location code']}&state={c['location state']}"
    entries = [
        entry(
            0,
            "POST",
            "https://app.test/login?next="
            + quote(f"https://x.test/?access_token={c['nested access_token']}", safe=""),
            302,
            [
                ("Authorization", f"Bearer {c['authorization']}"),
                ("Cookie", f"sid={c['cookie']}"),
                ("Referer", f"https://app.test/home?id_token={c['referer id_token']}"),
                ("Content-Type", "text/plain"),
            ],
            [
                ("Location", f"{callback}#access_token={c['location fragment']}"),
                ("Link", f'<https://app.test/n?access_token={c["link"]}>; rel="next"'),
                ("Refresh", f"0; url=https://app.test/?token={c['refresh']}"),
                ("Content-Location", f"https://app.test/x?sig={c['content-location']}"),
                ("Set-Cookie", f"s={c['set-cookie']}; HttpOnly"),
            ],
            post={
                "mimeType": "text/plain",
                "text": json.dumps({"user": "u", "password": c["json password as text/plain"]}),
            },
        ),
        entry(
            1,
            "GET",
            callback,
            200,
            content={
                "size": 60,
                "mimeType": "application/json",
                "text": json.dumps({"access_token": c["response json"]}),
            },
        ),
        entry(
            2,
            "POST",
            f"https://s3.test/b/o?X-Amz-Credential={c['amz credential']}"
            f"&X-Amz-Signature={c['amz signature']}",
            307,
            [("Content-Type", "multipart/form-data; boundary=B")],
            [("Location", f"https://s3b.test/o?access_token={c['location access_token']}")],
            post={"mimeType": "multipart/form-data; boundary=B", "text": multipart},
        ),
        entry(
            3,
            "POST",
            "https://api.test/deep",
            200,
            [("Content-Type", "application/json")],
            post={"mimeType": "application/json", "text": deep},
        ),
        entry(
            4,
            "POST",
            "https://api.test/cut",
            200,
            [("Content-Type", "application/json")],
            post={
                "mimeType": "application/json",
                "text": json.dumps({"password": c["cut json password"], "pad": "p" * 5000}),
            },
        ),
        entry(
            5,
            "POST",
            "https://api.test/form",
            303,
            [],
            [("Location", "/done")],
            post={
                "mimeType": "application/x-www-form-urlencoded",
                "params": [
                    {"name": "user", "value": "u"},
                    {"name": "password", "value": c["params password"]},
                ],
            },
        ),
    ]
    path.write_text(
        json.dumps({"log": {"version": "1.2", "creator": {"name": "t", "version": "1"}, "entries": entries}})
    )
    return c


def store_bytes(db: Path) -> bytes:
    return b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))


def exports_of(db: Path, tmp_path: Path) -> dict[str, bytes]:
    out = {}
    for args in (
        ["findings"],
        ["findings", "-f", "json"],
        ["findings", "-f", "sarif"],
        ["findings", "-f", "junit"],
        ["findings", "-f", "markdown"],
        ["chains"],
        ["chains", "-f", "json"],
        ["clients"],
        ["clients", "-f", "json"],
        ["captures"],
        ["check", "--fail-on", "high"],
    ):
        done = run_cli(*args, "--db", str(db))
        assert done.returncode in (0, 1), (args, done.stderr)
        out[" ".join(args)] = (done.stdout + done.stderr).encode()
    html = tmp_path / f"{db.stem}.html"
    assert run_cli("findings", "-f", "html", "--db", str(db), "-o", str(html)).returncode == 0
    out["html"] = html.read_bytes()
    return out


def test_no_canary_of_a_har_reaches_the_store_or_any_export(tmp_path):
    """With --keep-bodies: what is stored is then a superset of the default (bodies too),
    through the same protection of headers and URLs."""
    har = tmp_path / "secrets.har"
    secrets = har_with_canaries(har)
    db = tmp_path / "s.db"
    done = run_cli("import-har", str(har), "--db", str(db), "--keep-bodies", "--body-cap", "200")
    assert done.returncode == 0, done.stderr
    assert leaks(store_bytes(db), secrets) == []
    for name, blob in exports_of(db, tmp_path).items():
        assert leaks(blob, secrets) == [], name
    chains = json.loads(run_cli("chains", "-f", "json", "--db", str(db)).stdout)
    assert any(h["followed"] for c in chains for h in c["hops"])  # protected alike, the hops still link
    import sqlite3

    kept = sqlite3.connect(db).execute("select req_body from exchanges where req_body is not null").fetchall()
    assert kept and all(len(raw) <= 200 for (raw,) in kept)


def test_no_canary_of_a_flow_dump_reaches_the_store_or_any_export(tmp_path):
    from mitmproxy import io as mio
    from mitmproxy.test import tflow

    secrets = {
        n: canary(i)
        for i, n in enumerate(("url", "authorization", "referer", "location", "fragment", "body", "nested"))
    }
    flow = tflow.tflow(resp=True)
    flow.request.url = f"http://app.test/login?access_token={secrets['url']}&next=" + quote(
        f"https://x/?token={secrets['nested']}", safe=""
    )
    flow.request.headers["Authorization"] = (
        f"Basic {base64.b64encode(('user:' + secrets['authorization']).encode()).decode()}"
    )
    flow.request.headers["Referer"] = f"http://app.test/home?id_token={secrets['referer']}"
    flow.request.method = "POST"
    flow.request.content = json.dumps({"password": secrets["body"]}).encode()
    flow.request.headers["Content-Type"] = "text/plain"
    flow.response.status_code = 302
    flow.response.headers["Location"] = f"/cb?code={secrets['location']}#access_token={secrets['fragment']}"
    dump = tmp_path / "run.mitm"
    with dump.open("wb") as fh:
        mio.FlowWriter(fh).add(flow)
    db = tmp_path / "f.db"
    assert run_cli("import-flows", str(dump), "--db", str(db), "--keep-bodies").returncode == 0
    assert leaks(store_bytes(db), secrets) == []
    for name, blob in exports_of(db, tmp_path).items():
        assert leaks(blob, secrets) == [], name


PROXY_NAMES = (
    "query",
    "fragment location",
    "location code",
    "bearer",
    "referer",
    "json body",
    "form body",
    "multipart body",
    "basic",
    "nested",
    "deep json",
)


def proxy_requests(secrets: dict[str, str]) -> list[tuple[str, str, dict[str, str], bytes]]:
    """Requests for a real proxy (tests/upstream.py paths) carrying the PROXY_NAMES canaries;
    test_secret_canaries sends them through `redirect-audit proxy` with its own."""
    target = quote(
        f"/echo/canary?code={secrets['location code']}#access_token={secrets['fragment location']}",
        safe="",
    )
    return [
        (
            "POST",
            f"/r/307/canary?to={target}&access_token={secrets['query']}&next="
            + quote(quote(f"https://x/?token={secrets['nested']}", safe=""), safe=""),
            {
                "Authorization": f"Bearer {secrets['bearer']}",
                "Content-Type": "text/plain",
                "Referer": f"http://app.test/?id_token={secrets['referer']}",
            },
            json.dumps({"password": secrets["json body"]}).encode(),
        ),
        (
            "POST",
            "/r/303/form",
            {
                "Content-Type": "application/x-www-form-urlencoded",
                "Authorization": "Basic " + base64.b64encode(f"user:{secrets['basic']}".encode()).decode(),
            },
            f"user=u&password={secrets['form body']}".encode(),
        ),
        (
            "POST",
            "/echo/multi",
            {"Content-Type": "multipart/form-data; boundary=B"},
            f'--B\r\nContent-Disposition: form-data; name="password"\r\n\r\n{secrets["multipart body"]}\r\n'
            f"--B--\r\n".encode(),
        ),
        # 1,000 levels deep: redacting it must not recurse (it once cost the flow its record)
        (
            "POST",
            "/echo/deep",
            {"Content-Type": "application/json"},
            ('{"a": ' * 1000 + json.dumps({"token": secrets["deep json"]}) + "}" * 1000).encode(),
        ),
    ]


def test_a_new_store_its_wal_and_output_files_are_readable_by_their_owner_only(tmp_path):
    db = tmp_path / "private.db"
    har = Path(__file__).parent / "fixtures" / "rules" / "md-307-post-to-get.har"
    assert run_cli("import-har", str(har), "--db", str(db)).returncode == 0
    import sqlite3

    holder = sqlite3.connect(db)  # keep the WAL and -shm in existence while we look
    holder.execute("select count(*) from exchanges").fetchall()
    report = tmp_path / "out.json"
    assert run_cli("findings", "-f", "json", "--db", str(db), "-o", str(report)).returncode == 0
    baseline = tmp_path / "baseline.json"
    assert run_cli("check", "--db", str(db), "--write-baseline", str(baseline)).returncode == 0
    exported = tmp_path / "contract" / "tests"  # two levels that do not exist yet
    assert run_cli("export-tests", "--db", str(db), "-o", str(exported)).returncode == 0
    (module,) = exported.glob("test_*.py")
    for path in [db, *tmp_path.glob("private.db-*"), report, baseline, module]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for directory in (exported, exported.parent):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
    assert list(tmp_path.glob("private.db-wal"))
    holder.close()


def test_the_key_can_live_outside_the_store(tmp_path):
    db, key_file = tmp_path / "shared.db", tmp_path / "team.key"
    har = Path(__file__).parent / "fixtures" / "rules" / "cc-authorization-other-host.har"
    done = run_cli("import-har", str(har), "--db", str(db), "--key-file", str(key_file))
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    import sqlite3

    meta = dict(sqlite3.connect(db).execute("select key, value from meta").fetchall())
    assert "hmac_key" not in meta and len(meta["hmac_key_id"]) == 16
    assert key_file.read_text().strip() not in store_bytes(db).decode("latin-1")
    # reading needs no key; the rules compare fingerprints made with it
    assert "credential-cross-origin" in run_cli("findings", "--db", str(db)).stdout
    # writing does
    other = Path(__file__).parent / "fixtures" / "rules" / "md-307-post-to-get.har"
    refused = run_cli("import-har", str(other), "--db", str(db), env={"REDIRECT_AUDIT_KEY_FILE": ""})
    assert refused.returncode == 2
    assert (
        f"store {db} keeps its key outside it: give its key file with --key-file or $REDIRECT_AUDIT_KEY_FILE"
    ) in refused.stderr
    wrong = tmp_path / "wrong.key"
    wrong.write_text("ab" * 32 + "\n")
    mismatch = run_cli("import-har", str(other), "--db", str(db), "--key-file", str(wrong))
    assert mismatch.returncode == 2 and f"key file {wrong} is not the key of store {db}" in mismatch.stderr
    assert (
        run_cli(
            "import-har", str(other), "--db", str(db), env={"REDIRECT_AUDIT_KEY_FILE": str(key_file)}
        ).returncode
        == 0
    )


def test_the_proxy_keeps_the_store_url_off_the_command_line():
    from analyzer.proxy import ProxyPlan

    plan = ProxyPlan(db_url="postgresql+psycopg://auditor:s3cret@127.0.0.1/audit", key_file="/tmp/k")
    argv = plan.argv()
    assert not any("s3cret" in a or "redirect_audit_db" in a for a in argv)
    assert "flow_detail=0" in argv
    env = plan.environ()
    assert (
        env["REDIRECT_AUDIT_DB"].endswith("s3cret@127.0.0.1/audit")
        and env["REDIRECT_AUDIT_KEY_FILE"] == "/tmp/k"
    )
    assert "s3cret" not in plan.banner() and re.search(r"auditor:\*\*\*@", plan.banner())


# ---- secrets by the words of their names and by their shape (names no list has) -------------

WORDY = {  # (where, name) -> nothing: every one is a secret nobody listed by name
    ("query", "x-signature"),
    ("query", "auth_key"),
    ("query", "secretToken"),
    ("query", "api-token"),
    ("query", "client-secret"),
    ("query", "sas_token"),
    ("query", "private_token"),
    ("query", "passcode"),
    ("header", "Token"),
    ("header", "X-Token"),
    ("header", "X-Session-Token"),
    ("header", "X-Shopify-Access-Token"),
    ("json", "clientSecret"),
    ("json", "pass\\u0077ord"),
    ("form", "pass%77ord"),
    ("xml", "Password"),
    ("graphql", "password"),
}


def shaped_canaries() -> dict[str, str]:
    return {
        "jwt under q": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0." + canary(90),
        "aws key id": "AKIA" + uuid.uuid4().hex[:16].upper(),
        "pem": "-----BEGIN PRIVATE KEY-----\nMIIE" + canary(91) + "\n-----END PRIVATE KEY-----",
        "userinfo password": canary(92),
        "location userinfo": canary(93),
        "authentication bearer": canary(94),
        "www-authenticate token": canary(95),
        "nested json secret": canary(96),
    }


def har_with_wordy_canaries(path: Path) -> dict[str, str]:
    c = {f"{where} {name}": canary(100 + i) for i, (where, name) in enumerate(sorted(WORDY))}
    c.update(shaped_canaries())
    query = "&".join(f"{name}={c['query ' + name]}" for where, name in sorted(WORDY) if where == "query")
    url = f"https://user:{c['userinfo password']}@api.test/pay?{query}&q={c['jwt under q']}&id=42"
    headers = [
        {"name": name, "value": c[f"header {name}"]} for where, name in sorted(WORDY) if where == "header"
    ]
    headers.append({"name": "Authentication", "value": f"Bearer {c['authentication bearer']}"})
    headers.append({"name": "X-Access-Key-Id", "value": c["aws key id"]})
    body = (
        '{"user": "u", "clientSecret": "'
        + c["json clientSecret"]
        + '", "pass\\u0077ord": "'
        + c["json pass\\u0077ord"]
        + '", "auth": {"secret": "'
        + c["nested json secret"]
        + '"}, "key_pem": '
        + json.dumps(c["pem"])
        + ', "query": '
        + json.dumps('mutation { login(user: "u", password: "' + c["graphql password"] + '") { ok } }')
        + "}"
    )

    def entry(i, method, target, status, req_headers, resp_headers, post=None):
        return {
            "startedDateTime": f"2026-06-01T10:00:0{i}Z",
            "request": {
                "method": method,
                "url": target,
                "httpVersion": "HTTP/1.1",
                "headers": req_headers,
                **({"postData": post} if post else {}),
            },
            "response": {
                "status": status,
                "statusText": "",
                "headers": resp_headers,
                "content": {"size": 0, "mimeType": "text/plain"},
            },
        }

    entries = [
        entry(
            0,
            "POST",
            url,
            307,
            [*headers, {"name": "Content-Type", "value": "application/json"}],
            [{"name": "Location", "value": f"https://u:{c['location userinfo']}@api2.test/pay"}],
            {"mimeType": "application/json", "text": body},
        ),
        entry(
            1,
            "POST",
            "https://api2.test/pay",
            401,
            [{"name": "Content-Type", "value": "application/json"}],
            [
                {
                    "name": "WWW-Authenticate",
                    "value": f'Bearer realm="api", token="{c["www-authenticate token"]}"',
                }
            ],
            {"mimeType": "application/json", "text": body},
        ),
        entry(
            2,
            "POST",
            "https://api.test/form",
            303,
            [],
            [{"name": "Location", "value": "/xml"}],
            {
                "mimeType": "application/x-www-form-urlencoded",
                "text": f"user=u&pass%77ord={c['form pass%77ord']}&next_page_token=page-2",
            },
        ),
        entry(
            3,
            "POST",
            "https://api.test/xml",
            200,
            [{"name": "Content-Type", "value": "application/xml"}],
            [],
            {
                "mimeType": "application/xml",
                "text": f"<login><user>u</user><Password>{c['xml Password']}</Password></login>",
            },
        ),
    ]
    path.write_text(
        json.dumps({"log": {"version": "1.2", "creator": {"name": "t", "version": "1"}, "entries": entries}})
    )
    return c


def test_secrets_under_names_no_list_has_and_by_shape_never_reach_any_artefact(tmp_path):
    """With --keep-bodies, what is stored is a superset of the default: bodies as well."""
    har = tmp_path / "wordy.har"
    secrets = har_with_wordy_canaries(har)
    db = tmp_path / "w.db"
    done = run_cli("import-har", str(har), "--db", str(db), "--keep-bodies")
    assert done.returncode == 0, done.stderr
    assert leaks(store_bytes(db), secrets) == []
    for name, blob in exports_of(db, tmp_path).items():
        assert leaks(blob, secrets) == [], name
    parquet, tests = tmp_path / "parquet", tmp_path / "contract"
    assert run_cli("export", str(parquet), "--db", str(db)).returncode == 0
    assert run_cli("export-tests", "--db", str(db), "-o", str(tests)).returncode == 0
    for path in [*parquet.rglob("*"), *tests.rglob("*")]:
        if path.is_file():
            assert leaks(path.read_bytes(), secrets) == [], path
    import sqlite3

    with sqlite3.connect(db) as conn:
        stored = conn.execute("select url, request_headers, req_body from exchanges order by seq").fetchall()
    assert "id=42" in stored[0][0] and "user:hmac:" in stored[0][0]  # ordinary values stay readable
    assert b"next_page_token=page-2" in stored[2][2]  # a page token is no secret
    body = json.loads(stored[0][2])  # redacted JSON is still JSON
    assert body["user"] == "u" and body["auth"].startswith("hmac:")


def test_a_flow_dump_with_secrets_under_new_names_leaks_nothing(tmp_path):
    from mitmproxy import io as mio
    from mitmproxy.test import tflow

    secrets = {
        n: canary(200 + i)
        for i, n in enumerate(("x-signature", "X-Session-Token", "userinfo", "clientSecret"))
    }
    secrets["jwt"] = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0." + canary(210)
    flow = tflow.tflow(resp=True)
    flow.request.url = (
        f"http://u:{secrets['userinfo']}@app.test/img?x-signature={secrets['x-signature']}&q={secrets['jwt']}"
    )
    flow.request.headers["X-Session-Token"] = secrets["X-Session-Token"]
    flow.request.method = "POST"
    flow.request.content = json.dumps({"clientSecret": secrets["clientSecret"]}).encode()
    flow.request.headers["Content-Type"] = "application/json"
    dump = tmp_path / "new.mitm"
    with dump.open("wb") as fh:
        mio.FlowWriter(fh).add(flow)
    db = tmp_path / "nf.db"
    assert run_cli("import-flows", str(dump), "--db", str(db), "--keep-bodies").returncode == 0
    assert leaks(store_bytes(db), secrets) == []  # every output reads the store (the HAR test reads them all)
    for args in (["chains", "-f", "json"], ["findings", "-f", "json"]):
        assert leaks(run_cli(*args, "--db", str(db)).stdout.encode(), secrets) == [], args
