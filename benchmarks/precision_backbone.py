"""What an int8 backbone (``fastpadim export --int8``) does to an export's accuracy and speed, against float32.

    .venv/bin/python benchmarks/precision_backbone.py --out out/precision_backbone.md [--calibration 209]

Fits ``Padim(folds=0)`` (defaults: efficientnet_lite0, 256 px whole image) on the category's train/good images,
exports it twice (float32; int8 backbone calibrated on the first ``--calibration`` training images, all of them by
default), scores the test images with each export on onnxruntime and on OpenVINO, and prints one markdown table:
image AUROC, pixel AUROC, PRO (FPR ≤ 0.3), the largest and median relative image-score change against the same
engine's float32 export, images/s (engine calls on preprocessed batches of 32, decoding excluded, best of 3) and
single-image latency (median of 20). Metrics are compare_anomalib's (scikit-learn AUROC,
``fastpadim.evaluation.metrics.pro_auc``). Also prints what the CPU computes natively (OpenVINO's
OPTIMIZATION_CAPABILITIES, lscpu) and whether the bf16 opt-in runs here. The 1-minute load average is given
with the timings: the machine may be shared.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))
from common import BATCH_SIZE, LATENCY_IMAGES, bench_parser, test_files, train_files  # noqa: E402
from compare_anomalib import ground_truth, metrics  # noqa: E402

ENGINES = ("onnxruntime", "openvino")
REPEATS = 3


def cpu_report() -> list[str]:
    """lscpu's model name, the native low-precision flags, and OpenVINO's view of the CPU."""
    from fastpadim.onnx_runtime import openvino_capabilities

    lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    flags = fields.get("Flags", "").split()
    present = {flag: flag in flags for flag in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16")}
    present["amx_*"] = any(flag.startswith("amx") for flag in flags)
    return [f"CPU: {fields.get('Model name', '?').strip()}, {os.cpu_count()} logical CPUs; flags: "
            + ", ".join(f"{flag} {'yes' if has else 'no'}" for flag, has in present.items()),
            f"OpenVINO CPU OPTIMIZATION_CAPABILITIES: {', '.join(openvino_capabilities())}"]


def bf16_report(path: Path) -> str:
    """Whether fastpadim's OpenVINO bf16 opt-in runs here (it refuses where the CPU has no native BF16)."""
    from fastpadim.errors import FastpadimError
    from fastpadim.onnx_runtime import OnnxPadim

    try:
        model = OnnxPadim(path, engine="openvino", precision="bf16")
    except FastpadimError as exc:
        return f"bf16: refused on this CPU, as designed ({exc})"
    return f"bf16: available here (compiled as {model.precision}); not measured by this script"


def fit(data: Path):
    from fastpadim import Padim

    start = time.perf_counter()
    model = Padim(folds=0).fit([str(p) for p in train_files(data)])
    print(f"fit on {model.n_samples_seen_} images: {time.perf_counter() - start:.0f} s", flush=True)
    return model


def export_both(model, data: Path, work: Path, n_calibration: int) -> dict[str, Path]:
    from fastpadim.export import export_onnx

    paths = {"f32": work / "f32.onnx", "int8": work / "int8.onnx"}
    export_onnx(model, paths["f32"])
    start = time.perf_counter()
    export_onnx(model, paths["int8"], int8_images=[str(p) for p in train_files(data)[:n_calibration]])
    print(f"int8 export (calibration on {n_calibration} images): {time.perf_counter() - start:.0f} s", flush=True)
    return paths


def preprocessed(model, files: list[Path]) -> np.ndarray:
    from fastpadim.images import iter_batches, stack_arrays

    return np.concatenate([stack_arrays(batch) for batch in iter_batches([str(f) for f in files], model.preprocessing_, BATCH_SIZE)])


def timings(model, arrays: np.ndarray) -> dict:
    """Engine calls only: batches of 32 (best of 3 passes over the test set) and single images (median)."""
    passes = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        for index in range(0, len(arrays), BATCH_SIZE):
            model.run_batch(arrays[index : index + BATCH_SIZE])
        passes.append(time.perf_counter() - start)
    single = []
    for index in range(LATENCY_IMAGES):
        start = time.perf_counter()
        model.run_batch(arrays[index % len(arrays)][None])
        single.append(time.perf_counter() - start)
    return {"images_per_s": len(arrays) / min(passes), "latency_ms": 1000 * statistics.median(single),
            "load": os.getloadavg()[0]}


def measure(paths: dict[str, Path], files: list[Path], labels, masks) -> list[dict]:
    from fastpadim.onnx_runtime import OnnxPadim

    rows = []
    for engine in ENGINES:
        reference = None
        for precision, path in paths.items():
            model = OnnxPadim(path, engine=engine)
            result = model.predict([str(f) for f in files])
            if result.skipped:
                raise SystemExit(f"{engine} {precision}: {len(result.skipped)} images skipped, e.g. {result.skipped[0]}")
            scores = np.asarray(result.scores, dtype=np.float64)
            reference = scores if reference is None else reference
            change = np.abs(scores - reference) / np.abs(reference)
            rows.append({"engine": engine, "precision": model.backbone_precision,
                         **metrics(labels, masks, scores, np.asarray(result.maps)),
                         "max_change": float(change.max()), "median_change": float(np.median(change)),
                         **timings(model, preprocessed(model, files))})
            print(f"  {engine} {precision}: done", flush=True)
            del model
    return rows


def table(rows: list[dict]) -> list[str]:
    lines = ["| engine | backbone | image AUROC | pixel AUROC | PRO | largest rel. score change vs f32 | "
             "median rel. change | images/s (batch 32, best of 3) | latency 1 image (ms, median) | load (1 min) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['engine']} | {r['precision']} | {r['image_auroc']:.4f} | {r['pixel_auroc']:.4f} | "
                     f"{r['pro']:.4f} | {r['max_change']:.2%} | {r['median_change']:.2%} | {r['images_per_s']:.1f} | "
                     f"{r['latency_ms']:.1f} | {r['load']:.2f} |")
    return lines


def main() -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--out", type=Path, required=True, help="markdown file to write the report to")
    parser.add_argument("--calibration", type=int, default=None, help="calibrate on the first N training images (default: all)")
    parser.add_argument("--work", type=Path, default=None, help="folder for the exports (default: a temporary one)")
    args = parser.parse_args()

    files = test_files(args.data)
    labels, masks = ground_truth(args.data, args.size)
    n_calibration = args.calibration or len(train_files(args.data))
    with tempfile.TemporaryDirectory(prefix="precision-backbone-") as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        model = fit(args.data)
        paths = export_both(model, args.data, work, n_calibration)
        del model
        report = [*cpu_report(), bf16_report(paths["f32"]), "",
                  f"{args.data.name}: {len(files)} test images, Padim(folds=0) defaults (efficientnet_lite0, "
                  f"{args.size} px whole image), int8 calibrated on {n_calibration} train/good images; "
                  "scoring part float32 in both", ""]
        report += table(measure(paths, files, labels, masks))
    text = "\n".join(report)
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
