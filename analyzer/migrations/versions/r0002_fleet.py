"""Schema version 2: a store a fleet can share.

* PostgreSQL: ids, counts and body sizes become 64-bit (with their sequences); method,
  HTTP version, flow id and HAR format version become text without a length limit.
  SQLite stores every integer in 64 bits and enforces no VARCHAR length, so its tables
  are not rebuilt: only the declared types differ there, not what a column holds.
* Indexes for the analysis's queries: exchanges by status (the redirects), by URL (a
  stale redirect's sightings, the requests that may have followed a redirect; a hash
  index on PostgreSQL, whose B-tree refuses entries over 2,704 bytes) and by
  (client, status) (a batch of clients' redirects); chains and findings by client
  and findings by chain (replacing one client's results without scanning the rest),
  by redirect (a stale group's finding) and by severity (the totals);
  hops by their redirect (the chain a stale redirect was seen in).
* findings.client and analyzed_captures: what incremental analysis needs to redo only
  the clients with new exchanges.

Revision ID: 0002
Revises: 0001
"""

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

WIDER: dict[str, dict[str, sa.types.TypeEngine[Any]]] = {
    "captures": {"entries": sa.BigInteger(), "warnings": sa.BigInteger(), "format_version": sa.Text()},
    "exchanges": {
        "id": sa.BigInteger(),
        "seq": sa.BigInteger(),
        "flow_id": sa.Text(),
        "method": sa.Text(),
        "http_version": sa.Text(),
        "req_body_len": sa.BigInteger(),
        "resp_body_len": sa.BigInteger(),
    },
    "chains": {"id": sa.BigInteger(), "root_exchange_id": sa.BigInteger(), "hops": sa.BigInteger()},
    "hops": {
        "chain_id": sa.BigInteger(),
        "idx": sa.BigInteger(),
        "from_exchange_id": sa.BigInteger(),
        "to_exchange_id": sa.BigInteger(),
    },
    "findings": {
        "id": sa.BigInteger(),
        "chain_id": sa.BigInteger(),
        "hop": sa.BigInteger(),
        "from_exchange_id": sa.BigInteger(),
        "to_exchange_id": sa.BigInteger(),
    },
}
SEQUENCES = ("exchanges_id_seq", "chains_id_seq", "findings_id_seq")


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table, columns in WIDER.items():
            for name, type_ in columns.items():
                op.alter_column(table, name, type_=type_)
        for sequence in SEQUENCES:
            op.execute(f"ALTER SEQUENCE IF EXISTS {sequence} AS bigint")
    op.create_index("ix_exchanges_status", "exchanges", ["status"])
    op.create_index("ix_exchanges_url", "exchanges", ["url_norm"], postgresql_using="hash")
    op.create_index("ix_exchanges_client_status", "exchanges", ["client", "status"])
    if op.get_bind().dialect.name == "sqlite":
        op.create_index("ix_exchanges_client_url", "exchanges", ["client", "url_norm"])
    op.create_index("ix_findings_chain", "findings", ["chain_id"])
    op.create_index("ix_chains_client", "chains", ["client"])
    op.create_index("ix_hops_from_exchange", "hops", ["from_exchange_id"])
    op.add_column("findings", sa.Column("client", sa.Text()))
    op.create_index("ix_findings_client", "findings", ["client"])
    op.create_index("ix_findings_from", "findings", ["from_exchange_id"])
    op.create_index("ix_findings_severity", "findings", ["severity"])
    op.create_table(
        "analyzed_captures",
        sa.Column("capture_id", sa.Integer, primary_key=True),
        sa.Column("exchanges", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("max_seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite")),
    )
    op.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
