"""Evaluate one category: fit on its good training images (no hold-out, as the paper), score its test set,
and compute the metrics on the raw anomaly maps. Maps and masks go to memory-mapped temporary files, so a
large test set never sits in memory at full resolution."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import metrics
from .ablation import LAYER_MODES, REDUCTIONS, PcaPadim, SummedPadim
from .datasets import Category, load_mask
from ..errors import FastpadimError
from ..model import Padim
from .rd_mvtec import RD_CROP_SIZE, RdTransform, transformed_images

METRICS = ("image_auroc", "pixel_auroc", "pro", "image_f1_max", "pixel_f1_max")
FPR_LIMIT = 0.3


@dataclass(frozen=True)
class Settings:
    """Model options of an evaluation run (Padim's parameters plus the ablation switches)."""

    backbone: str = "efficientnet_lite0"
    weights: str | None = None
    layers: tuple[int, ...] | None = None
    n_features: int | None = None
    image_size: int = 256
    crop_size: int | None = None
    device: str = "auto"
    batch_size: int = 32
    reduction: str = "random"
    layer_mode: str = "joint"
    rd_mvtec: bool = False
    allow_download: bool = False

    def check(self) -> None:
        if self.reduction not in REDUCTIONS:
            raise FastpadimError(f"--reduction must be one of {', '.join(REDUCTIONS)}, got {self.reduction!r}")
        if self.layer_mode not in LAYER_MODES:
            raise FastpadimError(f"--layer-mode must be one of {', '.join(LAYER_MODES)}, got {self.layer_mode!r}")
        if self.layer_mode == "summed" and self.reduction == "pca":
            raise FastpadimError("--layer-mode summed and --reduction pca cannot be combined")

    def build(self, seed: int):
        """The estimator for these settings; Rd-MVTec feeds 224×224 transformed arrays, so no resize or crop."""
        self.check()
        size, crop = (RD_CROP_SIZE, None) if self.rd_mvtec else (self.image_size, self.crop_size)
        common = dict(backbone=self.backbone, weights=self.weights, image_size=size, crop_size=crop, seed=seed,
                      device=self.device, batch_size=self.batch_size, holdout=0.0, keep_stats=False,
                      allow_download=self.allow_download)
        if self.layer_mode == "summed":
            from ..backbone import resolve_preset

            layers = self.layers or resolve_preset(self.backbone, None, None).layers
            return SummedPadim(layers, self.n_features, **common)
        cls = PcaPadim if self.reduction == "pca" else Padim
        return cls(layers=self.layers, n_features=self.n_features, **common)


@dataclass
class Example:
    name: str
    defect_type: str
    view: np.ndarray
    anomaly_map: np.ndarray
    mask: np.ndarray


@dataclass
class CategoryRun:
    """One fit-and-score of a category: metrics (None = skipped, see notes), their binning error bounds,
    timings and what the report draws."""

    category: str
    seed: int
    metrics: dict[str, float | None]
    bounds: dict[str, float]
    fit_s: float
    images_per_s: float
    n_train: int
    n_test: int
    notes: list[str]
    pixel_threshold: float | None = None
    weights_id: str = ""
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    examples: list[Example] = field(default_factory=list)


def pick_examples(category: Category, count: int) -> set[int]:
    """The first test image of each defect type in turn (up to ``count``) and the first good one: a fixed
    choice, not the best-looking ones."""
    by_type: dict[str, list[int]] = {}
    for i, item in enumerate(category.test):
        by_type.setdefault(item.defect_type, []).append(i)
    chosen = [idx[0] for kind, idx in by_type.items() if kind == "good"][:1]
    defect_lists = [idx for kind, idx in by_type.items() if kind != "good"]
    depth = 0
    while len(chosen) < count + 1 and any(depth < len(idx) for idx in defect_lists):
        chosen += [idx[depth] for idx in defect_lists if depth < len(idx)][: count + 1 - len(chosen)]
        depth += 1
    return set(chosen)


def _downsample_curve(x: np.ndarray, y: np.ndarray, points: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    if x.size <= points:
        return x, y
    keep = np.unique(np.linspace(0, x.size - 1, points).astype(int))
    return x[keep], y[keep]


def evaluate_category(category: Category, settings: Settings, seed: int = 0, n_examples: int = 4,
                      progress=None) -> CategoryRun:
    if not category.test:
        raise FastpadimError(f"{category.name}: no test images")
    model = settings.build(seed)
    rd_train, rd_test = RdTransform(seed, "train"), RdTransform(seed, "test")
    train = transformed_images(category.train, rd_train) if settings.rd_mvtec else category.train
    test = transformed_images([t.path for t in category.test], rd_test) if settings.rd_mvtec else [t.path for t in category.test]

    start = time.perf_counter()
    model.fit(train, progress=progress)
    fit_s = time.perf_counter() - start
    if getattr(model, "skipped_", None):
        name, reason = model.skipped_[0]
        raise FastpadimError(f"{category.name}: {len(model.skipped_)} training images unreadable, first: {reason}")

    labels = category.labels
    want_pixels = category.has_masks
    size = model.preprocessing_.output_size
    chosen = pick_examples(category, n_examples)
    scores = np.zeros(len(category.test), np.float64)
    examples: list[Example] = []
    notes = list(category.notes)
    with tempfile.TemporaryDirectory(prefix="fastpadim-eval-") as tmp:
        n = len(category.test)
        maps = np.lib.format.open_memmap(Path(tmp) / "maps.npy", mode="w+", dtype=np.float32, shape=(n, size, size))
        masks = np.lib.format.open_memmap(Path(tmp) / "masks.npy", mode="w+", dtype=bool, shape=(n, size, size))
        low, high = np.inf, -np.inf
        scoring_s = 0.0
        stream = model.iter_scored(test, keep_view=True, progress=progress)
        while True:
            tick = time.perf_counter()
            batch = next(stream, None)
            scoring_s += time.perf_counter() - tick
            if batch is None:
                break
            for r in batch:
                item = category.test[r.index]
                if r.error:
                    raise FastpadimError(f"{category.name}: test image unreadable: {r.error}")
                scores[r.index] = r.score
                maps[r.index] = r.anomaly_map
                low, high = min(low, float(r.anomaly_map.min())), max(high, float(r.anomaly_map.max()))
                if want_pixels:
                    if settings.rd_mvtec:
                        mask = _rd_mask(item, rd_test, r.index)
                    else:
                        mask = load_mask(item, model.preprocessing_)
                    masks[r.index] = mask
                if r.index in chosen:
                    examples.append(Example(Path(item.path).name, item.defect_type, r.view,
                                            r.anomaly_map.copy(), np.array(masks[r.index])))
        result: dict[str, float | None] = {name: None for name in METRICS}
        bounds: dict[str, float] = {}
        curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        pixel_threshold = None
        if labels.any() and not labels.all():
            from sklearn.metrics import roc_curve

            result["image_auroc"] = metrics.image_auroc(labels, scores)
            result["image_f1_max"] = metrics.f1_max(labels, scores)
            fpr, tpr, _ = roc_curve(labels, scores)
            curves["image_roc"] = (fpr, tpr)
        if want_pixels:
            hist = metrics.pixel_histograms(masks, maps, score_range=(low, high))
            if hist.positives.sum() and hist.negatives.sum():
                result["pixel_auroc"], bounds["pixel_auroc"] = hist.auroc()
                result["pro"], bounds["pro"] = hist.pro(FPR_LIMIT)
                result["pixel_f1_max"], bounds["pixel_f1_max"], pixel_threshold = hist.f1_max()
                curves["pixel_roc"] = _downsample_curve(*hist.roc_curve())
                curves["pro"] = _downsample_curve(*hist.pro_curve())
            else:
                notes.append("the masks hold no defect pixels (or no normal ones): pixel metrics skipped")
        del maps, masks  # release the memory maps before the folder goes
    empty = sum(1 for e in examples if e.defect_type != "good" and not e.mask.any())
    if empty:
        notes.append(f"{empty} shown anomalous example(s) have an empty mask")
    n_test = len(category.test)
    return CategoryRun(category.name, seed, result, bounds, fit_s, n_test / max(scoring_s, 1e-9),
                       len(category.train), n_test, notes, pixel_threshold, model.weights_id_, curves, examples)


def _rd_mask(item, transform: RdTransform, index: int) -> np.ndarray:
    from PIL import Image

    if item.mask is None:
        if item.is_anomalous:
            raise FastpadimError(f"{item.path}: anomalous test image without a mask")
        return np.zeros((RD_CROP_SIZE, RD_CROP_SIZE), dtype=bool)
    with Image.open(item.mask) as mask, Image.open(item.path) as image:
        if mask.size != image.size:
            raise FastpadimError(f"{item.mask}: mask is {mask.size[0]}x{mask.size[1]} but its image is "
                                 f"{image.size[0]}x{image.size[1]}")
        mask.load()
        return transform.mask(mask, index)
