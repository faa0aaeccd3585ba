"""One clock for deadlines and polls, in simulated seconds.

Against real Azure the scale is 1 (a sim second is a second). Against the emulator both sides
run the same scale (``time_scale`` sim seconds per real second), so a 30-minute downtime
budget checked by the orchestrator means the same 30 minutes the emulator measures.
Domain code takes a ``Clock`` instead of calling ``time.sleep``.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol

__all__ = ["Clock", "ScaledClock"]


class Clock(Protocol):
    """What domain code needs from time: a monotonic 'now' and a way to wait, in sim seconds."""

    @property
    def time_scale(self) -> float: ...

    def now(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...

    def to_real(self, seconds: float) -> float: ...


class ScaledClock:
    """Monotonic clock running ``time_scale`` sim seconds per real second, starting at 0."""

    def __init__(self, time_scale: float = 1.0) -> None:
        if time_scale <= 0:
            raise ValueError(f"time_scale must be > 0, got {time_scale}")
        self._scale = float(time_scale)
        self._origin = time.monotonic()
        self._wake = threading.Event()

    @property
    def time_scale(self) -> float:
        return self._scale

    def now(self) -> float:
        return (time.monotonic() - self._origin) * self._scale

    def to_real(self, seconds: float) -> float:
        """Real seconds that ``seconds`` sim seconds take."""
        return seconds / self._scale

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            # An Event wait rather than time.sleep: interruptible by nothing today, but it keeps
            # the one place where this project blocks on time easy to find and to change.
            self._wake.wait(self.to_real(seconds))
