"""The inspection records on SQLite and PostgreSQL: every field back as written, labels, queries, summaries,
exports, migrations, and two processes writing at once."""

from __future__ import annotations

import csv
import datetime
import json
import sqlite3
import subprocess
import sys
import time

import pytest

from fastpadim.errors import FastpadimError
from fastpadim.records import Inspection, Records

UTC = datetime.UTC
T0 = datetime.datetime(2025, 3, 1, 10, 15, 30, 123456, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request, tmp_path):
    """Where a test's records go: a new SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "records.db")
    return request.getfixturevalue("postgres_db")


def inspection(**fields) -> Inspection:
    base = dict(path="line/a.png", source="watch", station="cam1", model="bottle", model_version=1, verdict="good",
                score=0.5, time=T0)
    return Inspection(**{**base, **fields})


def full_inspection() -> Inspection:
    """Every field set, the time in another zone than UTC."""
    return Inspection(
        path="line/ä b.png", source="serve", station="line-pc-2", model="bottle", model_version=3, verdict="anomalous",
        score=12.25, normalized=1.75, false_alarm_probability=0.0125, threshold=7.0, digest="ab" * 32,
        model_file="/models/bottle.v3.padim", regions=[{"box": [1, 2, 30, 40], "area": 120, "peak": 3.5}],
        timings_ms={"read": 1.5, "score": 20.25}, image_path="/kept/1.png", overlay_path="/kept/1.overlay.png",
        error=None, time=datetime.datetime(2025, 3, 1, 12, 0, 0, 654321, tzinfo=datetime.timezone(datetime.timedelta(hours=2))),
        label="confirmed_defect", labelled_at=datetime.datetime(2025, 3, 2, 8, 30, tzinfo=UTC), labelled_by="ana")


def test_every_field_comes_back_as_written(target):
    written = full_inspection()
    with Records(target) as records:
        id_ = records.add(written)
        assert written.id == id_
        back = records.get(id_)
    assert back == written  # dataclass equality: every field, times as the same instants
    assert back.time.tzinfo is UTC and back.labelled_at.tzinfo is UTC
    assert back.time == datetime.datetime(2025, 3, 1, 10, 0, 0, 654321, tzinfo=UTC)
    with Records(target) as again:  # a new connection, the schema found in place
        assert again.get(id_) == written and again.count() == 1


def test_an_image_not_scored_keeps_its_error(target):
    with Records(target) as records:
        id_ = records.add(inspection(verdict="error", score=None, error="cannot decode the image"))
        back = records.get(id_)
    assert back.verdict == "error" and back.score is None and back.error == "cannot decode the image"
    assert back.regions is None and back.timings_ms is None


def test_label_and_clear(target):
    with Records(target) as records:
        id_ = records.add(inspection(verdict="anomalous"))
        before = datetime.datetime.now(UTC)
        labelled = records.label(id_, "false_alarm", by="ana")
        assert (labelled.label, labelled.labelled_by) == ("false_alarm", "ana")
        assert before - datetime.timedelta(seconds=1) <= labelled.labelled_at <= datetime.datetime.now(UTC)
        assert records.get(id_).label == "false_alarm"
        cleared = records.label(id_, None)
        assert (cleared.label, cleared.labelled_at, cleared.labelled_by) == (None, None, None)
        with pytest.raises(FastpadimError, match="a label is one of false_alarm, confirmed_defect"):
            records.label(id_, "maybe")
        with pytest.raises(FastpadimError, match=r"^no inspection 999 in "):
            records.label(999, "false_alarm")
        with pytest.raises(FastpadimError, match=r"^no inspection 999 in "):
            records.get(999)
        records.set_image_path(id_, "/kept/a.png")
        assert records.forget_images(["/kept/a.png", "/kept/other.png"]) == 1
        assert records.get(id_).image_path is None
        records.set_image_path(id_, None)
        records.set_image_path(id_, "/kept/new.png")
        assert records.get(id_).image_path == "/kept/new.png"
        with pytest.raises(FastpadimError, match=r"^no inspection 999 in "):
            records.set_image_path(999, None)


def test_recent_labelled_and_seen(target):
    with Records(target) as records:
        ids = records.add_many([
            inspection(path="a.png", digest="d1", verdict="good"),
            inspection(path="b.png", digest="d2", verdict="anomalous", model="cable"),
            inspection(path="c.png", digest="d3", verdict="anomalous"),
            inspection(path="d.png", digest="d4", verdict="unknown"),
            inspection(path="e.png", digest="d5", verdict="anomalous"),
        ])
        assert ids == sorted(ids) and len(set(ids)) == 5
        records.label(ids[4], "confirmed_defect")
        records.label(ids[2], "confirmed_defect")
        records.label(ids[1], "false_alarm")

        assert [i.path for i in records.recent()] == ["e.png", "d.png", "c.png", "b.png", "a.png"]
        assert [i.path for i in records.recent(limit=2)] == ["e.png", "d.png"]
        assert [i.path for i in records.recent(limit=2, before_id=ids[3])] == ["c.png", "b.png"]
        assert [i.path for i in records.recent(model="bottle", verdict="anomalous")] == ["e.png", "c.png"]
        assert [i.path for i in records.recent(labelled=True)] == ["e.png", "c.png", "b.png"]
        assert [i.path for i in records.recent(labelled=False)] == ["d.png", "a.png"]

        assert [i.path for i in records.labelled("confirmed_defect")] == ["c.png", "e.png"]  # oldest first
        assert [i.path for i in records.labelled("false_alarm", model="bottle")] == []
        assert [i.path for i in records.labelled("false_alarm", model="cable")] == ["b.png"]

        assert records.seen("a.png", "d1")
        assert not records.seen("a.png", "d2")  # same path, other content
        assert not records.seen("z.png", "d1")
        assert records.count() == 5
        assert records.add_many([]) == []


def test_summary_per_hour_and_day(target):
    at = lambda day, hour, minute=0: datetime.datetime(2025, 3, day, hour, minute, tzinfo=UTC)  # noqa: E731
    batch = [
        inspection(time=at(1, 10, 5), verdict="anomalous"),
        inspection(time=at(1, 10, 59), verdict="good"),
        inspection(time=at(1, 10, 30), verdict="good"),
        inspection(time=at(1, 11, 0), verdict="anomalous"),
        inspection(time=at(1, 11, 1), verdict="error", score=None),
        inspection(time=at(1, 11, 2), verdict="anomalous", model_version=2),
        inspection(time=at(2, 0, 0), verdict="unknown"),
        inspection(time=at(1, 10, 1), verdict="anomalous", model="cable"),
        # 23:30 at UTC-2 is 01:30 UTC on the next day: periods are UTC
        inspection(time=datetime.datetime(2025, 3, 1, 23, 30, tzinfo=datetime.timezone(datetime.timedelta(hours=-2))),
                   verdict="good"),
    ]
    with Records(target) as records:
        ids = records.add_many(batch)
        records.label(ids[0], "false_alarm")
        records.label(ids[3], "confirmed_defect")
        hourly = records.summary("hour")
        daily = records.summary("day", model="bottle")
        with pytest.raises(FastpadimError, match="per hour or per day"):
            records.summary("week")

    keys = [(r["period"], r["model"], r["model_version"]) for r in hourly]
    assert keys == [("2025-03-01T10:00:00+00:00", "bottle", 1), ("2025-03-01T10:00:00+00:00", "cable", 1),
                    ("2025-03-01T11:00:00+00:00", "bottle", 1), ("2025-03-01T11:00:00+00:00", "bottle", 2),
                    ("2025-03-02T00:00:00+00:00", "bottle", 1), ("2025-03-02T01:00:00+00:00", "bottle", 1)]
    first = hourly[0]
    assert {k: first[k] for k in ("inspections", "anomalous", "good", "unknown", "errors", "false_alarms",
                                  "confirmed_defects")} == dict(inspections=3, anomalous=1, good=2, unknown=0,
                                                                errors=0, false_alarms=1, confirmed_defects=0)
    assert first["anomaly_rate"] == pytest.approx(1 / 3)
    eleven = hourly[2]
    assert (eleven["inspections"], eleven["anomalous"], eleven["errors"], eleven["confirmed_defects"]) == (2, 1, 1, 1)
    assert eleven["anomaly_rate"] == 1.0  # the error is not judged
    assert hourly[4]["unknown"] == 1 and hourly[4]["anomaly_rate"] is None

    assert [(r["period"], r["model_version"], r["inspections"]) for r in daily] == [
        ("2025-03-01T00:00:00+00:00", 1, 5), ("2025-03-01T00:00:00+00:00", 2, 1), ("2025-03-02T00:00:00+00:00", 1, 2)]
    assert sum(r["inspections"] for r in hourly) == len(batch)


def test_export_csv_and_parquet(tmp_path):
    import pyarrow.parquet as pq

    with Records(tmp_path / "records.db") as records:
        written = [full_inspection(), inspection(path="b.png", regions=None, timings_ms=None)]
        records.add_many(written)
        assert records.export(tmp_path / "out.csv") == 2
        assert records.export(tmp_path / "out.parquet") == 2
        assert records.export(tmp_path / "out.data", fmt="csv") == 2
        with pytest.raises(FastpadimError, match=r"\.csv or \.parquet"):
            records.export(tmp_path / "out.xlsx")
        with pytest.raises(FastpadimError, match="does not exist"):
            records.export(tmp_path / "absent" / "out.csv")
    assert not (tmp_path / "out.xlsx").exists()
    exported = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("records.db"))
    assert exported == ["out.csv", "out.data", "out.parquet"]  # no temporary file left

    with open(tmp_path / "out.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:3] == ["id", "time", "station"]
    first = rows[0]
    assert datetime.datetime.fromisoformat(first["time"]) == written[0].time
    assert first["time"].endswith("+00:00")
    assert json.loads(first["regions"]) == written[0].regions and json.loads(first["timings_ms"]) == written[0].timings_ms
    assert (first["path"], first["label"], float(first["score"])) == ("line/ä b.png", "confirmed_defect", 12.25)
    assert rows[1]["regions"] == "" and rows[1]["label"] == ""

    table = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert [r["id"] for r in table] == [1, 2]
    assert table[0]["time"] == written[0].time and table[0]["labelled_at"] == written[0].labelled_at
    assert json.loads(table[0]["regions"]) == written[0].regions
    assert table[0]["false_alarm_probability"] == 0.0125 and table[1]["regions"] is None


def test_migration_is_idempotent_and_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "records.db"
    with Records(path) as records:
        records.add(inspection())
    for _ in range(2):
        with Records(path) as records:
            assert records.count() == 1
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [("0001",)]
        indexes = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert {"ix_inspections_time", "ix_inspections_model_time", "ix_inspections_path_digest"} <= indexes
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        db.execute("UPDATE alembic_version SET version_num = '0099'")
    with pytest.raises(FastpadimError) as error:
        Records(path)
    assert "schema revision 0099, newer than this fastpadim knows (up to 0001): upgrade fastpadim" in str(error.value)


WRITER = """
import pathlib, sys, time
from fastpadim.records import Inspection, Records
target, go, n = sys.argv[1], pathlib.Path(sys.argv[2]), int(sys.argv[3])
records = Records(target)  # both processes open (and migrate) a new database at the same time
while not go.exists():
    time.sleep(0.01)
for i in range(n):
    records.add(Inspection(path=f"{sys.argv[4]}/{i}.png", source="watch", station=sys.argv[4], model="bottle",
                           model_version=1, verdict="good", score=float(i)))
records.close()
"""


def test_two_processes_write_at_once(target, tmp_path):
    go, n = tmp_path / "go", 300
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, target, str(go), str(n), f"p{k}"],
                                stderr=subprocess.PIPE, text=True) for k in range(2)]
    time.sleep(1.5)  # let both start and open the records
    go.touch()
    errors = [w.communicate(timeout=120)[1] for w in writers]
    assert [w.returncode for w in writers] == [0, 0], errors
    with Records(target) as records:
        assert records.count() == 2 * n
        assert {i.station for i in records.recent(limit=2 * n)} == {"p0", "p1"}


@pytest.mark.parametrize("target, message", [
    ("postgresql://ana:s3cret@127.0.0.1:1/records", r"^cannot open the records at postgresql://ana:\*\*\*@127\.0\.0\.1:1/records: "),
    ("mysql://ana:s3cret@db/records", r"^records go to a SQLite file .* got mysql://ana:\*\*\*@db/records$"),
    ("postgresql://ana:s3cret@db:notaport/records", r"^bad records URL postgresql://ana:\*\*\*@db:notaport/records"),
    ("sqlite://", "need a file"),
    ("/nonexistent-folder/records.db", r"^cannot create the records at /nonexistent-folder/records\.db: the folder /nonexistent-folder does not exist$"),
])
def test_bad_targets_are_one_line(target, message):
    with pytest.raises(FastpadimError, match=message) as error:
        Records(target)
    assert "\n" not in str(error.value) and "s3cret" not in str(error.value)


def test_not_a_database_file_and_reading_only(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database, it is a text file that is long enough to have a header" * 20)
    with pytest.raises(FastpadimError, match=r"^cannot open the records at .*junk\.db: file is not a database$"):
        Records(junk)
    with pytest.raises(FastpadimError, match=r"^no records at .*absent\.db$"):
        Records(tmp_path / "absent.db", create=False)
    assert not (tmp_path / "absent.db").exists()
    with pytest.raises(FastpadimError, match="a folder"):
        Records(tmp_path)


def test_url_is_masked_and_sqlite_urls_work(tmp_path):
    with Records(f"sqlite:///{tmp_path}/records.db") as records:
        records.add(inspection())
        assert records.url == f"sqlite:///{tmp_path}/records.db"
    with Records(tmp_path / "records.db") as records:
        assert records.count() == 1 and records.url == str(tmp_path / "records.db")


def test_postgres_url_keeps_its_password_out_of_display(postgres_db):
    from sqlalchemy.engine import make_url

    with_password = make_url(postgres_db).set(password="pw").render_as_string(hide_password=False)
    with Records(with_password) as records:  # trust authentication: the password is not checked
        assert records.url.startswith("postgresql://") and ":***@" in records.url and "pw" not in records.url.split("@")[0]
        assert records.count() == 0


def test_one_records_object_serves_several_threads(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    with Records(tmp_path / "records.db") as records:
        def work(k):
            for i in range(25):
                records.add(inspection(path=f"t{k}/{i}.png"))
                records.seen(f"t{k}/{i}.png", "x")
            return len(records.recent(limit=10))

        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(work, range(8))) == [10] * 8
        assert records.count() == 200
        assert len({i.id for i in records.recent(limit=200)}) == 200


def test_a_database_error_later_is_one_line(tmp_path):
    path = tmp_path / "records.db"
    with Records(path) as records:
        with sqlite3.connect(path) as db:
            db.execute("DROP TABLE inspections")  # someone else broke the database under us
        with pytest.raises(FastpadimError, match=r"^cannot write to the records at .*records\.db: no such table: inspections$"):
            records.add(inspection())
        with pytest.raises(FastpadimError, match=r"^cannot read the records at .*: no such table: inspections$"):
            records.count()
