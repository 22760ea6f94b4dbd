"""Evaluation outputs: summary rows, the terminal table's cells, JSON / CSV, the Markdown report and its figures."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np

from .datasets import MVTEC_OBJECTS, MVTEC_TEXTURES
from .protocol import FPR_LIMIT, METRICS, CategoryRun

LABELS = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "pro": "PRO (FPR≤0.3)",
          "image_f1_max": "image F1-max", "pixel_f1_max": "pixel F1-max"}
COLUMNS = [*METRICS, "fit_s", "images_per_s"]


def category_row(name: str, runs: list[CategoryRun]) -> dict:
    """One row per category; several runs (Rd-MVTec seeds) are averaged, their spread kept."""
    row: dict = {"category": name, "n_train": runs[0].n_train, "n_test": runs[0].n_test,
                 "seeds": [r.seed for r in runs]}
    for key in METRICS:
        values = [r.metrics[key] for r in runs if r.metrics[key] is not None]
        row[key] = float(np.mean(values)) if values else None
        if len(values) > 1:
            row[f"{key}_std"] = float(np.std(values))
        bounds = [r.bounds[key] for r in runs if key in r.bounds]
        if bounds:
            row[f"{key}_bin_error_bound"] = float(max(bounds))
    row["weights"] = runs[0].weights_id
    fit_times = [r.fit_s for r in runs if r.fit_s is not None]
    row["fit_s"] = float(np.mean(fit_times)) if fit_times else None  # None: a shipped model, not fitted here
    first = runs[0]
    # thresholds and their confusion matrices are one run's (several Rd-MVTec seeds: the first seed's)
    row["threshold_seed"] = first.seed
    row["model_threshold"] = first.model_threshold
    row["threshold_target"] = first.threshold_target
    row["at_model_threshold"] = None if first.at_model_threshold is None else first.at_model_threshold.to_dict()
    row["at_f1_max"] = None if first.at_f1_max is None else first.at_f1_max.to_dict()
    row["pixel_threshold"] = first.pixel_threshold
    row["model_settings"] = first.settings
    row["images_per_s"] = float(np.mean([r.images_per_s for r in runs]))
    row["notes"] = sorted({note for r in runs for note in r.notes})
    return row


def summary_rows(rows: list[dict]) -> list[dict]:
    """The paper's means: textures, objects (when MVTec classes are present) and all categories."""
    groups = [("mean textures", MVTEC_TEXTURES), ("mean objects", MVTEC_OBJECTS), ("mean all", None)]
    summaries = []
    for label, members in groups:
        chosen = [r for r in rows if members is None or r["category"] in members]
        if not chosen:
            continue
        summary: dict = {"category": label, "n_categories": len(chosen)}
        if members is not None:
            summary["of"] = len(members)
        for key in COLUMNS:
            values = [r[key] for r in chosen if r.get(key) is not None]
            summary[key] = float(np.mean(values)) if values else None
            if key in METRICS and values and len(values) < len(chosen):
                summary[f"{key}_over"] = len(values)  # some categories had this metric skipped
        summaries.append(summary)
    return summaries


def _fmt(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _table_cells(row: dict) -> list[str]:
    name = row["category"]
    if "of" in row:
        name += f" ({row['n_categories']}/{row['of']})"
    elif "n_categories" in row:
        name += f" ({row['n_categories']})"
    return [name, *[_fmt(row.get(k)) for k in METRICS], _fmt(row.get("fit_s"), 1), _fmt(row.get("images_per_s"), 1)]


HEADERS = ["category", *[LABELS[k] for k in METRICS], "fit s", "images/s"]
SHORT_HEADERS = ["category", "img AUROC", "px AUROC", "PRO", "img F1", "px F1", "fit s", "img/s"]  # 80 columns


def table_rows(rows: list[dict], summaries: list[dict]) -> list[tuple[list[str], bool]]:
    """The terminal table's cells (SHORT_HEADERS), each row with whether it is a summary row."""
    return [(_table_cells(row), False) for row in rows] + [(_table_cells(row), True) for row in summaries]


def to_csv(rows: list[dict], summaries: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["category", *COLUMNS, "notes"])
    for row in [*rows, *summaries]:
        writer.writerow([row["category"], *["" if row.get(k) is None else f"{row[k]:.6f}" for k in COLUMNS],
                         "; ".join(row.get("notes", []))])
    return buffer.getvalue()


def scores_csv(run: CategoryRun) -> str:
    """Per test image: name (defect type/file), label, score, normalized (score / the model's threshold) and the
    verdict at the model's threshold (empty without one)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["name", "label", "score", "normalized", "verdict"])
    for item in run.scores:
        verdict = "" if item.verdict is None else ("anomalous" if item.verdict else "good")
        writer.writerow([item.name, "anomalous" if item.anomalous else "good", f"{item.score:.6g}",
                         "" if item.normalized is None else f"{item.normalized:.6g}", verdict])
    return buffer.getvalue()


def format_settings(settings: dict) -> str:
    """``key=value, ...`` with lists as ``1,2,3`` and floats to 6 digits (the JSON keeps them whole)."""
    def value(v):
        if isinstance(v, (list, tuple)):
            return ",".join(str(x) for x in v)
        return f"{v:.6g}" if isinstance(v, float) else str(v)

    return ", ".join(f"{k}={value(v)}" for k, v in settings.items())


def _confusion_text(c: dict) -> str:
    def rate(value):
        return "–" if value is None else f"{value:.1%}"

    def count(n, word):
        return f"{n} {word}" + ("" if n == 1 else ("es" if word.endswith("s") else "s"))

    return (f"{count(c['false_alarms'], 'false alarm')} of {c['n_good']} good ({rate(c['false_alarm_rate'])}), "
            f"{count(c['defects_missed'], 'miss')} of {c['n_defective']} anomalous "
            f"({rate(None if c['recall'] is None else 1 - c['recall'])})")


def threshold_lines(row: dict, shipped: bool) -> list[str]:
    """What the row's image thresholds flag, and which threshold the example masks use, as sentences.
    ``shipped``: the model was given (--model), not fitted here without a threshold."""
    lines = []
    model = row.get("at_model_threshold")
    if model is not None:
        target = f", target {row['threshold_target']}" if row.get("threshold_target") else ""
        lines.append(f"image threshold of the model ({model['threshold']:.6g}{target}; anomalous = score > threshold): "
                     + _confusion_text(model))
    elif shipped:
        lines.append("image threshold of the model: none (the model has no valid threshold), so no verdicts")
    else:
        lines.append("image threshold of the model: none (evaluate fits without one; 'fastpadim evaluate --model' "
                     "tests a model's own threshold)")
    f1 = row.get("at_f1_max")
    if f1 is not None:
        lines.append(f"image threshold at F1-max ({f1['threshold']:.6g}; anomalous = score ≥ threshold), chosen on "
                     "this test set, so optimistic: " + _confusion_text(f1))
    pixel = row.get("pixel_threshold")
    if pixel is None:
        lines.append("prediction masks: none (no pixel threshold without masks with defect pixels)")
    else:
        mask = (f"prediction masks (examples.png): pixel threshold {pixel:.6g} = F1-max over all inspected pixels of "
                "this test set (binned; chosen on the test set), also the heatmap's mid-scale")
        if model is not None:
            mask += (f"; last column: pixels above the model's image threshold {model['threshold']:.6g}, what "
                     "'fastpadim predict' marks")
        lines.append(mask)
    return lines


def to_json(settings: dict, rows: list[dict], summaries: list[dict], failures: dict[str, str]) -> str:
    return json.dumps({"settings": settings, "categories": rows, "summary": summaries, "failed": failures}, indent=2)


def markdown_table(rows: list[dict]) -> list[str]:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(_table_cells(r)) + " |" for r in rows]
    return lines


def to_markdown(command: str, settings: dict, rows: list[dict], summaries: list[dict], failures: dict[str, str],
                figures: dict[str, list[str]], shipped: bool = False) -> str:
    lines = ["# fastpadim evaluation", "", "Command:", "", f"    {command}", "",
             "Settings: " + format_settings(settings), "",
             "Metrics are computed on the raw anomaly maps (no normalisation fitted on the test set). PRO is the "
             f"area under the per-region-overlap curve up to a false-positive rate of {FPR_LIMIT}, divided by "
             f"{FPR_LIMIT}. Pixel metrics are binned; the JSON file gives each one's error bound.", ""]
    lines += markdown_table([*rows, *summaries])
    if failures:
        lines += ["", "## Failed categories", ""] + [f"- {name}: {reason}" for name, reason in failures.items()]
    for row in rows:
        name = row["category"]
        trained = (f"model fitted on {row['n_train']} images (not refitted)" if shipped
                   else f"{row['n_train']} training images")
        lines += ["", f"## {name}", "",
                  f"{trained}, {row['n_test']} test images; weights {row['weights']}; seeds {row['seeds']}."]
        lines += [f"- {line}" for line in threshold_lines(row, shipped)]
        lines += [f"- scores per image: {name}/scores.csv"]
        lines += [f"- note: {note}" for note in row["notes"]]
        lines += [""] + [f"![{name} {Path(f).stem}]({f})" for f in figures.get(name, [])]
    return "\n".join(lines) + "\n"


def draw_curves(run: CategoryRun, path: Path) -> None:
    """Image ROC, pixel ROC and the PRO curve (up to the FPR limit) side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("image_roc", "image ROC", "false-positive rate", "true-positive rate", 1.0),
              ("pixel_roc", "pixel ROC", "false-positive rate", "true-positive rate", 1.0),
              ("pro", f"PRO (FPR ≤ {FPR_LIMIT})", "false-positive rate (normal pixels)", "mean region overlap", FPR_LIMIT)]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    for ax, (key, title, xlabel, ylabel, xmax) in zip(axes, panels):
        metric = {"image_roc": "image_auroc", "pixel_roc": "pixel_auroc", "pro": "pro"}[key]
        value = run.metrics.get(metric)
        if key in run.curves:
            x, y = run.curves[key]
            ax.plot(x, y, lw=1.5)
            ax.set_xlim(0, xmax)
            ax.set_ylim(0, 1.01)
        else:
            ax.text(0.5, 0.5, "not computed", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"{title}: {_fmt(value)}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    fig.suptitle(run.category)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def draw_examples(run: CategoryRun, path: Path) -> bool:
    """Per example, in the frame's own pixels: the image, the ground truth, the heatmap overlay and the prediction
    at the pixel F1-max threshold (which also sets the heatmap's colour scale: that threshold sits mid-scale)."""
    if not run.examples:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..visualize import overlay

    threshold, model_threshold = run.pixel_threshold, run.model_threshold
    columns = ["image", "ground truth", "anomaly map", "pixel F1-max" if threshold is not None else None,
               "> model threshold" if model_threshold is not None else None]
    columns = [c for c in columns if c]
    fig, axes = plt.subplots(len(run.examples), len(columns), figsize=(2.6 * len(columns), 2.6 * len(run.examples)),
                             squeeze=False)
    for row, example in zip(axes, run.examples):
        panels = [example.view, example.mask, np.asarray(overlay(example.view, example.frame_map, threshold))]
        if threshold is not None:
            panels.append(example.frame_map >= threshold)
        if model_threshold is not None:
            panels.append(example.frame_map > model_threshold)  # the image verdict's rule, per pixel
        for ax, panel, title in zip(row, panels, columns):
            ax.imshow(panel, cmap="gray" if panel.ndim == 2 else None, vmin=0, vmax=1 if panel.ndim == 2 else None)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(title, fontsize=8)
        row[0].set_ylabel(f"{example.defect_type}\n{example.name}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def write_figures(run: CategoryRun, output: Path) -> list[str]:
    """Draw a category's figures and write its ``scores.csv`` into a temporary folder and move it into place, so
    a failed category leaves nothing behind; returns the figures' names relative to ``output``."""
    final = output / run.category
    staging = output / f".{run.category}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        (staging / "scores.csv").write_text(scores_csv(run), encoding="utf-8")
        draw_curves(run, staging / "curves.png")
        names = [f"{run.category}/curves.png"]
        if draw_examples(run, staging / "examples.png"):
            names.append(f"{run.category}/examples.png")
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return names
