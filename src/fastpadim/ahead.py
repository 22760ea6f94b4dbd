"""An iterator run in a thread a bounded number of items ahead of its consumer.

Fit alternates between the network (embeddings) and the statistics update; both release the GIL, so with the
network a few parts ahead the two overlap and both cores stay busy, at the memory of ``depth`` parts.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
A = TypeVar("A")
B = TypeVar("B")
_DONE = object()
POLL_SECONDS = 0.1  # how often a blocked producer checks that its consumer is still there


def run_ahead(items: Iterable[T], depth: int) -> Iterator[T]:
    """The items of ``items`` in order, produced by a thread at most ``depth`` items ahead. An exception in the
    producer is raised in the consumer at that point; a consumer that stops early stops the producer."""
    if depth < 1:
        yield from items
        return
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(item) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer((item, None)):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            offer((_DONE, exc))
            return
        offer((_DONE, None))

    worker = threading.Thread(target=produce, name="fastpadim-ahead", daemon=True)
    worker.start()
    try:
        while True:
            item, error = slots.get()
            if item is _DONE:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        worker.join()


def map_ordered(functions: list[Callable[[A], B]], items: Iterable[A]) -> Iterator[B]:
    """``functions[k % n](item k)`` for every item, yielded in order; each function runs on one thread at a time
    (at most n items in flight, consecutive ones), so each may hold state of its own, e.g. an inference session."""
    if len(functions) == 1:
        yield from map(functions[0], items)
        return
    with ThreadPoolExecutor(max_workers=len(functions), thread_name_prefix="fastpadim-map") as pool:
        pending: deque = deque()
        try:
            for k, item in enumerate(items):
                if len(pending) == len(functions):
                    yield pending.popleft().result()
                pending.append(pool.submit(functions[k % len(functions)], item))
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:  # a consumer that stops early (or an error) leaves nothing running
                future.cancel()
