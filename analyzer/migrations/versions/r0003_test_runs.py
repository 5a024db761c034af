"""Schema version 3: the tests of a test run.

* test_runs: one row per test the pytest plugin saw (node id, worker, the client label
  its traffic was recorded under, the recorder's name, start, end, outcome), so each hop
  and finding can be put on the test during which it happened. A new table: nothing that is stored changes.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    big = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
    op.create_table(
        "test_runs",
        sa.Column("id", big, primary_key=True, autoincrement=True),
        sa.Column("session", sa.Text, nullable=False),
        sa.Column("nodeid", sa.Text, nullable=False),
        sa.Column("worker", sa.Text, nullable=False),
        sa.Column("client", sa.Text, nullable=False),
        sa.Column("recorder", sa.Text, nullable=False),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("ended_at", sa.Float),
        sa.Column("outcome", sa.Text),
    )
    op.create_index("ix_test_runs_client_start", "test_runs", ["client", "started_at"])
    op.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
