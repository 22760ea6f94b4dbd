"""``fastpadim update`` and ``calibrate`` with ``--from-records``: the operators' labels in the inspection records
become good images (false alarms) and labelled scores (false alarms, confirmed defects), each image only while it
is the one that was labelled, and each learned once."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import SMALL, make_surfaces, with_spot
from fastpadim.cli import app
from fastpadim.lineage import model_name, model_version
from fastpadim.model import Padim
from fastpadim.records import Inspection, Records
from fastpadim.results import verdict_label

runner = CliRunner()
N_ALARMS = 5  # false alarms of one new look of good parts, enough for the model to learn it


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_ok(result):
    assert result.exit_code == 0, result.output
    return result


def error_lines(result) -> list[str]:
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def new_look(image: np.ndarray) -> np.ndarray:
    """Good parts under new light: brighter and bluer (what the model never saw, so it flags them)."""
    out = image.astype(np.int16) + np.array([30, 45, 80], np.int16)
    return np.clip(out, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def fitted_file(tmp_path_factory, train_arrays) -> Path:
    """bottle.padim: leave-one-out calibration (so an update calibrates again), a threshold at fpr=0.1."""
    path = tmp_path_factory.mktemp("model") / "bottle.padim"
    Padim(**{**SMALL, "folds": "all", "false_alarm_rate": 0.1}).fit(train_arrays[:10]).save(path)
    return path


@pytest.fixture
def line(fitted_file, tmp_path):
    """A model and the records of its line: N_ALARMS false alarms (new look), one confirmed defect, one false
    alarm whose file was rewritten after the verdict, and an unlabelled verdict."""
    model_path = tmp_path / "bottle.padim"
    shutil.copy(fitted_file, model_path)
    model = Padim.load(model_path, device="cpu")
    kept = tmp_path / "kept"
    kept.mkdir()
    looks = [new_look(a) for a in make_surfaces(N_ALARMS + 1, seed=31)]
    arrays = looks + [with_spot(make_surfaces(1, seed=32)[0]), make_surfaces(1, seed=33)[0]]
    inspections = []
    for i, array in enumerate(arrays):
        path = kept / f"{i}.png"
        Image.fromarray(array).save(path)
        data = path.read_bytes()
        result = model.predict([data])
        score = float(result.scores[0])
        inspections.append(Inspection(
            path=f"upload-{i}.png", source="serve", station="line1", model=model_name(model_path),
            model_version=model_version(model), verdict=verdict_label(score, model.threshold_), score=score,
            normalized=float(result.normalized[0]), threshold=model.threshold_,
            digest=hashlib.sha256(data).hexdigest(), image_path=str(path)))
    db = tmp_path / "records.db"
    with Records(db) as records:
        ids = records.add_many(inspections)
        for id_ in ids[: N_ALARMS + 1]:
            records.label(id_, "false_alarm", by="operator")
        records.label(ids[N_ALARMS + 1], "confirmed_defect", by="operator")
    changed = kept / f"{N_ALARMS}.png"
    Image.fromarray(np.flipud(looks[-1])).save(changed)  # rewritten after it was labelled
    return {"model": model_path, "db": db, "ids": ids, "alarms": ids[:N_ALARMS], "changed": ids[N_ALARMS],
            "defect": ids[N_ALARMS + 1], "inspections": inspections}


def test_update_learns_the_false_alarms_once_into_the_next_version(line):
    first = line["inspections"][0]
    assert first.verdict == "anomalous" and first.normalized > 1  # a false alarm indeed
    original = line["model"].read_bytes()
    result = assert_ok(run("update", line["model"], "--from-records", line["db"], "--device", "cpu"))
    new_file = line["model"].with_name("bottle.v2.padim")
    stderr = result.stderr
    assert f"skipped: inspection {line['changed']}: " in stderr and "changed since the verdict" in stderr
    assert stderr.count("skipped:") == 1  # the unlabelled verdict and the defect are no false alarms
    assert f"updated {new_file}: added {N_ALARMS} images (15 in all), {N_ALARMS} of them labelled false alarms" in stderr
    assert "version 2" in stderr and "(was " in stderr and "POST /v1/model/reload" in stderr
    assert line["model"].read_bytes() == original  # the old version stays as it was

    updated = Padim.load(new_file, device="cpu")
    assert model_version(updated) == 2 and updated.n_samples_seen_ == 15
    entry = updated.history_[-1]
    assert entry["images"] == N_ALARMS
    assert entry["records"] == {"db": str(line["db"].resolve()), "inspections": line["alarms"]}
    # the false alarm it learned is good now; the confirmed defect is still flagged
    data = Path(first.image_path).read_bytes()
    after = updated.predict([data])
    assert after.normalized[0] < first.normalized and not after.is_anomalous[0]
    defect = Path(line["inspections"][N_ALARMS + 1].image_path).read_bytes()
    assert updated.predict([defect]).is_anomalous[0]

    # the same again from the new version: nothing new to learn, one line, no version 3
    again = run("update", new_file, "--from-records", line["db"], "--device", "cpu")
    errors = error_lines(again)
    assert len(errors) == 1 and f"{N_ALARMS} learned by an earlier update" in errors[0], again.output
    assert f"{new_file} is unchanged" in errors[0]
    assert not line["model"].with_name("bottle.v3.padim").exists()
    # from the old version again: its next version exists already, and is not overwritten
    stale = run("update", line["model"], "--from-records", line["db"], "--device", "cpu")
    assert len(error_lines(stale)) == 1 and "exists already" in stale.stderr
    assert Padim.load(new_file, device="cpu").history_ == updated.history_


def test_update_from_records_refusals_are_one_line(line, tmp_path):
    before = line["model"].read_bytes()
    with Records(tmp_path / "empty.db"):
        pass
    result = run("update", line["model"], "--from-records", tmp_path / "empty.db", "--device", "cpu")
    errors = error_lines(result)
    assert len(errors) == 1 and "no new false alarms of model 'bottle'" in errors[0] and "none is labelled" in errors[0]
    # another model's name: none of these labels
    result = run("update", line["model"], "--from-records", line["db"], "--model-name", "cap", "--device", "cpu")
    assert len(error_lines(result)) == 1 and "'cap'" in result.stderr
    result = run("update", line["model"], "--from-records", tmp_path / "absent.db")
    assert len(error_lines(result)) == 1 and "no records" in result.stderr
    assert not (tmp_path / "absent.db").exists()
    assert len(error_lines(run("update", line["model"]))) == 1  # neither NEW_GOOD nor --from-records
    assert len(error_lines(run("update", line["model"], tmp_path, "--model-name", "x"))) == 1
    # bytes as recorded, but no image the decoder can read: reported by the inspection's id, nothing learned
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    with Records(tmp_path / "junk.db") as records:
        id_ = records.add(Inspection(path="junk.png", source="watch", station="line1", model="bottle",
                                     model_version=1, verdict="anomalous", score=1.0, image_path=str(junk),
                                     digest=hashlib.sha256(b"not an image").hexdigest()))
        records.label(id_, "false_alarm")
    result = run("update", line["model"], "--from-records", tmp_path / "junk.db", "--device", "cpu")
    assert len(error_lines(result)) == 1 and "no readable images to add" in result.stderr
    assert f"skipped: inspection {id_}: " in result.stderr
    assert line["model"].read_bytes() == before
    assert not line["model"].with_name("bottle.v2.padim").exists()


def test_calibrate_from_records_uses_the_labels_with_the_models_good_scores(line):
    before = Padim.load(line["model"], device="cpu")
    own = before.calibration_.n
    result = assert_ok(run("calibrate", line["model"], "--from-records", line["db"], "--target", "recall=1",
                           "--device", "cpu"))
    assert f"skipped: inspection {line['changed']}: " in result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("threshold ") and "for recall=1 " in lines[0]
    assert "1 caught, 0 missed" in lines[2]
    model = Padim.load(line["model"], device="cpu")
    defect = Path(line["inspections"][N_ALARMS + 1].image_path).read_bytes()
    assert model.threshold_ < float(model.anomaly_scores([defect])[0])
    assert model.threshold_target_ == "recall=1" and model.calibration_.method == "labelled"
    # the good side: the model's own leave-one-out scores and the usable false alarms
    assert model.calibration_.n == own + N_ALARMS
    assert set(before.calibration_.scores) < set(model.calibration_.scores)
    # again: the false alarms already among the model's good scores count once
    assert_ok(run("calibrate", line["model"], "--from-records", line["db"], "--target", "recall=1", "--device", "cpu"))
    again = Padim.load(line["model"], device="cpu")
    assert again.calibration_.n == own + N_ALARMS and again.threshold_ == model.threshold_

    # recall needs a defect: without the confirmed one, one line
    with Records(line["db"]) as records:
        records.label(line["defect"], None)
    result = run("calibrate", line["model"], "--from-records", line["db"], "--target", "f1", "--device", "cpu")
    errors = error_lines(result)
    assert len(errors) == 1 and "needs defective images" in errors[0]
    # fpr needs none: the good side alone
    assert_ok(run("calibrate", line["model"], "--from-records", line["db"], "--target", "fpr=0.2", "--device", "cpu"))
    assert Padim.load(line["model"], device="cpu").threshold_target_ == "fpr=0.2"


def test_one_sqlite_file_has_one_name_in_the_history_however_it_is_given(tmp_path, monkeypatch):
    """A path, a relative sqlite:/// URL and an absolute one name the same file: an update given one form must
    know the inspections learned under another (else they would be learned twice)."""
    from fastpadim.feedback import database_name

    monkeypatch.chdir(tmp_path)
    absolute = str((tmp_path / "insp.db").resolve())
    for given in ("insp.db", "sqlite:///insp.db", f"sqlite:///{absolute}", absolute):
        assert database_name(given, given) == absolute
    url = "postgresql://u:secret@host/db"
    assert database_name(url, "postgresql://u:***@host/db") == "postgresql://u:***@host/db"
