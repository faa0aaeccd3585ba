"""The three triggers and the rollout deployments served to a real ``prefect server``, runs
created through its REST API (the hotfix the way an operator's curl does it, a stage's
approval the way the UI's Resume form sends it), judged on the emulator."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import RELEASE_FILE, REPO, PrefectServer, Sim, long_windows

pytestmark = pytest.mark.integration

NAMES = (
    "amlfs-weekly-tick",
    "amlfs-manual",
    "amlfs-hotfix",
    "amlfs-rollout-tick",
    "amlfs-rollout-start",
    "amlfs-rollout-approval",
)
IN_EUS_WINDOW = "2026-12-01T02:05:00+00:00"  # Tuesday: lustre-eus-01's window, nobody else's
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@pytest.fixture(scope="module")
def served_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The served deployments' own directory (their state store is ``state`` in it)."""
    return tmp_path_factory.mktemp("served")


@pytest.fixture(scope="module")
def served(
    _session_sim: Sim, prefect_server: PrefectServer, served_root: Path
) -> Iterator[dict[str, dict[str, Any]]]:
    """One ``deployments.serve`` process for the module (each test resets the emulator)."""
    sim, tmp_path = _session_sim, served_root
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "deployments.serve",
            "--fleet",
            # The weekly tick runs lustre-eus-01 from its window's start: a long window, so
            # the machine's load cannot push it past the end (tests/conftest.long_windows).
            str(long_windows(tmp_path / "fleet.yaml")),
            "--release",
            str(RELEASE_FILE),
            "--endpoint",
            str(sim.emulator.state_dir / "endpoint.json"),
            "--state-dir",
            str(tmp_path / "state"),
        ],
        env=prefect_server.env,
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 90
        found: dict[str, dict[str, Any]] = {}
        while len(found) < len(NAMES):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError((tmp_path / "serve.log").read_text())
            response = httpx.post(f"{prefect_server.url}/deployments/filter", json={}, timeout=10)
            # This process's deployments: an earlier test's serve registered the same names
            # on this session's server, with its own state directory.
            found = {
                d["name"]: d
                for d in response.json()
                if d["name"] in NAMES
                and d["parameters"]["params"].get("state_dir") == str(tmp_path / "state")
            }
            time.sleep(0.5)
        yield found
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def trigger(server: PrefectServer, deployment: dict[str, Any], params: dict[str, Any]) -> str:
    """What an operator's curl does: POST /api/deployments/{id}/create_flow_run."""
    merged = {**deployment["parameters"]["params"], **params}
    response = httpx.post(
        f"{server.url}/deployments/{deployment['id']}/create_flow_run",
        json={"parameters": {"params": merged}},
        timeout=10,
    )
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def wait_run(server: PrefectServer, run_id: str, timeout_s: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = httpx.get(f"{server.url}/flow_runs/{run_id}", timeout=10).json()
        if run["state_type"] in TERMINAL:
            return run  # type: ignore[no-any-return]
        time.sleep(0.5)
    raise AssertionError(f"flow run {run_id} did not finish in {timeout_s} s")


def versions(sim: Sim, cluster: str) -> set[str]:
    return {vm["os_image"].rsplit("/", 1)[-1] for vm in sim.state(cluster)["vms"]}


def test_three_deployments_and_runs_through_the_api(
    sim: Sim, prefect_server: PrefectServer, served: dict[str, dict[str, Any]]
) -> None:
    weekly = served["amlfs-weekly-tick"]
    schedules = httpx.get(
        f"{prefect_server.url}/deployments/{weekly['id']}/schedules", timeout=10
    ).json()
    assert [s["schedule"]["cron"] for s in schedules] == ["*/15 * * * *"]
    assert served["amlfs-manual"]["parameter_openapi_schema"]["properties"]["params"]
    # The form: the operator's fields first; scale-out and benchmark knobs not in it.
    definitions = served["amlfs-manual"]["parameter_openapi_schema"]["definitions"]
    properties = definitions["FleetParams"]["properties"]
    fields = sorted(properties, key=lambda name: properties[name]["position"])
    assert fields[:5] == ["fleet_file", "release_file", "mode", "selector", "dry_run"], fields
    hidden = {"processes", "task_workers", "cluster_deployment", "dead_run_after_s"}
    assert not hidden & set(fields), fields

    # Hotfix outside the window without an override: planned, refused, nothing changes.
    refused = trigger(
        prefect_server,
        served["amlfs-hotfix"],
        {"selector": {"names": ["lustre-weu-01"]}, "at": IN_EUS_WINDOW},
    )
    assert wait_run(prefect_server, refused)["state_type"] == "COMPLETED"
    assert versions(sim, "lustre-weu-01") == {"2.15.5"}

    # Rules that span fields are refused by the server before a run exists (the UI's form
    # gets the same answer): a hotfix that names no cluster, an override without a reason.
    hotfix_defaults = served["amlfs-hotfix"]["parameters"]["params"]
    for params, field in (
        ({**hotfix_defaults, "selector": {"names": []}}, "names"),
        (hotfix_defaults, "selector"),  # the deployment's defaults alone name no cluster
        ({**hotfix_defaults, "selector": {"waves": ["canary"]}}, "names"),
        (
            {**hotfix_defaults, "selector": {"names": ["lustre-weu-01"]},
             "policy": {"override_window": True, "reason": "  "}},
            "reason",
        ),
    ):  # fmt: skip
        before = httpx.post(f"{prefect_server.url}/flow_runs/count", json={}, timeout=10).json()
        response = httpx.post(
            f"{prefect_server.url}/deployments/{served['amlfs-hotfix']['id']}/create_flow_run",
            json={"parameters": {"params": params}},
            timeout=10,
        )
        assert response.status_code in (409, 422), response.text
        assert field in response.text, response.text
        after = httpx.post(f"{prefect_server.url}/flow_runs/count", json={}, timeout=10).json()
        assert after == before

    # Hotfix with the override and a reason: upgraded now.
    hotfix = trigger(
        prefect_server,
        served["amlfs-hotfix"],
        {
            "selector": {"names": ["lustre-weu-01"]},
            "policy": {"override_window": True, "reason": "CVE-2026-0001"},
            "at": IN_EUS_WINDOW,
        },
    )
    assert wait_run(prefect_server, hotfix)["state_type"] == "COMPLETED"
    assert versions(sim, "lustre-weu-01") == {"2.15.6"}

    # The weekly tick at the start of lustre-eus-01's window upgrades that cluster only.
    tick = trigger(prefect_server, weekly, {"at": "2026-12-01T02:00:00+00:00"})
    assert wait_run(prefect_server, tick)["state_type"] == "COMPLETED"
    assert versions(sim, "lustre-eus-01") == {"2.15.6"}
    assert versions(sim, "lustre-scus-01") == {"2.15.5"}

    # The manual deployment defaults to a dry run: it completes and changes nothing.
    operations = len(sim.timeline()["operations"])
    manual = trigger(prefect_server, served["amlfs-manual"], {})
    assert wait_run(prefect_server, manual)["state_type"] == "COMPLETED"
    assert len(sim.timeline()["operations"]) == operations
    state = sim.state()
    assert state["leaked_disks"] == []
    assert state["data_disk_changes"] == []


def paused_approval(server: PrefectServer, timeout_s: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        runs = httpx.post(
            f"{server.url}/flow_runs/filter",
            json={"flows": {"name": {"any_": ["rollout-approval"]}}},
            timeout=10,
        ).json()
        paused = [r for r in runs if r["state_type"] == "PAUSED"]
        if paused:
            return paused[0]  # type: ignore[no-any-return]
        time.sleep(0.5)
    raise AssertionError("the rollout tick asked for no approval")


def test_a_rollout_started_ticked_and_approved_through_the_api(
    sim: Sim,
    prefect_server: PrefectServer,
    served: dict[str, dict[str, Any]],
    served_root: Path,
    tmp_path: Path,
) -> None:
    import yaml

    from amlfs.rollout import RolloutBook, abort
    from amlfs.store import StateStore

    strategy = tmp_path / "strategy.yaml"
    strategy.write_text(
        yaml.safe_dump({"stages": [{"name": "canary"}, {"name": "wave1", "approval": True}]})
    )
    book = RolloutBook(StateStore(served_root / "state"))
    try:
        start = trigger(
            prefect_server,
            served["amlfs-rollout-start"],
            {"name": "r-api", "strategy_file": str(strategy), "at": "2026-11-30T00:00:00+00:00"},
        )
        assert wait_run(prefect_server, start)["state_type"] == "COMPLETED"
        # The tick at the canary's window upgrades it, then asks for wave1's approval.
        tick = trigger(prefect_server, served["amlfs-rollout-tick"], {"at": "2026-12-01T02:00:00Z"})
        assert wait_run(prefect_server, tick)["state_type"] == "COMPLETED"
        assert versions(sim, "lustre-eus-01") == {"2.15.6"}
        assert "wave1" in book.get("r-api").approval_requests
        approval = paused_approval(prefect_server)
        response = httpx.post(
            f"{prefect_server.url}/flow_runs/{approval['id']}/resume",
            json={"run_input": {"approve": True, "by": "carol", "note": "canary fine"}},
            timeout=10,
        )
        assert response.status_code == 201, response.text
        assert wait_run(prefect_server, approval["id"])["state_type"] == "COMPLETED"
        assert book.get("r-api").approvals["wave1"].by == "carol"
        late = trigger(prefect_server, served["amlfs-rollout-tick"], {"at": "2026-12-10T23:45:00Z"})
        assert wait_run(prefect_server, late)["state_type"] == "COMPLETED"
        assert versions(sim, "lustre-scus-01") == {"2.15.6"}
        rollout = book.get("r-api")
        assert rollout.clusters["lustre-scus-01"].outcome == "upgraded"
        assert versions(sim, "lustre-weu-01") == {"2.15.5"}  # its window has not opened yet
        assert sim.state()["leaked_disks"] == []
    finally:  # the served deployments' store is the module's: leave no active rollout in it
        if "r-api" in book.names():
            book.change("r-api", lambda r: abort(r, at=r.created_at, by="test", reason="done"))


def test_scale_out_comes_from_the_deployments_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flows.fleet_maintenance import FleetParams

    assert FleetParams(fleet_file="f", release_file="r").processes == 1
    monkeypatch.setenv("AMLFS_PROCESSES", "4")
    monkeypatch.setenv("AMLFS_DEAD_RUN_AFTER_S", "45")
    params = FleetParams(fleet_file="f", release_file="r")
    assert (params.processes, params.dead_run_after_s, params.task_workers) == (4, 45.0, False)
    assert FleetParams(fleet_file="f", release_file="r", processes=2).processes == 2


def test_against_azure_every_deployments_defaults_pass_its_parameter_schema() -> None:
    """Served without an emulator (real Azure, the Blocks): each deployment's default
    parameters validate against its own parameter schema, as the server checks them when a
    run is started from it (the UI's Run, ``prefect deployment run``, ``run_deployment``);
    a null emulator_endpoint once made every such run of the rollout tick a 409."""
    from prefect.utilities.collections import remove_nested_keys
    from prefect.utilities.schema_tools.validation import validate

    from deployments.serve import MANUAL, ROLLOUT_TICK, WEEKLY, deployments

    made = deployments(str(REPO / "examples" / "fleet-small.yaml"), str(RELEASE_FILE), None, "s")
    assert len(made) == len(NAMES)
    for deployment in made:
        schema = deployment._parameter_openapi_schema.model_dump(exclude_none=True)
        # What the server checks when the deployment is created (required keys removed), and
        # for those started as they are (the schedules, the manual dry run) a run of their
        # defaults; the others' forms ask for more (a hotfix's clusters, a rollout's name).
        checks = [remove_nested_keys(["required"], schema)]
        checks += [schema] if deployment.name in (WEEKLY, ROLLOUT_TICK, MANUAL) else []
        for check in checks:
            problems = validate(deployment.parameters, check, raise_on_error=False)
            assert problems == [], (deployment.name, [p.message for p in problems])
