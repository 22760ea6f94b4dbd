"""Micro-batching: requests that arrive together share one network batch, run by one thread that owns the model.

Each request submits a *group* of items (one image, or all images of a batch request). A dispatcher coroutine
waits for the first group, then keeps collecting groups until ``max_batch`` items are gathered or ``max_wait_s``
has passed since the first one, and hands the batch to a single worker thread. While that thread works, new
requests queue up and form the next batch, so under load batches fill without waiting. Groups are never split,
so a batch request is scored as one batch (a group larger than ``max_batch`` runs on its own).

``PixelBudget`` bounds the pixels that the service decodes at once (memory, not batching).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class QueueFull(Exception):
    """More requests are waiting than the service accepts; the client should retry later."""


@dataclass
class BatchTiming:
    """Where a group's time went: waiting in the queue, and the network run of the batch it joined."""

    queue_s: float
    model_s: float
    batch_size: int


@dataclass
class _Group(Generic[Item]):
    items: Sequence[Item]
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class MicroBatcher(Generic[Item, Result]):
    """Groups concurrent submissions into batches for ``run_batch(items) -> results`` (same length, same order).

    ``run_batch`` is only ever called from one dedicated thread, one batch at a time. ``on_idle`` (optional) runs
    on that thread after a batch when nothing else is waiting (its answers are already out), e.g. to hand memory
    back to the OS once a burst is over; its failures are ignored.
    """

    def __init__(self, run_batch: Callable[[list[Item]], list[Result]], max_batch: int = 8,
                 max_wait_s: float = 0.005, max_queue: int = 256, on_idle: Callable[[], Any] | None = None):
        if max_batch < 1:
            raise ValueError(f"max batch must be at least 1, got {max_batch}")
        if max_wait_s < 0:
            raise ValueError(f"max wait must be >= 0, got {max_wait_s}")
        self.run_batch = run_batch
        self.on_idle = on_idle
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.batches_run = 0
        self.largest_batch = 0
        self._queue: asyncio.Queue[_Group] | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._carry: _Group | None = None  # a group that did not fit in the last batch: it opens the next

    # ------------------------------------------------------------------------------------ life cycle
    async def start(self) -> None:
        self._queue = asyncio.Queue(maxsize=self.max_queue)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastpadim-model")
        self._task = asyncio.create_task(self._dispatch(), name="fastpadim-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._queue is not None:
            left = [self._carry] if self._carry is not None else []
            while not self._queue.empty():
                left.append(self._queue.get_nowait())
            for group in left:
                if not group.future.done():
                    group.future.set_exception(RuntimeError("the service is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._task = self._queue = self._executor = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def waiting(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    # -------------------------------------------------------------------------------------- submit
    async def submit(self, items: Sequence[Item]) -> tuple[list[Result], BatchTiming]:
        """Score ``items`` together (in one network batch, possibly shared with other requests)."""
        if not self.running:
            raise RuntimeError("the batcher is not running")
        future = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Group(list(items), future))
        except asyncio.QueueFull:
            raise QueueFull(f"{self.max_queue} requests are already waiting; retry later") from None
        return await future

    # ------------------------------------------------------------------------------------ dispatch
    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first, self._carry = self._carry, None
            groups = await self._collect(first or await self._queue.get())
            groups = [g for g in groups if not g.future.cancelled()]  # clients that went away
            if not groups:
                continue
            items: list[Any] = [item for g in groups for item in g.items]
            started = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._executor, self.run_batch, items)
                if len(results) != len(items):
                    raise RuntimeError(f"the model returned {len(results)} results for {len(items)} images")
            except Exception as exc:  # noqa: BLE001 - one failed batch must not stop the service
                for g in groups:
                    if not g.future.done():
                        g.future.set_exception(exc)
                continue
            model_s = time.perf_counter() - started
            self.batches_run += 1
            self.largest_batch = max(self.largest_batch, len(items))
            start = 0
            for g in groups:
                part = results[start:start + len(g.items)]
                start += len(g.items)
                if not g.future.done():
                    g.future.set_result((part, BatchTiming(started - g.enqueued, model_s, len(items))))
            if self.on_idle is not None and self._carry is None and self._queue.empty():
                try:
                    await loop.run_in_executor(self._executor, self.on_idle)
                except Exception:  # noqa: BLE001 - housekeeping must not stop the service
                    pass

    async def _collect(self, first: _Group) -> list[_Group]:
        """From the first group on, gather more until ``max_batch`` items or ``max_wait_s`` after the first."""
        groups = [first]
        count = len(first.items)
        deadline = time.perf_counter() + self.max_wait_s
        while count < self.max_batch:
            try:
                group = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    # asyncio.timeout, not wait_for: on Python 3.11 wait_for can drop an item got at the deadline.
                    async with asyncio.timeout(remaining):
                        group = await self._queue.get()
                except TimeoutError:
                    break
            if count + len(group.items) > self.max_batch:
                self._carry = group
                break
            groups.append(group)
            count += len(group.items)
        return groups


class PixelBudget:
    """At most ``capacity`` decoded pixels in flight at once: each decode reserves its image's pixel count (read
    from the header) and waits, first come first served, until that much is free. A reservation above the whole
    capacity is clipped to it (that image decodes alone), so every image that passed the pixel limit gets its turn.

    Create it outside a loop; ``open()`` binds it to the running loop (the app's lifespan)."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"pixel budget must be at least 1, got {capacity}")
        self.capacity = capacity
        self.in_use = 0
        self.most_in_use = 0
        self._waiting: deque[object] = deque()
        self._changed: asyncio.Condition | None = None

    def open(self) -> None:
        self.in_use = 0
        self._waiting.clear()
        self._changed = asyncio.Condition()

    @asynccontextmanager
    async def reserve(self, pixels: int) -> AsyncIterator[None]:
        if self._changed is None:
            raise RuntimeError("the pixel budget is not open")
        amount = max(0, min(int(pixels), self.capacity))
        ticket = object()
        async with self._changed:
            self._waiting.append(ticket)
            try:
                await self._changed.wait_for(
                    lambda: self._waiting[0] is ticket and self.in_use + amount <= self.capacity)
            except BaseException:  # cancelled (the client went away): leave the line, let the next one go
                self._waiting.remove(ticket)
                self._changed.notify_all()
                raise
            self._waiting.popleft()
            self.in_use += amount
            self.most_in_use = max(self.most_in_use, self.in_use)
            self._changed.notify_all()  # the next in line may fit too
        try:
            yield
        finally:
            async with self._changed:
                self.in_use -= amount
                self._changed.notify_all()
