"""Schema version 1: the schema of every release up to 17a54ff.

Stores of those releases have no alembic_version table; `db upgrade` stamps them with
this revision before running the ones after it. On an empty database this creates
version 1 as those releases did (the tests use it to make an old store on PostgreSQL).

Revision ID: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "meta", sa.Column("key", sa.String(64), primary_key=True), sa.Column("value", sa.Text, nullable=False)
    )
    op.create_table(
        "captures",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("path", sa.Text),
        sa.Column("sha256", sa.String(64)),
        sa.Column("creator", sa.Text),
        sa.Column("browser", sa.Text),
        sa.Column("format_version", sa.String(16)),
        sa.Column("imported_at", sa.Float, nullable=False),
        sa.Column("entries", sa.Integer, nullable=False),
        sa.Column("warnings", sa.Integer, nullable=False),
    )
    op.create_table(
        "exchanges",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("capture_id", sa.Integer, sa.ForeignKey("captures.id", ondelete="CASCADE"), nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("flow_id", sa.String(64)),
        sa.Column("client", sa.Text, nullable=False),
        sa.Column("connection", sa.Text),
        sa.Column("started_at", sa.Float),
        sa.Column("response_started_at", sa.Float),
        sa.Column("method", sa.String(32), nullable=False),
        sa.Column("url", sa.Text, nullable=False),
        sa.Column("url_norm", sa.Text, nullable=False),
        sa.Column("http_version", sa.String(32)),
        sa.Column("status", sa.Integer),
        sa.Column("status_text", sa.Text),
        sa.Column("location", sa.Text),
        sa.Column("location_resolved", sa.Text),
        sa.Column("location_error", sa.Text),
        sa.Column("synthetic", sa.Boolean, nullable=False),
        sa.Column("from_cache", sa.Boolean, nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("request_headers", sa.Text, nullable=False),
        sa.Column("response_headers", sa.Text, nullable=False),
        sa.Column("req_body_len", sa.Integer),
        sa.Column("req_body_sha256", sa.String(64)),
        sa.Column("req_content_type", sa.Text),
        sa.Column("req_body", sa.LargeBinary),
        sa.Column("resp_body_len", sa.Integer),
        sa.Column("resp_body_sha256", sa.String(64)),
        sa.Column("resp_content_type", sa.Text),
        sa.Column("resp_body", sa.LargeBinary),
        sa.Column("user_agent", sa.Text),
        sa.Column("idempotency_key", sa.Text),
    )
    op.create_index("ix_exchanges_capture_seq", "exchanges", ["capture_id", "seq"])
    op.create_table(
        "chains",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(
            "root_exchange_id", sa.Integer, sa.ForeignKey("exchanges.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("hops", sa.Integer, nullable=False),
        sa.Column("end_reason", sa.String(32), nullable=False),
        sa.Column("client", sa.Text, nullable=False),
        sa.Column("started_at", sa.Float),
    )
    op.create_table(
        "hops",
        sa.Column("chain_id", sa.Integer, sa.ForeignKey("chains.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("idx", sa.Integer, primary_key=True),
        sa.Column("from_exchange_id", sa.Integer, nullable=False),
        sa.Column("to_exchange_id", sa.Integer),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("link", sa.String(32), nullable=False),
        sa.Column("confidence", sa.Float, nullable=False),
    )
    op.create_table(
        "findings",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("rule", sa.String(64), nullable=False),
        sa.Column("rule_id", sa.String(16), nullable=False),
        sa.Column("severity", sa.String(16), nullable=False),
        sa.Column("severity_rank", sa.Integer, nullable=False),
        sa.Column("confidence", sa.Float, nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("chain_id", sa.Integer, sa.ForeignKey("chains.id", ondelete="CASCADE")),
        sa.Column("hop", sa.Integer, nullable=False),
        sa.Column("from_exchange_id", sa.Integer, nullable=False),
        sa.Column("to_exchange_id", sa.Integer, nullable=False),
        sa.Column("observed_at", sa.Float),
        sa.Column("evidence", sa.Text, nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
    )
