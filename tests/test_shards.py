"""Clusters run in several orchestrator processes (``amlfs.shards``): the fleet's caps stay in
the parent, the work happens in the children, and a child SIGKILLed in the middle of a swap
is started again and resumes its cluster from the journal, with no duplicate or leaked disk."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from amlfs.fleet import FleetPolicy, PlanRow
from amlfs.jobs import ClusterJob, ClusterOutcome
from amlfs.models import Cluster
from amlfs.runtime import Connections, from_endpoint
from amlfs.shards import ShardError, ShardPool, ShardSpec
from amlfs.store import StateStore
from tests.conftest import Sim, fleet_runner
from tests.test_crash_resume import wait_for_event
from tests.test_fleet import IN_EUS_WINDOW, RELEASE, cluster_intervals, plan

pytestmark = pytest.mark.integration


def spec(sim: Sim, state_dir: Path) -> ShardSpec:
    azure, ssh = from_endpoint(sim.emulator.state_dir / "endpoint.json")
    return ShardSpec(azure, ssh, str(state_dir))


def job(cluster: Cluster) -> ClusterJob:
    return ClusterJob(cluster=cluster, release=RELEASE)


def test_a_fleet_runs_in_two_orchestrator_processes_within_the_parents_caps(
    sim: Sim, conns: Connections, tmp_path: Path
) -> None:
    policy = FleetPolicy(
        waves=["all"],
        override_window=True,
        reason="test",
        max_parallel=3,
        max_per_subscription=1,
        error_budget=3,
    )
    rows = [
        PlanRow(**{**r.__dict__, "wave": "all"}) for r in plan(sim, conns, policy, IN_EUS_WINDOW)
    ]
    store = StateStore(tmp_path)
    logs: list[str] = []
    with ShardPool(spec(sim, tmp_path), 2, log=logs.append) as pool:
        pids = set(pool.pids())
        summary = fleet_runner(sim.world.fleet, rows, policy, pool, store, "shards").run()
    assert summary.counts() == {"upgraded": 3}, summary.results
    ran_in = {r["orchestrator_pid"] for r in summary.results.values()}
    assert ran_in <= pids
    assert os.getpid() not in ran_in
    assert len(ran_in) == 2  # the least busy process takes the next cluster
    # The cap is the parent's: two clusters of one subscription never overlapped.
    spans = cluster_intervals(sim)
    eus, weu = spans["lustre-eus-01"], spans["lustre-weu-01"]
    assert eus[1] <= weu[0] or weu[1] <= eus[0], spans
    assert any("lustre-scus-01" in line for line in logs)  # log lines reach the parent
    assert pool.stats.cpu_s > 0
    assert pool.stats.restarts == 0
    # Each shard froze its start-up objects and reported its full collections on exit.
    assert len(pool.stats.gc) == 2
    assert all(g["frozen_objects"] > 10_000 for g in pool.stats.gc), pool.stats.gc
    state = sim.state()
    assert state["leaked_disks"] == []
    assert state["data_disk_changes"] == []


def test_a_killed_orchestrator_process_is_restarted_and_its_cluster_resumes(
    sim: Sim, tmp_path: Path
) -> None:
    cluster = sim.world.fleet.cluster("lustre-eus-01")
    logs: list[str] = []
    results: dict[str, object] = {}
    with ShardPool(spec(sim, tmp_path), 2, log=logs.append) as pool:
        worker = threading.Thread(
            target=lambda: results.update(out=pool.run(job(cluster))), daemon=True
        )
        worker.start()
        wait_for_event(sim, "vm.os_disk_swapped")
        victim = pool.pid_running(cluster.name)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        worker.join(timeout=120)
        assert not worker.is_alive()
        assert pool.stats.restarts == 1
        assert victim not in pool.pids()
    outcome = results["out"]
    assert isinstance(outcome, ClusterOutcome)
    out = outcome.record()
    assert out["orchestrator_pid"] != victim
    assert out["outcome"] in ("upgraded", "rolled_back"), out
    assert any("died (signal 9)" in line for line in logs), logs
    assert out["resumed"] is True, out  # from the journal the killed process left
    assert out["outcome"] == "rolled_back", out  # killed mid-swap: back to the old disks
    assert "resumed after the orchestrator stopped at swapping" in out["reason"], out
    state = sim.state(cluster.name)
    customer = state["clusters"][cluster.name]
    assert customer["serving"] is True
    assert customer["evictions"] == 0
    assert state["leaked_disks"] == []
    assert state["data_disk_changes"] == []
    # No duplicates: one OS disk per VM.
    os_disks = [d for d in state["disks"] if d["os_type"] == "Linux"]
    assert len(os_disks) == len(state["vms"]), [d["name"] for d in os_disks]
    assert len({vm["os_image"] for vm in state["vms"]}) == 1


def test_a_process_that_keeps_dying_fails_its_cluster_with_the_reason(
    sim: Sim, tmp_path: Path
) -> None:
    cluster = sim.world.fleet.cluster("lustre-weu-01")
    errors: list[str] = []
    with ShardPool(spec(sim, tmp_path), 1, max_restarts=0) as pool:

        def run() -> None:
            try:
                pool.run(job(cluster))
            except ShardError as err:
                errors.append(str(err))

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        deadline = time.monotonic() + 30
        while pool.pid_running(cluster.name) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        victim = pool.pid_running(cluster.name)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        worker.join(timeout=30)
    assert len(errors) == 1
    assert "died (signal 9)" in errors[0], errors
    assert "resume it" in errors[0], errors


def test_a_pool_refuses_zero_processes(sim: Sim, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="processes must be >= 1"):
        ShardPool(spec(sim, tmp_path), 0)
