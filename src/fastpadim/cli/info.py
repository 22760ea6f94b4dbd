"""``fastpadim info``: what a model file (.padim or .onnx) holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ..sizes import as_size, format_size
from .console import out, user_errors


def info(model_path: Annotated[Path, typer.Argument(metavar="MODEL")],
         as_json: Annotated[bool, typer.Option("--json", help="Print the metadata as JSON.")] = False) -> None:
    """Show what a model file (.padim or .onnx) holds: backbone, weights, preprocessing, training count, threshold."""
    with user_errors():
        if model_path.suffix.lower() == ".onnx":
            from ..onnx_runtime import read_metadata

            meta, tensors = read_metadata(model_path), {}
        else:
            from ..modelfile import read_model_file

            meta, tensors = read_model_file(model_path)
        if as_json:
            out.print_json(json.dumps(meta))
            return
        bb, pre, th = meta["backbone"], meta["preprocessing"], meta["threshold"]
        size = model_path.stat().st_size / 1e6
        lines = [
            f"file            {model_path} ({size:.1f} MB, format v{meta['format_version']}, fastpadim {meta['fastpadim_version']})",
            f"backbone        {bb['name']} (timm {bb['timm_name']}, layers {bb['layers']}, {bb['n_features']} channels)",
            f"weights         {bb['weights_id']}",
            f"preprocessing   {preprocessing_line(pre)}",
            (f"positions       {meta['positions']} Gaussians; grid {format_size(meta['grid'])}, pool {meta.get('pool', 1)}, "
             f"tiling {tiling_line(meta.get('tiling'))}"),
            f"gaussian        epsilon {meta['epsilon']}, factor {meta['factor_dtype']}, blur sigma {meta['blur_sigma']}",
            f"training        {meta['n_train_images']} images" + (" (statistics kept)" if "stats.scatter" in tensors else ""),
            f"threshold       {threshold_line(th)}",
        ]
        if "export" in meta:
            ex = meta["export"]
            data = model_path.parent / ex["data_file"]
            data_size = f"{data.stat().st_size / 1e6:.1f} MB" if data.is_file() else "missing"
            lines.append(f"onnx export     opset {ex['opset']}, {ex['weights_dtype']} weights, input {ex['input']['shape']}; "
                         f"data {ex['data_file']} ({data_size})")
        out.print("\n".join(lines), highlight=False, soft_wrap=True)


def preprocessing_line(pre: dict) -> str:
    """Sizes as HxW (height x width), as --image-size takes them."""
    crop = format_size(as_size(pre["crop_size"])) if pre["crop_size"] is not None else "none"
    return f"resize {format_size(as_size(pre['image_size']))}, crop {crop}" + (", squash" if pre.get("squash") else "")


def tiling_line(tiling: dict | None) -> str:
    if tiling is None:
        return "none"
    kind = "one shared set of Gaussians" if tiling.get("shared") else "Gaussians per tile position"
    return f"tiles of {tiling['tile']} px overlapping by {tiling['overlap']} px, {kind}"


def threshold_line(th: dict) -> str:
    """The threshold and what it rests on; when its good images are too few for the rate, that instead of the rate."""
    from ..results import threshold_caveat

    if th["image"] is None:
        return "none"
    caveat = threshold_caveat(th["false_alarm_rate"], th.get("n_good_images"))
    if caveat:
        return f"{th['image']} (warning: {caveat})"
    return f"{th['image']} (false-alarm rate {th['false_alarm_rate']} on {th['n_good_images']} good images)"
