"""A cancel is an abort, from every entry point: a Prefect cancel of a fleet run or of a
cluster-upgrade flow run (the UI's Cancel: the run goes to Cancelling; a runner then sends
SIGTERM and, after its grace period, SIGKILL), or SIGTERM itself. The clusters in flight roll
back and every cluster's outcome is recorded; one still in flight when the process is killed
is recorded ``interrupted``, and running the same command again resumes it. Judged on the
emulator's ground truth, against a real ``prefect server``."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from amlfs_sim import Emulator
from amlfs_sim.spec import SimWorld
from tests.conftest import (
    RELEASE_FILE,
    REPO,
    SMALL_FLEET,
    PrefectServer,
    cli_args,
    fleet_record,
    held,
    hold,
    release,
    trust,
    wait_until,
)

pytestmark = pytest.mark.integration

FIRST = "lustre-eus-01"  # the canary wave: the first cluster admitted
SECOND = "lustre-weu-01"


@pytest.fixture
def slow_sim(small_world: SimWorld, tmp_path: Path) -> Iterator[httpx.Client]:
    # Its own emulator at 20 sim s per real second: a cluster takes ~15 real seconds, and
    # clients are evicted only after 90 real seconds blocked.
    emulator = Emulator(small_world, tmp_path / "sim", time_scale=20, seed=13)
    endpoint = emulator.start()
    http = httpx.Client(base_url=endpoint.control_url, verify=trust(endpoint), timeout=30)
    try:
        yield http
    finally:
        http.close()
        emulator.stop()


def hold_a_swap(http: httpx.Client, vm: str = "eus01-oss0") -> None:
    """The first cluster stays in flight until the test has seen the product take the cancel
    (a handshake, not a margin): one VM's swap PUT stays in progress until ``release``."""
    hold(http, "vm.put", vm)


def settle(http: httpx.Client) -> None:
    """Wait until the emulator has no operation in flight (a killed run's held swap ends)."""
    wait_until(
        "no operation in flight", lambda: not http.get("/state").json()["operations_in_flight"]
    )


def run_fleet(
    server: PrefectServer, tmp_path: Path, run_name: str, *clusters: str
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "amlfs_cli",
            *cli_args("run-fleet", tmp_path / "sim" / "endpoint.json"),
            "--hotfix-reason",
            "cancel test",
            *(arg for name in clusters for arg in ("--cluster", name)),
            "--max-parallel",
            "1",
            "--state-dir",
            str(tmp_path / "state"),
            "--run-name",
            run_name,
        ],
        env=server.env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def flow_run(server: PrefectServer, run_id: str) -> dict[str, Any]:
    return httpx.get(f"{server.url}/flow_runs/{run_id}", timeout=10).json()  # type: ignore[no-any-return]


def fleet_flow_run_id(server: PrefectServer, run_name: str) -> str:
    response = httpx.post(
        f"{server.url}/flow_runs/filter",
        json={
            "flows": {"name": {"any_": ["fleet-maintenance"]}},
            "sort": "EXPECTED_START_TIME_DESC",
            "limit": 200,
        },
        timeout=10,
    )
    response.raise_for_status()
    # Other tests' fleet runs share this server, some without a run_name parameter.
    (run,) = [
        r
        for r in response.json()
        if (r["parameters"].get("params") or {}).get("run_name") == run_name
    ]
    return str(run["id"])


def cancel(server: PrefectServer, run_id: str) -> None:
    """What the UI's Cancel button does."""
    response = httpx.post(
        f"{server.url}/flow_runs/{run_id}/set_state",
        json={"state": {"type": "CANCELLING", "name": "Cancelling"}},
        timeout=10,
    )
    response.raise_for_status()
    assert response.json()["status"] == "ACCEPT", response.text


def outcome(tmp_path: Path, run_name: str) -> str | None:
    """The first cluster's outcome in the fleet run's record, if any."""
    return fleet_record(tmp_path, run_name).get("results", {}).get(FIRST, {}).get("outcome")  # type: ignore[no-any-return]


def assert_serving_on(http: httpx.Client, cluster: str, version: str) -> None:
    state = http.get("/state", params={"cluster": cluster}).json()
    customer = state["clusters"][cluster]
    assert {vm["os_image"].rsplit("/", 1)[-1] for vm in state["vms"]} == {version}
    assert {vm["power_state"] for vm in state["vms"]} == {"running"}
    assert customer["serving"] is True
    assert customer["lustre_versions"] == [version]
    assert customer["evictions"] == 0, customer["eviction_log"]
    assert state["leaked_disks"] == []
    assert state["data_disk_changes"] == []
    for node in customer["nodes"].values():
        assert node["firewall_rules"] == 0


def test_a_prefect_cancel_of_a_fleet_run_rolls_back_the_cluster_in_flight(
    slow_sim: httpx.Client, prefect_server: PrefectServer, tmp_path: Path
) -> None:
    hold_a_swap(slow_sim)
    run_name = f"cancelled-{uuid.uuid4().hex[:8]}"
    proc = run_fleet(prefect_server, tmp_path, run_name, FIRST, SECOND)
    wait_until("the swap held", lambda: held(slow_sim), proc)
    run_id = fleet_flow_run_id(prefect_server, run_name)
    cancel(prefect_server, run_id)
    wait_until("the cancel taken", lambda: outcome(tmp_path, run_name) == "interrupted", proc)
    release(slow_sim)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, out
    done = fleet_record(tmp_path, run_name)
    assert done["results"][FIRST]["outcome"] == "rolled_back", out
    assert set(done["not_started"]) == {SECOND}, out
    assert done["not_started"][SECOND].startswith("cancelled")
    assert_serving_on(slow_sim, FIRST, "2.15.5")
    assert_serving_on(slow_sim, SECOND, "2.15.5")  # never touched
    state = flow_run(prefect_server, run_id)["state"]
    assert state["type"] == "CANCELLED", state
    assert "0 upgraded, 1 rolled_back, 0 failed_needs_attention, 1 not started" in state["message"]


def test_sigterm_then_a_kill_records_the_cluster_interrupted_and_a_resume_finishes_it(
    slow_sim: httpx.Client, prefect_server: PrefectServer, tmp_path: Path
) -> None:
    # Prefect's runner cancels a run with SIGTERM, then SIGKILL once its grace period is
    # over: here the kill lands while the cluster is still in flight (its swap hangs).
    hold_a_swap(slow_sim)
    run_name = f"killed-{uuid.uuid4().hex[:8]}"
    first = run_fleet(prefect_server, tmp_path, run_name, FIRST, SECOND)
    wait_until("the swap held", lambda: held(slow_sim), first)
    first.send_signal(signal.SIGTERM)
    wait_until("the SIGTERM taken", lambda: outcome(tmp_path, run_name) == "interrupted", first)
    first.send_signal(signal.SIGKILL)
    out, _ = first.communicate(timeout=30)
    killed = fleet_record(tmp_path, run_name)
    assert killed["results"][FIRST]["outcome"] == "interrupted", out
    assert "run again with the same run_name" in killed["results"][FIRST]["reason"]
    release(slow_sim)  # Azure finishes the swap the dead run started
    settle(slow_sim)

    second = run_fleet(prefect_server, tmp_path, run_name, FIRST, SECOND)
    out, _ = second.communicate(timeout=300)
    assert second.returncode == 0, out
    done = fleet_record(tmp_path, run_name)
    assert done["results"][FIRST]["outcome"] == "rolled_back", out
    assert done["results"][FIRST]["resumed"] is True
    assert done["results"][SECOND]["outcome"] == "upgraded", out
    assert done["not_started"] == {}
    assert_serving_on(slow_sim, FIRST, "2.15.5")
    assert_serving_on(slow_sim, SECOND, "2.15.6")


def test_a_prefect_cancel_of_a_cluster_upgrade_flow_run_rolls_it_back(
    slow_sim: httpx.Client, prefect_server: PrefectServer, tmp_path: Path
) -> None:
    hold_a_swap(slow_sim)
    state_dir = tmp_path / "state"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "amlfs_cli",
            "upgrade-cluster",
            "--fleet",
            str(SMALL_FLEET),
            "--cluster",
            FIRST,
            "--release",
            str(RELEASE_FILE),
            "--endpoint",
            str(tmp_path / "sim" / "endpoint.json"),
            "--state-dir",
            str(state_dir),
        ],
        env=prefect_server.env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_until("the swap held", lambda: held(slow_sim), proc)
    (beat,) = (state_dir / "cluster-runs").glob("*.json")  # the flow run's liveness record
    cancel(prefect_server, beat.stem)  # in Prefect once this returns: the run reads it
    release(slow_sim)  # at its next step, the boot wait after this swap (>= 30 sim s)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, out
    result = json.loads((state_dir / "cluster-results" / beat.name).read_text())
    assert result["outcome"] == "rolled_back", out
    assert_serving_on(slow_sim, FIRST, "2.15.5")
    state = flow_run(prefect_server, beat.stem)["state"]
    assert state["type"] == "CANCELLED", state
    assert "rolled_back" in state["message"]
