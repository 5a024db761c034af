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
