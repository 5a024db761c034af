"""The store as tidy pandas DataFrames, for notebooks and reports.

Every function takes a store URL or path (None: `$REDIRECT_AUDIT_DB`, else
`./redirect-audit.db`) and only reads. Large tables are read in chunks of selected
columns, with repeated strings as categoricals, so a store of a million exchanges fits
comfortably in memory. Timestamps are timezone-aware UTC.

    exchanges()            one row per request/response (no header lists, no bodies)
    hops()                 one row per hop: what changed between the redirect and its follow-up
    chains()               one row per chain: root, client, length, end, method path
    findings()             one row per finding (the JSON contract's fields)
    clients()              per-client conformance: one row per (client, status, method) met, what
                           the client did on the follow-up next to what RFC 9110 / Fetch prescribe
    client_summary()       one row per client: User-Agent family, traffic, redirects met
    temporary_redirects()  one row per temporary source -> target: statuses, first/last seen,
                           count, cache headers, age
"""

from __future__ import annotations

import json
from typing import Any

import pandas as pd
from sqlalchemy import Select, case, create_engine, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import aliased

from analyzer import conformance
from analyzer.clientnames import client_name
from analyzer.conformance import body_change
from analyzer.conformance import (
    prescribed_method as prescribed_method,
)  # re-exported: notebooks and tests read it here
from analyzer.current import ensure_current
from analyzer.detectors.base import DEFAULT_STALE_AFTER_DAYS
from analyzer.detectors.verdict import hop_verdict
from analyzer.model import DATE_RANGE, REDIRECT_STATUSES, header
from analyzer.report import finding_records
from analyzer.store import captures
from analyzer.store import chains as chains_t
from analyzer.store import exchanges as ex_t
from analyzer.store import hops as hops_t
from analyzer.storeread import open_reader, resolve_db_url, sqlite_file
from analyzer.urls import origin_of

CHUNK = 100_000
EXCHANGE_COLUMNS = (
    "id",
    "capture_id",
    "seq",
    "client",
    "connection",
    "started_at",
    "method",
    "url_norm",
    "status",
    "location_resolved",
    "synthetic",
    "error",
    "req_body_len",
    "req_body_sha256",
    "req_content_type",
    "resp_body_len",
    "user_agent",
)
CATEGORIES = ("client", "method", "req_content_type", "user_agent", "host")
TEMPORARY = (302, 303, 307)


def engine(db: str | None = None) -> Engine:
    """A read-only engine on an existing store whose results are current.

    A store whose exchanges changed since its last analysis is analyzed again first (one
    line on stderr says so); then SQLite is opened with mode=ro, so reading a frame never
    changes the store. A missing store is refused (StoreMissing), never created.
    """
    ensure_current(db)
    url = resolve_db_url(db)
    path = sqlite_file(url)
    if path is not None:
        url = f"sqlite:///file:{path}?mode=ro&uri=true"
    return create_engine(url)


def _utc(series: pd.Series) -> pd.Series:
    # A moment pandas cannot hold (before 1677, after 2262) is NaT; the store keeps the number.
    seconds = pd.to_numeric(series, errors="coerce")
    seconds = seconds.where(seconds.between(*DATE_RANGE))
    return pd.to_datetime(seconds, unit="s", utc=True)


def _read(stmt: Select[Any], db: str | None) -> pd.DataFrame:
    eng = engine(db)
    try:
        with eng.connect() as conn:
            parts = list(pd.read_sql(stmt, conn, chunksize=CHUNK))
    finally:
        eng.dispose()
    return (
        pd.concat(parts, ignore_index=True)
        if parts
        else pd.DataFrame(columns=[c.name for c in stmt.selected_columns])
    )


def _categorize(frame: pd.DataFrame) -> pd.DataFrame:
    for name in CATEGORIES:
        if name in frame:
            frame[name] = frame[name].astype("category")
    return frame


def exchanges(db: str | None = None, columns: tuple[str, ...] = EXCHANGE_COLUMNS) -> pd.DataFrame:
    frame = _read(select(*(ex_t.c[name] for name in columns)).order_by(ex_t.c.id), db)
    if "started_at" in frame:
        frame["started"] = _utc(frame.pop("started_at"))
    if "url_norm" in frame:  # normalized URLs: scheme://host[:port]/..., no userinfo left to strip
        frame["host"] = frame["url_norm"].str.extract(r"^[^:/?#]+://(?:[^@/?#]*@)?([^/?#]*)", expand=False)
    return _categorize(frame)


def hops(db: str | None = None) -> pd.DataFrame:
    """Each hop with both sides: methods, URLs and origins, bodies, credentials, verdict."""
    a, b = aliased(ex_t), aliased(ex_t)
    stmt = (
        select(
            hops_t.c.chain_id,
            hops_t.c.idx.label("hop"),
            hops_t.c.status,
            hops_t.c.link,
            hops_t.c.confidence,
            a.c.client,
            a.c.user_agent,
            a.c.started_at,
            a.c.method.label("method_before"),
            b.c.method.label("method_after"),
            a.c.url_norm.label("from_url"),
            func.coalesce(b.c.url_norm, a.c.location_resolved).label("to_url"),
            a.c.req_body_len.label("body_len_before"),
            b.c.req_body_len.label("body_len_after"),
            a.c.req_body_sha256.label("body_sha256_before"),
            b.c.req_body_sha256.label("body_sha256_after"),
            a.c.req_content_type.label("content_type_before"),
            b.c.req_content_type.label("content_type_after"),
            a.c.request_headers.label("headers_before"),
            b.c.request_headers.label("headers_after"),
            hops_t.c.to_exchange_id,
            captures.c.creator,
            captures.c.browser,
            captures.c.source,
        )
        .join(a, a.c.id == hops_t.c.from_exchange_id)
        .outerjoin(b, b.c.id == hops_t.c.to_exchange_id)
        .join(captures, captures.c.id == a.c.capture_id)
        .order_by(hops_t.c.chain_id, hops_t.c.idx)
    )
    frame = _read(stmt, db)
    frame["followed"] = frame.pop("to_exchange_id").notna()
    frame["started"] = _utc(frame.pop("started_at"))
    frame["from_origin"] = frame["from_url"].map(lambda u: origin_of(u) if isinstance(u, str) and u else None)
    frame["to_origin"] = frame["to_url"].map(lambda u: origin_of(u) if isinstance(u, str) and u else None)
    frame["cross_origin"] = frame["from_origin"] != frame["to_origin"]
    frame["https_to_http"] = frame["from_url"].str.startswith("https:") & frame["to_url"].fillna(
        ""
    ).str.startswith("http:")
    frame["body_headers_after"] = frame["headers_after"].map(conformance.body_headers_of)
    for side in ("before", "after"):
        frame[f"auth_{side}"] = frame[f"headers_{side}"].map(conformance.auth_fingerprints)
        creds = frame.pop(f"headers_{side}").map(conformance.credential_fingerprints)
        frame[f"credentials_{side}"] = creds
    frame["auth"] = conformance.auth_outcomes(  # kept / dropped / replaced / re-added, or None
        frame["chain_id"], frame["followed"], frame["auth_before"], frame["auth_after"]
    )
    frame = frame.drop(columns=["auth_before", "auth_after"])
    frame["credentials_forwarded"] = [
        sorted(set(before) & set(after)) if followed else []
        for before, after, followed in zip(
            frame["credentials_before"], frame["credentials_after"], frame["followed"], strict=False
        )
    ]
    frame["credentials_cross_origin"] = [
        forwarded if cross else []
        for forwarded, cross in zip(frame["credentials_forwarded"], frame["cross_origin"], strict=False)
    ]
    frame["body_after"] = [
        body_change(f, lb, la, sb, sa)
        for f, lb, la, sb, sa in zip(
            frame["followed"],
            frame["body_len_before"],
            frame["body_len_after"],
            frame["body_sha256_before"],
            frame["body_sha256_after"],
            strict=False,
        )
    ]
    frame["client_name"] = [
        client_name(ua, creator, browser, source)
        for ua, creator, browser, source in zip(
            frame["user_agent"], frame["creator"], frame["browser"], frame["source"], strict=False
        )
    ]
    on_hop = _hop_findings(db)
    frame["verdict"] = [
        hop_verdict(
            bool(followed),
            [
                (rule_id, severity, evidence)
                for _, rule_id, severity, evidence in on_hop.get((int(c), int(h)), ())
            ],
            bool(pd.notna(length) and length > 0),
        )
        for c, h, followed, length in zip(
            frame["chain_id"], frame["hop"], frame["followed"], frame["body_len_before"], strict=False
        )
    ]
    return _categorize(frame)


def chains(db: str | None = None) -> pd.DataFrame:
    frame = hops(db)
    if frame.empty:
        return pd.DataFrame(
            columns=[
                "chain_id",
                "client",
                "root_url",
                "final_url",
                "hops",
                "end",
                "methods",
                "started",
                "cross_origin",
            ]
        )
    ends = _read(select(chains_t.c.id.label("chain_id"), chains_t.c.end_reason.label("end")), db)
    grouped = frame.groupby("chain_id", observed=True, sort=True)
    out = pd.DataFrame(
        {
            "client": grouped["client"].first(),
            "client_name": grouped["client_name"].first(),
            "root_url": grouped["from_url"].first(),
            "final_url": grouped["to_url"].last(),
            "hops": grouped.size(),
            "started": grouped["started"].min(),
            "cross_origin": grouped["cross_origin"].any(),
        }
    )
    out["methods"] = pd.Series(_method_paths(frame), dtype="str").reindex(out.index)
    return out.reset_index().merge(ends, on="chain_id", how="left")


def _method_paths(frame: pd.DataFrame) -> dict[int, str]:
    """'POST -> GET -> GET' per chain (hops come sorted by chain and index)."""
    paths: dict[int, list[str]] = {}
    for chain_id, before, after in zip(
        frame["chain_id"],
        frame["method_before"].astype(str),
        frame["method_after"].astype(object),
        strict=False,
    ):
        path = paths.get(chain_id)
        if path is None:
            path = paths[chain_id] = [before]
        path.append(after if isinstance(after, str) else "-")
    return {chain_id: " -> ".join(path) for chain_id, path in paths.items()}


def findings(db: str | None = None) -> pd.DataFrame:
    ensure_current(db)
    with open_reader(db) as reader:
        records = finding_records(reader)
    frame = pd.DataFrame.from_records(
        records,
        columns=[
            "rule",
            "rule_id",
            "severity",
            "confidence",
            "message",
            "chain_id",
            "hop",
            "status",
            "followed",
            "method_before",
            "method_after",
            "from_url",
            "to_url",
            "client",
            "observed_at",
            "evidence",
            "fingerprint",
            "capture",
        ],
    )
    frame["observed_at"] = pd.to_datetime(frame["observed_at"], utc=True, format="ISO8601", errors="coerce")
    order = ["info", "low", "medium", "high"]
    frame["severity"] = pd.Categorical(frame["severity"], categories=order, ordered=True)
    return frame


CONFORMANCE_COLUMNS = conformance.COLUMNS


def clients(db: str | None = None) -> pd.DataFrame:
    """Per-client redirect conformance, for an SDK maintainer to read their client off a
    capture: `analyzer.conformance.client_rows` as a frame (its doc says each column)."""
    ensure_current(db)
    with open_reader(db) as reader:
        return pd.DataFrame(conformance.client_rows(reader), columns=CONFORMANCE_COLUMNS)


def _hop_findings(db: str | None) -> conformance.HopFindings:
    with open_reader(db) as reader:
        return conformance.hop_findings(reader)


def client_summary(db: str | None = None) -> pd.DataFrame:
    """One row per client: how it is known, how much it sent, what redirects it met."""
    stmt = (
        select(
            ex_t.c.client,
            ex_t.c.user_agent,
            captures.c.creator,
            captures.c.browser,
            captures.c.source,
            func.count().label("exchanges"),
            func.min(ex_t.c.started_at).label("first_seen"),
            func.max(ex_t.c.started_at).label("last_seen"),
            func.sum(case((ex_t.c.status.in_(REDIRECT_STATUSES), 1), else_=0)).label("redirects"),
        )
        .join(captures, captures.c.id == ex_t.c.capture_id)
        .group_by(ex_t.c.client, ex_t.c.user_agent, captures.c.creator, captures.c.browser, captures.c.source)
    )
    raw = _read(stmt, db)
    if raw.empty:
        return pd.DataFrame(
            columns=[
                "client",
                "client_name",
                "user_agent",
                "exchanges",
                "redirects",
                "first_seen",
                "last_seen",
                "hops_followed",
                "deviations",
            ]
        )
    raw["client_name"] = [
        client_name(ua, c, b, s)
        for ua, c, b, s in zip(raw["user_agent"], raw["creator"], raw["browser"], raw["source"], strict=False)
    ]
    # The name and User-Agent a client is known by: those of most of its exchanges.
    ranked = raw.sort_values(
        ["client", "exchanges", "client_name"], ascending=[True, False, True], kind="stable"
    )
    grouped = ranked.groupby("client", sort=True)
    per = pd.DataFrame(
        {
            "client_name": grouped["client_name"].first(),
            "user_agent": grouped["user_agent"].first(),
            "exchanges": grouped["exchanges"].sum(),
            "redirects": grouped["redirects"].sum(),
            "first_seen": grouped["first_seen"].min(),
            "last_seen": grouped["last_seen"].max(),
        }
    ).reset_index()
    per["first_seen"], per["last_seen"] = _utc(per["first_seen"]), _utc(per["last_seen"])
    hop_frame = hops(db)
    if not hop_frame.empty:
        hop_frame["client"] = hop_frame["client"].astype(str)
        counts = hop_frame.groupby("client", observed=True).agg(
            hops_followed=("followed", "sum"), deviations=("verdict", lambda v: int((v == "deviated").sum()))
        )
        per = per.merge(counts, left_on="client", right_index=True, how="left")
    else:
        per["hops_followed"], per["deviations"] = 0, 0
    return per.fillna({"hops_followed": 0, "deviations": 0}).astype({"hops_followed": int, "deviations": int})


def temporary_redirects(
    db: str | None = None, stale_after_days: float = DEFAULT_STALE_AFTER_DAYS
) -> pd.DataFrame:
    """One row per temporary redirect source -> target, across every capture in the store,
    judged by the stale-temporary-redirect rule itself (its Sightings and judge()): what it
    counts as temporary, how long caches may replay it (`cache_lifetime_s`: 0 for a
    `no-store` or `no-cache` answer whatever its max-age), and `stale` with the rule's
    `why` when it would fire."""
    from analyzer.detectors import stale_temporary_redirect as stale
    from analyzer.detectors.base import DetectorOptions
    from analyzer.model import Exchange

    stmt = select(
        ex_t.c.url_norm,
        ex_t.c.location_resolved,
        ex_t.c.location,
        ex_t.c.status,
        ex_t.c.method,
        ex_t.c.started_at,
        ex_t.c.response_headers,
        ex_t.c.synthetic,
    ).where(ex_t.c.status.in_(TEMPORARY))
    raw = _read(stmt, db)
    columns = [
        "source",
        "target",
        "statuses",
        "count",
        "first_seen",
        "last_seen",
        "age_days",
        "cache_control",
        "expires",
        "retry_after",
        "cache_lifetime_s",
        "stale",
        "why",
    ]
    groups: dict[tuple[str, str], tuple[stale.Sightings, list[list[tuple[str, str]]]]] = {}
    for source, resolved, location, status, method, started, text, synthetic in raw.itertuples(index=False):
        headers = [(str(n), str(v)) for n, v in json.loads(text)] if text else []
        ex = Exchange(
            capture_id=0,
            seq=0,
            method=str(method),
            url=str(source),
            url_norm=str(source),
            started_at=None if pd.isna(started) else float(started),
            status=int(status),
            location=location if isinstance(location, str) else None,
            location_resolved=resolved if isinstance(resolved, str) else None,
            response_headers=headers,
            synthetic=bool(synthetic),
        )
        target = ex.location_resolved or ex.location
        if not stale.is_temporary(ex) or target is None:
            continue
        sightings, seen = groups.setdefault((str(source), target), (stale.Sightings(), []))
        sightings.add(ex)
        seen.append(headers)
    options = DetectorOptions(stale_after_days=stale_after_days)
    rows = []
    for (source, target), (sightings, seen) in sorted(groups.items()):
        judged = stale.judge(source, target, sightings, options)
        first, last = sightings.first, sightings.last
        rows.append(
            {
                "source": source,
                "target": target,
                "statuses": sorted(sightings.statuses),
                "count": sightings.count,
                "first_seen": first,
                "last_seen": last,
                "age_days": (last - first) / 86400.0 if first is not None and last is not None else None,
                # the latest value each header had
                **{
                    column: next((header(h, name) for h in reversed(seen) if header(h, name)), None)
                    for column, name in (
                        ("cache_control", "cache-control"),
                        ("expires", "expires"),
                        ("retry_after", "retry-after"),
                    )
                },
                "cache_lifetime_s": sightings.lifetime,
                "stale": judged is not None,
                "why": judged[0] if judged is not None else None,
            }
        )
    out = pd.DataFrame(rows, columns=columns)
    out["first_seen"], out["last_seen"] = _utc(out["first_seen"]), _utc(out["last_seen"])
    return out
