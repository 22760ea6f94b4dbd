"""Helpers shared by the benchmark workers. Imported by both environments (fastpadim's and anomalib's),
so it needs only the standard library, numpy and Pillow."""

from __future__ import annotations

import json
import os
import resource
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}
BOTTLE = Path(__file__).resolve().parents[2] / "shared/data/mvtec_ad/bottle"  # beside the checkout
BATCH_SIZE = 32
LATENCY_IMAGES = 20  # single-image calls timed for the median latency


def peak_rss_mb() -> float:
    """This process's peak RSS in MiB. VmHWM, not ru_maxrss: ru_maxrss survives exec, so a worker started by a
    large parent would report the parent's peak as its own."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def train_files(data: Path) -> list[Path]:
    return sorted(p for p in (data / "train" / "good").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def test_files(data: Path) -> list[Path]:
    """Test images in a fixed order (defect type, then name); labels and masks are derived from the path."""
    return sorted(p for p in (data / "test").rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def decode(path: Path | np.ndarray, size: int) -> np.ndarray:
    """RGB uint8 (size, size, 3): PIL bicubic resize, the same geometry fastpadim uses with crop_size=None."""
    image = Image.open(path).convert("RGB") if not isinstance(path, np.ndarray) else Image.fromarray(path)
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(image)


def synthetic_train(data: Path, n: int):
    """``n`` distinct good images made lazily from the training images: the 8 flips/rotations of each,
    then the same shifted (np.roll) by a few pixels per further round. Nothing is kept in memory."""
    base = train_files(data)
    per_round = 8 * len(base)
    for i in range(n):
        image = np.asarray(Image.open(base[i % len(base)]).convert("RGB"))
        k = (i // len(base)) % 8
        image = np.rot90(image, k % 4)
        if k >= 4:
            image = image[:, ::-1]
        shift = 3 * (i // per_round)
        if shift:
            image = np.roll(image, (shift, -shift), axis=(0, 1))
        yield np.ascontiguousarray(image)


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


class Timer:
    """Wall seconds and this process's CPU seconds (all threads): on a shared machine the CPU time is the
    steadier of the two, since other processes' load stretches wall time far more than it adds CPU time."""

    def __enter__(self):
        self.start, self.cpu_start = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        self.cpu_seconds = time.process_time() - self.cpu_start


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2))


def bench_parser(description: str):
    """An argument parser with the options every bottle benchmark takes: --data (a category folder) and --size."""
    import argparse

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=BOTTLE, help="an MVTec-AD-like category folder")
    parser.add_argument("--size", type=int, default=256, help="input size (resize only)")
    return parser


def worker_main(description: str, compare, scaling, engine=None, options=(), modes=None) -> None:
    """The command line both workers share: `worker_X.py compare|scaling|engine --out DIR [...]` → DIR/result.json;
    ``options``: a worker's own (flags, keyword arguments) for ``add_argument``; ``modes``: its own modes."""
    parser = bench_parser(description)
    for flags, kwargs in options:
        parser.add_argument(*flags, **kwargs)
    modes = {"compare": compare, "scaling": scaling, "engine": engine, **(modes or {})}
    parser.add_argument("mode", choices=[name for name, fn in modes.items() if fn])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    result = modes[args.mode](args)
    write_json(args.out / "result.json", result)


def compare_result(impl: str, args, n_train: int, n_test: int, decode_s: float, t_fit, t_infer, latencies: list[float],
                   rss_ready: float, peak_fit: float, model_path: Path, threads: int) -> dict:
    """The record both workers write for one `compare` run (same keys, so the table treats them alike)."""
    return {
        "impl": impl,
        "size": args.size,
        "n_train": n_train,
        "n_test": n_test,
        "decode_s": decode_s,
        "fit_s": t_fit.seconds,
        "fit_cpu_s": t_fit.cpu_seconds,
        "infer_s": t_infer.seconds,
        "infer_cpu_s": t_infer.cpu_seconds,
        "images_per_s": n_test / t_infer.seconds,
        "latency_ms": summary([s * 1000 for s in latencies]),
        "rss_ready_mb": rss_ready,
        "peak_rss_fit_mb": peak_fit,
        "peak_rss_mb": peak_rss_mb(),
        "model_bytes": model_path.stat().st_size,
        "threads": threads,
    }
