"""Schema version 5: analysis in time windows, and checkpoints to take it up again.

`analyze` reads a big client's traffic one time window at a time (analyzer.windows), so
the queries that load a window ask for a client's exchanges by start time:

* ix_exchanges_client_start (client, started_at): a window's writes, and the cut points;
* ix_exchanges_client_status_start (client, status, started_at) in place of
  ix_exchanges_client_status: a window's redirects;
* SQLite: ix_exchanges_client_url_start (client, url_norm, started_at) in place of
  ix_exchanges_client_url: a window's follow-ups (PostgreSQL keeps URLs out of B-trees,
  which refuse entries over 2,704 bytes, and plans that query from its statistics).

And analysis_checkpoints (client, boundary, state): where the analysis of a big client
can be taken up again when traffic is appended to it (analyzer.windows.snapshot). A new
table, empty until the next analysis. Nothing stored changes. On a big store the upgrade takes as long as building the
indexes (about 10 s per million exchanges on SQLite here).

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "analysis_checkpoints",
        sa.Column("client", sa.Text, primary_key=True),
        sa.Column("boundary", sa.Float, primary_key=True),
        sa.Column("state", sa.LargeBinary, nullable=False),
    )
    op.create_index("ix_exchanges_client_start", "exchanges", ["client", "started_at"])
    op.drop_index("ix_exchanges_client_status", table_name="exchanges")
    op.create_index("ix_exchanges_client_status_start", "exchanges", ["client", "status", "started_at"])
    if op.get_bind().dialect.name == "sqlite":
        op.drop_index("ix_exchanges_client_url", table_name="exchanges")
        op.create_index("ix_exchanges_client_url_start", "exchanges", ["client", "url_norm", "started_at"])
    op.execute("UPDATE meta SET value = '5' WHERE key = 'schema_version'")
