"""``fastpadim export`` and ``fastpadim set-threshold``: ONNX exports and their threshold."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import FastpadimError
from ..export import DEFAULT_OPSET
from ..onnx_runtime import OPSETS
from ..results import check_threshold
from ..sizes import format_size, parse_size
from .console import progress_bar, say, user_errors
from .options import AllowDownloadOpt, PrecisionOpt, WeightsOpt


def export(
    model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="Model file from 'fastpadim fit' (.padim).")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="ONNX file to write (default: MODEL with .onnx); its tensors go to OUTPUT.data beside it.")] = None,
    fp16: Annotated[bool, typer.Option("--fp16", help="Store weights and the Gaussian factor in half precision (half the size; computed in float32).")] = False,
    opset: Annotated[int, typer.Option(help=f"ONNX opset ({OPSETS.start}-{OPSETS.stop - 1}).")] = DEFAULT_OPSET,
    image_size: Annotated[Optional[str], typer.Option(help="Expected network input, N (a square) or HxW (height x width); the export fails if the model was fitted at another.")] = None,
    weights: WeightsOpt = None,
    allow_download: AllowDownloadOpt = False,
) -> None:
    """Export a fitted model to ONNX: one graph from a preprocessed batch to anomaly maps and image scores."""
    from ..export import check_export_target, export_onnx
    from ..model import Padim

    with user_errors():
        output = output or model_path.with_suffix(".onnx")
        if model_path.suffix.lower() == ".onnx":
            raise FastpadimError(f"{model_path} is already an ONNX export; export takes a .padim model file")
        check_export_target(output, opset)  # before the (slower) model load
        expected = parse_size(image_size) if image_size is not None else None
        model = Padim.load(model_path, device="cpu", weights=weights, allow_download=allow_download)
        size = format_size(model.preprocessing_.output_size)
        if expected is not None and expected != model.preprocessing_.output_size:
            asked = format_size(expected)
            raise FastpadimError(
                f"{model_path} takes {size} px inputs; its Gaussians are per position of that grid, so a {asked} px "
                f"export needs a model fitted at that size (fastpadim fit --image-size {asked} --crop-size 0 ...)"
            )
        with progress_bar("exporting", None):
            result = export_onnx(model, output, fp16=fp16, opset=opset)
        threshold = f"{model.threshold_:.4g}" if model.threshold_ is not None else "none"
        say(f"wrote {result.onnx_path} ({result.onnx_bytes / 1e6:.1f} MB) and {result.data_path.name} "
            f"({result.data_bytes / 1e6:.1f} MB): input {size} px, opset {opset}, "
            f"{'float16' if fp16 else 'float32'} weights, threshold {threshold}")


def set_threshold(
    model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="An ONNX export (.onnx).")],
    value: Annotated[Optional[float], typer.Argument(help="The new image threshold.")] = None,
    good: Annotated[Optional[Path], typer.Option("--good", help="Set it from these good images instead (a folder or an image).")] = None,
    false_alarm_rate: Annotated[Optional[float], typer.Option(help="With --good: share of good images flagged (default: the model's).")] = None,
    clear: Annotated[bool, typer.Option("--clear", help="Remove the threshold (verdicts become 'unknown').")] = False,
    engine: Annotated[str, typer.Option(help="With --good: onnxruntime or openvino.")] = "onnxruntime",
    precision: PrecisionOpt = None,
) -> None:
    """Change an ONNX export's threshold in its metadata, without re-exporting (the graph does not hold it)."""
    from ..onnx_runtime import OnnxPadim, read_metadata, write_threshold

    with user_errors():
        if sum([value is not None, good is not None, clear]) != 1:
            raise FastpadimError("give exactly one of: a VALUE, --good FOLDER, or --clear")
        if model_path.suffix.lower() != ".onnx":
            raise FastpadimError(f"{model_path}: set-threshold edits ONNX exports; for a .padim model use predict --threshold")
        if precision is not None and good is None:
            raise FastpadimError("--precision applies with --good only (it sets how the good images are scored)")
        if good is not None:
            from ..images import list_images

            files = list_images(good)
            model = OnnxPadim(model_path, engine=engine, precision=precision)
            if false_alarm_rate is not None and not 0 < false_alarm_rate < 1:
                raise FastpadimError(f"false alarm rate must be in (0, 1), got {false_alarm_rate}")
            with progress_bar("scoring", len(files)) as advance:
                model.set_threshold(files, false_alarm_rate, progress=advance)
            model.save_metadata()
            meta = model.metadata_
        else:
            check_threshold(value, "the threshold")
            write_threshold(model_path, value)
            meta = read_metadata(model_path)
        th = meta["threshold"]["image"]
        say(f"{model_path}: threshold {'none' if th is None else f'{th:.6g}'}")
