"""Servers up, clients cut off (issue 18 item 6): the window is short, free of conflicting
in-cluster I/O, and measured; judged from the emulator's ground truth.

While a server is up and its firewall cuts a client off, a conflicting request from inside
the cluster (the hydrator, a copytool, the in-cluster client's I/O) sends that client a
blocking callback it cannot answer, and it is evicted ``ldlm_bl_timeout`` (>= 100 s) later,
however high ``timeout`` was raised (lustre/ldlm/ldlm_lockd.c, v2_15_5). ARM throttling the
servers' PUTs keeps them up, firewalled, for minutes: only a suspend that stopped that work
first keeps every client.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from amlfs.errors import HealthCheckError
from amlfs.lustre.procedures import BlockedWhileUp
from amlfs.runtime import Connections
from amlfs.saga import Outcome, UpgradePolicy, UpgradeResult
from tests.conftest import Sim, upgrade_cluster
from tests.test_cluster_upgrade import RELEASE, assert_customer_safe

AGENT_WORK = {"eus01-agtpri0": ("hydrator", "lhsmd"), "eus01-agtstd0": ("lhsmd",)}


def upgrade(
    sim: Sim,
    conns: Connections,
    store_dir: Path,
    runner: Callable[[str, Callable[[], Any]], Any] | None = None,
) -> UpgradeResult:
    policy = UpgradePolicy(lro_timeout_s=900, downtime_budget_s=3600)
    return upgrade_cluster(sim, conns, store_dir, RELEASE, policy=policy, runner=runner)


def agent_units(sim: Sim) -> dict[str, list[str]]:
    """What each agent itself says is running (systemctl over SSH)."""
    running = {}
    for node, units in AGENT_WORK.items():
        shell = sim.shell(node)
        running[node] = [
            u for u in units if shell.run(["systemctl", "is-active", u], check=False).status == 0
        ]
    return running


def test_servers_kept_up_by_throttled_puts_lose_no_client(
    sim: Sim, conns: Connections, tmp_path: Path
) -> None:
    # After the firewall went on, ARM throttles every PUT for 60 s at a time: the servers
    # stay up with their clients cut off for minutes (longer than ldlm_bl_timeout).
    seen: dict[str, Any] = {}

    def runner(name: str, fn: Callable[[], Any]) -> Any:
        if name == "swap":
            seen["before swap"] = agent_units(sim)
            sim.fault(
                kind="vm.put", target="eus01-[mo]*", mode="throttle", retry_after_s=60, count=9
            )
        return fn()

    result = upgrade(sim, conns, tmp_path, runner)
    assert result.outcome is Outcome.UPGRADED, result.reason
    customer = assert_customer_safe(sim, "2.15.6")
    # The window was long enough to evict anyone a conflicting request reached...
    assert customer["blocked_while_up_s"] > 150, customer["blocked_while_up_intervals"]
    # ...and nothing in the cluster sent a blocking callback to a client that was cut off.
    assert customer["lock_callbacks_to_blocked"] == 0, customer["lock_callback_log"]
    assert seen["before swap"] == {node: [] for node in AGENT_WORK}
    # The in-cluster work runs again afterwards.
    assert agent_units(sim) == {node: list(units) for node, units in AGENT_WORK.items()}
    # The orchestrator measured the window too (an upper bound of the emulator's figure).
    assert result.blocked_while_up_s >= customer["blocked_while_up_s"] - 1
    assert result.blocked_while_up_s < customer["blocked_while_up_s"] + 400


def test_the_window_is_short_on_a_plain_upgrade(
    sim: Sim, conns: Connections, tmp_path: Path
) -> None:
    result = upgrade(sim, conns, tmp_path)
    assert result.outcome is Outcome.UPGRADED, result.reason
    customer = assert_customer_safe(sim, "2.15.6")
    assert customer["lock_callbacks_to_blocked"] == 0, customer["lock_callback_log"]
    # Firewall on to the PUTs, then targets started to firewall off: a few minutes at most,
    # nothing close to what a raised timeout would let the ping evictor wait.
    assert 0 < customer["blocked_while_up_s"] < 600, customer["blocked_while_up_intervals"]
    assert result.blocked_while_up_s >= customer["blocked_while_up_s"] - 1


def test_the_way_back_with_nothing_swapped_starts_the_in_cluster_work_again(
    sim: Sim, conns: Connections, tmp_path: Path
) -> None:
    # Suspend took effect (work stopped, firewall on), then failed: nothing is swapped; the
    # way back lets the clients back and starts the hydrator and the copytools again.
    def runner(name: str, fn: Callable[[], Any]) -> Any:
        result = fn()
        if name == "suspend":
            raise HealthCheckError("injected: suspend failed after it took effect")
        return result

    result = upgrade(sim, conns, tmp_path, runner)
    assert result.outcome is Outcome.ROLLED_BACK, result.reason
    customer = assert_customer_safe(sim, "2.15.5")
    assert customer["lock_callbacks_to_blocked"] == 0, customer["lock_callback_log"]
    assert agent_units(sim) == {node: list(units) for node, units in AGENT_WORK.items()}
    assert not [op for op in sim.timeline()["operations"] if op["kind"] == "vm.put"]


def test_the_orchestrators_figure_is_the_union_of_every_servers_spans() -> None:
    window = BlockedWhileUp()
    window.start("oss0", 10.0)
    window.start("oss1", 12.0)
    window.start("oss0", 11.0)  # already counted from 10
    window.end("oss0", 20.0)
    window.end("oss1", 25.0)
    window.end("mds0", 30.0)  # never started: nothing
    assert window.total(100.0) == 15.0
    window.start("mds0", 50.0)
    assert window.total(60.0) == 25.0  # an open span counts up to now
    window.end_all(70.0)
    assert window.total(100.0) == 35.0
