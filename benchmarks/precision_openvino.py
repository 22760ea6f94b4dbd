"""What OpenVINO's lower precisions do to an export's results: bottle's test set scored in f32 and bf16 (and f16).

    fastpadim fit ../shared/data/mvtec_ad/bottle/train/good -o bottle.padim
    fastpadim export bottle.padim -o bottle.onnx
    python benchmarks/precision_openvino.py bottle.onnx --data ../shared/data/mvtec_ad/bottle

Scores every test image with ``fastpadim.load(MODEL, engine="openvino", precision=P)`` for f32 (the default) and
for each lower precision the CPU has natively (OpenVINO's ``OPTIMIZATION_CAPABILITIES``: BF16 on AVX-512 BF16 /
AMX CPUs, FP16 on AMX-FP16 ones), and prints image AUROC, pixel AUROC, the largest relative score change against
f32 and how many verdicts change. A precision this CPU lacks is reported as unavailable (fastpadim refuses it
rather than running f32 under its name); with none available the script says so and exits 0.
Needs fastpadim[openvino] and scikit-learn (for the AUROC); no torch.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

BOTTLE = Path(__file__).resolve().parents[2] / "shared/data/mvtec_ad/bottle"  # beside the checkout
CAPABILITY = {"bf16": "BF16", "f16": "FP16"}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="an ONNX export (fastpadim export) of a model fitted on the category")
    parser.add_argument("--data", type=Path, default=BOTTLE, help="an MVTec-AD-like category folder")
    args = parser.parse_args()

    from fastpadim import load
    from fastpadim.evaluation.datasets import load_category, load_mask
    from fastpadim.evaluation.metrics import image_auroc, pixel_auroc
    from fastpadim.onnx_runtime import openvino_capabilities

    capabilities = openvino_capabilities()
    print(f"CPU: {cpu_name()}; OpenVINO CPU capabilities: {', '.join(capabilities)}")
    wanted = ["f32"] + [p for p, cap in CAPABILITY.items() if cap in capabilities]
    for precision, cap in CAPABILITY.items():
        if cap not in capabilities:
            print(f"{precision}: unavailable on this CPU (no {cap} in OpenVINO's capabilities); not measured")
    if wanted == ["f32"]:
        print("bf16 is unavailable on this CPU: nothing to compare with f32 (run this on a CPU with AVX-512 BF16 or AMX)")
        return 0

    category = load_category(args.data)
    files = [item.path for item in category.test]
    labels = category.labels
    reference, rows = None, []
    for precision in wanted:
        model = load(args.model, engine="openvino", precision=precision)
        if reference is None:
            masks = np.stack([load_mask(item, model.preprocessing_) for item in category.test])
        start = time.perf_counter()
        result = model.predict(files)
        seconds = time.perf_counter() - start
        if result.skipped:
            print(f"{precision}: {len(result.skipped)} images skipped, e.g. {result.skipped[0]}", file=sys.stderr)
            return 1
        if reference is None:
            reference = result
        change = float(np.max(np.abs(result.scores - reference.scores) / np.abs(reference.scores)))
        flipped = "n/a" if result.is_anomalous is None else int(np.sum(result.is_anomalous != reference.is_anomalous))
        rows.append((f"{precision} (compiled: {model.precision})", image_auroc(labels, result.scores),
                     pixel_auroc(masks, result.maps), change, flipped, len(files) / seconds))
        del model
    print(f"\n{len(files)} test images of {category.name}, {args.model}\n")
    print("| OpenVINO precision | image AUROC | pixel AUROC | largest relative score change vs f32 | verdicts changed | images/s |")
    print("|---|---|---|---|---|---|")
    for name, image, pixel, change, flipped, speed in rows:
        print(f"| {name} | {image:.4f} | {pixel:.4f} | {change:.1e} | {flipped} | {speed:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
