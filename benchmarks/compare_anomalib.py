"""fastpadim vs anomalib's PaDiM, side by side in one run, on the same data, backbone, weights, input size and
channels; prints one table per input size.

Each implementation runs in its own fresh subprocess (fastpadim with this interpreter, anomalib with the
interpreter of .venv-anomalib made by benchmarks/setup_anomalib.sh), so peak RSS is that implementation's
alone. Runs alternate between the two and are repeated; the table gives the median and [min-max].
Metrics for both come from the same code here: scikit-learn's roc_auc_score and fastpadim.evaluation.metrics.pro_auc.

    python benchmarks/compare_anomalib.py --sizes 256,224 --repeats 3 [--engine] [--fastpadim-engines torch,openvino]

With ``--engine`` each repeat also runs anomalib's user path (``Engine.fit`` + ``Engine.test`` with its data module,
how the issue's anchor figures were taken) and a second table compares fastpadim with it. ``--fastpadim-engines``
runs fastpadim once per engine (what runs its network in fit; the scoring graph for inference, exported from the
saved .padim and cached, its export and load timed apart), a column and a ratio each, all in float32.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.metrics import roc_auc_score

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from common import BOTTLE, test_files  # noqa: E402

AGREEMENT = 0.005  # metrics must agree within 0.5 point


def run_worker(impl: str, mode: str, out: Path, args, extra: list[str], timeout: float | None = None) -> dict | None:
    """One fresh process; returns its result.json, or None (with the reason printed) when it failed."""
    python = sys.executable if impl == "fastpadim" else str(args.anomalib_python)
    env = dict(os.environ)
    if impl == "fastpadim":
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    command = [python, str(HERE / f"worker_{impl}.py"), mode, "--data", str(args.data), "--out", str(out), *extra]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"  {impl} {' '.join(extra)}: stopped after {timeout:.0f} s", flush=True)
        return None
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        print(f"  {impl} {' '.join(extra)}: failed (exit {done.returncode}): {' | '.join(tail)}", flush=True)
        return None
    print(f"  {impl} {' '.join(extra)}: done in {time.perf_counter() - start:.0f} s", flush=True)
    result = json.loads((out / "result.json").read_text())
    # Model files (~0.5 GB each) and the Engine's checkpoints and images (~1 GB a run) were measured; drop them,
    # so that repeated runs do not fill the disk. result.json and preds.npz stay.
    for big in [*out.glob("model.*"), out / "results"]:
        shutil.rmtree(big) if big.is_dir() else big.unlink(missing_ok=True)
    return result


def ground_truth(data: Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Image labels (N,) and pixel masks (N, size, size) in test_files order; good images have empty masks."""
    labels, masks = [], []
    for path in test_files(data):
        kind = path.parent.name
        labels.append(kind != "good")
        mask_path = data / "ground_truth" / kind / f"{path.stem}_mask.png"
        if kind == "good" or not mask_path.exists():
            masks.append(np.zeros((size, size), bool))
            continue
        mask = Image.open(mask_path).convert("L").resize((size, size), Image.Resampling.NEAREST)
        masks.append(np.asarray(mask) > 127)
    return np.array(labels), np.stack(masks)


def metrics(labels: np.ndarray, masks: np.ndarray, scores: np.ndarray, maps: np.ndarray) -> dict:
    result = {
        "image_auroc": roc_auc_score(labels, scores),
        "pixel_auroc": roc_auc_score(masks.ravel(), maps.ravel()),
    }
    try:
        from fastpadim.evaluation.metrics import pro_auc
    except ImportError:
        result["pro"] = None  # fastpadim.evaluation.metrics not merged yet
    else:
        result["pro"] = float(pro_auc(masks, maps, fpr_limit=0.3))
    return result


def spread(values: list[float], fmt: str) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.median(values), fmt)} [{format(min(values), fmt)}-{format(max(values), fmt)}]"


def ratio(a: list[float], b: list[float]) -> str:
    if not a or not b:
        return "n/a"
    return f"{statistics.median(a) / statistics.median(b):.2f}"


def fastpadim_impls(runs: dict[str, list[dict]]) -> list[str]:
    return [impl for impl in runs if impl.startswith("fastpadim")]


WITHOUT_TORCH = "-without-torch"  # an engine named so fits in a process that never imports torch (onnx_fit)


def impl_name(engine: str) -> str:
    """The column of fastpadim on ``engine`` ("fastpadim" alone for torch, as in earlier runs)."""
    return "fastpadim" if engine == "torch" else f"fastpadim-{engine}"


def engine_args(engine: str) -> list[str]:
    if engine.endswith(WITHOUT_TORCH):
        return ["--engine", engine.removesuffix(WITHOUT_TORCH), "--without-torch"]
    return ["--engine", engine]


def table(size: int, runs: dict[str, list[dict]], quality: dict[str, dict]) -> str:
    ours = fastpadim_impls(runs)
    rows = [
        ("fit time (s, wall; the fitted model in memory, factor included, as anomalib's)", "fit_s", ".1f", None),
        ("fit time (s, CPU of the process)", "fit_cpu_s", ".1f", None),
        ("decode before fit (s, anomalib only)", "decode_s", ".1f", None),
        ("batched inference (images/s, wall)", "images_per_s", ".2f", None),
        ("batched inference (s CPU per image)", None, ".3f", lambda r: r["infer_cpu_s"] / r["n_test"]),
        ("single-image latency (ms, median)", None, ".0f", lambda r: r["latency_ms"]["median"]),
        ("peak RSS by end of fit and save (MB; anomalib: fit)", "peak_rss_fit_mb", ".0f", None),
        ("peak RSS whole run (MB)", "peak_rss_mb", ".0f", None),
        ("model file (MB)", None, ".1f", lambda r: r["model_bytes"] / 1e6),
        ("peak RSS of the scoring process (MB; an ONNX engine scores in a fresh process without torch)", None, ".0f",
         lambda r: r.get("peak_rss_scoring_mb", r["peak_rss_mb"])),
        ("save the model file (s, wall; without torch its ONNX export too)", None, ".1f", lambda r: r.get("save_s", 0.0)),
        ("export to ONNX, once per model file (s, fastpadim on an ONNX engine; without torch saving writes it)",
         None, ".1f", lambda r: r.get("export_s", 0.0)),
        ("fit + save + export (s, wall)", None, ".1f",
         lambda r: r["fit_s"] + r.get("save_s", 0.0) + r.get("export_s", 0.0)),
        ("network graph built and cached before the first fit (s, without torch only)", None, ".1f",
         lambda r: r.get("network_build_s", 0.0)),
    ]
    counts = " / ".join(f"{len(runs[impl])} {impl}" for impl in (*ours, "anomalib"))
    lines = [
        f"\n### {size}x{size} input, no crop, all 176 channels "
        f"({runs[ours[0]][0]['n_train'] if runs[ours[0]] else '?'} train images, repeats: {counts}; median [min-max])\n",
        "| measure | " + " | ".join(ours) + " | anomalib PadimModel | "
        + " | ".join(f"{impl} / anomalib" for impl in ours) + " |",
        "|---|" + "---|" * (2 * len(ours) + 1),
    ]
    for label, key, fmt, fn in rows:
        values = {impl: [fn(r) if fn else r[key] for r in runs[impl]] for impl in (*ours, "anomalib")}
        if key == "decode_s":  # fastpadim decodes inside fit and inference, overlapped with the network
            cells = ["(inside fit)"] * len(ours) + [spread(values["anomalib"], fmt)] + ["n/a"] * len(ours)
        elif label.startswith(("save the model", "export to ONNX", "network graph")):
            cells = [spread(values[impl], fmt) for impl in ours] + ["n/a"] * (1 + len(ours))
        else:
            cells = [spread(values[impl], fmt) for impl in ours] + [spread(values["anomalib"], fmt)] \
                + [ratio(values[impl], values["anomalib"]) for impl in ours]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for label, key in (("image AUROC", "image_auroc"), ("pixel AUROC", "pixel_auroc"), ("PRO (FPR <= 0.3)", "pro")):
        b = quality.get("anomalib", {}).get(key)
        ours_values = [quality.get(impl, {}).get(key) for impl in ours]
        cells = ["n/a" if a is None else f"{a:.4f}" for a in ours_values] + ["n/a" if b is None else f"{b:.4f}"]
        for a in ours_values:
            cells.append("n/a" if a is None or b is None else f"diff {100 * (a - b):+.2f} pt" + (
                "" if abs(a - b) <= AGREEMENT else " (DISAGREE > 0.5 pt)"))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def engine_table(runs: dict[str, list[dict]]) -> str:
    """fastpadim's fit and scoring against anomalib's Engine.fit / Engine.test (its user path)."""
    fp, en = runs[fastpadim_impls(runs)[0]], runs["engine"]
    rows = [
        ("fit (s, wall)", [r["fit_s"] for r in fp], [r["fit_s"] for r in en], ".1f"),
        ("fit (s, CPU of the process)", [r["fit_cpu_s"] for r in fp], [r["fit_cpu_s"] for r in en], ".1f"),
        ("score the test set (s, wall; Engine.test adds its metrics and images)", [r["infer_s"] for r in fp],
         [r["test_s"] for r in en], ".1f"),
        ("peak RSS by end of fit (MB)", [r["peak_rss_fit_mb"] for r in fp], [r["peak_rss_fit_mb"] for r in en], ".0f"),
    ]
    lines = ["", "", f"against anomalib's Engine (repeats: {len(fp)} fastpadim / {len(en)} Engine; median [min-max])", "",
             "| measure | fastpadim | anomalib Engine | fastpadim / anomalib |", "|---|---|---|---|"]
    for label, a, b, fmt in rows:
        lines.append(f"| {label} | {spread(a, fmt)} | {spread(b, fmt)} | {ratio(a, b)} |")
    if en:
        m = en[0]["metrics"]
        lines.append(f"| Engine's own metrics | | image AUROC {m.get('image_AUROC', float('nan')):.4f}, "
                     f"pixel AUROC {m.get('pixel_AUROC', float('nan')):.4f} | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=BOTTLE, help="an MVTec-AD-like category folder")
    parser.add_argument("--sizes", default="256", help="comma-separated input sizes (resize only), e.g. 256,224")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--anomalib-python", type=Path, default=ROOT / ".venv-anomalib" / "bin" / "python")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "bench-compare")
    parser.add_argument("--engine", action="store_true", help="also run anomalib's Engine.fit + Engine.test")
    parser.add_argument("--fastpadim-engines", default="torch",
                        help="comma-separated engines that run fastpadim's network, e.g. torch,openvino; "
                             "onnxruntime-without-torch fits in a process that never imports torch")
    args = parser.parse_args()
    if not (args.data / "train" / "good").is_dir():
        sys.exit(f"{args.data}: not an MVTec-AD-like folder (no train/good)")
    if not args.anomalib_python.exists():
        sys.exit(f"{args.anomalib_python} not found: run benchmarks/setup_anomalib.sh first")

    summary = {}
    for size in (int(s) for s in args.sizes.split(",")):
        print(f"input {size}x{size}:", flush=True)
        engines = {impl_name(engine): engine for engine in args.fastpadim_engines.split(",")}
        impls = (*engines, "anomalib", *(["engine"] if args.engine else []))
        runs: dict[str, list[dict]] = {impl: [] for impl in impls}
        for repeat in range(args.repeats):
            order = impls if repeat % 2 == 0 else impls[::-1]  # alternate so drift in machine load hits both
            for impl in order:
                out = args.out / str(size) / impl / f"run{repeat}"
                worker, mode = ("anomalib", "engine") if impl == "engine" else (
                    ("fastpadim", "compare") if impl in engines else (impl, "compare"))
                extra = ["--size", str(size)] + (engine_args(engines[impl]) if impl in engines else [])
                result = run_worker(worker, mode, out, args, extra)
                if result:
                    result["out"] = str(out)
                    runs[impl].append(result)
        labels, masks = ground_truth(args.data, size)
        quality = {}
        for impl in (*engines, "anomalib"):
            if runs[impl]:
                preds = np.load(Path(runs[impl][0]["out"]) / "preds.npz")
                quality[impl] = metrics(labels, masks, preds["scores"], preds["maps"])
        text = table(size, runs, quality) + (engine_table(runs) if args.engine else "")
        print(text, flush=True)
        summary[size] = {"runs": runs, "quality": quality, "table": text}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    print(f"\nraw results: {args.out / 'summary.json'}")


if __name__ == "__main__":
    main()
