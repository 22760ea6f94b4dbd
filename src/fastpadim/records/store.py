"""The inspection records: every verdict, in a SQLite file or a PostgreSQL database, with the operators' labels.

One engine per ``Records``; every call is one short transaction, so one object serves several threads and
several processes can write to the same database at once (SQLite: WAL journal, writers wait for the lock up to
``BUSY_TIMEOUT_S``). The schema is created or migrated by alembic when the records are opened.
"""

from __future__ import annotations

import csv
import datetime
import json
import os
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, make_url

from ..errors import FastpadimError
from ..files import atomic_write, check_writable_file
from .inspection import LABELS, Inspection, utc_now
from .schema import inspections

BUSY_TIMEOUT_S = 30  # how long a SQLite writer waits for another process's write to finish
PERIODS = ("hour", "day")
FORMATS = ("csv", "parquet")
COLUMNS = [column.name for column in inspections.columns]  # an Inspection's fields, in the table's order
JSON_COLUMNS = ("regions", "timings_ms")
MIGRATIONS = Path(__file__).with_name("migrations")
_PG_MIGRATION_LOCK = 0x66_70_61_64  # pg_advisory_xact_lock key: one process migrates at a time


class Records:
    """Inspection records in ``target``: a path (a SQLite file), or a URL ``sqlite:///…`` or
    ``postgresql://user:password@host/db``. With ``create=False`` a SQLite file that does not exist is an error
    instead of a new, empty database (for commands that only read)."""

    def __init__(self, target: str | os.PathLike, create: bool = True) -> None:
        url = database_url(target)
        self.url = display_url(target)
        if url.get_backend_name() == "sqlite":
            check_sqlite_file(url.database, self.url, create)
        try:
            self._engine = make_engine(url)
        except (sa.exc.ArgumentError, ValueError) as exc:
            raise FastpadimError(f"bad records URL {self.url}: {one_line(exc)}") from None
        try:
            self._migrate()
        except BaseException:
            self._engine.dispose()
            raise

    # -- opening -----------------------------------------------------------------------------------------------

    def _migrate(self) -> None:
        """Bring the schema to the newest revision this fastpadim knows, holding the database's write lock so
        that processes opening a new database together create it once."""
        from alembic import command
        from alembic.config import Config
        from alembic.runtime.migration import MigrationContext
        from alembic.script import ScriptDirectory
        from alembic.util import CommandError

        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        scripts = ScriptDirectory.from_config(config)
        head = scripts.get_current_head()
        with _Transaction(self._engine, write=True, failure=f"cannot open the records at {self.url}") as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
            current = MigrationContext.configure(conn).get_current_revision()
            if current == head:
                return
            try:
                scripts.get_revision(current)
            except CommandError:
                raise FastpadimError(f"the records at {self.url} have schema revision {current}, newer than this "
                                     f"fastpadim knows (up to {head}): upgrade fastpadim") from None
            config.attributes["connection"] = conn
            command.upgrade(config, "head")

    def _writing(self):
        """A connection in a transaction that writes (SQLite: BEGIN IMMEDIATE, the write lock from the start, so
        that a transaction never has to upgrade a read lock, which fails at once instead of waiting)."""
        return _Transaction(self._engine, write=True, failure=f"cannot write to the records at {self.url}")

    def _reading(self):
        return _Transaction(self._engine, write=False, failure=f"cannot read the records at {self.url}")

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> Records:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Records({self.url!r})"

    # -- writing -----------------------------------------------------------------------------------------------

    def add(self, inspection: Inspection) -> int:
        """Record one verdict; sets ``inspection.id``."""
        return self.add_many([inspection])[0]

    def add_many(self, batch: list[Inspection]) -> list[int]:
        """Record verdicts in one transaction; sets each one's ``id``."""
        if not batch:
            return []
        rows = [row_of(inspection) for inspection in batch]
        insert = inspections.insert().returning(inspections.c.id, sort_by_parameter_order=True)
        with self._writing() as conn:
            ids = list(conn.execute(insert, rows).scalars())
        for inspection, id_ in zip(batch, ids):
            inspection.id = id_
        return ids

    def label(self, id_: int, label: str | None, by: str | None = None) -> Inspection:
        """An operator's word on verdict ``id_``: one of LABELS, or None to clear it. Returns the inspection."""
        if label is not None and label not in LABELS:
            raise FastpadimError(f"a label is one of {', '.join(LABELS)} (or none to clear it), got {label!r}")
        values = ({"label": None, "labelled_at": None, "labelled_by": None} if label is None
                  else {"label": label, "labelled_at": utc_now(), "labelled_by": by})
        with self._writing() as conn:
            updated = conn.execute(inspections.update().where(inspections.c.id == id_).values(**values)).rowcount
        if not updated:
            raise self._missing(id_)
        return self.get(id_)

    def set_image_path(self, id_: int, path: str | None) -> None:
        """Where the image of verdict ``id_`` can be read now (None: nowhere, e.g. deleted by retention)."""
        with self._writing() as conn:
            updated = conn.execute(inspections.update().where(inspections.c.id == id_).values(image_path=path)).rowcount
        if not updated:
            raise self._missing(id_)

    def forget_images(self, paths: list[str]) -> int:
        """No verdict points at these image files any more (deleted by retention, by whichever run kept them);
        returns how many verdicts did."""
        forgotten = 0
        for start in range(0, len(paths), 500):  # bounded IN lists
            chunk = [str(path) for path in paths[start:start + 500]]
            with self._writing() as conn:
                forgotten += conn.execute(inspections.update().where(inspections.c.image_path.in_(chunk))
                                          .values(image_path=None)).rowcount
        return forgotten

    # -- reading -----------------------------------------------------------------------------------------------

    def get(self, id_: int) -> Inspection:
        with self._reading() as conn:
            row = conn.execute(inspections.select().where(inspections.c.id == id_)).mappings().first()
        if row is None:
            raise self._missing(id_)
        return Inspection(**row)

    def count(self) -> int:
        with self._reading() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(inspections)).scalar_one()

    def recent(self, limit: int = 50, model: str | None = None, verdict: str | None = None,
               labelled: bool | None = None, before_id: int | None = None) -> list[Inspection]:
        """The newest ``limit`` verdicts first (by id), optionally of one model, with one verdict, labelled or
        not, older than ``before_id`` (the next page)."""
        query = inspections.select().order_by(inspections.c.id.desc()).limit(limit)
        if model is not None:
            query = query.where(inspections.c.model == model)
        if verdict is not None:
            query = query.where(inspections.c.verdict == verdict)
        if labelled is not None:
            query = query.where(inspections.c.label.isnot(None) if labelled else inspections.c.label.is_(None))
        if before_id is not None:
            query = query.where(inspections.c.id < before_id)
        return self._select(query)

    def labelled(self, label: str, model: str | None = None) -> list[Inspection]:
        """The verdicts operators gave ``label``, oldest first."""
        query = inspections.select().where(inspections.c.label == label).order_by(inspections.c.id)
        if model is not None:
            query = query.where(inspections.c.model == model)
        return self._select(query)

    def seen(self, path: str, digest: str) -> bool:
        """Whether this content at this path was recorded before, by any scorer."""
        query = sa.select(inspections.c.id).where(inspections.c.path == path, inspections.c.digest == digest).limit(1)
        with self._reading() as conn:
            return conn.execute(query).first() is not None

    def summary(self, per: str = "day", model: str | None = None) -> list[dict]:
        """Counts per period (UTC hour or day), model and model version, oldest period first. ``period`` is the
        period's start as ISO 8601; ``anomaly_rate`` is anomalous / (anomalous + good), None when neither."""
        if per not in PERIODS:
            raise FastpadimError(f"records are summarised per hour or per day, got {per!r}")
        period = self._period_start(per).label("period")
        verdict, label = inspections.c.verdict, inspections.c.label

        def how_many(condition):
            return sa.func.coalesce(sa.func.sum(sa.case((condition, 1), else_=0)), 0)

        counts = {"anomalous": verdict == "anomalous", "good": verdict == "good", "unknown": verdict == "unknown",
                  "errors": verdict == "error", "false_alarms": label == "false_alarm",
                  "confirmed_defects": label == "confirmed_defect"}
        query = (sa.select(period, inspections.c.model, inspections.c.model_version,
                           sa.func.count().label("inspections"),
                           *(how_many(condition).label(name) for name, condition in counts.items()))
                 .group_by(period, inspections.c.model, inspections.c.model_version)
                 .order_by(period, inspections.c.model, inspections.c.model_version))
        if model is not None:
            query = query.where(inspections.c.model == model)
        with self._reading() as conn:
            rows = [dict(row) for row in conn.execute(query).mappings()]
        for row in rows:
            row["period"] = as_utc(row["period"]).isoformat()
            judged = row["anomalous"] + row["good"]
            row["anomaly_rate"] = row["anomalous"] / judged if judged else None
        return rows

    def _period_start(self, per: str):
        """The UTC hour or day a verdict falls in, in SQL (SQLite stores UTC text, PostgreSQL timestamptz)."""
        time = inspections.c.time
        if self._engine.dialect.name == "sqlite":
            return sa.func.strftime("%Y-%m-%d %H:00:00" if per == "hour" else "%Y-%m-%d 00:00:00", time)
        return sa.func.date_trunc(per, sa.func.timezone("UTC", time))

    def export(self, path: str | os.PathLike, fmt: str | None = None) -> int:
        """Write every record, oldest first, to a CSV (times ISO 8601, regions and timings as JSON) or Parquet
        file; ``fmt`` None: by the suffix. Written atomically (never a partial file). Returns the number of rows."""
        path = Path(path)
        fmt = (fmt or path.suffix.lstrip(".")).lower()
        if fmt not in FORMATS:
            raise FastpadimError(f"records export to .csv or .parquet, got {path.name!r}")
        check_writable_file(path)
        if fmt == "parquet":
            import pyarrow  # noqa: F401  (before anything is written: a missing module names its extra)
        writer, written = (write_csv if fmt == "csv" else write_parquet), []
        atomic_write(path, lambda tmp: written.append(writer(Path(tmp), self._iter_rows())))
        return written[0]

    def _iter_rows(self, chunk: int = 10_000) -> Iterator[list[dict]]:
        """Every record as flat rows (JSON columns as text), in chunks of ``chunk`` by id (keyset paging: short
        transactions, bounded memory)."""
        last = 0
        while True:
            query = (inspections.select().where(inspections.c.id > last).order_by(inspections.c.id).limit(chunk))
            with self._reading() as conn:
                rows = [dict(row) for row in conn.execute(query).mappings()]
            if not rows:
                return
            for row in rows:
                for key in JSON_COLUMNS:
                    row[key] = None if row[key] is None else json.dumps(row[key])
            yield [{key: row[key] for key in COLUMNS} for row in rows]
            last = rows[-1]["id"]

    def _select(self, query) -> list[Inspection]:
        with self._reading() as conn:
            return [Inspection(**row) for row in conn.execute(query).mappings()]

    def _missing(self, id_: int) -> FastpadimError:
        return FastpadimError(f"no inspection {id_} in {self.url}")


class _Transaction:
    """``with`` a connection in a transaction, committed on success; ``write`` marks it for SQLite's
    BEGIN IMMEDIATE (see ``make_engine``). A database's error (unreachable, locked too long, disk full) becomes
    a FastpadimError: ``failure`` and the driver's first line."""

    def __init__(self, engine: sa.Engine, write: bool, failure: str) -> None:
        self.engine, self.write, self.failure = engine, write, failure

    def __enter__(self) -> Connection:
        try:
            self.conn = self.engine.connect().execution_options(fastpadim_write=self.write)
            self.transaction = self.conn.begin()
        except sa.exc.DBAPIError as exc:
            raise FastpadimError(f"{self.failure}: {one_line(exc)}") from None
        return self.conn

    def __exit__(self, kind, exc, tb) -> None:
        try:
            if kind is None:
                self.transaction.commit()
            else:
                self.transaction.rollback()
        except sa.exc.DBAPIError as error:
            exc = exc or error
        finally:
            self.conn.close()
        if isinstance(exc, sa.exc.DBAPIError):
            raise FastpadimError(f"{self.failure}: {one_line(exc)}") from None


# -- helpers ---------------------------------------------------------------------------------------------------

def database_url(target: str | os.PathLike) -> sa.URL:
    """The SQLAlchemy URL of ``target``: a path is a SQLite file; postgresql:// uses psycopg 3."""
    text = os.fspath(target)
    if "://" not in text:
        return sa.URL.create("sqlite", database=str(Path(text).expanduser()))
    try:
        url = make_url(text)
    except (sa.exc.ArgumentError, ValueError):  # ValueError: a port that is not a number
        raise FastpadimError(f"bad records URL {mask(text)}: expected sqlite:///FILE or "
                             "postgresql://USER:PASSWORD@HOST/DATABASE") from None
    backend, driver = url.get_backend_name(), url.get_driver_name()
    if backend == "postgresql" and driver in ("psycopg2", "psycopg"):
        return url.set(drivername="postgresql+psycopg")  # the driver fastpadim installs (psycopg 3)
    if backend == "sqlite" and url.drivername == "sqlite":
        if not url.database or url.database == ":memory:":
            raise FastpadimError(f"records in SQLite need a file: sqlite:///FILE, got {mask(text)}")
        return url
    raise FastpadimError(f"records go to a SQLite file (a path or sqlite:///FILE) or to postgresql://…, "
                         f"got {mask(text)}")


def mask(text: str) -> str:
    """A URL as text with its password hidden (for a URL SQLAlchemy cannot even parse)."""
    scheme, sep, rest = text.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at or ":" not in credentials:
        return text
    return f"{scheme}{sep}{credentials.split(':', 1)[0]}:***@{host}"


def display_url(target: str | os.PathLike) -> str:
    """What messages show: a SQLite path or a URL as given, with the URL's password masked."""
    text = os.fspath(target)
    return text if "://" not in text else make_url(text).render_as_string(hide_password=True)


def check_sqlite_file(database: str, shown: str, create: bool) -> None:
    path = Path(database)
    if path.is_dir():
        raise FastpadimError(f"the records at {shown} are a folder, not a database file")
    if not path.parent.is_dir():
        raise FastpadimError(f"cannot create the records at {shown}: the folder {path.parent} does not exist")
    if not create and not path.exists():
        raise FastpadimError(f"no records at {shown}")


def make_engine(url: sa.URL) -> sa.Engine:
    if url.get_backend_name() != "sqlite":
        return sa.create_engine(url, pool_pre_ping=True, connect_args={"connect_timeout": 10})
    engine = sa.create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_S, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _sqlite_connect(dbapi_connection, _record):
        # The Python driver's own transaction handling is off (it would not lock before the first write):
        # ``_sqlite_begin`` begins every transaction itself.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_S * 1000}")
        cursor.execute("PRAGMA journal_mode = WAL")  # readers do not block the writer, nor it them
        cursor.execute("PRAGMA synchronous = NORMAL")  # safe with WAL; a commit does not wait for a sync
        cursor.close()

    @event.listens_for(engine, "begin")
    def _sqlite_begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("fastpadim_write") else "BEGIN")

    return engine


def row_of(inspection: Inspection) -> dict:
    row = {key: getattr(inspection, key) for key in COLUMNS if key != "id"}  # the database numbers them
    if row["time"] is None:
        row["time"] = utc_now()
    return row


def as_utc(value: datetime.datetime | str) -> datetime.datetime:
    """A period start as SQLite (text) or PostgreSQL (naive UTC timestamp) returns it, as an aware UTC datetime."""
    if isinstance(value, str):
        value = datetime.datetime.fromisoformat(value)
    return value.replace(tzinfo=datetime.UTC) if value.tzinfo is None else value.astimezone(datetime.UTC)


def one_line(exc: BaseException) -> str:
    """The first line of a driver's message, without SQLAlchemy's background links and statement dumps."""
    original = getattr(exc, "orig", None) or exc
    lines = [line.strip() for line in str(original).splitlines() if line.strip()]
    return " ".join(lines[0].split()) if lines else type(original).__name__


def write_csv(path: Path, chunks: Iterator[list[dict]]) -> int:
    n = 0
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for rows in chunks:
            for row in rows:
                writer.writerow({key: value.isoformat() if isinstance(value, datetime.datetime) else value
                                 for key, value in row.items()})
            n += len(rows)
    return n


def write_parquet(path: Path, chunks: Iterator[list[dict]]) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    utc_time = pa.timestamp("us", tz="UTC")
    types = {"id": pa.int64(), "model_version": pa.int64(), "time": utc_time, "labelled_at": utc_time,
             **{key: pa.float64() for key in ("score", "normalized", "false_alarm_probability", "threshold")}}
    schema = pa.schema([(key, types.get(key, pa.string())) for key in COLUMNS])
    n = 0
    with pq.ParquetWriter(path, schema) as writer:
        for rows in chunks:
            writer.write_table(pa.Table.from_pylist(rows, schema=schema))
            n += len(rows)
    return n
