"""Scale-out: a Prefect server on the machine's PostgreSQL, a process work pool and two
workers; the fleet flow dispatches each cluster as its own flow run. A worker (and the flow
run it was executing) is SIGKILLed in the middle of a cluster's swap: the fleet flow notices
the silent run, marks it crashed, starts a follow-up run on the surviving worker, and the
cluster ends rolled back or upgraded, healthy, with no duplicate or leaked disk."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from amlfs_sim import Emulator
from amlfs_sim.spec import SimWorld
from deployments.scaleout import CLUSTER_DEPLOYMENT, ScaleOut
from tests.conftest import REPO, cli_args, trust

pytestmark = pytest.mark.integration

CLUSTER = "lustre-weu-01"


def parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def test_worker_killed_mid_swap_the_cluster_is_picked_up_again(
    small_world: SimWorld, tmp_path: Path
) -> None:
    state_dir = tmp_path / "state"
    # Its own emulator at 20 sim s per real second: the 10 s a dead worker goes unnoticed
    # plus a new worker's pickup must stay well inside the raised eviction limit (1800 s).
    emulator = Emulator(small_world, tmp_path / "sim", time_scale=20, seed=5)
    endpoint = emulator.start()
    control = httpx.Client(base_url=endpoint.control_url, verify=trust(endpoint), timeout=30)
    with ScaleOut(tmp_path / "prefect", workers=2) as scale:
        fleet_run = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "amlfs_cli",
                *cli_args("run-fleet", tmp_path / "sim" / "endpoint.json"),
                "--cluster",
                CLUSTER,
                "--hotfix-reason",
                "scale-out test",
                "--state-dir",
                str(state_dir),
                "--run-name",
                "scaleout",
                "--cluster-deployment",
                CLUSTER_DEPLOYMENT,
                "--dead-run-after",
                "10",
            ],
            env=scale.env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        # Wait for the first OS disk swap of the cluster, then kill whoever runs it.
        deadline = time.monotonic() + 180
        while not any(
            e["type"] == "vm.os_disk_swapped" and e["cluster"] == CLUSTER
            for e in control.get("/timeline").json()["events"]
        ):
            assert fleet_run.poll() is None, fleet_run.communicate()[0]
            assert time.monotonic() < deadline, "no swap started"
            time.sleep(0.05)
        (beat,) = [json.loads(p.read_text()) for p in (state_dir / "cluster-runs").glob("*.json")]
        flow_pid = int(beat["pid"])
        worker_pid = parent_of(flow_pid)
        assert any(w.pid == worker_pid for w in scale.workers)
        os.kill(worker_pid, signal.SIGKILL)
        os.kill(flow_pid, signal.SIGKILL)

        out, _ = fleet_run.communicate(timeout=300)
        assert fleet_run.returncode == 0, out
    record = json.loads((state_dir / "fleet-runs" / "scaleout.json").read_text())
    result = record["results"][CLUSTER]
    # On failure show the fleet run's own log too: which attempt ended how.
    assert result.get("follow_ups") == 1, (result, out[-4000:])
    assert result["outcome"] in ("rolled_back", "upgraded"), result
    # The job's fields reached the cluster's flow run on the worker, and came back with it.
    assert result["override"] == "scale-out test", result
    assert result["wave"], result
    state = control.get("/state", params={"cluster": CLUSTER}).json()
    control.close()
    emulator.stop()
    customer = state["clusters"][CLUSTER]
    assert customer["serving"] is True
    assert customer["evictions"] == 0
    assert state["leaked_disks"] == []
    assert state["data_disk_changes"] == []
    os_disks = [d for d in state["disks"] if d["os_type"] == "Linux"]
    assert len(os_disks) == len(state["vms"])
