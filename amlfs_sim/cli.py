"""``amlfs-sim``: serve the emulated fleet, or generate a large fleet file."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer

from amlfs.errors import InventoryError

app = typer.Typer(
    help="Emulated Azure Compute + Lustre fleet for amlfs-maintenance.",
    no_args_is_help=True,
    add_completion=False,
)


@app.command()
def serve(
    fleet: Annotated[
        Path, typer.Option(help="Fleet YAML (inventory + optional emulator: section)")
    ],
    state_dir: Annotated[Path, typer.Option(help="Where endpoint.json, TLS and keys are written")],
    time_scale: Annotated[float, typer.Option(help="Sim seconds per real second")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed of durations and probabilistic faults")] = 0,
    port: Annotated[int, typer.Option(help="HTTPS port on 127.0.0.1 (0: any free)")] = 0,
    throttle: Annotated[
        bool, typer.Option(help="Apply Azure Compute's throttling buckets (off: capacity runs)")
    ] = True,
    switch_interval: Annotated[
        float | None,
        typer.Option(
            help="sys.setswitchinterval (s): thousands of SSH session threads want a longer "
            "one than Python's 0.005"
        ),
    ] = None,
    freeze_heap: Annotated[
        bool,
        typer.Option(
            help="Freeze the fleet built at start-up out of the garbage collector's full "
            "walks (they hold the GIL over every SSH session thread)"
        ),
    ] = True,
) -> None:
    """Serve until SIGTERM/SIGINT; endpoint.json appears in STATE_DIR when ready."""
    if switch_interval is not None:
        if switch_interval <= 0:
            typer.echo(f"error: --switch-interval must be > 0, got {switch_interval}", err=True)
            raise typer.Exit(2)
        sys.setswitchinterval(switch_interval)
    from amlfs_sim.arm.throttling import ThrottlePolicy
    from amlfs_sim.server import Emulator

    try:
        emulator = Emulator.from_fleet_file(
            fleet,
            state_dir,
            time_scale=time_scale,
            seed=seed,
            port=port,
            throttle=ThrottlePolicy(enabled=throttle),
        )
    except InventoryError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
    done = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: done.set())
    endpoint = emulator.start(freeze_heap=freeze_heap)
    vms = len(emulator.backend.vms)
    typer.echo(
        f"amlfs-sim: {vms} VMs at {endpoint.arm_url} (time scale {time_scale}); "
        f"endpoint: {state_dir / 'endpoint.json'}"
    )
    ssh = endpoint.ssh
    typer.echo(
        f"amlfs-sim: SSH on port {ssh['port']} of every node address, e.g. "
        f"ssh -i {ssh['key_file']} -o UserKnownHostsFile={ssh['known_hosts']} "
        f"-p {ssh['port']} {ssh['username']}@ADDRESS lctl dl"
    )
    sys.stdout.flush()
    done.wait()
    emulator.stop()
    typer.echo("amlfs-sim: stopped")


@app.command("gen-fleet")
def gen_fleet(
    clusters: Annotated[int, typer.Option(help="Number of clusters")],
    nodes_per_cluster: Annotated[int, typer.Option(help="VMs per cluster (>= 2)")] = 6,
    subscriptions: Annotated[int, typer.Option(help="Spread clusters over N subscriptions")] = 1,
    seed: Annotated[int, typer.Option()] = 0,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="File (default stdout)")
    ] = None,
) -> None:
    """Write a generated fleet file (unique loopback addresses, windows spread over the week)."""
    from amlfs_sim.genfleet import dump_fleet_yaml, generate_fleet

    try:
        data = generate_fleet(clusters, nodes_per_cluster, subscriptions=subscriptions, seed=seed)
    except ValueError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
    text = dump_fleet_yaml(data)
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text)
        typer.echo(f"wrote {clusters} clusters x {nodes_per_cluster} nodes to {output}", err=True)


if __name__ == "__main__":
    app()
