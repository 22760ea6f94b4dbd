"""The ``fastpadim`` command: fit, predict, info, demo (and evaluate, serve)."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from typer._click.exceptions import ClickException, NoArgsIsHelpError  # typer 0.29 bundles click
from typer.core import TyperGroup

from .errors import FastpadimError
from .files import check_writable_file  # noqa: F401 - export.py imports it from here
from .files import write_text as _write_file


class OneLineConsole(Console):
    """Output to a file or pipe is not wrapped at 80 columns (a line stays one line for grep and logs); a terminal
    keeps rich's wrapping at its width."""

    def print(self, *objects: Any, soft_wrap: bool | None = None, **kwargs: Any) -> None:
        if soft_wrap is None and not self.is_terminal:
            soft_wrap = True
        super().print(*objects, soft_wrap=soft_wrap, **kwargs)


console = OneLineConsole(stderr=True)
out = OneLineConsole()
_state = {"debug": False}
# The extra that provides a module the light install (fastpadim[runtime]) lacks; anything else: the PyTorch engine.
EXTRAS = {"ray": "ray", "pyarrow": "ray", "av": "video", "onnxruntime": "runtime", "openvino": "openvino"}


def print_error(message: str) -> None:
    console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)


def missing_module(exc: ModuleNotFoundError) -> str:
    module = (exc.name or "").split(".")[0]
    return (f"this needs the Python package {module!r}, which is not installed: "
            f"pip install 'fastpadim[{EXTRAS.get(module, 'full')}]'")


def usage_message(exc: Exception) -> str:
    """typer's usage error (a box with the usage text) as one line that says what to do."""
    message = " ".join(exc.format_message().split()).rstrip(".")
    message = message[:1].lower() + message[1:]
    ctx = getattr(exc, "ctx", None)
    command = ctx.command_path if ctx is not None else "fastpadim"
    return f"{message} (see '{command} -h')"


class OneLineErrors(TyperGroup):
    """The ``fastpadim`` group: every error is one line on stderr. typer prints usage errors as a box with the
    usage text (several lines); here they become ``error: …`` with exit code 2. Python warnings are not shown
    (``--debug`` shows them)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False, **extra)
        args = list(sys.argv[1:] if args is None else args)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # --debug turns them back on (see _main)
            try:
                code = super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False,
                                    **extra)
            except NoArgsIsHelpError:
                sys.exit(2)  # the help text is already printed
            except ClickException as exc:
                print_error(usage_message(exc))
                sys.exit(exc.exit_code)
            except typer.Abort:
                print_error("aborted")
                sys.exit(1)
            except ModuleNotFoundError as exc:
                # The light install (fastpadim[runtime]) has no PyTorch engine: say which extra a command needs.
                if "--debug" in args:
                    raise
                print_error(missing_module(exc))
                sys.exit(1)
        # Without standalone mode, click returns the command's value or the code of a typer.Exit.
        sys.exit(code if isinstance(code, int) else 0)


def show_version(value: bool) -> None:
    if value:
        from . import __version__

        out.print(f"fastpadim {__version__}", highlight=False)
        raise typer.Exit()


app = typer.Typer(cls=OneLineErrors, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="PaDiM anomaly detection: fit on good images, score new ones.")


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors, and Python warnings.")] = False,
          version: Annotated[bool, typer.Option("--version", callback=show_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    _state["debug"] = debug
    if debug:
        warnings.simplefilter("default")


def fail(message: str, code: int = 1):
    print_error(message)
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
    except (typer.Exit, typer.Abort, ModuleNotFoundError):
        raise  # a missing module: OneLineErrors.main names the extra to install
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


def check_options(*, n_features: int | None = None, seed: int | None = None, holdout: float | None = None,
                  false_alarm_rate: float | None = None) -> None:
    """Options that would otherwise mean something else (0 channels = all) or fail deep inside, refused up front."""
    if n_features is not None and n_features < 1:
        raise FastpadimError(f"--n-features must be at least 1, got {n_features}; omit it for the preset's")
    if seed is not None and not 0 <= seed < 2**64:
        raise FastpadimError(f"--seed must be a whole number from 0 to 2**64 - 1, got {seed}")
    if holdout is not None and not 0 <= holdout < 1:
        raise FastpadimError(f"--holdout must be in [0, 1), got {holdout}; 0 sets no threshold")
    if false_alarm_rate is not None and not 0 < false_alarm_rate < 1:
        raise FastpadimError(f"--false-alarm-rate must be between 0 and 1 (exclusive), e.g. 0.01; got {false_alarm_rate}")


def write_text(text: str, path: Path) -> None:
    """Kept for evaluate.py (text first); new code calls files.write_text(path, text)."""
    _write_file(path, text)


def warn(message: str) -> None:
    console.print(f"[yellow]warning:[/yellow] {escape(message)}", highlight=False, soft_wrap=True)


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
    from .results import threshold_caveat
    from .sources import resolve

    with user_errors():
        check_options(n_features=n_features, seed=seed, holdout=holdout, false_alarm_rate=false_alarm_rate)
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
            if model.threshold_ is not None:
                rate = getattr(model, "threshold_rate_", None) or model.false_alarm_rate  # the rate the threshold was set for
                caveat = threshold_caveat(rate, getattr(model, "threshold_count_", None))
                if caveat:
                    warn(caveat)


# ------------------------------------------------------------------------------------------- predict
# What a predict run writes into OUTPUT, in the order it is moved into place (results.csv last: once it is
# there, everything it points at is too).
RESULT_ENTRIES = ("overlays", "masks", "results.json", "results.csv")
STAGING_PREFIX = ".fastpadim-partial-"


def common_root(source: Path, items) -> Path:
    """The folder output names are relative to: SOURCE when it is a folder, else the deepest folder holding every
    input. Absolute paths, symlinks not resolved: a linked image keeps the place it was given, so good/000.png
    and broken/000.png (or the same name in two folders of a glob or list) never share an output."""
    if source.is_dir():
        return Path(os.path.abspath(source))
    return Path(os.path.commonpath(sorted({os.path.dirname(os.path.abspath(item.path)) for item in items})))


class OutputNames:
    """One output name per input, unique within the run and stable across runs: the input's path relative to the
    common root, with its full file name kept (``good/a.jpg`` → ``good/a.jpg.png``, so a.png and a.jpg differ;
    a frame: ``cam.mkv#frame=3.png``). Should two inputs still meet (the same file listed twice, or names that
    differ only in case), the later one gets ``~2``, ``~3``, … before the suffix."""

    def __init__(self, root: Path, items) -> None:
        from .sources import FRAME_MARK

        self.relative = {
            item.name: os.path.relpath(os.path.abspath(item.path), root) + ("" if item.frame is None else f"{FRAME_MARK}{item.frame}")
            for item in items
        }
        self.used: set[str] = set()

    def __call__(self, name: str, suffix: str = ".png") -> Path:
        from .sources import output_name

        first = output_name(self.relative.get(name, os.path.basename(name)), suffix)
        candidate, n = first, 2
        while candidate.as_posix().casefold() in self.used:  # casefold: a case-insensitive disk would merge them
            candidate, n = first.with_name(f"{first.name.removesuffix(suffix)}~{n}{suffix}"), n + 1
        self.used.add(candidate.as_posix().casefold())
        return candidate


def write_png(image, path: Path) -> None:
    from .files import atomic_write, os_reason

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FastpadimError(f"cannot write {path}: {os_reason(exc)}") from None
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def previous_results(output: Path) -> list[str]:
    return [name for name in RESULT_ENTRIES if os.path.lexists(output / name)] if output.is_dir() else []


def move_into_place(staging: Path, output: Path) -> None:
    """Replace a previous run's results in OUTPUT with the staged ones. The previous ones are moved aside into the
    staging folder (removed with it), so no old overlay or mask stays mixed with the new results; if a move fails,
    what was moved is moved back."""
    from .files import os_reason

    aside = staging / "previous"
    aside.mkdir()
    moved_out: list[str] = []
    moved_in: list[str] = []
    try:
        for name in RESULT_ENTRIES:
            if os.path.lexists(output / name):
                os.replace(output / name, aside / name)
                moved_out.append(name)
        for name in RESULT_ENTRIES:
            if os.path.lexists(staging / name):
                os.replace(staging / name, output / name)
                moved_in.append(name)
    except OSError as exc:
        for name in reversed(moved_in):
            with _suppress_os_errors():
                os.replace(output / name, staging / name)
        for name in moved_out:
            with _suppress_os_errors():
                os.replace(aside / name, output / name)
        raise FastpadimError(f"cannot move the results into {output}: {os_reason(exc)}") from None


@contextmanager
def _suppress_os_errors():
    try:
        yield
    except OSError:
        pass


def results_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["image", "score", "verdict", "overlay", "mask"], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


@app.command()
def predict(
    model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="Model file from 'fastpadim fit' (.padim), or its ONNX export (.onnx).")],
    source: Annotated[Path, typer.Argument(help="Images: a folder (searched recursively), an image or video, a glob, or a .txt list of paths.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for results.csv/json, overlays/ and masks/.")] = Path("out"),
    device: DeviceOpt = "auto",
    weights: WeightsOpt = None,
    threshold: Annotated[Optional[float], typer.Option(help="Override the model's image threshold.")] = None,
    maps: Annotated[Optional[bool], typer.Option("--maps/--no-maps", help="Write heatmap overlays and defect masks (default; with --ray: anomaly maps as .npy, only if asked).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the results of a previous run in OUTPUT (else such an OUTPUT is refused).")] = False,
    batch_size: Annotated[int, typer.Option(help="Images per network batch.")] = 32,
    ray_target: Annotated[Optional[str], typer.Option("--ray", metavar="local[:N]|auto|ADDRESS", help="Score on Ray Data into OUTPUT/scores/part-*.parquet (resumable; SOURCE may be a glob, list or videos; --maps writes OUTPUT/maps/*.npy).")] = None,
    frame_stride: Annotated[int, typer.Option(help="Videos: score every K-th frame.")] = 1,
    cpus_per_task: Annotated[float, typer.Option(help="With --ray: CPUs (threads) per scoring actor.")] = 1,
    engine: Annotated[Optional[str], typer.Option(help="For .onnx models: onnxruntime (default) or openvino.")] = None,
) -> None:
    """Score images: a CSV/JSON of scores and verdicts, and per image a heatmap overlay and defect mask."""
    from . import load
    from .files import _terminate_unwinds, make_output_folder, os_reason
    from .files import write_text as write_file
    from .results import check_threshold, verdict_label
    from .sources import inputs, resolve
    from .visualize import defect_mask, overlay

    with user_errors():
        threshold = check_threshold(threshold, "--threshold")
        if ray_target is not None:
            if overwrite:
                raise FastpadimError("--overwrite does not apply with --ray (a Ray run resumes what OUTPUT holds); "
                                     "give a new -o to start over")
            from .distributed import predict_command

            return predict_command(model_path, source, output, ray_target, bool(maps), threshold, frame_stride, cpus_per_task)
        maps = True if maps is None else maps
        previous = previous_results(output)
        if previous and not overwrite:
            raise FastpadimError(f"{output} already holds the results of a previous run ({', '.join(previous)}): "
                                 "give another -o, or --overwrite to replace them")
        files, skipped = resolve(source, frame_stride)
        names: list[str] = []
        unique_name = OutputNames(common_root(source, files), files)
        model = load(model_path, device=device, weights=weights, engine=engine)
        model.batch_size = batch_size
        if threshold is not None:
            model.threshold_ = threshold
        created = make_output_folder(output)
        try:
            staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=output))
        except OSError as exc:
            raise FastpadimError(f"cannot write to {output}: {os_reason(exc)}") from None
        # Everything is written into the hidden staging folder and moved into OUTPUT only once the run has
        # succeeded: a failure, Ctrl+C or SIGTERM leaves OUTPUT as it was (only SIGKILL can leave the staging folder).
        done = False
        with _terminate_unwinds():
            try:
                rows = []
                with progress_bar("scoring", len(files)) as advance:
                    for batch in model.iter_scored(inputs(files, skipped, names), keep_view=maps, progress=advance):
                        for result in batch:
                            name = names[result.index]  # the path, or video.mp4#frame=N
                            if result.error:
                                skipped.append((name, result.error))
                                continue
                            row = {"image": name, "score": round(result.score, 6),
                                   "verdict": verdict_label(result.score, model.threshold_)}
                            if maps:
                                stem = unique_name(name)
                                write_png(overlay(result.view, result.anomaly_map, model.threshold_), staging / "overlays" / stem)
                                row["overlay"] = str(output / "overlays" / stem)
                                if model.threshold_ is not None:
                                    write_png(defect_mask(result.anomaly_map, model.threshold_), staging / "masks" / stem)
                                    row["mask"] = str(output / "masks" / stem)
                            rows.append(row)
                report_skipped(skipped)
                if not rows:  # nothing to report: leave no results files (nor a folder made for them) behind
                    raise FastpadimError(f"no image could be scored ({len(skipped)} unreadable)")
                write_file(staging / "results.csv", results_csv(rows))
                summary = {"model": str(model_path), "threshold": model.threshold_, "images": rows,
                           "skipped": [{"image": n, "error": e} for n, e in skipped]}
                write_file(staging / "results.json", json.dumps(summary, indent=2))
                move_into_place(staging, output)
                done = True
            except FastpadimError as exc:  # name the file in OUTPUT, not its staged copy
                raise FastpadimError(str(exc).replace(str(staging), str(output))) from None
            finally:
                shutil.rmtree(staging, ignore_errors=True)
                if created and not done:
                    with _suppress_os_errors():
                        output.rmdir()  # only if empty
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
            f"threshold       {threshold_line(th)}",
        ]
        if "export" in meta:
            ex = meta["export"]
            data = model_path.parent / ex["data_file"]
            data_size = f"{data.stat().st_size / 1e6:.1f} MB" if data.is_file() else "missing"
            lines.append(f"onnx export     opset {ex['opset']}, {ex['weights_dtype']} weights, input {ex['input']['shape']}; "
                         f"data {ex['data_file']} ({data_size})")
        out.print("\n".join(lines), highlight=False, soft_wrap=True)


def threshold_line(th: dict) -> str:
    """The threshold and what it rests on; when its good images are too few for the rate, that instead of the rate."""
    from .results import threshold_caveat

    if th["image"] is None:
        return "none"
    caveat = threshold_caveat(th["false_alarm_rate"], th.get("n_good_images"))
    if caveat:
        return f"{th['image']} (warning: {caveat})"
    return f"{th['image']} (false-alarm rate {th['false_alarm_rate']} on {th['n_good_images']} good images)"


def main() -> None:
    from . import commands  # noqa: F401 - registers the commands defined in other modules

    args = sys.argv[1:]
    if "--ray" in args:  # distributed imports torch: only Ray runs load it (the ONNX runtime has no torch)
        try:
            from .distributed import expand_bare_ray
        except ModuleNotFoundError as exc:
            print_error(missing_module(exc))
            raise SystemExit(1) from None
        args = expand_bare_ray(args)
    app(args=args)  # OneLineErrors.main: one line per error, the exit code


if __name__ == "__main__":
    # Run as `python -m fastpadim.cli`: this file is __main__, a second copy; the commands registered by
    # other modules live on fastpadim.cli.app, so start from there.
    from fastpadim.cli import main as _main

    _main()
