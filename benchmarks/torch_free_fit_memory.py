"""What a fit that never imports torch would take in memory: a measurement for issue 17's fit-RSS target, not a
fastpadim feature.

The default model's feature extractor is traced to ONNX in a child process (that one imports torch, then exits).
This process, without torch, then does what ``Padim.fit`` does with ``folds=0``: decode and preprocess the training
images (``fastpadim.images``), embed them with onnxruntime (8 per call), add them 64 at a time to float64 packed
statistics as ``GaussianStats.update`` does (a NumPy transcription kept here, not in the library), and compute the
float32 inverse Cholesky factor per position with SciPy's LAPACK, written over the statistics' own memory as
``whitener(consume=True)`` does. It prints the wall time of each step and the process's peak RSS (VmHWM), and
checks that torch was never imported.

    .venv/bin/python benchmarks/torch_free_fit_memory.py [--data ../shared/data/mvtec_ad/bottle]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_parser, peak_rss_mb, train_files  # noqa: E402

PER_CALL = 8
PER_UPDATE = 64
POSITIONS_PER_BLOCK = 128
EPSILON = 0.01

TRACE = """
import json, sys, onnx
from fastpadim import Padim
from fastpadim.embedders import module_graph
model = Padim(folds=0, image_size={size}, crop_size=None).prepare()
onnx.save(module_graph(model.extractor_, model.preprocessing_.output_size), sys.argv[1])
json.dump({{"preprocessing": model.preprocessing_.to_dict()}}, open(sys.argv[2], "w"))
"""


def update(state: dict, x: np.ndarray, flat: np.ndarray) -> None:
    """Chan's merge of a batch (B, P, D) into count, mean (P, D) and packed scatter (P, D(D+1)/2), float64."""
    batch, positions, _ = x.shape
    batch_mean = x.mean(axis=0)
    centred = x - batch_mean
    n_old = state["count"]
    n_new = n_old + batch
    delta = batch_mean.astype(np.float64) - state["mean"]
    weight = n_old * batch / n_new
    for start in range(0, positions, POSITIONS_PER_BLOCK):
        part = np.ascontiguousarray(centred[:, start:start + POSITIONS_PER_BLOCK].transpose(1, 0, 2))
        block = np.matmul(part.transpose(0, 2, 1), part)
        if n_old:
            d = delta[start:start + POSITIONS_PER_BLOCK].astype(np.float32)
            block += weight * d[:, :, None] * d[:, None, :]
        state["scatter"][start:start + POSITIONS_PER_BLOCK] += np.take(block.reshape(len(part), -1), flat, axis=1)
    state["mean"] += delta * (batch / n_new)
    state["count"] = n_new


def factor_in_place(state: dict, dim: int) -> np.ndarray:
    """W = L⁻¹ (Σ = M/(N−1) + εI = L Lᵀ) per position, float32, written over the packed float64 scatter."""
    from scipy.linalg import lapack

    scatter = state["scatter"]
    positions = scatter.shape[0]
    factor = scatter.reshape(-1).view(np.float32)[: positions * dim * dim].reshape(positions, dim, dim)
    rows, cols = np.tril_indices(dim)
    cov = np.empty((dim, dim))
    for p in range(positions):  # row p of the factor overwrites only packed rows ≤ p (4·D² < 8·D(D+1)/2 bytes)
        cov[rows, cols] = scatter[p] / (state["count"] - 1)
        cov[cols, rows] = cov[rows, cols]
        cov[np.diag_indices(dim)] += EPSILON
        chol, info = lapack.dpotrf(cov, lower=1, clean=1)
        inverse, info2 = lapack.dtrtri(chol, lower=1)
        if info or info2:
            raise SystemExit(f"position {p}: factorisation failed ({info}, {info2})")
        factor[p] = inverse
    return factor


def main() -> None:
    parser = bench_parser(__doc__)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="fastpadim-torch-free-"))
    graph, info = folder / "embedder.onnx", folder / "model.json"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", TRACE.format(size=args.size), str(graph), str(info)], check=True,
                   stderr=subprocess.DEVNULL)
    print(f"trace (child process with torch): {time.perf_counter() - start:.1f} s")

    import onnxruntime as ort

    from fastpadim.images import Preprocessing, open_image

    meta = json.loads(info.read_text())
    pre = Preprocessing.from_dict(meta["preprocessing"])
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    files = train_files(args.data)
    start = time.perf_counter()
    state, buffer, filled = None, None, 0
    for first in range(0, len(files), PER_CALL):
        batch = np.stack([pre.normalize_array(np.asarray(pre.geometry(open_image(path))))
                          for path in files[first:first + PER_CALL]])
        embeddings = session.run(None, {"images": batch})[0]
        if state is None:
            _, positions, dim = embeddings.shape
            rows, cols = np.tril_indices(dim)
            flat = rows * dim + cols
            state = {"count": 0, "mean": np.zeros((positions, dim)), "scatter": np.zeros((positions, flat.size))}
            buffer = np.empty((PER_UPDATE, positions, dim), np.float32)
        buffer[filled:filled + len(embeddings)] = embeddings
        filled += len(embeddings)
        if filled + PER_CALL > PER_UPDATE or first + PER_CALL >= len(files):
            update(state, buffer[:filled], flat)
            filled = 0
    print(f"statistics of {state['count']} images: {time.perf_counter() - start:.1f} s, peak RSS so far "
          f"{peak_rss_mb():.0f} MB")
    del buffer
    start = time.perf_counter()
    factor = factor_in_place(state, dim)
    print(f"factorisation of {factor.shape[0]} positions (SciPy, one thread): {time.perf_counter() - start:.1f} s")
    print(f"peak RSS of the whole fit: {peak_rss_mb():.0f} MB; torch imported: {'torch' in sys.modules}")
    if "torch" in sys.modules:
        raise SystemExit("torch was imported: the measurement does not hold")


if __name__ == "__main__":
    main()
