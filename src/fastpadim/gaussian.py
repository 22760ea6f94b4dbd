"""The per-position multivariate Gaussian: streaming, mergeable statistics and one factorisation.

State per position (count n, mean μ, centred scatter M = Σ (x-μ)(x-μ)ᵀ) merges exactly with Chan et al.'s
pairwise update, so fitting batch by batch, ``partial_fit`` and distributed fits all give the one-shot
result. M is symmetric, so only its lower triangle is kept (packed, float64): half the memory of the full
matrix at full precision. Memory is that of the state itself, whatever the number of images.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .array_ops import ops_for
from .errors import FastpadimError

# Bound on the temporary (positions × D × D) blocks built per step, in elements (float32: 16 MB; blocks
# of this size stay fast and keep the update's temporaries near 50 MB).
_CHUNK_ELEMENTS = 4 * 1024 * 1024
FACTOR_CHUNK_CAP = 64  # positions per factorisation chunk on the CPU (small LAPACK calls, one per thread)
UPDATE_CHUNK_CAP = 32  # positions per update chunk when chunks run in parallel (NumPy)


def _chunk_step(dim: int, cap: int | None = None) -> int:
    """Positions per chunk: (step, D, D) blocks of at most _CHUNK_ELEMENTS elements, and at most ``cap``."""
    step = max(1, _CHUNK_ELEMENTS // max(1, dim * dim))
    return min(step, cap) if cap else step


def _position_chunks(positions: int, dim: int, cap: int | None = None):
    step = _chunk_step(dim, cap)
    for start in range(0, positions, step):
        yield slice(start, min(positions, start + step))


def tril_index(dim: int, like=None):
    """Rows and columns of the packed lower triangle's entries, as arrays of ``like``'s kind (NumPy by default)."""
    rows, cols = np.tril_indices(dim)
    if like is None:
        return rows, cols
    ops = ops_for(like)
    return ops.index(rows, like), ops.index(cols, like)


def tril_flat_index(dim: int, like=None):
    """Where the packed lower triangle's entries sit in a flattened (D, D) matrix."""
    rows, cols = np.tril_indices(dim)
    flat = rows * dim + cols
    return flat if like is None else ops_for(like).index(flat, like)


def _full_from_packed(dim: int) -> np.ndarray:
    """For each entry of a flattened (D, D) symmetric matrix, where it sits in the packed lower triangle."""
    rows, cols = np.tril_indices(dim)
    where = np.empty((dim, dim), np.int64)
    where[rows, cols] = where[cols, rows] = np.arange(len(rows))
    return where.reshape(-1)


def _packed_diagonal(dim: int) -> np.ndarray:
    """Where the diagonal's entries sit in the packed lower triangle (row i starts at i(i+1)/2)."""
    rows = np.arange(dim)
    return rows * (rows + 1) // 2 + rows


def unpack(packed, dim: int, out=None):
    """Packed lower triangles (P, D(D+1)/2) → full symmetric matrices (P, D, D), optionally into ``out``."""
    ops = ops_for(packed)
    n = packed.shape[0]
    full = ops.empty((n, dim * dim), packed.dtype, packed) if out is None else out.reshape(-1)[: n * dim * dim].reshape(n, dim * dim)
    # one gather writes every entry, both triangles (2x faster than scattering the triangle and its mirror)
    ops.take_columns(packed, ops.index(_full_from_packed(dim), packed), out=full)
    return full.reshape(n, dim, dim)


@dataclass
class GaussianStats:
    """Count, per-position mean (P, D) and packed centred scatter (P, D(D+1)/2), float64: NumPy arrays or torch
    tensors (``fastpadim.array_ops``), the same code either way."""

    count: int
    mean: object
    scatter: object

    @property
    def dim(self) -> int:
        return self.mean.shape[1]

    @property
    def _ops(self):
        return ops_for(self.mean)

    @classmethod
    def empty(cls, positions: int, dim: int, device=None, like=None) -> GaussianStats:
        """Zero statistics: torch tensors on ``device`` (default), or arrays of ``like``'s kind (a NumPy array:
        NumPy arrays)."""
        if like is None:
            import torch

            like = torch.empty(0, device=device or "cpu")
        ops = ops_for(like)
        return cls(0, ops.zeros((positions, dim), ops.float64, like),
                   ops.zeros((positions, dim * (dim + 1) // 2), ops.float64, like))

    @classmethod
    def from_embeddings(cls, embeddings) -> GaussianStats:
        """Statistics of one batch of embeddings (B, P, D)."""
        stats = cls.empty(embeddings.shape[1], embeddings.shape[2], like=embeddings)
        stats.update(embeddings)
        return stats

    def update(self, embeddings, centre_in_place: bool = False) -> None:
        """Add a batch (B, P, D): centred batch statistics merged into the running state.

        ``centre_in_place`` lets the batch be overwritten by its centred values (saves a copy).
        """
        ops = self._ops
        batch, positions, dim = embeddings.shape
        if (positions, dim) != tuple(self.mean.shape):
            raise FastpadimError(f"embedding shape {(positions, dim)} does not match the model's {tuple(self.mean.shape)}")
        if batch == 0:
            return
        if self.scatter.dtype != ops.float64:
            raise FastpadimError("compacted (float32) statistics take no more images: widen them first")
        # Centred on the batch's own mean, float32 products lose nothing that matters (no large-mean
        # cancellation); the running sums are float64.
        x = embeddings if embeddings.dtype in (ops.float32, ops.float64) else ops.astype(embeddings, ops.float32)
        batch_mean = ops.mean0(x)  # (P, D)
        centred = ops.subtract(x, batch_mean, out=x) if centre_in_place else x - batch_mean
        n_old, n_new = self.count, self.count + batch
        delta = ops.astype(batch_mean, ops.float64) - self.mean  # (P, D)
        # Chan's correction n_old·batch/n_new · δδᵀ is a rank-1 term of the block's own magnitude: as one more
        # row √weight·δ under the batch's rows, the block's own product adds it, in the block's precision.
        weight = n_old * batch / n_new
        rows = batch + (1 if n_old else 0)
        extra = ops.astype(delta * weight ** 0.5, x.dtype) if n_old else None
        flat = tril_flat_index(dim, x)

        def buffers():
            # one set per chunk in flight, reused: fresh blocks per chunk cost more in page faults than the products
            step = min(positions, _chunk_step(dim, cap))
            return (ops.empty((step, rows, dim), x.dtype, x), ops.empty((step, dim, dim), x.dtype, x),
                    ops.empty((step, len(flat)), x.dtype, x), ops.widening_scratch((step, len(flat)), x))

        def add(sl: slice, buffer) -> None:
            part_buf, block_buf, tri_buf, scratch = buffer
            n = sl.stop - sl.start
            part = part_buf[:n]
            ops.swap01_into(part[:, :batch], centred[:, sl])  # (p, B, D): BLAS is 2-3x faster contiguous
            if extra is not None:
                ops.copy_(part[:, batch], extra[sl])
            block = ops.matmul(part.mT, part, out=block_buf[:n])
            # lower triangle by a column gather on the flat matrix (2x faster than advanced indexing)
            tri = ops.take_columns(block.reshape(n, dim * dim), flat, out=tri_buf[:n])
            ops.add_widened(self.scatter[sl], tri, None if scratch is None else scratch[:n])

        # NumPy's batched product is one BLAS call per matrix, which OpenBLAS threads for nothing at this size:
        # one thread per chunk, chunks in parallel, took 0.3-0.4 s instead of 0.7-0.8 s for 66 images of 4,096
        # positions (D = 176, 2 cores). PyTorch threads its batched product itself, and its thread count is
        # the process's, shared with a network running ahead: it stays one call per chunk.
        pooled = not ops.threads_batched_products
        cap = UPDATE_CHUNK_CAP if pooled else None
        over_chunks(ops, _position_chunks(positions, dim, cap), buffers, add, pooled)
        self.mean += delta * (batch / n_new)
        self.count = n_new

    def merge(self, other: GaussianStats) -> GaussianStats:
        """Chan et al.'s exact pairwise merge; the result is a new object, inputs are untouched."""
        ops = self._ops
        if self.mean.shape != other.mean.shape:
            raise FastpadimError(f"cannot merge statistics of shapes {tuple(self.mean.shape)} and {tuple(other.mean.shape)}")
        n = self.count + other.count
        if n == 0:
            return GaussianStats(0, ops.clone(self.mean), ops.clone(self.scatter))
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        scatter = self.scatter + other.scatter
        weight = self.count * other.count / n
        if weight:
            rows, cols = tril_index(self.dim, delta)
            scatter += (delta[:, rows] * delta[:, cols]) * weight
        return GaussianStats(n, mean, scatter)

    def without(self, part: GaussianStats) -> GaussianStats:
        """The statistics with ``part`` (a subset of the samples they hold) taken out: the exact inverse of ``merge``
        (float64), written into ``part``'s memory, which is consumed. Out-of-fold models come from it: all the
        images' statistics without one fold's, with no second pass over the other folds."""
        ops = self._ops
        n = self.count - part.count
        if n < 0 or self.mean.shape != part.mean.shape:
            raise FastpadimError("cannot take out statistics that are not part of these")
        rest_mean = (self.mean * self.count - part.mean * part.count) / max(n, 1)
        delta = part.mean - rest_mean
        weight = n * part.count / self.count if self.count else 0.0
        scatter = ops.subtract(self.scatter, part.scatter, out=part.scatter)
        if weight:
            rows, cols = tril_index(self.dim, delta)
            for sl in _position_chunks(scatter.shape[0], self.dim):
                scatter[sl] -= (delta[sl][:, rows] * delta[sl][:, cols]) * weight
        part.count, part.mean, part.scatter = -1, ops.empty((0,), ops.float64, part.mean), ops.empty((0,), ops.float64, part.mean)
        return GaussianStats(n, rest_mean, scatter)

    def compacted(self) -> GaussianStats:
        """The statistics as a model file stores them: mean and packed scatter rounded to float32 (half the size;
        scores move by about 1e-6 relative). The mean stays a float64 array for exact merges from here on."""
        ops = self._ops
        return GaussianStats(self.count, ops.astype(ops.astype(self.mean, ops.float32), ops.float64),
                             ops.astype(self.scatter, ops.float32))

    def widened(self) -> GaussianStats:
        """float64 statistics, ready for ``update`` (a compacted state is widened before more images are added)."""
        ops = self._ops
        if self.scatter.dtype == ops.float64:
            return self
        return GaussianStats(self.count, ops.astype(self.mean, ops.float64), ops.astype(self.scatter, ops.float64))

    def covariance(self, epsilon: float, positions: slice = slice(None), out=None):
        """Σ = M / (N − 1) + εI for the given positions: full (p, D, D) float64 matrices (in ``out`` if given)."""
        ops = self._ops
        if self.count < 2:
            raise FastpadimError(f"PaDiM needs at least 2 training images, got {self.count}")
        # scaled and shifted while packed (half the entries), into a new array: the statistics stay as they are
        packed = ops.astype(self.scatter[positions], ops.float64) / (self.count - 1)
        packed[:, _packed_diagonal(self.dim)] += epsilon
        return unpack(packed, self.dim, out)

    def whitener(self, epsilon: float, dtype=None, consume: bool = False):
        """W = L⁻¹ with Σ = L Lᵀ (Cholesky, float64): the Mahalanobis distance is then ‖W (x − μ)‖.

        ``dtype``: the factor's (default float32). ``consume=True`` writes W into the scatter's own memory (a
        packed float64 row, 8·D(D+1)/2 bytes, is larger than a row of W), so no second (P, D, D) array is
        needed; the statistics are gone afterwards. Chunks are read in order and chunk j's result only
        overwrites rows before chunk j + 1, so every row is read before it is overwritten.
        """
        ops = self._ops
        dtype = ops.float32 if dtype is None else dtype
        positions, dim = self.mean.shape
        if consume:
            if self.scatter.dtype != ops.float64:
                raise FastpadimError("only float64 statistics can be consumed by their factor")
            result = ops.reinterpret(self.scatter.reshape(-1), dtype)[: positions * dim * dim].reshape(positions, dim, dim)
        else:
            result = ops.empty((positions, dim, dim), dtype, self.mean)

        def factor(sl: slice, buffer, cov=None) -> None:
            cov = self.covariance(epsilon, sl, out=buffer) if cov is None else cov
            chol = ops.cholesky(cov)
            if chol is None:
                raise FastpadimError("covariance is not positive definite; increase epsilon")
            ops.copy_(result[sl], triangular_inverse(chol))

        # On the CPU, thousands of small LAPACK calls each pay an OpenMP barrier when run multi-threaded (8x slower
        # when the cores are shared); single-threaded calls, parallel over positions, do not. Each task unpacks
        # its own covariance (the gather runs in parallel, without the GIL: 4,096 positions of D = 176 took
        # 1.6-1.9 s instead of 2.6-3.0 in NumPy, 1.7-2.1 instead of 2.3-2.5 in PyTorch, on 2 cores), except when
        # the factor is written over the statistics: then chunk j's factor may cover the last rows of chunk
        # j − 1, so the rows are read by the caller, in order, before any later chunk is factored.
        step = min(positions, _chunk_step(dim, cap=FACTOR_CHUNK_CAP))
        over_chunks(ops, _position_chunks(positions, dim, cap=FACTOR_CHUNK_CAP),
                    lambda: ops.empty((step, dim, dim), ops.float64, self.mean), factor, ops.on_cpu(self.mean),
                    read=(lambda sl, buffer: self.covariance(epsilon, sl, out=buffer)) if consume else None)
        if consume:
            self.scatter = ops.empty((0,), ops.float64, self.mean)
            self.count = -1  # marks the statistics as consumed
        return result


def over_chunks(ops, chunks, buffers, task, pooled: bool, read=None) -> None:
    """``task(chunk, buffer[, read(chunk, buffer)])`` for every chunk of positions: in order on this thread, or
    (``pooled``) on a pool of one-BLAS-thread workers, one per core, at most two chunks per worker in flight.
    ``read``, if given, runs here, in chunk order, before its chunk is handed out. Buffers (``buffers()``) come from a
    ring of 2·threads + 1, so none is overwritten while a task uses it and no chunk pays fresh page faults."""
    if not pooled:
        buffer = buffers()
        for chunk in chunks:
            task(chunk, buffer, *([read(chunk, buffer)] if read else []))
        return
    threads = ops.threads()
    ring = [buffers() for _ in range(2 * threads + 1)]
    caller_mode = ops.in_caller_mode()  # e.g. torch's inference mode, thread-local: the pool's threads share it

    def in_caller_mode(*args) -> None:
        with caller_mode():
            task(*args)

    with ops.one_thread(), ThreadPoolExecutor(max_workers=threads) as pool:
        pending = []
        for i, chunk in enumerate(chunks):
            buffer = ring[i % len(ring)]
            pending.append(pool.submit(in_caller_mode, chunk, buffer, *([read(chunk, buffer)] if read else [])))
            if len(pending) >= 2 * threads:
                pending.pop(0).result()
        for future in pending:
            future.result()


UPDATE_BUFFER_BYTES = 192 * 1024 * 1024  # embeddings gathered before one statistics update


def accumulate(stats: GaussianStats | None, parts, batch_done, buffer_bytes: int = UPDATE_BUFFER_BYTES):
    """``stats`` (None: made from the first embeddings, on their device) with every embedding of ``parts`` added:
    ``parts`` yields (batch, embeddings (n, P, D)) part by part and (batch, None) once a batch is done, which goes
    to ``batch_done(batch)``. Embeddings gather in one preallocated buffer of at most ``buffer_bytes`` and are
    merged in one update when it is full: each update touches the whole (P, D, D) state, so fewer, larger updates
    are faster, and memory stays the same whatever the number of images. The fit with and without PyTorch share it."""
    buffer, filled = None, 0
    for batch, embeddings in parts:
        if embeddings is None:
            batch_done(batch)
            continue
        count = len(embeddings)  # samples: images, or their tiles when tiles share one model
        if buffer is None:
            capacity = max(count, buffer_bytes // max(1, embeddings[0].nbytes))
            buffer = ops_for(embeddings).empty((capacity, *embeddings.shape[1:]), embeddings.dtype, embeddings)
        if filled + count > buffer.shape[0]:
            stats = _merged(stats, buffer[:filled])
            filled = 0
        buffer[filled:filled + count] = embeddings  # part by part: a whole batch's embeddings are never held at once
        filled += count
        del embeddings
    return _merged(stats, buffer[:filled]) if filled else stats


def check_training_count(count: int, unreadable: list) -> None:
    """PaDiM's covariance needs at least 2 training images: one line saying how many were readable."""
    if count < 2:
        detail = f" ({len(unreadable)} unreadable)" if unreadable else ""
        raise FastpadimError(f"PaDiM needs at least 2 readable training images, got {count}{detail}")


def _merged(stats: GaussianStats | None, embeddings) -> GaussianStats:
    if stats is None:
        stats = GaussianStats.empty(embeddings.shape[1], embeddings.shape[2], like=embeddings)
    stats.update(embeddings, centre_in_place=True)
    return stats


def triangular_inverse(lower, levels: int = 3, out=None):
    """L⁻¹ of lower-triangular matrices (…, n, n), by halves: [[A, 0], [B, C]]⁻¹ = [[A⁻¹, 0], [−C⁻¹BA⁻¹, C⁻¹]].

    A triangular solve against the identity does n³ flops, blind to the identity's own zeros; by halves, the
    solves shrink to the diagonal blocks and the rest is batched matrix products at GEMM speed. Every level writes
    into ``out``'s own blocks (views, no fresh arrays): for 64 matrices of D = 176 on one core, NumPy took 19-20 ms
    with three levels against 25-43 ms for the same recursion allocating its blocks, 140 ms for one LU inverse;
    the result agrees with the solve to 1e-15 relative."""
    ops = ops_for(lower)
    n = lower.shape[-1]
    out = ops.empty(lower.shape, lower.dtype, lower) if out is None else out
    if levels == 0 or n < 32:
        ops.copy_(out, ops.small_triangular_inverse(lower))
        return out
    h = n // 2
    top = triangular_inverse(lower[..., :h, :h], levels - 1, out[..., :h, :h])
    bottom = triangular_inverse(lower[..., h:, h:], levels - 1, out[..., h:, h:])
    out[..., :h, h:] = 0
    lower_left = out[..., h:, :h]
    ops.matmul(bottom, ops.matmul(lower[..., h:, :h], top), out=lower_left)
    lower_left *= -1
    return out


def mahalanobis(embeddings, mean, whitener):
    """Distances (B, P) of embeddings (B, P, D) to per-position Gaussians: ‖W (x − μ)‖ ≥ 0 by construction."""
    ops = ops_for(whitener)
    if ops.threads_batched_products:
        return _distances(embeddings, mean, whitener)
    # NumPy: position chunks on one-BLAS-thread workers, as the update (8 images of 4,096 positions, D = 176:
    # 0.08-0.09 s instead of 0.16-0.18 s on 2 cores)
    batch, positions, dim = embeddings.shape
    out = ops.empty((batch, positions), ops.float32, whitener)

    def distances(sl: slice, _) -> None:
        out[:, sl] = _distances(embeddings[:, sl], mean[sl], whitener[sl])

    over_chunks(ops, _position_chunks(positions, dim), lambda: None, distances, pooled=True)
    return out


def _distances(embeddings, mean, whitener):
    ops = ops_for(whitener)
    centred = ops.astype(embeddings, whitener.dtype) - ops.astype(mean, whitener.dtype)
    # (P, D, B); NumPy's batched product is 1.6x faster on a contiguous copy (torch's takes the strides as they are)
    whitened = ops.matmul(whitener, ops.contiguous(ops.permute(centred, (1, 2, 0))))
    return ops.astype(ops.sqrt((whitened * whitened).sum(1)).T, ops.float32)


def leave_one_out(distances, count: int):
    """Distances of training samples to each position's Gaussian fitted without them, from their distances to the
    Gaussian fitted on all ``count`` samples: every fold model of leave-one-out in closed form, no factorisation.

    Taking sample z = x − μ out of n: M₍ᵢ₎ = M − n/(n−1)·zzᵀ, μ₍ᵢ₎ = μ − z/(n−1), so with Σ = M/(n−1) + εI,
    Σ₍ᵢ₎ = cΣ − a·zzᵀ − (c−1)εI (c = (n−1)/(n−2), a = n/((n−1)(n−2))). Sherman–Morrison gives the distance under
    cΣ − a·zzᵀ from m = zᵀΣ⁻¹z alone: d² = (n/(n−1))² · m / (c·(1 − n·m/(n−1)²)). The dropped (c−1)εI makes the
    covariance at most 1 + 1/(n−2) times too large, so the distances are at most that factor too small (0.3 %
    at n = 180): not exact like the k-fold models, but unbiased in the number of images they rest on."""
    n = float(count)
    if n < 3:
        raise FastpadimError(f"leave-one-out needs at least 3 training images, got {count}")
    ops = ops_for(distances)
    d = ops.astype(distances, ops.float64)
    m = d * d
    # m < (n−1)²/n for a sample of the fit (its leverage is below 1); the clamp only guards rounding
    remaining = ops.clip_min(1.0 - n * m / (n - 1) ** 2, 1e-12)
    return ops.astype(ops.sqrt(m * (n * n * (n - 2) / (n - 1) ** 3) / remaining), distances.dtype)
