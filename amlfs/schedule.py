"""Weekly windows, blackouts, waves, error budget and admission: when a cluster may be maintained.

Everything here is a pure function of its arguments. There is no I/O and no wall clock: every
function that needs the current time takes it as an argument, and it must be an aware
``datetime`` (naive datetimes are refused with a ``ValueError`` naming the argument). Aware
datetimes in another zone are converted to UTC; every datetime returned is in UTC.

Conventions:

- A window *occurrence* starts on a date whose weekday is the window's ``day_of_week`` at
  ``start_utc`` and lasts ``duration_min`` minutes; it may cross midnight and the week wrap
  (Sunday 23:45 for 30 minutes ends on Monday 00:15). It is the half-open interval
  ``[start, end)``.
- An occurrence is blacked out when the UTC date of its *start* is in the cluster's or the
  fleet's blackout dates (a window starting on Sunday 23:45 is governed by Sunday's date).
- Searches look at most ``SEARCH_HORIZON`` (366 days) ahead; beyond that they give up.
- The fleet flow admits a cluster only if its window has room for a full upgrade plus a
  rollback (DESIGN.md, "Never lose the window"); a hotfix may override the window checks, and
  the admission reason says so.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction

from amlfs.errors import InventoryError
from amlfs.models import Blackout, Cluster, Fleet, Window, is_blacked_out

__all__ = [
    "SEARCH_HORIZON",
    "Admission",
    "ErrorBudget",
    "Prediction",
    "WaveGate",
    "WindowOccurrence",
    "admit",
    "current_or_next_window",
    "next_window_opening",
    "order_waves",
    "wave_gate",
    "wave_may_open",
    "windows_opening_in",
]

UTC = dt.UTC
WEEK = dt.timedelta(days=7)
#: How far ahead ``current_or_next_window`` looks for an occurrence that is not blacked out.
SEARCH_HORIZON = dt.timedelta(days=366)


def _utc(value: dt.datetime, name: str) -> dt.datetime:
    """``value`` in UTC; refuse a naive datetime (or a non-datetime) naming the argument."""
    if not isinstance(value, dt.datetime):
        raise TypeError(f"{name} must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be a timezone-aware datetime (UTC), got naive {value}")
    return value.astimezone(UTC)


def _fmt(when: dt.datetime) -> str:
    return when.strftime("%a %Y-%m-%d %H:%M UTC")


def _floor_minutes(delta: dt.timedelta) -> str:
    """Whole minutes (and seconds if any) of ``delta``, rounded down to the second."""
    seconds = max(0, math.floor(delta.total_seconds()))
    minutes, rest = divmod(seconds, 60)
    return f"{minutes} min" + (f" {rest} s" if rest else "")


def _ceil_minutes(delta: dt.timedelta) -> str:
    """Whole minutes (and seconds if any) of ``delta``, rounded up to the second."""
    seconds = max(0, math.ceil(delta.total_seconds()))
    minutes, rest = divmod(seconds, 60)
    return f"{minutes} min" + (f" {rest} s" if rest else "")


# ------------------------------------------------------------------------ windows


@dataclass(frozen=True)
class WindowOccurrence:
    """One occurrence of a cluster's weekly window: the half-open interval ``[start, end)``."""

    cluster: str
    start: dt.datetime
    end: dt.datetime

    def __post_init__(self) -> None:
        object.__setattr__(self, "start", _utc(self.start, "start"))
        object.__setattr__(self, "end", _utc(self.end, "end"))
        if self.end <= self.start:
            raise ValueError(f"window end {self.end} is not after its start {self.start}")

    @property
    def duration(self) -> dt.timedelta:
        return self.end - self.start

    def contains(self, t: dt.datetime) -> bool:
        """True when ``start <= t < end``."""
        t = _utc(t, "t")
        return self.start <= t < self.end

    def remaining(self, t: dt.datetime) -> dt.timedelta:
        """Window time left from ``t``: the whole window before it opens, zero once it closed."""
        t = _utc(t, "t")
        return max(self.end - max(t, self.start), dt.timedelta(0))

    def __str__(self) -> str:
        return f"{self.cluster}: {_fmt(self.start)} - {_fmt(self.end)}"


def _occurrence(cluster: Cluster, start: dt.datetime) -> WindowOccurrence:
    return WindowOccurrence(
        cluster=cluster.name,
        start=start,
        end=start + dt.timedelta(minutes=cluster.window.duration_min),
    )


def _latest_start_at_or_before(window: Window, t: dt.datetime) -> dt.datetime:
    """Start of the window occurrence that began at or before ``t`` (UTC), most recent first."""
    days_back = (t.weekday() - window.day_of_week.weekday) % 7
    day = t.date() - dt.timedelta(days=days_back)
    start = dt.datetime.combine(day, window.start_time, tzinfo=UTC)
    return start - WEEK if start > t else start


def _starts_from(window: Window, t: dt.datetime) -> Iterator[dt.datetime]:
    """Occurrence starts at or after ``t``, in order, forever."""
    start = _latest_start_at_or_before(window, t)
    if start < t:
        start += WEEK
    while True:
        yield start
        start += WEEK


def _blackouts(cluster: Cluster, fleet_blackouts: Sequence[Blackout]) -> list[Blackout]:
    return [*cluster.blackout_dates, *fleet_blackouts]


def current_or_next_window(
    cluster: Cluster, now: dt.datetime, fleet_blackouts: Sequence[Blackout] = ()
) -> WindowOccurrence | None:
    """The occurrence of ``cluster``'s window that contains ``now``, else the next one.

    Occurrences whose start date (UTC) is blacked out, by the cluster or fleet-wide, are
    skipped. A window is at most a day long, so only the most recent start can contain ``now``.
    Returns None when no occurrence starting within ``SEARCH_HORIZON`` of ``now`` is allowed.
    """
    now = _utc(now, "now")
    blackouts = _blackouts(cluster, fleet_blackouts)
    start = _latest_start_at_or_before(cluster.window, now)
    occurrence = _occurrence(cluster, start)
    if not occurrence.contains(now):
        start += WEEK
    while start <= now + SEARCH_HORIZON:
        if not is_blacked_out(start.date(), blackouts):
            return _occurrence(cluster, start)
        start += WEEK
    return None


def next_window_opening(
    cluster: Cluster, t: dt.datetime, fleet_blackouts: Sequence[Blackout] = ()
) -> WindowOccurrence | None:
    """The first occurrence of ``cluster``'s window that starts at or after ``t`` and is not
    blacked out: the one a scheduled tick would start it in. None beyond ``SEARCH_HORIZON``."""
    t = _utc(t, "t")
    blackouts = _blackouts(cluster, fleet_blackouts)
    for start in _starts_from(cluster.window, t):
        if start > t + SEARCH_HORIZON:
            return None
        if not is_blacked_out(start.date(), blackouts):
            return _occurrence(cluster, start)
    return None  # pragma: no cover - _starts_from never ends


def windows_opening_in(
    fleet: Fleet, tick_start: dt.datetime, tick_end: dt.datetime
) -> list[WindowOccurrence]:
    """Window occurrences of ``fleet`` that start in ``[tick_start, tick_end)``, not blacked out.

    For a scheduled deployment ticking every 15 minutes: consecutive ticks ``[a, b)``,
    ``[b, c)``... select each occurrence exactly once. Sorted by start, then cluster name.
    """
    tick_start = _utc(tick_start, "tick_start")
    tick_end = _utc(tick_end, "tick_end")
    if tick_end < tick_start:
        raise ValueError(f"tick_end {tick_end} is before tick_start {tick_start}")
    found: list[WindowOccurrence] = []
    for cluster in fleet.clusters:
        blackouts = _blackouts(cluster, fleet.blackout_dates)
        for start in _starts_from(cluster.window, tick_start):
            if start >= tick_end:
                break
            if not is_blacked_out(start.date(), blackouts):
                found.append(_occurrence(cluster, start))
    return sorted(found, key=lambda o: (o.start, o.cluster))


# ------------------------------------------------------------------------ admission


@dataclass(frozen=True)
class Prediction:
    """Predicted durations of one cluster's full upgrade and of its rollback."""

    upgrade: dt.timedelta
    rollback: dt.timedelta

    def __post_init__(self) -> None:
        for name in ("upgrade", "rollback"):
            value = getattr(self, name)
            if not isinstance(value, dt.timedelta) or value < dt.timedelta(0):
                raise ValueError(f"prediction {name} must be a timedelta >= 0, got {value!r}")

    @property
    def total(self) -> dt.timedelta:
        """What a window must still hold: the upgrade plus a rollback."""
        return self.upgrade + self.rollback


@dataclass(frozen=True)
class Admission:
    """The fleet flow's decision for one cluster, with a reason fit for the audit log.

    ``skipped`` is True when there is nothing to do (already on the target release): not
    admitted, but not a refusal either. ``window`` is the occurrence the decision was about
    (current or next), or None when no allowed window exists within the search horizon.
    """

    cluster: str
    admitted: bool
    reason: str
    window: WindowOccurrence | None
    skipped: bool = False


def _window_refusal(
    cluster: Cluster,
    now: dt.datetime,
    window: WindowOccurrence | None,
    prediction: Prediction,
) -> str | None:
    """Why the window does not allow the upgrade now, or None if it does."""
    if window is None or not window.contains(now):
        nxt = f"next: {_fmt(window.start)}" if window else "no allowed window within a year"
        latest = _occurrence(cluster, _latest_start_at_or_before(cluster.window, now))
        if latest.contains(now):
            nxt += f"; the window open now is blacked out ({latest.start.date()})"
        return f"outside its window ({nxt})"
    left = window.remaining(now)
    if left < prediction.total:
        return (
            f"window has {_floor_minutes(left)} left, needs {_ceil_minutes(prediction.total)} "
            f"(upgrade + rollback)"
        )
    return None


def admit(
    cluster: Cluster,
    now: dt.datetime,
    prediction: Prediction,
    *,
    fleet_blackouts: Sequence[Blackout] = (),
    current_release: str | None = None,
    target_release: str | None = None,
    override_window: bool = False,
) -> Admission:
    """May ``cluster`` start its upgrade at ``now``?

    In order: skipped when ``current_release == target_release`` (both given); refused when
    ``now`` is outside an allowed (not blacked out) window occurrence; refused when the window
    has less time left than ``prediction.upgrade + prediction.rollback``. With
    ``override_window`` (a hotfix) the window checks are bypassed and the reason says
    "window overridden", with what the checks would have said.
    """
    now = _utc(now, "now")
    window = current_or_next_window(cluster, now, fleet_blackouts)
    if current_release is not None and current_release == target_release:
        return Admission(
            cluster=cluster.name,
            admitted=False,
            reason=f"already on release {target_release}",
            window=window,
            skipped=True,
        )
    refusal = _window_refusal(cluster, now, window, prediction)
    if override_window:
        reason = "window overridden (hotfix)"
        reason += f": otherwise refused: {refusal}" if refusal else ": inside its window anyway"
        return Admission(cluster=cluster.name, admitted=True, reason=reason, window=window)
    if refusal is not None:
        return Admission(cluster=cluster.name, admitted=False, reason=refusal, window=window)
    assert window is not None  # no refusal means now is inside it
    return Admission(
        cluster=cluster.name,
        admitted=True,
        reason=(
            f"inside its window until {_fmt(window.end)}: {_floor_minutes(window.remaining(now))} "
            f"left, needs {_ceil_minutes(prediction.total)} (upgrade + rollback)"
        ),
        window=window,
    )


# ------------------------------------------------------------------------ waves


def order_waves(
    clusters: Sequence[Cluster], wave_order: Sequence[str]
) -> list[tuple[str, list[Cluster]]]:
    """Group ``clusters`` by ``cluster.wave``: waves of ``wave_order`` first, in that order,
    then unlisted waves sorted by name. Empty waves are omitted; clusters keep their order.

    A wave listed twice, or ``wave_order`` given as one string, raises InventoryError.
    """
    if isinstance(wave_order, str):
        raise InventoryError(
            f"wave order must be a list of wave names, got the string {wave_order!r}"
        )
    seen: set[str] = set()
    for wave in wave_order:
        if wave in seen:
            raise InventoryError(f"wave order lists wave {wave!r} twice")
        seen.add(wave)
    groups: dict[str, list[Cluster]] = {}
    for cluster in clusters:
        groups.setdefault(cluster.wave, []).append(cluster)
    ordered = [w for w in wave_order if w in groups]
    ordered += sorted(w for w in groups if w not in seen)
    return [(wave, groups[wave]) for wave in ordered]


@dataclass(frozen=True)
class WaveGate:
    """Whether the next wave may start, why, and how much bake time is left.

    ``bake_left`` is positive only when the previous wave passed its threshold and the wave
    waits for the bake time alone: waiting that long (and asking again) opens it.
    """

    open: bool
    reason: str
    bake_left: dt.timedelta = dt.timedelta(0)


def wave_gate(
    previous_results: Sequence[bool],
    *,
    success_threshold: float,
    finished_at: dt.datetime | None,
    bake: dt.timedelta,
    now: dt.datetime,
) -> WaveGate:
    """May the next wave start? (``wave_may_open``, with the bake time left as a value.)"""
    now = _utc(now, "now")
    if not 0.0 <= success_threshold <= 1.0:
        raise ValueError(f"success_threshold must be between 0 and 1, got {success_threshold}")
    if bake < dt.timedelta(0):
        raise ValueError(f"bake must be >= 0, got {bake}")
    if finished_at is not None:
        finished_at = _utc(finished_at, "finished_at")
    if not previous_results:
        return WaveGate(True, "first wave: no previous wave to wait for")
    if finished_at is None:
        return WaveGate(False, "previous wave has not finished")
    ok, total = sum(1 for r in previous_results if r), len(previous_results)
    ratio = ok / total
    score = f"previous wave succeeded on {ok}/{total} clusters ({ratio:.0%})"
    if ratio < success_threshold:
        return WaveGate(False, f"{score}, below the {success_threshold:.0%} threshold")
    elapsed = now - finished_at
    if elapsed < bake:
        return WaveGate(
            False,
            f"{score}; baking until {_fmt(finished_at + bake)} "
            f"({_floor_minutes(max(elapsed, dt.timedelta(0)))} of {_ceil_minutes(bake)} elapsed)",
            bake_left=bake - elapsed,
        )
    return WaveGate(
        True, f"{score}, threshold {success_threshold:.0%}; baked {_ceil_minutes(bake)}"
    )


def wave_may_open(
    previous_results: Sequence[bool],
    *,
    success_threshold: float,
    finished_at: dt.datetime | None,
    bake: dt.timedelta,
    now: dt.datetime,
) -> tuple[bool, str]:
    """May the next wave start? Returns ``(open, reason)``.

    ``previous_results`` holds one success flag per cluster of the previous wave; empty means
    there is no previous wave (the first wave is always open). Otherwise the wave opens only if
    the previous one has finished (``finished_at`` not None), its success ratio is
    ``>= success_threshold`` (0..1) and ``bake`` has elapsed since ``finished_at``.
    """
    gate = wave_gate(
        previous_results,
        success_threshold=success_threshold,
        finished_at=finished_at,
        bake=bake,
        now=now,
    )
    return gate.open, gate.reason


# ------------------------------------------------------------------------ error budget

_COUNT = re.compile(r"^\s*(\d+)\s*$")
_PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")


@dataclass(frozen=True)
class ErrorBudget:
    """How many cluster failures a fleet run tolerates before it stops admitting clusters.

    ``allowed`` failures are tolerated; the next one exhausts the budget
    (``exhausted(failures)`` is ``failures > allowed``). With a budget of 0, the first failure
    stops admission. A percentage is of the selected cluster count, rounded down: "10%" of 25
    clusters allows 2 failures, of 5 clusters allows 0.
    """

    allowed: int
    spec: str

    def __post_init__(self) -> None:
        if isinstance(self.allowed, bool) or not isinstance(self.allowed, int) or self.allowed < 0:
            raise InventoryError(f"error budget must allow >= 0 failures, got {self.allowed!r}")

    @classmethod
    def parse(cls, value: int | str, *, selected: int) -> ErrorBudget:
        """From a count (int >= 0, or its string) or a percentage string such as "10%"."""
        if isinstance(selected, bool) or not isinstance(selected, int) or selected < 0:
            raise ValueError(f"selected cluster count must be an int >= 0, got {selected!r}")
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 0:
                raise InventoryError(f"error budget must be >= 0, got {value}")
            return cls(allowed=value, spec=str(value))
        if isinstance(value, str):
            if match := _COUNT.match(value):
                return cls(allowed=int(match.group(1)), spec=value.strip())
            if match := _PERCENT.match(value):
                try:
                    percent = Fraction(Decimal(match.group(1)))
                except InvalidOperation:  # pragma: no cover - the regex admits only numbers
                    percent = Fraction(-1)
                if 0 <= percent <= 100:
                    allowed = math.floor(percent * selected / 100)
                    return cls(allowed=allowed, spec=f"{match.group(1)}% of {selected}")
                raise InventoryError(f"error budget percentage must be 0-100%, got {value!r}")
        raise InventoryError(
            f"error budget must be a count (int >= 0) or a percentage such as '10%', got {value!r}"
        )

    def exhausted(self, failures: int) -> bool:
        """True once ``failures`` exceeds the allowed count: admit no more clusters."""
        if failures < 0:
            raise ValueError(f"failures must be >= 0, got {failures}")
        return failures > self.allowed

    def remaining(self, failures: int) -> int:
        """Failures still tolerated after ``failures`` (0 when exhausted)."""
        return max(0, self.allowed - failures)

    def __str__(self) -> str:
        return f"error budget {self.spec}: {self.allowed} failure(s) tolerated"
