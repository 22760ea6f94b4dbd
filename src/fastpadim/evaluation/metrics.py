"""Evaluation metrics on raw anomaly scores: image AUROC / F1-max, pixel AUROC / F1-max and PRO.

Image metrics are exact (scikit-learn). Pixel metrics stream over the images one at a time and accumulate
histograms over a fixed grid of ``n_bins`` equal-width score bins between the global minimum and maximum map
value, so they never hold all maps at once. Pixels in one bin are treated as tied. Each result comes with a
bound on its distance to the exact value, computed from the same histograms:

- AUROC and PRO: between two grid thresholds the exact curve is monotone and stays inside the rectangle
  spanned by the two grid points, so it differs from the chord by at most that rectangle's area. Summing
  ΔFPR·ΔTPR (or ΔFPR·ΔPRO, divided by the FPR limit) over the bins bounds the error.
- F1-max: inside a bin the true positives can rise by at most the bin's positive count and false positives
  cannot fall below the upper edge's, so 2(TP+p_b)/(TP+p_b+FP+P) bounds the exact F1 reachable there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import FastpadimError

DEFAULT_BINS = 1 << 16


def _binary_labels(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise FastpadimError(f"{labels.size} labels but {scores.size} scores")
    if not np.all(np.isfinite(scores)):
        raise FastpadimError("scores contain NaN or infinite values")
    if labels.all() or not labels.any():
        kind = "anomalous" if labels.all() else "good"
        raise FastpadimError(f"needs both good and anomalous samples, but all {labels.size} are {kind}")
    return labels, scores


def image_auroc(labels, scores) -> float:
    """Area under the ROC curve of image scores (ties count one half, as scikit-learn)."""
    from sklearn.metrics import roc_auc_score

    labels, scores = _binary_labels(labels, scores)
    return float(roc_auc_score(labels, scores))


def f1_max(labels, scores) -> float:
    """The best F1 score over all thresholds on the scores."""
    return f1_max_threshold(labels, scores)[0]


def f1_max_threshold(labels, scores) -> tuple[float, float]:
    """(the best F1 over all thresholds, the threshold reaching it: flagged = score ≥ threshold, sklearn's rule)."""
    from sklearn.metrics import precision_recall_curve

    labels, scores = _binary_labels(labels, scores)
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(f1[:-1]))  # the last point (recall 0) has no threshold; its F1 is 0
    return float(f1[best]), float(thresholds[best])


def _trapezoid_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """∫ y dx from x[0] to x_max along the polyline (x increasing), y interpolated linearly at x_max."""
    keep = x <= x_max
    xs, ys = x[keep], y[keep]
    if xs[-1] < x_max and keep.sum() < x.size:
        i = int(keep.sum())  # first point beyond x_max
        y_end = np.interp(x_max, x[i - 1 : i + 1], y[i - 1 : i + 1])
        xs, ys = np.append(xs, x_max), np.append(ys, y_end)
    return float(np.trapezoid(ys, xs))


@dataclass
class PixelHistograms:
    """Per score bin: counts of defect pixels and normal pixels, and the sum over ground-truth regions of
    (region pixels in the bin / region area). Bin k covers [edges[k], edges[k+1])."""

    edges: np.ndarray
    positives: np.ndarray
    negatives: np.ndarray
    region_overlap: np.ndarray
    n_regions: int

    # Curves are indexed by threshold = edges[k], k from the top bin down (predicted defect: score ≥ threshold),
    # with a first point at +inf where nothing is predicted.
    def _cumulative(self, counts: np.ndarray) -> np.ndarray:
        return np.concatenate([[0.0], np.cumsum(counts[::-1], dtype=np.float64)])

    def thresholds(self) -> np.ndarray:
        return np.concatenate([[np.inf], self.edges[:-1][::-1]])

    def _require(self, what: str) -> None:
        if self.positives.sum() == 0 or self.negatives.sum() == 0:
            kind = "defect" if self.positives.sum() == 0 else "normal"
            raise FastpadimError(f"{what} needs both defect and normal pixels, but the masks have no {kind} pixels")

    def roc_curve(self) -> tuple[np.ndarray, np.ndarray]:
        self._require("pixel AUROC")
        fpr = self._cumulative(self.negatives) / self.negatives.sum()
        tpr = self._cumulative(self.positives) / self.positives.sum()
        return fpr, tpr

    def pro_curve(self) -> tuple[np.ndarray, np.ndarray]:
        self._require("PRO")
        fpr = self._cumulative(self.negatives) / self.negatives.sum()
        pro = self._cumulative(self.region_overlap) / self.n_regions
        return fpr, np.minimum(pro, 1.0)  # rounding of the 1/area sums must not exceed 1

    def auroc(self) -> tuple[float, float]:
        """(pixel AUROC, bound on its error)."""
        fpr, tpr = self.roc_curve()
        return float(np.trapezoid(tpr, fpr)), float(np.sum(np.diff(fpr) * np.diff(tpr)))

    def pro(self, fpr_limit: float = 0.3) -> tuple[float, float]:
        """(normalised area under the PRO curve up to ``fpr_limit``, bound on its error)."""
        if not 0 < fpr_limit <= 1:
            raise FastpadimError(f"the FPR limit must be in (0, 1], got {fpr_limit}")
        fpr, pro = self.pro_curve()
        area = _trapezoid_to(fpr, pro, fpr_limit) / fpr_limit
        inside = fpr[:-1] < fpr_limit  # bins whose lower FPR end lies below the limit
        bound = float(np.sum((np.diff(fpr) * np.diff(pro))[inside])) / fpr_limit
        return area, bound

    def f1_max(self) -> tuple[float, float, float]:
        """(pixel F1-max over the grid thresholds, bound on its error, the threshold reaching it)."""
        self._require("pixel F1-max")
        total_pos = self.positives.sum()
        tp = self._cumulative(self.positives)
        fp = self._cumulative(self.negatives)
        f1 = 2 * tp / np.maximum(tp + fp + total_pos, 1)
        best = int(np.argmax(f1))
        # Upper bound inside bin k (between thresholds k and k+1): TP up to tp[k+1], FP at least fp[k].
        upper = 2 * tp[1:] / np.maximum(tp[1:] + fp[:-1] + total_pos, 1)
        return float(f1[best]), float(max(upper.max(), f1[best]) - f1[best]), float(self.thresholds()[best])


def _as_mask(mask) -> np.ndarray:
    mask = np.asarray(mask)
    return mask.astype(bool) if mask.dtype != bool else mask


def _score_range(maps: Sequence) -> tuple[float, float]:
    low, high = np.inf, -np.inf
    for i in range(len(maps)):  # by index: lazy sequences need not raise IndexError to end a loop
        amap = np.asarray(maps[i])
        if not np.all(np.isfinite(amap)):
            raise FastpadimError("anomaly maps contain NaN or infinite values")
        low, high = min(low, float(amap.min())), max(high, float(amap.max()))
    if not np.isfinite(low):
        raise FastpadimError("no anomaly maps to evaluate")
    return low, high


def pixel_histograms(masks: Sequence, maps: Sequence, n_bins: int = DEFAULT_BINS,
                     score_range: tuple[float, float] | None = None) -> PixelHistograms:
    """One pass over (mask, map) pairs (lists, arrays or memory-mapped arrays) to fill the histograms.

    ``score_range`` (min, max of all maps) saves a pass when the caller already knows it.
    Ground-truth regions are 8-connected components of each mask.
    """
    from skimage.measure import label

    if len(masks) != len(maps):
        raise FastpadimError(f"{len(masks)} masks but {len(maps)} anomaly maps")
    low, high = score_range if score_range is not None else _score_range(maps)
    width = (high - low) / n_bins if high > low else 1.0
    edges = low + width * np.arange(n_bins + 1, dtype=np.float64)
    positives = np.zeros(n_bins, np.int64)
    negatives = np.zeros(n_bins, np.int64)
    overlap = np.zeros(n_bins, np.float64)
    n_regions = 0
    for i in range(len(maps)):
        mask, amap = _as_mask(masks[i]), np.asarray(maps[i], dtype=np.float64)
        if mask.shape != amap.shape:
            raise FastpadimError(f"mask {i} is {mask.shape} but its anomaly map is {amap.shape}")
        bins = np.clip(((amap - low) / width).astype(np.int64), 0, n_bins - 1)
        negatives += np.bincount(bins[~mask], minlength=n_bins)
        if mask.any():
            positives += np.bincount(bins[mask], minlength=n_bins)
            regions, count = label(mask, connectivity=2, return_num=True)
            areas = np.bincount(regions.ravel(), minlength=count + 1).astype(np.float64)
            inside = regions[mask]
            overlap += np.bincount(bins[mask], weights=1.0 / areas[inside], minlength=n_bins)
            n_regions += count
    return PixelHistograms(edges, positives, negatives, overlap, n_regions)


def pixel_auroc(masks, maps, n_bins: int = DEFAULT_BINS) -> float:
    """Pixel-level ROC AUC over all pixels of all images (binned; see the module's error bound)."""
    return pixel_histograms(masks, maps, n_bins).auroc()[0]


def pro_auc(masks, maps, fpr_limit: float = 0.3, n_bins: int = DEFAULT_BINS) -> float:
    """Bergmann et al.'s PRO: mean overlap over all ground-truth regions against the false-positive rate on
    normal pixels, area up to ``fpr_limit`` divided by ``fpr_limit`` (binned; see the module's error bound)."""
    return pixel_histograms(masks, maps, n_bins).pro(fpr_limit)[0]


def pixel_f1_max(masks, maps, n_bins: int = DEFAULT_BINS) -> float:
    """The best pixel-level F1 over all thresholds (binned; see the module's error bound)."""
    return pixel_histograms(masks, maps, n_bins).f1_max()[0]
