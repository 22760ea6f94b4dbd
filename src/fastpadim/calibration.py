"""Thresholds from good images' scores, and what a score means: its false-alarm probability.

A ``Calibration`` holds the scores of good images the model did not learn from (out-of-fold scores of the
training images, a hold-out, or a separate folder of good images). The threshold for a false-alarm rate r is
their (1 − r) quantile; where r is below what n scores support (r·n < 1), a generalised Pareto tail fitted to
the top scores extrapolates it, and the threshold says so. The false-alarm probability of a score s is the
share of good scores at least as high, as a conformal p-value ((k + 1) / (n + 1)), or the tail's estimate
beyond the scores' range. NumPy only at scoring time (the ONNX runtime uses it too); SciPy fits the tail.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .errors import FastpadimError
from .metadata import CALIBRATION_METHODS as METHODS
from .metadata import MAX_SCORES

TAIL_MIN_SCORES = 20  # fewer good scores: no tail model (a threshold below 1/n is then their maximum, with a caveat)
TAIL_SHARE = 0.2  # the tail model is fitted to the top fifth of the scores (at least TAIL_MIN_EXCESSES)
TAIL_MIN_EXCESSES = 10


@dataclass(frozen=True)
class Tail:
    """A generalised Pareto tail: P(S > s) = share · (1 + shape·(s − start)/scale)^(−1/shape) for s ≥ start."""

    start: float
    shape: float
    scale: float
    share: float

    def survival(self, score: float) -> float:
        excess = max(0.0, score - self.start) / self.scale
        if abs(self.shape) < 1e-9:
            return self.share * math.exp(-excess)
        base = 1.0 + self.shape * excess
        return 0.0 if base <= 0 else self.share * base ** (-1.0 / self.shape)

    def quantile(self, rate: float) -> float:
        """The score whose survival is ``rate`` (≤ share)."""
        ratio = rate / self.share
        if abs(self.shape) < 1e-9:
            return self.start - self.scale * math.log(ratio)
        return self.start + self.scale / self.shape * (ratio ** (-self.shape) - 1.0)

    def to_dict(self) -> dict:
        return {"start": self.start, "shape": self.shape, "scale": self.scale, "share": self.share}


def fit_tail(scores: np.ndarray) -> Tail | None:
    """Peaks over a threshold: a generalised Pareto distribution fitted (maximum likelihood) to the excesses of the
    top ``TAIL_SHARE`` of the scores over the next one. None with too few scores or a degenerate fit."""
    scores = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(scores)
    if n < TAIL_MIN_SCORES:
        return None
    from scipy.stats import genpareto  # only here: loading a calibration with a stored tail needs no SciPy
    top = max(TAIL_MIN_EXCESSES, int(round(TAIL_SHARE * n)))
    start = float(scores[n - top - 1])
    excesses = scores[n - top:] - start
    if not np.any(excesses > 0):
        return None
    shape, _, scale = genpareto.fit(excesses, floc=0.0)
    if not (math.isfinite(shape) and math.isfinite(scale) and scale > 0):
        return None
    return Tail(start, float(shape), float(scale), top / n)


@dataclass
class Calibration:
    """Good images' scores (sorted) and how they were obtained (``method``, ``folds`` for out-of-fold)."""

    scores: np.ndarray
    method: str
    folds: int | None = None
    tail: Tail | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        scores = np.sort(np.asarray(self.scores, dtype=np.float64).ravel())
        if len(scores) == 0:
            raise FastpadimError("no good images' scores to calibrate the threshold from")
        if not np.all(np.isfinite(scores)):
            raise FastpadimError("good images' scores hold NaN or infinite values: no threshold from them")
        if len(scores) > MAX_SCORES:
            # an evenly spaced subset keeps the distribution's shape (its quantiles to 1/MAX_SCORES)
            scores = scores[np.linspace(0, len(scores) - 1, MAX_SCORES).round().astype(int)]
        self.scores = scores
        if self.method not in METHODS:
            raise FastpadimError(f"calibration method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.tail is None:
            self.tail = fit_tail(scores)

    @property
    def n(self) -> int:
        return len(self.scores)

    def supports(self, rate: float) -> bool:
        """Whether n scores estimate the (1 − rate) quantile without extrapolation."""
        return rate * self.n >= 1

    def threshold(self, rate: float) -> tuple[float, bool]:
        """(threshold, extrapolated) for a false-alarm rate: the empirical quantile, or the tail's beyond it.
        Without a tail model (too few scores), a rate below 1/n gets the highest score (not extrapolated)."""
        if self.supports(rate) or self.tail is None:
            return float(np.quantile(self.scores, 1.0 - rate, method="higher")), False
        return max(float(self.scores[-1]), self.tail.quantile(rate)), True

    def false_alarm_probability(self, score: float) -> float:
        """Estimated probability that a good part scores at least ``score``."""
        if self.tail is not None and score > self.scores[-1]:
            return self.tail.survival(score)
        at_least = self.n - int(np.searchsorted(self.scores, score, side="left"))
        return (at_least + 1) / (self.n + 1)

    def merged(self, scores: np.ndarray, method: str) -> Calibration:
        """These scores and more good scores (an update's, obtained by ``method``), the tail fitted again; scores
        of two methods are simply "good images"."""
        same = method == self.method
        return Calibration(np.concatenate([self.scores, np.asarray(scores, np.float64)]),
                           self.method if same else "good images", self.folds if same else None)

    def to_dict(self) -> dict:
        return {"method": self.method, "folds": self.folds, "scores": [float(s) for s in self.scores],
                "tail": None if self.tail is None else self.tail.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        """From validated metadata (``fastpadim.metadata``); the tail is fitted again only if none was stored."""
        tail = Tail(**data["tail"]) if data.get("tail") else None
        return cls(np.asarray(data["scores"], np.float64), data["method"], data.get("folds"), tail)


def fold_assignment(n: int, folds: int, seed: int) -> np.ndarray:
    """Fold of each of n images (seeded, balanced): k folds of sizes differing by at most one."""
    order = np.random.default_rng(seed).permutation(n)
    assignment = np.empty(n, dtype=np.int64)
    assignment[order] = np.arange(n) % folds
    return assignment
