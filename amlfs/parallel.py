"""``each``: one function over a few items at once, on short-lived daemon threads.

Used for the nodes or VMs of one cluster. A ``ThreadPoolExecutor`` per call made non-daemon
threads, and every non-daemon thread start walks the list of all live non-daemon threads of
the process (``threading._maintain_shutdown_locks``): with a fleet's thousands of threads in
flight that walk was a visible part of the orchestrator's time. The caller joins every thread
it starts, so nothing is left running.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import TypeVar

__all__ = ["each"]

K = TypeVar("K")
T = TypeVar("T")


def each(
    items: Iterable[K], fn: Callable[[K], T], limit: int = 16, name: str = "each"
) -> list[tuple[K, T | None, BaseException | None]]:
    """``fn(item)`` for every item, at most ``limit`` at once; all run to the end.

    Returns ``(item, result, error)`` per item, in the items' order (``error`` is what
    ``fn`` raised, else None). A single item runs on the calling thread.
    """
    items = list(items)
    outcomes: list[tuple[K, T | None, BaseException | None]] = [(i, None, None) for i in items]

    def one(index: int) -> None:
        try:
            outcomes[index] = (items[index], fn(items[index]), None)
        except BaseException as err:  # handed to the caller
            outcomes[index] = (items[index], None, err)

    if len(items) <= 1:
        for index in range(len(items)):
            one(index)
        return outcomes
    gate = threading.Semaphore(max(1, limit))

    def gated(index: int) -> None:
        with gate:
            one(index)

    threads = [
        threading.Thread(target=gated, args=(i,), name=f"{name}-{i}", daemon=True)
        for i in range(len(items))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes
