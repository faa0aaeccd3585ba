"""Rollouts across weekly windows (amlfs.rollout): stage gating, soak, approvals, the
rollout-wide budget, the forecast and the deadline; pure, without the emulator."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from amlfs import rollout as ro
from amlfs.errors import InventoryError
from amlfs.models import Fleet, parse_fleet
from amlfs.store import StateStore
from tests.test_schedule import at, cluster_doc

HOUR = dt.timedelta(hours=1)
UPGRADE = dt.timedelta(minutes=12)
# 2026-12-07 is a Monday.
START = at("2026-12-06 12:00")


def fleet() -> Fleet:
    """canary on Monday and Tuesday, wave1 on Wednesday/Thursday, wave2 on Monday/Friday."""
    return parse_fleet(
        {
            "clusters": [
                cluster_doc("can-a", "monday", "02:00", wave="canary"),
                cluster_doc("can-b", "tuesday", "02:00", wave="canary"),
                cluster_doc("w1-a", "monday", "03:00", wave="wave1"),
                cluster_doc("w1-b", "thursday", "02:00", wave="wave1"),
                cluster_doc("w2-a", "monday", "04:00", wave="wave2"),
                cluster_doc("w2-b", "friday", "02:00", wave="wave2"),
            ]
        }
    )


def strategy(**changes: object) -> ro.RolloutStrategy:
    base: dict[str, object] = {
        "stages": [
            {"name": "canary", "soak_hours": 24},
            {"name": "wave1", "soak_hours": 48, "success_threshold": 0.5},
            {"name": "wave2", "approval": True},
        ],
        "error_budget": 1,
    }
    base.update(changes)
    return ro.RolloutStrategy.model_validate(base)


def start(**changes: object) -> ro.Rollout:
    return ro.new_rollout(
        "r1",
        fleet(),
        release_version="2.15.6",
        release_file="release.yaml",
        fleet_file="fleet.yaml",
        strategy=strategy(**changes),
        now=START,
        by="alice",
    )


def gate(rollout: ro.Rollout, cluster: str, now: dt.datetime) -> tuple[bool, str]:
    return ro.cluster_gate(rollout, ro.stage_views(rollout, now), cluster)


def test_membership_is_fixed_at_start_and_every_cluster_needs_a_stage() -> None:
    rollout = start()
    assert rollout.members == {
        "can-a": "canary",
        "can-b": "canary",
        "w1-a": "wave1",
        "w1-b": "wave1",
        "w2-a": "wave2",
        "w2-b": "wave2",
    }
    with pytest.raises(InventoryError, match=r"no stage holds w2-a \(wave wave2\)"):
        ro.new_rollout(
            "r2",
            fleet(),
            release_version="2.15.6",
            release_file="r",
            fleet_file="f",
            strategy=strategy(stages=[{"name": "canary"}, {"name": "wave1"}]),
            now=START,
        )


def test_a_later_stage_waits_for_the_earlier_to_finish_and_soak() -> None:
    rollout = start()
    monday = at("2026-12-07 03:00")
    assert gate(rollout, "can-a", monday)[0]
    admitted, why = gate(rollout, "w1-a", monday)
    assert not admitted
    assert "waits for stage canary to finish" in why
    rollout = ro.record_outcome(rollout, "can-a", "upgraded", at=at("2026-12-07 02:12"))
    assert not gate(rollout, "w1-a", at("2026-12-08 01:00"))[0]  # can-b still pending
    rollout = ro.record_outcome(rollout, "can-b", "upgraded", at=at("2026-12-08 02:12"))
    admitted, why = gate(rollout, "w1-b", at("2026-12-08 03:00"))
    assert not admitted
    assert "soaking until Wed 2026-12-09 02:12 UTC" in why
    assert gate(rollout, "w1-b", at("2026-12-10 02:00"))[0]
    # A cluster already done is not admitted again.
    admitted, why = gate(rollout, "can-a", at("2026-12-14 02:00"))
    assert not admitted
    assert "done (upgraded" in why


def test_a_stage_below_its_threshold_halts_the_rollout_for_every_later_tick() -> None:
    rollout = start()
    rollout = ro.record_outcome(rollout, "can-a", "upgraded", at=at("2026-12-07 02:12"))
    rollout = ro.record_outcome(rollout, "can-b", "rolled_back", at=at("2026-12-08 02:20"))
    assert rollout.state == "halted"
    assert "stage canary succeeded on 1/2 clusters, below its 100% threshold" in (
        rollout.state_reason
    )
    for when in ("2026-12-10 02:00", "2026-12-30 02:00"):
        admitted, why = gate(rollout, "w1-b", at(when))
        assert not admitted
        assert "rollout halted" in why
    # Resuming as is would halt again at once: the operator is told to retry the failed.
    with pytest.raises(InventoryError, match="--retry-failed"):
        ro.resume(rollout, at=at("2026-12-09 09:00"), by="bob")
    resumed = ro.resume(rollout, at=at("2026-12-09 09:00"), by="bob", retry_failed=True)
    assert resumed.state == "active"
    assert gate(resumed, "can-b", at("2026-12-15 02:00")) == (
        True,
        "rollout r1, stage canary open (attempt 2)",
    )
    assert not gate(resumed, "w1-a", at("2026-12-15 02:00"))[0]


def test_the_rollout_wide_error_budget_halts_and_a_resume_forgives_what_was_spent() -> None:
    rollout = start(retry_rolled_back=True, error_budget=1)
    rollout = ro.record_outcome(rollout, "can-a", "rolled_back", at=at("2026-12-07 02:20"))
    assert rollout.state == "active"  # 1 tolerated; retried next window
    assert gate(rollout, "can-a", at("2026-12-14 02:00"))[0]
    rollout = ro.record_outcome(rollout, "can-a", "rolled_back", at=at("2026-12-14 02:20"))
    assert rollout.state == "halted"
    assert "2 failed upgrades" in rollout.state_reason
    resumed = ro.resume(rollout, at=at("2026-12-14 09:00"), by="bob", reason="image fixed")
    assert resumed.state == "active"
    assert resumed.forgiven_failures == 2
    assert [e.what for e in resumed.events][-1] == "resumed"


def test_an_approval_opens_the_stage_and_only_a_hotfix_with_a_reason_skips_it() -> None:
    rollout = start(
        stages=[{"name": "canary"}, {"name": "wave1"}, {"name": "wave2", "approval": True}]
    )
    for name in ("can-a", "can-b", "w1-a", "w1-b"):
        rollout = ro.record_outcome(rollout, name, "upgraded", at=at("2026-12-08 02:12"))
    admitted, why = gate(rollout, "w2-b", at("2026-12-11 02:00"))
    assert not admitted
    assert "awaiting approval (amlfs rollout approve r1 --stage wave2)" in why
    approved = ro.approve(rollout, "wave2", at=at("2026-12-10 10:00"), by="carol")
    assert gate(approved, "w2-b", at("2026-12-11 02:00"))[0]
    with pytest.raises(InventoryError, match="needs no approval"):
        ro.approve(rollout, "wave1", at=at("2026-12-10 10:00"), by="carol")
    with pytest.raises(InventoryError, match="hotfix_reason"):
        ro.new_rollout(
            "hf",
            fleet(),
            release_version="2.15.7",
            release_file="r",
            fleet_file="f",
            strategy=strategy(),
            now=START,
            skip_approvals=True,
        )
    hotfix = ro.new_rollout(
        "hf",
        fleet(),
        release_version="2.15.7",
        release_file="r",
        fleet_file="f",
        strategy=strategy(),
        now=START,
        skip_soak=True,
        skip_approvals=True,
        hotfix_reason="CVE-2026-1234",
    )
    assert hotfix.events[0].reason == "CVE-2026-1234"
    hotfix = ro.record_outcome(hotfix, "can-a", "upgraded", at=at("2026-12-07 02:12"))
    hotfix = ro.record_outcome(hotfix, "can-b", "upgraded", at=at("2026-12-08 02:12"))
    admitted, why = gate(hotfix, "w1-b", at("2026-12-08 03:00"))
    assert admitted, why


def test_every_cluster_upgraded_completes_the_rollout() -> None:
    rollout = start(stages=[{"name": "canary"}, {"name": "wave1"}, {"name": "wave2"}])
    for name in rollout.members:
        rollout = ro.record_outcome(rollout, name, "upgraded", at=at("2026-12-20 02:12"))
    assert rollout.state == "completed"
    # Outcomes that say nothing of the release change nothing once there is a result, and a
    # later run finding a cluster on the release does not move when its stage finished.
    assert ro.record_outcome(rollout, "can-a", "busy", at=at("2026-12-21 00:00")) == rollout
    again = ro.record_outcome(
        rollout, "can-a", "already_current", at=at("2026-12-28 02:00"), run_name="later"
    )
    assert again == rollout


def test_the_forecast_projects_each_stage_and_flags_the_deadline_on_day_one() -> None:
    rollout = start(deadline="2026-12-18T00:00:00Z")
    result = ro.forecast(rollout, fleet(), START, upgrade=UPGRADE)
    stages = {s.name: s for s in result.stages}
    # canary: Mon 02:00 and Tue 02:00 -> done Tue 02:12; soak 24 h -> wave1 opens Wed 02:12.
    assert stages["canary"].projected_done == at("2026-12-08 02:12")
    assert stages["wave1"].opens == at("2026-12-09 02:12")
    # wave1: Thu 02:00 (w1-b) and the Monday after (w1-a, 03:00) -> Mon 14 03:12; soak 48 h.
    assert stages["wave1"].projected_done == at("2026-12-14 03:12")
    assert stages["wave2"].opens == at("2026-12-16 03:12")
    # wave2: Fri 18 02:00 (w2-b) and Mon 21 04:00 (w2-a) -> after the deadline: both late.
    assert stages["wave2"].projected_done == at("2026-12-21 04:12")
    assert result.projected_done == at("2026-12-21 04:12")
    assert result.late == ("w2-a", "w2-b")
    assert result.hotfix_command is not None
    assert "--cluster w2-a --cluster w2-b" in result.hotfix_command
    assert "--hotfix-reason" in result.hotfix_command
    # The digest ignores the instant it was computed at: a no-op tick publishes nothing.
    later = ro.forecast(rollout, fleet(), START + HOUR, upgrade=UPGRADE)
    assert later.digest() == result.digest()
    moved = ro.record_outcome(rollout, "can-a", "upgraded", at=at("2026-12-07 02:12"))
    assert ro.forecast(moved, fleet(), START + HOUR, upgrade=UPGRADE).digest() != result.digest()


def test_a_halted_rollout_projects_nothing_more() -> None:
    rollout = ro.halt(start(), at=START, by="bob", reason="customer escalation")
    result = ro.forecast(rollout, fleet(), START, upgrade=UPGRADE)
    assert result.projected_done is None
    assert all(c.next_window is None for c in result.clusters)
    assert "rollout halted: customer escalation" in result.stages[0].reason


def test_blackouts_push_the_projection_to_the_next_allowed_window() -> None:
    docs = [
        cluster_doc("can-a", "monday", "02:00", wave="canary", blackouts=["2026-12-07"]),
    ]
    small = parse_fleet({"clusters": docs})
    rollout = ro.new_rollout(
        "r",
        small,
        release_version="v",
        release_file="r",
        fleet_file="f",
        strategy=ro.RolloutStrategy(stages=[ro.Stage(name="canary")]),
        now=START,
    )
    result = ro.forecast(rollout, small, START, upgrade=UPGRADE)
    assert result.clusters[0].next_window == at("2026-12-14 02:00")


def test_records_round_trip_through_the_store_and_a_name_is_taken_once(tmp_path: Path) -> None:
    book = ro.RolloutBook(StateStore(tmp_path))
    book.create(start())
    with pytest.raises(InventoryError, match="exists"):
        book.create(start())
    changed = book.change(
        "r1", lambda r: ro.record_outcome(r, "can-a", "upgraded", at=at("2026-12-07 02:12"))
    )
    assert book.get("r1") == changed
    assert [r.name for r in book.active()] == ["r1"]
    with pytest.raises(InventoryError, match="no rollout named 'nope'"):
        book.get("nope")


def test_strategy_files_are_checked_with_the_field_named(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("stages:\n  - {name: canary, soak_hours: 24}\n  - {name: wave1}\n")
    assert [s.name for s in ro.load_strategy(good).stages] == ["canary", "wave1"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages:\n  - {name: canary, soak_hours: -1}\n")
    with pytest.raises(InventoryError, match=r"stages\.0\.soak_hours"):
        ro.load_strategy(bad)
    twice = tmp_path / "twice.yaml"
    twice.write_text("stages:\n  - {name: canary}\n  - {name: canary}\n")
    with pytest.raises(InventoryError, match="canary repeated"):
        ro.load_strategy(twice)
    naive = tmp_path / "naive.yaml"
    naive.write_text("stages: [{name: a}]\ndeadline: 2026-12-18T00:00:00\n")
    with pytest.raises(InventoryError, match="deadline must carry a timezone"):
        ro.load_strategy(naive)


def test_the_census_reads_unknown_clusters_first_then_the_oldest_and_skips_fresh_ones() -> None:
    now = at("2026-12-08 12:00")
    seen = {
        "can-a": {"release": "2.15.5", "seen_at": (now - 30 * HOUR).isoformat()},
        "can-b": {"release": "2.15.5", "seen_at": (now - 2 * HOUR).isoformat()},  # fresh
        "w1-a": {"release": "2.15.5", "seen_at": (now - 50 * HOUR).isoformat()},
    }
    due = ro.census_due(fleet(), seen, now, batch=10, fresh_for=24 * HOUR)
    # Never read (fleet order), then the oldest reading first; can-b was read 2 hours ago.
    assert due == ["w1-b", "w2-a", "w2-b", "w1-a", "can-a"]
    assert ro.census_due(fleet(), seen, now, batch=2, fresh_for=24 * HOUR) == ["w1-b", "w2-a"]
    assert ro.census_due(fleet(), seen, now, batch=0, fresh_for=24 * HOUR) == []
    # Once every cluster was read within the freshness, a tick reads none.
    every = {c.name: {"release": "2.15.5", "seen_at": now.isoformat()} for c in fleet().clusters}
    assert ro.census_due(fleet(), every, now + HOUR, batch=10, fresh_for=24 * HOUR) == []
    counts, rows = ro.compliance(fleet(), seen, "2.15.6", START)
    assert counts == {"2.15.5": 3, "unknown": 3}
    assert {r.cluster for r in rows if r.behind_since == START} == {"can-a", "can-b", "w1-a"}


def test_the_forecast_says_what_the_next_24_hours_start_and_why_the_rest_wait() -> None:
    rollout = start()
    result = ro.forecast(rollout, fleet(), START, upgrade=UPGRADE)  # Sunday 12:00
    # Monday's windows: can-a at 02:00 starts; w1-a at 03:00 and w2-a at 04:00 are held by
    # their stages. Tuesday's can-b is more than 24 hours away.
    assert [(u.cluster, u.window, u.runs) for u in result.upcoming] == [
        ("can-a", at("2026-12-07 02:00"), True),
        ("w1-a", at("2026-12-07 03:00"), False),
        ("w2-a", at("2026-12-07 04:00"), False),
    ]
    assert "waits for stage canary to finish" in result.upcoming[1].why
    text = "\n".join(ro.forecast_lines(result))
    assert "next 24.0 h: 3 windows, 1 to start" in text
    assert "Mon 2026-12-07 02:00 UTC can-a (canary): starts" in text
    assert "Mon 2026-12-07 03:00 UTC w1-a (wave1): held: rollout r1, stage wave1:" in text
    # Done clusters drop out; a soak that ends before a window counts as ended at it.
    rollout = ro.record_outcome(rollout, "can-a", "upgraded", at=at("2026-12-07 02:12"))
    rollout = ro.record_outcome(rollout, "can-b", "upgraded", at=at("2026-12-08 02:12"))
    wednesday = ro.forecast(rollout, fleet(), at("2026-12-09 12:00"), upgrade=UPGRADE)
    assert [(u.cluster, u.runs) for u in wednesday.upcoming] == [("w1-b", True)]
    # The gate is the tick's: a window at 02:07 is started by the 02:00 tick, so a soak
    # that ends at 02:05 still holds it.
    odd = parse_fleet(
        {
            "clusters": [
                cluster_doc("can-a", "monday", "02:00", wave="canary"),
                cluster_doc("w1-a", "tuesday", "02:07", wave="wave1"),
            ]
        }
    )
    solo = ro.new_rollout(
        "r2",
        odd,
        release_version="2.15.6",
        release_file="release.yaml",
        fleet_file="fleet.yaml",
        strategy=strategy(stages=[{"name": "canary", "soak_hours": 24}, {"name": "wave1"}]),
        now=START,
        by="alice",
    )
    solo = ro.record_outcome(solo, "can-a", "upgraded", at=at("2026-12-07 02:05"))
    (late,) = ro.upcoming(solo, odd, at("2026-12-08 01:00"))
    assert (late.cluster, late.runs) == ("w1-a", False), late
    assert "soaking until Tue 2026-12-08 02:05 UTC" in late.why
    # A halted rollout starts nothing, and says why; an aborted one lists nothing.
    halted = ro.halt(rollout, at=at("2026-12-09 12:00"), by="bob", reason="escalation")
    (held,) = ro.forecast(halted, fleet(), at("2026-12-09 12:00"), upgrade=UPGRADE).upcoming
    assert (held.runs, held.why) == (False, "rollout r1 is halted: escalation")
    aborted = ro.abort(rollout, at=at("2026-12-09 12:00"), by="bob", reason="superseded")
    assert ro.upcoming(aborted, fleet(), at("2026-12-09 12:00")) == ()
