"""Evaluate one category: fit on its good training images (no hold-out, as the paper) or take a shipped model
(``evaluate_model``), score its test set, and compute the metrics on the raw anomaly maps, in each frame's own
pixels against its mask at its own size. The network's maps go to a memory-mapped temporary file; the
frame-size maps and masks are made from it and read one image at a time, so a large test set of large frames
never sits in memory."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..errors import FastpadimError
from ..images import Preprocessing, open_image
from ..model import Padim
from ..results import verdict
from ..sizes import Size
from ..targets import Confusion
from . import metrics
from .ablation import LAYER_MODES, REDUCTIONS, PcaPadim, SummedPadim
from .datasets import Category, frame_size, load_mask, open_mask
from .model_settings import model_settings
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
    image_size: Size | int | str = 256  # as Padim takes it: N, (height, width) or "HxW"
    crop_size: Size | int | None = None
    device: str = "auto"
    engine: str = "torch"
    batch_size: int = 32
    reduction: str = "random"
    layer_mode: str = "joint"
    rd_mvtec: bool = False
    allow_download: bool = False
    squash: bool = False
    pool: int = 1
    tile: int | None = None
    tile_overlap: int | None = None
    tile_shared: bool = False
    factor_dtype: str = "float32"
    blur_sigma: float = 4.0
    epsilon: float = 0.01

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
                      # evaluate sets its own thresholds on the test set: no out-of-fold pass (folds=0)
                      device=self.device, engine=self.engine, batch_size=self.batch_size, holdout=0.0, folds=0,
                      allow_download=self.allow_download, squash=self.squash, pool=self.pool, tile=self.tile,
                      tile_overlap=self.tile_overlap, tile_shared=self.tile_shared, factor_dtype=self.factor_dtype,
                      blur_sigma=self.blur_sigma, epsilon=self.epsilon)
        if self.layer_mode == "summed":
            from ..backbone import resolve_preset

            layers = self.layers or resolve_preset(self.backbone, None, None).layers
            return SummedPadim(layers, self.n_features, **common)
        cls = PcaPadim if self.reduction == "pca" else Padim
        return cls(layers=self.layers, n_features=self.n_features, **common)


@dataclass
class Example:
    """One test image for the report's figure, all in the frame's own pixels."""

    name: str
    defect_type: str
    view: np.ndarray  # RGB
    frame_map: np.ndarray
    mask: np.ndarray


@dataclass
class ImageScore:
    """One test image's line in ``scores.csv``: ``verdict`` is against the model's own threshold (None: none)."""

    name: str  # <defect type>/<file name>
    anomalous: bool
    score: float
    normalized: float | None
    verdict: bool | None


@dataclass
class AtThreshold:
    """Test images flagged at one image threshold (``targets.Confusion``: false alarms, defects missed)."""

    threshold: float
    confusion: Confusion

    def to_dict(self) -> dict:
        return {"threshold": self.threshold, **self.confusion.to_dict()}


@dataclass
class CategoryRun:
    """One fit-and-score (or a shipped model's scoring) of a category: metrics (None = skipped, see notes), their
    binning error bounds, timings, the model's resolved settings, per-image scores, the confusion matrices at
    the model's threshold and at the image F1-max threshold, and what the report draws."""

    category: str
    seed: int
    metrics: dict[str, float | None]
    bounds: dict[str, float]
    fit_s: float | None  # None: a shipped model, not fitted here
    images_per_s: float
    n_train: int
    n_test: int
    notes: list[str]
    pixel_threshold: float | None = None  # pixel F1-max threshold on this test set (the examples' masks)
    weights_id: str = ""
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    examples: list[Example] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    scores: list[ImageScore] = field(default_factory=list)
    model_threshold: float | None = None
    threshold_target: str | None = None
    at_model_threshold: AtThreshold | None = None
    at_f1_max: AtThreshold | None = None


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
    """Fit on the category's good training images, then score its test set (``score_category``)."""
    if not category.test:
        raise FastpadimError(f"{category.name}: no test images")
    model = settings.build(seed)
    rd_train, rd_test = RdTransform(seed, "train"), RdTransform(seed, "test")
    train = transformed_images(category.train, rd_train) if settings.rd_mvtec else category.train

    start = time.perf_counter()
    model.fit(train, progress=progress)
    fit_s = time.perf_counter() - start
    if getattr(model, "skipped_", None):
        name, reason = model.skipped_[0]
        raise FastpadimError(f"{category.name}: {len(model.skipped_)} training images unreadable, first: {reason}")
    return score_category(category, model, seed, n_examples, progress, rd_test if settings.rd_mvtec else None,
                          fit_s, len(category.train))


def evaluate_model(category: Category, model, n_examples: int = 4, progress=None) -> CategoryRun:
    """Score the category's test set with a shipped model (a loaded ``Padim`` or ``OnnxPadim``), nothing
    refitted: its training images are not read, its own threshold gives the verdicts."""
    if not category.test:
        raise FastpadimError(f"{category.name}: no test images")
    return score_category(category, model, getattr(model, "seed", 0), n_examples, progress, None, None,
                          int(model.n_samples_seen_))


def _model_threshold(model, notes: list[str]) -> float | None:
    """The model's image threshold; a stale one (partial_fit after it was set) gives no verdicts, said in a note."""
    try:
        return model.threshold_
    except FastpadimError as exc:
        notes.append(f"no verdicts: {exc}")
        return None


def score_category(category: Category, model, seed: int, n_examples: int, progress, rd_test: RdTransform | None,
                   fit_s: float | None, n_train: int) -> CategoryRun:
    """Score the test set with a fitted model and compute every metric and confusion matrix."""
    test = transformed_images([t.path for t in category.test], rd_test) if rd_test else [t.path for t in category.test]
    labels = category.labels
    want_pixels = category.has_masks
    frames = CategoryFrames(category, model.preprocessing_, rd_test)
    notes = list(category.notes)
    threshold = _model_threshold(model, notes)
    with tempfile.TemporaryDirectory(prefix="fastpadim-eval-") as tmp:
        n = len(category.test)
        # The network's maps are small (output_size); the frame-size maps are made from them one at a time.
        maps = np.lib.format.open_memmap(Path(tmp) / "maps.npy", mode="w+", dtype=np.float32,
                                         shape=(n, *model.preprocessing_.output_size))
        scores, normalized, scoring_s = _score(model, test, maps, category.name, progress)
        frames.maps = maps
        examples = [frames.example(i) for i in sorted(pick_examples(category, n_examples))]
        result: dict[str, float | None] = {name: None for name in METRICS}
        bounds: dict[str, float] = {}
        curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        pixel_threshold = at_f1_max = None
        if labels.any() and not labels.all():
            from sklearn.metrics import roc_curve

            result["image_auroc"] = metrics.image_auroc(labels, scores)
            result["image_f1_max"], f1_threshold = metrics.f1_max_threshold(labels, scores)
            # sklearn's rule: score ≥ t
            at_f1_max = AtThreshold(float(f1_threshold), Confusion.of_flags(labels, scores >= f1_threshold))
            fpr, tpr, _ = roc_curve(labels, scores)
            curves["image_roc"] = (fpr, tpr)
        if want_pixels:
            hist = metrics.pixel_histograms(frames.inspected_masks(), frames.inspected_maps())
            if hist.positives.sum() and hist.negatives.sum():
                result["pixel_auroc"], bounds["pixel_auroc"] = hist.auroc()
                result["pro"], bounds["pro"] = hist.pro(FPR_LIMIT)
                result["pixel_f1_max"], bounds["pixel_f1_max"], pixel_threshold = hist.f1_max()
                curves["pixel_roc"] = _downsample_curve(*hist.roc_curve())
                curves["pro"] = _downsample_curve(*hist.pro_curve())
            else:
                notes.append("the masks hold no defect pixels (or no normal ones): pixel metrics skipped")
        frames.maps = None
        del maps  # release the memory map before the folder goes
    empty = sum(1 for e in examples if e.defect_type != "good" and not e.mask.any())
    if empty:
        notes.append(f"{empty} shown anomalous example(s) have an empty mask")
    # the verdicts are made as everywhere else (results.verdict: score > threshold), so they match predict's
    verdicts = [verdict(float(s), threshold) for s in scores]
    per_image = [ImageScore(f"{item.defect_type}/{Path(item.path).name}", bool(label), float(score), norm, v)
                 for item, label, score, norm, v in zip(category.test, labels, scores, normalized, verdicts)]
    at_model = (None if threshold is None
                else AtThreshold(float(threshold), Confusion.of_flags(labels, np.array(verdicts, dtype=bool))))
    return CategoryRun(category.name, seed, result, bounds, fit_s, n / max(scoring_s, 1e-9), n_train, n, notes,
                       pixel_threshold, model_settings(model)["weights"], curves, examples, model_settings(model),
                       per_image, threshold, getattr(model, "threshold_target_", None), at_model, at_f1_max)


def _score(model, test, maps: np.ndarray, name: str, progress) -> tuple[np.ndarray, list, float]:
    """Score the test set into ``maps`` (the network's view); returns the image scores, their normalized values
    (score / the model's threshold; None without one) and the seconds spent in the scoring loop (decoding, the
    network, the maps). No frames are kept (``keep_view``), so test images are decoded as ``fit`` decoded the
    training images (a large JPEG at a reduced scale)."""
    scores = np.zeros(len(maps), np.float64)
    normalized: list[float | None] = [None] * len(maps)
    scoring_s = 0.0
    stream = model.iter_scored(test, progress=progress)
    while True:
        tick = time.perf_counter()
        batch = next(stream, None)
        scoring_s += time.perf_counter() - tick
        if batch is None:
            return scores, normalized, scoring_s
        for r in batch:
            if r.error:
                raise FastpadimError(f"{name}: test image unreadable: {r.error}")
            scores[r.index] = r.score
            normalized[r.index] = r.normalized
            maps[r.index] = r.anomaly_map


class Lazy(Sequence):
    """``count`` arrays made on demand by ``make(index)``: the pixel metrics read one frame-size array at a time."""

    def __init__(self, count: int, make: Callable[[int], np.ndarray]):
        self.count, self.make = count, make

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < self.count:
            raise IndexError(index)
        return self.make(index)


@lru_cache(maxsize=16)
def inspected_box(preprocessing: Preprocessing, frame: Size) -> tuple[slice, slice]:
    """The frame's pixels whose centre falls in the network's view: all of them, unless a centre crop left a
    border out. That border is never inspected (its map reads 0), so the metrics leave it out, as the paper's
    protocol does with its cropped masks. Found with ``to_frame`` itself, so it follows the same geometry."""
    covered = preprocessing.to_frame(np.ones(preprocessing.output_size, np.float32), frame) >= 0.5
    rows, cols = np.flatnonzero(covered.any(axis=1)), np.flatnonzero(covered.any(axis=0))
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


@dataclass
class CategoryFrames:
    """A category's test set in its frames' own pixels: anomaly maps put back with ``Preprocessing.to_frame``
    and masks at their own size, so a defect of a few pixels counts as it is. Rd-MVTec frames are the 224
    transformed arrays (``rd``: the test transform)."""

    category: Category
    preprocessing: Preprocessing
    rd: RdTransform | None = None
    maps: np.ndarray | None = None  # the network's maps (N, *output_size), set once scored

    def shape(self, index: int) -> Size:
        return (RD_CROP_SIZE, RD_CROP_SIZE) if self.rd else frame_size(self.category.test[index])

    def frame_map(self, index: int, frame: Size | None = None) -> np.ndarray:
        return self.preprocessing.to_frame(self.maps[index], frame or self.shape(index))

    def mask(self, index: int) -> np.ndarray:
        item = self.category.test[index]
        return _rd_mask(item, self.rd, index) if self.rd else load_mask(item)

    def view(self, index: int) -> np.ndarray:
        image = open_image(self.category.test[index].path)
        return self.rd.image(image, index) if self.rd else np.asarray(image)

    def _inspected(self, array: np.ndarray) -> np.ndarray:
        return array[inspected_box(self.preprocessing, array.shape)]

    def inspected_maps(self) -> Lazy:
        return Lazy(len(self.category.test), lambda i: self._inspected(self.frame_map(i)))

    def inspected_masks(self) -> Lazy:
        return Lazy(len(self.category.test), lambda i: self._inspected(self.mask(i)))

    def example(self, index: int) -> Example:
        """The whole frame (the uninspected border too), its map and its mask, for the report's figure."""
        item, view = self.category.test[index], self.view(index)
        mask = self.mask(index) if self.category.has_masks else np.zeros(view.shape[:2], bool)
        return Example(Path(item.path).name, item.defect_type, view, self.frame_map(index, view.shape[:2]), mask)


def _rd_mask(item, transform: RdTransform, index: int) -> np.ndarray:
    mask = open_mask(item)
    return np.zeros((RD_CROP_SIZE, RD_CROP_SIZE), dtype=bool) if mask is None else transform.mask(mask, index)
