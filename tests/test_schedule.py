"""Weekly windows, blackouts, admission, waves and the error budget (amlfs.schedule)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amlfs.errors import InventoryError
from amlfs.models import Blackout, Cluster, DateRange, Window, is_blacked_out, parse_fleet
from amlfs.schedule import (
    SEARCH_HORIZON,
    Admission,
    ErrorBudget,
    Prediction,
    WindowOccurrence,
    admit,
    current_or_next_window,
    order_waves,
    wave_may_open,
    windows_opening_in,
)

UTC = dt.UTC
SUB = "4f6c1a52-7a3e-4d7e-9a55-2b1f0c9e8d01"
MIN = dt.timedelta(minutes=1)


def at(text: str) -> dt.datetime:
    """'2026-11-03 02:10' as an aware UTC datetime."""
    return dt.datetime.fromisoformat(text).replace(tzinfo=UTC)


def cluster_doc(
    name: str,
    day: str | int = "tuesday",
    start: str = "02:00",
    duration: int = 30,
    *,
    wave: str = "default",
    blackouts: list[Any] | None = None,
) -> dict[str, Any]:
    return {
        "name": name,
        "subscription_id": SUB,
        "resource_group": f"rg-{name}",
        "region": "eastus",
        "wave": wave,
        "window": {"day_of_week": day, "start_utc": start, "duration_min": duration},
        "blackout_dates": blackouts or [],
        "nodes": [{"name": f"{name}-mds0", "role": "mds"}, {"name": f"{name}-oss0", "role": "oss"}],
    }


def make_cluster(*args: Any, **kwargs: Any) -> Cluster:
    return Cluster.model_validate(cluster_doc(*args, **kwargs))


# ------------------------------------------------------------------------ occurrences


def test_occurrence_is_half_open_and_counts_remaining_time() -> None:
    occ = WindowOccurrence("c", at("2026-11-03 02:00"), at("2026-11-03 02:30"))
    assert occ.contains(at("2026-11-03 02:00"))
    assert occ.contains(at("2026-11-03 02:29:59"))
    assert not occ.contains(at("2026-11-03 02:30"))
    assert not occ.contains(at("2026-11-03 01:59:59"))
    assert occ.remaining(at("2026-11-03 02:10")) == 20 * MIN
    assert occ.remaining(at("2026-11-03 01:00")) == 30 * MIN  # not open yet: the whole window
    assert occ.remaining(at("2026-11-03 03:00")) == dt.timedelta(0)


def test_occurrence_refuses_naive_and_empty_intervals() -> None:
    with pytest.raises(ValueError, match="start"):
        WindowOccurrence("c", dt.datetime(2026, 11, 3, 2), at("2026-11-03 02:30"))
    with pytest.raises(ValueError, match="not after its start"):
        WindowOccurrence("c", at("2026-11-03 02:30"), at("2026-11-03 02:30"))
    occ = WindowOccurrence("c", at("2026-11-03 02:00"), at("2026-11-03 02:30"))
    with pytest.raises(ValueError, match=r"\bt\b"):
        occ.contains(dt.datetime(2026, 11, 3, 2, 10))


def test_window_containing_now_is_returned() -> None:
    c = make_cluster("a", "tuesday", "02:00", 30)  # 2026-11-03 is a Tuesday
    occ = current_or_next_window(c, at("2026-11-03 02:10"))
    assert occ == WindowOccurrence("a", at("2026-11-03 02:00"), at("2026-11-03 02:30"))
    assert occ.remaining(at("2026-11-03 02:10")) == 20 * MIN


def test_window_at_its_end_gives_next_week() -> None:
    c = make_cluster("a", "tuesday", "02:00", 30)
    occ = current_or_next_window(c, at("2026-11-03 02:30"))
    assert occ is not None
    assert occ.start == at("2026-11-10 02:00")


def test_next_window_later_in_the_week() -> None:
    c = make_cluster("a", "thursday", "01:30", 60)
    occ = current_or_next_window(c, at("2026-11-03 12:00"))  # Tuesday
    assert occ is not None
    assert (occ.start, occ.end) == (at("2026-11-05 01:30"), at("2026-11-05 02:30"))


def test_week_wrap_sunday_late_into_monday() -> None:
    c = make_cluster("wrap", "sunday", "23:45", 30)  # 2026-11-01 is a Sunday
    inside = current_or_next_window(c, at("2026-11-02 00:10"))  # Monday, 10 min after midnight
    assert inside is not None
    assert (inside.start, inside.end) == (at("2026-11-01 23:45"), at("2026-11-02 00:15"))
    assert inside.remaining(at("2026-11-02 00:10")) == 5 * MIN
    after = current_or_next_window(c, at("2026-11-02 00:15"))
    assert after is not None
    assert after.start == at("2026-11-08 23:45")
    before = current_or_next_window(c, at("2026-11-01 23:44"))
    assert before is not None
    assert before.start == at("2026-11-01 23:45")


def test_window_crossing_midnight_midweek() -> None:
    c = make_cluster("mid", "thursday", "23:45", 30)
    occ = current_or_next_window(c, at("2026-11-06 00:05"))  # Friday
    assert occ is not None
    assert occ.start == at("2026-11-05 23:45")
    assert occ.end == at("2026-11-06 00:15")


def test_full_day_window() -> None:
    c = make_cluster("day", "tuesday", "00:00", 1440)
    occ = current_or_next_window(c, at("2026-11-03 23:59"))
    assert occ is not None
    assert occ.start == at("2026-11-03 00:00")
    assert occ.remaining(at("2026-11-03 23:59")) == MIN


def test_blackout_range_skips_a_week() -> None:
    c = make_cluster(
        "a", "tuesday", "02:00", 30, blackouts=[{"start": "2026-11-02", "end": "2026-11-08"}]
    )
    occ = current_or_next_window(c, at("2026-11-03 02:10"))  # inside a blacked-out window
    assert occ is not None
    assert occ.start == at("2026-11-10 02:00")


def test_blackout_is_decided_by_the_start_date() -> None:
    # The Sunday 23:45 window ends on Monday; a Monday blackout does not cancel it.
    monday_off = make_cluster("a", "sunday", "23:45", 30, blackouts=["2026-11-02"])
    occ = current_or_next_window(monday_off, at("2026-11-01 20:00"))
    assert occ is not None
    assert occ.start == at("2026-11-01 23:45")
    sunday_off = make_cluster("b", "sunday", "23:45", 30, blackouts=["2026-11-01"])
    occ = current_or_next_window(sunday_off, at("2026-11-02 00:05"))
    assert occ is not None
    assert occ.start == at("2026-11-08 23:45")


def test_fleet_wide_blackout_applies_too() -> None:
    c = make_cluster("a", "friday", "02:00", 30)
    occ = current_or_next_window(c, at("2026-12-20 00:00"), [dt.date(2026, 12, 25)])
    assert occ is not None
    assert occ.start == at("2027-01-01 02:00")
    occ = current_or_next_window(
        c,
        at("2026-12-20 00:00"),
        [dt.date(2026, 12, 25), DateRange(start=dt.date(2027, 1, 1), end=dt.date(2027, 1, 1))],
    )
    assert occ is not None
    assert occ.start == at("2027-01-08 02:00")


def test_no_window_within_a_year_gives_none() -> None:
    c = make_cluster(
        "a", "tuesday", "02:00", 30, blackouts=[{"start": "2026-01-01", "end": "2027-12-31"}]
    )
    assert current_or_next_window(c, at("2026-11-03 02:10")) is None


def test_search_stops_at_the_horizon() -> None:
    now = at("2026-11-03 03:00")  # Tuesday, just after the window; horizon ends 2027-11-04 03:00
    assert now + SEARCH_HORIZON == at("2027-11-04 03:00")
    almost = {"start": "2026-11-04", "end": "2027-11-01"}
    c = make_cluster("a", "tuesday", "02:00", 30, blackouts=[almost])
    occ = current_or_next_window(c, now)
    assert occ is not None
    assert occ.start == at("2027-11-02 02:00")  # the last Tuesday within the horizon
    beyond = {"start": "2026-11-04", "end": "2027-11-02"}
    c = make_cluster("a", "tuesday", "02:00", 30, blackouts=[beyond])
    assert current_or_next_window(c, now) is None


def test_aware_non_utc_now_is_converted() -> None:
    c = make_cluster("a", "tuesday", "02:00", 30)
    eastern = dt.timezone(dt.timedelta(hours=-5))
    now = dt.datetime(2026, 11, 2, 21, 10, tzinfo=eastern)  # Tuesday 02:10 UTC
    occ = current_or_next_window(c, now)
    assert occ is not None
    assert occ.start == at("2026-11-03 02:00")
    assert occ.start.tzinfo is UTC


def test_naive_now_is_refused_by_name() -> None:
    c = make_cluster("a")
    with pytest.raises(ValueError, match="now must be a timezone-aware"):
        current_or_next_window(c, dt.datetime(2026, 11, 3, 2, 10))
    with pytest.raises(ValueError, match="now must be a timezone-aware"):
        admit(c, dt.datetime(2026, 11, 3, 2, 10), Prediction(MIN, MIN))


# ------------------------------------------------------------------------ property tests


def _oracle(
    window: Window, blackouts: list[Blackout], now: dt.datetime
) -> tuple[dt.datetime, dt.datetime] | None:
    """Brute force, day by day: the first allowed occurrence that has not ended at ``now``."""
    now = now.astimezone(UTC)
    duration = dt.timedelta(minutes=window.duration_min)
    for offset in range(-8, 380):
        day = now.date() + dt.timedelta(days=offset)
        if day.weekday() != window.day_of_week.weekday:
            continue
        start = dt.datetime.combine(day, window.start_time, tzinfo=UTC)
        if start + duration <= now:
            continue
        if start > now + SEARCH_HORIZON:
            return None
        if not is_blacked_out(day, blackouts):
            return start, start + duration
    return None


ZONES = st.sampled_from(
    [UTC, dt.timezone(dt.timedelta(hours=-7)), dt.timezone(dt.timedelta(hours=5, minutes=30))]
)
NOWS = st.datetimes(
    min_value=dt.datetime(2020, 1, 1), max_value=dt.datetime(2035, 1, 1), timezones=ZONES
)
DURATIONS = st.sampled_from([1, 15, 30, 60, 90, 1439, 1440]) | st.integers(1, 1440)
# (offset from now in days, length in days; 0 = a single date)
BLACKOUTS = st.lists(st.tuples(st.integers(-10, 40), st.integers(0, 20)), max_size=4)


def _blackouts(now: dt.datetime, specs: list[tuple[int, int]]) -> list[Blackout]:
    today = now.astimezone(UTC).date()
    out: list[Blackout] = []
    for offset, length in specs:
        start = today + dt.timedelta(days=offset)
        if length == 0:
            out.append(start)
        else:
            out.append(DateRange(start=start, end=start + dt.timedelta(days=length)))
    return out


@settings(max_examples=300, deadline=None, database=None)
@given(
    now=NOWS,
    day=st.integers(0, 6),
    hour=st.integers(0, 23),
    minute=st.integers(0, 59),
    duration=DURATIONS,
    own=BLACKOUTS,
    fleet_wide=BLACKOUTS,
)
def test_current_or_next_window_properties(
    now: dt.datetime,
    day: int,
    hour: int,
    minute: int,
    duration: int,
    own: list[tuple[int, int]],
    fleet_wide: list[tuple[int, int]],
) -> None:
    own_blackouts = _blackouts(now, own)
    fleet_blackouts = _blackouts(now, fleet_wide)
    c = make_cluster("p", day, f"{hour:02}:{minute:02}", duration)
    c = c.model_copy(update={"blackout_dates": own_blackouts})
    occ = current_or_next_window(c, now, fleet_blackouts)
    expected = _oracle(c.window, own_blackouts + fleet_blackouts, now)
    if occ is None:
        assert expected is None
        return
    utc_now = now.astimezone(UTC)
    assert occ.contains(now) or occ.start > utc_now
    assert occ.start.weekday() == day
    assert occ.start.time() == dt.time(hour, minute)
    assert occ.end - occ.start == dt.timedelta(minutes=duration)
    assert not is_blacked_out(occ.start.date(), own_blackouts + fleet_blackouts)
    # No earlier valid occurrence exists: the brute-force search finds exactly this one.
    assert (occ.start, occ.end) == expected


@settings(max_examples=25, deadline=None, database=None)
@given(
    tick_offset=st.integers(0, 14 * 60 + 59),
    first=st.datetimes(min_value=dt.datetime(2024, 1, 1), max_value=dt.datetime(2030, 1, 1)),
    windows=st.lists(
        st.tuples(st.integers(0, 6), st.integers(0, 23), st.integers(0, 59), DURATIONS),
        min_size=1,
        max_size=4,
    ),
)
def test_a_week_of_15_minute_ticks_opens_each_window_once(
    tick_offset: int, first: dt.datetime, windows: list[tuple[int, int, int, int]]
) -> None:
    fleet = parse_fleet(
        {
            "clusters": [
                cluster_doc(f"c{i}", d, f"{h:02}:{m:02}", dur)
                for i, (d, h, m, dur) in enumerate(windows)
            ]
        },
        source="test",
    )
    start = first.replace(tzinfo=UTC, second=0, microsecond=0) + dt.timedelta(seconds=tick_offset)
    tick = dt.timedelta(minutes=15)
    seen: list[WindowOccurrence] = []
    for i in range(7 * 24 * 4):
        a = start + i * tick
        opened = windows_opening_in(fleet, a, a + tick)
        assert all(a <= o.start < a + tick for o in opened)
        seen += opened
    assert sorted(o.cluster for o in seen) == sorted(c.name for c in fleet.clusters)
    for occ in seen:
        c = fleet.cluster(occ.cluster)
        assert occ.start.weekday() == c.window.day_of_week.weekday
        assert occ.start.time() == c.window.start_time


@settings(max_examples=150, deadline=None, database=None)
@given(
    now=NOWS,
    day=st.integers(0, 6),
    hour=st.integers(0, 23),
    duration=DURATIONS,
    upgrade=st.integers(0, 120),
    rollback=st.integers(0, 60),
)
def test_admission_only_inside_a_window_with_room(
    now: dt.datetime, day: int, hour: int, duration: int, upgrade: int, rollback: int
) -> None:
    c = make_cluster("p", day, f"{hour:02}:00", duration)
    prediction = Prediction(upgrade * MIN, rollback * MIN)
    decision = admit(c, now, prediction)
    occ = current_or_next_window(c, now)
    assert decision.window == occ
    assert occ is not None
    if decision.admitted:
        assert occ.contains(now)
        assert occ.remaining(now) >= prediction.total
    elif not occ.contains(now):
        assert decision.reason.startswith("outside its window (next: ")
    else:
        assert occ.remaining(now) < prediction.total
        assert decision.reason.endswith("(upgrade + rollback)")
    overridden = admit(c, now, prediction, override_window=True)
    assert overridden.admitted
    assert "window overridden" in overridden.reason


# ------------------------------------------------------------------------ scheduled ticks


def test_windows_opening_in_a_tick_with_fleet_and_cluster_blackouts() -> None:
    fleet = parse_fleet(
        {
            "blackout_dates": ["2026-12-25"],
            "clusters": [
                cluster_doc("a", "friday", "02:00"),
                cluster_doc("b", "friday", "02:10"),
                cluster_doc("c", "friday", "02:15"),  # next tick
                cluster_doc("d", "thursday", "02:00"),
                cluster_doc("e", "tuesday", "02:05", blackouts=["2026-12-01"]),
            ],
        },
        source="test",
    )
    tick = dt.timedelta(minutes=15)
    normal = windows_opening_in(fleet, at("2026-12-18 02:00"), at("2026-12-18 02:00") + tick)
    assert [(o.cluster, o.start) for o in normal] == [
        ("a", at("2026-12-18 02:00")),
        ("b", at("2026-12-18 02:10")),
    ]
    assert normal[0].end == at("2026-12-18 02:30")
    # Christmas is a fleet-wide blackout: nothing opens.
    assert windows_opening_in(fleet, at("2026-12-25 02:00"), at("2026-12-25 02:15")) == []
    # A cluster's own blackout.
    assert windows_opening_in(fleet, at("2026-12-01 02:00"), at("2026-12-01 02:15")) == []
    assert [
        o.cluster for o in windows_opening_in(fleet, at("2026-12-08 02:00"), at("2026-12-08 02:15"))
    ] == ["e"]


def test_windows_opening_in_refuses_naive_or_reversed_ticks() -> None:
    fleet = parse_fleet({"clusters": [cluster_doc("a")]}, source="test")
    with pytest.raises(ValueError, match="tick_end must be a timezone-aware"):
        windows_opening_in(fleet, at("2026-12-18 02:00"), dt.datetime(2026, 12, 18, 2, 15))
    with pytest.raises(ValueError, match="tick_start must be a timezone-aware"):
        windows_opening_in(fleet, dt.datetime(2026, 12, 18, 2, 15), at("2026-12-18 02:00"))
    with pytest.raises(ValueError, match="before tick_start"):
        windows_opening_in(fleet, at("2026-12-18 02:15"), at("2026-12-18 02:00"))


def test_example_fleet_ticks() -> None:
    """The scus window (Thursday 23:45) opens in the 23:45 tick, not in the one after midnight."""
    fleet = parse_fleet(
        {
            "blackout_dates": ["2026-12-25"],
            "clusters": [cluster_doc("scus", "thursday", "23:45")],
        },
        source="test",
    )
    opened = windows_opening_in(fleet, at("2026-11-05 23:45"), at("2026-11-06 00:00"))
    assert [o.start for o in opened] == [at("2026-11-05 23:45")]
    assert windows_opening_in(fleet, at("2026-11-06 00:00"), at("2026-11-06 00:15")) == []


# ------------------------------------------------------------------------ admission


PREDICTION = Prediction(upgrade=15 * MIN, rollback=10 * MIN)


def test_admitted_inside_a_window_with_room() -> None:
    c = make_cluster("a", "tuesday", "02:00", 30)
    decision = admit(c, at("2026-11-03 02:00"), PREDICTION)
    assert decision.admitted
    assert not decision.skipped
    assert decision.cluster == "a"
    assert decision.window is not None
    assert decision.window.start == at("2026-11-03 02:00")
    assert "30 min left, needs 25 min" in decision.reason


def test_already_on_release_is_skipped() -> None:
    c = make_cluster("a")
    decision = admit(
        c, at("2026-11-03 02:00"), PREDICTION, current_release="2.15.6", target_release="2.15.6"
    )
    assert decision == Admission(
        cluster="a",
        admitted=False,
        reason="already on release 2.15.6",
        window=decision.window,
        skipped=True,
    )
    other = admit(
        c, at("2026-11-03 02:00"), PREDICTION, current_release="2.15.5", target_release="2.15.6"
    )
    assert other.admitted


def test_refused_outside_the_window_names_the_next_one() -> None:
    c = make_cluster("a", "tuesday", "02:00", 30)
    decision = admit(c, at("2026-11-04 12:00"), PREDICTION)
    assert not decision.admitted
    assert not decision.skipped
    assert decision.reason == "outside its window (next: Tue 2026-11-10 02:00 UTC)"


def test_refused_when_the_window_is_blacked_out_now() -> None:
    c = make_cluster("a", "tuesday", "02:00", 30)
    decision = admit(c, at("2026-11-03 02:05"), PREDICTION, fleet_blackouts=[dt.date(2026, 11, 3)])
    assert not decision.admitted
    assert decision.reason == (
        "outside its window (next: Tue 2026-11-10 02:00 UTC; "
        "the window open now is blacked out (2026-11-03))"
    )


def test_refused_when_no_room_for_upgrade_plus_rollback() -> None:
    c = make_cluster("a", "tuesday", "02:00", 30)
    decision = admit(c, at("2026-11-03 02:20"), PREDICTION)
    assert not decision.admitted
    assert decision.reason == "window has 10 min left, needs 25 min (upgrade + rollback)"
    # Exactly enough is enough.
    assert admit(c, at("2026-11-03 02:05"), PREDICTION).admitted
    assert not admit(c, at("2026-11-03 02:05:01"), PREDICTION).admitted


def test_refusal_rounds_so_the_numbers_never_look_equal() -> None:
    c = make_cluster("a", "tuesday", "02:00", 30)
    prediction = Prediction(upgrade=dt.timedelta(minutes=20, seconds=0.5), rollback=dt.timedelta(0))
    decision = admit(c, at("2026-11-03 02:10"), prediction)
    assert decision.reason == "window has 20 min left, needs 20 min 1 s (upgrade + rollback)"


def test_override_bypasses_the_window_and_says_so() -> None:
    c = make_cluster("a", "tuesday", "02:00", 30)
    outside = admit(c, at("2026-11-04 12:00"), PREDICTION, override_window=True)
    assert outside.admitted
    assert outside.reason.startswith("window overridden")
    assert "outside its window" in outside.reason
    short = admit(c, at("2026-11-03 02:25"), PREDICTION, override_window=True)
    assert short.admitted
    assert "window overridden" in short.reason
    assert "needs 25 min" in short.reason
    # Already on the release still wins over an override: nothing to do.
    same = admit(
        c,
        at("2026-11-04 12:00"),
        PREDICTION,
        override_window=True,
        current_release="x",
        target_release="x",
    )
    assert same.skipped
    assert not same.admitted


def test_prediction_refuses_negative_durations() -> None:
    with pytest.raises(ValueError, match="rollback"):
        Prediction(upgrade=MIN, rollback=-MIN)
    assert Prediction(upgrade=MIN, rollback=2 * MIN).total == 3 * MIN


# ------------------------------------------------------------------------ waves


def test_order_waves_listed_first_then_unlisted_by_name() -> None:
    clusters = [
        make_cluster("a", wave="wave2"),
        make_cluster("b", wave="canary"),
        make_cluster("c", wave="zeta"),
        make_cluster("d", wave="wave2"),
        make_cluster("e", wave="alpha"),
    ]
    ordered = order_waves(clusters, ["canary", "wave1", "wave2"])
    assert [(w, [c.name for c in cs]) for w, cs in ordered] == [
        ("canary", ["b"]),
        ("wave2", ["a", "d"]),  # wave1 has no cluster: omitted
        ("alpha", ["e"]),
        ("zeta", ["c"]),
    ]
    assert order_waves([], ["canary"]) == []


def test_order_waves_refuses_duplicates_and_a_bare_string() -> None:
    with pytest.raises(InventoryError, match="'canary' twice"):
        order_waves([make_cluster("a")], ["canary", "canary"])
    with pytest.raises(InventoryError, match="'canary'"):
        order_waves([make_cluster("a")], "canary")


def _gate(results: list[bool], finished: dt.datetime | None, now: dt.datetime) -> tuple[bool, str]:
    return wave_may_open(
        results,
        success_threshold=0.9,
        finished_at=finished,
        bake=dt.timedelta(minutes=30),
        now=now,
    )


def test_first_wave_is_always_open() -> None:
    is_open, reason = _gate([], None, at("2026-11-03 02:00"))
    assert is_open
    assert "first wave" in reason


def test_wave_waits_for_the_previous_one_to_finish() -> None:
    is_open, reason = _gate([True], None, at("2026-11-03 02:00"))
    assert not is_open
    assert reason == "previous wave has not finished"


def test_wave_closed_below_threshold() -> None:
    is_open, reason = _gate(
        [True] * 8 + [False] * 2, at("2026-11-03 01:00"), at("2026-11-03 05:00")
    )
    assert not is_open
    assert reason == "previous wave succeeded on 8/10 clusters (80%), below the 90% threshold"


def test_wave_at_threshold_waits_for_bake_then_opens() -> None:
    results = [True] * 9 + [False]
    finished = at("2026-11-03 02:00")
    is_open, reason = _gate(results, finished, at("2026-11-03 02:20"))
    assert not is_open
    assert "baking until Tue 2026-11-03 02:30 UTC (20 min of 30 min elapsed)" in reason
    is_open, reason = _gate(results, finished, at("2026-11-03 02:30"))
    assert is_open
    assert reason.startswith("previous wave succeeded on 9/10 clusters (90%)")


def test_wave_gate_validates_its_arguments() -> None:
    with pytest.raises(ValueError, match="finished_at must be a timezone-aware"):
        _gate([True], dt.datetime(2026, 11, 3, 2), at("2026-11-03 05:00"))
    with pytest.raises(ValueError, match="now must be a timezone-aware"):
        _gate([True], at("2026-11-03 02:00"), dt.datetime(2026, 11, 3, 5))
    with pytest.raises(ValueError, match="success_threshold"):
        wave_may_open(
            [True],
            success_threshold=1.5,
            finished_at=None,
            bake=dt.timedelta(0),
            now=at("2026-11-03 02:00"),
        )


# ------------------------------------------------------------------------ error budget


def test_error_budget_zero_stops_at_the_first_failure() -> None:
    budget = ErrorBudget.parse(0, selected=10)
    assert budget.allowed == 0
    assert not budget.exhausted(0)
    assert budget.exhausted(1)


def test_error_budget_count() -> None:
    budget = ErrorBudget.parse(2, selected=10)
    assert [budget.exhausted(n) for n in range(4)] == [False, False, False, True]
    assert budget.remaining(1) == 1
    assert budget.remaining(5) == 0
    assert ErrorBudget.parse("3", selected=10).allowed == 3


@pytest.mark.parametrize(
    ("spec", "selected", "allowed"),
    [
        ("10%", 25, 2),
        ("10%", 5, 0),  # rounded down: half a cluster is no cluster
        ("10%", 10, 1),
        ("100%", 7, 7),
        ("0%", 100, 0),
        ("2.5%", 80, 2),
        (" 50 % ", 3, 1),
        ("10%", 0, 0),
    ],
)
def test_error_budget_percentage(spec: str, selected: int, allowed: int) -> None:
    budget = ErrorBudget.parse(spec, selected=selected)
    assert budget.allowed == allowed
    assert not budget.exhausted(allowed)
    assert budget.exhausted(allowed + 1)


@pytest.mark.parametrize("value", [-1, "-1", "abc", "150%", "10 %%", "", True, 1.5])
def test_error_budget_refuses_bad_values_naming_them(value: Any) -> None:
    with pytest.raises(InventoryError) as caught:
        ErrorBudget.parse(value, selected=10)
    assert repr(value) in str(caught.value) or str(value) in str(caught.value)
