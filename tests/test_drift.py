"""Drift alarms (``fastpadim.drift``): the share flagged against the calibration's false-alarm rate (binomial test)
and the passed images' scores against the calibration's (Kolmogorov–Smirnov), on synthetic scores and on a real
small model's scores of new good surfaces, brightened ones and slightly brightened ones."""

from __future__ import annotations

import datetime
import json
import threading

import numpy as np
import pytest

from conftest import SMALL, make_surfaces
from fastpadim.calibration import Calibration, Tail
from fastpadim.drift import MIN_EXPECTED_SHARE, DriftMonitor, expected_share
from fastpadim.errors import FastpadimError

THRESHOLD = 10.0


def good_scores(n: int, seed: int) -> np.ndarray:
    """Scores of good parts: mostly well below the threshold (10), about 1 % above it."""
    return np.random.default_rng(seed).gamma(9.0, 0.5, n)  # mean 4.5; P(> 10) ≈ 0.7 %


@pytest.fixture(scope="module")
def calibration() -> Calibration:
    return Calibration(good_scores(1000, seed=0), "hold-out")


def monitor(calibration, scores, **kwargs) -> DriftMonitor:
    drift = DriftMonitor(calibration, THRESHOLD, 0.01, **kwargs)
    for score in scores:
        drift.observe(float(score))
    return drift


# ------------------------------------------------------------------------------------------ synthetic scores
def test_good_scores_raise_no_alarm(calibration):
    status = monitor(calibration, good_scores(200, seed=1)).status()
    assert status["ready"] and status["images"] == 200 and not status["alarm"] and status["reasons"] == []
    assert status["rate_p_value"] > 0.01 and status["ks_p_value"] > 0.01
    above = int(np.sum(calibration.scores > THRESHOLD))
    assert status["expected_share"] == pytest.approx((above + 1) / 1001)
    assert set(status["quantiles"]) == {"0.5", "0.9", "0.99"}
    assert status["quantiles"]["0.5"] == pytest.approx(np.median(good_scores(200, seed=1)) / THRESHOLD)
    json.dumps(status)  # JSON-ready


def test_many_flagged_images_raise_the_rate_alarm(calibration):
    scores = np.concatenate([good_scores(176, seed=2), np.full(24, 15.0)])  # 12 % flagged
    status = monitor(calibration, scores).status()
    assert status["alarm"] and status["rate_p_value"] < 1e-6
    assert status["flagged_share"] == pytest.approx((24 + np.sum(good_scores(176, seed=2) > THRESHOLD)) / 200)
    assert status["ks_p_value"] > 0.001  # the passed ones did not move
    [reason] = status["reasons"]
    assert reason.startswith(f"{100 * status['flagged_share']:.1f} % of the last 200 images flagged, ")
    assert "% expected (p = " in reason and "e-" in reason


def test_passed_scores_that_moved_raise_the_ks_alarm_before_false_alarms_pile_up(calibration):
    shifted = np.minimum(good_scores(200, seed=3) * 1.3, THRESHOLD)  # higher, still passing
    status = monitor(calibration, shifted).status()
    assert status["flagged_share"] == 0 and status["rate_p_value"] > 0.5
    assert status["alarm"] and status["ks_statistic"] > 0.2 and status["ks_p_value"] < 1e-6
    [reason] = status["reasons"]
    assert reason.startswith("passed images' scores moved up from the calibration") and "KS 0." in reason
    darker = monitor(calibration, good_scores(200, seed=3) * 0.7).status()
    assert darker["alarm"] and "moved down" in darker["reasons"][0]


def test_no_test_before_min_images_and_the_window_keeps_the_latest(calibration):
    drift = monitor(calibration, np.full(49, 15.0), window=100, min_images=50)
    status = drift.status()
    assert not status["ready"] and not status["alarm"] and status["rate_p_value"] is None
    assert status["flagged_share"] == 1.0
    assert status["reasons"] == ["waiting for 50 images to test for drift, 49 so far"]
    drift.observe(15.0)
    assert drift.status()["alarm"]
    start = datetime.datetime(2024, 5, 1, tzinfo=datetime.UTC)
    for i, score in enumerate(good_scores(100, seed=4)):
        drift.observe(float(score), at=start + datetime.timedelta(seconds=i))
    status = drift.status()
    assert status["images"] == 100 and not status["alarm"]  # the flagged ones left the window
    assert status["since"] == "2024-05-01T00:00:00+00:00"
    drift.reset()
    assert drift.status()["images"] == 0 and drift.status()["since"] is None


def test_non_finite_scores_are_not_observed_and_observe_is_thread_safe(calibration):
    drift = DriftMonitor(calibration, THRESHOLD, 0.01, window=5000)
    drift.observe(float("nan"))
    drift.observe(float("inf"))
    threads = [threading.Thread(target=lambda: [drift.observe(5.0) for _ in range(500)]) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert drift.status()["images"] == 2000


def test_without_threshold_or_calibration_no_test_and_the_status_says_why(calibration):
    status = monitor(calibration, np.full(100, 15.0)).status()
    assert status["alarm"]  # (the same scores with both)
    no_threshold = DriftMonitor(calibration, None, 0.01)
    for _ in range(100):
        no_threshold.observe(15.0)
    status = no_threshold.status()
    assert not status["alarm"] and status["reasons"][0].startswith("no threshold")
    assert status["flagged_share"] is None and status["quantiles"] is None and status["images"] == 100
    no_calibration = DriftMonitor(None, THRESHOLD, 0.01)
    for _ in range(100):
        no_calibration.observe(15.0)
    status = no_calibration.status()
    assert not status["alarm"] and status["reasons"][0].startswith("no calibration")
    assert status["flagged_share"] == 1.0 and status["expected_share"] == 0.01 and status["rate_p_value"] is None


def test_expected_share_is_conformal_or_the_tail_beyond_the_scores():
    small = Calibration(np.arange(1.0, 41.0), "out-of-fold")  # 40 scores
    assert expected_share(small, 40.0) == pytest.approx(1 / 41)  # at the highest: not 0
    assert expected_share(small, 36.5) == pytest.approx(5 / 41)  # 37..40 above
    heavy = Calibration(np.arange(1.0, 41.0), "out-of-fold", tail=Tail(30.0, 0.2, 4.0, 0.25))
    beyond = expected_share(heavy, 45.0)
    assert beyond == pytest.approx(heavy.tail.survival(45.0)) and 0 < beyond < 1 / 41
    assert small.tail.survival(45.0) == 0  # a bounded tail (fitted to these 40) ends before 45: not 0 % expected
    assert expected_share(small, 45.0) == MIN_EXPECTED_SHARE


def test_bad_settings_are_refused(calibration):
    with pytest.raises(FastpadimError, match="window"):
        DriftMonitor(calibration, THRESHOLD, 0.01, window=0)
    with pytest.raises(FastpadimError, match="minimum"):
        DriftMonitor(calibration, THRESHOLD, 0.01, window=10, min_images=20)
    with pytest.raises(FastpadimError, match="alpha"):
        DriftMonitor(calibration, THRESHOLD, 0.01, alpha=0)


# ------------------------------------------------------------------------------------------ a real model
@pytest.fixture(scope="module")
def model_and_surfaces():
    """A small model calibrated by leave-one-out on 40 surfaces, and 80 new good surfaces."""
    from fastpadim import Padim

    model = Padim(**{**SMALL, "folds": "all"}).fit(make_surfaces(40, seed=1))
    assert model.threshold_ is not None and model.calibration_.n == 40
    return model, make_surfaces(80, seed=3)


def brightened(images, by: int) -> list[np.ndarray]:
    return [np.clip(image.astype(np.int16) + by, 0, 255).astype(np.uint8) for image in images]


def watched(model, images) -> dict:
    drift = DriftMonitor(model.calibration_, model.threshold_, model.false_alarm_rate)
    for score in model.anomaly_scores(images):
        drift.observe(float(score))
    return drift.status()


def test_a_real_model_raises_no_alarm_on_new_good_parts_and_one_on_brighter_images(model_and_surfaces):
    model, new = model_and_surfaces
    status = watched(model, new)
    assert status["ready"] and not status["alarm"] and status["reasons"] == []
    assert status["rate_p_value"] > 0.01 and status["ks_p_value"] > 0.05
    bright = watched(model, brightened(new, 40))
    assert bright["alarm"] and bright["flagged_share"] > 0.5 and bright["rate_p_value"] < 1e-9
    assert any("of the last 80 images flagged" in reason for reason in bright["reasons"])


def test_a_real_model_slightly_brighter_images_move_the_passed_scores_first(model_and_surfaces):
    """+20 grey levels: few false alarms yet (no rate alarm), but the passed images' scores moved up."""
    model, new = model_and_surfaces
    status = watched(model, brightened(new, 20))
    assert status["rate_p_value"] > 0.001 and status["ks_p_value"] < 0.001 and status["alarm"]
    assert [reason.split(" (")[0] for reason in status["reasons"]] == [
        "passed images' scores moved up from the calibration"]
