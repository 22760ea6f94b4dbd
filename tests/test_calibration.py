"""Out-of-fold calibration: exact fold models, update = fit on all, thresholds and readable scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastpadim import Padim
from fastpadim.calibration import Calibration, fold_assignment
from fastpadim.errors import FastpadimError
from fastpadim.gaussian import GaussianStats

from conftest import SMALL, make_surfaces, with_spot

CALIBRATED = {**SMALL, "folds": 3}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_out_of_fold_statistics_equal_a_fit_without_the_fold(train_arrays):
    model = Padim(**CALIBRATED).prepare().accumulate(train_arrays)
    assignment = fold_assignment(len(train_arrays), 3, model.seed)
    for fold in range(3):
        members = [a for a, f in zip(train_arrays, assignment) if f == fold]
        others = [a for a, f in zip(train_arrays, assignment) if f != fold]
        total = GaussianStats(model.stats_.count, model.stats_.mean.clone(), model.stats_.scatter.clone())
        part, cached = model._fold_statistics(members)
        assert cached is not None and sum(n for _, n in cached) == len(members)
        rest = total.without(part)
        refit = Padim(**CALIBRATED).prepare().accumulate(others).stats_
        assert rest.count == refit.count == len(others)
        assert relative(rest.mean, refit.mean) < 1e-6
        assert relative(rest.scatter, refit.scatter) < 1e-6


def test_out_of_fold_scores_are_each_fold_scored_by_the_other_folds_model(train_arrays):
    model = Padim(**CALIBRATED).fit(train_arrays)
    assignment = fold_assignment(len(train_arrays), 3, model.seed)
    expected = []
    for fold in range(3):
        others = [a for a, f in zip(train_arrays, assignment) if f != fold]
        members = [a for a, f in zip(train_arrays, assignment) if f == fold]
        expected += Padim(**SMALL).fit(others).anomaly_scores(members).tolist()
    np.testing.assert_allclose(model.calibration_.scores, np.sort(expected), rtol=1e-5)
    assert model.calibration_.method == "out-of-fold" and model.calibration_.folds == 3
    assert model.n_samples_seen_ == len(train_arrays)  # none lost to the threshold
    assert model.threshold_ == pytest.approx(np.quantile(expected, 1 - model.false_alarm_rate, method="higher"),
                                             rel=1e-5) or model.threshold_extrapolated_


def test_update_equals_a_fit_on_all_images_and_recalibrates(train_arrays, test_arrays, tmp_path):
    first = Padim(**CALIBRATED).fit(train_arrays[:10])
    before = first.calibration_.n
    first.save(tmp_path / "m.padim")
    updated = Padim.load(tmp_path / "m.padim", device="cpu").partial_fit(train_arrays[10:])
    whole = Padim(**CALIBRATED).fit(train_arrays)
    np.testing.assert_allclose(updated.anomaly_scores(test_arrays), whole.anomaly_scores(test_arrays), rtol=1e-5)
    assert updated.n_samples_seen_ == len(train_arrays)
    assert updated.calibration_.n == before + len(train_arrays) - 10  # the new images' out-of-fold scores joined
    value, _ = updated.calibration_.threshold(updated.false_alarm_rate)
    assert updated.threshold_ == value
    updated.anomaly_scores(test_arrays)  # the threshold is current: predict does not refuse
    assert updated.predict(test_arrays).is_anomalous is not None
    assert [entry["images"] for entry in updated.history_] == [10, len(train_arrays) - 10]
    assert all(entry["digest"].startswith("sha256:") for entry in updated.history_)


@pytest.mark.parametrize("params", [
    {}, {"factor_dtype": "float16"}, {"crop_size": 48}, {"image_size": (64, 96), "squash": True}, {"pool": 2},
    {"tile": 32}, {"tile": 32, "tile_shared": True}, {"n_features": "all", "layers": [1]},
], ids=["default", "float16", "crop", "rectangular", "pool", "tiles", "shared-tiles", "layer1-all"])
def test_save_load_update_works_for_every_model_fit_writes(params, tmp_path):
    images = make_surfaces(8, size=96, seed=5)
    model = Padim(**{**CALIBRATED, "folds": 2, **params}).fit(images[:5])
    model.save(tmp_path / "m.padim")
    loaded = Padim.load(tmp_path / "m.padim", device="cpu")
    loaded.partial_fit(images[5:])
    loaded.save(tmp_path / "m.padim")
    again = Padim.load(tmp_path / "m.padim", device="cpu")
    assert again.n_samples_seen_ == 8 and len(again.history_) == 2 and again.threshold_ is not None
    whole = Padim(**{**CALIBRATED, "folds": 2, **params}).fit(images)
    np.testing.assert_allclose(again.anomaly_scores(images[:2]), whole.anomaly_scores(images[:2]), rtol=1e-5)


def test_normalized_score_is_one_at_the_threshold_and_probability_falls(train_arrays, test_arrays):
    model = Padim(**CALIBRATED).fit(train_arrays)
    spotted = with_spot(test_arrays[0])
    results = [r for batch in model.iter_scored([test_arrays[0], spotted]) for r in batch]
    for r in results:
        assert r.normalized == pytest.approx(r.score / model.threshold_)
    assert results[1].score > results[0].score
    assert results[1].false_alarm_probability < results[0].false_alarm_probability
    calibration = model.calibration_
    at = calibration.false_alarm_probability(model.threshold_)
    assert model.threshold_ / model.threshold_ == 1.0 and 0 < at <= 1
    predictions = model.predict([test_arrays[0], spotted])
    np.testing.assert_allclose(predictions.normalized, predictions.scores / model.threshold_, rtol=1e-6)


def test_calibration_quantile_tail_and_probability():
    rng = np.random.default_rng(0)
    scores = rng.gamma(4.0, 10.0, size=400)
    calibration = Calibration(scores, "out-of-fold", 5)
    value, extrapolated = calibration.threshold(0.05)
    assert not extrapolated and value == np.quantile(scores, 0.95, method="higher")
    assert (scores > value).mean() <= 0.05
    value, extrapolated = calibration.threshold(0.001)  # 0.4 expected exceedances: beyond the data
    assert extrapolated and value >= scores.max()
    truth = 10.0 * __import__("scipy").stats.gamma(4.0).ppf(0.999)
    assert 0.7 * truth < value < 1.3 * truth  # the tail model's extrapolation lands near the true quantile
    # the conformal p-value inside the data, the tail's beyond it; decreasing either way
    grid = np.linspace(scores.min(), scores.max() * 1.5, 50)
    probabilities = [calibration.false_alarm_probability(s) for s in grid]
    assert all(a >= b for a, b in zip(probabilities, probabilities[1:]))
    assert calibration.false_alarm_probability(scores.min()) == 1.0
    restored = Calibration.from_dict(calibration.to_dict())
    assert restored.threshold(0.001) == calibration.threshold(0.001)


def test_few_good_scores_give_their_maximum_without_a_tail():
    calibration = Calibration([1.0, 2.0, 3.0, 4.0, 5.0], "good images")
    assert calibration.tail is None and calibration.threshold(0.01) == (5.0, False)
    with pytest.raises(FastpadimError, match="finite"):
        Calibration([1.0, float("nan")], "good images")


def test_folds_must_be_zero_or_at_least_two(train_arrays):
    with pytest.raises(FastpadimError, match="folds"):
        Padim(**{**SMALL, "folds": 1}).fit(train_arrays)
    with pytest.raises(FastpadimError, match="folds"):
        Padim(**{**SMALL, "folds": 2}).fit(train_arrays[:3])  # a fold model of 1 image


def test_leave_one_out_in_closed_form_matches_refits_without_each_image(train_arrays):
    """folds="all": each image's fold model from the full model's distances; against exact refits without each
    image (k-fold with k = n) the distances may be at most sqrt(1 + 1/(n − 2)) too small, never larger."""
    images = train_arrays[:10]
    loo = Padim(**{**SMALL, "folds": "all"}).fit(images)
    exact = Padim(**{**SMALL, "folds": len(images)}).fit(images)
    assert loo.calibration_.folds == "all" and loo.n_samples_seen_ == len(images)
    ratio = loo.calibration_.scores / exact.calibration_.scores
    assert np.all(ratio <= 1 + 1e-5) and np.all(ratio >= 1 / np.sqrt(1 + 1 / (len(images) - 2)) - 1e-5)
