"""``fastpadim evaluate``: MVTec AD style evaluation of PaDiM, per category and the paper's summary rows; with
``--model``, the same measures of a shipped model (.padim or .onnx) as it is, plus its own threshold's errors."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer._click.core import ParameterSource  # typer 0.29 bundles click

from ..errors import FastpadimError
from ..files import make_output_folder, write_text
from .console import console, out, progress_bar, user_errors
from .options import (
    AllowDownloadOpt,
    BackboneOpt,
    BatchSizeOpt,
    BlurSigmaOpt,
    CropSizeOpt,
    DeviceOpt,
    EngineOpt,
    EpsilonOpt,
    FeaturesOpt,
    ImageSizeOpt,
    LayersOpt,
    MaxPixelsOpt,
    PrecisionOpt,
    PoolOpt,
    SquashOpt,
    TileOpt,
    TileOverlapOpt,
    TileSharedOpt,
    WeightsOpt,
    apply_max_pixels,
    check_options,
    parse_layers,
    shape_params,
)


def parse_names(text: str | None) -> list[str] | None:
    names = [part.strip() for part in (text or "").split(",") if part.strip()]
    return names or None


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise FastpadimError(f"--seeds takes comma-separated integers, e.g. 0,1,2,3,4; got {text!r}") from None
    if not seeds:
        raise FastpadimError("--seeds is empty")
    return seeds


# Options that describe a model to fit: with --model the model's own settings are used, so giving one is an error
# (silently ignoring it would report numbers for other settings than the user believes).
FIT_OPTIONS = ("backbone", "layers", "n_features", "image_size", "squash", "crop_size", "epsilon", "blur_sigma", "pool",
               "tile", "tile_overlap", "tile_shared", "factor_dtype", "seed", "reduction", "layer_mode", "rd_mvtec",
               "seeds")


def given_fit_options(ctx: typer.Context) -> list[str]:
    """The fit options set on the command line (or by environment), as their flags."""
    given = [name for name in FIT_OPTIONS
             if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)]
    return ["--" + name.replace("_", "-") for name in given]


def one_category(root: Path, folders: list[Path]) -> Path:
    """A model is fitted for one category: ROOT must resolve to one (a category folder, or --categories NAME)."""
    if len(folders) != 1:
        names = ", ".join(f.name for f in folders[:5]) + (", ..." if len(folders) > 5 else "")
        raise FastpadimError(f"{root} holds {len(folders)} categories ({names}); a model is for one: name it with "
                             "--categories NAME or give its category folder")
    return folders[0]


def evaluate(
    ctx: typer.Context,
    root: Annotated[Path, typer.Argument(help="MVTec AD root (one folder per category) or one category folder.")],
    model_path: Annotated[Optional[Path], typer.Option("--model", help="Score this fitted model (.padim or .onnx) as it is, on one category's test set, instead of fitting one; its own settings and threshold are used.")] = None,
    categories: Annotated[Optional[str], typer.Option(help="Comma-separated categories; default: all found.")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for results.json/csv, report.md, figures.")] = Path("eval-out"),
    backbone: BackboneOpt = "efficientnet_lite0",
    weights: WeightsOpt = None,
    allow_download: AllowDownloadOpt = False,
    layers: LayersOpt = None,
    n_features: FeaturesOpt = None,
    image_size: ImageSizeOpt = "256",
    squash: SquashOpt = False,
    crop_size: CropSizeOpt = 0,
    epsilon: EpsilonOpt = 0.01,
    blur_sigma: BlurSigmaOpt = 4.0,
    pool: PoolOpt = 1,
    tile: TileOpt = None,
    tile_overlap: TileOverlapOpt = None,
    tile_shared: TileSharedOpt = False,
    factor_dtype: Annotated[str, typer.Option(help="Factor precision: float32, float16 or bfloat16.")] = "float32",
    seed: Annotated[int, typer.Option(help="Seed of the random channel subset.")] = 0,
    device: DeviceOpt = "auto",
    engine: EngineOpt = None,
    precision: PrecisionOpt = None,
    batch_size: BatchSizeOpt = 32,
    max_pixels: MaxPixelsOpt = None,
    reduction: Annotated[str, typer.Option(help="Dimension reduction to --n-features: random (the paper's Rd) or pca.")] = "random",
    layer_mode: Annotated[str, typer.Option(help="joint: one model on the concatenated layers; summed: one model per layer, maps summed.")] = "joint",
    rd_mvtec: Annotated[bool, typer.Option("--rd-mvtec", help="Non-aligned protocol: random rotation ±10° and random 224 crop of 256, per seed.")] = False,
    seeds: Annotated[str, typer.Option(help="Seeds averaged with --rd-mvtec (transforms and channel subset).")] = "0,1,2,3,4",
    examples: Annotated[int, typer.Option(help="Anomalous heatmap examples per category in the report.")] = 4,
) -> None:
    """Fit on each category's good training images, score its test set, and report image AUROC, pixel AUROC,
    PRO and F1-max with the paper's texture / object / all means. With --model, score that model on one
    category's test set instead (nothing refitted), and report its own threshold's false alarms and misses."""
    from ..evaluation.datasets import find_categories, load_category
    from ..evaluation.model_settings import model_file_settings
    from ..evaluation.protocol import Settings, evaluate_category, evaluate_model
    from ..evaluation.report import (
        category_row,
        format_settings,
        summary_rows,
        threshold_lines,
        to_csv,
        to_json,
        to_markdown,
        write_figures,
    )

    with user_errors():
        shipped = None
        if model_path is not None:
            refused = given_fit_options(ctx)
            if refused:
                verb, it = ("sets", "it") if len(refused) == 1 else ("set", "them")
                raise FastpadimError(f"{', '.join(refused)} {verb} how a model is fitted; --model scores the model as "
                                     f"it was fitted (its own settings): drop {it}")
        check_options(n_features=n_features, seed=seed)
        apply_max_pixels(max_pixels)
        shape = shape_params(image_size, None, squash, pool, tile, tile_overlap, tile_shared, lambda: (0, 0))
        settings = Settings(backbone=backbone, weights=weights, layers=parse_layers(layers), n_features=n_features,
                            crop_size=crop_size or None, device=device, engine=engine or "torch",
                            batch_size=batch_size,
                            reduction=reduction, layer_mode=layer_mode, rd_mvtec=rd_mvtec, allow_download=allow_download,
                            factor_dtype=factor_dtype, blur_sigma=blur_sigma, epsilon=epsilon, **shape)
        settings.check()
        run_seeds = parse_seeds(seeds) if rd_mvtec else [seed]
        folders = find_categories(root, parse_names(categories))
        if model_path is not None:
            from .. import load

            folders = [one_category(root, folders)]
            if batch_size < 1:
                raise FastpadimError(f"--batch-size must be at least 1, got {batch_size}")
            # .padim: --weights/--allow-download say where its backbone's weights are; .onnx carries them
            shipped = load(model_path, device=device, weights=weights, engine=engine, precision=precision,
                           allow_download=allow_download)
            shipped.batch_size = batch_size
        make_output_folder(output)

        rows, failures, figures = [], {}, {}
        for folder in folders:
            name = folder.name
            try:
                category = load_category(folder)
                runs = []
                if shipped is not None:
                    with progress_bar(name, len(category.test)) as advance:
                        runs.append(evaluate_model(category, shipped, examples, progress=advance))
                else:
                    for run_seed in run_seeds:
                        label = f"{name}" + (f" seed {run_seed}" if rd_mvtec else "")
                        with progress_bar(label, len(category.train) + len(category.test)) as advance:
                            runs.append(evaluate_category(category, settings, run_seed, examples, progress=advance))
                figures[name] = write_figures(runs[0], output)
            except FastpadimError as exc:
                failures[name] = str(exc)
                console.print(f"[red]failed:[/red] {name}: {exc}", highlight=False, soft_wrap=True)
                continue
            rows.append(category_row(name, runs))
            for note in rows[-1]["notes"]:
                console.print(f"[yellow]note:[/yellow] {name}: {note}", highlight=False, soft_wrap=True)
        summaries = summary_rows(rows)
        command = "fastpadim " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        title = "fastpadim evaluate" + (f" {model_path.name}" if shipped is not None else "") \
            + (" (Rd-MVTec AD)" if rd_mvtec else "")
        if rows:
            # the values the models used (the preset's layers, the weights found, the rounded sizes), never the
            # options as typed: an option left out would read None
            if shipped is not None:
                described = {**model_file_settings(shipped, model_path), "batch_size": batch_size}
            else:
                described = {**rows[0]["model_settings"], "batch_size": batch_size, "reduction": reduction,
                             "layer_mode": layer_mode, "rd_mvtec": rd_mvtec, "seeds": run_seeds}
            write_text(output / "results.json", to_json(described, rows, summaries, failures))
            write_text(output / "results.csv", to_csv(rows, summaries))
            write_text(output / "report.md", to_markdown(command, described, rows, summaries, failures, figures,
                                                         shipped is not None))
            out.print(results_table(rows, summaries, title))
            out.print("settings: " + format_settings(described), highlight=False, soft_wrap=True)
            for row in rows:
                for line in threshold_lines(row, shipped is not None):
                    out.print(f"{row['category']}: {line}", highlight=False, soft_wrap=True)
            console.print(f"wrote {output}/results.json, results.csv, report.md and <category>/scores.csv",
                          highlight=False)
        if failures:
            raise FastpadimError(f"{len(failures)} of {len(folders)} categories failed: {', '.join(failures)}")


def results_table(rows: list[dict], summaries: list[dict], title: str):
    from rich.table import Table

    from ..evaluation.report import SHORT_HEADERS, table_rows

    table = Table(title=title)
    for i, header in enumerate(SHORT_HEADERS):
        table.add_column(header, justify="left" if i == 0 else "right")
    for cells, is_summary in table_rows(rows, summaries):
        table.add_row(*cells, style="bold" if is_summary else None)
    return table
