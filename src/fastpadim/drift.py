"""Drift alarms: whether the images a model now judges still look like the good images it was calibrated on.

A ``DriftMonitor`` keeps the scores of the last ``window`` judged images and compares them with the model's
calibration (good images' scores it did not learn from, ``fastpadim.calibration``) by two tests:

- the share flagged: more images above the threshold than the calibration's own false-alarm rate predicts
  (one-sided binomial test). It catches what the line notices first: a pile of false alarms (new lighting, a
  moved camera, another batch of material), or a real run of defects;
- the passed images' scores (two-sample Kolmogorov–Smirnov test against the calibration's scores below the
  threshold, both as score / threshold): a shift of the whole distribution while it is still under the
  threshold, so a drift shows before the false alarms pile up (and also scores that fell, e.g. a darker image
  that hides defects).

An alarm needs ``min_images`` in the window and either p-value below ``alpha`` (small: the tests run again after
every image, and a false drift alarm costs people's trust in the real ones). SciPy is imported on ``status()``.
"""

from __future__ import annotations

import datetime
import math
import threading
from collections import deque

import numpy as np

from .calibration import Calibration
from .errors import FastpadimError

QUANTILES = (0.5, 0.9, 0.99)
# a threshold past a bounded tail's end expects 0 %: one flagged image would then be an alarm
MIN_EXPECTED_SHARE = 1e-4
KS_MIN_SCORES = 20  # passed images (and calibration scores below the threshold) a KS test needs


def format_p(p: float) -> str:
    """A p-value in one significant digit: 3e-9, 0.02."""
    return f"{p:.1g}".replace("e-0", "e-")


def percent(share: float) -> str:
    return f"{100 * share:.1f} %"


def expected_share(calibration: Calibration, threshold: float) -> float:
    """The share of good images the threshold flags, by the calibration: (k + 1) / (n + 1) with k of its n scores
    above the threshold (conformal: the chance that one more good image scores above it; with n = 40 and the
    threshold at their maximum, 1/41 rather than 0). Beyond the highest score, the tail model's estimate (a rate
    below 1/n extrapolated; at least MIN_EXPECTED_SHARE), else 1 / (n + 1)."""
    scores = calibration.scores
    if threshold > scores[-1] and calibration.tail is not None:
        return max(calibration.tail.survival(threshold), MIN_EXPECTED_SHARE)
    above = calibration.n - int(np.searchsorted(scores, threshold, side="right"))
    return (above + 1) / (calibration.n + 1)


class DriftMonitor:
    """The last ``window`` scores of judged images against a model's calibration; ``observe`` from any thread,
    ``status()`` for the numbers and the alarm, ``reset()`` when another model is loaded."""

    def __init__(self, calibration: Calibration | None, threshold: float | None, false_alarm_rate: float | None,
                 window: int = 200, min_images: int = 50, alpha: float = 0.001):
        if not (isinstance(window, int) and window >= 1):
            raise FastpadimError(f"the drift window must be at least 1 image, got {window!r}")
        if not (isinstance(min_images, int) and 1 <= min_images <= window):
            raise FastpadimError(f"the drift test's minimum must be between 1 and the window ({window}) images, "
                                 f"got {min_images!r}")
        if not 0 < alpha < 1:
            raise FastpadimError(f"the drift test's alpha must be between 0 and 1, got {alpha!r}")
        self.window, self.min_images, self.alpha = window, min_images, alpha
        self.threshold = threshold if threshold is not None and math.isfinite(threshold) and threshold > 0 else None
        self.calibration = calibration
        self.expected_share = false_alarm_rate  # reported only: without a calibration there is no test
        self.calibration_passed = None
        if self.threshold is not None and calibration is not None:
            self.expected_share = expected_share(calibration, self.threshold)
            self.calibration_passed = calibration.scores[calibration.scores <= self.threshold] / self.threshold
        self._images: deque[tuple[datetime.datetime, float]] = deque(maxlen=window)
        self._lock = threading.Lock()

    def observe(self, score: float, at: datetime.datetime | None = None) -> None:
        """One judged image's score; a non-finite one (no verdict) is ignored."""
        if score is None or not math.isfinite(score):
            return
        with self._lock:
            self._images.append((at or datetime.datetime.now(datetime.UTC), float(score)))

    def reset(self) -> None:
        with self._lock:
            self._images.clear()

    def status(self) -> dict:
        """JSON-ready numbers of the window, both tests' p-values, the alarm and its reasons (or why no test)."""
        with self._lock:
            images = list(self._images)
        n = len(images)
        out = {"images": n, "window": self.window, "min_images": self.min_images, "flagged_share": None,
               "expected_share": self.expected_share, "rate_p_value": None, "ks_statistic": None,
               "ks_p_value": None, "alarm": False, "reasons": [], "quantiles": None,
               "since": images[0][0].isoformat() if images else None, "ready": n >= self.min_images}
        if self.threshold is None:
            out["reasons"].append("no threshold: the model gives no verdicts to watch for drift")
            return out
        normalized = np.array([score for _, score in images], np.float64) / self.threshold
        if n:
            out["flagged_share"] = float(np.mean(normalized > 1.0))
            out["quantiles"] = {str(q): float(v) for q, v in zip(QUANTILES, np.quantile(normalized, QUANTILES))}
        if self.calibration is None:
            out["reasons"].append("no calibration: the model file holds no good images' scores to compare with "
                                  "(fastpadim calibrate adds them)")
            return out
        if n < self.min_images:
            out["reasons"].append(f"waiting for {self.min_images} images to test for drift, {n} so far")
            return out
        out.update(self._tests(normalized))
        return out

    def _tests(self, normalized: np.ndarray) -> dict:
        from scipy.stats import binomtest, ks_2samp

        n = len(normalized)
        flagged = int(np.sum(normalized > 1.0))
        rate_p = float(binomtest(flagged, n, self.expected_share, alternative="greater").pvalue)
        reasons = []
        if rate_p < self.alpha:
            reasons.append(f"{percent(flagged / n)} of the last {n} images flagged, {percent(self.expected_share)} "
                           f"expected (p = {format_p(rate_p)})")
        passed = normalized[normalized <= 1.0]
        ks, ks_p = None, None
        if len(passed) >= KS_MIN_SCORES and len(self.calibration_passed) >= KS_MIN_SCORES:
            result = ks_2samp(passed, self.calibration_passed)
            ks, ks_p = float(result.statistic), float(result.pvalue)
            if ks_p < self.alpha:
                now, then = float(np.median(passed)), float(np.median(self.calibration_passed))
                reasons.append(f"passed images' scores moved {'up' if now > then else 'down'} from the calibration "
                               f"(median {now:.2f} of the threshold, {then:.2f} calibrated; KS {ks:.2f}, "
                               f"p = {format_p(ks_p)})")
        return {"rate_p_value": rate_p, "ks_statistic": ks, "ks_p_value": ks_p, "alarm": bool(reasons),
                "reasons": reasons}
