"""Schema version 4: first party and third party.

* chains.third_party and findings.third_party: whether a chain (every hop of it) or a
  finding's hop ran between third parties of the browser page it was captured on
  (analyzer.party); NULL where no page is known, and for results made before this
  version. Nothing stored changes: the next reading command analyzes the store again,
  since its results were made by an older analysis (storeread.ANALYSIS_ENGINE), and fills
  both columns.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("chains", sa.Column("third_party", sa.Boolean()))
    op.add_column("findings", sa.Column("third_party", sa.Boolean()))
    op.execute("UPDATE meta SET value = '4' WHERE key = 'schema_version'")
