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
