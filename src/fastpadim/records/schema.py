"""The records' one table, ``inspections``: a column for every field of an Inspection.

Times are stored in UTC and come back as aware UTC datetimes on every backend (SQLite keeps no time zone, so
``UtcDateTime`` converts on the way in and out). This is the current shape of the table for the store's queries;
the database itself is created and changed only by the migrations in ``migrations/versions``.
"""

from __future__ import annotations

import datetime

import sqlalchemy as sa


class UtcDateTime(sa.types.TypeDecorator):
    """An aware datetime, stored as UTC; a naive one is taken to be UTC already."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        value = value.replace(tzinfo=datetime.UTC) if value.tzinfo is None else value.astimezone(datetime.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        return value.replace(tzinfo=datetime.UTC) if value.tzinfo is None else value.astimezone(datetime.UTC)


metadata = sa.MetaData()

inspections = sa.Table(
    "inspections", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("time", UtcDateTime, nullable=False),
    sa.Column("station", sa.String, nullable=False),
    sa.Column("source", sa.String, nullable=False),
    sa.Column("path", sa.String, nullable=False),
    sa.Column("digest", sa.String),
    sa.Column("model", sa.String, nullable=False),
    sa.Column("model_version", sa.Integer, nullable=False),
    sa.Column("model_file", sa.String),
    sa.Column("score", sa.Float),
    sa.Column("normalized", sa.Float),
    sa.Column("false_alarm_probability", sa.Float),
    sa.Column("threshold", sa.Float),
    sa.Column("verdict", sa.String, nullable=False),
    sa.Column("regions", sa.JSON),
    sa.Column("timings_ms", sa.JSON),
    sa.Column("image_path", sa.String),
    sa.Column("overlay_path", sa.String),
    sa.Column("error", sa.String),
    sa.Column("label", sa.String),
    sa.Column("labelled_at", UtcDateTime),
    sa.Column("labelled_by", sa.String),
    sa.Index("ix_inspections_time", "time"),
    sa.Index("ix_inspections_model_time", "model", "time"),
    sa.Index("ix_inspections_path_digest", "path", "digest"),
)
