"""``fastpadim demo``: the whole job on an embedded, generated data set — no download needed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .console import progress_bar, say, user_errors
from .options import DeviceOpt, check_options


def demo(
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the data, model, heatmaps and report.")] = Path("demo-out"),
    device: DeviceOpt = "auto",
    seed: Annotated[int, typer.Option(help="Seed of the generated data set.")] = 0,
) -> None:
    """Generate textured surfaces with scratches and spots, fit on the good ones, score the test set,
    write heatmaps, masks and a short report."""
    from ..evaluation.demo import run_demo

    with user_errors():
        check_options(seed=seed)
        with progress_bar("fitting", None) as advance:
            result = run_demo(output, device, seed, progress=advance,
                              on_data=lambda data: say(f"generated a data set of textured surfaces in {data}"))
        say(f"image AUROC {result.image_auroc:.3f}, pixel AUROC {result.pixel_auroc:.3f}, PRO {result.pro:.3f}, "
            f"{result.verdicts_correct:.0%} verdicts correct; report in {result.report}, heatmaps in {result.heatmaps}")
