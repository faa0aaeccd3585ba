"""What the operator sees in the Prefect UI, read in a real headless browser (Debian's
chromium driven by Playwright) from a real ``prefect server``, after a real fleet run on the
emulator: one cluster upgraded, one rolled back (its release does not boot on a node).

* the fleet run's and the rolled-back cluster's states are not green: red ``RolledBack``;
* each cluster is a task run named after it, its steps named after it too;
* the results table leads with cluster, result, downtime, reason and carries evictions,
  data-disk changes, leaked disks and the override; each cluster has its own artifact.
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

from flows.markdown import markdown_text
from tests.conftest import REPO, PrefectServer, Sim, cli_args

pytestmark = pytest.mark.integration

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
    response.raise_for_status()
    return response.json()


def ui(server: PrefectServer, path: str) -> str:
    return server.url.removesuffix("/api") + path


def test_the_ui_tells_each_clusters_truth_at_a_glance(
    sim: Sim, prefect_server: PrefectServer, browser: Any, tmp_path: Path
) -> None:
    sim.fault(kind="node.boot", target="scus01-oss1", code="BadImage", count=1)
    run_name = f"ui-{uuid.uuid4().hex[:8]}"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "amlfs.cli",
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
    (fleet_run,) = [
        r
        for r in api(
            prefect_server,
            "/flow_runs/filter",
            {"flows": {"name": {"any_": ["fleet-maintenance"]}}},
        )
        if r["parameters"]["params"].get("run_name") == run_name
    ]
    page = browser.new_page()
    try:
        page.goto(ui(prefect_server, f"/runs/flow-run/{fleet_run['id']}"))
        header = page.locator(".state-badge").first
        header.wait_for(timeout=60_000)
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

        page.goto(ui(prefect_server, f"/runs/task-run/{rolled['id']}"))
        badge = page.locator(".state-badge").first
        badge.wait_for(timeout=30_000)
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
