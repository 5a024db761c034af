"""Schema version 6: captures imported from a damaged file.

* captures.damage: for a HAR file cut off or damaged part way (a browser or an upload
  limit truncates exports), where it broke and what was kept, in words (`import-har`
  imports the complete entries before the damage); NULL for a capture taken whole, and
  for every capture made before this version. Nothing stored changes.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("captures", sa.Column("damage", sa.Text()))
    op.execute("UPDATE meta SET value = '6' WHERE key = 'schema_version'")
