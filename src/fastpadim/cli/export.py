"""``fastpadim export`` and ``fastpadim set-threshold``: ONNX exports, and a model's threshold (.padim or .onnx)."""

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
from .info import weights_line
from .options import AllowDownloadOpt, DeviceOpt, PrecisionOpt, WeightsOpt


def export(
    model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="Model file from 'fastpadim fit' (.padim).")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="ONNX file to write (default: MODEL with .onnx); its tensors go to OUTPUT.data beside it.")] = None,
    fp16: Annotated[bool, typer.Option("--fp16", help="Store weights and the Gaussian factor in half precision (half the size; computed in float32).")] = False,
    opset: Annotated[int, typer.Option(help=f"ONNX opset ({OPSETS.start}-{OPSETS.stop - 1}).")] = DEFAULT_OPSET,
    image_size: Annotated[Optional[str], typer.Option(help="Expected network input, N (a square) or HxW (height x width); the export fails if the model was fitted at another.")] = None,
    int8: Annotated[Optional[Path], typer.Option(
        "--int8", metavar="TRAIN_DIR",
        help="Opt-in, lossy: quantise the backbone to int8 (NNCF: the 'int8' extra), calibrated on these "
             "good images (the training images: a folder, a glob or a .txt list); the scoring stays float32. Scores "
             "move: see docs/performance.md for the measured accuracy.")] = None,
    weights: WeightsOpt = None,
    allow_download: AllowDownloadOpt = False,
) -> None:
    """Export a fitted model to ONNX: one graph from a preprocessed batch to anomaly maps and image scores."""
    from ..export import check_export_target, check_int8, export_onnx
    from ..model import Padim
    from ..sources import inputs, resolve

    with user_errors():
        output = output or model_path.with_suffix(".onnx")
        if model_path.suffix.lower() == ".onnx":
            raise FastpadimError(f"{model_path} is already an ONNX export; export takes a .padim model file")
        check_export_target(output, opset)  # before the (slower) model load
        calibration = None
        if int8 is not None:
            check_int8(fp16)
            calibration = inputs(*resolve(int8))  # names now (a bad source fails here), decoded during the export
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
            result = export_onnx(model, output, fp16=fp16, opset=opset, int8_images=calibration)
        threshold = f"{model.threshold_:.4g}" if model.threshold_ is not None else "none"
        say(f"wrote {result.onnx_path} ({result.onnx_bytes / 1e6:.1f} MB) and {result.data_path.name} "
            f"({result.data_bytes / 1e6:.1f} MB): input {size} px, opset {opset}, "
            f"{weights_line(result.metadata['export'])}, threshold {threshold}")


def set_threshold(
    model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="A model file (.padim) or an ONNX export (.onnx).")],
    value: Annotated[Optional[float], typer.Argument(help="The new image threshold (set by hand: target 'manual').")] = None,
    good: Annotated[Optional[Path], typer.Option("--good", help="Set it from these good images instead (a folder or an image).")] = None,
    false_alarm_rate: Annotated[Optional[float], typer.Option(help="With --good: share of good images flagged (default: the model's).")] = None,
    clear: Annotated[bool, typer.Option("--clear", help="Remove the threshold (verdicts become 'unknown').")] = False,
    engine: Annotated[Optional[str], typer.Option(help="With --good, for .onnx models: onnxruntime (default) or openvino.")] = None,
    precision: PrecisionOpt = None,
    weights: WeightsOpt = None,
    allow_download: AllowDownloadOpt = False,
    device: DeviceOpt = "auto",
) -> None:
    """Change a model's threshold in its file, without refitting or re-exporting (neither the Gaussians nor the
    graph hold it): a value, one set from good images for a false-alarm rate, or none."""
    with user_errors():
        if sum([value is not None, good is not None, clear]) != 1:
            raise FastpadimError("give exactly one of: a VALUE, --good FOLDER, or --clear")
        for name, given in (("--precision", precision), ("--engine", engine), ("--false-alarm-rate", false_alarm_rate)):
            if given is not None and good is None:
                raise FastpadimError(f"{name} applies with --good only (it sets how the good images are scored)")
        if good is not None:
            from ..images import list_images
            from .calibrate import check_write_back, load_model, write_back

            files = list_images(good)
            if false_alarm_rate is not None and not 0 < false_alarm_rate < 1:
                raise FastpadimError(f"false alarm rate must be in (0, 1), got {false_alarm_rate}")
            model = load_model(model_path, device, weights, engine, precision, allow_download)
            check_write_back(model, model_path)
            with progress_bar("scoring", len(files)) as advance:
                model.set_threshold(files, false_alarm_rate, progress=advance)
            write_back(model, model_path)
            th = {"image": model.threshold_, "target": model.threshold_target_}
        else:
            if weights is not None or allow_download:
                raise FastpadimError("--weights and --allow-download apply with --good only (a value is written "
                                     "without loading the network)")
            th = write_manual_threshold(model_path, None if clear else check_threshold(value, "the threshold"))
        shown = "none" if th["image"] is None else f"{th['image']:.6g} ({th['target']})"
        say(f"{model_path}: threshold {shown}")


def write_manual_threshold(path: Path, value: float | None) -> dict:
    """A threshold set by hand (None: removed) into the model file's metadata, atomically; the network is not
    built (no weights needed) and the tensors are written back as they were read."""
    from ..targets import manual_threshold

    if path.suffix.lower() == ".onnx":
        from ..onnx_runtime import read_metadata, write_threshold

        write_threshold(path, value)
        return read_metadata(path)["threshold"]
    from ..metadata import validate
    from ..modelfile import read_model_file, write_model_file

    meta, tensors = read_model_file(path)
    meta["threshold"] = manual_threshold(meta["threshold"], value, meta["n_train_images"])
    write_model_file(path, validate(meta, path), tensors)
    return meta["threshold"]
