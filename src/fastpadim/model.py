"""``Padim``: the estimator users hold — fit on good images, score new ones, save and load."""

from __future__ import annotations

import hashlib
import inspect
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from . import embedders
from .ahead import run_ahead
from .anomaly_map import AnomalyMapGenerator, image_scores
from .backbone import DEFAULT_BACKBONE, BackbonePreset, FeatureExtractor, create_feature_extractor, resolve_preset, same_weights
from .errors import FastpadimError
from .calibration import Calibration, fold_assignment
from .gaussian import GaussianStats, accumulate, check_training_count, leave_one_out, mahalanobis
from .images import ImageInput, LoadedImage, Preprocessing, batch_recorder, iter_batches, single_or_many, stack
from .metadata import MAX_BLUR_SIGMA, MAX_IMAGE_SIZE, MAX_POOL, MIN_IMAGE_SIZE  # the bounds a model file is held to
from .metadata import history_entry  # noqa: F401 - re-exported (distributed)
from .results import Predictions, ScoredImage, ScoringMixin  # noqa: F401 - Predictions re-exported
from .sizes import CPU_FORWARD_IMAGES, Size, as_size, format_size, inputs_per_call, round_to  # noqa: F401
from .sources import expand
from .tiles import Tiler

FACTOR_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
Progress = Callable[[int], None]
FOLD_CACHE_BYTES = 512 * 1024 * 1024  # a fold's embeddings kept for its scoring (larger folds are embedded again)
MAX_FOLDS = 100
PARTS_AHEAD = 1  # network parts (8 images of 256 px: 23 MB of embeddings each) computed ahead of their use


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FastpadimError("--device cuda was asked for, but PyTorch sees no CUDA GPU here")
    try:
        return torch.device(device)
    except RuntimeError:
        raise FastpadimError(f"unknown device {device!r} (use auto, cpu or cuda)") from None


class Padim(ScoringMixin):
    """PaDiM (Defard et al., 2020) with streaming statistics and a factor computed once.

    Parameters follow the paper (ε = 0.01, σ = 4, resize 256) except that the whole resized image is inspected
    by default: the paper's centre crop (``crop_size=224``) would leave a border band of every image unseen, so
    it is opt-in, for reproducing the paper's tables (anomalib's PaDiM does not crop either). The decision
    threshold is set from good images only, none of them lost to the Gaussians: by default the training images'
    out-of-fold scores (``folds``: "all" is leave-one-out, in closed form; k ≥ 2 exact k-fold models; 0 none;
    ``fastpadim.calibration``), or ``threshold_images`` given to ``fit``, or a
    ``holdout`` fraction; the threshold is their (1 − ``false_alarm_rate``) quantile (a tail model's beyond them).

    ``n_features``: the random channel subset's size (None: the preset's Rd; "all": every channel of the layers).

    Sizes are (height, width) or an int for a square; the network's input is rounded to the nearest multiple of
    the backbone's stride (``preprocessing_.output_size`` says what was used). A frame of another aspect ratio than
    ``image_size`` is refused unless ``squash``. Levers on memory (``fastpadim.plan``): ``n_features``,
    ``factor_dtype``, ``pool`` (the embedding averaged over pool x pool positions: pool² fewer Gaussians) and
    ``tile`` (the input cut into tiles of that side, overlapping by ``tile_overlap`` (None: a quarter); each tile
    position keeps its own Gaussians, or with ``tile_shared`` all tiles share one set, for uniform textures).

    Learned attributes end with ``_``: ``mean_`` (P, D), ``whitener_`` (P, D, D; the inverse Cholesky factor),
    ``channel_indices_``, ``grid_`` (the frame's embedding grid, known once the model is built), ``positions_`` (the
    Gaussians' count), ``tiler_`` (None without tiles), ``n_samples_seen_`` (training images),
    ``threshold_``, ``threshold_rate_``, ``calibration_`` (the good scores the threshold came from; they give each
    score its false-alarm probability), ``stats_`` (the statistics, float32 once fitted, for ``partial_fit``),
    ``history_`` (one entry per fit and update), ``engine_`` (what computes the embeddings: ``engine`` itself, or
    what "auto" chose; ``engine_choice_`` holds what it measured).

    ``engine``: what runs the network, "torch" (the default), "onnxruntime" or "openvino" (its ONNX graph, on the
    CPU, in float32) or "auto" (``fastpadim.embedders``); the statistics and distances are the same whichever.

    ``fit`` is ``prepare`` → ``accumulate`` → (``out_of_fold_scores``) → ``finish``, each public, so that other paths (a Ray fit whose shards
    accumulate in other processes, a model file being loaded) assemble a model the same way; ``install`` is the
    one place where fitted state is set.
    """

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        layers: Sequence[int] | None = None,
        n_features: int | str | None = None,
        weights: str | os.PathLike | None = None,
        epsilon: float = 0.01,
        image_size: int | tuple[int, int] = 256,
        crop_size: int | tuple[int, int] | None = None,
        blur_sigma: float = 4.0,
        seed: int = 0,
        device: str = "auto",
        engine: str = "torch",
        batch_size: int = 32,
        folds: int | str = "all",
        holdout: float = 0.0,
        false_alarm_rate: float = 0.01,
        workers: int = 2,
        factor_dtype: str = "float32",
        allow_download: bool = False,
        squash: bool = False,
        pool: int = 1,
        tile: int | None = None,
        tile_overlap: int | None = None,
        tile_shared: bool = False,
    ):
        self.backbone = backbone
        self.layers = layers
        self.n_features = n_features
        self.weights = weights
        self.epsilon = epsilon
        self.image_size = image_size
        self.crop_size = crop_size
        self.blur_sigma = blur_sigma
        self.seed = seed
        self.device = device
        self.engine = engine
        self.batch_size = batch_size
        self.folds = folds
        self.holdout = holdout
        self.false_alarm_rate = false_alarm_rate
        self.workers = workers
        self.factor_dtype = factor_dtype
        self.allow_download = allow_download
        self.squash = squash
        self.pool = pool
        self.tile = tile
        self.tile_overlap = tile_overlap
        self.tile_shared = tile_shared

    # -------------------------------------------------------------------------------- parameters
    @classmethod
    def _param_names(cls) -> list[str]:
        """Parameters are the ``__init__`` arguments (scikit-learn's convention)."""
        return [name for name in inspect.signature(cls.__init__).parameters if name != "self"]

    def get_params(self, deep: bool = True) -> dict:
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params) -> Padim:
        for name, value in params.items():
            if name not in self._param_names():
                raise FastpadimError(f"Padim has no parameter {name!r} (it has {', '.join(self._param_names())})")
            setattr(self, name, value)
        return self

    def _check_params(self) -> None:
        def number(name: str, low: float, high: float = math.inf, integer: bool = False, closed: bool = True):
            value = getattr(self, name)
            kinds = int if integer else (int, float)
            if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) \
                    or value < low or value > high or (not closed and value in (low, high)):
                bounds = f"[{low}, {high}]" if closed else f"({low}, {high})"
                kind = "an integer" if integer else "a number"
                raise FastpadimError(f"{name} must be {kind} in {bounds}, got {value!r}")

        number("epsilon", 0.0)
        number("blur_sigma", 0.0, MAX_BLUR_SIGMA)
        number("seed", 0, 2**63 - 1, integer=True)
        number("batch_size", 1, integer=True)
        number("workers", 1, integer=True)
        number("false_alarm_rate", 0.0, 1.0, closed=False)
        if self.folds != "all":
            number("folds", 0, MAX_FOLDS, integer=True)
            if self.folds == 1:
                raise FastpadimError("folds must be 0 (no out-of-fold threshold), at least 2, or 'all', got 1")
        if self.n_features not in (None, "all"):
            number("n_features", 1, integer=True)  # 0 is no shorthand: "all" keeps every channel, None the preset's
        image_size = self._side_checked("image_size", MAX_IMAGE_SIZE)
        if self.crop_size is not None:
            crop = self._side_checked("crop_size", MAX_IMAGE_SIZE)
            if crop[0] > image_size[0] or crop[1] > image_size[1]:
                raise FastpadimError(f"crop_size {format_size(crop)} must fit in image_size {format_size(image_size)}")
        number("pool", 1, MAX_POOL, integer=True)
        if self.tile is not None:
            number("tile", MIN_IMAGE_SIZE, MAX_IMAGE_SIZE, integer=True)
            if self.tile_overlap is not None:
                number("tile_overlap", 0, self.tile - 1, integer=True)
        for flag in ("squash", "tile_shared"):
            if not isinstance(getattr(self, flag), bool):
                raise FastpadimError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        if isinstance(self.holdout, bool) or not isinstance(self.holdout, (int, float)) or not 0 <= self.holdout < 1:
            raise FastpadimError(f"holdout must be a fraction in [0, 1), got {self.holdout!r}")
        if self.engine not in embedders.ENGINES:
            raise FastpadimError(f"unknown engine {self.engine!r} (use {', '.join(embedders.ENGINES)})")
        if self.factor_dtype not in FACTOR_DTYPES:
            raise FastpadimError(f"factor dtype must be one of {', '.join(FACTOR_DTYPES)}, got {self.factor_dtype!r}")

    def _side_checked(self, name: str, high: int) -> Size:
        size = as_size(getattr(self, name), name)
        if not all(MIN_IMAGE_SIZE <= side <= high for side in size):
            raise FastpadimError(f"{name} sides must lie in [{MIN_IMAGE_SIZE}, {high}], got {format_size(size)}")
        return size

    # ------------------------------------------------------------------------------------- set-up
    def prepare(self, channel_indices: torch.Tensor | None = None) -> Padim:
        """A fresh start: parameters checked, feature model built (its grid and channels known from here on), no
        learned state. ``channel_indices`` reuses a channel subset (a Ray shard, a loaded model); by default it is
        drawn from ``seed``."""
        self._check_params()
        for name in ("mean_", "whitener_", "n_samples_seen_", "_whitener_compute", "calibration_",
                     "threshold_target_", "threshold_extrapolated_"):
            self.__dict__.pop(name, None)
        # The network built for the same parameters is reused (a memory plan, then the fit, build it once).
        key = (repr(sorted(self.get_params().items())), None if channel_indices is None else channel_indices.tolist())
        if self.__dict__.get("_built_for") != key:
            n_features = 0 if self.n_features == "all" else self.n_features  # a preset's 0 means every channel
            self._build(resolve_preset(self.backbone, tuple(self.layers) if self.layers else None, n_features),
                        channel_indices)
            self._built_for = key
        self.skipped_: list[tuple[str, str]] = []
        self.stats_ = None
        self.threshold_ = None
        self.threshold_rate_ = None
        return self

    def _build(self, preset: BackbonePreset, channel_indices: torch.Tensor | None = None) -> None:
        """Create the feature model, preprocessing and channel subset (deterministic in ``seed``)."""
        self.device_ = resolve_device(self.device)
        if self.device_.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick its fastest kernels
        if self.weights == "random":
            torch.manual_seed(self.seed)  # random weights only in tests: make them reproducible
        extractor, self.weights_id_ = create_feature_extractor(preset, self.weights, self.allow_download)
        self.preset_ = preset
        total = sum(extractor.layer_channels())
        if channel_indices is not None and (channel_indices.numel() == 0 or int(channel_indices.max()) >= total
                                            or int(channel_indices.min()) < 0):
            raise FastpadimError(f"channel indices must lie in [0, {total}) for these layers")
        if channel_indices is None:
            n = preset.n_features or total
            if self.n_features is None:
                n = min(n, total)  # other layers than the preset's: its Rd size keeps at most all their channels
            if not 0 < n <= total:
                raise FastpadimError(f"n_features must be between 1 and {total} for these layers, got {n}")
            generator = torch.Generator().manual_seed(self.seed)
            channel_indices = torch.randperm(total, generator=generator)[:n].sort().values
        self.channel_indices_ = channel_indices
        extractor.select(channel_indices)
        extractor.set_pool(self.pool)
        self.extractor_: FeatureExtractor = extractor.to(self.device_)
        self.preprocessing_ = self._preprocessing(preset, extractor.alignment)
        network = self.preprocessing_.output_size
        self.tiler_: Tiler | None = None
        if self.tile is not None:
            tile = round_to((self.tile, self.tile), extractor.alignment)[0]
            overlap = self.tile_overlap if self.tile_overlap is not None else tile // 4
            overlap = overlap // extractor.alignment * extractor.alignment
            self.tiler_ = Tiler(network, tile, overlap, extractor.alignment, extractor.cell).to(self.device_)
            tile_grid = self.extractor_.grid_for(self.tiler_.tile_size)
            if tile_grid != self.tiler_.tile_grid:
                raise FastpadimError(f"tiles of {format_size(self.tiler_.tile_size)} give a {tile_grid} grid, not "
                                     f"{self.tiler_.tile_grid}: this backbone's strides do not suit tiling")
            self.grid_ = self.tiler_.grid
            n_gaussian_tiles = 1 if self.tile_shared else self.tiler_.n_tiles
            self.positions_ = n_gaussian_tiles * tile_grid[0] * tile_grid[1]
        else:
            self.grid_ = self.extractor_.grid_for(network)
            self.positions_ = self.grid_[0] * self.grid_[1]
        self.map_generator_ = AnomalyMapGenerator(network, self.blur_sigma).to(self.device_)
        extractor_input = self.tiler_.tile_size if self.tiler_ else network
        self._forward_count = inputs_per_call(math.prod(extractor_input))
        # what computes the embeddings: the extractor itself, or its ONNX graph in another engine
        self.embedder_, self.engine_, self.engine_choice_ = embedders.build(
            self.extractor_, extractor_input, self.engine, self.device_, self._forward_count)

    def _preprocessing(self, preset: BackbonePreset, alignment: int) -> Preprocessing:
        """The network's input rounded to multiples of ``alignment`` (a crop is rounded; the resize it is cut
        from stays, unless the rounded crop would no longer fit in it)."""
        image_size: Size = as_size(self.image_size)
        if self.crop_size is None:
            image_size, crop = round_to(image_size, alignment), None
        else:
            crop = round_to(as_size(self.crop_size), alignment)
            crop = tuple(c if c <= s else c - alignment for c, s in zip(crop, image_size))
            if min(crop) < alignment:
                raise FastpadimError(f"crop_size {format_size(as_size(self.crop_size))} is too small for this "
                                     f"backbone's stride {alignment}")
        return Preprocessing(image_size, crop, preset.mean, preset.std, self.squash)

    def _is_fitted(self) -> bool:
        return hasattr(self, "whitener_")

    def check_fitted(self) -> None:
        if not self._is_fitted():
            raise FastpadimError("this Padim model is not fitted yet: call fit() first or load a model file")

    # ------------------------------------------------------------------------------------- embedding
    @torch.inference_mode()
    def _embed(self, batch: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) → embeddings (B, P, D); with shared tiles (B·T, p, D), each tile a sample."""
        inputs = self.tiler_.split(batch) if self.tiler_ is not None else batch
        if self.device_.type == "cuda":
            inputs = inputs.pin_memory()  # page-locked, so the copy below overlaps with queued GPU work
            embeddings = self.extractor_(inputs.to(self.device_, non_blocking=True))
        else:
            # On the CPU the network runs as fast on 8 images as on 32, but its activations take a quarter of
            # the memory: fit's peak is then the Gaussian state plus little, whatever the batch size.
            parts = [self.embedder_(part) for part in inputs.split(self._forward_count)]
            embeddings = parts[0] if len(parts) == 1 else torch.cat(parts)
        return self.tiler_.arrange(embeddings, len(batch), self.tile_shared) if self.tiler_ is not None else embeddings

    def _forward_parts(self, batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (batch,) if self.device_.type != "cpu" else batch.split(self.images_per_call)

    @property
    def images_per_call(self) -> int:
        """Images per network call on the CPU (their tiles, if any, go in the same call)."""
        tiles = self.tiler_.n_tiles if self.tiler_ is not None else 1
        return max(1, self._forward_count // tiles)

    @property
    def samples_per_image(self) -> int:
        """Gaussian samples one training image gives: each of its tiles when tiles share one model."""
        return self.tiler_.n_tiles if self.tiler_ is not None and self.tile_shared else 1

    def _batches(self, images: Iterable[ImageInput]) -> Iterator[list[LoadedImage]]:
        return iter_batches(single_or_many(images), self.preprocessing_, self.batch_size, self.workers)

    # ------------------------------------------------------------------------------------------ fit
    def fit(
        self,
        images: Iterable[ImageInput],
        threshold_images: Iterable[ImageInput] | None = None,
        progress: Progress | None = None,
    ) -> Padim:
        """Learn the per-position Gaussians from good images, then set the decision threshold.

        The threshold comes from good images the Gaussians did not see: ``threshold_images`` (kept apart) if
        given; else a seeded ``holdout`` fraction of ``images`` if it is above 0; else (the default) the
        out-of-fold scores of all the images, each fold scored by the model of the other ``folds`` (0: no
        threshold). ``images`` may also be a folder, a glob or a list file, as on the command line.
        """
        self.prepare()
        self.history_ = []
        images, self.skipped_ = expand(images)
        if threshold_images is None and self.holdout > 0:
            images, threshold_images = self.holdout_split(list(images))
            return self._add(images, threshold_images, progress, "hold-out")
        return self._add(images, threshold_images, progress, "good images")

    def holdout_split(self, images: Sequence) -> tuple[list, list]:
        """The seeded hold-out split: (images for the Gaussians, images for the threshold)."""
        self._check_params()
        images = list(images)
        n_hold = max(1, round(self.holdout * len(images)))
        if len(images) - n_hold < 2:
            raise FastpadimError(
                f"{len(images)} images are too few to hold out {n_hold} for the threshold and fit on at least 2; "
                "add images or set holdout to 0"
            )
        order = np.random.default_rng(self.seed).permutation(len(images))
        held = set(order[:n_hold].tolist())
        return [img for i, img in enumerate(images) if i not in held], [img for i, img in enumerate(images) if i in held]

    def partial_fit(self, images: Iterable[ImageInput], threshold_images: Iterable[ImageInput] | None = None,
                    progress: Progress | None = None) -> Padim:
        """Add good images: the same Gaussians as one fit on all the images, and a threshold set again.

        With ``threshold_images`` the threshold is set from them. Otherwise, with ``folds`` ≥ 2, the new images'
        out-of-fold scores (each fold scored by the model of all the other images) join the good scores the
        threshold came from, and the threshold is their quantile again. With ``folds=0`` a threshold set before
        no longer matches the Gaussians: predicting refuses until ``set_threshold`` is called.
        """
        if not self._is_fitted():
            self.prepare()
            self.history_ = []
        elif self.stats_ is None:
            raise FastpadimError(
                "this model holds no training statistics (a model file of format 1, written before fastpadim "
                "0.5), so it cannot take more images; fit it again once to make it updatable"
            )
        images, unusable = expand(images)
        self.skipped_ += unusable
        return self._add(images, threshold_images, progress, "good images")

    def _add(self, images, threshold_images, progress: Progress | None, method: str) -> Padim:
        """Accumulate ``images``; calibrate (from ``threshold_images``, else out of fold); factor; record it."""
        out_of_fold = threshold_images is None and self.folds != 0
        if out_of_fold:
            # read twice (the statistics, then the calibration scores): a one-shot iterator is kept in memory
            images = list(images) if isinstance(images, Iterator) else images
        digest = hashlib.sha256()
        before = self.stats_.count if self.stats_ is not None else 0
        self.accumulate(images, progress, digest)
        added = (self.stats_.count - before) // self.samples_per_image if self.stats_ is not None else 0
        fold_scores = None
        if out_of_fold and added:
            fold_scores = self.finish_out_of_fold(images, progress)
        else:
            self.finish()
        self.history_ = [*getattr(self, "history_", []), history_entry(added, digest.hexdigest())]
        if threshold_images is not None:
            self.set_threshold_from_scores(self.good_scores(threshold_images, progress), self.false_alarm_rate,
                                           method)
        elif fold_scores is not None:
            previous: Calibration | None = self.__dict__.get("calibration_")
            calibration = (previous.merged(fold_scores, "out-of-fold") if previous is not None
                           else Calibration(fold_scores, "out-of-fold", self.folds))
            self.calibrate(calibration, self.threshold_rate_ if previous is not None else None)
        return self

    def accumulate(self, images: Iterable[ImageInput], progress: Progress | None = None, digest=None) -> Padim:
        """Add the embeddings of good images to the running statistics ``stats_`` (no factorisation yet);
        unreadable images are listed in ``skipped_``; ``digest`` (a hashlib object) takes each input as seen."""
        if self.stats_ is not None:
            self.stats_ = self.stats_.widened()  # a fitted model's statistics are kept compact (float32)

        parts = run_ahead(self._embedded_parts(images), self._parts_ahead)
        self.stats_ = accumulate(self.stats_, parts, batch_recorder(self.skipped_, digest, progress))
        return self

    def finish_out_of_fold(self, images: Sequence[ImageInput], progress: Progress | None = None) -> np.ndarray:
        """``finish``, and the out-of-fold scores of ``images`` (already in ``stats_``): k folds are scored before
        the factorisation (they need the float64 statistics), leave-one-out ("all") after it (the fitted model's
        distances, in closed form). The local fit and the Ray driver both take this path."""
        if self.folds == "all":
            return self.finish().leave_one_out_scores(images, progress)
        scores = self.out_of_fold_scores(images, progress)
        self.finish()
        return scores

    def out_of_fold_scores(self, images: Sequence[ImageInput], progress: Progress | None = None) -> np.ndarray:
        """Scores of ``images`` (already in ``stats_``), each fold by the model of all the other images.

        Statistics merge exactly, so a fold's model is ``stats_`` without the fold's own statistics (one more
        pass over the fold's images, which also gives their embeddings to score) and one factorisation: k folds
        cost k factorisations and one more forward pass, not k fits."""
        images = images if hasattr(images, "__len__") else list(images)
        folds = min(self.folds, len(images))
        assignment = fold_assignment(len(images), folds, self.seed)
        scores: list[float] = []
        for fold in range(folds):
            members = [image for image, f in zip(images, assignment) if f == fold]
            part, cached = self._fold_statistics(members)
            if part is None:
                continue  # no readable image in this fold
            rest = self.stats_.without(part)
            if rest.count // self.samples_per_image < 2:
                raise FastpadimError(f"{folds} folds leave fewer than 2 images to fit the other folds' model on; "
                                     "add images or lower folds")
            mean = rest.mean.float()
            whitener = rest.whitener(self.epsilon, FACTOR_DTYPES[self.factor_dtype], consume=True)
            compute = whitener.float() if whitener.dtype != torch.float32 and self.device_.type == "cpu" else whitener
            del rest
            for embeddings, count in cached if cached is not None else self._embedded(members):
                # (a fold whose embeddings were too large to keep is embedded again)
                scores.extend(self._score_embeddings(embeddings, count, mean, compute)[0].cpu().tolist())
            del whitener, compute, cached
            if progress:
                progress(len(members))
        return np.asarray(scores, np.float64)

    @torch.inference_mode()
    def leave_one_out_scores(self, images: Iterable[ImageInput], progress: Progress | None = None) -> np.ndarray:
        """Scores of ``images`` (in the fitted model) by the model of all the other images: ``folds="all"``, each
        fold model in closed form (``gaussian.leave_one_out``), one more forward pass and no factorisation."""
        self.check_fitted()
        samples = self.stats_.count
        if samples < 3:
            raise FastpadimError(f"a leave-one-out threshold needs at least 3 training images, got {samples}; add "
                                 "images, give good images for the threshold, or set folds to 0 (no threshold)")
        scores: list[float] = []
        for embeddings, frames in self._embedded(images):
            distances = mahalanobis(embeddings, self.mean_, self._whitener_compute)
            scores.extend(self._score_distances(leave_one_out(distances, samples), frames)[0].cpu().tolist())
            if progress:
                progress(frames)
        return np.asarray(scores, np.float64)

    def _fold_statistics(self, images: Sequence[ImageInput]) -> tuple[GaussianStats | None, list | None]:
        """A fold's statistics, and its embeddings (with their image counts) while they fit FOLD_CACHE_BYTES."""
        stats, cached, size = None, [], 0
        for embeddings, frames in self._embedded(images):
            if stats is None:
                stats = GaussianStats.empty(embeddings.shape[1], embeddings.shape[2], self.device_)
            stats.update(embeddings)
            size += embeddings.numel() * embeddings.element_size()
            cached = cached if cached is not None and size <= FOLD_CACHE_BYTES else None
            if cached is not None:
                cached.append((embeddings, frames))
        return stats, cached

    def _embedded(self, images: Iterable[ImageInput]) -> Iterator[tuple[torch.Tensor, int]]:
        """(embeddings, frame count) part by part over the readable ``images``, the network a few parts ahead."""
        for _, embeddings in run_ahead(self._embedded_parts(images, frames=True), self._parts_ahead):
            if embeddings is not None:
                yield embeddings

    def _embedded_parts(self, images: Iterable[ImageInput], frames: bool = False) -> Iterator[tuple[list, object]]:
        """(batch, embeddings) part by part over the batches of ``images``, then (batch, None) once its readable
        images are all embedded; with ``frames`` the embeddings come as (embeddings, frame count)."""
        for batch in self._batches(images):
            good = [item for item in batch if item.tensor is not None]
            for part in self._forward_parts(stack(good)) if good else ():
                embeddings = self._embed(part)
                yield batch, ((embeddings, len(part)) if frames else embeddings)
            yield batch, None

    @property
    def _parts_ahead(self) -> int:
        """Network parts computed ahead of the statistics (0 on a GPU, whose queue already overlaps them)."""
        return PARTS_AHEAD if self.device_.type == "cpu" else 0

    def finish(self, stats: GaussianStats | None = None) -> Padim:
        """Factor the statistics (``stats``, e.g. merged from Ray shards, else ``stats_``) and install them: one
        Cholesky per position, at fit time; scoring only multiplies. The statistics are kept as a model file
        stores them (float32, ``GaussianStats.compacted``), so a fitted model and its saved file score alike
        and either can take more images."""
        stats = self.stats_ if stats is None else stats
        check_training_count(stats.count // self.samples_per_image if stats is not None else 0, self.skipped_)
        self.stats_ = None
        compact = stats.compacted()
        del stats  # the float64 statistics are freed here unless the caller holds them
        return self.install_statistics(compact)

    def install_statistics(self, stats: GaussianStats) -> Padim:
        """Fitted state from (compacted) statistics: the factor is computed here, once (fit, load, Ray)."""
        whitener = stats.whitener(self.epsilon, FACTOR_DTYPES[self.factor_dtype])
        return self.install(stats.mean.float(), whitener, stats.count // self.samples_per_image, stats)

    def install(self, mean: torch.Tensor, whitener: torch.Tensor, n_samples_seen: int,
                stats: GaussianStats | None = None) -> Padim:
        """The one way fitted state enters a built model (``finish``, loading a file, the Ray driver and workers):
        per-position means (P, D), factors (P, D, D), the training count, and optionally the statistics."""
        positions, dim = self.positions_, mean.shape[-1]
        if mean.shape[0] != positions or tuple(whitener.shape) != (positions, dim, dim):
            raise FastpadimError(f"fitted state of shapes {tuple(mean.shape)} and {tuple(whitener.shape)} does not fit "
                                 f"this model's {positions} positions")
        self.n_samples_seen_ = int(n_samples_seen)
        self.mean_ = mean.float().to(self.device_)
        self.whitener_ = whitener.to(self.device_)
        self.stats_ = stats
        # Half-precision factors are stored small but multiplied in float32 on the CPU (no fast fp16 GEMM there).
        if self.whitener_.dtype != torch.float32 and self.device_.type == "cpu":
            self._whitener_compute = self.whitener_.float()
        else:
            self._whitener_compute = self.whitener_
        return self

    # -------------------------------------------------------------------------------------- scoring
    @torch.inference_mode()
    def _score_tensor(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._score_embeddings(self._embed(batch), len(batch), self.mean_, self._whitener_compute)

    @torch.inference_mode()
    def _score_embeddings(self, embeddings: torch.Tensor, frames: int, mean: torch.Tensor,
                          whitener: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings of ``frames`` images → image scores (B,) and maps (B, H, W) against (mean, whitener)."""
        return self._score_distances(mahalanobis(embeddings, mean, whitener), frames)

    def _score_distances(self, distances: torch.Tensor, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-position distances (B, P), or (B·T, p) with shared tiles → image scores (B,) and maps (B, H, W)."""
        if self.tiler_ is not None:
            grid = self.tiler_.stitch(distances.view(frames, self.tiler_.n_tiles, *self.tiler_.tile_grid))
        else:
            grid = distances.view(-1, *self.grid_)
        maps = self.map_generator_(grid)
        return image_scores(maps), maps

    def run_batch(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Preprocessed images (B, 3, H, W) → image scores (B,) and anomaly maps (B, H, W), as NumPy."""
        # On the CPU, a few frames at a time (as many pixels as the network's forward part): the embeddings and
        # products of a batch of large frames would otherwise take gigabytes, for no gain in speed.
        frames = torch.from_numpy(batch)
        count = len(frames) if self.device_.type != "cpu" else inputs_per_call(math.prod(frames.shape[-2:]))
        parts = [self._score_tensor(part) for part in frames.split(count)]
        return (torch.cat([s for s, _ in parts]).cpu().numpy(), torch.cat([m for _, m in parts]).cpu().numpy())

    # ----------------------------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write one safetensors file atomically: the mean and the packed statistics (float32), from which loading
        computes the factor; every saved model can take more images (``partial_fit``, ``fastpadim update``)."""
        from .modelfile import write_model_file

        self.check_fitted()
        if self.stats_ is None:
            raise FastpadimError("this model holds no training statistics to save (it was loaded from a format-1 "
                                 "model file); fit it again")
        write_model_file(path, self.to_metadata(), self._tensors())

    def to_metadata(self) -> dict:
        """What a model file records besides the tensors (the schema of ``fastpadim.metadata``)."""
        return {
            **self.network_metadata(),
            "n_train_images": int(self.n_samples_seen_),
            **self.threshold_metadata(),
            "history": list(getattr(self, "history_", [])),
        }

    def network_metadata(self) -> dict:
        """The part of ``to_metadata`` known once the model is built (``prepare``), before any image."""
        from . import __version__
        from .modelfile import FORMAT_NAME, FORMAT_VERSION

        preset: BackbonePreset = self.preset_
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "fastpadim_version": __version__,
            "backbone": {
                "name": preset.name,
                "timm_name": preset.timm_name,
                "layers": list(preset.layers),
                "extra_blocks": preset.extra_blocks,
                "n_features": int(self.channel_indices_.numel()),
                # an id checked against the weights found at load time; never a path (a model file must not
                # decide which local files are read)
                "weights_id": self.weights_id_,
            },
            "preprocessing": self.preprocessing_.to_dict(),
            "grid": list(self.grid_),
            "positions": int(self.positions_),
            "pool": self.pool,
            "tiling": None if self.tiler_ is None else {
                "tile": self.tiler_.tile, "overlap": self.tiler_.overlap, "shared": self.tile_shared},
            "epsilon": self.epsilon,
            "blur_sigma": self.blur_sigma,
            "seed": self.seed,
            "factor_dtype": self.factor_dtype,
            "folds": self.folds,
        }

    def _tensors(self) -> dict[str, torch.Tensor]:
        stats = self.stats_
        return {
            "mean": stats.mean.float().cpu().contiguous(),
            "scatter": stats.scatter.float().cpu().contiguous(),
            "channel_indices": self.channel_indices_.detach().cpu().long().contiguous(),
        }

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "auto", weights: str | os.PathLike | None = None,
             allow_download: bool = False, engine: str = "torch") -> Padim:
        """Read a model file and compute its factor; ``engine`` runs its network (as the parameter of that name). Backbone weights: the offline package or timm's cache as
        recorded at fit time, or the ``weights`` file the user gives (checked by its SHA-256); the network only
        with ``allow_download``."""
        from .modelfile import read_model_file, weights_source

        path = Path(path)
        meta, tensors = read_model_file(path)
        bb, th = meta["backbone"], meta["threshold"]
        pre = Preprocessing.from_dict(meta["preprocessing"])
        tiling = meta.get("tiling") or {}
        weights, preset = weights_source(path, meta, weights)
        model = cls(
            backbone=bb["name"], layers=bb["layers"], n_features=bb["n_features"], weights=weights,
            epsilon=meta["epsilon"], image_size=pre.image_size, crop_size=pre.crop_size, squash=pre.squash,
            blur_sigma=meta["blur_sigma"], seed=meta["seed"], device=device, engine=engine, folds=meta.get("folds", 0),
            false_alarm_rate=th["false_alarm_rate"], factor_dtype=meta["factor_dtype"], allow_download=allow_download,
            pool=meta.get("pool", 1), tile=tiling.get("tile"), tile_overlap=tiling.get("overlap"),
            tile_shared=tiling.get("shared", False),
        )
        model._check_params()
        model._build(preset, tensors["channel_indices"].long())
        if not same_weights(model.weights_id_, bb["weights_id"]):
            raise FastpadimError(
                f"{path}: the model was fitted with weights {bb['weights_id']}, but {model.weights_id_} were found; "
                "scores would be meaningless"
            )
        if model.preprocessing_ != pre or list(model.grid_) != meta["grid"]:
            raise FastpadimError(f"{path}: model metadata fields 'preprocessing' and 'grid' ({meta['grid']}) do not "
                                 f"match what the network gives ({list(model.grid_)} at "
                                 f"{format_size(model.preprocessing_.output_size)} px)")
        model.skipped_ = []
        samples = meta["n_train_images"] * model.samples_per_image
        if "scatter" in tensors:
            stats = GaussianStats(samples, tensors["mean"].double().to(model.device_), tensors["scatter"].to(model.device_))
            try:
                model.install_statistics(stats)
            except FastpadimError as exc:
                raise FastpadimError(f"{path}: {exc}") from None
        else:  # format 1: the factor itself, and the statistics only if they were kept (--keep-stats)
            stats = None
            if "stats.scatter" in tensors:
                stats = GaussianStats(samples, tensors["stats.mean"], tensors["stats.scatter"]).compacted()
            model.install(tensors["mean"], tensors["whitener"], meta["n_train_images"], stats)
        model.install_threshold_metadata(meta)
        model.metadata_ = meta
        return model

    def __repr__(self) -> str:
        state = f"fitted on {self.n_samples_seen_} images" if self._is_fitted() else "not fitted"
        return f"Padim(backbone={self.backbone!r}, {state})"
