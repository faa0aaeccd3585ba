"""``make demo``: the fleet flow end to end on the emulator, with ephemeral Prefect.

Starts the emulator on examples/fleet-small.yaml (3 clusters x 6 VMs) with a fault that makes
one node of lustre-scus-01 boot without Lustre modules (a bad image on that cluster), then:

1. plans the weekly run as of now (dry run: each cluster's window and why it would not run);
2. runs the fleet flow as a hotfix for the three clusters now (windows overridden, with the
   reason recorded): canary wave first, then wave1 in parallel;
3. prints the fleet summary: the run's own figures beside the emulator's customer view (the
   judge): downtime per cluster, evictions, the rollback and its reason, data-disk changes
   and leaked disks.
"""

from __future__ import annotations

import os
import ssl
import sys
import tempfile
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# A failing step is logged with its traceback by Prefect; the summary below says it shorter.
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "CRITICAL")

REPO = Path(__file__).resolve().parent.parent
TIME_SCALE = 100.0
BAD_NODE = "scus01-oss1"


def main() -> int:
    from amlfs.fleet import ClusterSelector, FleetPolicy
    from amlfs_sim.server import Emulator
    from flows.fleet_maintenance import FleetParams, fleet_maintenance

    console = Console(width=max(Console().width, 150))
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="amlfs-demo-") as tmp:
        emulator = Emulator.from_fleet_file(
            REPO / "examples" / "fleet-small.yaml", Path(tmp) / "sim", time_scale=TIME_SCALE
        )
        with emulator as endpoint:
            context = ssl.create_default_context(cafile=endpoint.ca_file)
            control = httpx.Client(base_url=endpoint.control_url, verify=context, timeout=30)
            control.post(
                "/faults",
                json={"kind": "node.boot", "target": BAD_NODE, "code": "BadImage", "count": 1},
            ).raise_for_status()
            console.print(
                f"[bold]amlfs-sim[/]: {len(emulator.backend.vms)} VMs, SSH on port "
                f"{endpoint.ssh['port']}, time scale {TIME_SCALE:g}; fault: {BAD_NODE} boots "
                "the new image without Lustre modules"
            )
            common = {
                "fleet_file": str(REPO / "examples" / "fleet-small.yaml"),
                "release_file": str(REPO / "examples" / "release-2.15.6.yaml"),
                "emulator_endpoint": str(Path(tmp) / "sim" / "endpoint.json"),
                "state_dir": str(Path(tmp) / "state"),
            }
            plan = fleet_maintenance(FleetParams(**common, mode="manual", dry_run=True))
            table = Table(title="1. plan as of now (dry run: nothing changed)")
            for column in ("cluster", "wave", "current", "runs", "why"):
                table.add_column(column)
            for row in plan["plan"]:
                table.add_row(
                    row["cluster"],
                    row["wave"],
                    row["current_release"] or "?",
                    "yes" if row["run"] else "no",
                    row["reason"],
                )
            console.print(table)

            names = [c.name for c in emulator.world.fleet.clusters]
            # A run with a cluster that needs attention ends Failed: read its summary anyway.
            final = fleet_maintenance(
                FleetParams(
                    **common,
                    mode="hotfix",
                    selector=ClusterSelector(names=names),
                    policy=FleetPolicy(
                        override_window=True,
                        reason="demo: rehearse the weekly upgrade now",
                        error_budget=1,
                    ),
                    run_name="demo",
                ),
                return_state=True,
            )
            summary = final.result(raise_on_failure=False)
            if not isinstance(summary, dict):
                raise SystemExit(f"the fleet run ended {final.type.value}: {final.message}")
            state = control.get("/state").json()
            control.close()
    table = Table(
        title="2. fleet run 'demo' (hotfix, windows overridden): the run's figures / the "
        "emulator's customer view"
    )
    # Downtime and evictions: the run's own figure / what the emulator's customers saw.
    for column in ("cluster", "wave", "result", "release", "downtime", "evictions", "reason"):
        table.add_column(column)
    for name, result in summary["results"].items():
        view = state["clusters"].get(name, {})
        table.add_row(
            name,
            result.get("wave", ""),
            result["outcome"],
            f"{result['release_before']} -> {result['release_after']}",
            f"{result.get('downtime_observed_s', 0):.0f} / {view.get('downtime_total', 0):.0f} s",
            f"{_figure(result.get('evictions'))} / {view.get('evictions', '?')}",
            _short(result.get("reason", "") or ""),
        )
    console.print(table)
    console.print(
        f"data-disk changes: {len(state['data_disk_changes'])}, leaked disks: "
        f"{len(state['leaked_disks'])}, VM updates refused by the data-disk guard: "
        f"{len(state['violations'])}; max clusters in flight: {summary['max_in_flight']}"
    )
    console.print(f"demo took {time.monotonic() - started:.0f} s")
    told = {n: r for n, r in summary["results"].items() if r.get("evictions") is not None}
    ok = (
        all(r["evictions"] == state["clusters"][n]["evictions"] for n, r in told.items())
        and not state["data_disk_changes"]
        and not state["leaked_disks"]
        and {r["outcome"] for r in summary["results"].values()} <= {"upgraded", "rolled_back"}
    )
    return 0 if ok else 1


def _figure(value: object) -> str:
    return "-" if value is None else str(value)


def _short(text: str, limit: int = 70) -> str:
    text = text.split(" (modprobe")[0]
    return text if len(text) <= limit else text[: limit - 1] + "…"


if __name__ == "__main__":
    sys.exit(main())
