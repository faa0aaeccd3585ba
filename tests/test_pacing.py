"""Pacing: status polls and node checks share a per-process rate, and waves ramp up."""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path
from typing import Any

from amlfs.clock import Pacer, ScaledClock
from amlfs.fleet import FleetPolicy, FleetRunner, PlanRow
from amlfs.models import Cluster
from amlfs.runtime import Connections, from_endpoint
from amlfs.store import StateStore
from tests.conftest import Sim
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
    assert elapsed < 39 / 20 + 2.0
    assert pacer.waited_s > 0


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


def test_a_wave_ramps_up_one_start_per_interval_without_serializing(
    sim: Sim, conns: Connections, tmp_path: Path
) -> None:
    policy = FleetPolicy(
        waves=["all"],
        override_window=True,
        reason="test",
        max_parallel=3,
        max_per_subscription=3,
        max_per_region=3,
        error_budget=3,
        admit_every_s=0.4,
    )
    rows = [
        PlanRow(**{**r.__dict__, "wave": "all"}) for r in plan(sim, conns, policy, IN_EUS_WINDOW)
    ]
    starts: list[float] = []

    def slow(cluster: Cluster, should_abort: Any) -> dict[str, Any]:
        starts.append(time.monotonic())
        time.sleep(1.5)
        return {"cluster": cluster.name, "outcome": "upgraded"}

    store = StateStore(tmp_path)
    summary = FleetRunner(sim.world.fleet, rows, policy, slow, store, "ramp").run()
    assert summary.counts() == {"upgraded": 3}
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert len(gaps) == 2
    assert all(gap >= 0.35 for gap in gaps), gaps
    assert summary.max_in_flight == 3  # a ramp delays starts; it does not serialize them
