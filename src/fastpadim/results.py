"""What scoring returns, and the API built on ``iter_scored``: shared by the PyTorch model (``Padim``) and the
ONNX runtime (``OnnxPadim``), so both give the same outputs. NumPy only (no torch import)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from .errors import FastpadimError

Progress = Callable[[int], None]


@dataclass
class ScoredImage:
    """One scored input: its image score and anomaly map, or the reason it could not be scored."""

    index: int
    name: str
    score: float | None = None
    anomaly_map: np.ndarray | None = None
    view: np.ndarray | None = None  # the RGB crop the network saw, for overlays
    error: str | None = None


@dataclass
class Predictions:
    """Image scores (N,), anomaly maps (N, S, S) and verdicts (N,) for the images that could be read."""

    scores: np.ndarray
    maps: np.ndarray
    is_anomalous: np.ndarray | None
    threshold: float | None
    names: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)


class ScoringMixin:
    """``score``, ``score_samples``, ``predict`` and ``set_threshold`` for a class that provides
    ``iter_scored(images, keep_view, progress)``, ``preprocessing_``, ``threshold_``, ``false_alarm_rate``
    and ``skipped_``."""

    def iter_scored(self, images, keep_view: bool = False, progress: Progress | None = None) -> Iterator[list[ScoredImage]]:
        raise NotImplementedError

    def score_samples(self, images) -> np.ndarray:
        """Image scores (higher = more anomalous); unreadable images raise."""
        return self.score(images)[0]

    def score(self, images) -> tuple[np.ndarray, np.ndarray]:
        """Image scores (N,) and anomaly maps (N, S, S); unreadable images raise."""
        results = [r for batch in self.iter_scored(images) for r in batch]
        for r in results:
            if r.error:
                raise FastpadimError(r.error)
        size = self.preprocessing_.output_size
        scores = np.array([r.score for r in results], dtype=np.float32)
        maps = np.stack([r.anomaly_map for r in results]) if results else np.zeros((0, size, size), np.float32)
        return scores, maps

    def predict(self, images) -> Predictions:
        """Scores, maps and verdicts against ``threshold_``; unreadable images are skipped and listed."""
        results = [r for batch in self.iter_scored(images) for r in batch]
        ok = [r for r in results if r.error is None]
        size = self.preprocessing_.output_size
        scores = np.array([r.score for r in ok], dtype=np.float32)
        maps = np.stack([r.anomaly_map for r in ok]) if ok else np.zeros((0, size, size), np.float32)
        verdicts = scores > self.threshold_ if self.threshold_ is not None else None
        skipped = [(r.name, r.error) for r in results if r.error]
        return Predictions(scores, maps, verdicts, self.threshold_, [r.name for r in ok], skipped)

    def set_threshold(self, good_images: Iterable, false_alarm_rate: float | None = None,
                      progress: Progress | None = None) -> float:
        """Threshold = the (1 − rate) quantile of these good images' scores (at most that rate flagged)."""
        rate = self.false_alarm_rate if false_alarm_rate is None else false_alarm_rate
        scores = []
        for batch in self.iter_scored(good_images, progress=progress):
            for r in batch:
                if r.error:
                    self.skipped_.append((r.name, r.error))
                else:
                    scores.append(r.score)
        if not scores:
            raise FastpadimError("no readable good images to set the threshold from")
        return self._threshold_from_scores(scores, rate)

    def _threshold_from_scores(self, scores, rate: float) -> float:
        self.threshold_ = float(np.quantile(np.asarray(scores, dtype=np.float64), 1.0 - rate, method="higher"))
        self.threshold_count_ = len(scores)
        self.false_alarm_rate = rate
        return self.threshold_
