"""Accuracy and size of the factor in float32, float16 and bfloat16 (`Padim(factor_dtype=...)`).

One fit (float32); the half-precision factors are made from the same statistics (a fitted model keeps them), so
only the factor's precision differs. Scores the bottle test set with each and prints metrics and the factor's
size in memory (a model file stores the statistics, not the factor, so its size no longer depends on it).

    .venv/bin/python benchmarks/factor_precision.py [--data ../shared/data/mvtec_ad/bottle]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from fastpadim import Padim
from fastpadim.evaluation.datasets import load_category, load_mask
from fastpadim.evaluation.metrics import image_auroc, pixel_auroc, pro_auc
from fastpadim.model import FACTOR_DTYPES

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BOTTLE  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=BOTTLE)
    args = parser.parse_args()
    category = load_category(args.data)
    # the paper crop, as recorded; no threshold (folds=0): only scores are compared
    model = Padim(folds=0, crop_size=224).fit(category.train)
    test = [item.path for item in category.test]
    labels = category.labels
    masks = [load_mask(item, model.preprocessing_) for item in category.test]
    reference = None
    print("| factor | factor in memory (MB) | image AUROC | pixel AUROC | PRO | largest relative score change |")
    print("|---|---|---|---|---|---|")
    for name, dtype in FACTOR_DTYPES.items():
        model.factor_dtype = name
        model.install(model.mean_, model.stats_.whitener(model.epsilon, dtype), model.n_samples_seen_, model.stats_)
        scores, maps = model.score_images(test)
        reference = scores if reference is None else reference
        size_mb = model.whitener_.nbytes / 1e6
        change = float(np.max(np.abs(scores / reference - 1)))
        print(f"| {name} | {size_mb:.1f} | {image_auroc(labels, scores):.4f} | {pixel_auroc(masks, maps):.4f} | "
              f"{pro_auc(masks, maps):.4f} | {change:.1e} |")


if __name__ == "__main__":
    main()
