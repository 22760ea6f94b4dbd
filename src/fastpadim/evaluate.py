"""``fastpadim evaluate``: MVTec AD style evaluation of PaDiM, per category and the paper's summary rows."""

from __future__ import annotations

import shlex
import shutil
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .cli import BackboneOpt, DeviceOpt, FeaturesOpt, LayersOpt, WeightsOpt, app, console, out, parse_layers, \
    progress_bar, user_errors, write_text
from .errors import FastpadimError


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


@app.command()
def evaluate(
    root: Annotated[Path, typer.Argument(help="MVTec AD root (one folder per category) or one category folder.")],
    categories: Annotated[Optional[str], typer.Option(help="Comma-separated categories; default: all found.")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for results.json/csv, report.md, figures.")] = Path("eval-out"),
    backbone: BackboneOpt = "efficientnet_lite0",
    weights: WeightsOpt = None,
    layers: LayersOpt = None,
    n_features: FeaturesOpt = None,
    image_size: Annotated[int, typer.Option(help="Resize to this square size (bicubic).")] = 256,
    crop_size: Annotated[int, typer.Option(help="Centre crop after resizing (the paper: 224); 0 = none, the whole image is inspected.")] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the random channel subset.")] = 0,
    device: DeviceOpt = "auto",
    batch_size: Annotated[int, typer.Option(help="Images per network batch.")] = 32,
    reduction: Annotated[str, typer.Option(help="Dimension reduction to --n-features: random (the paper's Rd) or pca.")] = "random",
    layer_mode: Annotated[str, typer.Option(help="joint: one model on the concatenated layers; summed: one model per layer, maps summed.")] = "joint",
    rd_mvtec: Annotated[bool, typer.Option("--rd-mvtec", help="Non-aligned protocol: random rotation ±10° and random 224 crop of 256, per seed.")] = False,
    seeds: Annotated[str, typer.Option(help="Seeds averaged with --rd-mvtec (transforms and channel subset).")] = "0,1,2,3,4",
    examples: Annotated[int, typer.Option(help="Anomalous heatmap examples per category in the report.")] = 4,
) -> None:
    """Fit on each category's good training images, score its test set, and report image AUROC, pixel AUROC,
    PRO and F1-max with the paper's texture / object / all means."""
    from .datasets import find_categories, load_category
    from .eval_report import category_row, draw_curves, draw_examples, rich_table, summary_rows, to_csv, to_json, to_markdown
    from .evaluation import Settings, evaluate_category

    with user_errors():
        settings = Settings(backbone=backbone, weights=weights, layers=parse_layers(layers), n_features=n_features,
                            image_size=image_size, crop_size=crop_size or None, device=device, batch_size=batch_size,
                            reduction=reduction, layer_mode=layer_mode, rd_mvtec=rd_mvtec)
        settings.check()
        run_seeds = parse_seeds(seeds) if rd_mvtec else [seed]
        folders = find_categories(root, parse_names(categories))
        try:
            output.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FastpadimError(f"cannot create output folder {output}: {exc.strerror or exc}") from None

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
                figures[name] = _write_figures(runs[0], output, draw_curves, draw_examples)
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
            write_text(to_json(described, rows, summaries, failures), output / "results.json")
            write_text(to_csv(rows, summaries), output / "results.csv")
            write_text(to_markdown(command, described, rows, summaries, failures, figures), output / "report.md")
            out.print(rich_table(rows, summaries, title))
            console.print(f"wrote {output}/results.json, results.csv, report.md", highlight=False)
        if failures:
            raise FastpadimError(f"{len(failures)} of {len(folders)} categories failed: {', '.join(failures)}")


def _write_figures(run, output: Path, draw_curves, draw_examples) -> list[str]:
    """Draw into a temporary folder and move it into place, so a failed category leaves nothing behind."""
    final = output / run.category
    staging = output / f".{run.category}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        draw_curves(run, staging / "curves.png")
        names = [f"{run.category}/curves.png"]
        if draw_examples(run, staging / "examples.png"):
            names.append(f"{run.category}/examples.png")
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return names
