"""Alembic's environment: migrations run on the connection analyzer.migrate hands over,
inside the transaction that holds the store's schema lock."""

from alembic import context

context.configure(connection=context.config.attributes["connection"], target_metadata=None)
with context.begin_transaction():
    context.run_migrations()
