"""Halt and abort a running fleet run the way an operator does: ``amlfs control`` in another
process sets the Prefect Variable (on a real ``prefect server``) that the fleet flow reads
between admissions and that its clusters' upgrades read at step boundaries."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from amlfs_sim import Emulator
from amlfs_sim.spec import SimWorld
from tests.conftest import (
    REPO,
    PrefectServer,
    cli_args,
    control,
    fleet_record,
    held,
    hold,
    release,
    trust,
    wait_until,
)

pytestmark = pytest.mark.integration

FIRST = "lustre-eus-01"  # the canary wave: the first cluster admitted
OTHERS = {"lustre-weu-01", "lustre-scus-01"}


@pytest.fixture
def sim20(small_world: SimWorld, tmp_path: Path, prefect_server: PrefectServer) -> Iterator[Any]:
    # Its own emulator at 20 sim s per real second: a cluster takes ~15 real seconds, long
    # enough for an operator's command to land while it is in flight.
    emulator = Emulator(small_world, tmp_path / "sim", time_scale=20, seed=11)
    endpoint = emulator.start()
    http = httpx.Client(base_url=endpoint.control_url, verify=trust(endpoint), timeout=30)
    try:
        yield http
    finally:
        control(prefect_server, "run")  # the Variable outlives this test on the shared server
        http.close()
        emulator.stop()


def run_fleet(
    server: PrefectServer, tmp_path: Path, run_name: str, processes: int = 1
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "amlfs_cli",
            *cli_args("run-fleet", tmp_path / "sim" / "endpoint.json"),
            "--hotfix-reason",
            "control test",
            *(arg for name in (FIRST, *sorted(OTHERS)) for arg in ("--cluster", name)),
            "--max-parallel",
            "1",
            "--state-dir",
            str(tmp_path / "state"),
            "--run-name",
            run_name,
            "--processes",
            str(processes),
        ],
        env=server.env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def hold_in_flight(http: httpx.Client) -> None:
    """Keep the first cluster in flight until the product has shown that it read the
    operator's command (a handshake, not a margin: `amlfs control` is a Python process of its
    own, seconds to start on a loaded machine): its first swap PUT stays in progress until
    ``release``."""
    hold(http, "vm.put", "eus01-mds0")


def swapped(http: httpx.Client) -> bool:
    return any(e["type"] == "vm.os_disk_swapped" for e in http.get("/timeline").json()["events"])


def touched_clusters(http: httpx.Client, world: SimWorld) -> set[str]:
    """Clusters any of whose VMs or OS disks (named after their VM) an operation ran on."""
    vms = {node.name: cluster.name for cluster, node in world.fleet.iter_nodes()}
    return {
        next(c for vm, c in vms.items() if op["target"].startswith(vm))
        for op in http.get("/timeline").json()["operations"]
    }


def test_halt_from_another_process_stops_admitting_and_lets_the_cluster_in_flight_finish(
    sim20: httpx.Client, small_world: SimWorld, prefect_server: PrefectServer, tmp_path: Path
) -> None:
    control(prefect_server, "run")
    hold_in_flight(sim20)
    proc = run_fleet(prefect_server, tmp_path, "halted")
    wait_until("the first swap held", lambda: held(sim20), proc)
    control(prefect_server, "halt")
    wait_until(
        "the halt recorded",
        lambda: fleet_record(tmp_path, "halted").get("stopped") == "halted by operator",
        proc,
    )
    release(sim20)
    out, _ = proc.communicate(timeout=300)
    done = fleet_record(tmp_path, "halted")
    assert done["results"][FIRST]["outcome"] == "upgraded", out
    assert set(done["not_started"]) == OTHERS, out
    assert set(done["not_started"].values()) == {"halted by operator"}
    assert touched_clusters(sim20, small_world) == {FIRST}
    customer = sim20.get("/state", params={"cluster": FIRST}).json()["clusters"][FIRST]
    assert customer["serving"] is True
    assert customer["lustre_versions"] == ["2.15.6"]


@pytest.mark.parametrize("processes", [1, 2], ids=["in-process", "two-orchestrator-processes"])
def test_abort_from_another_process_rolls_back_the_cluster_in_flight(
    sim20: httpx.Client,
    small_world: SimWorld,
    prefect_server: PrefectServer,
    tmp_path: Path,
    processes: int,
) -> None:
    # With processes=2 the cluster runs in a child of the flow's process (amlfs.shards): the
    # abort travels Variable -> fleet flow -> that child.
    control(prefect_server, "run")
    # The first cluster cannot finish before the abort reaches it, however late: one
    # server's recovery never completes after its swap, and the wait for it asks for an
    # abort at every poll (without one it would fail the health check after 600 sim s).
    sim20.post(
        "/faults", json={"kind": "node.recovery", "target": "eus01-oss0", "mode": "hang"}
    ).raise_for_status()
    proc = run_fleet(prefect_server, tmp_path, "aborted", processes)
    wait_until("the first swap", lambda: swapped(sim20), proc)
    control(prefect_server, "abort")
    out, _ = proc.communicate(timeout=300)
    done = fleet_record(tmp_path, "aborted")
    assert done["results"][FIRST]["outcome"] == "rolled_back", out
    assert "abort" in done["results"][FIRST]["reason"], done["results"][FIRST]
    assert set(done["not_started"]) == OTHERS, out
    assert touched_clusters(sim20, small_world) == {FIRST}
    state = sim20.get("/state", params={"cluster": FIRST}).json()
    customer = state["clusters"][FIRST]
    assert customer["serving"] is True
    assert customer["lustre_versions"] == ["2.15.5"]
    assert customer["evictions"] == 0
    assert state["leaked_disks"] == []
    if processes > 1:
        # Only a cluster run in an orchestrator process of its own carries its pid.
        assert done["results"][FIRST]["orchestrator_pid"] not in (proc.pid, None)
