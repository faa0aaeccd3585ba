"""Prefect task workers carry the fleet (``flows.taskworkers``): a Prefect server on the
machine's PostgreSQL, two ``amlfs task-worker`` processes, and the state store on PostgreSQL
too (no state directory shared by the processes). Each cluster is a task run named after it
under the fleet's flow run, its steps under it. A task worker SIGKILLed in the middle of a
cluster's swap is noticed (its process is gone), the job is submitted again, the surviving
worker resumes the cluster from its journal, and the emulator's ground truth shows the
cluster serving on one release with nothing leaked. A burst of jobs submitted at once is
started by the workers, each on its first task run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import yaml
from psycopg import sql

from amlfs.store import open_store
from amlfs_sim import Emulator
from amlfs_sim.genfleet import dump_fleet_yaml, generate_fleet
from amlfs_sim.spec import SimWorld, load_world
from deployments.scaleout import ScaleOut
from flows.taskworkers import STARTS
from tests.conftest import RELEASE_FILE, REPO, SMALL_FLEET, cli_args, trust
from tests.stores import POSTGRES_URL, postgres_location

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


def prefect_view(
    url: str, task_runs: dict[str, Any] | None = None
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """The task runs on the (test's own) server (every one, or those ``task_runs`` filters),
    and the flow runs they belong to, by id."""
    query: dict[str, Any] = {"limit": 200, **({"task_runs": task_runs} if task_runs else {})}
    with httpx.Client(base_url=url, timeout=30) as api:
        runs = api.post("/task_runs/filter", json=query).json()
        ids = sorted({r["flow_run_id"] for r in runs if r["flow_run_id"]})
        flows = api.post("/flow_runs/filter", json={"flow_runs": {"id": {"any_": ids}}}).json()
    return runs, {f["id"]: f for f in flows}


def cluster_of(task_run: dict[str, Any]) -> str:
    """The cluster a job's task run is named after ("NAME #ATTEMPT-N"); a step's own name."""
    return str(task_run["name"]).split(" #", 1)[0]


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
                    "amlfs_cli",
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
            by_name.setdefault(cluster_of(run), []).append(run)
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
        # Not green when the victim rolled back (red, named RolledBack: tasks.cluster).
        expected = (
            ("FAILED", "RolledBack")
            if result["outcome"] == "rolled_back"
            else ("COMPLETED", "Completed")
        )
        state = flows[fleet_flow_run]["state"]
        assert (state["type"], state["name"]) == expected, flows[fleet_flow_run]
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


BURST = 16
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def settled_job_runs(url: str) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """The jobs' task runs once each is in a final state (a worker writes the outcome the
    fleet reads before it reports the run's state to Prefect), or as they are after 60 s."""
    deadline = time.monotonic() + 60
    while True:
        jobs, flows = prefect_view(url, {"name": {"like_": " #"}})
        if all(r["state"]["type"] in FINAL for r in jobs) or time.monotonic() > deadline:
            return jobs, flows
        time.sleep(0.5)


def test_a_burst_of_jobs_submitted_at_once_each_starts_on_its_first_task_run(
    tmp_path: Path,
) -> None:
    """16 clusters admitted at the same instant, two task workers. Each job's first task run
    is started and the fleet upgrades them all without submitting any job again; in Prefect,
    one completed run per cluster, named after it, under the fleet's flow run.

    With a tag on each task run naming its attempt, a burst like this deadlocked the workers
    (prefect 3.x): the job's thread, starting the concurrency-slot service of its tags, held
    the lock that the worker's event loop takes to emit the next received run's event, and
    waited for that loop. Nothing more started; every job ended interrupted after 3 task runs.
    """
    data = generate_fleet(BURST, 2, regions=("eastus",), waves=("wave1",), seed=5)
    data["emulator"] = yaml.safe_load(SMALL_FLEET.read_text())["emulator"]
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(dump_fleet_yaml(data))
    names = sorted(c["name"] for c in data["clusters"])
    table = f"amlfs_twb_{os.getpid()}_{time.monotonic_ns()}"
    store_url = postgres_location(table)
    emulator = Emulator(load_world(fleet_file), tmp_path / "sim", time_scale=50, seed=5)
    endpoint = emulator.start()
    control = httpx.Client(base_url=endpoint.control_url, verify=trust(endpoint), timeout=30)
    store = open_store(store_url)
    burst = str(BURST)
    try:
        with ScaleOut(tmp_path / "prefect", workers=0, task_workers=2, store=store_url) as scale:
            fleet_run = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "amlfs_cli",
                    "run-fleet",
                    "--fleet",
                    str(fleet_file),
                    "--release",
                    str(RELEASE_FILE),
                    "--endpoint",
                    str(tmp_path / "sim" / "endpoint.json"),
                    *("--max-parallel", burst, "--max-per-subscription", burst),
                    *("--max-per-region", burst),
                    *(arg for name in names for arg in ("--cluster", name)),
                    "--hotfix-reason",
                    "burst test",
                    "--state-dir",
                    store_url,
                    "--run-name",
                    "burst",
                    "--task-workers",
                ],
                env=scale.env,
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=900,
            )
            out = fleet_run.stdout
            jobs, flows = settled_job_runs(scale.url)
        record = store.get("fleet-runs", "burst")
        assert record is not None, out[-4000:]
        results = record["results"]
        assert {n: r["outcome"] for n, r in results.items()} == dict.fromkeys(names, "upgraded"), (
            out[-4000:]
        )
        assert {n: r.get("follow_ups") for n, r in results.items()} == dict.fromkeys(names, 0)
        assert fleet_run.returncode == 0, out[-4000:]
        assert sorted(cluster_of(r) for r in jobs) == names
        assert {r["state"]["type"] for r in jobs} == {"COMPLETED"}
        (fleet_flow_run,) = {r["flow_run_id"] for r in jobs}
        assert flows[fleet_flow_run]["state"]["type"] == "COMPLETED"
    finally:
        truth = control.get("/state").json()
        control.close()
        emulator.stop()
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table)))
    assert all(truth["clusters"][n]["serving"] for n in names)
    assert truth["leaked_disks"] == []
