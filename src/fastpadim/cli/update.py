"""``fastpadim update``: more good images into a fitted model, exactly (the Gaussians of one fit on all of them)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import FastpadimError
from ..files import check_writable_file
from .calibrate import previous_threshold
from .console import progress_bar, report_skipped, say, user_errors, warn
from .options import AllowDownloadOpt, BatchSizeOpt, DeviceOpt, WeightsOpt

STALE = "none (stale: set for fewer images)"


def update(
    model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="Model file from 'fastpadim fit' (.padim).")],
    source: Annotated[Path, typer.Argument(metavar="NEW_GOOD", help="New good images: a folder, an image or video, a glob, or a .txt list of paths.")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Model file to write (default: MODEL, rewritten in place).")] = None,
    weights: WeightsOpt = None,
    allow_download: AllowDownloadOpt = False,
    device: DeviceOpt = "auto",
    batch_size: BatchSizeOpt = 32,
) -> None:
    """Add good images to a fitted model and set its threshold again (their out-of-fold scores join the good
    scores it came from); the model file is rewritten atomically."""
    from ..model import Padim
    from ..sources import inputs, resolve

    with user_errors():
        output = output or model_path
        if model_path.suffix.lower() == ".onnx":
            raise FastpadimError(f"{model_path} is an ONNX export, which holds no training statistics: update the .padim "
                                 "it was exported from, then export it again")
        if batch_size < 1:
            raise FastpadimError(f"--batch-size must be at least 1, got {batch_size}")
        check_writable_file(output)
        items, skipped = resolve(source)  # names only: a bad source is refused before the model loads
        model = Padim.load(model_path, device=device, weights=weights, allow_download=allow_download)
        if model.stats_ is None:
            raise FastpadimError(f"{model_path} is a format-1 model file without training statistics, so it cannot "
                                 "take more images; fit it again once to make it updatable")
        model.batch_size = batch_size
        before, seen = previous_threshold(model), model.n_samples_seen_
        target = getattr(model, "threshold_target_", None) or ""
        # the out-of-fold pass reads the new images a second time (not with folds 0)
        total = len(items) * (2 if model.folds != 0 else 1)
        start = time.perf_counter()
        with progress_bar("updating", total) as advance:
            model.partial_fit(inputs(items, skipped), progress=advance)
        elapsed = time.perf_counter() - start
        report_skipped(skipped + model.skipped_)
        added = model.n_samples_seen_ - seen
        if added == 0:
            raise FastpadimError(f"{source}: no readable images to add; {model_path} is unchanged")
        model.save(output)
        say(f"updated {output}: added {added} images ({model.n_samples_seen_} in all) in {elapsed:.1f} s; "
            f"threshold {new_threshold(model)} (was {before})")
        if new_threshold(model) == STALE:
            warn("the model has no out-of-fold calibration (fitted with --folds 0), so its threshold no longer "
                 f"matches the Gaussians: set it again (fastpadim set-threshold {output} --good FOLDER)")
            return
        if target.startswith(("recall=", "f1", "manual")):
            how = "by hand" if target == "manual" else f"for {target} on labelled images"
            warn(f"the threshold was set {how}; it was re-set from good images only, for a false-alarm rate of "
                 f"{model.threshold_rate_:g}: run 'fastpadim calibrate {output} --good ... --defective ...' again")
        if model.threshold_ is not None and not getattr(model, "threshold_extrapolated_", False):
            from ..results import threshold_caveat

            caveat = threshold_caveat(model.threshold_rate_, getattr(model, "threshold_count_", None))
            if caveat:
                warn(caveat)


def new_threshold(model) -> str:
    """The threshold after the update and what it rests on, e.g. ``12.1 for fpr=0.01 from 24 good scores``."""
    try:
        value = model.threshold_
    except FastpadimError:
        return STALE
    if value is None:
        return "none"
    line = f"{value:.6g} for {getattr(model, 'threshold_target_', None) or f'fpr={model.threshold_rate_:g}'}"
    if getattr(model, "threshold_count_", None):
        line += f" from {model.threshold_count_} good scores"
    return line + (", extrapolated by the tail model" if getattr(model, "threshold_extrapolated_", False) else "")
