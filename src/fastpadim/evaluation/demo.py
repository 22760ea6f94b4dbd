"""The demo job: generate textured surfaces with scratches and spots, fit on the good ones, score the test set,
write heatmaps, masks and a short report. No download needed."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import FastpadimError
from ..files import write_text
from ..model import Padim
from ..results import Progress, verdict
from ..visualize import Label, defect_mask, overlay
from .datasets import load_category, load_mask
from .metrics import image_auroc, pixel_auroc, pro_auc
from .synthetic import make_dataset


@dataclass
class DemoResult:
    data: Path
    report: Path
    heatmaps: Path
    image_auroc: float
    pixel_auroc: float
    pro: float
    verdicts_correct: float


def run_demo(output: Path, device: str = "auto", seed: int = 0, progress: Progress | None = None,
             on_data: Callable[[Path], None] | None = None) -> DemoResult:
    """Everything in ``output``: data/, demo.padim, heatmaps/, report.md. ``on_data(folder)`` is called once the
    data set is generated (before the fit)."""
    data = make_dataset(output / "data", seed=seed)
    if on_data:
        on_data(data)
    category = load_category(data)  # MVTec AD layout: train/good, test/<type>, ground_truth/<type>
    train, test = category.train, category.test
    model = Padim(device=device, seed=seed)  # the threshold from every training image's leave-one-out score
    start = time.perf_counter()
    model.fit(train, progress=progress)
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
            pixel_labels.append(load_mask(item))  # the frame's own pixels, as fastpadim evaluate
            pixel_scores.append(r.frame_map)
            (output / "heatmaps" / kind).mkdir(parents=True, exist_ok=True)
            overlay(r.view, r.frame_map, model.threshold_, label=Label.of(r, model.threshold_)).save(
                output / "heatmaps" / kind / f"{path.stem}.png")
            defect_mask(r.frame_map, model.threshold_).save(output / "heatmaps" / kind / f"{path.stem}_mask.png")
            rows.append((f"{kind}/{path.name}", r.score, verdict(r.score, model.threshold_), r.normalized,
                         r.false_alarm_probability))
    score_s = time.perf_counter() - start
    result = DemoResult(data, output / "report.md", output / "heatmaps", image_auroc(labels, scores),
                        pixel_auroc(pixel_labels, pixel_scores), pro_auc(pixel_labels, pixel_scores),
                        float(np.mean([row[2] == label for row, label in zip(rows, labels)])))
    report = [
        "# fastpadim demo report", "",
        f"Generated surfaces: {len(train)} good training images, {len(test)} test images (good, scratch, spot).",
        f"Backbone {model.preset_.name} ({model.weights_id_}), {model.channel_indices_.numel()} channels, device {model.device_.type}.",
        "", "| metric | value |", "|---|---|",
        f"| image AUROC | {result.image_auroc:.4f} |", f"| pixel AUROC | {result.pixel_auroc:.4f} |",
        f"| PRO (FPR ≤ 0.3) | {result.pro:.4f} |",
        f"| verdicts correct at the threshold {model.threshold_:.3f} | {result.verdicts_correct:.1%} |",
        f"| fit time ({model.n_samples_seen_} images, threshold from their leave-one-out scores) | {fit_s:.1f} s |",
        f"| scoring | {len(test) / score_s:.1f} images/s |",
        "", "Heatmaps (overlay and defect mask per image) are in `heatmaps/`; the model is `demo.padim`.", "",
        "| image | score | score / threshold | p(good scores this high) | verdict |", "|---|---|---|---|---|",
        *[f"| {name} | {score:.3f} | {normalized:.2f} | {probability:.2g} | {'anomalous' if flag else 'good'} |"
          for name, score, flag, normalized, probability in rows],
    ]
    write_text(result.report, "\n".join(report) + "\n")
    return result
