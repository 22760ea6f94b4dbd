"""``fastpadim calibrate``, ``update`` and ``set-threshold`` on .padim and .onnx files, end to end on a small
random-weight model: the target met on labelled images, the threshold written into the file, images added."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import SMALL, make_surfaces, with_spot
from fastpadim.cli import app
from fastpadim.model import Padim
from fastpadim.targets import choose_threshold

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_ok(result):
    assert result.exit_code == 0, result.output
    return result


def one_line_error(result, *words) -> str:
    assert result.exit_code != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.output, result.output
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def write_images(folder: Path, arrays) -> Path:
    folder.mkdir(parents=True)
    for i, array in enumerate(arrays):
        Image.fromarray(array).save(folder / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """good/ and defective/ (labelled, not trained on), more/ (new good images for an update)."""
    root = tmp_path_factory.mktemp("labelled")
    write_images(root / "good", make_surfaces(8, seed=21))
    write_images(root / "defective", [with_spot(a) for a in make_surfaces(6, seed=22)])
    # new good images under brighter light (what an update is for): their out-of-fold scores move the threshold
    write_images(root / "more", [np.clip(a.astype(np.int16) + 40, 0, 255).astype(np.uint8)
                                 for a in make_surfaces(4, seed=23)])
    return root


@pytest.fixture(scope="module")
def fitted_file(tmp_path_factory, train_arrays) -> Path:
    """A small model with an out-of-fold threshold (3 folds), so that an update re-calibrates; a false-alarm rate
    of 0.2, which 10 good scores can show (the threshold is not merely their maximum)."""
    path = tmp_path_factory.mktemp("model") / "small.padim"
    Padim(**{**SMALL, "folds": 3, "false_alarm_rate": 0.2}).fit(train_arrays[:10]).save(path)
    return path


@pytest.fixture
def model_file(fitted_file, tmp_path) -> Path:
    path = tmp_path / "model.padim"
    shutil.copy(fitted_file, path)
    return path


def scores_of(model, folder: Path) -> np.ndarray:
    return model.anomaly_scores(sorted(folder.iterdir())).astype(np.float64)


# ------------------------------------------------------------------------------------------ calibrate
@pytest.mark.parametrize("target", ["recall=1", "f1"])
def test_calibrate_meets_its_target_and_writes_it_into_the_padim(model_file, data, target):
    result = assert_ok(run("calibrate", model_file, "--good", data / "good", "--defective", data / "defective",
                           "--target", target, "--device", "cpu"))
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("threshold ") and f"for {target} " in lines[0]
    assert "8 passed" in lines[1] or "false alarms" in lines[1]
    assert "6 caught, 0 missed" in lines[2]  # a bright square is an obvious defect, even for random weights
    model = Padim.load(model_file, device="cpu")
    assert model.threshold_target_ == target and model.calibration_.method == "labelled"
    assert model.calibration_.n == 8 and model.threshold_count_ == 8
    good, defective = scores_of(model, data / "good"), scores_of(model, data / "defective")
    assert model.threshold_ == pytest.approx(choose_threshold(target, good, defective).threshold)
    assert model.predict(sorted((data / "defective").iterdir())).is_anomalous.all()
    # false-alarm probabilities come from the labelled good scores now
    assert model.predict(sorted((data / "good").iterdir())).false_alarm_probability.min() >= 1 / 9 - 1e-12
    info = assert_ok(run("info", model_file)).stdout
    assert f"target {target}" in info and "labelled, 8 good scores" in info


def test_calibrate_defaults_to_the_models_false_alarm_rate(model_file, data):
    result = assert_ok(run("calibrate", model_file, "--good", data / "good", "--defective", data / "defective",
                           "--device", "cpu"))
    assert "for fpr=0.2" in result.stdout and "warning" not in result.stderr
    meta = json.loads(assert_ok(run("info", model_file, "--json")).stdout)
    assert meta["threshold"]["target"] == "fpr=0.2" and meta["calibration"]["method"] == "labelled"
    assert meta["threshold"]["false_alarm_rate"] == 0.2
    # a rate that 8 good images cannot show: said, as fit says it
    result = assert_ok(run("calibrate", model_file, "--good", data / "good", "--defective", data / "defective",
                           "--target", "fpr=0.01", "--device", "cpu"))
    assert "cannot be estimated from 8 good images" in result.stderr
    assert "warning: a false-alarm rate of 0.01" in assert_ok(run("info", model_file)).stdout


def test_calibrate_refusals_are_one_line(model_file, data, tmp_path):
    before = model_file.read_bytes()
    for target, words in (("fpr=2", "(0, 1)"), ("recall=abc", "not a number"), ("best", "fpr=R")):
        one_line_error(run("calibrate", model_file, "--good", data / "good", "--defective", data / "defective",
                           "--target", target), words)
    one_line_error(run("calibrate", model_file, "--good", data / "good", "--defective", tmp_path / "absent",
                       "--device", "cpu"), "no such file")
    one_line_error(run("calibrate", model_file, "--good", data / "good"), "--defective")
    assert model_file.read_bytes() == before


def test_calibrate_an_onnx_export_and_score_it_as_the_padim(model_file, data, tmp_path):
    pytest.importorskip("onnxruntime", reason="the ONNX runtime extra is not installed")
    from fastpadim import load
    from fastpadim.onnx_runtime import read_metadata

    assert_ok(run("calibrate", model_file, "--good", data / "good", "--defective", data / "defective",
                  "--target", "f1", "--device", "cpu"))
    onnx_path = tmp_path / "model.onnx"
    assert_ok(run("export", model_file, "-o", onnx_path))
    # the export carries the calibration, target and history: the same readable scores as the .padim
    padim, exported = Padim.load(model_file, device="cpu"), load(onnx_path)
    assert exported.calibration_.method == "labelled" and exported.threshold_target_ == "f1"
    assert exported.history_ == padim.history_ and len(exported.history_) == 1
    # (not the calibration's own good images: their scores sit on the step of the p-value, where the engines'
    # rounding decides the side)
    images = sorted((data / "more").iterdir()) + sorted((data / "defective").iterdir())
    expected, got = padim.predict(images), exported.predict(images)
    np.testing.assert_allclose(got.normalized, expected.normalized, rtol=1e-4)
    np.testing.assert_allclose(got.false_alarm_probability, expected.false_alarm_probability, rtol=1e-6)

    data_file = onnx_path.with_name("model.onnx.data")
    data_bytes = data_file.read_bytes()
    result = assert_ok(run("calibrate", onnx_path, "--good", data / "good", "--defective", data / "defective",
                           "--target", "recall=0.5"))
    assert "for recall=0.5" in result.stdout and data_file.read_bytes() == data_bytes  # only the metadata changed
    meta = read_metadata(onnx_path)
    assert meta["threshold"]["target"] == "recall=0.5" and meta["calibration"]["method"] == "labelled"
    assert len(meta["calibration"]["scores"]) == 8
    reloaded = load(onnx_path)
    defective = reloaded.anomaly_scores(sorted((data / "defective").iterdir()))
    assert np.mean(defective > reloaded.threshold_) >= 0.5 and reloaded.threshold_target_ == "recall=0.5"
    assert "target recall=0.5" in assert_ok(run("info", onnx_path)).stdout


# --------------------------------------------------------------------------------------------- update
def test_update_adds_images_and_calibrates_again(model_file, data, tmp_path):
    before = Padim.load(model_file, device="cpu")
    out = tmp_path / "updated.padim"
    original = model_file.read_bytes()
    result = assert_ok(run("update", model_file, data / "more", "-o", out, "--device", "cpu"))
    line = result.stderr.strip().splitlines()[0]
    assert line.startswith(f"updated {out}: added 4 images (14 in all)") and "(was " in line
    assert model_file.read_bytes() == original  # -o: the model itself is left as it was
    after = Padim.load(out, device="cpu")
    assert after.n_samples_seen_ == before.n_samples_seen_ + 4 == 14
    assert len(after.history_) == len(before.history_) + 1 and after.history_[-1]["images"] == 4
    assert after.calibration_.n == before.calibration_.n + 4  # the new images' out-of-fold scores joined
    assert set(before.calibration_.scores) < set(after.calibration_.scores)
    assert after.threshold_ == after.calibration_.threshold(0.2)[0] and after.threshold_target_ == "fpr=0.2"
    assert after.threshold_ != before.threshold_
    info = assert_ok(run("info", out)).stdout
    assert "update" in info and "14 images" in info and "out-of-fold (3 folds), 14 good scores" in info
    # in place by default
    assert_ok(run("update", model_file, data / "more", "--device", "cpu"))
    assert Padim.load(model_file, device="cpu").n_samples_seen_ == 14


def test_update_after_a_labelled_calibration_says_to_calibrate_again(model_file, data):
    assert_ok(run("calibrate", model_file, "--good", data / "good", "--defective", data / "defective",
                  "--target", "recall=1", "--device", "cpu"))
    result = assert_ok(run("update", model_file, data / "more", "--device", "cpu"))
    warning = [line for line in result.stderr.splitlines() if line.startswith("warning: the threshold was set")]
    assert len(warning) == 1 and "recall=1" in warning[0] and "fastpadim calibrate" in warning[0]
    assert "(was " in result.stderr and "for recall=1)" in result.stderr
    assert Padim.load(model_file, device="cpu").threshold_target_ == "fpr=0.2"


def test_update_refuses_onnx_and_format_1_files_in_one_line(model_file, data, tmp_path):
    from fastpadim.modelfile import write_model_file

    onnx_path = tmp_path / "model.onnx"
    onnx_path.write_bytes(b"")  # refused by its name, before anything is read
    one_line_error(run("update", onnx_path, data / "more"), "ONNX export", "export it again")
    # a format-1 file without statistics (the factor only)
    model = Padim.load(model_file, device="cpu")
    meta = {**model.to_metadata(), "format_version": 1}
    old = tmp_path / "old.padim"
    write_model_file(old, meta, {"mean": model.mean_.contiguous(), "whitener": model.whitener_.contiguous(),
                                 "channel_indices": model.channel_indices_.long().contiguous()})
    before = old.read_bytes()
    one_line_error(run("update", old, data / "more", "--device", "cpu"), "format-1", "fit it again")
    one_line_error(run("calibrate", old, "--good", data / "good", "--defective", data / "defective", "--device", "cpu"),
                   "format-1")
    assert old.read_bytes() == before
    assert "not updatable" in assert_ok(run("info", old)).stdout
    # a value is written into the metadata alone: format 1 stays format 1, and loads with it
    assert_ok(run("set-threshold", old, "7.5"))
    assert Padim.load(old, device="cpu").threshold_ == 7.5
    assert json.loads(assert_ok(run("info", old, "--json")).stdout)["format_version"] == 1


# -------------------------------------------------------------------------------------- set-threshold
def test_set_threshold_on_a_padim(model_file, data):
    assert "updatable" in assert_ok(run("info", model_file)).stdout
    result = assert_ok(run("set-threshold", model_file, "12.5"))
    assert "threshold 12.5 (manual)" in result.stderr
    model = Padim.load(model_file, device="cpu")
    assert model.threshold_ == 12.5 and model.threshold_target_ == "manual" and model.threshold_count_ is None
    assert model.calibration_ is not None  # the good scores still give false-alarm probabilities
    assert "12.5 (set by hand)" in assert_ok(run("info", model_file)).stdout

    result = assert_ok(run("set-threshold", model_file, "--good", data / "good", "--false-alarm-rate", "0.25",
                           "--device", "cpu"))
    assert "(fpr=0.25)" in result.stderr
    model = Padim.load(model_file, device="cpu")
    assert model.threshold_target_ == "fpr=0.25" and model.calibration_.method == "good images"
    assert model.threshold_ == pytest.approx(np.quantile(scores_of(model, data / "good"), 0.75, method="higher"))

    assert_ok(run("set-threshold", model_file, "--clear"))
    assert Padim.load(model_file, device="cpu").threshold_ is None
    one_line_error(run("set-threshold", model_file, "3", "--false-alarm-rate", "0.1"), "--good only")
    one_line_error(run("set-threshold", model_file, "3", "--weights", "x.pth"), "--good only")
    one_line_error(run("set-threshold", model_file, "nan"), "finite")
