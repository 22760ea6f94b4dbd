"""A score people can read: ``normalized`` (score / threshold) and ``false_alarm_probability`` beside the raw score in
``fastpadim predict``'s results.csv/json, and the verdict and score drawn on the overlays."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import SMALL, make_surfaces, with_spot
from fastpadim.cli import app
from fastpadim.visualize import Label, draw_label, overlay

runner = CliRunner()


def predict(*args) -> None:
    result = runner.invoke(app, ["predict", *[str(a) for a in args], "--device", "cpu"])
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory) -> Path:
    """A small model whose threshold comes from its 12 training images' out-of-fold scores (2 folds)."""
    from fastpadim import Padim

    model = Padim(**{**SMALL, "folds": 2}).fit(make_surfaces(12, seed=1))
    assert model.calibration_.method == "out-of-fold" and model.threshold_ is not None
    path = tmp_path_factory.mktemp("readable") / "calibrated.padim"
    model.save(path)
    return path


@pytest.fixture(scope="module")
def uncalibrated(tmp_path_factory) -> Path:
    """No threshold and no calibration (folds=0, no hold-out)."""
    from fastpadim import Padim

    path = tmp_path_factory.mktemp("readable") / "plain.padim"
    Padim(**SMALL).fit(make_surfaces(4, seed=1)).save(path)
    return path


@pytest.fixture(scope="module")
def frames(tmp_path_factory) -> Path:
    """Three good surfaces and three with a white square."""
    folder = tmp_path_factory.mktemp("frames")
    for i, array in enumerate(make_surfaces(3, seed=2)):
        Image.fromarray(array).save(folder / f"good{i}.png")
        Image.fromarray(with_spot(array)).save(folder / f"spot{i}.png")
    return folder


def outputs(out: Path) -> tuple[list[dict], dict]:
    return list(csv.DictReader((out / "results.csv").open())), json.loads((out / "results.json").read_text())


# ------------------------------------------------------------------------------------------ predict
def test_results_carry_the_normalized_score_and_false_alarm_probability(calibrated, frames, tmp_path):
    predict(calibrated, frames, "-o", tmp_path / "out")
    rows, summary = outputs(tmp_path / "out")
    header = (tmp_path / "out/results.csv").read_text().splitlines()[0]
    assert header.startswith("image,score,normalized,false_alarm_probability,verdict,overlay,mask,")
    threshold = summary["threshold"]
    assert summary["calibration"] == {"method": "out-of-fold", "folds": 2, "n_good_images": 12, "target": "fpr=0.01",
                                      "false_alarm_rate": 0.01, "extrapolated": False}
    assert len(rows) == len(summary["images"]) == 6
    for row, entry in zip(rows, summary["images"]):
        assert list(entry)[:5] == ["image", "score", "normalized", "false_alarm_probability", "verdict"]
        assert float(row["normalized"]) == pytest.approx(entry["normalized"])
        assert float(row["false_alarm_probability"]) == pytest.approx(entry["false_alarm_probability"])
        assert entry["normalized"] == pytest.approx(entry["score"] / threshold, rel=1e-5)
        assert 0 < entry["false_alarm_probability"] <= 1
        assert (entry["verdict"] == "anomalous") == (entry["normalized"] > 1)
    # a higher score is never a likelier false alarm
    ordered = sorted(summary["images"], key=lambda e: e["score"])
    probabilities = [e["false_alarm_probability"] for e in ordered]
    assert probabilities == sorted(probabilities, reverse=True)
    spots = [e for e in summary["images"] if "spot" in e["image"]]
    goods = [e for e in summary["images"] if "good" in e["image"]]
    assert max(e["false_alarm_probability"] for e in spots) <= min(e["false_alarm_probability"] for e in goods)


def test_at_the_threshold_the_normalized_score_is_one(calibrated, frames, tmp_path):
    predict(calibrated, frames, "-o", tmp_path / "first", "--no-maps")
    _, first = outputs(tmp_path / "first")
    middle = sorted(first["images"], key=lambda e: e["score"])[2]
    predict(calibrated, frames, "-o", tmp_path / "out", "--no-maps", "--threshold", repr(middle["score"]))
    _, summary = outputs(tmp_path / "out")
    entry = next(e for e in summary["images"] if e["image"] == middle["image"])
    assert entry["normalized"] == pytest.approx(1.0, abs=1e-5)  # (the verdict: a hair either side, as rounded)
    # a threshold given by hand: the probabilities are still the calibration's, the target says so
    assert entry["false_alarm_probability"] == middle["false_alarm_probability"]
    assert summary["calibration"]["target"] == "manual"


def test_without_threshold_or_calibration_the_columns_are_empty(uncalibrated, frames, tmp_path):
    predict(uncalibrated, frames, "-o", tmp_path / "out")
    rows, summary = outputs(tmp_path / "out")
    assert summary["threshold"] is None and summary["calibration"] is None
    assert all(r["normalized"] == "" and r["false_alarm_probability"] == "" and r["verdict"] == "unknown" for r in rows)
    assert all(e["normalized"] is None and e["false_alarm_probability"] is None for e in summary["images"])


# ------------------------------------------------------------------------------------------ overlays
def band_rows(labelled: np.ndarray, plain: np.ndarray) -> int:
    """How many rows from the top differ between a labelled overlay and the plain one (the band's height)."""
    differs = np.any(labelled != plain, axis=(1, 2))
    assert differs[0], "the band starts at the top"
    return int(np.argmin(differs)) if not differs.all() else len(differs)


def test_predict_overlays_show_the_verdict_and_score(calibrated, frames, tmp_path):
    from fastpadim import Padim

    predict(calibrated, frames, "-o", tmp_path / "out")
    rows, summary = outputs(tmp_path / "out")
    model = Padim.load(calibrated, device="cpu")
    scored = {r.name: r for batch in model.iter_scored(sorted(str(p) for p in frames.iterdir()), keep_view=True)
              for r in batch}
    for row in rows:
        result = scored[row["image"]]
        plain = np.asarray(overlay(result.view, result.frame_map, summary["threshold"]))
        drawn = np.asarray(Image.open(row["overlay"]))
        assert drawn.shape == plain.shape == (*result.view.shape[:2], 3)  # the frame's size
        band = band_rows(drawn, plain)
        assert 0 < band <= 0.4 * drawn.shape[0]
        # below the band the heatmap is untouched (up to the map's resizing in another batch)
        assert np.abs(drawn[band:].astype(int) - plain[band:].astype(int)).max() <= 2
        # the band is dark, with light text on it
        assert drawn[:band].mean() < 0.6 * plain[:band].mean()
        assert (drawn[:band].max(axis=2) > 200).sum() > 20


@pytest.mark.parametrize("height, width", [(48, 48), (64, 64), (96, 192), (256, 256), (1080, 1920), (3000, 4000)])
def test_the_label_scales_with_the_frame(height, width):
    rng = np.random.default_rng(0)
    view = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    amap = rng.random((height, width)).astype(np.float32)
    plain = np.asarray(overlay(view, amap, 0.5))
    drawn = np.asarray(overlay(view, amap, 0.5, label=Label("anomalous", 12.3456, 1.2345)))
    assert drawn.shape == plain.shape == (height, width, 3)
    band = band_rows(drawn, plain)
    assert band <= 0.4 * height
    # the text grows with the frame: its band is a similar share of the height on large frames
    if min(height, width) >= 256:
        assert band >= 0.08 * height
    # the verdict line in red: more red than green or blue somewhere in the band
    red = (drawn[:band, :, 0].astype(int) - drawn[:band, :, 1:].max(axis=2)) > 80
    assert red.any()


def test_a_frame_too_small_for_text_is_left_as_it_is():
    image = Image.new("RGB", (12, 12), (40, 90, 200))
    before = np.asarray(image).copy()
    assert np.array_equal(np.asarray(draw_label(image, Label("good", 1.0, 0.5))), before)


def test_the_label_text_says_verdict_score_and_multiple():
    full, short, line = Label("good", 3.14159, 0.8712).variants()
    assert full == ["GOOD", "score 3.142 = 0.87x threshold"]
    assert short == ["GOOD", "3.142 = 0.87x"] and line == ["GOOD 0.87x"]
    assert Label("unknown", 3.14159).variants()[0] == ["UNKNOWN", "score 3.142 (no threshold)"]
    assert not any(ord(c) > 127 for variant in Label("anomalous", math.pi, 9.5).variants() for s in variant for c in s)
