"""fastpadim in one clean process, through its public API from image files (decoding included in every time).

Writes result.json (timings, peak RSS, file size) and, in compare mode, preds.npz (scores, maps) to --out.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    BATCH_SIZE, LATENCY_IMAGES, Timer, current_rss_mb, peak_rss_mb, synthetic_train, test_files,
    train_files, worker_main, compare_result,
)

import fastpadim  # noqa: E402
from fastpadim.onnx_runtime import ENGINE_CHOICES  # noqa: E402



def model_params(size: int) -> dict:
    # All 176 Lite0 channels (n_features=176 keeps all, sorted), resize only, no threshold (folds=0: no
    # out-of-fold pass): the same work anomalib's PadimModel does.
    return dict(n_features=176, image_size=size, crop_size=None, folds=0, device="cpu", batch_size=BATCH_SIZE)


def new_model(size: int, engine: str = "torch"):
    """``engine`` runs the network (float32)."""
    from fastpadim import Padim

    return Padim(**model_params(size), engine=engine)


EXPORT = """
import sys
from fastpadim import Padim
from fastpadim.engines import onnx_of
onnx_of(sys.argv[1], Padim.load(sys.argv[1], device="cpu"))
"""


def compare_without_torch(args) -> dict:
    """Mode ``compare --without-torch``: fit through ``--engine`` in this process, which never imports torch
    (``fastpadim.onnx_fit``: the statistics and the factor; then saving writes the model file and the export cached
    beside it), then the scoring in a fresh process, as ``compare``."""
    from fastpadim.onnx_fit import fit_without_torch, network

    params = model_params(args.size)
    train, tests = train_files(args.data), test_files(args.data)
    with Timer() as t_network:
        built = network(params).built  # once per parameters and weights, cached: reported apart
    rss_ready = current_rss_mb()
    model_path = args.out / "model.padim"
    with Timer() as t_fit:
        fitted = fit_without_torch(train, engine=args.engine, **params)
    with Timer() as t_save:
        saved = fitted.save(model_path)
    del fitted
    peak_fit = peak_rss_mb()
    with Timer() as t_export:  # saving wrote it (its factor computed in fit); else PyTorch makes it on first use
        if saved.export is None:
            subprocess.run([sys.executable, "-c", EXPORT, str(model_path)], check=True, capture_output=True)
    scored = score_in_child(args, model_path)
    t_infer = SimpleNamespace(seconds=scored["infer_s"], cpu_seconds=scored["infer_cpu_s"])
    result = compare_result("fastpadim", args, len(train), len(tests), 0.0, t_fit, t_infer, scored["latencies"],
                            rss_ready, peak_fit, model_path, os.cpu_count())
    return {**result, "engine": f"{args.engine} without torch", "save_s": t_save.seconds, "export_s": t_export.seconds,
            "network_build_s": t_network.seconds if built else 0.0, "fit_imports_torch": "torch" in sys.modules,
            "peak_rss_fit_process_mb": result["peak_rss_mb"],
            "peak_rss_mb": max(result["peak_rss_mb"], scored["peak_rss_mb"]), "peak_rss_scoring_mb": scored["peak_rss_mb"],
            "scoring_imports_torch": scored["torch_imported"]}


def score_in_child(args, model_path: Path) -> dict:
    """Mode ``score`` in a fresh process, as deployed: `fastpadim predict MODEL --engine E` opens the cached export."""
    child = subprocess.run([sys.executable, __file__, "score", "--engine", args.engine, "--model", str(model_path),
                            "--data", str(args.data), "--size", str(args.size), "--out", str(args.out)],
                           capture_output=True, text=True)
    if child.returncode != 0:
        raise SystemExit(f"scoring process failed: {child.stderr.strip().splitlines()[-1:]}")
    return json.loads((args.out / "result.json").read_text())


def torch_threads() -> int:
    import torch  # fit's process only: the scoring process of an ONNX engine never imports it

    return torch.get_num_threads()


def time_test_set(scoring, tests: list[Path], out: Path):
    """Score the test set with ``scoring`` (a warm-up image first), then the single-image latencies; the
    predictions go to ``out``/preds.npz. Returns (the batched run's Timer, latencies in seconds)."""
    scoring.score_images(tests[:1])  # warm-up
    with Timer() as t_infer:
        scores, maps = scoring.score_images(tests)
    latencies = []
    for path in tests[:LATENCY_IMAGES]:
        with Timer() as t_one:
            scoring.score_images([path])
        latencies.append(t_one.seconds)
    np.savez(out / "preds.npz", scores=scores, maps=maps.astype(np.float32))
    return t_infer, latencies


def score(args) -> dict:
    """Mode ``score``: the saved model (``--model``) loaded with ``--engine`` in this fresh process, as `fastpadim
    predict --engine E` runs it: an ONNX engine opens the export cached beside the .padim, torch never imported."""
    scoring = fastpadim.load(args.model, device="cpu", engine=args.engine)
    scoring.batch_size = BATCH_SIZE
    t_infer, latencies = time_test_set(scoring, test_files(args.data), args.out)
    return {"infer_s": t_infer.seconds, "infer_cpu_s": t_infer.cpu_seconds, "latencies": latencies,
            "peak_rss_mb": peak_rss_mb(), "torch_imported": "torch" in sys.modules}


def compare(args) -> dict:
    if args.without_torch:
        return compare_without_torch(args)
    model = new_model(args.size, args.engine)
    train, tests = train_files(args.data), test_files(args.data)
    rss_ready = current_rss_mb()
    with Timer() as t_fit:
        model.fit(train)
    model_path = args.out / "model.padim"
    with Timer() as t_save:
        model.save(model_path)
    peak_fit = peak_rss_mb()  # the fit and its saving, as without torch
    if args.engine != "torch":
        from fastpadim.engines import onnx_of

        with Timer() as t_export:
            onnx_of(model_path, model)  # once per model file: cached beside it for every later run
        del model
        scored = score_in_child(args, model_path)
        t_infer = SimpleNamespace(seconds=scored["infer_s"], cpu_seconds=scored["infer_cpu_s"])
        result = compare_result("fastpadim", args, len(train), len(tests), 0.0, t_fit, t_infer, scored["latencies"],
                                rss_ready, peak_fit, model_path, torch_threads())
        return {**result, "engine": args.engine, "save_s": t_save.seconds, "export_s": t_export.seconds,
                "peak_rss_fit_process_mb": result["peak_rss_mb"],
                "peak_rss_mb": max(result["peak_rss_mb"], scored["peak_rss_mb"]), "peak_rss_scoring_mb": scored["peak_rss_mb"],
                "scoring_imports_torch": scored["torch_imported"]}

    t_infer, latencies = time_test_set(model, tests, args.out)
    result = compare_result("fastpadim", args, len(train), len(tests), 0.0, t_fit, t_infer, latencies, rss_ready,
                            peak_fit, model_path, torch_threads())  # decoding is inside fit_s and infer_s
    return {**result, "engine": "torch", "save_s": t_save.seconds, "peak_rss_scoring_mb": result["peak_rss_mb"],
            "scoring_imports_torch": True}


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
    if sys.argv[1:2] != ["score"] and "--without-torch" not in sys.argv:  # the scoring process of an ONNX engine runs without torch, as deployed
        # fastpadim imports timm lazily, when fit builds the network; import it here, before any timer, as anomalib's
        # worker has imported anomalib, timm and torchvision before its timers (timm's import alone takes ~3.7 s
        # here: it pulls in torchvision, which pulls in torch._dynamo). Building the model stays inside fit time.
        import timm  # noqa: F401
    worker_main(__doc__, compare, scaling, modes={"score": score},
                options=[(("--engine",), {"default": "torch", "choices": ENGINE_CHOICES, "help": "what runs the network"}),
                         (("--model",), {"type": Path, "help": "the .padim to score (mode score)"}),
                         (("--without-torch",), {"action": "store_true",
                                                 "help": "fit through --engine without torch in the process"})])
