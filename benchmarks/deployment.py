"""Deployment figures: file sizes of exports, and speed of the PyTorch path vs onnxruntime vs OpenVINO.

    python benchmarks/deployment.py speed --data ../shared/data/mvtec_ad/bottle [--train 60] [--images 40] [--repeats 30]
    python benchmarks/deployment.py sizes [--out DIR]
    python benchmarks/deployment.py accuracy MODEL.padim --data ../shared/data/mvtec_ad/bottle

``speed`` fits the default model (EfficientNet-Lite0, offline ImageNet weights, 256 → crop 224) on the first
``--train`` good training images, exports it (fp32 and fp16), then runs every engine in its own fresh process
(so each pays only for what it imports: the ONNX runs never import torch) on the same test images:
batch throughput (``predict`` on all images, batch 32, decoding included; median of 3 passes after a warm-up
pass), single-image latency (median of ``predict([one image])``, decoding included) and the process's peak RSS. "fp16" is the engine's half-precision
storage: ``factor_dtype="float16"`` for PyTorch, ``export --fp16`` for ONNX (both compute in float32 on the CPU).

``sizes`` fits two models on a few generated images (random weights: the size does not depend on them) and
exports each in fp32 and fp16: the default model and PaDiM-WR50-Rd550, both 224 px inputs.

``accuracy`` exports a fitted model in fp32 and fp16 and scores the whole test set with PyTorch and both
exports (onnxruntime): image AUROC, pixel AUROC, PRO (when ``fastpadim.evaluation.metrics`` is there) and the largest
score difference.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import peak_rss_mb  # noqa: E402

MODELS = [("EfficientNet-Lite0, D = 176 (default)", "efficientnet_lite0"), ("WR50-Rd550", "wide_resnet50_2")]
CONFIGS = ["torch-fp32", "torch-fp16", "onnxruntime-fp32", "onnxruntime-fp16", "openvino-fp32", "openvino-fp16"]


def load_average() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def worker(config: str, model_dir: Path, files: list[str], repeats: int) -> dict:
    """One engine in this (fresh) process: load time, throughput, latency, peak RSS."""
    engine, precision = config.split("-")
    start = time.perf_counter()
    if engine == "torch":
        from fastpadim import Padim

        model = Padim.load(model_dir / f"model-{precision}.padim", device="cpu")
    else:
        from fastpadim.onnx_runtime import OnnxPadim

        model = OnnxPadim(model_dir / f"model-{precision}.onnx", engine=engine)
    load_s = time.perf_counter() - start
    model.batch_size = 32
    model.predict(files)  # warm-up: lazy initialisation, kernels chosen per shape, allocator growth
    for i in range(3):
        model.predict([files[i]])
    passes = []
    for _ in range(3):  # the cores are shared: the median of 3 passes
        start = time.perf_counter()
        result = model.predict(files)
        passes.append(len(files) / (time.perf_counter() - start))
    latencies = []
    for i in range(repeats):
        start = time.perf_counter()
        model.predict([files[i % len(files)]])
        latencies.append(time.perf_counter() - start)
    return {
        "config": config, "load_s": load_s, "images_per_s": statistics.median(passes),
        "latency_ms": 1000 * statistics.median(latencies), "peak_rss_mb": peak_rss_mb(),
        "torch_imported": "torch" in sys.modules, "scores": result.scores.tolist(),
    }


def speed(args) -> None:
    from fastpadim import Padim
    from fastpadim.export import export_onnx

    data = Path(args.data)
    train = sorted((data / "train/good").glob("*.png"))[: args.train]
    tests = sorted((data / "test").glob("*/*.png"))
    files = [str(p) for p in tests[:: max(1, len(tests) // args.images)][: args.images]]
    work = Path(tempfile.mkdtemp(prefix="fastpadim-deploy-"))
    print(f"load average before: {load_average()}", file=sys.stderr)
    model = Padim(device="cpu", holdout=0, crop_size=224).fit(train)  # the 224 crop, as recorded in the docs
    model.save(work / "model-fp32.padim")
    export_onnx(model, work / "model-fp32.onnx")
    export_onnx(model, work / "model-fp16.onnx", fp16=True)
    model.factor_dtype, model.whitener_ = "float16", model.whitener_.half()  # as fit(factor_dtype="float16") stores it
    model.save(work / "model-fp16.padim")
    del model
    configs = list(CONFIGS)
    try:
        import openvino  # noqa: F401
    except ImportError:
        print("OpenVINO is not installed: its rows are skipped", file=sys.stderr)
        configs = [c for c in configs if not c.startswith("openvino")]
    # Rounds over all engines, each run in a fresh process; per engine the best round is kept, the one least
    # disturbed by other work on the shared cores (all rounds are printed to stderr).
    best: dict[str, dict] = {}
    loads = []
    for round_ in range(args.rounds):
        for config in configs:
            command = [sys.executable, __file__, "worker", config, str(work), "--repeats", str(args.repeats), *files]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{config} failed:\n{done.stderr[-2000:]}")
            row = json.loads(done.stdout.strip().splitlines()[-1])
            loads.append(os.getloadavg()[0])
            print(f"round {round_ + 1} {config}: {row['images_per_s']:.1f} images/s, {row['latency_ms']:.0f} ms "
                  f"(load average {load_average()})", file=sys.stderr)
            kept = best.setdefault(config, row)
            kept["images_per_s"] = max(kept["images_per_s"], row["images_per_s"])
            kept["latency_ms"] = min(kept["latency_ms"], row["latency_ms"])
    shutil.rmtree(work)
    rows = [best[c] for c in configs]
    reference = rows[0]["scores"]
    print(f"\nbottle, {len(train)} training images, {len(files)} test images, 224 px, {os.cpu_count()} CPU cores, "
          f"best of {args.rounds} rounds; 1-minute load average during the run {min(loads):.1f} to {max(loads):.1f}\n")
    print("| engine | weights | images/s (batch 32) | latency, 1 image (ms, median) | load (s) | peak RSS (MB) | imports torch | max score deviation |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        engine, precision = row["config"].split("-")
        deviation = max(abs(a - b) / abs(b) for a, b in zip(row["scores"], reference))
        print(f"| {engine} | {precision} | {row['images_per_s']:.1f} | {row['latency_ms']:.0f} | {row['load_s']:.1f} | "
              f"{row['peak_rss_mb']:.0f} | {'yes' if row['torch_imported'] else 'no'} | {deviation:.1e} |")


def sizes(args) -> None:
    import numpy as np

    from fastpadim import Padim
    from fastpadim.export import export_onnx
    from fastpadim.evaluation.synthetic import surface

    out = Path(args.out or tempfile.mkdtemp(prefix="fastpadim-sizes-"))
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images = [surface(rng, 256) for _ in range(4)]
    print("| model | .padim (MB) | ONNX fp32: .onnx + .data (MB) | ONNX fp16: .onnx + .data (MB) |")
    print("|---|---|---|---|")
    for name, backbone in MODELS:
        if args.only and backbone != args.only:
            continue
        start = time.perf_counter()
        model = Padim(backbone=backbone, weights="random", holdout=0, device="cpu", crop_size=224).fit(images)
        model.save(out / f"{backbone}.padim")  # the file holds the statistics, from which load computes the factor
        model.stats_ = None  # not needed to export; they would double the memory of a WR50 model
        cells = []
        for fp16 in (False, True):
            result = export_onnx(model, out / f"{backbone}-{'fp16' if fp16 else 'fp32'}.onnx", fp16=fp16)
            cells.append(f"{result.onnx_bytes / 1e6:.2f} + {result.data_bytes / 1e6:.0f}")
        padim = (out / f"{backbone}.padim").stat().st_size / 1e6
        print(f"| {name} | {padim:.0f} | {cells[0]} | {cells[1]} |", flush=True)
        print(f"{backbone}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
        del model
        for path in out.glob(f"{backbone}*"):
            path.unlink()


def accuracy(args) -> None:
    import numpy as np

    from fastpadim import Padim, load
    from fastpadim.evaluation.datasets import load_category, load_mask
    from fastpadim.export import export_onnx
    from fastpadim.evaluation.metrics import image_auroc, pixel_auroc, pro_auc

    category = load_category(Path(args.data))
    files = [item.path for item in category.test]
    model = Padim.load(args.model, device="cpu")
    masks = np.stack([load_mask(item, model.preprocessing_) for item in category.test])
    labels = category.labels
    work = Path(tempfile.mkdtemp(prefix="fastpadim-accuracy-"))
    runs = {"PyTorch": model}
    for name, fp16 in (("onnxruntime fp32", False), ("onnxruntime fp16", True)):
        runs[name] = load(export_onnx(model, work / f"{name.split()[1]}.onnx", fp16=fp16).onnx_path)
    reference = None
    print(f"{len(files)} test images of {category.name}\n")
    print("| run | image AUROC | pixel AUROC | PRO (FPR ≤ 0.3) | largest relative score difference |")
    print("|---|---|---|---|---|")
    for name, runner in runs.items():
        result = runner.predict(files)
        if reference is None:
            reference = result
        pro = f"{pro_auc(masks, result.maps):.4f}"
        deviation = float(np.max(np.abs(result.scores - reference.scores) / np.abs(reference.scores)))
        print(f"| {name} | {image_auroc(labels, result.scores):.4f} | {pixel_auroc(masks, result.maps):.4f} "
              f"| {pro} | {deviation:.1e} |", flush=True)
    shutil.rmtree(work)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("speed")
    p.add_argument("--data", default="../shared/data/mvtec_ad/bottle")
    p.add_argument("--train", type=int, default=60)
    p.add_argument("--images", type=int, default=40)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--rounds", type=int, default=3)
    p = sub.add_parser("sizes")
    p.add_argument("--out")
    p.add_argument("--only", choices=[b for _, b in MODELS], help="one model only")
    p = sub.add_parser("accuracy")
    p.add_argument("model")
    p.add_argument("--data", default="../shared/data/mvtec_ad/bottle")
    p = sub.add_parser("worker")
    p.add_argument("config", choices=CONFIGS)
    p.add_argument("model_dir")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("files", nargs="+")
    args = parser.parse_args()
    if args.command == "worker":
        print(json.dumps(worker(args.config, Path(args.model_dir), args.files, args.repeats)))
    elif args.command == "speed":
        speed(args)
    elif args.command == "accuracy":
        accuracy(args)
    else:
        sizes(args)


if __name__ == "__main__":
    main()
