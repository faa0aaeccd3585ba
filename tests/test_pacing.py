"""Pacing: status polls and node checks share a per-process rate, and waves ramp up."""

from __future__ import annotations

import datetime as dt
import itertools
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from amlfs.clock import Pacer, ScaledClock
from amlfs.fleet import FleetPolicy, PlanRow
from amlfs.models import Cluster, Fleet, parse_fleet
from amlfs.runtime import Connections, from_endpoint
from amlfs.store import StateStore
from amlfs_sim.genfleet import generate_fleet
from tests.conftest import Sim, fleet_runner
from tests.test_fleet import IN_EUS_WINDOW, plan


def test_a_pacer_spaces_events_across_threads() -> None:
    clock = ScaledClock(50.0)
    pacer = Pacer(clock, per_second=20)
    start = clock.now()

    def ten() -> None:
        for _ in range(10):
            pacer.wait()

    threads = [threading.Thread(target=ten) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = clock.now() - start
    assert pacer.events == 40
    assert elapsed >= 39 / 20 - 0.05  # the 40th slot is 39 intervals after the first
    assert pacer.waited_s > 0
    # No upper bound on elapsed: how late a thread wakes is the machine's, not the pacer's.
    # That it never reserves a slot later than due is test_a_pacer_reserves_slots_back_to_back.


class StoppedClock:
    """A clock at 0 that records the sleeps asked of it and returns at once: every wait()
    then reserves from the same instant, so each delay is exactly its slot's."""

    time_scale = 1.0

    def __init__(self) -> None:
        self.sleeps: list[float] = []
        self._lock = threading.Lock()

    def now(self) -> float:
        return 0.0

    def to_real(self, seconds: float) -> float:
        return seconds

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.sleeps.append(seconds)


def test_a_pacer_reserves_slots_back_to_back() -> None:
    clock = StoppedClock()
    pacer = Pacer(clock, per_second=20, burst=3)
    threads = [threading.Thread(target=lambda: [pacer.wait() for _ in range(10)]) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # A burst of 3 goes at once; the other 37 are spaced one interval (1/20 s) apart.
    assert sorted(clock.sleeps) == [pytest.approx(k / 20) for k in range(1, 38)]
    assert pacer.waited_s == pytest.approx(sum(k / 20 for k in range(1, 38)))


def test_an_unpaced_pacer_never_waits() -> None:
    pacer = Pacer(ScaledClock(1.0), 0)
    started = time.monotonic()
    for _ in range(1000):
        pacer.wait()
    assert time.monotonic() - started < 0.5
    assert pacer.waited_s == 0


def test_operation_polls_and_node_checks_go_through_the_process_pacers(sim: Sim) -> None:
    azure, ssh = from_endpoint(sim.emulator.state_dir / "endpoint.json")
    # Slow enough that six VMs stopped at once must queue for their polls.
    azure = azure.model_copy(update={"max_polls_per_s": 0.5, "max_background_polls_per_s": 0.5})
    conns = Connections.create(azure, ssh)
    try:
        gateway = conns.gateway(sim.cluster.subscription_id)
        rg = sim.cluster.resource_group
        names = [node.name for node in sim.cluster.nodes]
        threads = [
            threading.Thread(target=gateway.power_off, args=(rg, name, 600)) for name in names
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert all(gateway.vm_info(rg, name).power_state == "stopped" for name in names)
        polls = conns.pacer("polls")
        assert polls.events >= len(names)
        assert polls.waited_s > 0, "six VMs polled at 0.5/s never waited: pacing is not wired"
        assert conns.pacer("background_polls").events == 0
    finally:
        conns.close()


def ramp_policy(clusters: int, admit_every_s: float) -> FleetPolicy:
    return FleetPolicy(
        waves=["all"],
        override_window=True,
        reason="test",
        max_parallel=clusters,
        max_per_subscription=clusters,
        max_per_region=clusters,
        error_budget=clusters,
        admit_every_s=admit_every_s,
    )


def test_a_wave_ramps_up_one_start_per_interval_without_serializing(
    sim: Sim, conns: Connections, tmp_path: Path
) -> None:
    policy = ramp_policy(3, 0.4)
    rows = [
        PlanRow(**{**r.__dict__, "wave": "all"}) for r in plan(sim, conns, policy, IN_EUS_WINDOW)
    ]
    starts: list[float] = []

    def slow(cluster: Cluster, should_abort: Any) -> dict[str, Any]:
        starts.append(time.monotonic())
        time.sleep(1.5)
        return {"cluster": cluster.name, "outcome": "upgraded"}

    store = StateStore(tmp_path)
    summary = fleet_runner(sim.world.fleet, rows, policy, slow, store, "ramp").run()
    assert summary.counts() == {"upgraded": 3}
    assert len(starts) == 3
    # The k-th start is never earlier than k intervals after the first.
    assert all(start - starts[0] >= k * 0.4 - 0.05 for k, start in enumerate(starts)), starts
    assert summary.max_in_flight == 3  # a ramp delays starts; it does not serialize them


def ramped_fleet(clusters: int) -> tuple[Fleet, list[PlanRow]]:
    """A generated fleet and its plan rows, for runs whose upgrade function touches nothing."""
    data = generate_fleet(clusters, 2)
    fleet = parse_fleet({k: v for k, v in data.items() if k != "emulator"})
    rows = [
        PlanRow(
            cluster=c.name,
            wave="all",
            subscription_id=c.subscription_id,
            region=c.region,
            window="override",
            window_end=None,
            current_release=None,
            run=True,
            skipped=False,
            reason="test",
            predicted_downtime_s=0.0,
        )
        for c in fleet.clusters
    ]
    return fleet, rows


def test_a_late_start_is_made_up_by_at_most_one_interval(tmp_path: Path) -> None:
    """Under load the loop wakes up late. Made to see 3 intervals go by at the first start, the
    ramp starts the next two clusters together (one interval made up, the schedule kept), and
    the one after a full interval later; it neither delays every later start nor bursts."""
    fleet, rows = ramped_fleet(4)
    jumped = threading.Event()
    offset = [0.0]
    starts: dict[str, float] = {}

    def now() -> dt.datetime:
        return dt.datetime.now(dt.UTC) + dt.timedelta(seconds=offset[0])

    def log(message: str) -> None:
        # When the runner starts a cluster, as its own loop sees it (not when a thread runs).
        if message.endswith("in flight)"):
            starts[message.split(":")[0]] = now().timestamp()

    def upgrade(cluster: Cluster, should_abort: Any) -> dict[str, Any]:
        if not jumped.is_set():
            jumped.set()
            time.sleep(0.05)  # the runner has scheduled the next start by now
            offset[0] += 1.2  # the loop "wakes up" 3 intervals later
        time.sleep(1.0)
        return {"cluster": cluster.name, "outcome": "upgraded"}

    summary = fleet_runner(
        fleet, rows, ramp_policy(4, 0.4), upgrade, StateStore(tmp_path), "late", now=now, log=log
    ).run()
    assert summary.counts() == {"upgraded": 4}
    times = sorted(starts.values())
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps[0] >= 1.1, gaps  # the jump
    assert gaps[1] < 0.2, gaps  # one interval made up at once (measuring from the start: 0.4)
    assert gaps[2] >= 0.35, gaps  # never more than one


def test_successes_are_recorded_within_seconds_and_failures_at_once(tmp_path: Path) -> None:
    """The fleet record is rewritten for a failure at once (a resume never re-runs it) and for
    successes at most every SAVE_SUCCESSES_EVERY_S; nothing is left out at the end."""
    fleet, rows = ramped_fleet(6)
    store = StateStore(tmp_path)
    seen_in_record: dict[str, bool] = {}
    failing = rows[2].cluster

    def upgrade(cluster: Cluster, should_abort: Any) -> dict[str, Any]:
        return {
            "cluster": cluster.name,
            "outcome": "rolled_back" if cluster.name == failing else "upgraded",
        }

    def on_result(summary: Any, cluster: str) -> None:
        record = store.get("fleet-runs", "coalesced") or {"results": {}}
        seen_in_record[cluster] = cluster in record["results"]

    summary = fleet_runner(
        fleet, rows, ramp_policy(6, 0.0), upgrade, store, "coalesced", on_result=on_result
    ).run()
    assert summary.counts() == {"upgraded": 5, "rolled_back": 1}
    assert seen_in_record[failing] is True
    # Six results within milliseconds: the first is written, the next successes wait.
    assert sum(seen_in_record.values()) < len(rows), seen_in_record
    record = store.get("fleet-runs", "coalesced")
    assert record is not None
    assert set(record["results"]) == {r.cluster for r in rows}
