"""The way back undoes exactly what was done, in an order that keeps clients safe, and claims
``rolled_back`` only when the old release is verified serving: judged from the emulator's
ground truth and each node's own state over SSH, never from the orchestrator's claim.

A step that fails *after* its effect took place is the hard case (a session dropped after
the command ran, a crash between the change and the journal): the step runner here runs the
real step, then fails it, the way Prefect would see a task that raised at its very end.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from amlfs.errors import HealthCheckError
from amlfs.lustre.procedures import SuspendPolicy
from amlfs.models import load_release
from amlfs.runtime import Connections
from amlfs.saga import Outcome, UpgradePolicy, UpgradeResult
from amlfs.store import StateStore
from tests.conftest import REPO, Sim, upgrade_cluster
from tests.test_hsm_drain import LONG, World, assert_left_as_it_was, hsm_sim, world
from tests.test_hsm_drain import upgrade as upgrade_on

__all__ = ["hsm_sim", "world"]  # fixtures of the HSM fleet, used here too

RELEASE = load_release(REPO / "examples" / "release-2.15.6.yaml")


def fail_after(step: str) -> Callable[[str, Callable[[], Any]], Any]:
    """A step runner that runs every step, then fails ``step`` once it has taken effect."""

    def runner(name: str, fn: Callable[[], Any]) -> Any:
        result = fn()
        if name == step:
            raise HealthCheckError(f"injected: {step} failed after it took effect")
        return result

    return runner


def upgrade(
    sim: Sim,
    conns: Connections,
    store_dir: Path,
    *,
    runner: Callable[[str, Callable[[], Any]], Any] | None = None,
    policy: UpgradePolicy | None = None,
) -> UpgradeResult:
    return upgrade_cluster(sim, conns, store_dir, RELEASE, policy=policy, runner=runner)


def node_params(sim: Sim) -> dict[str, str]:
    """What the MDS itself says (not the orchestrator): the tunables suspend and the release
    change, and the HSM coordinator's state."""
    out = sim.shell("eus01-mds0").run(
        [
            "lctl",
            "get_param",
            "timeout",
            "at_max",
            "mdt.*.recovery_time_soft",
            "mdt.*.recovery_time_hard",
            "mdt.*.hsm_control",
        ]
    )
    params = {}
    for line in out.stdout.splitlines():
        name, _, value = line.partition("=")
        params[name.rsplit(".", 1)[-1] if name.startswith("mdt.") else name] = value
    return params


def assert_back_to_normal(sim: Sim, before: dict[str, str]) -> None:
    state = sim.state(sim.cluster.name)
    customer = state["clusters"][sim.cluster.name]
    assert {vm["os_image"].rsplit("/", 1)[-1] for vm in state["vms"]} == {"2.15.5"}
    assert all(vm["power_state"] == "running" for vm in state["vms"]), state["vms"]
    assert customer["serving"] is True, customer
    assert customer["evictions"] == 0, customer["eviction_log"]
    assert state["leaked_disks"] == []
    assert state["data_disk_changes"] == []
    for name, node in customer["nodes"].items():
        assert node["firewall_rules"] == 0, f"{name} still firewalled"
    assert node_params(sim) == before


@pytest.mark.parametrize("step", ["suspend", "swap", "restore", "unsuspend"])
def test_a_step_failing_after_its_effect_is_undone_and_only_then_claimed_rolled_back(
    sim: Sim, conns: Connections, tmp_path: Path, step: str
) -> None:
    before = node_params(sim)
    result = upgrade(sim, conns, tmp_path, runner=fail_after(step))
    assert result.outcome is Outcome.ROLLED_BACK, result.reason
    assert "injected" in result.reason
    # Suspend undone (firewall, timeouts, HSM), the release's tunable (at_max) undone too.
    assert_back_to_normal(sim, before)
    assert not (tmp_path / "clusters" / sim.cluster.name / "run.json").exists()


def test_an_hsm_drain_that_runs_out_of_time_undoes_the_raised_timeouts_and_hsm(
    world: World, tmp_path: Path
) -> None:
    # The drain fails after timeouts were raised and the coordinator disabled: suspend
    # failed half-way, before any server was firewalled. On a cluster copying large files
    # (tests/test_hsm_drain.py's fleet), so that the copies cannot have finished by chance.
    policy = UpgradePolicy(suspend=SuspendPolicy(hsm_drain_timeout_s=3))
    result = upgrade_on(world, LONG, tmp_path, policy)
    assert result.outcome is Outcome.ROLLED_BACK, result.reason
    assert "HSM requests still active" in result.reason
    # Judged from the nodes: timeout, recovery window and HSM back, no DROP rule, the
    # in-cluster work running, nothing swapped and nobody lost service.
    assert_left_as_it_was(world, LONG)


def test_a_world_that_cannot_be_brought_back_is_reported_so_not_rolled_back(
    sim: Sim, conns: Connections, tmp_path: Path
) -> None:
    # The new image fails to boot one node, and its old disk never comes back either: the
    # PUT that swaps that VM back hangs for good.
    sim.fault(kind="node.boot", target="eus01-oss1", code="BadImage", count=1)

    def runner(name: str, fn: Callable[[], Any]) -> Any:
        if name == "rollback: swap back":
            sim.fault(kind="vm.put", target="eus01-oss1", mode="hang")
        return fn()

    policy = UpgradePolicy(lro_timeout_s=120, boot_timeout_s=200, healthy_timeout_s=120)
    result = upgrade(sim, conns, tmp_path, runner=runner, policy=policy)
    assert result.outcome is Outcome.FAILED, result.reason
    assert "rollback incomplete" in result.reason
    assert "swap back" in result.reason
    # Honest, and nothing unsafe: timeouts stay raised while clients cannot be let back.
    assert "left raised" in result.reason
    state = sim.state(sim.cluster.name)
    assert sim.customer()["evictions"] == 0
    assert state["data_disk_changes"] == []
    journal = StateStore(tmp_path).get("clusters", sim.cluster.name, "run")
    assert journal is not None
    assert journal["phase"] == "needs_attention"


def test_an_abort_lands_inside_a_long_wait_not_at_the_next_step(
    sim: Sim, conns: Connections, tmp_path: Path
) -> None:
    # The operator aborts (or Prefect cancels) while the nodes are being waited for: the
    # cluster goes back from inside that wait, and the way back itself is not aborted.
    aborted = threading.Event()

    def runner(name: str, fn: Callable[[], Any]) -> Any:
        if name == "restore":
            aborted.set()
        return fn()

    before = node_params(sim)
    result = upgrade_cluster(
        sim, conns, tmp_path, RELEASE, runner=runner, should_abort=aborted.is_set
    )
    assert result.outcome is Outcome.ROLLED_BACK, result.reason
    assert "AbortRequestedError: operator abort while waiting on the nodes" in result.reason
    assert [t.status for t in result.steps if t.name == "restore"] == ["failed"]
    assert_back_to_normal(sim, before)


def test_an_agent_swapped_back_does_no_io_while_a_server_still_cuts_clients_off(
    sim: Sim, conns: Connections, tmp_path: Path
) -> None:
    # One server's swap is refused (it stays up on its old disk, firewalled), the others are
    # swapped. On the way back an agent boots its old disk, whose hydrator starts on its own,
    # while another server's swap back takes 300 s: the hydrator's I/O would send blocking
    # callbacks to the cut-off clients and evict them after 100 s.
    sim.fault(
        kind="vm.put",
        target="eus01-oss1",
        phase="accept",
        status=400,
        code="InvalidParameter",
        count=1,
    )

    def runner(name: str, fn: Callable[[], Any]) -> Any:
        if name == "rollback: swap back":
            sim.fault(kind="vm.put", target="eus01-oss0", mode="hang", hang_s=300, count=1)
        return fn()

    before = node_params(sim)
    result = upgrade(sim, conns, tmp_path, runner=runner)
    assert result.outcome is Outcome.ROLLED_BACK, result.reason
    customer = sim.customer()
    assert customer["lock_callbacks_to_blocked"] == 0, customer.get("lock_callback_log")
    assert_back_to_normal(sim, before)
