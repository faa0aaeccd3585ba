"""Emulator capacity: memory per 1,000 VMs and GET-VM requests/s through the real SDK.

Not a test: prints a table and a final ``key=value`` line. Throttling is disabled here so the
figure is the emulator's own ceiling, not Azure's 8,000 GETs/min policy.

    .venv/bin/python bench/sim_capacity.py [--clusters 1000] [--nodes 8] [--seconds 10]
"""

from __future__ import annotations

import argparse
import gc
import random
import resource
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

from rich.console import Console
from rich.table import Table

from amlfs.azure import StaticTokenCredential, compute_client
from amlfs.clock import ScaledClock
from amlfs.models import parse_fleet
from amlfs_sim.arm.backend import ArmBackend
from amlfs_sim.arm.throttling import ThrottlePolicy
from amlfs_sim.genfleet import generate_fleet
from amlfs_sim.server import Emulator
from amlfs_sim.spec import build_world


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()

    data = generate_fleet(args.clusters, args.nodes)
    world = build_world(data, "<generated>")
    vms = args.clusters * args.nodes
    parse_fleet(data)  # the orchestrator's own parse, for its timing below
    started = time.perf_counter()
    parse_fleet(data)
    parse_s = time.perf_counter() - started

    gc.collect()
    tracemalloc.start()
    before, _ = tracemalloc.get_traced_memory()
    backend = ArmBackend(world, ScaledClock(1.0))
    after, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    mib_per_1000 = (after - before) / 2**20 / (vms / 1000)
    del backend

    with tempfile.TemporaryDirectory() as state_dir:
        emulator = Emulator(world, Path(state_dir), throttle=ThrottlePolicy(enabled=False))
        endpoint = emulator.start()
        names = [
            (c.resource_group, n.name, c.subscription_id)
            for c in world.fleet.clusters
            for n in c.nodes
        ]
        counts = [0] * args.clients
        errors = [0] * args.clients
        stop_at = time.monotonic() + args.seconds

        def client(index: int) -> None:
            rng = random.Random(index)
            compute = compute_client(
                names[0][2],
                StaticTokenCredential("bench"),
                arm_url=endpoint.arm_url,
                ca_file=endpoint.ca_file,
            )
            while time.monotonic() < stop_at:
                rg, name, _ = rng.choice(names)
                try:
                    compute.virtual_machines.get(rg, name)
                    counts[index] += 1
                except Exception:
                    errors[index] += 1

        cpu0 = time.process_time()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        cpu = time.process_time() - cpu0
        emulator.stop()
    total = sum(counts)
    rps = total / args.seconds
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    table = Table(title=f"amlfs-sim capacity: {vms} VMs ({args.clusters} x {args.nodes})")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row("emulator state per 1,000 VMs (MiB, tracemalloc)", f"{mib_per_1000:.2f}")
    table.add_row("process max RSS (MiB, SDK clients included)", f"{rss_mib:.0f}")
    table.add_row(f"GET VM through the SDK ({args.clients} client threads)", f"{rps:.0f} req/s")
    table.add_row("errors", str(sum(errors)))
    table.add_row("CPU s per request (client + server, one process)", f"{cpu / max(total, 1):.4f}")
    table.add_row("parse fleet file (s)", f"{parse_s:.2f}")
    Console().print(table)
    print(
        f"vms={vms} mib_per_1000_vms={mib_per_1000:.2f} get_vm_rps={rps:.0f} "
        f"errors={sum(errors)} max_rss_mib={rss_mib:.0f}"
    )


if __name__ == "__main__":
    main()
