"""The Prefect states of a fleet run, of its clusters' task runs and of a cluster-upgrade flow
run tell the truth, read back through the Prefect client of a real ``prefect server``: a
rolled-back cluster is not plain green, one that needs attention is Failed, the fleet run's
message counts the outcomes and the run fails when a cluster needs attention."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import FlowFilter, FlowRunFilter
from prefect.client.schemas.objects import FlowRun, TaskRun
from prefect.settings import PREFECT_API_URL, temporary_settings

from tests.conftest import RELEASE_FILE, REPO, SMALL_FLEET, PrefectServer, Sim, cli_args

pytestmark = pytest.mark.integration


@pytest.fixture
def client(prefect_server: PrefectServer) -> Iterator[SyncPrefectClient]:
    with (
        temporary_settings(updates={PREFECT_API_URL: prefect_server.url}),
        get_client(sync_client=True) as prefect,
    ):
        yield prefect


def fleet_run_named(client: SyncPrefectClient, run_name: str) -> FlowRun:
    runs = client.read_flow_runs(flow_filter=FlowFilter(name={"any_": ["fleet-maintenance"]}))
    (run,) = [r for r in runs if r.parameters["params"].get("run_name") == run_name]
    return run


def task_runs(client: SyncPrefectClient, run: FlowRun, names: set[str]) -> dict[str, TaskRun]:
    """The flow run's task runs called ``names``, once the server has their final states
    (task run states reach it as events, a moment after the flow run ended)."""
    deadline = time.monotonic() + 60
    while True:
        found = {
            t.name: t
            for t in client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [run.id]}))
            if t.name in names
        }
        if set(found) == names and all(t.state and t.state.is_final() for t in found.values()):
            return found
        assert time.monotonic() < deadline, {n: t.state for n, t in found.items()}
        time.sleep(0.5)


def run_cli(server: PrefectServer, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "amlfs_cli", *args],
        env={**server.env, "COLUMNS": "250"},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_fleet_and_task_run_states_tell_each_clusters_outcome(
    sim: Sim, prefect_server: PrefectServer, client: SyncPrefectClient, tmp_path: Path
) -> None:
    # lustre-scus-01: a node boots the release without Lustre modules (rolled back);
    # lustre-weu-01: a VM someone stopped (resumed as interrupted, refused by its health
    # check: needs attention); lustre-eus-01: upgraded.
    sim.fault(kind="node.boot", target="scus01-oss1", code="BadImage", count=1)
    weu = sim.world.fleet.cluster("lustre-weu-01")
    sim.compute(weu.subscription_id).virtual_machines.begin_power_off(
        weu.resource_group, "weu01-oss1"
    ).result()
    run_name = f"states-{uuid.uuid4().hex[:8]}"
    done = run_cli(
        prefect_server,
        *cli_args("run-fleet", sim.emulator.state_dir / "endpoint.json"),
        "--hotfix-reason",
        "states test",
        *(
            a
            for c in ("lustre-eus-01", "lustre-weu-01", "lustre-scus-01")
            for a in ("--cluster", c)
        ),
        "--error-budget",
        "3",
        "--state-dir",
        str(tmp_path),
        "--run-name",
        run_name,
    )
    assert done.returncode == 1, done.stdout + done.stderr  # a cluster needs attention
    run = fleet_run_named(client, run_name)
    assert run.state is not None
    assert run.state.is_failed(), run.state
    assert run.state.message == "1 upgraded, 1 rolled_back, 1 failed_needs_attention"
    tasks = task_runs(
        client,
        run,
        {"upgrade-lustre-eus-01", "upgrade-lustre-weu-01", "upgrade-lustre-scus-01"},
    )
    upgraded = tasks["upgrade-lustre-eus-01"].state
    rolled_back = tasks["upgrade-lustre-scus-01"].state
    failed = tasks["upgrade-lustre-weu-01"].state
    assert upgraded is not None
    assert rolled_back is not None
    assert failed is not None
    assert (upgraded.type.value, upgraded.name) == ("COMPLETED", "Completed")
    # Not green: red, named apart from the one that needs attention.
    assert (rolled_back.type.value, rolled_back.name) == ("FAILED", "RolledBack")
    assert "Lustre modules do not load" in (rolled_back.message or "")
    assert failed.type.value == "FAILED"
    assert (failed.message or "").startswith("failed_needs_attention: preflight: VM weu01-oss1")
    # The world agrees with the states.
    state = sim.state()
    images = {c: set[str]() for c in ("lustre-eus-01", "lustre-weu-01", "lustre-scus-01")}
    for vm in state["vms"]:
        images[vm["cluster"]].add(vm["os_image"].rsplit("/", 1)[-1])
    assert images == {
        "lustre-eus-01": {"2.15.6"},
        "lustre-weu-01": {"2.15.5"},
        "lustre-scus-01": {"2.15.5"},
    }
    assert state["clusters"]["lustre-scus-01"]["serving"] is True
    assert state["leaked_disks"] == []


def cluster_flow_run(client: SyncPrefectClient, state_dir: Path) -> FlowRun:
    """The cluster-upgrade flow run that used ``state_dir`` (its result is filed by run id)."""
    (result,) = (state_dir / "cluster-results").glob("*.json")
    return client.read_flow_run(uuid.UUID(result.stem))


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        (None, ("COMPLETED", "Completed", 0)),
        (
            {"kind": "node.boot", "target": "eus01-oss1", "code": "BadImage"},
            ("FAILED", "RolledBack", 1),
        ),
    ],
    ids=["upgraded", "rolled-back"],
)
def test_a_cluster_upgrade_flow_runs_state_tells_its_outcome(
    sim: Sim,
    prefect_server: PrefectServer,
    client: SyncPrefectClient,
    tmp_path: Path,
    fault: dict[str, Any] | None,
    expected: tuple[str, str, int],
) -> None:
    if fault is not None:
        sim.fault(**fault, count=1)
    done = run_cli(
        prefect_server,
        "upgrade-cluster",
        "--fleet",
        str(SMALL_FLEET),
        "--cluster",
        "lustre-eus-01",
        "--release",
        str(RELEASE_FILE),
        "--endpoint",
        str(sim.emulator.state_dir / "endpoint.json"),
        "--state-dir",
        str(tmp_path),
    )
    run = cluster_flow_run(client, tmp_path)
    assert run.state is not None
    assert (run.state.type.value, run.state.name, done.returncode) == expected, done.stdout
    if fault is not None:
        assert "Lustre modules do not load" in (run.state.message or "")
