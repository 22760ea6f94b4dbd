"""What scoring returns, and the API built on ``iter_scored``: shared by the PyTorch model (``Padim``) and the
ONNX runtime (``OnnxPadim``), so both give the same outputs. NumPy only (no torch import)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from .calibration import Calibration
from .errors import FastpadimError
from .images import iter_batches, single_or_many, stack_arrays
from .sources import expand

Progress = Callable[[int], None]
VERDICT_LABELS = {None: "unknown", True: "anomalous", False: "good"}


def check_threshold(value, what: str = "threshold") -> float | None:
    """A threshold is None (no verdicts) or a finite number; anything else (NaN, inf, text) is refused."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise FastpadimError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def verdict(score: float, threshold: float | None) -> bool | None:
    """True = anomalous, False = good, None = no threshold to judge by. The one place a verdict is made:
    a non-finite score or threshold never becomes one (NaN > t is False, which would read "good")."""
    if not math.isfinite(score):
        raise FastpadimError(f"score {score} is not a finite number: no verdict")
    if threshold is None:
        return None
    return score > check_threshold(threshold)


def threshold_caveat(false_alarm_rate: float, n_good: int | None) -> str | None:
    """What the threshold's good images cannot show, in one sentence (None if they support the rate).

    The (1 − rate) quantile of n scores estimates the rate only if rate ≥ 1/n; below that the threshold is
    simply the highest good score, and the true false-alarm rate is unknown (often far higher)."""
    if not n_good or false_alarm_rate * n_good >= 1:
        return None
    needed = math.ceil(1 / false_alarm_rate)
    return (f"a false-alarm rate of {false_alarm_rate:g} cannot be estimated from {n_good} good images (the threshold "
            f"is their highest score; at least {needed} are needed): expect more false alarms; give more good images "
            f"(--threshold-dir) or ask for a rate of at least {1 / n_good:.2g}")


def verdict_label(score: float, threshold: float | None) -> str:
    return VERDICT_LABELS[verdict(score, threshold)]


@dataclass
class ScoredImage:
    """One scored input: its image score and anomaly map, or the reason it could not be scored."""

    index: int
    name: str
    score: float | None = None
    anomaly_map: np.ndarray | None = None  # in the network's view (output_size)
    view: np.ndarray | None = None  # the frame as decoded (RGB, its own size), with keep_view
    error: str | None = None
    frame_map: np.ndarray | None = None  # the anomaly map in the frame's pixels, with keep_view
    normalized: float | None = None  # score / threshold: 1.0 is the threshold (None without one)
    false_alarm_probability: float | None = None  # of a good part scoring this high (None without calibration)

    def __post_init__(self) -> None:
        # A NaN/Inf score (a broken model, or numbers that overflowed) is an error for this image, never a score
        # that a comparison would turn into the verdict "good".
        if self.score is not None and not math.isfinite(self.score):
            self.error = (f"{self.name}: the model produced a non-finite score ({self.score}); no verdict "
                          "(the model file or this image gives invalid numbers)")
            self.score, self.anomaly_map, self.frame_map = None, None, None
            self.normalized, self.false_alarm_probability = None, None


@dataclass
class Predictions:
    """Image scores (N,), anomaly maps (N, H, W) in the network's view (``output_size``; ``Preprocessing.to_frame``
    puts one back in its frame's pixels) and verdicts (N,) for the images that could be read."""

    scores: np.ndarray
    maps: np.ndarray
    is_anomalous: np.ndarray | None
    threshold: float | None
    names: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    normalized: np.ndarray | None = None  # scores / threshold (None without a threshold)
    false_alarm_probability: np.ndarray | None = None  # per image (None without a calibration)


class ScoringMixin:
    """The scoring API (``iter_scored``, ``predict``, ``score_images``, ``anomaly_scores``, ``set_threshold``) for a class that provides ``run_batch``,
    ``check_fitted``, ``preprocessing_``, ``batch_size``, ``workers``, ``false_alarm_rate`` and ``skipped_``."""

    def run_batch(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The engine seam: preprocessed images (B, 3, H, W) float32 → image scores (B,) and anomaly maps (B, H, W).
        The PyTorch model, onnxruntime and OpenVINO each implement only this; the loop below is shared."""
        raise NotImplementedError

    def check_fitted(self) -> None:
        """Raise a one-line error if the model cannot score yet."""

    def iter_scored(self, images, keep_view: bool = False, progress: Progress | None = None,
                    batch_size: int | None = None) -> Iterator[list[ScoredImage]]:
        """Score in batches, yielding each batch's results in input order (unreadable inputs carry their error).
        ``images`` may be a folder, a glob or a list file, as on the command line. ``keep_view`` also gives each
        result its frame (``view``) and its anomaly map in the frame's pixels (``frame_map``)."""
        self.check_fitted()
        images, unusable = expand(images)
        self.skipped_ += unusable
        batches = iter_batches(single_or_many(images), self.preprocessing_, batch_size or self.batch_size,
                               self.workers, keep_view)
        threshold = self._valid_threshold()
        for batch in batches:
            good = [item for item in batch if item.array is not None]
            results = {item.index: ScoredImage(item.index, item.name, error=item.error) for item in batch if item.error}
            if good:
                scores, maps = self.run_batch(stack_arrays(good))
                for item, score, amap in zip(good, scores, maps):
                    frame_map = None if item.view is None else self.preprocessing_.to_frame(amap, item.view.shape[:2])
                    results[item.index] = ScoredImage(item.index, item.name, float(score), amap, item.view,
                                                      frame_map=frame_map, **self._readable(float(score), threshold))
            if progress:
                progress(len(batch))
            yield [results[item.index] for item in batch]

    def _valid_threshold(self) -> float | None:
        """The threshold, or None where there is none or it is stale (scoring for a new threshold goes on)."""
        try:
            return self.threshold_
        except FastpadimError:
            return None

    def _readable(self, score: float, threshold: float | None) -> dict:
        """The score as people on the line read it: ``normalized`` (score / threshold) and the estimated
        ``false_alarm_probability`` of a good part scoring this high."""
        calibration: Calibration | None = getattr(self, "calibration_", None)
        if not math.isfinite(score):
            return {}
        return {"normalized": score / threshold if threshold else None,
                "false_alarm_probability": calibration.false_alarm_probability(score) if calibration else None}

    @property
    def threshold_(self) -> float | None:
        """The image threshold (None: no verdicts). Refused once the Gaussians changed after it was set
        (``partial_fit``): a threshold from other Gaussians would pass parts it should flag."""
        value = self.__dict__.get("_threshold")
        set_for = self.__dict__.get("_threshold_for")
        seen = getattr(self, "n_samples_seen_", None)
        if value is not None and set_for is not None and seen is not None and set_for != seen:
            raise FastpadimError(
                f"the threshold {value:.6g} was set for the model fitted on {set_for} images, but its Gaussians now hold "
                f"{seen} (partial_fit): set it again from good images (set_threshold, or partial_fit(..., threshold_images=...))"
            )
        return value

    @threshold_.setter
    def threshold_(self, value: float | None) -> None:
        self._install_threshold(value, getattr(self, "n_samples_seen_", None))

    def _install_threshold(self, value: float | None, set_for: int | None) -> None:
        """A threshold and the training count of the Gaussians it was set for (None: no check)."""
        self.__dict__["_threshold"] = check_threshold(value)
        self.__dict__["_threshold_for"] = set_for

    def threshold_metadata(self) -> dict:
        """The threshold and its calibration as a model file records them (``.padim`` and ``.onnx`` alike)."""
        calibration: Calibration | None = getattr(self, "calibration_", None)
        return {
            "threshold": {
                "image": self.__dict__.get("_threshold"),  # raw: a stale threshold is saved as stale, refused on use
                "false_alarm_rate": self.threshold_rate_ or self.false_alarm_rate,
                "n_good_images": getattr(self, "threshold_count_", None),
                "n_train_images": self.__dict__.get("_threshold_for"),
                "target": getattr(self, "threshold_target_", None),
                "extrapolated": bool(getattr(self, "threshold_extrapolated_", False)),
            },
            "calibration": None if calibration is None else calibration.to_dict(),
        }

    def install_threshold_metadata(self, meta: dict) -> None:
        """The threshold, its calibration and the history from a model file's (validated) metadata: the one reader
        for ``.padim`` and ``.onnx``. A threshold set for other Gaussians stays refused on use."""
        th = meta["threshold"]
        self._install_threshold(th["image"], th.get("n_train_images"))
        self.threshold_rate_ = th["false_alarm_rate"]
        self.threshold_count_ = th.get("n_good_images")
        self.threshold_target_ = th.get("target")
        self.threshold_extrapolated_ = th.get("extrapolated", False)
        # the stored tail is used as it is, so loading fits nothing
        self.calibration_ = Calibration.from_dict(meta["calibration"]) if meta.get("calibration") else None
        self.history_ = list(meta.get("history") or [])

    def calibration_summary(self) -> dict | None:
        """Where the threshold and the false-alarm probabilities come from (None without a calibration): the
        method, folds, how many good scores, the target (e.g. fpr=0.01) and whether a tail model extrapolated it."""
        calibration: Calibration | None = getattr(self, "calibration_", None)
        if calibration is None:
            return None
        return {"method": calibration.method, "folds": calibration.folds, "n_good_images": calibration.n,
                "target": getattr(self, "threshold_target_", None),
                "false_alarm_rate": getattr(self, "threshold_rate_", None),
                "extrapolated": bool(getattr(self, "threshold_extrapolated_", False))}

    def anomaly_scores(self, images) -> np.ndarray:
        """Image anomaly scores (N,), higher = more anomalous (the reverse of scikit-learn's ``score_samples``,
        hence another name); unreadable images raise."""
        return self.score_images(images)[0]

    def score_images(self, images) -> tuple[np.ndarray, np.ndarray]:
        """Image anomaly scores (N,) and anomaly maps (N, H, W) in the network's view; unreadable images raise."""
        results = [r for batch in self.iter_scored(images) for r in batch]
        for r in results:
            if r.error:
                raise FastpadimError(r.error)
        scores = np.array([r.score for r in results], dtype=np.float32)
        maps = np.stack([r.anomaly_map for r in results]) if results else self._no_maps()
        return scores, maps

    def _no_maps(self) -> np.ndarray:
        return np.zeros((0, *self.preprocessing_.output_size), np.float32)

    def predict(self, images) -> Predictions:
        """Scores, maps and verdicts against ``threshold_``; unreadable images are skipped and listed."""
        results = [r for batch in self.iter_scored(images) for r in batch]
        ok = [r for r in results if r.error is None]
        scores = np.array([r.score for r in ok], dtype=np.float32)
        maps = np.stack([r.anomaly_map for r in ok]) if ok else self._no_maps()
        threshold = self.threshold_  # finite or None: checked when it was set
        verdicts = scores > threshold if threshold is not None else None
        skipped = [(r.name, r.error) for r in results if r.error]
        normalized = np.array([r.normalized for r in ok], np.float64) if threshold else None
        probability = (np.array([r.false_alarm_probability for r in ok], np.float64)
                       if getattr(self, "calibration_", None) is not None else None)
        return Predictions(scores, maps, verdicts, threshold, [r.name for r in ok], skipped, normalized, probability)

    def set_threshold(self, good_images: Iterable, false_alarm_rate: float | None = None,
                      progress: Progress | None = None) -> float:
        """Threshold = the (1 − rate) quantile of these good images' scores (at most that rate flagged)."""
        rate = self.false_alarm_rate if false_alarm_rate is None else false_alarm_rate
        return self.set_threshold_from_scores(self.good_scores(good_images, progress), rate)

    def good_scores(self, good_images: Iterable, progress: Progress | None = None) -> list[float]:
        """The scores of good images for a threshold; unreadable ones go to ``skipped_``."""
        scores = self.readable_scores(good_images, progress)
        if not scores:
            raise FastpadimError("no readable good images to set the threshold from")
        return scores

    def readable_scores(self, images: Iterable, progress: Progress | None = None,
                        skipped: list | None = None) -> list[float]:
        """The scores of the images that could be scored; the others go to ``skipped`` (default ``skipped_``)."""
        skipped = self.skipped_ if skipped is None else skipped
        scores = []
        for batch in self.iter_scored(images, progress=progress):
            for r in batch:
                if r.error:
                    skipped.append((r.name, r.error))
                else:
                    scores.append(r.score)
        return scores

    def set_threshold_from_scores(self, scores, rate: float, method: str = "good images") -> float:
        """Threshold = the (1 − rate) quantile of good images' scores (``calibrate``)."""
        return self.calibrate(Calibration(scores, method), rate)

    def calibrate(self, calibration: Calibration, rate: float | None = None) -> float:
        """Install a calibration (good images' scores the model did not learn from) and the threshold it gives
        for the false-alarm ``rate`` (default ``false_alarm_rate``); beyond the scores, the tail model's
        (``threshold_extrapolated_``)."""
        rate = self.false_alarm_rate if rate is None else rate
        value, extrapolated = calibration.threshold(rate)
        self.calibration_ = calibration
        self.threshold_ = value
        self.threshold_count_ = calibration.n
        self.threshold_rate_ = rate
        self.threshold_extrapolated_ = extrapolated
        self.threshold_target_ = f"fpr={rate:g}"
        return value
