"""The inspections table.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Frozen here rather than taken from schema.py: a migration describes the table as it was at this revision.
    op.create_table(
        "inspections",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("time", sa.DateTime(timezone=True), nullable=False),
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
        sa.Column("labelled_at", sa.DateTime(timezone=True)),
        sa.Column("labelled_by", sa.String),
    )
    op.create_index("ix_inspections_time", "inspections", ["time"])
    op.create_index("ix_inspections_model_time", "inspections", ["model", "time"])
    op.create_index("ix_inspections_path_digest", "inspections", ["path", "digest"])


def downgrade() -> None:
    op.drop_table("inspections")
