"""What the operator sees in the Prefect UI, read in a real headless browser (Debian's
chromium driven by Playwright) from a real ``prefect server``, after a real fleet run on the
emulator: one cluster upgraded, one rolled back (its release does not boot on a node).

* the fleet run's and the rolled-back cluster's states are not green: red ``RolledBack``;
* each cluster is a task run named after it, its steps named after it too;
* the results table leads with cluster, result, downtime, reason and carries evictions,
  data-disk changes, leaked disks and the override; each cluster has its own artifact;
* a run stopped by a halt left set from an earlier night is not a green Completed but
  ``Stopped``, its page's log says why and how to clear it, and nothing in the world moved;
  a scheduled tick in which no window opens publishes nothing, so the last results stay.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from flows.fleet_maintenance import FleetParams
from flows.markdown import markdown_text
from tests.conftest import (
    RELEASE_FILE,
    REPO,
    SMALL_FLEET,
    PrefectServer,
    Sim,
    cli_args,
    control,
    wait_until,
)

pytestmark = pytest.mark.integration

IN_EUS_WINDOW = "2026-12-01T02:05:00+00:00"  # Tuesday: lustre-eus-01's window
CHROMIUM = os.environ.get("AMLFS_TEST_CHROMIUM", "/usr/bin/chromium")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        raise AssertionError(f"{CHROMIUM} is missing: `make test` installs Debian's chromium")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox"]
        )
        try:
            yield launched
        finally:
            launched.close()


def api(server: PrefectServer, path: str, body: dict[str, Any] | None = None) -> Any:
    response = httpx.post(f"{server.url}{path}", json=body or {}, timeout=10)
    assert response.is_success, (path, response.status_code, response.text)
    return response.json()


def ui(server: PrefectServer, path: str) -> str:
    return server.url.removesuffix("/api") + path


def state_badge(page: Any, server: PrefectServer, path: str, timeout_ms: int = 60_000) -> Any:
    """Open a run's page and return its state badge once the UI has drawn it."""
    page.goto(ui(server, path))
    badge = page.locator(".state-badge").first
    badge.wait_for(timeout=timeout_ms)
    return badge


def test_the_ui_tells_each_clusters_truth_at_a_glance(
    sim: Sim, prefect_server: PrefectServer, browser: Any, tmp_path: Path
) -> None:
    sim.fault(kind="node.boot", target="scus01-oss1", code="BadImage", count=1)
    run_name = f"ui-{uuid.uuid4().hex[:8]}"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "amlfs_cli",
            *cli_args("run-fleet", sim.emulator.state_dir / "endpoint.json"),
            "--hotfix-reason",
            "ui test",
            "--cluster",
            "lustre-eus-01",
            "--cluster",
            "lustre-scus-01",
            "--state-dir",
            str(tmp_path),
            "--run-name",
            run_name,
        ],
        env={**prefect_server.env, "COLUMNS": "250"},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr  # rolled back, serving: settled
    fleet_run = fleet_flow_run(prefect_server, run_name)
    page = browser.new_page()
    try:
        header = state_badge(page, prefect_server, f"/runs/flow-run/{fleet_run['id']}")
        assert header.inner_text() == "RolledBack"
        assert "state--failed" in (header.get_attribute("class") or "")  # red, not green

        page.get_by_text("Task Runs", exact=True).first.click()
        page.get_by_text("upgrade-lustre-scus-01").first.wait_for(timeout=30_000)
        listed = page.inner_text("body")
        assert "upgrade-lustre-eus-01" in listed
        # Each step's task run is named after its cluster.
        tasks = api(
            prefect_server,
            "/task_runs/filter",
            {"flow_runs": {"id": {"any_": [fleet_run["id"]]}}, "limit": 200},
        )
        names = {t["name"] for t in tasks}
        assert {
            "upgrade-lustre-eus-01",
            "upgrade-lustre-scus-01",
            "lustre-eus-01 swap",
            "lustre-scus-01 swap",
        } <= names, sorted(names)
        assert any(n.startswith("lustre-scus-01 rollback: ") for n in names), sorted(names)
        rolled = next(t for t in tasks if t["name"].startswith("upgrade-lustre-scus-01"))
        assert (rolled["state"]["type"], rolled["state"]["name"]) == ("FAILED", "RolledBack")

        badge = state_badge(
            page, prefect_server, f"/runs/task-run/{rolled['id']}", timeout_ms=30_000
        )
        assert badge.inner_text() == "RolledBack"
        assert "state--failed" in (badge.get_attribute("class") or "")

        artifacts = {
            a["key"]: a
            for a in api(
                prefect_server,
                "/artifacts/filter",
                {"artifacts": {"flow_run_id": {"any_": [fleet_run["id"]]}}},
            )
            if a.get("key")
        }
        assert {"fleet-results", "cluster-lustre-scus-01", "cluster-lustre-eus-01"} <= set(
            artifacts
        )
        described = artifacts["cluster-lustre-scus-01"]["description"]
        for said in ("rolled_back", "evictions 0", "data-disk changes 0", "leaked disks 0"):
            assert markdown_text(said) in described, described
        page.goto(ui(prefect_server, f"/artifacts/artifact/{artifacts['fleet-results']['id']}"))
        page.locator("th").first.wait_for(timeout=30_000)
        headers = [h.strip() for h in page.locator("th").all_inner_texts()]
        assert headers[:4] == ["cluster", "result", "downtime (s)", "reason"], headers
        assert {"evictions", "data-disk changes", "leaked disks", "override"} <= set(headers)
        body = page.inner_text("body")
        assert "lustre-scus-01" in body
        assert "rolled_back" in body
    finally:
        page.close()


def run_flow(server: PrefectServer, **params: Any) -> dict[str, Any]:
    """A fleet run in its own process against ``server``, the way a served deployment runs
    it; returns its flow run as the REST API reports it."""
    run_name = str(params["run_name"])
    code = (
        "import sys\n"
        "from flows.fleet_maintenance import FleetParams, fleet_maintenance\n"
        "fleet_maintenance(FleetParams.model_validate_json(sys.argv[1]), return_state=True)\n"
    )
    in_process(server, code, FleetParams.model_validate(params).model_dump_json())
    return fleet_flow_run(server, run_name)


def in_process(server: PrefectServer, code: str, argument: str) -> str:
    """``code`` run by Python in its own process against ``server`` (``argument`` its
    ``sys.argv[1]``), the way a served deployment runs a flow; its stdout, once it exited 0."""
    done = subprocess.run(
        [sys.executable, "-c", code, argument],
        env=server.env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def fleet_flow_run(server: PrefectServer, run_name: str) -> dict[str, Any]:
    """The one fleet-maintenance flow run (among the newest 50) with ``run_name``."""
    (run,) = [
        r
        for r in api(
            server,
            "/flow_runs/filter",
            {
                "flows": {"name": {"any_": ["fleet-maintenance"]}},
                "sort": "EXPECTED_START_TIME_DESC",
                "limit": 50,
            },
        )
        if r["parameters"]["params"].get("run_name") == run_name
    ]
    return run  # type: ignore[no-any-return]


def artifacts_of(server: PrefectServer, run_id: str) -> list[dict[str, Any]]:
    return api(  # type: ignore[no-any-return]
        server, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}}
    )


def fleet_results(server: PrefectServer) -> list[str]:
    """Ids of every version of the fleet-results artifact, newest first."""
    return [
        a["id"]
        for a in api(
            server,
            "/artifacts/filter",
            {"artifacts": {"key": {"any_": ["fleet-results"]}}, "sort": "CREATED_DESC"},
        )
    ]


def test_a_halted_run_says_so_and_a_no_op_tick_hides_nothing(
    sim: Sim, prefect_server: PrefectServer, browser: Any, tmp_path: Path
) -> None:
    common = {
        "fleet_file": str(SMALL_FLEET),
        "release_file": str(RELEASE_FILE),
        "emulator_endpoint": str(sim.emulator.state_dir / "endpoint.json"),
        "state_dir": str(tmp_path / "state"),
    }
    halted_name = f"halted-{uuid.uuid4().hex[:8]}"
    control(prefect_server, "halt")  # an operator's halt, left set from an earlier night
    try:
        halted = run_flow(
            prefect_server,
            **common,
            mode="manual",
            at=IN_EUS_WINDOW,
            selector={"names": ["lustre-eus-01"]},
            run_name=halted_name,
        )
    finally:
        control(prefect_server, "run")  # the Variable outlives this test on the shared server
    # The world: nothing was touched.
    assert {vm["os_image"].rsplit("/", 1)[-1] for vm in sim.state("lustre-eus-01")["vms"]} == {
        "2.15.5"
    }
    assert (halted["state"]["type"], halted["state"]["name"]) == ("COMPLETED", "Stopped")
    message = halted["state"]["message"] or ""
    assert "stopped: halted by operator" in message, message
    assert "1 not started" in message, message
    summary = next(
        a for a in artifacts_of(prefect_server, halted["id"]) if a["key"] == "fleet-summary"
    )
    assert "1 not started" in summary["description"], summary

    results_before = fleet_results(prefect_server)
    # A scheduled tick on a Saturday noon: no window of the fleet opens.
    noop = run_flow(
        prefect_server,
        **common,
        mode="scheduled",
        at="2026-12-05T12:00:00+00:00",
        run_name=f"noop-{uuid.uuid4().hex[:8]}",
    )
    assert noop["state"]["type"] == "COMPLETED"
    assert noop["state"]["message"] == "no window opens in this tick"
    assert artifacts_of(prefect_server, noop["id"]) == []
    assert fleet_results(prefect_server) == results_before

    page = browser.new_page()
    try:
        badge = state_badge(page, prefect_server, f"/runs/flow-run/{halted['id']}")
        # Not a green "Completed": the run stopped with a planned cluster left unstarted.
        assert badge.inner_text() == "Stopped"
        assert "state--completed" in (badge.get_attribute("class") or "")  # nothing broken
        # Its log says why, on the run's own page: the halt, and how to clear it.
        page.get_by_text("says halt (set before this run started)").first.wait_for(timeout=60_000)
        assert "amlfs control run" in page.inner_text("body")
    finally:
        page.close()


def schema_labels(schema: dict[str, Any], node: dict[str, Any] | None = None) -> list[str]:
    """Every property of ``schema``, depth first in the order of each model's ``position``:
    the order in which the run form lists its fields."""
    node = schema if node is None else node
    if "$ref" in node:
        node = schema["definitions"][node["$ref"].rsplit("/", 1)[-1]]
    names: list[str] = []
    properties = node.get("properties", {})
    for name in sorted(properties, key=lambda n: properties[n].get("position", 0)):
        names.append(name)
        names += schema_labels(schema, properties[name])
    return names


def test_the_run_form_lists_fields_in_order_and_refuses_a_hotfix_naming_no_cluster(
    prefect_server: PrefectServer, browser: Any
) -> None:
    from prefect.utilities.callables import parameter_schema

    from flows.fleet_maintenance import fleet_maintenance

    schema = parameter_schema(fleet_maintenance.fn).model_dump_for_openapi()
    flow_id = api(prefect_server, "/flows/", {"name": "fleet-maintenance"})["id"]
    deployment = api(
        prefect_server,
        "/deployments/",
        {
            "name": f"form-{uuid.uuid4().hex[:8]}",
            "flow_id": flow_id,
            "enforce_parameter_schema": True,
            "parameter_openapi_schema": schema,
            "parameters": {
                "params": {
                    "fleet_file": str(SMALL_FLEET),
                    "release_file": str(RELEASE_FILE),
                    "mode": "hotfix",
                }
            },
        },
    )

    def runs() -> list[dict[str, Any]]:
        return api(  # type: ignore[no-any-return]
            prefect_server,
            "/flow_runs/filter",
            {"deployments": {"id": {"any_": [deployment["id"]]}}},
        )

    page = browser.new_page()
    try:
        page.goto(ui(prefect_server, f"/deployments/deployment/{deployment['id']}/run"))
        labels = page.locator(".schema-form-property__label")
        labels.first.wait_for(timeout=60_000)
        shown = [
            label.removesuffix(" (Optional)").lower().replace(" ", "_")
            for label in labels.all_inner_texts()
        ]
        # Every field in its model's declared order, nested ones under their parent; none of
        # the fields kept out of the form (process layout, test hooks, the saga's baseline).
        assert shown == schema_labels(schema), shown
        hidden = {"processes", "task_workers", "cluster_deployment", "dead_run_after_s"}
        assert not (hidden | {"naive_order"}) & set(shown), shown
        # The emulator's endpoint is a plain text field with its description (as `str |
        # None` it was a type picker reading 'Property is type "None"').
        form = page.inner_text("body")
        endpoint = form[form.index("Emulator Endpoint") : form.index("Azure Block")]
        assert "empty: the Blocks below" in endpoint, endpoint
        assert "Property is type" not in endpoint, endpoint

        # The hotfix deployment's defaults name no cluster: the server refuses the run.
        page.get_by_role("button", name="Submit").click()
        page.get_by_text("Validation failed for field 'params.selector.names'").first.wait_for(
            timeout=30_000
        )
        assert runs() == []
        # The field the refusal names says the rule in its own words (JSON schema has no
        # custom messages: the server's reason is the validator's, "[] should be non-empty").
        assert "a hotfix names at least one" in page.inner_text("body")

        # Naming one cluster in the form is enough.
        names = page.locator(
            ".schema-form-property", has=page.get_by_text("Names (Optional)", exact=True)
        ).last
        names.get_by_role("button", name="Add item").click()
        names.locator("textarea, input").first.fill("lustre-eus-01")
        page.get_by_role("button", name="Submit").click()
        wait_until("the run created from the form", lambda: len(runs()) == 1)
        (run,) = runs()
        params = FleetParams.model_validate(run["parameters"]["params"])
        assert (params.mode, params.selector.names) == ("hotfix", ["lustre-eus-01"])
    finally:
        page.close()
        for run in runs():
            httpx.delete(f"{prefect_server.url}/flow_runs/{run['id']}", timeout=10)


def test_the_rollout_artifact_says_what_runs_tonight_why_the_rest_wait_and_when_it_is_done(
    sim: Sim, prefect_server: PrefectServer, browser: Any, tmp_path: Path
) -> None:
    """A rollout of the small fleet (canary lustre-eus-01 on Tuesday 02:00; wave1 on
    Wednesday and Thursday), ticked on Tuesday 01:45, when no window opens yet: the tick
    starts nothing, reads the fleet's releases through ARM and publishes the forecast. Its
    artifact page says what runs until the end of the next day and why the rest wait, when each stage
    and the rollout are projected done, and how many clusters run each release."""
    from flows.rollout_view import artifact_key
    from flows.rollouts import RolloutStartParams, RolloutTickParams, start_rollout

    name = f"ui-rollout-{uuid.uuid4().hex[:8]}"
    state_dir = str(tmp_path / "state")
    # The small fleet without lustre-weu-01's blackout on Wednesday the 2nd, so that its
    # window falls before the end of the next day: held, its stage not open.
    doc = yaml.safe_load(SMALL_FLEET.read_text())
    for cluster in doc["clusters"]:
        cluster.pop("blackout_dates", None)
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(yaml.safe_dump(doc))
    start_rollout(
        RolloutStartParams(
            name=name,
            fleet_file=str(fleet_file),
            release_file=str(RELEASE_FILE),
            strategy={"stages": [{"name": "canary", "soak_hours": 24}, {"name": "wave1"}]},
            started_by="ui test",
            at="2026-11-30T12:00:00+00:00",
            state_dir=state_dir,
        )
    )
    tick = RolloutTickParams(
        at="2026-12-01T01:45:00+00:00",
        state_dir=state_dir,
        emulator_endpoint=str(sim.emulator.state_dir / "endpoint.json"),
    )
    code = (
        "import sys\n"
        "from flows.rollouts import RolloutTickParams, rollout_tick\n"
        "state = rollout_tick(RolloutTickParams.model_validate_json(sys.argv[1]), "
        "return_state=True)\n"
        "print(state.type.value, state.message)\n"
    )
    said = in_process(prefect_server, code, tick.model_dump_json())
    assert f"COMPLETED {name}: no window of its clusters opens in this tick" in said, said
    # Nothing in the world moved: the tick only read.
    assert {vm["os_image"].rsplit("/", 1)[-1] for vm in sim.state()["vms"]} == {"2.15.5"}
    (artifact,) = api(
        prefect_server, "/artifacts/filter", {"artifacts": {"key": {"any_": [artifact_key(name)]}}}
    )
    page = browser.new_page()
    try:
        page.goto(ui(prefect_server, f"/artifacts/artifact/{artifact['id']}"))
        page.get_by_text("From 2026-12-01 01:45 until 2026-12-03 00:00 UTC").first.wait_for(
            timeout=30_000
        )
        body = page.inner_text("body")
        assert "2 windows, 1 to start" in body, body
        rows = {
            cells[1]: cells
            for cells in (
                [c.strip() for c in row.locator("td").all_inner_texts()]
                for row in page.locator("tr").all()
            )
            if len(cells) == 5
        }
        assert rows["lustre-eus-01"][:4] == [
            "2026-12-01T02:00:00+00:00",
            "lustre-eus-01",
            "canary",
            "yes",
        ], rows
        held = rows["lustre-weu-01"]
        assert held[:4] == ["2026-12-02T01:30:00+00:00", "lustre-weu-01", "wave1", "held"], rows
        assert "waits for stage canary to finish" in held[4], held
        # When: the canary Tuesday 02:10; wave1 opens after the 24 h soak, so Wednesday's
        # window is missed: lustre-weu-01 goes the Wednesday after, the last of the rollout.
        assert "stage canary: 0/1 upgraded" in body, body
        assert "projected completion: Wed 2026-12-09 01:40 UTC" in body, body
        # The fleet's releases, read by the tick's census (no run had read any cluster).
        assert "Fleet releases" in body
        releases = [
            [c.strip() for c in row.locator("td").all_inner_texts()]
            for row in page.locator("tr").all()
        ]
        assert ["2.15.5", "3"] in releases, releases
    finally:
        page.close()
