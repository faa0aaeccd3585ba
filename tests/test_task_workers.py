"""Prefect task workers carry the fleet (``flows.taskworkers``): a Prefect server on the
machine's PostgreSQL, two ``amlfs task-worker`` processes, and the state store on PostgreSQL
too (no state directory shared by the processes). Each cluster is a task run named after it
under the fleet's flow run, its steps under it. A task worker SIGKILLed in the middle of a
cluster's swap is noticed (its process is gone), the job is submitted again, the surviving
worker resumes the cluster from its journal, and the emulator's ground truth shows the
cluster serving on one release with nothing leaked."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from amlfs.store import open_store
from amlfs_sim import Emulator
from amlfs_sim.spec import SimWorld
from deployments.scaleout import ScaleOut
from flows.taskworkers import STARTS
from tests.conftest import REPO, cli_args, trust
from tests.stores import postgres_location

pytestmark = pytest.mark.integration

VICTIM = "lustre-weu-01"
OTHER = "lustre-eus-01"


def wait_for_swap(control: httpx.Client, fleet_run: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 240
    while not any(
        e["type"] == "vm.os_disk_swapped" and e["cluster"] == VICTIM
        for e in control.get("/timeline").json()["events"]
    ):
        assert fleet_run.poll() is None, fleet_run.communicate()[0]
        if time.monotonic() > deadline:
            fleet_run.kill()
            pytest.fail(f"no swap started; the fleet run said: {fleet_run.communicate()[0]}")
        time.sleep(0.05)


def prefect_view(url: str) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Every task run on the (test's own) server, and the flow runs they belong to, by id."""
    with httpx.Client(base_url=url, timeout=30) as api:
        runs = api.post("/task_runs/filter", json={"limit": 200}).json()
        ids = sorted({r["flow_run_id"] for r in runs if r["flow_run_id"]})
        flows = api.post("/flow_runs/filter", json={"flow_runs": {"id": {"any_": ids}}}).json()
    return runs, {f["id"]: f for f in flows}


def test_task_workers_run_the_fleet_and_survive_a_worker_killed_mid_swap(
    small_world: SimWorld, tmp_path: Path
) -> None:
    store_url = postgres_location(f"amlfs_tw_{os.getpid()}_{time.monotonic_ns()}")
    emulator = Emulator(small_world, tmp_path / "sim", time_scale=20, seed=11)
    endpoint = emulator.start()
    control = httpx.Client(base_url=endpoint.control_url, verify=trust(endpoint), timeout=30)
    store = open_store(store_url)
    try:
        with ScaleOut(tmp_path / "prefect", workers=0, task_workers=2, store=store_url) as scale:
            fleet_run = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "amlfs.cli",
                    *cli_args("run-fleet", tmp_path / "sim" / "endpoint.json"),
                    "--cluster",
                    VICTIM,
                    "--cluster",
                    OTHER,
                    "--hotfix-reason",
                    "task worker test",
                    "--state-dir",
                    store_url,
                    "--run-name",
                    "tw",
                    "--task-workers",
                ],
                env=scale.env,
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            wait_for_swap(control, fleet_run)
            (started,) = [
                store.get(STARTS, "tw", key)
                for key in store.names(STARTS, "tw")
                if key.startswith(f"{VICTIM}.")
            ]
            victim = int(started["pid"])
            assert victim in {w.pid for w in scale.task_workers}
            os.kill(victim, signal.SIGKILL)
            out, _ = fleet_run.communicate(timeout=420)
            assert fleet_run.returncode == 0, out[-4000:]
            runs, flows = prefect_view(scale.url)
        record = store.get("fleet-runs", "tw")
        assert record is not None
        result = record["results"][VICTIM]
        assert result.get("follow_ups") == 1, (result, out[-4000:])
        assert result["outcome"] in ("rolled_back", "upgraded"), result
        assert result["orchestrator_pid"] != victim
        assert result["override"] == "task worker test"
        assert record["results"][OTHER]["outcome"] == "upgraded", record["results"][OTHER]
        # In Prefect: each cluster a task run named after it under the fleet's flow run (the
        # killed one marked Crashed, not left Running), with the steps nested under it.
        by_name: dict[str, list[dict[str, Any]]] = {}
        for run in runs:
            by_name.setdefault(run["name"].rsplit("-", 1)[0], []).append(run)
        victim_runs = by_name[VICTIM]
        assert len(victim_runs) == 2, [r["state"]["type"] for r in victim_runs]
        assert {r["state"]["type"] for r in victim_runs} >= {"CRASHED"}
        assert len(by_name[OTHER]) == 1
        other_id = by_name[OTHER][0]["id"]
        steps = {
            r["name"]
            for r in runs
            if any(p.get("id") == other_id for p in r["task_inputs"].get("__parents__", []))
        }
        assert {"preflight", "swap-os-disks", "validate"} <= steps, steps
        (fleet_flow_run,) = {r["flow_run_id"] for r in [*victim_runs, *by_name[OTHER]]}
        assert flows[fleet_flow_run]["state"]["type"] == "COMPLETED", flows[fleet_flow_run]
    finally:
        truth = control.get("/state").json()
        control.close()
        emulator.stop()
    for name in (VICTIM, OTHER):
        customer = truth["clusters"][name]
        assert customer["serving"] is True, name
        assert customer["evictions"] == 0, name
    assert truth["leaked_disks"] == []
    assert truth["data_disk_changes"] == []
    os_disks = [d for d in truth["disks"] if d["os_type"] == "Linux"]
    assert len(os_disks) == len(truth["vms"])
