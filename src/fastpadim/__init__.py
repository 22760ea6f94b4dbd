"""fastpadim: PaDiM anomaly detection and localization for industrial visual inspection.

``import fastpadim`` does not import PyTorch: the names that need it (``Padim``, ``PRESETS``) load on first
use (PEP 562), so the ONNX runtime (``pip install fastpadim[runtime]``) works where PyTorch is not installed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import FastpadimError, ImageError
from .results import Predictions

from ._version import __version__

if TYPE_CHECKING:
    from .backbone import PRESETS
    from .model import Padim
    from .onnx_runtime import OnnxPadim

_LAZY = {"Padim": "model", "PRESETS": "backbone", "OnnxPadim": "onnx_runtime"}


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module

        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load(path: str | os.PathLike, device: str = "auto", weights=None, engine: str | None = None,
         precision: str | None = None, allow_download: bool = False) -> Padim | OnnxPadim:
    """Load a fitted model: a ``.padim`` file gives a ``Padim`` (PyTorch), an ``.onnx`` export an ``OnnxPadim``
    (onnxruntime, or OpenVINO with ``engine="openvino"``); both score and predict the same way. A ``.padim`` file
    with ``engine="onnxruntime"``/``"openvino"`` is scored by that engine through its ONNX export (made once,
    cached beside the file in ``MODEL.padim.onnx-cache/``); ``engine="auto"`` picks the fastest installed engine
    whose outputs match PyTorch's within 1e-4 on probe images (the decision in ``model.engine_choice_``).
    ``precision``: None or "f32" (float32, the default everywhere); "bf16"/"f16" only with ``engine="openvino"``
    on a CPU that has them natively (refused otherwise). ``allow_download``: let timm fetch backbone weights that
    are not on this machine (a .padim model only; never by default)."""
    if Path(path).suffix.lower() == ".onnx":
        from .onnx_runtime import OnnxPadim

        if weights is not None:
            raise FastpadimError(f"{path}: an ONNX export carries its backbone weights; --weights does not apply")
        return OnnxPadim(path, engine=engine or "onnxruntime", device=device, precision=precision)
    from .engines import load_padim

    return load_padim(Path(path), device, weights, engine, precision, allow_download)


__all__ = ["Padim", "OnnxPadim", "Predictions", "PRESETS", "FastpadimError", "ImageError", "load", "__version__"]
