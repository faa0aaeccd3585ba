"""Emulator capacity: memory per 1,000 VMs and GET-VM requests/s through the real SDK.

Not a test: prints a table and a final ``key=value`` line. The emulator runs as its own
process (``amlfs-sim serve --no-throttle``, as in a deployment; in one process the SDK client
threads and the server fight over the GIL and the figure measures that fight), throttling off
so the figure is the emulator's own ceiling rather than Azure's 8,000 GETs/min policy.
Clients run in separate processes, each with its own SDK client.

    .venv/bin/python bench/sim_capacity.py [--clusters 1000] [--nodes 8] [--seconds 10]
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from rich.console import Console
from rich.table import Table

from amlfs.azure import StaticTokenCredential, compute_client
from amlfs.clock import ScaledClock
from amlfs_sim.arm.backend import ArmBackend
from amlfs_sim.genfleet import dump_fleet_yaml, generate_fleet
from amlfs_sim.spec import build_world


def _client(
    endpoint: dict[str, str], names: list[tuple[str, str]], seconds: float, seed: int
) -> tuple[int, int, list[float]]:
    rng = random.Random(seed)
    compute = compute_client(
        endpoint["subscription_id"],
        StaticTokenCredential("bench"),
        arm_url=endpoint["arm_url"],
        ca_file=endpoint["ca_file"],
    )
    done = errors = 0
    latencies: list[float] = []
    stop_at = time.monotonic() + seconds
    while time.monotonic() < stop_at:
        rg, name = rng.choice(names)
        started = time.perf_counter()
        try:
            compute.virtual_machines.get(rg, name)
            done += 1
        except Exception:  # counted and reported, a capacity run goes on
            errors += 1
        latencies.append(time.perf_counter() - started)
    compute.close()
    return done, errors, latencies


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=2)
    args = parser.parse_args()

    data = generate_fleet(args.clusters, args.nodes)
    world = build_world(data, "<generated>")
    vms = args.clusters * args.nodes

    gc.collect()
    tracemalloc.start()
    before, _ = tracemalloc.get_traced_memory()
    backend = ArmBackend(world, ScaledClock(1.0))
    after, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    mib_per_1000 = (after - before) / 2**20 / (vms / 1000)
    del backend

    with tempfile.TemporaryDirectory() as tmp:
        fleet_file = Path(tmp) / "fleet.yaml"
        fleet_file.write_text(dump_fleet_yaml(data))
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "amlfs_sim.cli",
                "serve",
                "--fleet",
                str(fleet_file),
                "--state-dir",
                tmp,
                "--no-throttle",
            ],
            stdout=subprocess.DEVNULL,
        )
        try:
            endpoint_file = Path(tmp) / "endpoint.json"
            deadline = time.monotonic() + 120
            while not endpoint_file.exists():
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("amlfs-sim serve did not come up")
                time.sleep(0.1)
            endpoint = json.loads(endpoint_file.read_text())
            idle_rss = _rss_mib(server.pid)
            names = [(c.resource_group, n.name) for c in world.fleet.clusters for n in c.nodes]
            cpu0 = _cpu_seconds(server.pid)
            with multiprocessing.get_context("spawn").Pool(args.clients) as pool:
                results = pool.starmap(
                    _client, [(endpoint, names, args.seconds, i) for i in range(args.clients)]
                )
            server_cpu = _cpu_seconds(server.pid) - cpu0
            loaded_rss = _rss_mib(server.pid)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)

    total = sum(r[0] for r in results)
    errors = sum(r[1] for r in results)
    latencies = sorted(x for r in results for x in r[2])
    p50 = latencies[len(latencies) // 2] * 1000 if latencies else 0.0
    p99 = latencies[int(len(latencies) * 0.99)] * 1000 if latencies else 0.0
    rps = total / args.seconds

    table = Table(title=f"amlfs-sim capacity: {vms} VMs ({args.clusters} x {args.nodes})")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row("emulator state per 1,000 VMs (MiB, tracemalloc)", f"{mib_per_1000:.2f}")
    table.add_row(
        "emulator process RSS, idle / after load (MiB)", f"{idle_rss:.0f} / {loaded_rss:.0f}"
    )
    table.add_row(f"GET VM through the SDK ({args.clients} client processes)", f"{rps:.0f} req/s")
    table.add_row("latency p50 / p99 (ms)", f"{p50:.1f} / {p99:.1f}")
    table.add_row("emulator CPU ms per request", f"{server_cpu / max(total, 1) * 1000:.2f}")
    table.add_row("errors", str(errors))
    Console().print(table)
    print(
        f"vms={vms} mib_per_1000_vms={mib_per_1000:.2f} get_vm_rps={rps:.0f} "
        f"p50_ms={p50:.1f} p99_ms={p99:.1f} server_cpu_ms_per_req="
        f"{server_cpu / max(total, 1) * 1000:.2f} errors={errors} rss_mib={loaded_rss:.0f}"
    )


if __name__ == "__main__":
    main()
