"""``fastpadim watch``: images scored as they arrive, each once and complete, across restarts; corrupt files
recorded as errors; temporary names ignored; Ctrl+C ends it cleanly."""

from __future__ import annotations

import csv
import hashlib
import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from fastpadim.records import Records
from fastpadim.watching import Watcher, is_temporary

PREDICT_COLUMNS = ["image", "score", "normalized", "false_alarm_probability", "verdict", "overlay", "mask",
                   "run_time", "model", "model_version", "model_file", "threshold"]


@pytest.fixture(scope="module")
def model_file(fitted, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "line.padim"
    fitted.save(path)
    return path


def png_bytes(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def by_name(db: Path) -> dict[str, list]:
    with Records(db) as records:
        found: dict[str, list] = {}
        for row in records.recent(limit=1000):
            found.setdefault(Path(row.path).name, []).append(row)
    return found


def start(watcher: Watcher) -> tuple[threading.Thread, threading.Event]:
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run, args=(stop,), daemon=True)
    thread.start()
    return thread, stop


def test_temporary_names():
    for name in (".hidden.png", "a.png.tmp", "a.png.part", "a.png.partial", "a.png~", "A.PNG.PART"):
        assert is_temporary(name), name
    for name in ("a.png", "part.png", "tmp.jpg"):
        assert not is_temporary(name), name


def test_a_file_written_slowly_is_scored_once_and_complete(fitted, model_file, train_arrays, tmp_path):
    folder, db = tmp_path / "in", tmp_path / "records.db"
    folder.mkdir()
    slow = png_bytes(train_arrays[0])
    renamed = png_bytes(train_arrays[1])
    with Records(db) as records:
        watcher = Watcher(fitted, folder, records, model_path=model_file, station="cam-1", settle=0.8,
                          stop_after=2, output=tmp_path / "out")
        thread, stop = start(watcher)
        time.sleep(0.3)
        # temporary names are never scored: a dotfile, a .tmp, and a .part that is renamed into place when done
        (folder / ".hidden.png").write_bytes(renamed)
        (folder / "scratch.png.tmp").write_bytes(renamed)
        (folder / "notes.txt").write_text("not an image")
        (folder / "camera.png.part").write_bytes(renamed)
        os.replace(folder / "camera.png.part", folder / "camera.png")
        with open(folder / "slow.png", "wb") as handle:  # 5 chunks, 0.3 s apart: never still for 0.8 s
            for i in range(5):
                handle.write(slow[i * len(slow) // 5:(i + 1) * len(slow) // 5])
                handle.flush()
                time.sleep(0.3)
        thread.join(timeout=40)
        stop.set()
        assert not thread.is_alive()
    rows = by_name(db)
    assert sorted(rows) == ["camera.png", "slow.png"]
    (slow_row,), (renamed_row,) = rows["slow.png"], rows["camera.png"]
    assert slow_row.digest == sha256(slow) and slow_row.verdict in ("good", "anomalous")
    assert renamed_row.digest == sha256(renamed) and renamed_row.verdict in ("good", "anomalous")
    assert slow_row.source == "watch" and slow_row.station == "cam-1" and slow_row.model == "line"
    assert slow_row.timings_ms["score"] > 0
    assert slow_row.score == pytest.approx(float(fitted.anomaly_scores([train_arrays[0]])[0]), rel=1e-4)
    assert Path(slow_row.overlay_path).is_file()
    assert Path(slow_row.overlay_path).name == f"slow.png.{sha256(slow)[:12]}.png"  # a reused name keeps both
    assert watcher.counts.scored == 2 and watcher.counts.unreadable == 0
    out_rows = list(csv.DictReader((tmp_path / "out" / "results.csv").open()))
    assert list(out_rows[0]) == PREDICT_COLUMNS
    assert sorted(Path(r["image"]).name for r in out_rows) == ["camera.png", "slow.png"]


def test_a_restart_scores_only_new_files_and_corrupt_ones_once(fitted, model_file, test_arrays, tmp_path):
    folder, db = tmp_path / "in", tmp_path / "records.db"
    folder.mkdir()
    for i in range(2):
        (folder / f"{i}.png").write_bytes(png_bytes(test_arrays[i]))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    outside = tmp_path / "elsewhere.png"
    outside.write_bytes(png_bytes(test_arrays[3]))
    (folder / "link.png").symlink_to(outside)  # leads out of the folder: not followed
    lines: list[str] = []
    with Records(db) as records:
        first = Watcher(fitted, folder, records, model_path=model_file, settle=0.05, notify=lines.append)
        counts = first.scan_once()
        assert (counts.scored, counts.unreadable, counts.skipped) == (2, 1, 1)
        assert any("link.png" in line and "out of the watched folder" in line for line in lines)
        assert any("broken.png" in line for line in lines)
        (folder / "2.png").write_bytes(png_bytes(test_arrays[2]))
        second = Watcher(fitted, folder, records, model_path=model_file, settle=0.05)
        counts = second.scan_once()
        assert (counts.scored, counts.unreadable, counts.already) == (1, 0, 3)
        assert records.count() == 4
    rows = by_name(db)
    assert sorted(rows) == ["0.png", "1.png", "2.png", "broken.png"]
    assert all(len(found) == 1 for found in rows.values())
    (broken,) = rows["broken.png"]
    assert broken.verdict == "error" and broken.error.startswith(str(folder / "broken.png"))
    assert broken.digest == sha256((folder / "broken.png").read_bytes())


def test_watch_keeps_going_past_a_corrupt_file(fitted, model_file, test_arrays, tmp_path, monkeypatch):
    folder, db = tmp_path / "in", tmp_path / "records.db"
    folder.mkdir()
    monkeypatch.setattr("fastpadim.images.MAX_IMAGE_PIXELS", 64 * 64)  # the pixel limit, made small
    with Records(db) as records:
        watcher = Watcher(fitted, folder, records, model_path=model_file, settle=0.1, stop_after=4)
        thread, stop = start(watcher)
        time.sleep(0.3)
        (folder / "a.png").write_bytes(png_bytes(test_arrays[0]))
        (folder / "bad.png").write_bytes(b"GIF89a garbage")
        (folder / "huge.png").write_bytes(png_bytes(np.zeros((65, 64, 3), np.uint8)))
        time.sleep(0.5)
        (folder / "b.png").write_bytes(png_bytes(test_arrays[1]))
        thread.join(timeout=30)
        stop.set()
        assert not thread.is_alive()
    rows = by_name(db)
    assert sorted(rows) == ["a.png", "b.png", "bad.png", "huge.png"] and all(len(found) == 1 for found in rows.values())
    assert rows["bad.png"][0].verdict == "error" and rows["bad.png"][0].error.startswith(str(folder / "bad.png"))
    assert rows["huge.png"][0].verdict == "error" and "above the limit" in rows["huge.png"][0].error
    assert {rows[name][0].verdict for name in ("a.png", "b.png")} <= {"good", "anomalous"}
    assert watcher.counts.processed == 4 and watcher.counts.unreadable == 2


def test_the_command_stops_cleanly_on_ctrl_c(model_file, test_arrays, tmp_path):
    folder, db = tmp_path / "in", tmp_path / "records.db"
    folder.mkdir()
    (folder / "a.png").write_bytes(png_bytes(test_arrays[0]))
    process = subprocess.Popen(
        [sys.executable, "-m", "fastpadim", "watch", str(model_file), str(folder), "--record", str(db), "--device", "cpu",
         "--settle", "0.1"],
        stderr=subprocess.PIPE, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (db.exists() and _count(db) == 1):
            time.sleep(0.2)
        assert _count(db) == 1
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines[0].startswith(f"watching {folder}") and str(db) in lines[0]
    assert lines[-1].startswith("watched for") and "scored 1 images (" in lines[-1]
    assert "Traceback" not in stderr


def _count(db: Path) -> int:
    with Records(db) as records:
        return records.count()


def test_default_records_and_bad_folder_are_said_in_one_line(model_file, tmp_path):
    from typer.testing import CliRunner

    from fastpadim.cli.app import app

    result = CliRunner().invoke(app, ["watch", str(model_file), str(tmp_path / "missing"), "--device", "cpu"])
    assert result.exit_code == 1
    assert [line for line in result.stderr.splitlines() if line.strip()] == [f"error: {tmp_path / 'missing'}: no such folder"]
    folder = tmp_path / "in"
    folder.mkdir()
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        result = CliRunner().invoke(app, ["watch", str(model_file), str(folder), "--device", "cpu", "--idle-exit", "0.3"])
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, result.output
    assert "inspections.db" in result.stderr and "(the default" in result.stderr
    assert (tmp_path / "inspections.db").is_file()
