"""Serve the deployments of ``fleet-maintenance`` and of rollouts from this process.

    PREFECT_API_URL=http://127.0.0.1:4200/api python -m deployments.serve \
        [--fleet examples/fleet-small.yaml] [--release examples/release-2.15.6.yaml] \
        [--endpoint .sim/endpoint.json] [--state-dir .amlfs-state]

* ``amlfs-weekly-tick``: every 15 minutes (cron ``*/15 * * * *``), mode ``scheduled``: the
  clusters whose window opens in the tick;
* ``amlfs-manual``: no schedule; started from the UI with the typed form (dry run by default);
* ``amlfs-hotfix``: no schedule; started through the REST API
  (``POST /api/deployments/{id}/create_flow_run``) for named clusters now;
* ``amlfs-rollout-tick``: every 15 minutes, each active rollout advanced by one scheduled
  fleet run gated by its stages (the weekly tick leaves a rollout's clusters to it);
* ``amlfs-rollout-start``: start a rollout from the UI (strategy file or typed strategy);
* ``amlfs-rollout-approval``: a paused run with a form asking to open a stage (the rollout
  tick starts one when a stage waits only for its approval).

For several machines use ``deployments/prefect.yaml`` with a process work pool instead.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from prefect import serve

from flows.fleet_maintenance import fleet_maintenance
from flows.rollouts import rollout_approval, rollout_start, rollout_tick

WEEKLY = "amlfs-weekly-tick"
MANUAL = "amlfs-manual"
HOTFIX = "amlfs-hotfix"
ROLLOUT_TICK = "amlfs-rollout-tick"
ROLLOUT_START = "amlfs-rollout-start"
ROLLOUT_APPROVAL = "amlfs-rollout-approval"  # flows.rollouts.APPROVAL_DEPLOYMENT names it


def deployments(
    fleet: str,
    release: str,
    endpoint: str | None,
    state_dir: str,
    cron: str = "*/15 * * * *",
    strategy: str = "examples/rollout-strategy.yaml",
) -> list[Any]:
    base: dict[str, Any] = {
        "fleet_file": fleet,
        "release_file": release,
        "state_dir": state_dir,
    }
    if endpoint:
        base["emulator_endpoint"] = endpoint
    return [
        fleet_maintenance.to_deployment(
            name=WEEKLY,
            cron=cron,
            parameters={"params": {**base, "mode": "scheduled"}},
            description="Weekly maintenance: clusters whose window opens in this tick.",
            tags=["amlfs", "scheduled"],
        ),
        fleet_maintenance.to_deployment(
            name=MANUAL,
            parameters={"params": {**base, "mode": "manual", "dry_run": True}},
            description="Run from the UI: pick clusters, waves, caps; dry run by default.",
            tags=["amlfs", "manual"],
        ),
        fleet_maintenance.to_deployment(
            name=HOTFIX,
            parameters={"params": {**base, "mode": "hotfix"}},
            description=(
                "Urgent fix for named clusters now, triggered through the REST API; outside "
                "their window only with policy.override_window and policy.reason."
            ),
            tags=["amlfs", "hotfix"],
        ),
        rollout_tick.to_deployment(
            name=ROLLOUT_TICK,
            cron=cron,
            # Only what is set: a null emulator_endpoint is refused by the parameter schema
            # (a plain string, "" for the Blocks) when a run is started from the deployment.
            parameters={
                "params": {"state_dir": state_dir}
                | ({"emulator_endpoint": endpoint} if endpoint else {})
            },
            description="Every active rollout advanced by one scheduled fleet run.",
            tags=["amlfs", "rollout", "scheduled"],
        ),
        rollout_start.to_deployment(
            name=ROLLOUT_START,
            parameters={
                "params": {
                    "fleet_file": fleet,
                    "release_file": release,
                    "strategy_file": strategy,
                    "state_dir": state_dir,
                }
            },
            description="Start a release's rollout: stages, soak, approvals, budget, deadline.",
            tags=["amlfs", "rollout"],
        ),
        rollout_approval.to_deployment(
            name=ROLLOUT_APPROVAL,
            parameters={"params": {"state_dir": state_dir}},
            description="Asks an operator to open a stage (a paused run with a form).",
            tags=["amlfs", "rollout"],
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fleet", default="examples/fleet-small.yaml")
    parser.add_argument("--release", default="examples/release-2.15.6.yaml")
    parser.add_argument("--endpoint", default=None, help="amlfs-sim endpoint.json")
    parser.add_argument("--state-dir", default=".amlfs-state")
    parser.add_argument("--cron", default="*/15 * * * *")
    parser.add_argument("--strategy", default="examples/rollout-strategy.yaml")
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    serve(
        *deployments(
            os.path.abspath(args.fleet),
            os.path.abspath(args.release),
            os.path.abspath(args.endpoint) if args.endpoint else None,
            os.path.abspath(args.state_dir),
            args.cron,
            os.path.abspath(args.strategy),
        )
    )


if __name__ == "__main__":
    main()
