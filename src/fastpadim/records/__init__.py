"""Inspection records: every verdict the scorers give, with the operators' labels, in SQLite or PostgreSQL.

``Inspection`` and the label and verdict names load without SQLAlchemy; ``Records`` (the store) loads it when
first used.
"""

from __future__ import annotations

from .inspection import LABELS, SOURCES, VERDICTS, Inspection, utc_now

__all__ = ["LABELS", "SOURCES", "VERDICTS", "Inspection", "Records", "utc_now"]


def __getattr__(name: str):
    if name == "Records":
        from .store import Records

        return Records
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
