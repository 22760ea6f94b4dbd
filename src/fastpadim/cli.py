"""The ``fastpadim`` command: fit, predict, info, demo (and evaluate, serve)."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .errors import FastpadimError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="PaDiM anomaly detection: fit on good images, score new ones.")
console = Console(stderr=True)
out = Console()
_state = {"debug": False}


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False) -> None:
    _state["debug"] = debug


def fail(message: str, code: int = 1):
    console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def user_errors():
    """One line per error, exit code 1; the traceback only with --debug."""
    try:
        yield
    except FastpadimError as exc:
        if _state["debug"]:
            raise
        fail(str(exc))
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except (typer.Exit, typer.Abort):
        raise
    except Exception as exc:  # noqa: BLE001
        if _state["debug"]:
            raise
        fail(f"unexpected {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} (run with --debug for details)")


@contextmanager
def progress_bar(description: str, total: int | None):
    """A rich progress bar on stderr; yields the advance(n) callback fastpadim's loops take."""
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


def parse_layers(layers: str | None) -> tuple[int, ...] | None:
    if not layers:
        return None
    try:
        return tuple(int(part) for part in layers.split(","))
    except ValueError:
        raise FastpadimError(f"--layers takes comma-separated integers, e.g. 1,2,3; got {layers!r}") from None


def check_writable_file(path: Path) -> None:
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise FastpadimError(f"cannot write {path}: it is a folder")
    if not folder.is_dir():
        raise FastpadimError(f"cannot write {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise FastpadimError(f"cannot write {path}: permission denied")


def report_skipped(skipped: list[tuple[str, str]]) -> None:
    for _name, reason in skipped:
        console.print(f"[yellow]skipped:[/yellow] {escape(reason)}", highlight=False, soft_wrap=True)


# ----------------------------------------------------------------------------------------------- fit
BackboneOpt = Annotated[str, typer.Option("--backbone", "-b", help="Preset (efficientnet_lite0, resnet18, wide_resnet50_2, efficientnet_b5) or a timm model name.")]
WeightsOpt = Annotated[Optional[str], typer.Option("--weights", help="Backbone weights file (.safetensors/.pth); default: offline package or timm's hub cache.")]
LayersOpt = Annotated[Optional[str], typer.Option("--layers", help="Layer indices for timm's forward_intermediates, e.g. 1,2,3.")]
FeaturesOpt = Annotated[Optional[int], typer.Option("--n-features", "-d", help="Random channel subset size (Rd); default: the preset's.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")]


@app.command()
def fit(
    source: Annotated[Path, typer.Argument(help="Good images: a folder (searched recursively), an image or video, a glob, or a .txt list of paths.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Model file to write (a folder with --per-video).")] = Path("model.padim"),
    backbone: BackboneOpt = "efficientnet_lite0",
    weights: WeightsOpt = None,
    layers: LayersOpt = None,
    n_features: FeaturesOpt = None,
    device: DeviceOpt = "auto",
    batch_size: Annotated[int, typer.Option(help="Images per network batch.")] = 32,
    image_size: Annotated[int, typer.Option(help="Resize to this square size (bicubic).")] = 256,
    crop_size: Annotated[int, typer.Option(help="Centre crop after resizing (the paper: 224); 0 = none, the whole image is inspected.")] = 0,
    epsilon: Annotated[float, typer.Option(help="Covariance regularisation εI.")] = 0.01,
    seed: Annotated[int, typer.Option(help="Seed of the channel subset and hold-out split.")] = 0,
    holdout: Annotated[float, typer.Option(help="Fraction of good images kept out to set the threshold (0: none).")] = 0.1,
    threshold_dir: Annotated[Optional[Path], typer.Option(help="Separate folder of good images for the threshold (then no hold-out).")] = None,
    false_alarm_rate: Annotated[float, typer.Option(help="Target share of good images flagged by the threshold.")] = 0.01,
    factor_dtype: Annotated[str, typer.Option(help="Stored factor precision: float32, float16 or bfloat16.")] = "float32",
    keep_stats: Annotated[bool, typer.Option(help="Also store the training statistics, so partial fits can continue later.")] = False,
    ray_target: Annotated[Optional[str], typer.Option("--ray", metavar="local[:N]|auto|ADDRESS", help="Fit on Ray: an embedded local Ray with N workers (--ray alone: local), or join a cluster.")] = None,
    frame_stride: Annotated[int, typer.Option(help="Videos: use every K-th frame.")] = 1,
    per_video: Annotated[bool, typer.Option(help="One model per video, written into the --output folder as <video name>.padim.")] = False,
    cpus_per_task: Annotated[float, typer.Option(help="With --ray: CPUs (threads) per task; each task holds one copy of the statistics.")] = 1,
) -> None:
    """Fit a model on good images (or video frames)."""
    import time

    from .distributed import connect, fit_items, per_video_jobs, rate_progress
    from .model import Padim
    from .sources import resolve

    with user_errors():
        if ray_target is not None:
            console.print(f"Ray: {connect(ray_target)} CPUs", highlight=False)  # start-up is not fit time
        if not per_video:
            check_writable_file(output)
        files, unusable = resolve(source, frame_stride)
        threshold_files = resolve(threshold_dir, frame_stride)[0] if threshold_dir else None
        report_skipped(unusable)
        for target, job in per_video_jobs(files, output) if per_video else [(output, files)]:
            model = Padim(
                backbone=backbone, layers=parse_layers(layers), n_features=n_features, weights=weights, epsilon=epsilon,
                image_size=image_size, crop_size=crop_size or None, seed=seed, device=device, batch_size=batch_size,
                holdout=0.0 if threshold_files else holdout, false_alarm_rate=false_alarm_rate, factor_dtype=factor_dtype,
                keep_stats=keep_stats,
            )
            total = len(job) + (len(threshold_files) if threshold_files else 0)
            start = time.perf_counter()
            with (rate_progress if ray_target else progress_bar)("fitting", total) as advance:
                fit_items(model, job, threshold_files, progress=advance, ray_target=ray_target, cpus_per_task=cpus_per_task)
            elapsed = time.perf_counter() - start
            report_skipped(model.skipped_)
            model.save(target, keep_stats=keep_stats)
            threshold = f"{model.threshold_:.4g}" if model.threshold_ is not None else "none (no hold-out)"
            console.print(
                f"fitted {model.n_samples_seen_} images in {elapsed:.1f} s ({total / elapsed:.1f} images/s; "
                f"{model.preset_.name}, {model.device_.type}); threshold {threshold}; wrote {target}", highlight=False,
            )


# ------------------------------------------------------------------------------------------- predict
def relative_name(path: str, root: Path) -> Path:
    # abspath, not resolve: a symlinked image must keep its place under root, or names from different
    # sub-folders (good/000.png, broken/000.png) would collide and overwrite each other's overlays.
    base = Path(os.path.abspath(root if root.is_dir() else root.parent))
    try:
        return Path(os.path.abspath(path)).relative_to(base)
    except ValueError:
        return Path(Path(path).name)


def write_png(image, path: Path) -> None:
    from .modelfile import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def write_text(text: str, path: Path) -> None:
    from .modelfile import atomic_write

    def write(tmp):
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)

    atomic_write(path, write)


@app.command()
def predict(
    model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="Model file from 'fastpadim fit' (.padim), or its ONNX export (.onnx).")],
    source: Annotated[Path, typer.Argument(help="An image or a folder of images (searched recursively).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for results.csv/json, overlays/ and masks/.")] = Path("out"),
    device: DeviceOpt = "auto",
    weights: WeightsOpt = None,
    threshold: Annotated[Optional[float], typer.Option(help="Override the model's image threshold.")] = None,
    maps: Annotated[Optional[bool], typer.Option("--maps/--no-maps", help="Write heatmap overlays and defect masks (default; with --ray: anomaly maps as .npy, only if asked).")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per network batch.")] = 32,
    ray_target: Annotated[Optional[str], typer.Option("--ray", metavar="local[:N]|auto|ADDRESS", help="Score on Ray Data into OUTPUT/scores/part-*.parquet (resumable; SOURCE may be a glob, list or videos; --maps writes OUTPUT/maps/*.npy).")] = None,
    frame_stride: Annotated[int, typer.Option(help="Videos: score every K-th frame.")] = 1,
    cpus_per_task: Annotated[float, typer.Option(help="With --ray: CPUs (threads) per scoring actor.")] = 1,
    engine: Annotated[Optional[str], typer.Option(help="For .onnx models: onnxruntime (default) or openvino.")] = None,
) -> None:
    """Score images: a CSV/JSON of scores and verdicts, and per image a heatmap overlay and defect mask."""
    from . import load
    from .sources import inputs, output_name, resolve
    from .visualize import defect_mask, overlay

    if ray_target is not None:
        from .distributed import predict_command

        return predict_command(model_path, source, output, ray_target, bool(maps), threshold, frame_stride, cpus_per_task)
    maps = True if maps is None else maps
    with user_errors():
        files, skipped = resolve(source, frame_stride)
        names: list[str] = []
        model = load(model_path, device=device, weights=weights, engine=engine)
        model.batch_size = batch_size
        if threshold is not None:
            model.threshold_ = threshold
        created = not output.exists()
        try:
            output.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FastpadimError(f"cannot create output folder {output}: {exc.strerror or exc}") from None
        if not os.access(output, os.W_OK):
            raise FastpadimError(f"cannot write to {output}: permission denied")
        rows = []
        with progress_bar("scoring", len(files)) as advance:
            for batch in model.iter_scored(inputs(files, skipped, names), keep_view=maps, progress=advance):
                for result in batch:
                    name = names[result.index]  # the path, or video.mp4#frame=N
                    if result.error:
                        skipped.append((name, result.error))
                        continue
                    rel = relative_name(name, source)
                    verdict = None if model.threshold_ is None else bool(result.score > model.threshold_)
                    row = {"image": name, "score": round(result.score, 6),
                           "verdict": {None: "unknown", True: "anomalous", False: "good"}[verdict]}
                    if maps:
                        overlay_path = output / "overlays" / output_name(rel, ".png")
                        write_png(overlay(result.view, result.anomaly_map, model.threshold_), overlay_path)
                        row["overlay"] = str(overlay_path)
                        if model.threshold_ is not None:
                            mask_path = output / "masks" / output_name(rel, ".png")
                            write_png(defect_mask(result.anomaly_map, model.threshold_), mask_path)
                            row["mask"] = str(mask_path)
                    rows.append(row)
        report_skipped(skipped)
        if not rows:  # nothing to report: leave no results files (nor a folder made for them) behind
            if created and not any(output.iterdir()):
                output.rmdir()
            raise FastpadimError(f"no image could be scored ({len(skipped)} unreadable)")
        fields = ["image", "score", "verdict", "overlay", "mask"]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        write_text(buffer.getvalue(), output / "results.csv")
        summary = {"model": str(model_path), "threshold": model.threshold_, "images": rows,
                   "skipped": [{"image": n, "error": e} for n, e in skipped]}
        write_text(json.dumps(summary, indent=2), output / "results.json")
        flagged = sum(r["verdict"] == "anomalous" for r in rows)
        console.print(f"scored {len(rows)} images ({flagged} anomalous, {len(skipped)} skipped); wrote {output}/results.csv",
                      highlight=False, soft_wrap=True)


# ---------------------------------------------------------------------------------------------- info
@app.command()
def info(model_path: Annotated[Path, typer.Argument(metavar="MODEL")],
         as_json: Annotated[bool, typer.Option("--json", help="Print the metadata as JSON.")] = False) -> None:
    """Show what a model file (.padim or .onnx) holds: backbone, weights, preprocessing, training count, threshold."""
    with user_errors():
        if model_path.suffix.lower() == ".onnx":
            from .onnx_runtime import read_metadata

            meta, tensors = read_metadata(model_path), {}
        else:
            from .modelfile import read_model_file

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
            f"preprocessing   resize {pre['image_size']}, crop {pre['crop_size'] or 'none'}; grid {meta['grid'][0]}x{meta['grid'][1]}",
            f"gaussian        epsilon {meta['epsilon']}, factor {meta['factor_dtype']}, blur sigma {meta['blur_sigma']}",
            f"training        {meta['n_train_images']} images" + (" (statistics kept)" if "stats.scatter" in tensors else ""),
            f"threshold       {th['image'] if th['image'] is not None else 'none'}"
            + (f" (false-alarm rate {th['false_alarm_rate']} on {th['n_good_images']} good images)" if th["image"] is not None else ""),
        ]
        if "export" in meta:
            ex = meta["export"]
            data = model_path.parent / ex["data_file"]
            data_size = f"{data.stat().st_size / 1e6:.1f} MB" if data.is_file() else "missing"
            lines.append(f"onnx export     opset {ex['opset']}, {ex['weights_dtype']} weights, input {ex['input']['shape']}; "
                         f"data {ex['data_file']} ({data_size})")
        out.print("\n".join(lines), highlight=False, soft_wrap=True)


def main() -> None:
    from . import commands  # noqa: F401 - registers the commands defined in other modules

    args = sys.argv[1:]
    try:
        if "--ray" in args:  # distributed imports torch: only Ray runs load it (the ONNX runtime has no torch)
            from .distributed import expand_bare_ray

            args = expand_bare_ray(args)
        app(args=args)
    except ModuleNotFoundError as exc:
        # The light install (fastpadim[runtime]) has no PyTorch engine: say which extra a command needs.
        if "--debug" in args:
            raise
        module = (exc.name or "").split(".")[0]
        extra = {"ray": "ray", "pyarrow": "ray", "av": "video", "onnxruntime": "runtime", "openvino": "openvino"}.get(module, "full")
        console.print(f"[red]error:[/red] this needs the Python package {module!r}, which is not installed: "
                      + escape(f"pip install 'fastpadim[{extra}]'"), highlight=False, soft_wrap=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    # Run as `python -m fastpadim.cli`: this file is __main__, a second copy; the commands registered by
    # other modules live on fastpadim.cli.app, so start from there.
    from fastpadim.cli import main as _main

    _main()
