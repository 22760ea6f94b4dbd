"""Fit and score on a Ray cluster (or an embedded local Ray).

Fit: the items are cut into contiguous shards; one Ray task per shard builds the backbone once, streams its
shard through ``Padim.accumulate`` and returns its ``GaussianStats``; the driver merges them in shard order
with ``GaussianStats.merge`` (fetching one at a time, so it never holds every worker's copy) and factors
once. A shard is deterministic, so a task that Ray retries after its worker died returns the same
statistics, and the model equals a fault-free run. The threshold is set as in one process: by default from
the out-of-fold scores, computed on the driver from the merged statistics (one more pass over the images:
``Padim.leave_one_out_scores`` for ``folds="all"``, ``Padim.out_of_fold_scores`` for k folds, each fold's model
the merged statistics without the fold's), so the folds, their models and the threshold are the local fit's; hold-out or threshold images are scored on the cluster.

Predict: Ray Data ``map_batches`` over the items with a pool of scoring actors (one model each); the driver
writes the rows to Parquet part files as they arrive, so a re-run skips what was already scored.
"""

from __future__ import annotations

import hashlib
import math
import logging
import os
import warnings
import tempfile
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from .calibration import Calibration
from .errors import FastpadimError
from .files import atomic_write, make_output_folder, output_name
from .gaussian import GaussianStats
from .model import Padim, history_entry
from .results import verdict_label
from .sources import Item, Skipped
from . import sources

RAY_INSTALL_HINT = "--ray needs Ray: pip install 'fastpadim[ray]'"
FAULT_MARKER_ENV = "FASTPADIM_FAULT_MARKER"  # tests: the first task to see this file missing creates it and dies
MAX_RETRIES = 3
POLL_S = 0.5
MIN_SHARD = 8  # images per fit shard at least
SCORES_DIR = "scores"  # Parquet part files; maps/ beside it, so the folder reads as one table
PREDICT_CHUNK = 256  # items per scoring call: one decode pass per run of frames of a video


def require_ray():
    try:
        import ray
    except ImportError:
        raise FastpadimError(RAY_INSTALL_HINT) from None
    return ray


def connect(target: str = "local") -> int:
    """Start or join Ray; returns how many CPUs it offers. ``local[:N]`` embeds one, ``auto``/ADDRESS join one."""
    ray = require_ray()
    if ray.is_initialized():
        return int(ray.cluster_resources().get("CPU", 1))
    kwargs = {"include_dashboard": False, "log_to_driver": True, "configure_logging": True, "logging_level": "warning"}
    if target == "local" or target.startswith("local:"):
        n = target.partition(":")[2]
        if n and (not n.isdigit() or int(n) < 1):
            raise FastpadimError(f"--ray local:N takes a positive number of workers, got {target!r}")
        ray.init(num_cpus=int(n) if n else os.cpu_count(), **kwargs)
    else:
        try:
            ray.init(address=target, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise FastpadimError(f"cannot join the Ray cluster at {target!r}: {str(exc).splitlines()[0]}") from None
    return int(ray.cluster_resources().get("CPU", 1))


def model_params(model: Padim) -> dict:
    """The constructor arguments of ``model``, to rebuild the same estimator in a worker."""
    params = model.get_params()
    if params["weights"] not in (None, "random") and Path(params["weights"]).exists():
        params["weights"] = str(Path(params["weights"]).resolve())  # workers need not share our working folder
    return params


def _worker_model(params: dict, channel_indices: torch.Tensor) -> Padim:
    return Padim(**params).prepare(channel_indices)  # loads the backbone once per task


def _crash_if_asked() -> None:
    marker = os.environ.get(FAULT_MARKER_ENV)
    if not marker:
        return
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os._exit(17)  # the worker process dies mid-shard, as on a lost node


def fit_shard(params: dict, channel_indices: torch.Tensor, items: list[Item], shard: int, progress=None) -> dict:
    """Statistics of one shard: count, mean, packed scatter (numpy, for zero-copy transfer), skipped."""
    model = _worker_model(params, channel_indices)
    skipped: Skipped = []
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress.report.remote(shard, done)
        _crash_if_asked()

    # a shard may hold fewer than two readable images: its partial statistics still merge exactly
    stats = model.accumulate(sources.inputs(items, skipped), advance).stats_
    return {
        "count": stats.count if stats is not None else 0,
        "mean": stats.mean.cpu().numpy() if stats is not None else None,
        "scatter": stats.scatter.cpu().numpy() if stats is not None else None,
        "skipped": skipped + model.skipped_,
    }


def score_shard(params: dict, channel_indices: torch.Tensor, factors: dict, items: list[Item], shard: int,
                progress=None) -> tuple[list[tuple[str, float]], Skipped]:
    """Image scores of one shard with the given mean and whitener (for the hold-out threshold)."""
    model = _worker_model(params, channel_indices)
    model.install(torch.as_tensor(np.array(factors["mean"])), torch.as_tensor(np.array(factors["whitener"])),
                  factors["count"])
    skipped: Skipped = []
    names: list[str] = []
    scores, done = [], 0
    for batch in model.iter_scored(sources.inputs(items, skipped, names)):
        for r in batch:
            if r.error:
                skipped.append((names[r.index], r.error))
            else:
                scores.append((names[r.index], r.score))
        done += len(batch)
        if progress is not None:
            progress.report.remote(shard, done)
    return scores, skipped


def _stats_of(result: dict) -> GaussianStats | None:
    if not result["count"]:
        return None
    # Arrays from the object store are read-only views; merge() only reads them and builds new tensors.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return GaussianStats(result["count"], torch.from_numpy(result["mean"]), torch.from_numpy(result["scatter"]))


def shard_bounds(n_items: int, n_shards: int) -> list[tuple[int, int]]:
    """Contiguous, near-equal [start, stop) ranges: frames of one video stay together for one decode pass."""
    n_shards = max(1, min(n_shards, n_items))
    edges = np.linspace(0, n_items, n_shards + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


class _RayRunner:
    """Submits one task per shard and follows their progress through a small counter actor."""

    def __init__(self, ray, cpus_per_task: float, task_options: dict | None):
        self.ray = ray
        self.options = {"num_cpus": cpus_per_task, "max_retries": MAX_RETRIES, **(task_options or {})}

        @ray.remote(num_cpus=0)
        class ProgressCounter:
            def __init__(self):
                self.done: dict[int, int] = {}

            def report(self, shard: int, n: int) -> None:
                self.done[shard] = n  # absolute per shard: a retried shard starts again from zero

            def total(self) -> int:
                return sum(self.done.values())

        self.counter_cls = ProgressCounter

    def run(self, fn, shard_args: list[tuple], progress: Callable[[int], None] | None, on_result: Callable[[int, object], None]):
        """Run ``fn(*args, shard, counter)`` per shard; ``on_result`` gets results one at a time, in shard order."""
        ray = self.ray
        counter = self.counter_cls.remote()
        task = ray.remote(fn).options(**self.options)
        refs = [task.remote(*args, i, counter) for i, args in enumerate(shard_args)]
        shown = 0
        try:
            for i, ref in enumerate(refs):
                while True:
                    ready, _ = ray.wait([ref], timeout=POLL_S)
                    if progress is not None:
                        total = ray.get(counter.total.remote())
                        if total > shown:  # monotone even when a retried shard restarts its count
                            progress(total - shown)
                            shown = total
                    if ready:
                        break
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:
                    cause = getattr(exc, "cause", None)
                    if isinstance(cause, FastpadimError):
                        raise FastpadimError(str(cause)) from None
                    raise FastpadimError(f"shard {i} failed on the cluster: {str(exc).splitlines()[0]}") from None
                except ray.exceptions.RayError as exc:
                    raise FastpadimError(f"shard {i} failed on the cluster after {MAX_RETRIES} retries: "
                                         f"{str(exc).splitlines()[0]}") from None
                refs[i] = ref = None  # drop our references so the object store can free it
                on_result(i, result)
                del result
        finally:
            for ref in refs:
                if ref is not None:
                    ray.cancel(ref, force=True)
            ray.kill(counter)


def fit_on_ray(model: Padim, images: Sequence[Item], threshold_images: Sequence[Item] | None = None,
               progress: Callable[[int], None] | None = None, shards: int | None = None,
               cpus_per_task: float = 1, task_options: dict | None = None) -> Padim:
    """``model.fit`` on the connected Ray cluster: same statistics, one factorisation, the same threshold (the
    same out-of-fold scores, hold-out split or threshold images)."""
    ray = require_ray()
    if not ray.is_initialized():
        connect("local")
    model.prepare()  # on the driver too: fails early on bad weights, draws the channel subset once
    images = list(images)
    method = "good images"
    if threshold_images is None and model.holdout > 0:
        images, threshold_images = model.holdout_split(images)
        method = "hold-out"
    # One shard per worker slot, but none so small that loading the backbone outweighs its images.
    slots = max(1, int(ray.cluster_resources().get("CPU", 1) // cpus_per_task))
    n_shards = shards or max(1, min(slots, -(-len(images) // MIN_SHARD)))
    params = model_params(model)
    runner = _RayRunner(ray, cpus_per_task, task_options)
    channels = model.channel_indices_.cpu()

    merged: dict = {"stats": None}

    def merge(_i, result):
        model.skipped_.extend(result["skipped"])
        part = _stats_of(result)
        if part is not None:
            # The first part is copied out of the object store (merge() always returns new tensors).
            merged["stats"] = (merged["stats"] or GaussianStats.empty(*part.mean.shape)).merge(part)

    bounds = shard_bounds(len(images), n_shards)
    runner.run(fit_shard, [(params, channels, images[a:b]) for a, b in bounds], progress, merge)
    # On the model's device (as a local fit's), and held by the model alone, so that finish frees the float64
    # statistics once it has compacted them.
    stats = merged.pop("stats")
    model.stats_ = None if stats is None else GaussianStats(stats.count, stats.mean.to(model.device_),
                                                            stats.scatter.to(model.device_))
    del stats
    count = model.stats_.count // model.samples_per_image if model.stats_ is not None else 0
    out_of_fold = threshold_images is None and model.folds != 0 and count >= 2
    # the inputs as the local fit sees them (frames that do not decode left out), so the folds are its folds; the
    # shards reported the skipped ones already
    fold_scores = None
    if out_of_fold:
        fold_scores = model.finish_out_of_fold(sources.Rereadable(images, []), progress)
    else:
        model.finish()
    # the shards saw the pixels; the driver records the inputs by name (a local fit digests the pixels)
    names = hashlib.sha256("\n".join(item.name for item in images).encode())
    model.history_ = [history_entry(model.n_samples_seen_, names.hexdigest(), "names-sha256")]
    if fold_scores is not None:
        model.calibrate(Calibration(fold_scores, "out-of-fold", model.folds))
    elif threshold_images:
        threshold_images = list(threshold_images)
        factors = ray.put({"mean": model.mean_.cpu().numpy(), "whitener": model.whitener_.cpu().numpy(),
                           "count": model.n_samples_seen_})
        scores: list[float] = []

        def collect(_i, result):
            shard_scores, skipped = result
            scores.extend(s for _name, s in shard_scores)
            model.skipped_.extend(skipped)

        bounds = shard_bounds(len(threshold_images), n_shards)
        runner.run(score_shard, [(params, channels, factors, threshold_images[a:b]) for a, b in bounds],
                   progress, collect)
        if not scores:
            raise FastpadimError("no readable good images to set the threshold from")
        model.set_threshold_from_scores(scores, model.false_alarm_rate, method)
    return model


# ------------------------------------------------------------------------------------------- predict
class Scorer:
    """A Ray Data actor: loads the model once, scores chunks of items, writes maps if asked."""

    def __init__(self, model_bytes, maps_dir: str | None, root: str, threshold: float | None):
        if isinstance(model_bytes, list):  # [ObjectRef]: nested, so Ray leaves it for us to fetch
            model_bytes = require_ray().get(model_bytes[0])
        with tempfile.NamedTemporaryFile(suffix=".padim") as handle:
            handle.write(model_bytes)
            handle.flush()
            self.model = Padim.load(handle.name, device="auto")
        if threshold is not None:
            self.model.threshold_ = threshold
        self.maps_dir = Path(maps_dir) if maps_dir else None
        self.root = root

    def __call__(self, batch: dict) -> dict:


        items = [Item(str(p), None if f < 0 else int(f)) for p, f in zip(batch["path"], batch["frame"])]
        skipped: Skipped = []
        names: list[str] = []
        rows = {"name": [], "score": [], "normalized": [], "false_alarm_probability": [], "verdict": [], "map": [],
                "error": []}

        def add(name, score=float("nan"), verdict="", map_path="", error="", normalized=None, probability=None):
            values = (name, score, math.nan if normalized is None else normalized,
                      math.nan if probability is None else probability, verdict, map_path, error)
            for key, value in zip(rows, values):
                rows[key].append(value)

        threshold = self.model.threshold_
        for scored in self.model.iter_scored(sources.inputs(items, skipped, names)):
            for r in scored:
                name = names[r.index]
                if r.error:
                    add(name, verdict="error", error=r.error)
                    continue
                verdict = verdict_label(r.score, threshold)
                map_path = ""
                if self.maps_dir is not None:
                    target = self.maps_dir / output_name(_relative(name, self.root), ".npy")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    atomic_write(target, lambda tmp, m=r.anomaly_map: _save_npy(tmp, m))
                    map_path = str(target)
                add(name, float(r.score), verdict, map_path, normalized=r.normalized,
                    probability=r.false_alarm_probability)
        for name, reason in skipped:
            add(name, verdict="error", error=reason)
        numbers = ("score", "normalized", "false_alarm_probability")
        return {key: np.array(values, dtype=np.float64 if key in numbers else str) for key, values in rows.items()}


def _save_npy(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as handle:  # np.save on a name would append .npy to the temporary file's
        np.save(handle, array)


def _relative(name: str, root: str) -> str:
    """The input's place under ``root`` (the common folder of all inputs; links not resolved, so two inputs never
    share a name), a frame keeping its mark."""
    path, mark, frame = name.partition(sources.FRAME_MARK)
    return os.path.relpath(os.path.abspath(path), root) + (f"{mark}{frame}" if mark else "")


def scored_names(output: Path) -> set[str]:
    """Names already in the Parquet part files of ``output/scores`` (what a re-run skips)."""
    import pyarrow.parquet as pq

    done: set[str] = set()
    for part in sorted((output / SCORES_DIR).glob("part-*.parquet")):
        done.update(pq.read_table(part, columns=["name"]).column("name").to_pylist())
    return done


def predict_on_ray(model_path: Path, items: Sequence[Item], output: Path, ray_target: str = "local",
                   maps: bool = False, threshold: float | None = None, root: Path | None = None,
                   progress: Callable[[int], None] | None = None, workers: int | None = None,
                   cpus_per_task: float = 1) -> dict:
    """Score ``items`` with Ray Data into ``output/scores/part-*.parquet`` (maps in ``output/maps``);
    returns counts: scored, anomalous, errors (unreadable), already (in the output before)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .modelfile import read_model_file

    ray = require_ray()
    read_model_file(model_path)  # one clear line for a bad model file, before anything starts
    make_output_folder(output / SCORES_DIR)
    done = scored_names(output)
    todo = [item for item in items if item.name not in done]
    counts = {"scored": 0, "anomalous": 0, "errors": 0, "already": len(items) - len(todo)}
    if not todo:
        return counts
    cpus = connect(ray_target)
    import ray.data

    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its notices would interleave with our progress line
    ray.data.DataContext.get_current().enable_progress_bars = False
    concurrency = workers or max(1, int(cpus // cpus_per_task))
    model_ref = ray.put(Path(model_path).read_bytes())
    # Blocks of at most PREDICT_CHUNK items, and at least one per actor so every worker gets some.
    chunk = max(1, min(PREDICT_CHUNK, -(-len(todo) // concurrency)))
    ds = ray.data.from_items([{"path": i.path, "frame": -1 if i.frame is None else i.frame} for i in todo],
                             override_num_blocks=-(-len(todo) // chunk))
    scored = ds.map_batches(
        Scorer, batch_size=chunk, compute=ray.data.ActorPoolStrategy(size=concurrency), num_cpus=cpus_per_task,
        fn_constructor_args=([model_ref], str(output / "maps") if maps else None, str(root or Path.cwd()), threshold),
    )
    run = uuid.uuid4().hex[:8]
    for n, batch in enumerate(scored.iter_batches(batch_size=None, batch_format="numpy")):
        failed = np.array([bool(e) for e in batch["error"].tolist()], dtype=bool)
        table = pa.table({
            "name": pa.array(batch["name"].tolist(), pa.string()),
            "score": pa.array(batch["score"], pa.float64(), mask=failed),
            # null without a threshold (normalized) or a calibration (false_alarm_probability)
            "normalized": pa.array(batch["normalized"], pa.float64(), mask=np.isnan(batch["normalized"])),
            "false_alarm_probability": pa.array(batch["false_alarm_probability"], pa.float64(),
                                                mask=np.isnan(batch["false_alarm_probability"])),
            "verdict": pa.array(batch["verdict"].tolist(), pa.string()),
            "map": pa.array([m or None for m in batch["map"].tolist()], pa.string()),
            "error": pa.array([e or None for e in batch["error"].tolist()], pa.string()),
        })
        atomic_write(output / SCORES_DIR / f"part-{run}-{n:06d}.parquet", lambda tmp, t=table: pq.write_table(t, tmp))
        errors = int(failed.sum())
        counts["errors"] += errors
        counts["scored"] += len(batch["name"]) - errors
        counts["anomalous"] += sum(v == "anomalous" for v in batch["verdict"].tolist())
        if progress is not None:
            progress(len(batch["name"]))
    return counts
