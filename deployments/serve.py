"""Serve the three deployments of ``fleet-maintenance`` from this process (one machine).

    PREFECT_API_URL=http://127.0.0.1:4200/api python -m deployments.serve \
        [--fleet examples/fleet-small.yaml] [--release examples/release-2.15.6.yaml] \
        [--endpoint .sim/endpoint.json] [--state-dir .amlfs-state]

* ``amlfs-weekly-tick``: every 15 minutes (cron ``*/15 * * * *``), mode ``scheduled``: the
  clusters whose window opens in the tick;
* ``amlfs-manual``: no schedule; started from the UI with the typed form (dry run by default);
* ``amlfs-hotfix``: no schedule; started through the REST API
  (``POST /api/deployments/{id}/create_flow_run``) for named clusters now.

For several machines use ``deployments/prefect.yaml`` with a process work pool instead.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from prefect import serve

from flows.fleet_maintenance import fleet_maintenance

WEEKLY = "amlfs-weekly-tick"
MANUAL = "amlfs-manual"
HOTFIX = "amlfs-hotfix"


def deployments(
    fleet: str, release: str, endpoint: str | None, state_dir: str, cron: str = "*/15 * * * *"
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
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fleet", default="examples/fleet-small.yaml")
    parser.add_argument("--release", default="examples/release-2.15.6.yaml")
    parser.add_argument("--endpoint", default=None, help="amlfs-sim endpoint.json")
    parser.add_argument("--state-dir", default=".amlfs-state")
    parser.add_argument("--cron", default="*/15 * * * *")
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    serve(
        *deployments(
            os.path.abspath(args.fleet),
            os.path.abspath(args.release),
            os.path.abspath(args.endpoint) if args.endpoint else None,
            os.path.abspath(args.state_dir),
            args.cron,
        )
    )


if __name__ == "__main__":
    main()
