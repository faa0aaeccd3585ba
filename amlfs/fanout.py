"""Run one call per item of a cluster (its VMs, its nodes) side by side.

Every call runs to its end even when another fails, so no VM is left half-way because its
neighbour raised; then the first error, in the items' order, is raised. A per-call thread
pool: it ends with the call, and no thread outlives the step that needed it.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Sequence
from typing import TypeVar

__all__ = ["run_all"]

I = TypeVar("I")  # noqa: E741
T = TypeVar("T")


def run_all(items: Sequence[I], fn: Callable[[I], T], workers: int) -> list[T]:
    """``fn(item)`` for every item, at most ``workers`` at a time; results in items' order.

    A single item runs in the calling thread.
    """
    if len(items) == 1:
        return [fn(items[0])]
    if not items:
        return []
    with concurrent.futures.ThreadPoolExecutor(max(1, min(workers, len(items)))) as pool:
        futures = [pool.submit(fn, item) for item in items]
        concurrent.futures.wait(futures)
    for future in futures:
        error = future.exception()
        if error is not None:
            raise error
    return [future.result() for future in futures]
