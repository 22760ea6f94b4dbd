"""``fastpadim predict --record``: every verdict and every unreadable file in the records; the run's time, model and
threshold in results.csv/json."""

from __future__ import annotations

import csv
import datetime
import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import with_spot
from fastpadim.cli import app
from fastpadim.records import Records

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result) -> str:
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def model_file(fitted, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "bottle.padim"
    fitted.save(path)
    return path


@pytest.fixture
def images(tmp_path, test_arrays) -> Path:
    """One good image, one with a white square, one corrupt file."""
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(test_arrays[0]).save(folder / "good.png")
    Image.fromarray(with_spot(test_arrays[1])).save(folder / "spot.png")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return folder


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_predict_records_every_verdict_and_every_unreadable_file(model_file, fitted, images, tmp_path):
    db, out = tmp_path / "records.db", tmp_path / "out"
    result = run("predict", model_file, images, "-o", out, "--device", "cpu", "--record", db, "--station", "cam-1")
    assert result.exit_code == 0, result.output
    assert "recorded 3 in" in result.stderr
    with Records(db) as records:
        rows = {Path(r.path).name: r for r in records.recent()}
    assert sorted(rows) == ["corrupt.png", "good.png", "spot.png"]
    for name, row in rows.items():
        assert row.source == "predict" and row.station == "cam-1"
        assert row.path == str(images / name) and row.digest == sha256(images / name)
        assert row.model == "bottle" and row.model_version == len(fitted.history_) >= 1
        assert row.model_file == str(model_file) and row.threshold == pytest.approx(fitted.threshold_)
    error = rows["corrupt.png"]
    assert error.verdict == "error" and error.score is None
    assert error.error.startswith(str(images / "corrupt.png")) and "\n" not in error.error
    csv_rows = {Path(r["image"]).name: r for r in csv.DictReader((out / "results.csv").open())}
    for name in ("good.png", "spot.png"):
        row, recorded = rows[name], csv_rows[name]
        assert row.verdict == recorded["verdict"] in ("good", "anomalous")
        assert row.score == pytest.approx(float(recorded["score"]), abs=1e-5)
        assert row.normalized == pytest.approx(row.score / fitted.threshold_)
        assert row.image_path == str(images / name)
        assert row.overlay_path == str(out / "overlays" / f"{name}.png") and Path(row.overlay_path).is_file()
    assert rows["spot.png"].score > rows["good.png"].score


def test_results_carry_the_run_time_model_and_threshold(model_file, fitted, images, tmp_path):
    out = tmp_path / "out"
    before = datetime.datetime.now(datetime.UTC)
    result = run("predict", model_file, images, "-o", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    # the columns predict always had come first, in their order; the run's after them
    assert header[:7] == ["image", "score", "normalized", "false_alarm_probability", "verdict", "overlay", "mask"]
    assert header[7:] == ["run_time", "model", "model_version", "model_file", "threshold"]
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 2 and len({r["run_time"] for r in rows}) == 1
    run_time = datetime.datetime.fromisoformat(rows[0]["run_time"])
    assert run_time.utcoffset() == datetime.timedelta(0) and before <= run_time <= datetime.datetime.now(datetime.UTC)
    assert {(r["model"], r["model_version"], r["model_file"]) for r in rows} == {
        ("bottle", str(len(fitted.history_)), str(model_file))}
    assert float(rows[0]["threshold"]) == pytest.approx(fitted.threshold_)
    summary = json.loads((out / "results.json").read_text())
    assert summary["run_time"] == rows[0]["run_time"] and summary["model_name"] == "bottle"
    assert summary["model"] == str(model_file) and summary["model_version"] == len(fitted.history_)
    assert summary["threshold"] == pytest.approx(fitted.threshold_)
    assert [s["image"] for s in summary["skipped"]] == [str(images / "corrupt.png")]


def test_record_refusals_are_one_line(model_file, images, tmp_path):
    line = one_line_error(run("predict", model_file, images, "-o", tmp_path / "a", "--station", "cam-1"))
    assert "--record" in line
    line = one_line_error(run("predict", model_file, images, "-o", tmp_path / "b", "--record", tmp_path / "r.db",
                              "--ray", "local"))
    assert "--record" in line and "--ray" in line
    line = one_line_error(run("predict", model_file, images, "-o", tmp_path / "c", "--device", "cpu",
                              "--record", tmp_path / "missing" / "r.db"))
    assert "records" in line and str(tmp_path / "missing") in line
    assert not (tmp_path / "c").exists()  # nothing written for a run that could not record
