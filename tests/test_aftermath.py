"""What a run says it left, measured by the run itself, judged by the emulator's ground truth.

Against Azure nothing outside the orchestrator counts the evictions a maintenance caused, the
data disks someone changed under it or the OS disks it left behind: the run reads them back
itself (``ClusterUpgrade._aftermath``): evictions from each server's kernel log by boot, each
VM's data-disk layout against preflight's, and each disk it made or replaced. Every
``upgrade_cluster`` in the suite compares these figures with the emulator's truth
(``assert_figures_match_the_truth``); the tests here make each figure non-zero on purpose,
so a product that under-reports (or counts what was there before it) fails.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from amlfs.jobs import ClusterOutcome
from amlfs.runtime import Connections
from amlfs.saga import Outcome, UpgradePolicy, UpgradeResult
from flows.cluster_upgrade import _artifact
from tests.conftest import Sim, upgrade_cluster
from tests.test_cluster_upgrade import RELEASE
from tests.test_nodes import firewall_servers, logged_evictions, stop_in_cluster_work

POLICY = UpgradePolicy(lro_timeout_s=900, downtime_budget_s=3600)


def upgrade(
    sim: Sim,
    conns: Connections,
    store_dir: Path,
    runner: Callable[[str, Callable[[], Any]], Any] | None = None,
    policy: UpgradePolicy = POLICY,
) -> UpgradeResult:
    return upgrade_cluster(sim, conns, store_dir, RELEASE, policy=policy, runner=runner)


def described(result: UpgradeResult) -> str:
    """The cluster artifact's description, as the Prefect UI shows it (escapes removed)."""
    _, description = _artifact(ClusterOutcome(**result.model_dump(mode="json")))
    return re.sub(r"\\(.)", r"\1", description)


def test_lock_callback_evictions_while_the_servers_wait_for_their_puts_are_counted(
    sim: Sim, conns: Connections, tmp_path: Path
) -> None:
    # The suspend stopped the in-cluster work and firewalled the clients; then the in-cluster
    # client writes (a conflicting request) and the PUTs are throttled: the servers stay up
    # past ldlm_bl_timeout (100 s) and evict every cut-off client holding a lock.
    def runner(name: str, fn: Callable[[], Any]) -> Any:
        if name == "swap":
            sim.shell("eus01-lclient0").run(["tee", "/lustre/amlfs/x"], stdin=b"x\n")
            sim.fault(
                kind="vm.put", target="eus01-[mo]*", mode="throttle", retry_after_s=60, count=6
            )
            sim.sleep(300)  # past ldlm_bl_timeout: evicted before any PUT can stop a server
        return fn()

    result = upgrade(sim, conns, tmp_path, runner)
    customer = sim.customer()
    assert customer["evictions"] == 4, customer["eviction_log"]
    assert result.evictions == 4, result
    assert result.unread == []
    assert "evictions 4," in described(result)


def test_evictions_logged_before_the_run_count_for_nothing(
    sim: Sim, conns: Connections, tmp_path: Path
) -> None:
    stop_in_cluster_work(sim)
    firewall_servers(sim, "-A")
    sim.sleep(600)  # the ping evictor drops all four clients
    firewall_servers(sim, "-D")
    sim.shell("eus01-agtpri0").run(["systemctl", "start", "hydrator", "lhsmd"])
    sim.shell("eus01-agtstd0").run(["systemctl", "start", "lhsmd"])
    sim.sleep(60)  # the clients reconnect
    assert sim.customer()["evictions"] == 4
    assert logged_evictions(sim) == 4  # in the servers' logs when the run starts
    result = upgrade(sim, conns, tmp_path)
    assert result.outcome is Outcome.UPGRADED, result.reason
    assert result.evictions == 0, result
    assert sim.customer()["evictions"] == 4  # none more


def test_old_disks_that_could_not_be_deleted_are_named(
    sim: Sim, conns: Connections, tmp_path: Path
) -> None:
    sim.fault(kind="disk.delete", target="eus01-oss*", mode="fail", status=403, count=100)
    result = upgrade(sim, conns, tmp_path)
    assert result.outcome is Outcome.UPGRADED, result.reason
    assert "old OS disks not removed" in result.reason
    state = sim.state(sim.cluster.name)
    assert state["leaked_disks"], state["leaked_disks"]
    assert result.leaked_disks == state["leaked_disks"]
    assert all(name.startswith("eus01-oss") for name in result.leaked_disks)
    assert f"leaked disks {len(result.leaked_disks)} (" in described(result)


def test_a_data_disk_detached_by_someone_else_during_the_run_is_reported(
    sim: Sim, conns: Connections, tmp_path: Path
) -> None:
    compute = sim.compute()
    rg = sim.cluster.resource_group

    def runner(name: str, fn: Callable[[], Any]) -> Any:
        result = fn()
        if name == "unsuspend":
            vm = compute.virtual_machines.get(rg, "eus01-oss0")
            vm.storage_profile.data_disks = vm.storage_profile.data_disks[:1]
            compute.virtual_machines.begin_create_or_update(rg, "eus01-oss0", vm).result()
        return result

    data_disk = {
        d.lun: d.name
        for d in compute.virtual_machines.get(rg, "eus01-oss0").storage_profile.data_disks
    }[1]
    result = upgrade(sim, conns, tmp_path, runner)
    assert result.data_disk_changes == [f"eus01-oss0 LUN 1: {data_disk} -> none"], result
    assert data_disk not in (result.leaked_disks or [])  # not one of the run's own disks
    assert "data-disk changes 1 (eus01-oss0 LUN 1:" in described(result)
