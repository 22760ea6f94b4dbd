"""The memory plan of a fit: what the Gaussian state, the factor and the model file will take, computed before any
image is read, and a one-line refusal (naming what to change) when the fit would not fit the machine's memory.

``plan_memory`` is arithmetic on the shapes only (no network); ``plan_for`` builds the model (``Padim.prepare``)
to learn its grid and channel count, and measures the process it runs in as the baseline.

What a fit on the CPU holds, phase by phase (the terms of ``MemoryPlan``; ``docs/performance.md``, "Planning
memory", compares the estimate with measured peaks). S is the float64 statistics (mean (P, D), packed scatter
(P, D(D+1)/2)), W the factor (P, D, D) in its dtype:

- accumulate: S, the embedding buffer (``gaussian.UPDATE_BUFFER_BYTES``), the update's per-chunk temporaries, the
  network's activations for one forward part and the decoded input batches;
- out-of-fold (k ≥ 2 ``folds``, no hold-out or threshold images): S and one fold's statistics, a second S, which
  becomes the other folds' statistics and then their factor in place (``GaussianStats.without``,
  ``whitener(consume=True)``), plus the fold's cached embeddings (``model.FOLD_CACHE_BYTES`` at most) and the
  largest of its forward part, the factorisation's ring of covariance chunks and its scoring;
- finish: S and its compacted copy (float32 scatter, S/2), then S/2 with a new W and the ring (a half-precision
  factor is multiplied as a float32 copy on the CPU: P·D·D·4 bytes more);
- threshold (leave-one-out ``folds="all"``, a hold-out or threshold images): S/2, W (and its copy) plus one
  scoring batch.

The model file holds the compacted statistics and no factor (loading computes it: S/2, W and the ring).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import FastpadimError
from .sizes import CPU_FORWARD_IMAGES, FORWARD_PIXELS, Size, as_size, format_size  # noqa: F401 - the engine's own

if TYPE_CHECKING:
    from .model import Padim

FACTOR_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# The process before any image: torch, timm/torchvision and the network (measured 0.75-0.9 GB for Lite0 here).
# ``plan_for`` measures the process instead; this is the default of the shape-only ``plan_memory``.
RUNTIME_BYTES = 800 * 10**6
# Live activations of one forward part, as a multiple of its input tensor's bytes (calibrated on
# EfficientNet-Lite0 at 256 px: a 32-96 channel map at half resolution and its neighbours).
ACTIVATION_FACTOR = 14
# Freed temporaries below glibc's mmap threshold (32 MiB at most) stay in the heap: measured, a fit's peak RSS is
# that much above its live tensors (docs/performance.md, "Planning memory").
ALLOCATOR_SLACK = 64 * 1024 * 1024
SAFETY_MARGIN = 0.10  # share of the available memory the plan leaves free (the OS, other processes, estimate error)
# Kept in step with gaussian.UPDATE_BUFFER_BYTES, model.FOLD_CACHE_BYTES and gaussian's chunk sizes (checked by the
# tests, so the plan does not import torch for arithmetic).
UPDATE_BUFFER_BYTES = 192 * 1024 * 1024
FOLD_CACHE_BYTES = 512 * 1024 * 1024  # a fold's embeddings kept for its scoring (model.FOLD_CACHE_BYTES)
CHUNK_ELEMENTS = 4 * 1024 * 1024
FACTOR_CHUNK_CAP = 64  # positions per factorisation chunk on the CPU (gaussian.FACTOR_CHUNK_CAP)
FILE_HEADER_BYTES = 4096  # safetensors header with the JSON metadata (about 1-2 KB), rounded up


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n < 10e9 else f"{n / 1e9:.1f} GB"


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes a fit will take, from the shapes alone. ``peak`` includes ``baseline`` (the process before any image);
    ``available`` is what the machine had free when planned (None: unknown, never refused)."""

    grid: tuple[int, int]
    dim: int
    factor_dtype: str
    folds: int | str  # the out-of-fold threshold's folds: k ≥ 2, "all" (leave-one-out), 0 (none, or set otherwise)
    image_size: Size  # the network's input (height, width); with tiles, the frame they are cut from
    batch_size: int
    device: str
    threads: int
    statistics: int  # float64 mean + packed scatter (S)
    compacted: int  # the statistics as the model keeps and stores them: float64 mean, float32 packed scatter
    factor: int  # (P, D, D) in factor_dtype
    compute_copy: int  # float32 copy of a half-precision factor for scoring on the CPU
    embedding_buffer: int
    fold_cache: int  # one fold's embeddings kept for its scoring (out-of-fold pass)
    working: int  # per-chunk temporaries, activations, input batches (the largest phase's share)
    model_file: int
    baseline: int
    peak: int
    phase: str  # the phase that sets the peak
    images: int | None = None  # training images, when known (they size the fold cache)
    available: int | None = None
    n_positions: int | None = None  # Gaussians, when not one per grid cell (tiles)
    limit: int | None = None  # the most peak memory the user allows the fit (--max-memory)

    @property
    def positions(self) -> int:
        return self.n_positions or self.grid[0] * self.grid[1]

    @property
    def shape(self) -> str:
        """The positions in words: the grid, and the Gaussians' count when tiles make it another number."""
        grid = f"{self.grid[0]}x{self.grid[1]} positions"
        return grid if self.n_positions is None else f"{grid} ({self.n_positions} Gaussians over tiles)"

    @property
    def need(self) -> int:
        """Memory the fit will take beyond what the process holds already."""
        return max(0, self.peak - self.baseline)

    @property
    def fits(self) -> bool:
        within_limit = self.limit is None or self.peak <= self.limit
        return within_limit and (self.available is None or self.need <= self.available * (1 - SAFETY_MARGIN))

    def describe(self) -> str:
        """One line: the plan and the machine's memory."""
        where = "GPU memory" if self.device == "cuda" else "memory"
        available = f"{_gb(self.available)} {where} available" if self.available is not None else f"{where} available unknown"
        phase = f"{self.phase}, {self.folds} folds" if self.phase == "out-of-fold" else self.phase
        return (f"plan: {self.shape} x {self.dim} channels: statistics {_gb(self.statistics)}, "
                f"factor {_gb(self.factor)} ({self.factor_dtype}), model file {_gb(self.model_file)}, "
                f"fit peak about {_gb(self.peak)} ({_gb(self.baseline)} runtime + {_gb(self.need)}, at {phase}) "
                f"of {available}" + (f" (limit {_gb(self.limit)})" if self.limit is not None else ""))


def plan_memory(positions: int | tuple[int, int], dim: int, factor_dtype: str = "float32", folds: int | str = "all",
                *, images: int | None = None, image_size: int | Size = 256, batch_size: int = 32,
                device: str = "cpu", threads: int | None = None, baseline: int = RUNTIME_BYTES,
                available: int | None = None, n_positions: int | None = None, limit: int | None = None,
                forward_pixels: int | None = None) -> MemoryPlan:
    """The memory plan of a fit on ``positions`` (P or the grid (h, w)) × ``dim`` (D) channels, from shapes only.

    ``folds`` is the out-of-fold threshold's: k ≥ 2 exact fold models (a pass with two float64 statistics), "all"
    (leave-one-out in closed form: a scoring pass after the fit) or 0 (none, as with a hold-out or threshold
    images, whose scoring pass is planned all the same), ``images`` the
    training images when known (a fold's cached embeddings are sized from them; unknown: the cache's bound),
    ``image_size`` the network's input (side or (height, width), after any crop), ``threads`` the CPU threads
    of the factorisation (default: ``os.cpu_count()``), ``available`` the free memory to check against;
    ``n_positions`` the Gaussians when tiles make them another number than the grid's cells, ``forward_pixels``
    the input pixels of one network call (default: CPU_FORWARD_IMAGES inputs of 256x256 at most)."""
    if factor_dtype not in FACTOR_BYTES:
        raise FastpadimError(f"factor dtype must be one of {', '.join(FACTOR_BYTES)}, got {factor_dtype!r}")
    grid = tuple(positions) if isinstance(positions, (tuple, list)) else (int(positions), 1)
    p, d = n_positions or grid[0] * grid[1], int(dim)
    image_size = as_size(image_size)
    pixels = image_size[0] * image_size[1]
    if p < 1 or d < 1:
        raise FastpadimError(f"a plan needs at least one position and one channel, got {p} x {d}")
    folds = folds if folds == "all" or folds >= 2 else 0
    kfold = folds if folds != "all" else 0  # the folds of a pass with their own statistics
    threads = threads or os.cpu_count() or 1
    tri = d * (d + 1) // 2
    statistics = 8 * p * d + 8 * p * tri
    compacted = 8 * p * d + 4 * p * tri  # GaussianStats.compacted: the mean stays float64 for exact merges
    factor = FACTOR_BYTES[factor_dtype] * p * d * d
    mean32 = 4 * p * d
    cpu = device != "cuda"
    compute_copy = 4 * p * d * d if cpu and factor_dtype != "float32" else 0

    # accumulate: statistics + buffer + update temporaries + one forward part + input batches
    per_image = 4 * max(p, grid[0] * grid[1]) * d
    # one network call on the CPU: as many pixels as CPU_FORWARD_IMAGES inputs of 256x256 (model._forward_count)
    budget = forward_pixels or FORWARD_PIXELS
    part = max(1, min(batch_size, budget // pixels)) if cpu else batch_size

    step = min(p, max(1, CHUNK_ELEMENTS // (d * d)))  # positions per chunk of an update (gaussian._chunk_step)

    def update_work(samples: int) -> int:
        """GaussianStats.update's temporaries for ``samples`` embeddings: per-chunk blocks and (P, D) vectors."""
        return step * (4 * samples * d + 4 * d * d + 4 * tri + 8 * tri) + 3 * 8 * p * d

    capacity = max(part, UPDATE_BUFFER_BYTES // per_image)
    buffer = capacity * per_image
    image_bytes = 3 * pixels * 4
    activations = (min(budget, part * pixels) if cpu else part * pixels) * 3 * 4 * ACTIVATION_FACTOR
    forward = 3 * part * per_image + activations
    inputs = 3 * batch_size * image_bytes
    accumulate_work = update_work(capacity) + forward + inputs
    accumulate = statistics + buffer + accumulate_work

    # the factorisation: the ring of float64 covariance chunks and per-thread results
    chunk = min(p, max(1, min(CHUNK_ELEMENTS // (d * d), FACTOR_CHUNK_CAP)))
    factor_work = ((2 * threads + 1) * chunk * d * d * 8 + threads * chunk * d * d * (16 + FACTOR_BYTES[factor_dtype])
                   if cpu else chunk * d * d * 8 * 3)
    # scoring runs part by part on the CPU too (model.run_batch); the batch's maps are gathered
    scoring_work = 4 * part * per_image + inputs + activations + 2 * batch_size * pixels * 4

    # out-of-fold: S + the fold's S (its statistics, then the rest's, then the rest's factor in that memory) + the
    # fold's cached embeddings + the largest of its forward (with the centred copy an update makes), the rest's
    # mean and factorisation, and its scoring against a float32 copy of a half-precision factor. ``without``'s
    # per-chunk products (three (step, D(D+1)/2) float64 blocks) are freed before the factorisation, but below
    # glibc's mmap threshold (32 MiB at most) the heap keeps them: measured, they stay in the peak.
    fold_images = math.ceil(images / kfold) if kfold and images else None
    fold_cache = (min(FOLD_CACHE_BYTES + part * per_image, fold_images * per_image if fold_images else math.inf)
                  if kfold else 0)
    without_work = 3 * step * tri * 8 + 2 * 8 * p * d
    fold_work = without_work + max(update_work(part) + part * per_image + forward + inputs,
                                   mean32 + factor_work,
                                   mean32 + compute_copy + scoring_work)
    out_of_fold = 2 * statistics + fold_cache + fold_work

    # finish: S and its compacted copy; then the compacted statistics, the new factor and the ring (or the copy);
    # each chunk of the float32 scatter is widened to float64 before it is unpacked
    finish_work = mean32 + max(factor_work + chunk * tri * 8, compute_copy)
    finish = max(statistics + compacted + mean32, compacted + factor + finish_work)

    # threshold (leave-one-out, a hold-out or threshold images: one scoring pass with the fitted model) and save,
    # which writes from the tensors' memory
    threshold = compacted + factor + mean32 + compute_copy + (0 if kfold else scoring_work)

    phases = {"accumulate": (accumulate, accumulate_work), "finish": (finish, finish_work),
              "threshold": (threshold, 0 if kfold else scoring_work)}
    if kfold:
        phases["out-of-fold"] = (out_of_fold, fold_cache + fold_work)
    phases = {name: (total + ALLOCATOR_SLACK, work) for name, (total, work) in phases.items()}
    phase = max(phases, key=lambda name: phases[name][0])
    model_file = mean32 + 4 * p * tri + 8 * d + FILE_HEADER_BYTES
    return MemoryPlan(
        grid=grid, dim=d, factor_dtype=factor_dtype, folds=folds, image_size=image_size, batch_size=batch_size,
        device="cuda" if not cpu else "cpu", threads=threads, statistics=statistics, compacted=compacted,
        factor=factor, compute_copy=compute_copy, embedding_buffer=buffer, fold_cache=fold_cache,
        working=phases[phase][1], model_file=model_file,
        baseline=baseline if cpu else 0, peak=(baseline if cpu else 0) + phases[phase][0], phase=phase,
        images=images, available=available, limit=limit,
        n_positions=n_positions if n_positions and n_positions != grid[0] * grid[1] else None,
    )


# ------------------------------------------------------------------------------------------------ the machine
def available_memory() -> int | None:
    """Bytes this process may still take: /proc/meminfo's MemAvailable, lowered to a cgroup v2 limit's headroom;
    None where neither can be read (the plan is then printed but never refuses)."""
    found = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            current = int(f.read().strip())
        if limit != "max":
            headroom = max(0, int(limit) - current)
            found = headroom if found is None else min(found, headroom)
    except (OSError, ValueError):
        pass
    return found


def process_memory() -> int | None:
    """This process's resident memory now (VmRSS), or None where /proc is absent."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def gpu_available(device) -> int | None:
    import torch

    try:
        return int(torch.cuda.mem_get_info(device)[0])
    except (RuntimeError, AssertionError):
        return None


# ------------------------------------------------------------------------------------------------ a model's plan
def plan_for(model: Padim, available: int | None = None, limit: int | None = None, images: int | None = None,
             folds: int | None = None) -> MemoryPlan:
    """The plan of ``model.fit`` with its parameters: builds the network (``prepare``) to learn the grid and D,
    measures this process as the baseline, and checks the machine's available memory (or ``available``).
    ``images``: the training images, when known; ``folds``: the out-of-fold threshold's (default: the model's,
    none with a hold-out; pass 0 when threshold images are given)."""
    import torch

    model.prepare()
    device = "cuda" if model.device_.type == "cuda" else "cpu"
    if available is None:
        available = gpu_available(model.device_) if device == "cuda" else available_memory()
    if folds is None:
        folds = model.folds if not model.holdout else 0
    return plan_memory(
        tuple(model.grid_), int(model.channel_indices_.numel()), model.factor_dtype, folds, images=images,
        image_size=model.preprocessing_.output_size, batch_size=model.batch_size, device=device,
        threads=torch.get_num_threads(), baseline=process_memory() or RUNTIME_BYTES, available=available, limit=limit,
        n_positions=model.positions_,
    )


def _scaled(plan: MemoryPlan, long_side: int) -> MemoryPlan:
    """The plan at a smaller input of the same shape: the grid scales with the input (the network's stride is
    fixed), and so do tiles' Gaussians."""
    height, width = plan.image_size
    scale = long_side / max(height, width)
    size = (max(32, round(height * scale)), max(32, round(width * scale)))
    stride = height / plan.grid[0]
    grid = (max(1, math.ceil(size[0] / stride)), max(1, math.ceil(size[1] / stride)))
    positions = None if plan.n_positions is None else math.ceil(plan.n_positions * grid[0] * grid[1] /
                                                                (plan.grid[0] * plan.grid[1]))
    return _again(plan, grid=grid, image_size=size, n_positions=positions)


def _pooled(plan: MemoryPlan, pool: int) -> MemoryPlan:
    grid = (max(1, plan.grid[0] // pool), max(1, plan.grid[1] // pool))
    positions = None if plan.n_positions is None else max(1, plan.n_positions // (pool * pool))
    return _again(plan, grid=grid, n_positions=positions)


def _again(plan: MemoryPlan, **changes) -> MemoryPlan:
    args = {"positions": plan.grid, "dim": plan.dim, "factor_dtype": plan.factor_dtype, "folds": plan.folds,
            "images": plan.images, "image_size": plan.image_size, "batch_size": plan.batch_size, "device": plan.device,
            "threads": plan.threads, "baseline": plan.baseline, "available": plan.available, "limit": plan.limit,
            "n_positions": plan.n_positions}
    if "grid" in changes:
        args["positions"] = changes.pop("grid")
    return plan_memory(**{**args, **changes})


def alternatives(plan: MemoryPlan, crop: bool = False) -> list[str]:
    """The changes that make the fit fit, each with its peak: fewer channels, a half-precision factor (only where
    it lowers the peak: on the CPU it is multiplied as float32), leave-one-out instead of k fold models (one
    float64 statistics less), a coarser grid, a smaller input."""
    levers = []
    if plan.folds not in (0, "all"):
        closed = _again(plan, folds="all")  # no fold statistics: one float64 statistics less
        if closed.peak < plan.peak and closed.fits:
            levers.append(f"a leave-one-out threshold in closed form (--folds all, or 0 for none: {_gb(closed.peak)})")
    low, high = 0, plan.dim - 1  # the most channels that fit (the peak grows with D)
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if _again(plan, dim=mid).fits else (low, mid - 1)
    if low >= 1:
        levers.append(f"fewer channels (--n-features {low}: {_gb(_again(plan, dim=low).peak)})")
    if plan.factor_dtype == "float32":
        half = _again(plan, factor_dtype="float16")
        if half.peak < plan.peak and half.fits:
            levers.append(f"a half-precision factor (--factor-dtype float16: {_gb(half.peak)})")
    for pool in (2, 4):
        pooled = _pooled(plan, pool)
        if pooled.fits:
            levers.append(f"a coarser grid (--pool {pool} on top of the current one: {pooled.grid[0]}x{pooled.grid[1]} "
                          f"positions, {_gb(pooled.peak)})")
            break
    option = "--crop-size" if crop else "--image-size"
    for side in range((max(plan.image_size) - 1) // 32 * 32, 31, -32):
        smaller = _scaled(plan, side)
        if smaller.fits:
            size = smaller.image_size
            shown = str(size[0]) if size[0] == size[1] else format_size(size)
            levers.append(f"a smaller input ({option} {shown}: {smaller.grid[0]}x{smaller.grid[1]} positions, "
                          f"{_gb(smaller.peak)})")
            break
    return levers


def check_plan(plan: MemoryPlan, crop: bool = False) -> MemoryPlan:
    """Refuse, in one line that says what to change, a plan whose fit would not fit the available memory."""
    if plan.fits:
        return plan
    levers = alternatives(plan, crop)
    change = "; or ".join(levers) if levers else "no smaller setting fits either: free memory or use a larger machine"
    where = "GPU memory" if plan.device == "cuda" else "memory"
    shape = f"{plan.shape} x {plan.dim} channels, {plan.factor_dtype} factor"
    what = f"({shape}; peak about {_gb(plan.peak)})"
    if plan.limit is not None and plan.peak > plan.limit:
        raise FastpadimError(f"this fit would peak at about {_gb(plan.peak)} ({shape}), above the --max-memory limit "
                             f"of {_gb(plan.limit)}; try {change}")
    raise FastpadimError(
        f"this fit needs about {_gb(plan.need)} more {where} {what}, but {_gb(plan.available)} is available "
        f"(keeping {SAFETY_MARGIN:.0%} free); try {change}"
    )
