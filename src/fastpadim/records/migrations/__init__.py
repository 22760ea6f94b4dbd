"""Alembic's migrations of the records' schema, run by the store when it opens a database (no alembic.ini)."""
