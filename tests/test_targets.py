"""Threshold targets on labelled scores (``fastpadim.targets``): each target met on synthetic scores, ties, bad
targets in one line, and what a chosen threshold installs on a model."""

from __future__ import annotations

import numpy as np
import pytest

from fastpadim.calibration import Calibration
from fastpadim.errors import FastpadimError
from fastpadim.results import ScoringMixin
from fastpadim.targets import (
    Target, apply_choice, choose_threshold, confusion, manual_threshold, parse_target,
)


@pytest.fixture(scope="module")
def scores() -> tuple[np.ndarray, np.ndarray]:
    """Good scores around 10, defective ones around 14: overlapping, as on a real line."""
    rng = np.random.default_rng(0)
    return rng.normal(10, 1, 400), rng.normal(14, 2, 120)


@pytest.mark.parametrize("text, expected", [
    ("fpr=0.01", Target("fpr", 0.01)), ("recall=0.99", Target("recall", 0.99)), ("recall=1", Target("recall", 1.0)),
    ("f1", Target("f1")), (" F1 ", Target("f1")), ("fpr=1e-4", Target("fpr", 1e-4)),
])
def test_targets_parse_and_print_as_the_model_file_stores_them(text, expected):
    target = parse_target(text)
    assert target == expected
    assert parse_target(str(target)) == target and str(target) in ("fpr=0.01", "recall=0.99", "recall=1", "f1", "fpr=0.0001")


@pytest.mark.parametrize("text, words", [
    ("fpr=2", "(0, 1)"), ("fpr=0", "(0, 1)"), ("fpr=1", "(0, 1)"), ("recall=abc", "not a number"),
    ("recall=0", "(0, 1]"), ("recall=1.5", "(0, 1]"), ("fpr=nan", "(0, 1)"), ("precision=0.9", "fpr=R"),
    ("f1=0.5", "fpr=R"), ("fpr", "fpr=R"), ("", "fpr=R"),
])
def test_bad_targets_are_one_line(text, words):
    with pytest.raises(FastpadimError) as caught:
        parse_target(text)
    assert words in str(caught.value) and "\n" not in str(caught.value)


def test_fpr_target_is_the_calibration_quantile(scores):
    good, defective = scores
    choice = choose_threshold("fpr=0.05", good, defective)
    assert choice.threshold == Calibration(good, "labelled").threshold(0.05)[0] and not choice.extrapolated
    assert choice.confusion.false_alarm_rate <= 0.05
    assert choice.confusion.n_good == 400 and choice.confusion.n_defective == 120
    # below 1/n good images: the tail model extrapolates, and says so
    assert choose_threshold("fpr=0.0001", good, defective).extrapolated


@pytest.mark.parametrize("recall", [0.5, 0.9, 0.95, 0.99, 1.0])
def test_recall_target_catches_enough_defects_with_the_highest_cut(scores, recall):
    good, defective = scores
    choice = choose_threshold(f"recall={recall}", good, defective)
    assert choice.confusion.recall >= recall
    # the highest such threshold: the next defect up is the last one it must catch, and no score lies between
    caught = np.sort(defective[defective > choice.threshold])
    assert (len(caught) - 1) / len(defective) < recall
    everything = np.concatenate([good, defective])
    assert not np.any((everything > choice.threshold) & (everything < caught[0]))
    assert choice.threshold not in everything  # midway between two scores: rounding cannot flip a verdict


def test_f1_target_is_the_best_f1_over_every_cut(scores):
    good, defective = scores
    choice = choose_threshold("f1", good, defective)
    everything = np.sort(np.concatenate([good, defective]))
    best = max(confusion(good, defective, t).f1 or 0.0 for t in np.concatenate([[everything[0] - 1], everything]))
    assert choice.confusion.f1 == pytest.approx(best)
    assert 0.8 < choice.confusion.f1 < 1  # the classes overlap


def test_a_score_equal_to_the_threshold_is_good():
    matrix = confusion([1.0, 2.0], [2.0, 3.0], 2.0)
    assert (matrix.good_passed, matrix.false_alarms, matrix.defects_caught, matrix.defects_missed) == (2, 0, 1, 1)
    assert matrix.recall == 0.5 and matrix.false_alarm_rate == 0.0 and matrix.precision == 1.0


def test_separable_scores_get_a_perfect_cut_between_the_classes():
    good, defective = [1.0, 2.0, 3.0], [5.0, 6.0]
    for target in ("recall=1", "f1"):
        choice = choose_threshold(target, good, defective)
        assert choice.threshold == 4.0 and choice.confusion.f1 == 1.0
    # every score a defect: the cut goes below the lowest
    assert choose_threshold("recall=1", [7.0], [5.0, 6.0]).threshold < 5.0


def test_labelled_targets_need_defects_and_finite_scores():
    with pytest.raises(FastpadimError, match="needs scores of defective images"):
        choose_threshold("recall=0.9", [1.0, 2.0], [])
    with pytest.raises(FastpadimError, match="NaN or infinite"):
        choose_threshold("f1", [1.0, float("nan")], [3.0])
    with pytest.raises(FastpadimError, match="no scores of good images"):
        choose_threshold("f1", [], [3.0])
    assert choose_threshold("fpr=0.5", [1.0, 2.0, 3.0, 4.0]).confusion.n_defective == 0  # fpr: good images suffice


class Scored(ScoringMixin):
    """Just the attributes a threshold lives in (as on Padim and OnnxPadim)."""

    false_alarm_rate = 0.01
    n_samples_seen_ = 10


def test_a_choice_installs_its_threshold_target_and_labelled_calibration(scores):
    good, defective = scores
    model = Scored()
    choice = choose_threshold("recall=0.9", good, defective)
    apply_choice(model, choice, good)
    assert model.threshold_ == choice.threshold and model.threshold_target_ == "recall=0.9"
    assert model.calibration_.method == "labelled" and model.calibration_.n == len(good)
    assert model.threshold_count_ == len(good) and model.threshold_rate_ == 0.01 and not model.threshold_extrapolated_
    # false-alarm probabilities now come from these good scores
    assert model._readable(float(np.max(good)) + 1e-9, model.threshold_)["false_alarm_probability"] <= 1 / 401 + 1e-12
    apply_choice(model, choose_threshold("fpr=0.05", good, defective), good)
    assert model.threshold_target_ == "fpr=0.05" and model.threshold_rate_ == 0.05


def test_a_manual_threshold_keeps_the_rate_and_drops_the_good_count():
    th = {"image": 3.0, "false_alarm_rate": 0.02, "n_good_images": 40, "n_train_images": 9, "target": "fpr=0.02",
          "extrapolated": True}
    assert manual_threshold(th, 5, 12) == {"image": 5.0, "false_alarm_rate": 0.02, "n_good_images": None,
                                          "n_train_images": 12, "target": "manual", "extrapolated": False}
    assert manual_threshold(th, None, 12)["image"] is None and manual_threshold(th, None, 12)["target"] is None
