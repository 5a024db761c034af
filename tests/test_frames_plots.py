"""pandas frames and matplotlib figures over a real store (the bundled demo capture)."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import RULE_FIXTURES, run_cli
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from sqlalchemy import text

from analyzer import frames, plots
from analyzer.analysis import analyze
from analyzer.ingest import import_har
from analyzer.store import open_store


@pytest.fixture(scope="module")
def demo_db(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("frames") / "demo.db")
    store = open_store(path)
    for entry in sorted(resources.files("analyzer").joinpath("demo").iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".har"):
            with resources.as_file(entry) as har:
                import_har(store, har)
    analyze(store)
    store.close()
    return path


def test_exchanges_are_tidy(demo_db):
    ex = frames.exchanges(demo_db)
    assert len(ex) == 25
    assert str(ex["started"].dt.tz) == "UTC"
    assert isinstance(ex["method"].dtype, pd.CategoricalDtype) and isinstance(
        ex["host"].dtype, pd.CategoricalDtype
    )
    assert "request_headers" not in ex and "req_body" not in ex  # neither header lists nor bodies


def test_hops_say_what_changed_and_whether_it_conforms(demo_db):
    h = frames.hops(demo_db).set_index("from_url")
    put = h.loc["https://api.shop.example.test/v1/profile"]
    assert (put["status"], put["method_before"], put["method_after"], put["verdict"]) == (
        302,
        "PUT",
        "GET",
        "deviated",
    )
    assert put["credentials_forwarded"] and all("hmac:" in c for c in put["credentials_forwarded"])
    login = h.loc["https://shop.example.test/login"]
    assert (login["status"], login["method_after"], login["verdict"]) == (303, "GET", "as specified")
    failover = h.loc["https://api.shop.example.test/v1/orders"]
    assert (
        bool(failover["cross_origin"]) and failover["verdict"] == "deviated"
    )  # 307 followed without the body


VERDICT_CASES = [
    ("hg-303", "deviated"),  # HEAD came back as GET (head-to-get)
    ("md-303-post-to-get", "as specified"),
    ("md-301-post-to-get", "allowed, body lost"),  # historical, RA101 at low severity
    ("md-302-post-without-body", "allowed"),  # the same, and no body to lose
    ("md-302-put-to-get", "deviated"),
    ("md-307-post-to-get", "deviated"),
    ("db-307-not-captured", "as specified"),  # body not captured: no verdict against the client
    ("lw-put-307", "not followed"),
    ("cc-cookie-same-site", "as specified"),  # a cookie jar does this (RA105 at low)
    ("cc-cookie-other-port", "as specified"),  # cookies do not isolate ports
    ("cc-authorization-other-host", "deviated"),  # Fetch drops Authorization on another origin
    ("cd-same-origin-401", "deviated"),  # Fetch keeps every header on the same origin
]


@pytest.mark.parametrize("fixture, expected", VERDICT_CASES)
def test_verdicts_are_read_off_the_rules_findings(verdict_hops, fixture, expected):
    mine = verdict_hops[(verdict_hops["file"] == f"{fixture}.har") & (verdict_hops["hop"] == 0)]
    assert list(mine["verdict"]) == [expected]


@pytest.fixture(scope="module")
def verdict_hops(tmp_path_factory):
    """Every verdict fixture in one store (each HAR is its own client), with each hop's file."""
    db = str(tmp_path_factory.mktemp("verdicts") / "v.db")
    names = [f"{name}.har" for name, _ in VERDICT_CASES]
    assert run_cli("import-har", "--db", db, *[str(RULE_FIXTURES / n) for n in names]).returncode == 0
    hops = frames.hops(db)
    chains = json.loads(run_cli("chains", "-f", "json", "--db", db).stdout)
    files = {c["chain_id"]: Path(c["hops"][0]["from"]["capture"]["file"]).name for c in chains}
    return hops.assign(file=hops["chain_id"].map(files))


def test_chains_findings_clients(demo_db):
    ch = frames.chains(demo_db)
    assert len(ch) == 11 and set(ch["end"]) == {"final"}
    assert "PUT -> GET" in set(ch["methods"])
    fi = frames.findings(demo_db)
    assert len(fi) == 7 and fi["severity"].cat.ordered
    assert fi["severity"].value_counts().to_dict() == {"high": 3, "medium": 3, "low": 1, "info": 0}
    cl = frames.client_summary(demo_db).set_index("client")
    assert set(cl["client_name"]) == {"Firefox 133"}
    assert cl.loc["har:1/page_1", "deviations"] == 3 and cl.loc["har:1/page_1", "exchanges"] == 21


def test_temporary_redirects(demo_db):
    tr = frames.temporary_redirects(demo_db).set_index("source")
    docs = tr.loc["https://shop.example.test/docs"]
    assert docs["count"] == 2 and bool(docs["stale"]) and docs["age_days"] == pytest.approx(49.31, abs=0.01)
    assert "max-age=2592000" in tr.loc["https://shop.example.test/sale", "cache_control"]
    assert (
        "https://shop.example.test/login" not in tr.index
    )  # 303 after POST is Post/Redirect/Get, not a detour


@pytest.mark.parametrize("fixture, cacheable", [("st-no-store-307", False), ("st-cacheable-307", True)])
def test_temporary_redirects_are_judged_by_the_rule_itself(tmp_path, fixture, cacheable):
    """A 307 with `no-store` and a max-age is not cacheable: the rule says so, and the frame
    (and notebook 03's "cacheable" cell, which filters on cache_lifetime_s) says the same."""
    db = str(tmp_path / "cache.db")
    assert run_cli("import-har", "--db", db, str(RULE_FIXTURES / f"{fixture}.har")).returncode == 0
    (row,) = frames.temporary_redirects(db).itertuples()
    stale = [
        f for f in json.loads(run_cli("findings", "--db", db, "-f", "json").stdout) if f["rule_id"] == "RA104"
    ]
    assert "max-age" in row.cache_control
    assert (row.cache_lifetime_s > 0) is cacheable and bool(row.stale) is cacheable
    assert [f["message"] for f in stale] == ([row.why] if cacheable else [])


def test_frames_cannot_change_the_store(demo_db):
    with frames.engine(demo_db).connect() as conn:
        with pytest.raises(Exception, match="readonly"):
            conn.execute(text("DELETE FROM findings"))


def test_figures(demo_db):
    f, c, h, t = (
        frames.findings(demo_db),
        frames.chains(demo_db),
        frames.hops(demo_db),
        frames.temporary_redirects(demo_db),
    )
    fig = plots.findings_by_rule(f)
    assert isinstance(fig, Figure)
    assert sum(bar.get_width() for bar in fig.axes[0].patches) == 7
    lengths = plots.chain_lengths(c)
    assert sum(p.get_height() for p in lengths.axes[0].patches) == 11
    graph = plots.redirect_graph(h)
    colors = {
        tuple(np.round(p.get_edgecolor(), 2)) for p in graph.axes[0].patches if hasattr(p, "get_arrowstyle")
    }
    assert len(colors) == 2  # same-origin and cross-origin edges drawn apart
    timeline = plots.temporary_timeline(t)
    assert len(timeline.axes[0].get_yticklabels()) == len(t)
    heat = plots.conformance_heatmap(h)
    cells = {
        (round(p.get_x() + 0.5), round(p.get_y() + 0.5)): (to_hex(p.get_facecolor()), p.get_hatch())
        for p in heat.axes[0].patches
    }
    cases = [t.get_text() for t in heat.axes[0].get_xticklabels()]
    assert (
        len(cells)
        == len(cases)
        == h.assign(c=h["status"].astype(str) + h["method_before"].astype(str))["c"].nunique()
    )
    # the same verdict as the rules: POST -> GET on 302 is allowed but loses the body (RA101 low),
    # PUT -> GET on 302 deviates (RA101 medium), hatched as well as coloured
    assert cells[(cases.index("302 POST"), 0)] == (plots.VERDICT_STYLE["allowed, body lost"][0], "")
    assert cells[(cases.index("302 PUT"), 0)] == ("#d55e00", "////")
    assert cells[(cases.index("303 POST"), 0)][0] == plots.VERDICT_STYLE["as specified"][0]
    for figure in (fig, lengths, graph, timeline, heat):
        figure.savefig("/dev/null", format="png")


def test_figures_of_an_empty_store(tmp_path):
    db = str(tmp_path / "empty.db")
    open_store(db).close()
    for fig in (
        plots.findings_by_rule(frames.findings(db)),
        plots.chain_lengths(frames.chains(db)),
        plots.redirect_graph(frames.hops(db)),
        plots.temporary_timeline(frames.temporary_redirects(db)),
        plots.conformance_heatmap(frames.hops(db)),
    ):
        assert "no " in fig.axes[0].texts[0].get_text()


def test_the_chain_length_figure_draws_a_bar_per_length_not_per_hop():
    import pandas as pd

    chains = pd.DataFrame({"hops": [1] * 500 + [2] * 30 + [3] + [20_000]})
    fig = plots.chain_lengths(chains)
    ax = fig.axes[0]
    assert [round(p.get_height()) for p in ax.patches] == [500, 30, 1, 1]
    cap = plots.LENGTH_CAP
    assert [t.get_text() for t in ax.get_xticklabels()] == [*map(str, range(1, cap + 1)), f">{cap}"]
    assert [round(p.get_x() + p.get_width() / 2) for p in ax.patches] == [1, 2, 3, cap + 1]
    assert ax.get_yscale() == "log" and "longest: 20000" in ax.get_xlabel()


def test_one_chain_length_is_one_narrow_bar_on_an_integer_axis():
    import pandas as pd

    ax = plots.chain_lengths(pd.DataFrame({"hops": [1] * 55})).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "3", "4", "5"]
    assert [round(p.get_height()) for p in ax.patches] == [55] and ax.get_yscale() == "linear"


def test_labels_are_cut_in_the_middle_and_stay_distinct():
    assert plots.shorten("shop.example.test/api/v1/payments/checkout", 25) == "shop.example…nts/checkout"
    assert plots.shorten("short", 25) == "short"
    long_a = "tracker.example/collect/" + "a" * 40 + "/1-b4c2-31f9c84f5aba"
    long_b = "tracker.example/collect/" + "a" * 40 + "/2-b4c2-31f9c84f5aba"
    labels = plots.unique_labels([long_a, long_b, long_a], 30)
    assert len(set(labels)) == 3 and all(len(label) <= 34 for label in labels)
    assert all(label.startswith("tracker") or label.startswith("…") for label in labels)


def test_graph_nodes_are_origins_and_a_crowd_is_grouped():
    import pandas as pd

    hsts = pd.DataFrame(
        {
            "hop": [0],
            "from_origin": ["http://www.google-analytics.com"],
            "to_origin": ["https://www.google-analytics.com"],
            "cross_origin": [True],
            "https_to_http": [False],
        }
    )
    graph = plots.redirect_graph(hsts).axes[0]
    names = {t.get_text() for t in graph.texts}
    assert names == {"http://www.google-analytics.com", "https://www.google-analytics.com"}
    # an upgrade to HTTPS on one host is told apart from a move to another host
    arrows = [p for p in graph.patches if hasattr(p, "get_arrowstyle")]
    assert [to_hex(p.get_edgecolor()) for p in arrows] == ["#56b4e9"]
    many = pd.DataFrame(
        {
            "hop": range(60),
            "from_origin": ["https://hub.test"] * 60,
            "to_origin": [f"https://cdn{i}.test:8443" for i in range(60)],
            "cross_origin": [True] * 60,
            "https_to_http": [False] * 60,
        }
    )
    fig = plots.redirect_graph(many, max_hosts=16)
    names = [t.get_text() for t in fig.axes[0].texts]
    assert len(names) == 17 and "45 other origins" in names and "https://cdn0.test:8443" in names


def test_the_conformance_table_says_what_each_client_did_with_credentials(db_path):
    """Per client: Authorization kept, dropped, replaced or re-added on same-origin and
    cross-origin follow-ups, next to Fetch (kept on the same origin, dropped on another)."""
    names = [
        "cd-same-origin.har",
        "cd-kept.har",
        "cd-other-host.har",
        "cd-reauthenticated.har",
        "cd-headers-unknown.har",
        "cc-dropped-then-back.har",
    ]
    done = run_cli("import-har", *[str(RULE_FIXTURES / n) for n in names], "--db", db_path)
    assert done.returncode == 0, done.stderr
    rows = {
        (r["client_name"], r["status"]): r
        for r in json.loads(run_cli("clients", "-f", "json", "--db", db_path).stdout)
    }
    fixture_client = rows[("fixture-client 1", 307)]  # cd-same-origin (dropped), cd-kept, cd-headers-unknown
    assert fixture_client["auth_same_origin"] == "dropped (1), kept (1)"
    assert fixture_client["verdict"] == "deviated" and fixture_client["rules"] == ["credential-dropped"]
    other = rows[
        ("fixture-client 1", 302)
    ]  # dropped to another host (as Fetch does), replaced by a new token
    assert other["auth_cross_origin"] == "dropped (1), replaced (1)" and other["auth_same_origin"] == "-"
    assert other["verdict"] == "as specified"
    back = rows[("redirect-audit fixtures 1", 302)]  # not known on hop 0 (no headers kept), re-added on hop 1
    assert back["auth_same_origin"] == "-" and back["auth_cross_origin"] == "re-added"
    table = run_cli("clients", "--db", db_path).stdout
    assert "dropped (1), kept (1) [Fetch: kept]" in table
    assert "re-added [Fetch: dropped]" in table
    assert "auth same-origin" in table and "auth x-origin" in table
