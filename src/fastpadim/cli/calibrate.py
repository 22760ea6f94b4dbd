"""``fastpadim calibrate``: a threshold for a target (false-alarm rate, recall, F1) from labelled images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import FastpadimError
from .console import out, progress_bar, report_skipped, user_errors, warn
from .options import AllowDownloadOpt, BatchSizeOpt, DeviceOpt, EngineOpt, PrecisionOpt, WeightsOpt


def calibrate(
    model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="Model file (.padim or .onnx); its threshold is rewritten in place.")],
    good: Annotated[Path, typer.Option("--good", help="Good images the model did not learn from (a folder, an image, a glob or a list file).")],
    defective: Annotated[Path, typer.Option("--defective", help="Defective images (a folder, an image, a glob or a list file).")],
    target: Annotated[Optional[str], typer.Option("--target", help="fpr=R (at most R of good images flagged), recall=R (at least R of defects caught) or f1 (the best F1); default: fpr at the model's false-alarm rate.")] = None,
    weights: WeightsOpt = None,
    allow_download: AllowDownloadOpt = False,
    device: DeviceOpt = "auto",
    batch_size: BatchSizeOpt = 32,
    engine: EngineOpt = None,
    precision: PrecisionOpt = None,
) -> None:
    """Set a model's threshold for a target from labelled good and defective images (no refit), show the
    result on them, and write the threshold into the model file."""
    from ..targets import apply_choice, choose_threshold, parse_target

    with user_errors():
        wanted = parse_target(target) if target is not None else None  # a bad target before any work
        model = load_model(model_path, device, weights, engine, precision, allow_download, batch_size)
        check_write_back(model, model_path)  # before the images are scored
        if wanted is None:
            wanted = parse_target(f"fpr={model.threshold_rate_ or model.false_alarm_rate:g}")
        before = previous_threshold(model)
        good_scores = labelled_scores(model, good, "good")
        defective_scores = labelled_scores(model, defective, "defective")
        report_skipped(model.skipped_)
        choice = choose_threshold(wanted, good_scores, defective_scores)
        apply_choice(model, choice, good_scores)
        write_back(model, model_path)
        for line in choice_lines(choice, before, model_path):
            out.print(line, highlight=False, soft_wrap=True)
        if choice.target.kind == "fpr" and not choice.extrapolated:
            from ..results import threshold_caveat

            caveat = threshold_caveat(choice.target.rate, len(good_scores))
            if caveat:
                warn(caveat)


def load_model(path: Path, device: str, weights, engine, precision, allow_download: bool, batch_size: int = 32):
    """A .padim (PyTorch) or .onnx (onnxruntime/OpenVINO) model, with its scoring batch size."""
    from .. import load

    if batch_size < 1:
        raise FastpadimError(f"--batch-size must be at least 1, got {batch_size}")
    model = load(path, device=device, weights=weights, engine=engine, precision=precision, allow_download=allow_download)
    model.batch_size = batch_size
    return model


def check_write_back(model, path: Path) -> None:
    """Refuse up front what ``write_back`` could not write: a read-only file, a format-1 .padim without statistics."""
    from ..files import check_writable_file

    check_writable_file(path)
    if not hasattr(model, "save_metadata") and model.stats_ is None:
        raise FastpadimError(f"{path} is a format-1 model file without training statistics; fastpadim cannot write it "
                             "again: fit it again once (or set a threshold by value: fastpadim set-threshold MODEL VALUE)")


def write_back(model, path: Path) -> None:
    """The new threshold into the model file, atomically: an ONNX export's metadata is rewritten (the graph and
    its data file stay), a .padim is saved again (it holds nothing the loaded model does not)."""
    if hasattr(model, "save_metadata"):
        model.save_metadata()
    else:
        model.save(path)


def labelled_scores(model, source: Path, kind: str) -> list[float]:
    """Scores of the images in ``source`` (unreadable ones go to ``model.skipped_``); one line if none is left."""
    from ..sources import inputs, resolve

    items, skipped = resolve(source)
    with progress_bar(f"scoring {kind} images", len(items)) as advance:
        scores = model.readable_scores(inputs(items, skipped), advance, skipped)
    model.skipped_ += skipped
    if not scores:
        raise FastpadimError(f"{source}: no readable {kind} images to calibrate with")
    return scores


def previous_threshold(model) -> str:
    """The threshold a model holds now and what it was set for, e.g. ``11.2 for fpr=0.01``."""
    try:
        value = model.threshold_
    except FastpadimError:
        return "stale"
    if value is None:
        return "none"
    target = getattr(model, "threshold_target_", None)
    return f"{value:.6g} for {target}" if target else f"{value:.6g}"


def choice_lines(choice, before: str, model_path: Path) -> list[str]:
    """The threshold and the confusion matrix of the labelled images at it, in three lines."""
    matrix = choice.confusion
    extrapolated = ", extrapolated by the tail model" if choice.extrapolated else ""
    lines = [f"threshold {choice.threshold:.6g} for {choice.target}{extrapolated} (was {before}); wrote {model_path}",
             f"good images  {matrix.good_passed} passed, {matrix.false_alarms} false alarms "
             f"(false-alarm rate {percent(matrix.false_alarm_rate)} of {matrix.n_good})"]
    if matrix.n_defective:
        lines.append(f"defects      {matrix.defects_caught} caught, {matrix.defects_missed} missed "
                     f"(recall {percent(matrix.recall)} of {matrix.n_defective}; F1 {matrix.f1:.3f})")
    return lines


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"
