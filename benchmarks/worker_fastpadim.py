"""fastpadim in one clean process, through its public API from image files (decoding included in every time).

Writes result.json (timings, peak RSS, file size) and, in compare mode, preds.npz (scores, maps) to --out.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    BATCH_SIZE, LATENCY_IMAGES, Timer, current_rss_mb, peak_rss_mb, synthetic_train, test_files,
    train_files, worker_main, compare_result,
)

import fastpadim  # noqa: E402
from fastpadim import Padim  # noqa: E402
from fastpadim.onnx_runtime import ENGINE_CHOICES  # noqa: E402

# fastpadim imports timm lazily, when fit builds the network; import it here, before any timer, as anomalib's worker
# has imported anomalib, timm and torchvision before its timers (timm's import alone takes ~3.7 s on this machine:
# it pulls in torchvision, which pulls in torch._dynamo). Building the model stays inside fastpadim's fit time.
import timm  # noqa: E402, F401


def new_model(size: int, engine: str = "torch") -> Padim:
    # All 176 Lite0 channels (n_features=176 keeps all, sorted), resize only, no threshold (folds=0: no
    # out-of-fold pass): the same work anomalib's PadimModel does. ``engine`` runs the network (float32).
    return Padim(n_features=176, image_size=size, crop_size=None, folds=0, device="cpu", batch_size=BATCH_SIZE,
                 engine=engine)


def scorer(model: Padim, model_path: Path, engine: str):
    """What scores the test set: the fitted model itself (torch), or the saved .padim loaded with ``engine``, which
    exports its whole scoring graph once (cached beside the file) and runs it there, as `fastpadim predict
    --engine` does."""
    if engine == "torch":
        return model
    loaded = fastpadim.load(model_path, device="cpu", engine=engine)
    loaded.batch_size = BATCH_SIZE
    return loaded


def compare(args) -> dict:
    model = new_model(args.size, args.engine)
    train, tests = train_files(args.data), test_files(args.data)
    rss_ready = current_rss_mb()
    with Timer() as t_fit:
        model.fit(train)
    peak_fit = peak_rss_mb()
    model_path = args.out / "model.padim"
    model.save(model_path)
    with Timer() as t_load:
        scoring = scorer(model, model_path, args.engine)
    if scoring is not model:
        del model  # scoring runs on the export alone, as in a deployment

    scoring.score_images(tests[:1])  # warm-up
    with Timer() as t_infer:
        scores, maps = scoring.score_images(tests)
    latencies = []
    for path in tests[:LATENCY_IMAGES]:
        with Timer() as t_one:
            scoring.score_images([path])
        latencies.append(t_one.seconds)
    np.savez(args.out / "preds.npz", scores=scores, maps=maps.astype(np.float32))
    result = compare_result("fastpadim", args, len(train), len(tests), 0.0, t_fit, t_infer, latencies, rss_ready,
                            peak_fit, model_path, torch.get_num_threads())  # decoding is inside fit_s and infer_s
    return {**result, "engine": args.engine, "export_load_s": t_load.seconds}


def scaling(args) -> dict:
    model = new_model(args.size, args.engine)
    rss_ready = current_rss_mb()
    with Timer() as t_fit:
        model.fit(synthetic_train(args.data, args.n))  # a generator: images are made as the fit asks for them
    assert model.n_samples_seen_ == args.n
    return {
        "impl": "fastpadim", "size": args.size, "n": args.n, "fit_s": t_fit.seconds, "fit_cpu_s": t_fit.cpu_seconds,
        "rss_ready_mb": rss_ready, "peak_rss_fit_mb": peak_rss_mb(),
    }


if __name__ == "__main__":
    worker_main(__doc__, compare, scaling,
                options=[(("--engine",), {"default": "torch", "choices": ENGINE_CHOICES, "help": "what runs the network"})])
