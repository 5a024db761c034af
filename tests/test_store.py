"""The bulk insert behind every importer and the proxy's writer."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from analyzer.model import Body, Exchange
from analyzer.store import MULTI_ROW_LIMIT, add_capture, exchange_row, exchanges, write_exchanges


def rows(capture_id: int, n: int) -> list[tuple]:
    return [
        exchange_row(
            Exchange(
                capture_id=capture_id,
                seq=i,
                method="GET",
                url=f"http://a.test/{i}",
                url_norm=f"http://a.test/{i}",
                status=200 + i % 5,
                started_at=1.5 * i,
                request_headers=[("X-N", str(i))],
                response_body=Body(length=i, raw=b"\x00" * (i % 3)),
            )
        )
        for i in range(n)
    ]


@pytest.mark.parametrize("n", [1, 5, 137, MULTI_ROW_LIMIT - 1, MULTI_ROW_LIMIT, MULTI_ROW_LIMIT + 1, 457])
def test_every_row_is_stored_once_in_order_whatever_the_batch_size(store, n):
    with store.begin() as conn:
        capture = add_capture(conn, source="har")
        assert write_exchanges(conn, rows(capture, n)) == n
    with store.begin() as conn:
        got = conn.execute(
            select(
                exchanges.c.seq,
                exchanges.c.url,
                exchanges.c.status,
                exchanges.c.started_at,
                exchanges.c.request_headers,
                exchanges.c.resp_body_len,
                exchanges.c.resp_body,
            )
            .where(exchanges.c.capture_id == capture)
            .order_by(exchanges.c.id)
        ).all()
    assert [tuple(r) for r in got] == [
        (i, f"http://a.test/{i}", 200 + i % 5, 1.5 * i, f'[["X-N","{i}"]]', i, b"\x00" * (i % 3))
        for i in range(n)
    ]


def test_a_chain_listing_reads_one_state_of_the_store_while_an_analysis_commits(store):
    """`chains` reads hops and the exchanges they point at in separate queries; a test run's
    analysis committing in between (pytest -n 2: the other worker) left hops whose exchanges
    the listing had not read (KeyError)."""
    from conftest import RULE_FIXTURES

    from analyzer.analysis import analyze
    from analyzer.ingest import import_har
    from analyzer.report import chain_records
    from analyzer.storeread import open_reader

    import_har(store, RULE_FIXTURES / "md-307-post-to-get.har")
    analyze(store)
    with open_reader(store.url) as reader:
        before = chain_records(reader)
    with open_reader(store.url) as reader:
        read = reader.rows
        calls = []

        def rows_while_another_process_writes(sql: str, **params):
            calls.append(sql)
            found = read(sql, **params)
            if len(calls) == 1:  # between the listing's first and second query
                import_har(store, RULE_FIXTURES / "db-307-empty.har")
                analyze(store)
            return found

        reader.rows = rows_while_another_process_writes
        during = chain_records(reader)
    assert len(calls) > 2 and during == before
    with open_reader(store.url) as reader:
        assert len(chain_records(reader)) > len(before)  # and the new chains are there afterwards
