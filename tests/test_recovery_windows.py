"""Recovery as Lustre 2.15 does it, and a suspend that relies only on what holds (issue 18
item 7); judged from the emulator's ground truth and each server's own answers.

A target computes its recovery windows when it mounts, from ``timeout`` (soft 3 x shrunk by
imperative recovery, hard 9 x; a ``-P recovery_time_hard`` is overwritten:
lustre/obdclass/obd_mount_server.c ``server_calc_timeout``, v2_15_5). After the swap, the
first client to reconnect, an in-cluster one or the MDT, starts each target's soft timer;
the customers' clients still cut off when it expires are evicted.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from amlfs.lustre.procedures import SuspendPolicy
from amlfs.runtime import Connections
from amlfs.saga import Outcome, UpgradePolicy, UpgradeResult
from amlfs_sim.nodes.lustre import recovery_windows
from tests.conftest import Sim, upgrade_cluster
from tests.test_cluster_upgrade import RELEASE, assert_customer_safe


def upgrade(
    sim: Sim,
    conns: Connections,
    store_dir: Path,
    policy: UpgradePolicy | None = None,
    runner: Callable[[str, Callable[[], Any]], Any] | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> UpgradeResult:
    return upgrade_cluster(sim, conns, store_dir, RELEASE, policy=policy, runner=runner, log=log)


def windows_reported(sim: Sim, node: str) -> dict[str, str]:
    out = (
        sim.shell(node)
        .run(["lctl", "get_param", "*.*.recovery_time_soft", "*.*.recovery_time_hard"])
        .stdout
    )
    return dict(line.split("=", 1) for line in out.splitlines())


def test_suspend_raises_what_holds_and_reads_back_what_the_servers_computed(
    sim: Sim, conns: Connections, tmp_path: Path
) -> None:
    seen: dict[str, Any] = {}
    messages: list[str] = []

    def runner(name: str, fn: Callable[[], Any]) -> Any:
        if name == "swap":
            seen["params log"] = dict(sim.customer()["persistent_params"])
        if name == "unsuspend":  # every server rebooted on the release, clients still out
            seen["oss0"] = windows_reported(sim, "eus01-oss0")
            seen["targets"] = sim.customer()["targets"]
        return fn()

    result = upgrade(sim, conns, tmp_path, runner=runner, log=messages.append)
    assert result.outcome is Outcome.UPGRADED, result.reason
    assert_customer_safe(sim, "2.15.6")
    # Only what survives a target restart went into the MGS's params log.
    assert seen["params log"]["timeout"] == "1200"
    assert "*.*.recovery_time_hard" not in seen["params log"]
    # Each target recomputed its windows from the raised timeout when it mounted.
    assert seen["oss0"] == {
        "obdfilter.amlfs-OST0000.recovery_time_soft": "1800",
        "obdfilter.amlfs-OST0000.recovery_time_hard": "10800",
    }
    assert {(t["recovery_time_soft"], t["recovery_time_hard"]) for t in seen["targets"]} == {
        (1800, 10800)
    }
    # The orchestrator read them back from each server before letting the clients in.
    back = next(m for m in messages if "letting clients back into" in m)
    for target in ("amlfs-MDT0000", "amlfs-OST0000", "amlfs-OST0001"):
        assert f"{target} RECOVERING (soft 1800 s, hard 10800 s" in back, back


def test_a_node_slow_to_come_back_does_not_keep_clients_out_past_the_recovery_window(
    sim: Sim, conns: Connections, tmp_path: Path
) -> None:
    # The primary agent crashes when it boots the release; the orchestrator would wait for
    # it up to 40 minutes. The MDS, OSSs and the in-cluster client are back long before, and
    # their connections started every target's 1800 s window with the customers still out.
    sim.fault(kind="node.boot", target="eus01-agtpri0", count=1)
    policy = UpgradePolicy(
        boot_timeout_s=2400, healthy_timeout_s=2400, downtime_budget_s=7200, lro_timeout_s=900
    )
    result = upgrade(sim, conns, tmp_path, policy=policy)
    customer = sim.customer()
    assert customer["evictions"] == 0, customer["eviction_log"]
    assert result.outcome is Outcome.ROLLED_BACK, result.reason
    assert "recovery window closes" in result.reason, result.reason
    assert_customer_safe(sim, "2.15.5")


def test_a_soft_window_the_recomputed_hard_limit_would_cut_is_refused() -> None:
    with pytest.raises(ValidationError, match="9 x timeout"):
        SuspendPolicy(timeout_s=100, recovery_time_soft_s=1000)
    assert SuspendPolicy(timeout_s=200, recovery_time_soft_s=1800).recovery_time_soft_s == 1800
    with pytest.raises(ValidationError, match="recovery_time_hard_s"):
        SuspendPolicy.model_validate({"recovery_time_hard_s": 2700})  # it would not hold


def test_the_windows_a_target_computes_at_mount() -> None:
    # obd_mount_server.c server_calc_timeout with imperative recovery (factor 5 of 10).
    assert recovery_windows(100, None) == (150, 900)
    assert recovery_windows(1200, None) == (1800, 10800)
    assert recovery_windows(1200, 5000) == (5000, 10800)  # a larger -P soft is kept
    assert recovery_windows(1200, 60) == (1800, 10800)
    assert recovery_windows(20, None) == (60, 180)  # OBD_RECOVERY_TIME_MIN = 2 x (20+5+5)
