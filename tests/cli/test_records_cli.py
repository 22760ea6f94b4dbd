"""``fastpadim records``: the summary and latest verdicts of a records database, its export, and one-line errors."""

from __future__ import annotations

import csv
import datetime
import re

import pytest
from test_cli import assert_ok, assert_one_line_error, run

from fastpadim.records import Inspection, Records

UTC = datetime.UTC


@pytest.fixture
def database(tmp_path):
    """Six verdicts of two versions of bottle over two hours, one of cable; two labels."""
    path = tmp_path / "records.db"
    at = lambda hour, minute: datetime.datetime(2025, 3, 1, hour, minute, tzinfo=UTC)  # noqa: E731

    def seen(hour, minute, verdict, version=1, model="bottle", score=1.0):
        return Inspection(path=f"line/{hour}-{minute}.png", source="watch", station="cam1", model=model,
                          model_version=version, verdict=verdict, score=score, normalized=score / 2, time=at(hour, minute))

    with Records(path) as records:
        ids = records.add_many([seen(9, 0, "good"), seen(9, 10, "anomalous", score=9.5), seen(9, 20, "good"),
                                seen(10, 0, "anomalous", score=8.25), seen(10, 5, "good", version=2),
                                seen(10, 6, "anomalous", version=2, score=12.0), seen(10, 7, "good", model="cable")])
        records.label(ids[1], "false_alarm")
        records.label(ids[5], "confirmed_defect")
    return path


def table_rows(output: str, first_cell: str) -> list[list[str]]:
    """The cells of the table rows that start with ``first_cell`` (columns are two or more spaces apart)."""
    rows = [re.split(r"\s{2,}", line.strip()) for line in output.splitlines() if line.strip()]
    return [cells for cells in rows if cells[0].startswith(first_cell)]


def test_summary_per_day_and_hour(database):
    result = assert_ok(run("records", database, "--last", "0"))
    assert f"{database}: 7 inspections" in result.stdout
    assert table_rows(result.stdout, "2025-03-01") == [
        ["2025-03-01", "bottle", "v1", "4", "2", "50.0%", "1", "0"],
        ["2025-03-01", "bottle", "v2", "2", "1", "50.0%", "0", "1"],
        ["2025-03-01", "cable", "v1", "1", "0", "0.0%", "0", "0"],
    ]
    assert "latest" not in result.stdout

    result = assert_ok(run("records", database, "--per", "hour", "--model", "bottle", "--last", "3"))
    assert "6 inspections of model bottle" in result.stdout
    assert [row[:5] for row in table_rows(result.stdout, "2025-03-01 ")] == [
        ["2025-03-01 09:00", "bottle", "v1", "3", "1"],
        ["2025-03-01 10:00", "bottle", "v1", "1", "1"],
        ["2025-03-01 10:00", "bottle", "v2", "2", "1"],
    ]
    latest = result.stdout.split("latest 3\n")[1]
    assert table_rows(latest, "id") == [["id", "time (UTC)", "source", "model", "score", "normalized", "verdict",
                                         "label", "path"]]
    latest = [row for row in table_rows(latest, "") if row[0] != "id"]
    assert [row[0] for row in latest] == ["6", "5", "4"]  # newest first
    assert latest[0][1:] == ["2025-03-01 10:06:00", "watch", "bottle v2", "12", "6.000", "anomalous",
                             "confirmed_defect", "line/10-6.png"]
    assert latest[1][-2:] == ["good", "line/10-5.png"]  # no label: an empty column


def test_export(database, tmp_path):
    result = assert_ok(run("records", database, "--export", tmp_path / "all.csv"))
    assert "exported 7 inspections to" in result.stderr
    with open(tmp_path / "all.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["id"] for row in rows] == [str(i) for i in range(1, 8)]
    assert rows[1]["label"] == "false_alarm" and rows[1]["time"] == "2025-03-01T09:10:00+00:00"
    assert_ok(run("records", database, "--export", tmp_path / "all.parquet", "--last", "0"))
    import pyarrow.parquet as pq

    assert pq.read_table(tmp_path / "all.parquet").num_rows == 7


def test_errors_are_one_line_and_create_nothing(tmp_path, database):
    missing = tmp_path / "absent.db"
    line = assert_one_line_error(run("records", missing), "no records at", str(missing))
    assert line == f"error: no records at {missing}"
    assert not missing.exists()
    assert_one_line_error(run("records", f"sqlite:///{missing}"), "no records at")
    assert not missing.exists()
    assert_one_line_error(run("records", database, "--per", "week"), "--per is day or hour")
    assert_one_line_error(run("records", database, "--export", tmp_path / "out.xlsx"), ".csv or .parquet")
    assert not (tmp_path / "out.xlsx").exists()
    assert_one_line_error(run("records", "postgresql://ana:s3cret@127.0.0.1:1/records"), "cannot open the records",
                          "ana:***@")


def test_an_empty_database(tmp_path):
    Records(tmp_path / "empty.db").close()
    result = assert_ok(run("records", tmp_path / "empty.db"))
    assert result.stdout.strip() == f"{tmp_path / 'empty.db'}: 0 inspections"
