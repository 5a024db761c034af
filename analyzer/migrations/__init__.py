"""Schema migrations (Alembic). Revision "000N" makes schema version N (storeread.SCHEMA_VERSION).

Run through `redirect-audit db upgrade` (analyzer.migrate), never by reading commands.
A migration writes `meta.schema_version` as its last step, so an older release refuses
an upgraded store with its own message instead of misreading it.
"""
