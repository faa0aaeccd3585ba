"""Emulator capacity: memory per 1,000 VMs, GET-VM requests/s through the real SDK, and SSH
sessions/round-trips per second against N nodes held open at once (real paramiko).

Not a test: prints a table and a final ``key=value`` line. The emulator runs as its own
process (``amlfs-sim serve --no-throttle``, as in a deployment; in one process the SDK client
threads and the server fight over the GIL and the figure measures that fight), throttling off
so the figure is the emulator's own ceiling rather than Azure's 8,000 GETs/min policy.
Clients run in separate processes, each with its own SDK client.

    .venv/bin/python bench/sim_capacity.py [--clusters 1000] [--nodes 8] [--seconds 10]
                                           [--ssh-nodes 2000]
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import os
import random
import signal
import subprocess
import tempfile
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from amlfs.azure import StaticTokenCredential, compute_client
from amlfs.clock import ScaledClock
from amlfs.ssh import NodeShell, SshConfig, SshPool, load_private_key
from amlfs_sim.arm.backend import ArmBackend
from amlfs_sim.genfleet import dump_fleet_yaml, generate_fleet
from amlfs_sim.server import serve_process
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


def _ssh_client(
    ssh: dict[str, object], nodes: list[tuple[str, str]], seconds: float, seed: int
) -> tuple[int, float, int, int, float]:
    """Open a session to every node (kept open), then run commands on random ones."""
    config = SshConfig(
        username=str(ssh["username"]),
        key=load_private_key(Path(str(ssh["key_file"])).read_text()),
        known_hosts=Path(str(ssh["known_hosts"])),
        port=int(str(ssh["port"])),
        connect_timeout_s=60,
        command_timeout_s=60,
    )
    pool = SshPool(config)
    shells = [pool.shell(name, address) for name, address in nodes]
    errors = 0

    def first(shell: NodeShell) -> bool:
        try:
            return shell.run(["lctl", "get_param", "-n", "version"]).status == 0
        except Exception:  # counted and reported
            return False

    started = time.perf_counter()
    with ThreadPoolExecutor(16) as executor:
        connected = sum(executor.map(first, shells))
    connect_s = time.perf_counter() - started
    errors += len(shells) - connected
    rng = random.Random(seed)
    stop_at = time.monotonic() + seconds
    trips = 0

    failed = [0]

    def worker(index: int) -> int:
        local = random.Random(seed * 100 + index)
        done = 0
        while time.monotonic() < stop_at:
            shell = local.choice(shells)
            try:
                shell.run(["lctl", "get_param", "-n", "timeout"])
                done += 1
            except Exception:  # counted and reported
                failed[0] += 1
        return done

    del rng
    started = time.perf_counter()
    with ThreadPoolExecutor(8) as executor:
        trips = sum(executor.map(worker, range(8)))
    trip_s = time.perf_counter() - started
    errors += failed[0]
    pool.close()
    return connected, connect_s, errors, trips, trip_s


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


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
    parser.add_argument("--ssh-nodes", type=int, default=2000)
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
        server, info = serve_process(
            fleet_file, Path(tmp), "--no-throttle", stdout=subprocess.DEVNULL
        )
        try:
            endpoint = asdict(info)
            idle_rss = _rss_mib(server.pid)
            names = [(c.resource_group, n.name) for c in world.fleet.clusters for n in c.nodes]
            cpu0 = _cpu_seconds(server.pid)
            with multiprocessing.get_context("spawn").Pool(args.clients) as pool:
                results = pool.starmap(
                    _client, [(endpoint, names, args.seconds, i) for i in range(args.clients)]
                )
            server_cpu = _cpu_seconds(server.pid) - cpu0
            loaded_rss = _rss_mib(server.pid)
            addresses = [(n.name, str(n.address)) for _, n in world.fleet.iter_nodes()]
            addresses = addresses[: args.ssh_nodes]
            shares = [addresses[i :: args.clients] for i in range(args.clients)]
            cpu1 = _cpu_seconds(server.pid)
            ssh_threads = 0
            with multiprocessing.get_context("spawn").Pool(args.clients) as pool:
                pending = pool.starmap_async(
                    _ssh_client,
                    [(endpoint["ssh"], share, args.seconds, i) for i, share in enumerate(shares)],
                )
                while not pending.ready():  # peak threads while the sessions are open
                    ssh_threads = max(ssh_threads, _threads(server.pid))
                    pending.wait(0.5)
                ssh_results = pending.get()
            ssh_cpu = _cpu_seconds(server.pid) - cpu1
            ssh_rss = _rss_mib(server.pid)
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
    connected = sum(r[0] for r in ssh_results)
    connect_s = max(r[1] for r in ssh_results)
    ssh_errors = sum(r[2] for r in ssh_results)
    trips = sum(r[3] for r in ssh_results)
    trip_s = max(r[4] for r in ssh_results)
    sessions_per_s = connected / connect_s if connect_s else 0.0
    trips_per_s = trips / trip_s if trip_s else 0.0
    table.add_row(f"SSH nodes connected and held open ({args.clients} processes)", str(connected))
    table.add_row("SSH new sessions/s (handshake + auth + 1 command)", f"{sessions_per_s:.0f}")
    table.add_row("SSH command round-trips/s on open sessions", f"{trips_per_s:.0f}")
    table.add_row(
        "emulator RSS after / peak threads with the sessions open",
        f"{ssh_rss:.0f} MiB / {ssh_threads}",
    )
    table.add_row("emulator CPU s for the SSH phase", f"{ssh_cpu:.1f}")
    table.add_row("SSH errors", str(ssh_errors))
    Console().print(table)
    print(
        f"vms={vms} mib_per_1000_vms={mib_per_1000:.2f} get_vm_rps={rps:.0f} "
        f"p50_ms={p50:.1f} p99_ms={p99:.1f} server_cpu_ms_per_req="
        f"{server_cpu / max(total, 1) * 1000:.2f} errors={errors} rss_mib={loaded_rss:.0f} "
        f"ssh_nodes={connected} ssh_sessions_per_s={sessions_per_s:.0f} "
        f"ssh_round_trips_per_s={trips_per_s:.0f} ssh_errors={ssh_errors}"
    )


if __name__ == "__main__":
    main()
