"""SIGKILL the orchestrator (a process running the cluster-upgrade flow against a real
Prefect server) at every step boundary and in the middle of the swap; a new run for the same
cluster must end upgraded or rolled back, healthy, without duplicate or leaked disks."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RELEASE_FILE, REPO, SMALL_FLEET, PrefectServer, Sim, cli_args

pytestmark = pytest.mark.integration

CLUSTER = "lustre-eus-01"


def upgrade_process(
    sim: Sim, server: PrefectServer, state_dir: Path, crash_at: str | None = None
) -> subprocess.Popen[str]:
    env = dict(server.env)
    if crash_at:  # the CLI with a step runner that SIGKILLs itself there (tests/crash_entry.py)
        env["AMLFS_TEST_CRASH_AT"] = crash_at
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.crash_entry" if crash_at else "amlfs_cli",
            "upgrade-cluster",
            "--fleet",
            str(SMALL_FLEET),
            "--cluster",
            CLUSTER,
            "--release",
            str(RELEASE_FILE),
            "--endpoint",
            str(sim.emulator.state_dir / "endpoint.json"),
            "--state-dir",
            str(state_dir),
        ],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def assert_converged(sim: Sim, output: str) -> str:
    state = sim.state(CLUSTER)
    customer = state["clusters"][CLUSTER]
    versions = {vm["os_image"].rsplit("/", 1)[-1] for vm in state["vms"]}
    assert len(versions) == 1, versions
    (version,) = versions
    assert customer["serving"] is True, (customer, output)
    assert customer["lustre_versions"] == [version]
    assert customer["evictions"] == 0, customer["eviction_log"]
    assert state["leaked_disks"] == [], output
    assert state["data_disk_changes"] == []
    # No duplicates: one OS disk per VM left (old ones deleted on success, new on rollback).
    os_disks = [d for d in state["disks"] if d["os_type"] == "Linux"]
    assert len(os_disks) == len(state["vms"]), [d["name"] for d in os_disks]
    for node in customer["nodes"].values():
        assert node["firewall_rules"] == 0
    assert customer["persistent_params"].get("timeout") in (None, "100")
    return str(version)


BOUNDARIES = [
    "prestage:after",
    "capture:after",
    "suspend:after",
    "swap:after",
    "restore:after",
    "unsuspend:after",
    "validate:after",
]


@pytest.mark.parametrize("crash_at", BOUNDARIES)
def test_sigkill_at_a_step_boundary_then_resume(
    sim: Sim, prefect_server: PrefectServer, tmp_path: Path, crash_at: str
) -> None:
    first = upgrade_process(sim, prefect_server, tmp_path, crash_at)
    out, _ = first.communicate(timeout=180)
    assert first.returncode == -signal.SIGKILL, out
    journal = json.loads((tmp_path / "clusters" / CLUSTER / "run.json").read_text())
    assert journal["phase"] != "done"

    second = upgrade_process(sim, prefect_server, tmp_path)
    out, _ = second.communicate(timeout=180)
    assert second.returncode in (0, 1), out
    version = assert_converged(sim, out)
    # Verified on the release before the crash: forward; before that: back.
    step = crash_at.split(":")[0]
    expected = "2.15.6" if step in ("restore", "unsuspend", "validate") else "2.15.5"
    assert version == expected, out
    assert not (tmp_path / "clusters" / CLUSTER / "run.json").exists()


def wait_for_event(sim: Sim, kind: str, timeout_s: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for event in sim.timeline()["events"]:
            if event["type"] == kind:
                return event  # type: ignore[no-any-return]
        time.sleep(0.02)
    raise AssertionError(f"no {kind} event within {timeout_s} s")


def test_sigkill_in_the_middle_of_the_swap_then_resume(
    sim: Sim, prefect_server: PrefectServer, tmp_path: Path
) -> None:
    first = upgrade_process(sim, prefect_server, tmp_path)
    wait_for_event(sim, "vm.os_disk_swapped")
    first.send_signal(signal.SIGKILL)
    out, _ = first.communicate(timeout=30)
    swapped = [e for e in sim.timeline()["events"] if e["type"] == "vm.os_disk_swapped"]
    assert len(swapped) > 0

    second = upgrade_process(sim, prefect_server, tmp_path)
    out, _ = second.communicate(timeout=180)
    assert "resumed after the" in out, out
    assert assert_converged(sim, out) == "2.15.5"


def test_cli_runs_the_flow_and_publishes_the_result_artifact(
    sim: Sim, prefect_server: PrefectServer, tmp_path: Path
) -> None:
    import httpx

    proc = upgrade_process(sim, prefect_server, tmp_path)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out
    assert "upgraded 2.15.5 -> 2.15.6" in out
    assert "evictions 0" in out
    assert assert_converged(sim, out) == "2.15.6"
    response = httpx.post(
        f"{prefect_server.url}/artifacts/filter",
        json={"artifacts": {"key": {"any_": [f"cluster-{CLUSTER}"]}}, "sort": "CREATED_DESC"},
        timeout=10,
    )
    response.raise_for_status()
    artifact = response.json()[0]  # this run's: earlier tests wrote the same key
    assert artifact["type"] == "table"
    assert "upgraded" in artifact["description"]
    steps = [row["step"] for row in json.loads(artifact["data"])]
    assert steps[:3] == ["preflight", "prestage", "capture"]


def fleet_process(
    sim: Sim, server: PrefectServer, state_dir: Path, run_name: str, *clusters: str
) -> subprocess.Popen[str]:
    """``amlfs run-fleet`` as an operator types it: a hotfix of ``clusters``, one at a time."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "amlfs_cli",
            *cli_args("run-fleet", sim.emulator.state_dir / "endpoint.json"),
            "--hotfix-reason",
            "crash test",
            *(arg for name in clusters for arg in ("--cluster", name)),
            "--max-parallel",
            "1",
            "--state-dir",
            str(state_dir),
            "--run-name",
            run_name,
        ],
        env=server.env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_a_fleet_run_killed_after_an_mds_swap_resumes_that_cluster_and_keeps_the_others(
    sim: Sim, prefect_server: PrefectServer, tmp_path: Path
) -> None:
    first_cluster, halfway = "lustre-eus-01", "lustre-weu-01"
    # The other VMs of lustre-weu-01 swap slowly and then not at all (their PUT hangs for
    # 1,000 sim s, then fails before the swap): the MDS alone is swapped, and the orchestrator
    # is SIGKILLed then (the repro), leaving the cluster half-swapped.
    others = "weu01-[!m]*"
    sim.fault(kind="vm.put", target=others, mode="hang", hang_s=1000, count=5)
    sim.fault(kind="vm.put", target=others, mode="fail", phase="complete", count=5)
    first = fleet_process(sim, prefect_server, tmp_path, "k1", first_cluster, halfway)
    deadline = time.monotonic() + 180
    while not any(
        e["type"] == "vm.os_disk_swapped" and e["vm"] == "weu01-mds0"
        for e in sim.timeline()["events"]
    ):
        assert first.poll() is None, first.communicate()[0]
        assert time.monotonic() < deadline, "no swap of weu01-mds0"
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=30)
    while sim.state()["operations_in_flight"]:  # the hung PUTs end (failed) on their own
        assert time.monotonic() < deadline, "operations still in flight"
        time.sleep(0.1)
    images = {vm["name"]: vm["os_image"].rsplit("/", 1)[-1] for vm in sim.state(halfway)["vms"]}
    assert images["weu01-mds0"] == "2.15.6"  # planning used to see only this: "already on"
    assert set(images.values()) == {"2.15.5", "2.15.6"}

    second = fleet_process(sim, prefect_server, tmp_path, "k1", first_cluster, halfway)
    out, _ = second.communicate(timeout=300)
    assert second.returncode == 0, out
    # The world: every VM running, each cluster on one release and serving, nothing leaked.
    state = sim.state()
    assert {vm["power_state"] for vm in state["vms"]} == {"running"}, out
    assert state["leaked_disks"] == [], out
    assert state["data_disk_changes"] == []
    for name in (first_cluster, halfway):
        vms = [vm for vm in state["vms"] if vm["cluster"] == name]
        assert len({vm["os_image"] for vm in vms}) == 1, (name, out)
        assert state["clusters"][name]["serving"] is True, (name, out)
    assert {vm["os_image"].rsplit("/", 1)[-1] for vm in sim.state(halfway)["vms"]} == {"2.15.5"}
    # The record: the half-swapped cluster resumed (back: it was never verified on the
    # release), the one finished before the kill still there.
    record = json.loads((tmp_path / "fleet-runs" / "k1.json").read_text())
    assert record["results"][halfway]["outcome"] == "rolled_back", out
    assert record["results"][halfway]["resumed"] is True
    assert record["results"][first_cluster]["outcome"] == "upgraded"
    shown = subprocess.run(
        [sys.executable, "-m", "amlfs_cli", "status", "k1", "--state-dir", str(tmp_path)],
        env={**prefect_server.env, "COLUMNS": "250"},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert first_cluster in shown.stdout
    assert halfway in shown.stdout
