"""The memory plan of a fit: what the Gaussian state, the factor and the model file will take, computed before any
image is read, and a one-line refusal (naming what to change) when the fit would not fit the machine's memory.

``plan_memory`` is arithmetic on the shapes only (no network); ``plan_for`` builds the model (``Padim.prepare``)
to learn its grid and channel count, and measures the process it runs in as the baseline.

What a fit on the CPU holds, phase by phase (the terms of ``MemoryPlan``; ``docs/performance.md``, "Planning
memory", compares the estimate with measured peaks):

- accumulate: the float64 statistics (mean (P, D), packed scatter (P, D(D+1)/2)), the embedding buffer
  (``model.UPDATE_BUFFER_BYTES``), the update's per-chunk temporaries, the network's activations for one forward
  part and the decoded input batches;
- finish: the statistics and the factor (P, D, D) in the factor's dtype, written into the scatter's memory
  without ``keep_stats`` (then no second allocation), a second array with it; plus the factorisation's ring of
  covariance chunks;
- threshold: what stays (factor, mean, statistics with ``keep_stats``; a half-precision factor is multiplied as a
  float32 copy on the CPU, so it adds P·D·D·4 bytes there) plus one scoring batch's embeddings and products.
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
SAFETY_MARGIN = 0.10  # share of the available memory the plan leaves free (the OS, other processes, estimate error)
# Kept in step with model.UPDATE_BUFFER_BYTES and gaussian's chunk sizes (checked by the
# tests, so the plan does not import torch for arithmetic).
UPDATE_BUFFER_BYTES = 192 * 1024 * 1024
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
    keep_stats: bool
    image_size: Size  # the network's input (height, width); with tiles, the frame they are cut from
    batch_size: int
    device: str
    threads: int
    statistics: int  # float64 mean + packed scatter
    factor: int  # (P, D, D) in factor_dtype
    factor_in_statistics: bool  # the factor overwrites the statistics' memory (keep_stats=False)
    compute_copy: int  # float32 copy of a half-precision factor for scoring on the CPU
    embedding_buffer: int
    working: int  # per-chunk temporaries, activations, input batches (the largest phase's share)
    model_file: int
    baseline: int
    peak: int
    phase: str  # the phase that sets the peak
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
        factor = f"factor {_gb(self.factor)} ({self.factor_dtype}"
        factor += ", in the statistics' memory)" if self.factor_in_statistics else ")"
        where = "GPU memory" if self.device == "cuda" else "memory"
        available = f"{_gb(self.available)} {where} available" if self.available is not None else f"{where} available unknown"
        return (f"plan: {self.shape} x {self.dim} channels: statistics {_gb(self.statistics)}, "
                f"{factor}, model file {_gb(self.model_file)}, fit peak about {_gb(self.peak)} "
                f"({_gb(self.baseline)} runtime + {_gb(self.need)}, at {self.phase}) of {available}"
                + (f" (limit {_gb(self.limit)})" if self.limit is not None else ""))


def plan_memory(positions: int | tuple[int, int], dim: int, factor_dtype: str = "float32", keep_stats: bool = False,
                *, image_size: int | Size = 256, batch_size: int = 32, device: str = "cpu", threads: int | None = None,
                baseline: int = RUNTIME_BYTES, available: int | None = None, n_positions: int | None = None,
                limit: int | None = None,
                forward_pixels: int | None = None) -> MemoryPlan:
    """The memory plan of a fit on ``positions`` (P or the grid (h, w)) × ``dim`` (D) channels, from shapes only.

    ``image_size`` is the network's input (side or (height, width), after any crop), ``threads`` the CPU threads
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
    threads = threads or os.cpu_count() or 1
    tri = d * (d + 1) // 2
    statistics = 8 * p * d + 8 * p * tri
    factor = FACTOR_BYTES[factor_dtype] * p * d * d
    mean32 = 4 * p * d
    cpu = device != "cuda"
    compute_copy = 4 * p * d * d if cpu and factor_dtype != "float32" else 0

    # accumulate: statistics + buffer + update temporaries + one forward part + input batches
    per_image = 4 * max(p, grid[0] * grid[1]) * d
    # one network call on the CPU: as many pixels as CPU_FORWARD_IMAGES inputs of 256x256 (model._forward_count)
    budget = forward_pixels or FORWARD_PIXELS
    part = max(1, min(batch_size, budget // pixels)) if cpu else batch_size
    capacity = max(part, UPDATE_BUFFER_BYTES // per_image)
    buffer = capacity * per_image
    step = min(p, max(1, CHUNK_ELEMENTS // (d * d)))
    update = step * (4 * capacity * d + 4 * d * d + 4 * tri + 8 * tri) + 3 * 8 * p * d
    image_bytes = 3 * pixels * 4
    activations = (min(budget, part * pixels) if cpu else part * pixels) * 3 * 4 * ACTIVATION_FACTOR
    forward = 3 * part * per_image + activations
    inputs = 3 * batch_size * image_bytes
    accumulate_work = update + forward + inputs
    accumulate = statistics + buffer + accumulate_work

    # finish: statistics (+ factor when kept apart) + the ring of float64 covariance chunks and per-thread results
    chunk = min(p, max(1, min(CHUNK_ELEMENTS // (d * d), FACTOR_CHUNK_CAP)))
    factor_work = ((2 * threads + 1) * chunk * d * d * 8 + threads * chunk * d * d * (16 + FACTOR_BYTES[factor_dtype])
                   if cpu else chunk * d * d * 8 * 3)
    finish = statistics + (factor if keep_stats else 0) + mean32 + factor_work

    # threshold (and save, which writes from the tensors' memory): what stays + one scoring batch
    kept = (statistics + factor) if keep_stats else max(statistics - 8 * p * d, factor)  # consumed: the scatter's storage
    # scoring runs part by part on the CPU too (model.run_batch); the batch's maps are gathered
    scoring_work = 4 * part * per_image + inputs + activations + 2 * batch_size * pixels * 4
    threshold = kept + mean32 + compute_copy + scoring_work

    phases = {"accumulate": (accumulate, accumulate_work), "finish": (finish, factor_work),
              "threshold": (threshold, scoring_work)}
    phase = max(phases, key=lambda name: phases[name][0])
    model_file = mean32 + factor + 8 * d + FILE_HEADER_BYTES + (statistics if keep_stats else 0)
    return MemoryPlan(
        grid=grid, dim=d, factor_dtype=factor_dtype, keep_stats=keep_stats, image_size=image_size,
        batch_size=batch_size, device="cuda" if not cpu else "cpu", threads=threads, statistics=statistics,
        factor=factor, factor_in_statistics=not keep_stats, compute_copy=compute_copy, embedding_buffer=buffer,
        working=phases[phase][1], model_file=model_file, baseline=baseline if cpu else 0,
        peak=(baseline if cpu else 0) + phases[phase][0], phase=phase, available=available, limit=limit,
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
def plan_for(model: Padim, available: int | None = None, limit: int | None = None) -> MemoryPlan:
    """The plan of ``model.fit`` with its parameters: builds the network (``prepare``) to learn the grid and D,
    measures this process as the baseline, and checks the machine's available memory (or ``available``)."""
    import torch

    model.prepare()
    device = "cuda" if model.device_.type == "cuda" else "cpu"
    if available is None:
        available = gpu_available(model.device_) if device == "cuda" else available_memory()
    return plan_memory(
        tuple(model.grid_), int(model.channel_indices_.numel()), model.factor_dtype, bool(model.keep_stats),
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
    args = {"positions": plan.grid, "dim": plan.dim, "factor_dtype": plan.factor_dtype, "keep_stats": plan.keep_stats,
            "image_size": plan.image_size, "batch_size": plan.batch_size, "device": plan.device,
            "threads": plan.threads, "baseline": plan.baseline, "available": plan.available, "limit": plan.limit,
            "n_positions": plan.n_positions}
    if "grid" in changes:
        args["positions"] = changes.pop("grid")
    return plan_memory(**{**args, **changes})


def alternatives(plan: MemoryPlan, crop: bool = False) -> list[str]:
    """The changes that make the fit fit, each with its peak: fewer channels, a half-precision factor (only where
    it lowers the peak: on the CPU it is multiplied as float32), no kept statistics, a smaller input."""
    levers = []
    if plan.keep_stats:
        without = _again(plan, keep_stats=False)
        if without.fits:
            levers.append(f"no --keep-stats ({_gb(without.peak)})")
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
