"""Does the threshold keep its promise? Achieved false-alarm rate on good images the model never saw.

Bottle's 229 good images (train/good + test/good) are split at random, repeatedly: ``--unseen`` good images are
kept out of everything, the rest fit the model. For requested false-alarm rates of 1 %, 5 % and 10 %:

- ``hold-out``: the threshold as fastpadim set it before (``holdout=0.1``: 10 % of the training images kept out
  of the Gaussians, the threshold the "higher" quantile of their scores);
- ``out-of-fold``: the new default (``folds=5``): every training image in the Gaussians, the threshold the
  quantile of the training images' out-of-fold scores (a tail model beyond them).

For each: the share of the unseen good images flagged (pooled over splits, with a 95 % Clopper–Pearson interval,
and the spread over splits) and the share of the 63 defective test images caught.

    .venv/bin/python benchmarks/calibration.py --splits 10 --unseen 50 --json /tmp/calibration.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
from scipy.stats import beta

from common import BOTTLE, test_files, train_files

RATES = (0.01, 0.05, 0.10)


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    alpha = 1 - level
    low = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return low, high


def run_split(split: int, good: list[Path], defective: list[Path], unseen_count: int, folds: int | str) -> dict:
    from fastpadim import Padim

    order = np.random.default_rng(1000 + split).permutation(len(good))
    unseen = [good[i] for i in order[:unseen_count]]
    train = [good[i] for i in order[unseen_count:]]
    result = {"split": split, "train": len(train), "unseen": len(unseen), "methods": {}}

    start = time.perf_counter()
    oof = Padim(folds=folds, holdout=0.0).fit(train)
    oof_seconds = time.perf_counter() - start
    thresholds = {rate: oof.calibration_.threshold(rate) for rate in RATES}
    result["methods"]["out-of-fold"] = evaluate(oof, unseen, defective, {r: t for r, (t, _) in thresholds.items()})
    result["methods"]["out-of-fold"]["extrapolated"] = {str(r): e for r, (_, e) in thresholds.items()}
    result["methods"]["out-of-fold"]["fit_seconds"] = oof_seconds

    start = time.perf_counter()
    held = Padim(folds=0, holdout=0.1).fit(train)
    held_seconds = time.perf_counter() - start
    scores = held.calibration_.scores  # the hold-out images' scores, as the old threshold took them
    old = {rate: float(np.quantile(scores, 1 - rate, method="higher")) for rate in RATES}
    result["methods"]["hold-out"] = evaluate(held, unseen, defective, old)
    result["methods"]["hold-out"]["fit_seconds"] = held_seconds
    return result


def evaluate(model, unseen: list[Path], defective: list[Path], thresholds: dict[float, float]) -> dict:
    good_scores = model.anomaly_scores(unseen)
    defect_scores = model.anomaly_scores(defective)
    return {
        "n_train_images": model.n_samples_seen_,
        "thresholds": {str(r): t for r, t in thresholds.items()},
        "false_alarms": {str(r): int((good_scores > t).sum()) for r, t in thresholds.items()},
        "caught": {str(r): int((defect_scores > t).sum()) for r, t in thresholds.items()},
        "n_defective": len(defective),
    }


def summarise(splits: list[dict]) -> dict:
    summary = {}
    for method in splits[0]["methods"]:
        rows = {}
        for rate in RATES:
            key = str(rate)
            alarms = sum(s["methods"][method]["false_alarms"][key] for s in splits)
            unseen = sum(s["unseen"] for s in splits)
            caught = sum(s["methods"][method]["caught"][key] for s in splits)
            defects = sum(s["methods"][method]["n_defective"] for s in splits)
            per_split = [s["methods"][method]["false_alarms"][key] / s["unseen"] for s in splits]
            low, high = clopper_pearson(alarms, unseen)
            rows[key] = {"requested": rate, "achieved": alarms / unseen, "ci95": [low, high],
                         "per_split_min": min(per_split), "per_split_max": max(per_split),
                         "false_alarms": alarms, "unseen": unseen, "caught": caught / defects,
                         "within_2x": rate / 2 <= alarms / unseen <= 2 * rate}
            if method == "out-of-fold":
                rows[key]["extrapolated_splits"] = sum(s["methods"][method]["extrapolated"][key] for s in splits)
        summary[method] = rows
    return summary


def machine() -> str:
    try:
        model = next(line.split(":", 1)[1].strip() for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        model = platform.processor()
    return f"{model}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=BOTTLE)
    parser.add_argument("--splits", type=int, default=10)
    parser.add_argument("--unseen", type=int, default=50, help="good images kept out of each split's fit")
    parser.add_argument("--folds", default="all", help="folds of the new calibration: a number, or all (leave-one-out)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    good = train_files(args.data) + sorted((args.data / "test" / "good").iterdir())
    defective = [p for p in test_files(args.data) if p.parent.name != "good"]
    print(f"{len(good)} good, {len(defective)} defective images; {machine()}", flush=True)
    folds = args.folds if args.folds == "all" else int(args.folds)
    splits = []
    for split in range(args.splits):
        splits.append(run_split(split, good, defective, args.unseen, folds))
        m = splits[-1]["methods"]
        print(f"split {split}: " + "; ".join(
            f"{name} false alarms {m[name]['false_alarms']} caught {m[name]['caught']} ({m[name]['fit_seconds']:.0f} s)"
            for name in m), flush=True)
    summary = summarise(splits)
    print(f"\n{'method':<12} {'requested':>9} {'achieved':>9} {'95% CI':>16} {'per split':>13} {'caught':>7}")
    for method, rows in summary.items():
        for row in rows.values():
            print(f"{method:<12} {row['requested']:>9.0%} {row['achieved']:>9.1%} "
                  f"{row['ci95'][0]:>7.1%}–{row['ci95'][1]:<7.1%} {row['per_split_min']:>5.0%}–{row['per_split_max']:<6.0%} "
                  f"{row['caught']:>7.1%}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
                                         "splits": splits, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
