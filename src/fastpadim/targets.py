"""Threshold targets from labelled scores (``fastpadim calibrate``): a false-alarm rate, a recall, or the best F1.

A target is a string as the command line and the model file spell it: ``fpr=0.01`` (at most that share of good
images flagged: the (1 − r) quantile of the good scores, as ``Calibration`` sets it, its tail model beyond them),
``recall=0.99`` (at least that share of the defects caught, flagging as few good images as possible) or ``f1``
(the threshold of the highest F1, defects the positive class). A verdict is ``score > threshold``: a score equal
to the threshold is good. Recall and F1 thresholds fall midway between two neighbouring scores, never on one:
the engines' rounding (ONNX against PyTorch differ in the fifth digit) must not flip the verdicts the target was
chosen for. NumPy only (the ONNX runtime imports it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .calibration import Calibration
from .errors import FastpadimError
from .results import check_threshold

KINDS = ("fpr", "recall", "f1")
TARGET_HELP = "fpr=R (at most R of good images flagged), recall=R (at least R of defects caught) or f1"


@dataclass(frozen=True)
class Target:
    """``kind`` in KINDS; ``rate`` the false-alarm rate or the recall (None for f1)."""

    kind: str
    rate: float | None = None

    @property
    def labelled(self) -> bool:
        """Whether the target needs defective images (recall, f1): a threshold that good images alone cannot keep."""
        return self.kind != "fpr"

    def __str__(self) -> str:
        return self.kind if self.rate is None else f"{self.kind}={self.rate:g}"


def parse_target(text: str) -> Target:
    """``fpr=R`` with R in (0, 1), ``recall=R`` with R in (0, 1], or ``f1``; anything else one line."""
    kind, sep, value = str(text).strip().lower().partition("=")
    if kind == "f1" and not sep:
        return Target("f1")
    if kind not in ("fpr", "recall") or not sep:
        raise FastpadimError(f"target must be {TARGET_HELP}; got {text!r}")
    try:
        rate = float(value)
    except ValueError:
        raise FastpadimError(f"target {text!r}: {value!r} is not a number (e.g. {kind}=0.01)") from None
    upper_ok = rate < 1 if kind == "fpr" else rate <= 1
    if not (math.isfinite(rate) and rate > 0 and upper_ok):
        bounds = "(0, 1)" if kind == "fpr" else "(0, 1]"
        raise FastpadimError(f"target {text!r}: the rate must lie in {bounds}, got {value}")
    return Target(kind, rate)


@dataclass(frozen=True)
class Confusion:
    """Labelled images against a threshold: good ones passed or flagged (false alarms), defects caught or missed."""

    good_passed: int
    false_alarms: int
    defects_caught: int
    defects_missed: int

    @property
    def n_good(self) -> int:
        return self.good_passed + self.false_alarms

    @property
    def n_defective(self) -> int:
        return self.defects_caught + self.defects_missed

    @property
    def false_alarm_rate(self) -> float | None:
        return self.false_alarms / self.n_good if self.n_good else None

    @property
    def recall(self) -> float | None:
        return self.defects_caught / self.n_defective if self.n_defective else None

    @property
    def precision(self) -> float | None:
        flagged = self.defects_caught + self.false_alarms
        return self.defects_caught / flagged if flagged else None

    @property
    def f1(self) -> float | None:
        denominator = 2 * self.defects_caught + self.false_alarms + self.defects_missed
        return 2 * self.defects_caught / denominator if denominator else None

    @classmethod
    def of_flags(cls, anomalous: np.ndarray, flagged: np.ndarray) -> Confusion:
        """From per-image labels (True = defective) and verdicts (True = flagged)."""
        anomalous, flagged = np.asarray(anomalous, bool), np.asarray(flagged, bool)
        return cls(int((~flagged & ~anomalous).sum()), int((flagged & ~anomalous).sum()),
                   int((flagged & anomalous).sum()), int((~flagged & anomalous).sum()))

    def to_dict(self) -> dict:
        return {"n_good": self.n_good, "n_defective": self.n_defective,
                "good_passed": self.good_passed, "false_alarms": self.false_alarms,
                "defects_caught": self.defects_caught, "defects_missed": self.defects_missed,
                "false_alarm_rate": self.false_alarm_rate, "recall": self.recall, "precision": self.precision,
                "f1": self.f1}


def confusion(good: np.ndarray, defective: np.ndarray, threshold: float) -> Confusion:
    """The confusion matrix at ``threshold`` (verdict: score > threshold)."""
    good, defective = _scores(good, "good"), _scores(defective, "defective", allow_empty=True)
    false_alarms, caught = int(np.sum(good > threshold)), int(np.sum(defective > threshold))
    return Confusion(len(good) - false_alarms, false_alarms, caught, len(defective) - caught)


@dataclass(frozen=True)
class Choice:
    """A target's threshold, whether a tail model extrapolated it (fpr below 1/n), and the labelled result."""

    target: Target
    threshold: float
    extrapolated: bool
    confusion: Confusion


def choose_threshold(target: Target | str, good, defective=()) -> Choice:
    """The threshold that meets ``target`` on these scores of good and defective images."""
    target = parse_target(target) if isinstance(target, str) else target
    good = _scores(good, "good")
    defective = _scores(defective, "defective", allow_empty=True)
    extrapolated = False
    if target.kind == "fpr":
        value, extrapolated = Calibration(good, "labelled").threshold(target.rate)
    elif len(defective) == 0:
        raise FastpadimError(f"target {target} needs scores of defective images (--defective)")
    elif target.kind == "recall":
        value = _recall_threshold(good, defective, target.rate)
    else:
        value = _f1_threshold(good, defective)
    value = check_threshold(float(value))
    return Choice(target, value, extrapolated, confusion(good, defective, value))


def _recall_threshold(good: np.ndarray, defective: np.ndarray, recall: float) -> float:
    """The highest cut that flags at least ``recall`` of the defects: just below the k-th highest defect score."""
    needed = max(1, math.ceil(recall * len(defective) - 1e-9))  # 1e-9: 0.99 · 100 is 98.99999999999999
    kth = float(np.sort(defective)[::-1][needed - 1])
    return _cut_below(np.concatenate([good, defective]), kth)


def _f1_threshold(good: np.ndarray, defective: np.ndarray) -> float:
    """The cut of the highest F1 (the highest such cut on a tie: fewer false alarms for the same F1)."""
    values = np.unique(np.concatenate([good, defective]))  # sorted; a cut below values[j] flags scores ≥ values[j]
    good_sorted, defective_sorted = np.sort(good), np.sort(defective)
    caught = len(defective) - np.searchsorted(defective_sorted, values, side="left")
    alarms = len(good) - np.searchsorted(good_sorted, values, side="left")
    f1 = 2 * caught / (2 * caught + alarms + (len(defective) - caught))
    best = len(values) - 1 - int(np.argmax(f1[::-1]))  # the last maximum: the highest cut
    return _cut_below(values, float(values[best]))


def _cut_below(scores: np.ndarray, value: float) -> float:
    """A threshold just under ``value`` that flags it: midway to the next lower score (robust to the engines'
    rounding), or half the gap to the next higher one (or a thousandth of its size) below the lowest score."""
    lower = scores[scores < value]
    if len(lower):
        return float((lower.max() + value) / 2)
    higher = scores[scores > value]
    gap = float(higher.min() - value) if len(higher) else max(abs(value), 1.0) * 2e-3
    return value - gap / 2


def _scores(values, what: str, allow_empty: bool = False) -> np.ndarray:
    scores = np.asarray(values, dtype=np.float64).ravel()
    if len(scores) == 0 and not allow_empty:
        raise FastpadimError(f"no scores of {what} images to set the threshold from")
    if not np.all(np.isfinite(scores)):
        raise FastpadimError(f"the scores of {what} images hold NaN or infinite values: no threshold from them")
    return scores


def apply_choice(model, choice: Choice, good) -> None:
    """Install a labelled threshold on a model (``Padim`` or ``OnnxPadim``): the threshold, its target, and the
    good scores as the calibration that false-alarm probabilities come from. A recall or F1 target keeps the
    model's false-alarm rate (the rate an update re-sets the threshold for from good images alone)."""
    model.calibration_ = Calibration(good, "labelled")
    model.threshold_ = choice.threshold
    model.threshold_count_ = model.calibration_.n
    if choice.target.kind == "fpr":
        model.threshold_rate_ = choice.target.rate
    elif getattr(model, "threshold_rate_", None) is None:
        model.threshold_rate_ = model.false_alarm_rate
    model.threshold_extrapolated_ = choice.extrapolated
    model.threshold_target_ = str(choice.target)


def manual_threshold(threshold: dict, value: float | None, n_train_images: int | None) -> dict:
    """A model file's ``threshold`` section with a threshold set by hand (None: removed); the false-alarm rate
    stays (it is what an update calibrates for), the good scores it rested on no longer apply. The value is
    checked where the metadata is written (``fastpadim.metadata.validate``: the message names the field)."""
    value = None if value is None else float(value)
    return {**threshold, "image": value, "n_good_images": None, "n_train_images": n_train_images,
            "target": None if value is None else "manual", "extrapolated": False}
