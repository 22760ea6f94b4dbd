"""Alembic's entry point: the store hands over its open connection (already in a transaction that holds the
database's lock), so migrations never open their own and never configure logging."""

from alembic import context

context.configure(connection=context.config.attributes["connection"], render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
