"""The few array operations the Gaussian statistics need, for NumPy arrays and for PyTorch tensors alike.

``fastpadim.gaussian`` is written once against ``ops_for(array)``: torch tensors (the PyTorch engine, a GPU) go
through PyTorch, NumPy arrays (a fit through an ONNX engine, which never imports torch) through NumPy. Only what
differs between the two libraries in name or in signature is here: buffers written in place (``out``), the
Cholesky factor's failure report, the one-thread scope of the factorisation's pool. PyTorch is imported only when
a tensor is handed in, so this module and ``gaussian`` load without it.
"""

from __future__ import annotations

import contextlib
import sys

import numpy as np


def is_tensor(item) -> bool:
    """A torch tensor, checked without importing torch (a tensor exists only if torch is imported)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(item, torch.Tensor)


class NumpyOps:
    float32, float64 = np.float32, np.float64
    threads_batched_products = False  # np.matmul on a stack: one BLAS call per matrix

    @staticmethod
    def on_cpu(like) -> bool:
        return True

    @staticmethod
    def zeros(shape, dtype, like):
        return np.zeros(shape, dtype)

    @staticmethod
    def empty(shape, dtype, like):
        return np.empty(shape, dtype)

    @staticmethod
    def astype(array, dtype):
        return array.astype(dtype, copy=False)

    @staticmethod
    def index(values, like):
        return np.asarray(values)

    @staticmethod
    def mean0(array):
        return array.mean(axis=0)

    @staticmethod
    def subtract(a, b, out):
        return np.subtract(a, b, out=out)

    @staticmethod
    def permute(array, axes):
        return array.transpose(axes)

    @staticmethod
    def sqrt(array):
        return np.sqrt(array)

    @staticmethod
    def clip_min(array, low):
        return np.maximum(array, low)

    @staticmethod
    def swap01_into(out, array):
        """``out`` ← ``array`` with its first two axes swapped (a contiguous copy: BLAS is faster on it)."""
        np.copyto(out, array.transpose(1, 0, 2))
        return out

    @staticmethod
    def matmul(a, b, out=None):
        return np.matmul(a, b, out=out)

    @staticmethod
    def take_columns(array, index, out=None):
        return np.take(array, index, axis=1, out=out)

    @staticmethod
    def copy_(out, array):
        np.copyto(out, array, casting="unsafe")
        return out

    @staticmethod
    def widening_scratch(shape, like):
        """None: NumPy's mixed-dtype add (``add_widened``) needs no float64 scratch."""
        return None

    @staticmethod
    def add_widened(target, values, scratch):
        """``target`` (float64) += ``values`` (float32), a mixed-dtype add (``scratch`` is None)."""
        np.add(target, values, out=target)

    @staticmethod
    def clone(array):
        return array.copy()

    @staticmethod
    def contiguous(array):
        return np.ascontiguousarray(array)

    @staticmethod
    def reinterpret(flat, dtype):
        return flat.view(dtype)

    @staticmethod
    def cholesky(matrices):
        """Lower Cholesky factors, or None if any matrix is not positive definite."""
        try:
            return np.linalg.cholesky(matrices)
        except np.linalg.LinAlgError:
            return None

    @staticmethod
    def small_triangular_inverse(lower):
        # NumPy has no batched triangular solve; on small blocks LU costs little more, and its rounding above the
        # diagonal (where the inverse is exactly 0) is cut off
        return np.tril(np.linalg.inv(np.ascontiguousarray(lower)))

    @staticmethod
    def threads() -> int:
        from threadpoolctl import threadpool_info

        return max([1, *(pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas")])

    @staticmethod
    def one_thread():
        from threadpoolctl import threadpool_limits

        return threadpool_limits(1, user_api="blas")

    @staticmethod
    def in_caller_mode():
        return contextlib.nullcontext


class TorchOps:
    def __init__(self):
        import torch

        self.torch = torch
        self.float32, self.float64 = torch.float32, torch.float64
        self.threads_batched_products = True  # torch.matmul threads over the stack itself

    def on_cpu(self, like) -> bool:
        return like.device.type == "cpu"

    def zeros(self, shape, dtype, like):
        return self.torch.zeros(shape, dtype=dtype, device=like.device)

    def empty(self, shape, dtype, like):
        return self.torch.empty(shape, dtype=dtype, device=like.device)

    def astype(self, array, dtype):
        return array.to(dtype)

    def index(self, values, like):
        return self.torch.as_tensor(values, device=like.device)

    @staticmethod
    def mean0(array):
        return array.mean(dim=0)

    def subtract(self, a, b, out):
        return self.torch.sub(a, b, out=out)

    @staticmethod
    def permute(array, axes):
        return array.permute(axes)

    @staticmethod
    def sqrt(array):
        return array.sqrt()

    @staticmethod
    def clip_min(array, low):
        return array.clamp_min(low)

    @staticmethod
    def swap01_into(out, array):
        return out.copy_(array.transpose(0, 1))

    def matmul(self, a, b, out=None):
        return self.torch.matmul(a, b, out=out) if out is not None else a @ b

    def take_columns(self, array, index, out=None):
        return self.torch.index_select(array, 1, index, out=out) if out is not None else array.index_select(1, index)

    @staticmethod
    def copy_(out, array):
        return out.copy_(array)

    def widening_scratch(self, shape, like):
        """The float64 buffer ``add_widened`` casts into, reused across chunks."""
        return self.empty(shape, self.float64, like)

    @staticmethod
    def add_widened(target, values, scratch):
        """``target`` (float64) += ``values`` (float32), cast into ``scratch`` first: 5x faster than torch's
        mixed-dtype add."""
        target += scratch.copy_(values)

    @staticmethod
    def clone(array):
        return array.clone()

    @staticmethod
    def contiguous(array):
        return array

    @staticmethod
    def reinterpret(flat, dtype):
        return flat.view(dtype)

    def cholesky(self, matrices):
        chol, info = self.torch.linalg.cholesky_ex(matrices)
        return None if bool((info != 0).any()) else chol

    def small_triangular_inverse(self, lower):
        eye = self.torch.eye(lower.shape[-1], dtype=lower.dtype, device=lower.device)
        return self.torch.linalg.solve_triangular(lower, eye.expand_as(lower), upper=False)

    def threads(self) -> int:
        return self.torch.get_num_threads()

    @contextlib.contextmanager
    def one_thread(self):
        threads = self.torch.get_num_threads()
        self.torch.set_num_threads(1)
        try:
            yield
        finally:
            self.torch.set_num_threads(threads)

    def in_caller_mode(self):
        """A context for the pool's threads: inference mode is thread-local, so they take the caller's."""
        inference = self.torch.is_inference_mode_enabled()
        return lambda: self.torch.inference_mode(inference)


_TORCH_OPS: TorchOps | None = None


def ops_for(array):
    global _TORCH_OPS
    if is_tensor(array):
        if _TORCH_OPS is None:
            _TORCH_OPS = TorchOps()
        return _TORCH_OPS
    return NumpyOps
