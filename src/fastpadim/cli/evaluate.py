"""``fastpadim evaluate``: MVTec AD style evaluation of PaDiM, per category and the paper's summary rows."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import FastpadimError
from ..files import make_output_folder, write_text
from .console import console, out, progress_bar, user_errors
from .options import (
    AllowDownloadOpt, BackboneOpt, BlurSigmaOpt, EpsilonOpt, BatchSizeOpt, CropSizeOpt, DeviceOpt, FeaturesOpt, ImageSizeOpt, LayersOpt,
    MaxPixelsOpt, PoolOpt, SquashOpt, TileOpt, TileOverlapOpt, TileSharedOpt, WeightsOpt, apply_max_pixels,
    check_options, parse_layers, shape_params,
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


def evaluate(
    root: Annotated[Path, typer.Argument(help="MVTec AD root (one folder per category) or one category folder.")],
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
    batch_size: BatchSizeOpt = 32,
    max_pixels: MaxPixelsOpt = None,
    reduction: Annotated[str, typer.Option(help="Dimension reduction to --n-features: random (the paper's Rd) or pca.")] = "random",
    layer_mode: Annotated[str, typer.Option(help="joint: one model on the concatenated layers; summed: one model per layer, maps summed.")] = "joint",
    rd_mvtec: Annotated[bool, typer.Option("--rd-mvtec", help="Non-aligned protocol: random rotation ±10° and random 224 crop of 256, per seed.")] = False,
    seeds: Annotated[str, typer.Option(help="Seeds averaged with --rd-mvtec (transforms and channel subset).")] = "0,1,2,3,4",
    examples: Annotated[int, typer.Option(help="Anomalous heatmap examples per category in the report.")] = 4,
) -> None:
    """Fit on each category's good training images, score its test set, and report image AUROC, pixel AUROC,
    PRO and F1-max with the paper's texture / object / all means."""
    from ..evaluation.datasets import find_categories, load_category
    from ..evaluation.protocol import Settings, evaluate_category
    from ..evaluation.report import category_row, summary_rows, to_csv, to_json, to_markdown, write_figures

    with user_errors():
        check_options(n_features=n_features, seed=seed)
        apply_max_pixels(max_pixels)
        shape = shape_params(image_size, None, squash, pool, tile, tile_overlap, tile_shared, lambda: (0, 0))
        settings = Settings(backbone=backbone, weights=weights, layers=parse_layers(layers), n_features=n_features,
                            crop_size=crop_size or None, device=device, batch_size=batch_size,
                            reduction=reduction, layer_mode=layer_mode, rd_mvtec=rd_mvtec, allow_download=allow_download,
                            factor_dtype=factor_dtype, blur_sigma=blur_sigma, epsilon=epsilon, **shape)
        settings.check()
        run_seeds = parse_seeds(seeds) if rd_mvtec else [seed]
        folders = find_categories(root, parse_names(categories))
        make_output_folder(output)

        rows, failures, figures = [], {}, {}
        for folder in folders:
            name = folder.name
            try:
                category = load_category(folder)
                runs = []
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
        described = {**{k: v for k, v in settings.__dict__.items()}, "seeds": run_seeds}
        command = "fastpadim " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        title = "fastpadim evaluate" + (" (Rd-MVTec AD)" if rd_mvtec else "")
        if rows:
            write_text(output / "results.json", to_json(described, rows, summaries, failures))
            write_text(output / "results.csv", to_csv(rows, summaries))
            write_text(output / "report.md", to_markdown(command, described, rows, summaries, failures, figures))
            out.print(results_table(rows, summaries, title))
            console.print(f"wrote {output}/results.json, results.csv, report.md", highlight=False)
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
