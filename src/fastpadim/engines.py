"""A ``.padim`` model scored by another engine: its ONNX export, made once and cached beside the model file, run
by onnxruntime or OpenVINO; and ``engine="auto"``, which times every installed engine that gives the PyTorch
engine's outputs (within 1e-4) on a few probe images and keeps the fastest.

The cache is ``MODEL.padim.onnx-cache/<first 16 hex of the SHA-256 of the .padim file>-v<export format>/``: a
changed model file, or a fastpadim that exports another graph, gets a new entry, never a stale graph. It is
written atomically (exported into a temporary folder inside the cache, then both files moved into place); an
entry is used only when both of its files are there. Where the model's folder cannot be written, the export goes
to a temporary folder that lives as long as the returned model.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import FastpadimError
from .files import file_digest
from .timing import best_of
from .onnx_runtime import ENGINE_CHOICES as ENGINE_NAMES, ENGINES as ONNX_ENGINES, EXPORT_FORMAT_VERSION, installed_engines

if TYPE_CHECKING:
    from .model import Padim
    from .onnx_runtime import OnnxPadim

CACHE_SUFFIX = ".onnx-cache"
EXPORT_NAME = "model.onnx"
AUTO_TOLERANCE = 1e-4  # relative, of each image score and of each map (to that map's max)
PROBE_IMAGES = 4
PROBE_SEED = 20240611
ENTRY_NAME = re.compile(r"[0-9a-f]{16}(-v[0-9]+)?")  # what cache entries are called (no version: before format 2)


def cache_entry_name(model_path: Path) -> str:
    """The name of the cache entry of the .padim file ``model_path``: its bytes' digest and the export format."""
    return f"{file_digest(model_path)}-v{EXPORT_FORMAT_VERSION}"


def _cache_entry(model_path: Path) -> Path:
    """Where the export of the .padim file ``model_path`` is cached."""
    return model_path.with_name(model_path.name + CACHE_SUFFIX) / cache_entry_name(model_path)


def _complete(folder: Path) -> Path | None:
    onnx_path = folder / EXPORT_NAME
    if onnx_path.is_file() and (folder / f"{EXPORT_NAME}.data").is_file():
        return onnx_path
    return None


def _export_into_cache(write: Callable[[Path], object], entry: Path) -> Path:
    """``write(path)`` into a temporary folder inside the cache folder, then both files moved into ``entry`` (data
    first)."""
    cache = entry.parent
    cache.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".export-", dir=cache))
    try:
        write(work / EXPORT_NAME)
        entry.mkdir(exist_ok=True)
        os.replace(work / f"{EXPORT_NAME}.data", entry / f"{EXPORT_NAME}.data")
        os.replace(work / EXPORT_NAME, entry / EXPORT_NAME)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # exports of earlier versions of the model file (or of the export format) can never be used again: a model
    # updated every day would otherwise leave one export per version behind
    for other in cache.iterdir():
        if other != entry and ENTRY_NAME.fullmatch(other.name):
            shutil.rmtree(other, ignore_errors=True)
    return entry / EXPORT_NAME


def cache_export(model_path: Path, write: Callable[[Path], object]) -> Path:
    """Cache beside the .padim file ``model_path`` the export that ``write(path)`` makes of it, where
    ``onnx_of`` finds it (a fit without torch writes it while it holds the factor)."""
    return _export_into_cache(write, _cache_entry(Path(model_path)))


def _export(model_path: Path, model: Padim) -> tuple[Path, tempfile.TemporaryDirectory | None]:
    """The export and the temporary folder that holds it (None when it lies in the cache beside the model)."""
    model_path = Path(model_path)
    entry = _cache_entry(model_path)
    cache = entry.parent
    cached = _complete(entry)
    if cached is not None:
        return cached, None
    from .export import export_onnx

    try:
        return _export_into_cache(lambda path: export_onnx(model, path), entry), None
    except (OSError, FastpadimError):
        if _writable(cache) or (not cache.exists() and _writable(model_path.parent)):
            raise  # the cache could be written: a real failure, not a read-only folder

    holder = tempfile.TemporaryDirectory(prefix="fastpadim-onnx-")
    path = Path(holder.name) / EXPORT_NAME
    try:
        export_onnx(model, path)
    except BaseException:
        holder.cleanup()
        raise
    return path, holder


def onnx_of(model_path: Path, model: Padim) -> Path:
    """The ONNX export of the .padim file ``model_path`` (``model`` is loaded from it), made with ``export_onnx``
    and cached in ``MODEL.padim.onnx-cache/<digest>/``. Where that folder cannot be written it goes to a temporary
    folder, kept alive as ``model._export_dir`` (removed when ``model`` is)."""
    path, holder = _export(model_path, model)
    if holder is not None:
        model._export_dir = holder
    return path


def _writable(folder: Path) -> bool:
    return folder.is_dir() and os.access(folder, os.W_OK)


def onnx_model(model_path: Path, model: Padim, engine: str, device: str, precision: str | None,
               export: tuple[Path, tempfile.TemporaryDirectory | None] | None = None) -> OnnxPadim:
    """An ``OnnxPadim`` over the cached export of the .padim ``model`` (or ``export``, made before), with ``engine``."""
    from .onnx_runtime import OnnxPadim

    path, holder = export or _export(model_path, model)
    scored = OnnxPadim(path, engine=engine, device=device, precision=precision,
                       batch_size=model.batch_size, workers=model.workers)
    scored._export_dir = holder  # cleaned when the model is
    return scored


def probe_images(size: tuple[int, int], n: int = PROBE_IMAGES) -> list[np.ndarray]:
    """``n`` deterministic uint8 RGB images of ``size`` (height, width): smooth shading plus fine texture, the
    last with a bright square (a probe with a clear peak in its map)."""
    rng = np.random.default_rng(PROBE_SEED)
    height, width = size
    rows, cols = -(-height // 16), -(-width // 16)
    images = []
    for _ in range(n):
        shading = np.kron(rng.uniform(60, 190, (rows, cols, 3)), np.ones((16, 16, 1)))[:height, :width]
        images.append(np.clip(shading + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8))
    images[-1][height // 3 : height // 2, width // 3 : width // 2] = 255
    return images


def differences(expected, got) -> tuple[float, float]:
    """The largest relative score difference, and the largest map difference relative to torch's map max."""
    if len(got.scores) != len(expected.scores):
        return float("inf"), float("inf")
    scores = float(np.max(np.abs(got.scores - expected.scores) / np.maximum(np.abs(expected.scores), 1e-30)))
    scale = np.maximum(expected.maps.reshape(len(expected.maps), -1).max(axis=1), 1e-30)[:, None, None]
    maps = float(np.max(np.abs(got.maps - expected.maps) / scale))
    return scores, maps


def choose_engine(model_path: Path, model: Padim, device: str):
    """The fastest installed engine whose outputs on the probe images match the PyTorch engine's within 1e-4;
    the returned model carries the decision in ``engine_choice_``."""
    images = probe_images(model.preprocessing_.output_size)
    seconds, expected = best_of(lambda: model.predict(images))
    candidates = {"torch": {"seconds": seconds, "max_relative_score_difference": 0.0,
                            "max_relative_map_difference": 0.0, "qualified": True}}
    models = {"torch": model}
    export = None
    for engine in installed_engines():
        try:
            export = export or _export(model_path, model)
            scored = onnx_model(model_path, model, engine, device, None, export)
            seconds, got = best_of(lambda: scored.predict(images))
        except FastpadimError as exc:
            candidates[engine] = {"seconds": None, "max_relative_score_difference": None, "qualified": False,
                                  "error": str(exc)}
            continue
        score_diff, map_diff = differences(expected, got)
        qualified = score_diff <= AUTO_TOLERANCE and map_diff <= AUTO_TOLERANCE
        candidates[engine] = {"seconds": seconds, "max_relative_score_difference": score_diff,
                              "max_relative_map_difference": map_diff, "qualified": qualified}
        if qualified:
            models[engine] = scored
    best = min(models, key=lambda name: candidates[name]["seconds"])
    chosen = models[best]
    chosen.engine_choice_ = {"engine": best, "candidates": candidates}
    return chosen


def load_padim(path: Path, device: str, weights, engine: str | None, precision: str | None, allow_download: bool):
    """``fastpadim.load`` for a .padim file."""
    if engine not in (None, *ENGINE_NAMES):
        raise FastpadimError(f"{path}: unknown engine {engine!r} (use {', '.join(ENGINE_NAMES)})")
    engine = engine or "torch"
    if engine == "torch" and precision not in (None, "f32"):
        raise FastpadimError(f"{path}: precision {precision!r} applies to the OpenVINO engine (--engine openvino); "
                             "the PyTorch engine computes in f32")
    if engine == "auto" and precision not in (None, "f32"):
        raise FastpadimError(f"{path}: --engine auto compares engines in f32 only; precision {precision!r} needs "
                             "--engine openvino")
    if engine in ONNX_ENGINES:
        from .onnx_runtime import PRECISIONS

        # refused before any export: what OnnxPadim would refuse after it
        if precision not in (None, *PRECISIONS):
            raise FastpadimError(f"unknown precision {precision!r} (use {', '.join(PRECISIONS)})")
        if engine == "onnxruntime" and precision not in (None, "f32"):
            raise FastpadimError(f"precision {precision} runs on the OpenVINO engine only (--engine openvino); "
                                 "onnxruntime computes in f32")
        cached = _complete(_cache_entry(path)) if path.is_file() else None  # else Padim.load says what is wrong
        if cached is not None:  # the export was made from these very bytes: no need to load the .padim again
            from .onnx_runtime import OnnxPadim

            scored = OnnxPadim(cached, engine=engine, device=device, precision=precision)
            scored._export_dir = None
            return scored
    from .model import Padim

    model = Padim.load(path, device=device, weights=weights, allow_download=allow_download)
    if engine == "torch":
        return model
    if engine == "auto":
        return choose_engine(path, model, device)
    return onnx_model(path, model, engine, device, precision)
