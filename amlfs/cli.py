"""``amlfs``: the operator's command line. Today: check an inventory (and a release) offline."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from amlfs.errors import InventoryError
from amlfs.models import load_fleet, load_release

app = typer.Typer(help="AMLFS fleet maintenance.", no_args_is_help=True, add_completion=False)


@app.callback()
def main() -> None:
    """AMLFS fleet maintenance by OS disk swap."""


@app.command()
def validate(
    fleet: Annotated[Path, typer.Argument(help="Fleet inventory YAML")],
    release: Annotated[Path | None, typer.Option(help="Release YAML to check too")] = None,
) -> None:
    """Validate a fleet file (and a release) without touching Azure; exit 2 naming each problem."""
    console = Console()
    try:
        parsed = load_fleet(fleet)
        parsed_release = load_release(release) if release else None
    except InventoryError as err:
        Console(stderr=True).print(f"[red]error:[/] {err}", highlight=False)
        raise typer.Exit(2) from err
    table = Table(title=f"{fleet}: {len(parsed.clusters)} clusters")
    for column in ("cluster", "region", "wave", "window (UTC)", "nodes"):
        table.add_column(column)
    for cluster in parsed.clusters:
        roles = Counter(n.role.value for n in cluster.nodes)
        window = cluster.window
        table.add_row(
            cluster.name,
            cluster.region,
            cluster.wave,
            f"{window.day_of_week.value} {window.start_utc} +{window.duration_min}m",
            " ".join(f"{role}x{count}" for role, count in roles.items()),
        )
    console.print(table)
    if parsed_release is not None:
        console.print(f"release {parsed_release.version}: {parsed_release.image_id}")


def _print_result(console: Console, result: dict[str, object]) -> None:
    outcome = str(result["outcome"])
    colour = {"upgraded": "green", "rolled_back": "yellow", "already_current": "cyan"}.get(
        outcome, "red"
    )
    console.print(
        f"[bold]{result['cluster']}[/]: [{colour}]{outcome}[/] "
        f"{result['release_before']} -> {result['release_after']}"
        + (f"  reason: {result['reason']}" if result.get("reason") else ""),
        highlight=False,
    )
    table = Table(title="steps (sim seconds)")
    for column in ("step", "status", "seconds"):
        table.add_column(column)
    for step in result["steps"]:  # type: ignore[attr-defined]
        table.add_row(step["name"], step["status"], f"{step['ended_s'] - step['started_s']:.1f}")
    console.print(table)
    console.print(f"downtime as the orchestrator saw it: {result['downtime_observed_s']:.0f} s")
    view = result.get("customer_view")
    if isinstance(view, dict):
        console.print(
            f"customer view (emulator): downtime {view['downtime_total']:.0f} s in "
            f"{len(view['downtime_intervals'])} interval(s), evictions {view['evictions']}, "
            f"serving {view['serving']} on {', '.join(view['lustre_versions'])}, "
            f"data-disk changes {view['data_disk_changes']}, leaked disks "
            f"{len(view['leaked_disks'])}"
        )


@app.command("upgrade-cluster")
def upgrade_cluster(
    fleet: Annotated[Path, typer.Option(help="Fleet inventory YAML")],
    cluster: Annotated[str, typer.Option(help="Cluster name")],
    release: Annotated[Path, typer.Option(help="Release YAML")],
    endpoint: Annotated[
        Path | None, typer.Option(help="amlfs-sim endpoint.json (else the saved Blocks)")
    ] = None,
    state_dir: Annotated[Path, typer.Option(help="Durable state store")] = Path(".amlfs-state"),
    budget_min: Annotated[float, typer.Option(help="Customer downtime budget")] = 30.0,
    keep_old_disks_days: Annotated[int, typer.Option(help="Keep old OS disks N days")] = 0,
) -> None:
    """Upgrade one cluster now (the cluster-upgrade flow), print its result and downtime."""
    import os

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from amlfs.saga import UpgradePolicy
    from flows.cluster_upgrade import ClusterUpgradeParams, cluster_upgrade

    console = Console()
    try:
        parsed = load_fleet(fleet)
        parsed.cluster(cluster)
        load_release(release)
        params = ClusterUpgradeParams(
            fleet_file=str(fleet),
            cluster=cluster,
            release_file=str(release),
            policy=UpgradePolicy(
                downtime_budget_s=budget_min * 60, keep_old_disks_days=keep_old_disks_days
            ),
            state_dir=str(state_dir),
            emulator_endpoint=str(endpoint) if endpoint else None,
        )
    except (InventoryError, ValueError, KeyError) as err:
        Console(stderr=True).print(f"[red]error:[/] {err}", highlight=False)
        raise typer.Exit(2) from err
    result = cluster_upgrade(params)
    _print_result(console, result)
    if result["outcome"] not in ("upgraded", "already_current"):
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
