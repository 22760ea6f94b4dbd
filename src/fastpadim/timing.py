"""The timer behind ``engine="auto"``: which engine is fastest, for a .padim's scoring and for a network."""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def best_of(call: Callable[[], T], repeats: int = 2) -> tuple[float, T]:
    """The shortest wall time of ``repeats`` calls of ``call()``, and the last call's result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = call()
        best = min(best, time.perf_counter() - start)
    return best, result
