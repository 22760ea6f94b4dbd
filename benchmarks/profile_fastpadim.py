"""Where fastpadim's time goes: each stage of fit and scoring timed on its own with the engine's own
functions (single process, sequential, so the stages add up; the real pipeline overlaps decoding with the
network in a thread pool), then the end-to-end ``fit`` and ``score`` for reference, and optionally cProfile.

    PYTHONPATH=src python benchmarks/profile_fastpadim.py --size 256 [--cprofile]
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BATCH_SIZE, bench_parser, peak_rss_mb, test_files, train_files  # noqa: E402

from fastpadim import Padim  # noqa: E402
from fastpadim.anomaly_map import image_scores  # noqa: E402
from fastpadim.gaussian import GaussianStats, mahalanobis  # noqa: E402
from fastpadim.images import load_one  # noqa: E402


class Stages:
    """Wall and CPU seconds per stage. With --threads 1 the CPU time is the work itself, steady even when
    other processes share the cores (no spinning worker threads inflate it)."""

    def __init__(self):
        self.seconds: dict[str, list[float]] = {}

    def time(self, name, fn, *args):
        start, cpu = time.perf_counter(), time.process_time()
        result = fn(*args)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        acc = self.seconds.setdefault(name, [0.0, 0.0])
        acc[0] += wall
        acc[1] += cpu
        return result

    def report(self, title: str, n_images: int) -> None:
        total = sum(cpu for _, cpu in self.seconds.values())
        print(f"\n{title}: {total:.2f} s CPU for {n_images} images, stages run one after another")
        print("| stage | s CPU | ms CPU/image | share of CPU | s wall |\n|---|---|---|---|---|")
        for name, (wall, cpu) in self.seconds.items():
            print(f"| {name} | {cpu:.2f} | {1000 * cpu / n_images:.1f} | {100 * cpu / total:.0f} % | {wall:.2f} |")


def new_model(size: int) -> Padim:
    return Padim(n_features=176, image_size=size, crop_size=None, holdout=0, device="cpu", batch_size=BATCH_SIZE)


@torch.inference_mode()
def staged(size: int, data: Path, max_train: int, max_test: int) -> None:
    model = new_model(size)
    model.prepare()
    extractor, prep = model.extractor_, model.preprocessing_

    fit = Stages()
    train = train_files(data)[:max_train]
    stats = None
    for start in range(0, len(train), BATCH_SIZE):
        chunk = train[start : start + BATCH_SIZE]
        items = fit.time("decode + resize + normalise (1 thread)", lambda: [load_one(p, 0, prep, False) for p in chunk])
        batch = fit.time("stack into a batch", lambda: torch.stack([i.tensor for i in items]))
        batch = batch.contiguous(memory_format=torch.channels_last)  # as FeatureExtractor.forward feeds it
        maps = fit.time("backbone forward (to blocks.4)", extractor._maps, batch)
        emb = fit.time("embedding: select, upsample, concat → (B, P, D)", lambda: _assemble(extractor, maps, batch))
        (h, w), d = model.grid_, emb.shape[-1]
        if stats is None:
            stats = GaussianStats.empty(h * w, d)
        fit.time("covariance update (GaussianStats.update)", stats.update, emb)
    whitener = fit.time("factorisation (Cholesky + inverse, float64)", stats.whitener, 0.01)
    mean = stats.mean.float()
    fit.report(f"fit stages, {size}x{size}, grid {h}x{w}, D={d}", len(train))

    score = Stages()
    tests = test_files(data)[::max(1, len(test_files(data)) // max_test)][:max_test]
    for start in range(0, len(tests), BATCH_SIZE):
        chunk = tests[start : start + BATCH_SIZE]
        items = score.time("decode + resize + normalise (1 thread)", lambda: [load_one(p, 0, prep, False) for p in chunk])
        batch = score.time("stack into a batch", lambda: torch.stack([i.tensor for i in items]))
        batch = batch.contiguous(memory_format=torch.channels_last)
        maps = score.time("backbone forward (to blocks.4)", extractor._maps, batch)
        emb = score.time("embedding: select, upsample, concat → (B, P, D)", lambda: _assemble(extractor, maps, batch))
        h, w = model.grid_
        dist = score.time("Mahalanobis (bmm with the whitener)", mahalanobis, emb, mean, whitener)
        amap = score.time("upsample (bicubic) + blur", model.map_generator_, dist.view(-1, h, w))
        score.time("image score (max) + to numpy", lambda: (image_scores(amap).numpy(), amap.numpy()))
    score.report(f"scoring stages, {size}x{size}", len(tests))


def _assemble(extractor, maps, batch):
    """The part of FeatureExtractor.forward after the backbone (same code path, maps given)."""
    original = extractor._maps
    extractor._maps = lambda _images: maps
    try:
        with torch.inference_mode():
            return extractor(batch)
    finally:
        extractor._maps = original


def end_to_end(size: int, data: Path, profile: bool) -> None:
    model = new_model(size)
    profiler = cProfile.Profile() if profile else None
    start = time.perf_counter()
    if profiler:
        profiler.enable()
    model.fit(train_files(data))
    fit_s = time.perf_counter() - start
    model.score_images(test_files(data)[:1])
    start = time.perf_counter()
    model.score_images(test_files(data))
    score_s = time.perf_counter() - start
    if profiler:
        profiler.disable()
    print(f"\nend to end (thread-pool decoding overlapping the network): fit {fit_s:.2f} s, "
          f"score {len(test_files(data))} images {score_s:.2f} s; peak RSS {peak_rss_mb():.0f} MB")
    if profiler:
        print("\ncProfile, main thread, top 20 by own time (fit + score):")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(20)


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--cprofile", action="store_true")
    parser.add_argument("--skip-end-to-end", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1: CPU times not inflated by spinning)")
    parser.add_argument("--max-train", type=int, default=10**9, help="use only the first N training images")
    parser.add_argument("--max-test", type=int, default=10**9, help="use only N test images, spread over the types")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    staged(args.size, args.data, args.max_train, args.max_test)
    if not args.skip_end_to_end:
        end_to_end(args.size, args.data, args.cprofile)
    np.set_printoptions()


if __name__ == "__main__":
    main()
