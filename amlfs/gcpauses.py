"""Full garbage collections: how long they stop a process, and keeping them short.

A CPython full (generation 2) collection walks every object the collector tracks while it
holds the GIL. In a process with a thousand threads (one per SSH session, on the
orchestrator's side and on the emulator's), every thread that receives data during the
pause queues for the GIL, and each of them wakes every switch interval to ask for it. The
pause then grows longer than the walk itself, and the queue it leaves behind takes a while to
drain. What lives for the whole run (the inventory, the emulator's fleet of nodes, imported
modules) is never garbage: ``settle_heap`` takes it out of every later walk.
"""

from __future__ import annotations

import gc
import time
from typing import Any

__all__ = ["GcPauses", "settle_heap"]


def settle_heap() -> int:
    """Collect once, then freeze what survived; returns how many objects were frozen.

    Call it once a long-lived process has built what it keeps (after start-up): frozen
    objects are still freed by reference counting, only the cycle collector stops walking
    them. A cycle among them is never collected; start-up state holds none that matters.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class GcPauses:
    """Times every full collection of this process while installed.

    ``describe()`` gives their count, total and longest pause, and when the longest ones came
    (seconds after ``install``): a load spike that starts at one of them points at it.
    """

    def __init__(self, keep: int = 5) -> None:
        self.keep = keep
        # (count, total wall s, collecting thread's CPU s, objects freed, longest pauses as
        # (pause s, at s, CPU s, freed), longest first): one tuple, replaced whole by the
        # callback. No lock: the callback runs inside whatever allocation set the collection
        # off, ``describe`` included, and a lock held there would deadlock.
        self._stats: tuple[int, float, float, int, tuple[tuple[float, float, float, int], ...]]
        self._stats = (0, 0.0, 0.0, 0, ())
        self._began = time.monotonic()
        self._start: float | None = None
        self._start_cpu = 0.0

    def install(self) -> GcPauses:
        self._began = time.monotonic()
        if self._on_gc not in gc.callbacks:
            gc.callbacks.append(self._on_gc)
        return self

    def uninstall(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        # Called by the collecting thread, with the GIL held: keep it short, take no lock.
        if info.get("generation") != 2:
            return
        now = time.perf_counter()
        cpu = time.thread_time()
        if phase == "start":
            self._start, self._start_cpu = now, cpu
            return
        if self._start is None:
            return
        pause, used = now - self._start, cpu - self._start_cpu
        self._start = None
        collected = int(info.get("collected", 0))
        count, total, cpu_s, freed, longest = self._stats
        entry = (pause, time.monotonic() - self._began, used, collected)
        self._stats = (
            count + 1,
            total + pause,
            cpu_s + used,
            freed + collected,
            tuple(sorted((*longest, entry), reverse=True)[: self.keep]),
        )

    def describe(self) -> dict[str, Any]:
        count, total, cpu_s, freed, longest = self._stats
        return {
            "full_collections": count,
            "total_s": round(total, 3),
            "cpu_s": round(cpu_s, 3),
            "collected": freed,
            "max_ms": round(longest[0][0] * 1000, 1) if longest else 0.0,
            "longest": [
                {
                    "ms": round(pause * 1000, 1),
                    "at_s": round(at, 1),
                    "cpu_ms": round(used * 1000, 1),
                    "collected": collected,
                }
                for pause, at, used, collected in longest
            ],
            "frozen_objects": gc.get_freeze_count(),
        }
