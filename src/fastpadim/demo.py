"""``fastpadim demo``: the whole job on an embedded, generated data set — no download needed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .cli import app, check_options, console, progress_bar, user_errors


@app.command()
def demo(
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the data, model, heatmaps and report.")] = Path("demo-out"),
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed of the generated data set.")] = 0,
) -> None:
    """Generate textured surfaces with scratches and spots, fit on the good ones, score the test set,
    write heatmaps, masks and a short report."""
    import time

    import numpy as np

    from .datasets import load_category, load_mask
    from .metrics import image_auroc as image_auroc_of, pixel_auroc as pixel_auroc_of, pro_auc
    from .errors import FastpadimError
    from .model import Padim
    from .results import verdict
    from .synthetic import make_dataset
    from .visualize import defect_mask, overlay

    with user_errors():
        check_options(seed=seed)
        data = make_dataset(output / "data", seed=seed)
        console.print(f"generated a data set of textured surfaces in {data}", highlight=False)
        category = load_category(data)  # MVTec AD layout: train/good, test/<type>, ground_truth/<type>
        train, test = category.train, category.test
        model = Padim(device=device, holdout=0.1, seed=seed, keep_stats=False)
        start = time.perf_counter()
        with progress_bar("fitting", len(train)) as advance:
            model.fit(train, progress=advance)
        fit_s = time.perf_counter() - start
        model.save(output / "demo.padim")
        labels, scores, pixel_labels, pixel_scores, rows = [], [], [], [], []
        start = time.perf_counter()
        for batch in model.iter_scored([item.path for item in test], keep_view=True):
            for r in batch:
                if r.error:  # generated images are always readable: this is a broken model, not a skip
                    raise FastpadimError(r.error)
                item = test[r.index]
                path, kind = item.path, item.defect_type
                labels.append(item.is_anomalous)
                scores.append(r.score)
                pixel_labels.append(load_mask(item, model.preprocessing_))
                pixel_scores.append(r.anomaly_map)
                (output / "heatmaps" / kind).mkdir(parents=True, exist_ok=True)
                overlay(r.view, r.anomaly_map, model.threshold_).save(output / "heatmaps" / kind / f"{path.stem}.png")
                defect_mask(r.anomaly_map, model.threshold_).save(output / "heatmaps" / kind / f"{path.stem}_mask.png")
                rows.append((f"{kind}/{path.name}", r.score, verdict(r.score, model.threshold_)))
        score_s = time.perf_counter() - start
        image_auroc = image_auroc_of(labels, scores)
        pixel_auroc = pixel_auroc_of(pixel_labels, pixel_scores)
        pro = pro_auc(pixel_labels, pixel_scores)
        verdict_ok = np.mean([flag == label for (_, _, flag), label in zip(rows, labels)])
        report = [
            "# fastpadim demo report", "",
            f"Generated surfaces: {len(train)} good training images, {len(test)} test images (good, scratch, spot).",
            f"Backbone {model.preset_.name} ({model.weights_id_}), {model.channel_indices_.numel()} channels, device {model.device_.type}.",
            "", "| metric | value |", "|---|---|",
            f"| image AUROC | {image_auroc:.4f} |", f"| pixel AUROC | {pixel_auroc:.4f} |", f"| PRO (FPR ≤ 0.3) | {pro:.4f} |",
            f"| verdicts correct at the threshold {model.threshold_:.3f} | {verdict_ok:.1%} |",
            f"| fit time ({model.n_samples_seen_} images + hold-out) | {fit_s:.1f} s |",
            f"| scoring | {len(test) / score_s:.1f} images/s |",
            "", "Heatmaps (overlay and defect mask per image) are in `heatmaps/`; the model is `demo.padim`.", "",
            "| image | score | verdict |", "|---|---|---|",
            *[f"| {name} | {score:.3f} | {'anomalous' if flag else 'good'} |" for name, score, flag in rows],
        ]
        (output / "report.md").write_text("\n".join(report) + "\n")
        console.print(
            f"image AUROC {image_auroc:.3f}, pixel AUROC {pixel_auroc:.3f}, PRO {pro:.3f}, {verdict_ok:.0%} verdicts correct; "
            f"report in {output / 'report.md'}, heatmaps in {output / 'heatmaps'}", highlight=False,
        )
