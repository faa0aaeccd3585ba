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

__all__ = ["Clock", "Pacer", "ScaledClock"]


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


class Pacer:
    """At most ``per_second`` events per sim second after a first ``burst``, across every
    thread that shares it: a token bucket of ``burst`` tokens refilled ``per_second``.

    ``wait()`` reserves the next token and sleeps until it is due (with ``burst`` 1: events
    evenly spaced). Status polls go through one: at fleet scale (over a thousand VMs and nodes
    polled at once) unpaced polling took all the CPU of the orchestrator, and thousands of
    threads waking together spent it in the kernel fighting for the GIL. A paced caller sleeps
    (costs nothing) and polls a little later. Every ARM request goes through its
    subscription's pacer for reads, writes or deletes, set at or under ARM's refill rate and
    bucket: a caller that keeps to such a pacer is never throttled by that bucket, however
    many threads ask at once. ``per_second`` None or 0: no pacing.
    """

    def __init__(self, clock: Clock, per_second: float | None, *, burst: float = 1.0) -> None:
        if per_second is not None and per_second < 0:
            raise ValueError(f"per_second must be >= 0, got {per_second}")
        if burst < 1:
            raise ValueError(f"burst must be >= 1, got {burst}")
        self.clock = clock
        self.interval = 1.0 / per_second if per_second else 0.0
        self.burst = float(burst)
        self.waited_s = 0.0  # sim seconds callers spent waiting for a slot, in total
        self.events = 0
        self._tokens = self.burst  # below 0: slots reserved ahead
        self._updated: float | None = None
        self._lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = self.clock.now()
            if self._updated is not None and now > self._updated:
                self._tokens = min(self.burst, self._tokens + (now - self._updated) / self.interval)
            if self._updated is None or now > self._updated:
                self._updated = now
            self._tokens -= 1.0
            delay = max(0.0, -self._tokens) * self.interval
            self.events += 1
            self.waited_s += delay
        if delay > 0:
            self.clock.sleep(delay)
