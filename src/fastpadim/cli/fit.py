"""``fastpadim fit``: a model from good images or video frames, in this process or on Ray."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import FastpadimError
from ..files import check_writable_file, make_output_folder
from ..sources import Item, Rereadable, Skipped, by_video, inputs, resolve
from .console import out, progress_bar, report_skipped, say, user_errors, warn
from .options import (
    AllowDownloadOpt, BackboneOpt, BatchSizeOpt, CpusPerTaskOpt, CropSizeOpt, DeviceOpt, EngineOpt, FeaturesOpt, FrameStrideOpt,
    BlurSigmaOpt, EpsilonOpt, ImageSizeOpt, LayersOpt, LongSideOpt, MaxPixelsOpt, PoolOpt, RayOpt, SquashOpt, TileOpt, TileOverlapOpt,
    TileSharedOpt, WeightsOpt, apply_max_pixels, check_options, parse_folds, parse_layers, shape_params,
)


def fit(
    source: Annotated[Path, typer.Argument(help="Good images: a folder (searched recursively), an image or video, a glob, or a .txt list of paths.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Model file to write (a folder with --per-video).")] = Path("model.padim"),
    backbone: BackboneOpt = "efficientnet_lite0",
    weights: WeightsOpt = None,
    allow_download: AllowDownloadOpt = False,
    layers: LayersOpt = None,
    n_features: FeaturesOpt = None,
    device: DeviceOpt = "auto",
    engine: EngineOpt = None,
    batch_size: BatchSizeOpt = 32,
    image_size: ImageSizeOpt = "256",
    long_side: LongSideOpt = None,
    squash: SquashOpt = False,
    crop_size: CropSizeOpt = 0,
    pool: PoolOpt = 1,
    tile: TileOpt = None,
    tile_overlap: TileOverlapOpt = None,
    tile_shared: TileSharedOpt = False,
    epsilon: EpsilonOpt = 0.01,
    blur_sigma: BlurSigmaOpt = 4.0,
    seed: Annotated[int, typer.Option(help="Seed of the channel subset, the folds and the hold-out split.")] = 0,
    folds: Annotated[str, typer.Option(help="Out-of-fold calibration: each fold of the training images is scored by the model of the others, and the threshold set from those scores; all = leave-one-out (in closed form), K = K fold models, 0 = none (no threshold).")] = "all",
    holdout: Annotated[float, typer.Option(help="The old hold-out threshold: this fraction of the good images is kept out of the Gaussians to set it (0: none); overrides --folds.")] = 0.0,
    threshold_dir: Annotated[Optional[Path], typer.Option(help="Separate folder of good images for the threshold (then no folds or hold-out).")] = None,
    false_alarm_rate: Annotated[float, typer.Option(help="Target share of good images flagged by the threshold.")] = 0.01,
    factor_dtype: Annotated[str, typer.Option(help="Stored factor precision: float32, float16 or bfloat16.")] = "float32",
    max_pixels: MaxPixelsOpt = None,
    ray_target: RayOpt = None,
    frame_stride: FrameStrideOpt = 1,
    per_video: Annotated[bool, typer.Option(help="One model per video, written into the --output folder as <video name>.padim.")] = False,
    cpus_per_task: CpusPerTaskOpt = 1,
    max_memory: Annotated[Optional[float], typer.Option(help="Refuse a fit whose planned peak memory is above this many GB (10^9 bytes), naming the levers that fit.")] = None,
    plan: Annotated[bool, typer.Option("--plan", help="Print the memory plan (statistics, factor, model file, fit peak against the available memory) and exit without fitting.")] = False,
) -> None:
    """Fit a model on good images (or video frames).

    With --engine onnxruntime or openvino and the leave-one-out threshold (the default) or none (--folds 0), the fit
    runs without PyTorch in this process (the network's graph is built once by a child process and cached)."""
    with user_errors():
        check_options(n_features=n_features, seed=seed, folds=folds, holdout=holdout, false_alarm_rate=false_alarm_rate)
        folds = parse_folds(folds)
        apply_max_pixels(max_pixels)
        # an ONNX engine, and a leave-one-out threshold or none: the fit runs without PyTorch (fastpadim.onnx_fit)
        from ..onnx_fit import unsupported

        without_torch = (unsupported(engine or "torch", folds, holdout, tile, device) is None and threshold_dir is None
                         and ray_target is None and not per_video and not plan and max_memory is None)
        if not without_torch:
            from ..model import Padim  # first: a light install without PyTorch is told so before anything else

        if ray_target is not None:
            from ..distributed import require_ray

            require_ray()  # a missing extra is said before any work; the cluster is joined after the plan
        if not per_video and not plan:
            check_writable_file(output)
        files, unusable = resolve(source, frame_stride)  # names only: no image is decoded before the plan
        threshold_files = resolve(threshold_dir, frame_stride)[0] if threshold_dir else None
        report_skipped(unusable)
        shape = shape_params(image_size, long_side, squash, pool, tile, tile_overlap, tile_shared,
                             lambda: first_frame_size(files))
        params = dict(
            backbone=backbone, layers=parse_layers(layers), n_features=n_features, weights=weights, epsilon=epsilon,
            blur_sigma=blur_sigma, crop_size=crop_size or None, seed=seed, device=device, engine=engine or "torch",
            batch_size=batch_size, folds=folds, holdout=0.0 if threshold_files else holdout, false_alarm_rate=false_alarm_rate,
            factor_dtype=factor_dtype, allow_download=allow_download, **shape,
        )
        # the out-of-fold pass reads every training image a second time (none with a hold-out or threshold images)
        fold_pass = folds != 0 and not threshold_files and not params["holdout"]
        if without_torch:
            return fit_without_torch(files, output, params)
        from ..plan import check_plan, plan_for

        # The memory plan (it builds the network, which the fit then reuses): --plan prints it and writes nothing;
        # a fit that would not fit the available memory is refused here, in one line naming what to change. A fit
        # that fits prints nothing more (one line per message: the result line).
        planned = Padim(**params)
        if max_memory is not None and not max_memory > 0:
            raise FastpadimError(f"--max-memory must be a positive number of GB, got {max_memory}")
        memory = plan_for(planned, limit=None if max_memory is None else int(max_memory * 1e9), images=len(files),
                          folds=folds if fold_pass else 0)
        shown_input = input_line(planned, shape["image_size"], crop_size or None)
        if plan:
            out.print(shown_input, highlight=False, soft_wrap=True)
            out.print(memory.describe(), highlight=False, soft_wrap=True)
            return
        check_plan(memory, crop=bool(crop_size))
        if ray_target is not None:
            from ..distributed import connect

            say(f"Ray: {connect(ray_target)} CPUs")  # start-up is not fit time
        for n, (target, job) in enumerate(per_video_jobs(files, output) if per_video else [(output, files)]):
            model = planned if n == 0 else Padim(**params)
            total = len(job) * (2 if fold_pass else 1) + (len(threshold_files) if threshold_files else 0)
            start = time.perf_counter()
            with progress_bar("fitting", total, rate=ray_target is not None) as advance:
                fit_items(model, job, threshold_files, progress=advance, ray_target=ray_target, cpus_per_task=cpus_per_task)
            elapsed = time.perf_counter() - start
            report_skipped(model.skipped_)
            model.save(target)
            images = len(job) + (len(threshold_files) if threshold_files else 0)  # each once, whatever the passes
            say(f"fitted {model.n_samples_seen_} images in {elapsed:.1f} s ({images / elapsed:.1f} images/s; "
                f"{model.preset_.name}, {model.device_.type}); {shown_input}; threshold {threshold_text(model)}; "
                f"wrote {target}")
            warn_threshold_caveat(model)


def warn_threshold_caveat(model) -> None:
    """A tail model extrapolates below 1/n; without one (too few scores) the threshold is their maximum: say so."""
    from ..results import threshold_caveat

    if model.threshold_ is not None and not getattr(model, "threshold_extrapolated_", False):
        caveat = threshold_caveat(model.threshold_rate_, getattr(model, "threshold_count_", None))
        if caveat:
            warn(caveat)


def fit_without_torch(files: Sequence[Item], output: Path, params: dict) -> None:
    """``fit --engine onnxruntime|openvino`` with a leave-one-out threshold or none: ``onnx_fit.fit_model_file``,
    PyTorch never imported here."""
    from ..onnx_fit import fit_model_file
    from ..sizes import format_size

    engine = params.pop("engine")
    skipped: Skipped = []
    start = time.perf_counter()
    with progress_bar("fitting", len(files) * (2 if params["folds"] == "all" else 1)) as advance:
        result = fit_model_file(Rereadable(files, skipped), output, engine=engine, progress=advance, **params)
    elapsed = time.perf_counter() - start
    report_skipped(skipped + result.skipped)
    built = "; the network's graph built and cached first" if result.network_built else ""
    say(f"fitted {result.n_train_images} images in {elapsed:.1f} s ({len(files) / elapsed:.1f} images/s; "
        f"{params['backbone']}, {engine} without PyTorch{built}); input {format_size(result.input_size)}; "
        f"threshold {threshold_text(result.scoring)}; wrote {output}")
    warn_threshold_caveat(result.scoring)


THRESHOLD_SOURCES = {"hold-out": "hold-out", "good images": "--threshold-dir"}


def threshold_text(model) -> str:
    """The threshold and how it was set, e.g. ``812.3 (out-of-fold, 5 folds, 209 good scores, false-alarm rate
    0.01)``: the reader of the result line learns what the number rests on."""
    if model.threshold_ is None:
        return "none (--folds 0)"
    calibration = getattr(model, "calibration_", None)
    how = []
    if calibration is not None:
        how.append(THRESHOLD_SOURCES.get(calibration.method, calibration.method))
        if calibration.method == "out-of-fold" and calibration.folds:
            how.append("leave-one-out" if calibration.folds == "all" else f"{calibration.folds} folds")
    how.append(f"{model.threshold_count_} good scores, false-alarm rate {model.threshold_rate_:g}")
    if getattr(model, "threshold_extrapolated_", False):
        how.append("extrapolated by the tail model")
    return f"{model.threshold_:.4g} ({', '.join(how)})"


def first_frame_size(files: Sequence[Item]) -> tuple[int, int]:
    """(height, width) of the first readable training image, as decoded (EXIF orientation applied)."""
    from ..images import ImageError, open_image

    for value in inputs(files, []):
        try:
            width, height = open_image(value).size
        except ImageError:
            continue
        return height, width
    raise FastpadimError("no readable training image to take the aspect ratio from (--long-side)")


def input_line(model, requested: tuple[int, int], crop: int | None) -> str:
    """What the network will see: the size (and the rounding to the backbone's stride), the grid and tiles."""
    from ..sizes import format_size

    pre = model.preprocessing_
    used = pre.output_size
    asked = (crop, crop) if crop else requested
    line = f"input {format_size(used)} (height x width)"
    if tuple(asked) != tuple(used):
        line += f", rounded from {format_size(asked)} to multiples of {model.extractor_.alignment} px (the backbone's stride)"
    line += f"; grid {format_size(model.grid_)}"
    if model.pool > 1:
        line += f" (pooled {model.pool}x{model.pool})"
    if model.tiler_ is not None:
        line += f"; {model.tiler_.describe()}" + (", one shared model" if model.tile_shared else "")
    return line


def fit_items(model, images: Sequence[Item], threshold_images: Sequence[Item] | None = None,
              progress: Callable[[int], None] | None = None, ray_target: str | None = None, **ray_options):
    """Fit from source items, in this process (``ray_target`` None) or on Ray (``ray_options`` go to
    ``fit_on_ray``); frames are decoded lazily, after the hold-out split (the out-of-fold pass reads them again)."""
    if ray_target is not None:
        from ..distributed import connect, fit_on_ray

        connect(ray_target)
        return fit_on_ray(model, images, threshold_images, progress, **ray_options)
    images = list(images)
    if threshold_images is None and model.holdout > 0:
        images, threshold_images = model.holdout_split(images)
    skipped: Skipped = []
    held = inputs(threshold_images, skipped) if threshold_images is not None else None
    model.fit(Rereadable(images, skipped), threshold_images=held, progress=progress)
    model.skipped_ = skipped + model.skipped_
    return model


def per_video_jobs(items: Sequence[Item], output: Path) -> list[tuple[Path, list[Item]]]:
    """``fit --per-video``: (model file, frames) per video, models named after the videos in ``output``."""
    groups = by_video(items)
    if not groups:
        raise FastpadimError("--per-video needs video files in the source, found only images")
    targets: dict[Path, str] = {}
    for video in groups:
        target = output / f"{Path(video).stem}.padim"
        if target in targets:
            raise FastpadimError(f"--per-video: {video} and {targets[target]} would both be written to {target}")
        targets[target] = video
    make_output_folder(output)
    return [(target, groups[video]) for target, video in targets.items()]
