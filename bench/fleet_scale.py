"""P2-P4: a generated fleet upgraded against an emulator process; makespan vs its lower bound,
orchestrator CPU per node, failures and throttling.

Not a test: prints a table and a final ``key=value`` line. The emulator runs as its own
process (``amlfs-sim serve``, throttling on, time-scaled); the orchestrator is this process:
``amlfs.fleet.FleetRunner`` with the cluster saga (real SDK over HTTPS, real paramiko), all
clusters in one wave, windows overridden (the run measures throughput, not the calendar).

* P2 makespan / lower bound. The bound, in sim seconds, is the largest of:
  - one cluster's shortest possible upgrade: its slowest VM's disk create, + HSM drain, + its
    slowest VM's OS disk swap (the one PUT: stop + swap + boot), + recovery replay, + its
    slowest disk delete (expected values, Monte Carlo over the emulator's duration ranges);
  - clusters x that / parallel slots, slots = min(max_parallel, subscriptions x
    per-subscription cap, regions x per-region cap);
  - Azure's throttling, for the fewest requests any orchestrator needs per VM: 2 writes (the
    new disk's PUT, the VM's PUT), 1 delete (the old disk), 3 reads (one status of each of
    the 3 operations), 1 Compute "Update VM" token, 1 CreateUpdateDisks and 1 DeleteDisks
    request. With n VMs in a subscription (ARM meters per subscription and principal; the
    bench runs one principal) or in a subscription and region (Compute meters there):
      a token bucket of B tokens refilled r/s serves N requests in >= max(0, (N - B) / r):
        ARM reads    (3n - 250) / 25      ARM writes (2n - 200) / 10
        ARM deletes  (n - 200) / 10       Compute Update VM (n - 1500) / (500 / 60)
      a window of L requests per W s serves N in >= (ceil(N / L) - 1) x W:
        CreateUpdateDisks3Min / 30Min: L = 1,000 / 8,000, W = 180 / 1,800
        DeleteDisks3Min / 30Min:       L = 3,000 / 24,000
    (limits: amlfs_sim/arm/README.md, "Throttling"; the emulator enforces the same ones).
* P3 orchestrator CPU seconds (user + system of this process, all threads) per node upgraded.
* P4 run with ``--clusters 1000 --nodes 8``: clusters upgraded, throttled requests, failures.

    .venv/bin/python bench/fleet_scale.py [--clusters 100] [--nodes 6] [--time-scale 20]
        [--max-parallel 25] [--subscriptions 4]
"""

from __future__ import annotations

import argparse
import math
import os
import random
import resource
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from amlfs.fleet import ClusterSelector, FleetPolicy, FleetRunner, PlanRow, plan_fleet
from amlfs.gcpauses import GcPauses, settle_heap
from amlfs.jobs import ClusterJob, ClusterOutcome, Executor, InProcessExecutor
from amlfs.models import Cluster, load_release, parse_fleet
from amlfs.runtime import Connections, from_endpoint
from amlfs.saga import UpgradePolicy
from amlfs.schedule import Prediction
from amlfs.shards import ShardPool, ShardSpec
from amlfs.store import StateStore, Store
from amlfs_sim.genfleet import dump_fleet_yaml, generate_fleet
from amlfs_sim.nodes.lustre import HSM_DRAIN_SECONDS, REPLAY_SECONDS
from amlfs_sim.server import serve_process
from amlfs_sim.spec import Durations

REPO = Path(__file__).resolve().parent.parent
GALLERY_SUB = "4f6c1a52-7a3e-4d7e-9a55-2b1f0c9e8d01"
IMAGES = "/subscriptions/{sub}/resourceGroups/rg-amlfs-images/providers/Microsoft.Compute/galleries/amlfsgallery/images/amlfs-lustre/versions/{v}"


def _delta(before: dict[str, int], after: dict[str, int]) -> list[tuple[str, int]]:
    """Counts by kind that grew during the run, largest first."""
    grown = {k: v - before.get(k, 0) for k, v in after.items()}
    return sorted(((k, v) for k, v in grown.items() if v), key=lambda kv: -kv[1])


def bucket_s(requests: float, bucket: float, per_second: float) -> float:
    """Least time a token bucket (``bucket`` tokens, ``per_second`` refill) takes to serve
    ``requests``."""
    return max(0.0, (requests - bucket) / per_second)


def window_s(requests: int, limit: int, window: float) -> float:
    """Least time fixed windows of ``limit`` requests per ``window`` s take to serve
    ``requests``: every window but the last is waited out."""
    return max(0, math.ceil(requests / limit) - 1) * window


def throttling_bound(vms_per_subscription: int, vms_per_region: int) -> dict[str, float]:
    """The throttling terms of the bound (sim s) for the busiest subscription and the busiest
    (subscription, region), at the fewest requests per VM (see the module docstring)."""
    n, m = vms_per_subscription, vms_per_region
    return {
        "ARM reads": bucket_s(3 * n, 250, 25),
        "ARM writes": bucket_s(2 * n, 200, 10),
        "ARM deletes": bucket_s(n, 200, 10),
        "Compute Update VM": bucket_s(m, 1500, 500 / 60),
        "CreateUpdateDisks": max(window_s(m, 1000, 180), window_s(m, 8000, 1800)),
        "DeleteDisks": max(window_s(m, 3000, 180), window_s(m, 24000, 1800)),
    }


def lower_bound(clusters: list[Cluster], nodes: int, slots: int) -> tuple[float, str]:
    d = Durations()
    rng = random.Random(0)

    def draw(r: Any) -> float:
        return rng.uniform(r.low, r.high)

    # A cluster's steps wait for their slowest VM: the physical minimum of one cluster is the
    # expected max over its VMs of each parallel phase (Monte Carlo on the emulator's ranges).
    samples = 20000
    total = 0.0
    for _ in range(samples):
        create = max(draw(d.disk_create) for _ in range(nodes))
        swap = max(draw(d.power_off) + draw(d.swap) + draw(d.start) for _ in range(nodes))
        delete = max(draw(d.disk_delete) for _ in range(nodes))
        total += create + swap + delete
    one = total / samples + HSM_DRAIN_SECONDS + REPLAY_SECONDS
    count = len(clusters)
    rounds = count * one / slots if count > slots else one
    per_sub = Counter(c.subscription_id for c in clusters)
    per_region = Counter((c.subscription_id, c.region) for c in clusters)
    throttled = throttling_bound(
        max(per_sub.values(), default=0) * nodes, max(per_region.values(), default=0) * nodes
    )
    worst = max(throttled, key=lambda k: throttled[k])
    bound = max(one, rounds, throttled[worst])
    why = (
        f"one cluster {one:.0f} s; {count} x {one:.0f} s / {slots} slots = {rounds:.0f} s; "
        f"throttling {throttled[worst]:.0f} s ({worst})"
    )
    return bound, why


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clusters", type=int, default=100)
    parser.add_argument("--nodes", type=int, default=6)
    parser.add_argument("--time-scale", type=float, default=20.0)
    parser.add_argument("--max-parallel", type=int, default=25)
    parser.add_argument("--subscriptions", type=int, default=4)
    parser.add_argument("--max-polls-per-s", type=float, default=None)
    parser.add_argument("--max-background-polls-per-s", type=float, default=None)
    parser.add_argument("--max-checks-per-s", type=float, default=None)
    parser.add_argument(
        "--switch-interval",
        type=float,
        default=None,
        help="sys.setswitchinterval for the orchestrator processes (GIL hand-off; default 0.005 s)",
    )
    parser.add_argument(
        "--admit-every", type=float, default=0.0, help="Ramp: one cluster start per N real s"
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="Orchestrator processes running the clusters (amlfs.shards; 1: this process)",
    )
    parser.add_argument(
        "--task-workers",
        type=int,
        default=0,
        help="Run the clusters as Prefect task runs served by N `amlfs task-worker` processes "
        "(a Prefect server and the state store on the local PostgreSQL; each worker 1/N of the "
        "endpoint's default rates); 0: this process or --processes",
    )
    parser.add_argument(
        "--window-min", type=float, default=30, help="P4: the one window the fleet must fit"
    )
    parser.add_argument(
        "--orchestrator-nice",
        type=int,
        default=0,
        help="Niceness of the orchestrator processes (this one and its shards), set after the "
        "emulator started: the emulator stands in for Azure's own machines, and on a shared "
        "2-core machine the orchestrator must not starve it",
    )
    parser.add_argument(
        "--sim-switch-interval",
        type=float,
        default=None,
        help="sys.setswitchinterval for the emulator process (default: Python's 0.005 s)",
    )
    parser.add_argument(
        "--no-freeze-heap",
        action="store_true",
        help="Do not freeze start-up objects out of full garbage collections (emulator, "
        "shards, this process): to compare",
    )
    args = parser.parse_args()
    if args.switch_interval is not None:
        # Thousands of mostly idle threads: each thread waiting for the GIL wakes every switch
        # interval, and at 5 ms that alone kept both cores busy in the kernel (see RESULTS.md).
        sys.setswitchinterval(args.switch_interval)
    # 8,000 nodes are 8,000 listening sockets in the emulator (a child: it inherits this).
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    data = generate_fleet(args.clusters, args.nodes, subscriptions=args.subscriptions)
    image = IMAGES.format(sub=GALLERY_SUB, v="{v}")
    data["emulator"] = {
        "initial_image": image.format(v="2.15.5"),
        "images": [
            {"id": image.format(v="2.15.5"), "lustre_version": "2.15.5"},
            {"id": image.format(v="2.15.6"), "lustre_version": "2.15.6"},
        ],
    }
    fleet = parse_fleet({k: v for k, v in data.items() if k != "emulator"})
    release = load_release(REPO / "examples" / "release-2.15.6.yaml")
    regions = len({c.region for c in fleet.clusters})
    policy = FleetPolicy(
        waves=["all"],
        max_parallel=args.max_parallel,
        max_per_subscription=args.max_parallel,
        max_per_region=args.max_parallel,
        error_budget=args.clusters,
        override_window=True,
        reason="benchmark",
        admit_every_s=args.admit_every,
    )
    slots = min(
        args.max_parallel, args.subscriptions * args.max_parallel, regions * args.max_parallel
    )
    with tempfile.TemporaryDirectory() as tmp:
        fleet_file = Path(tmp) / "fleet.yaml"
        fleet_file.write_text(dump_fleet_yaml(data))
        sim_dir = Path(tmp) / "sim"
        server, endpoint = serve_process(
            fleet_file,
            sim_dir,
            "--time-scale",
            str(args.time_scale),
            *(["--no-freeze-heap"] if args.no_freeze_heap else []),
            *(
                ["--switch-interval", str(args.sim_switch_interval)]
                if args.sim_switch_interval
                else []
            ),
            timeout_s=300,
            stdout=subprocess.DEVNULL,
        )
        try:
            if args.orchestrator_nice:
                os.nice(args.orchestrator_nice)  # the shards started below inherit it
            azure, ssh = from_endpoint(sim_dir / "endpoint.json")
            rates = {
                "max_polls_per_s": args.max_polls_per_s,
                "max_background_polls_per_s": args.max_background_polls_per_s,
            }
            azure = azure.model_copy(update={k: v for k, v in rates.items() if v is not None})
            if args.max_checks_per_s is not None:
                ssh = ssh.model_copy(update={"max_checks_per_s": args.max_checks_per_s})
            connections = Connections.create(azure, ssh)
            store: Store = StateStore(Path(tmp) / "state")
            rows = plan_fleet(
                fleet,
                release,
                ClusterSelector(),
                policy,
                fleet_now(),
                Prediction(*(__import__("datetime").timedelta(minutes=m) for m in (10, 6))),
                390.0,
            )
            rows = [PlanRow(**{**r.__dict__, "wave": "all"}) for r in rows]
            upgrade_policy = UpgradePolicy()

            spans: dict[str, tuple[float, float]] = {}  # cluster: (start, end), sim s

            shards = None
            engine: Engine | None = None
            inner: Executor
            if args.task_workers:
                engine = Engine(Path(tmp), args.task_workers, args.max_parallel)
                store = engine.start()
                inner = engine.executor(sim_dir / "endpoint.json")
            elif args.processes > 1:
                spec = ShardSpec(
                    azure,
                    ssh,
                    str(Path(tmp) / "state"),
                    forward_logs=False,
                    switch_interval_s=args.switch_interval,
                    freeze_heap=not args.no_freeze_heap,
                )
                inner = shards = ShardPool(spec, args.processes)
                shards.start()
            else:
                inner = InProcessExecutor(connections, store)

            class Timed:
                """The chosen executor, each job's span noted (sim s)."""

                def run(self, job: ClusterJob, should_abort: Any) -> ClusterOutcome:
                    began = connections.clock.now()
                    outcome = inner.run(job, should_abort)
                    spans[job.name] = (began, connections.clock.now())
                    return outcome

            context = ssl.create_default_context(cafile=endpoint.ca_file)

            def sim_state() -> dict[str, Any]:
                state: dict[str, Any] = httpx.get(
                    f"{endpoint.control_url}/state", verify=context, timeout=120
                ).json()
                return state

            if not args.no_freeze_heap:
                settle_heap()
            own_gc = GcPauses().install()
            state0 = sim_state()
            load = LoadWatch().start()
            cpu0 = resource.getrusage(resource.RUSAGE_SELF)
            sim0 = connections.clock.now()
            started = time.monotonic()

            def progress(summary: Any, cluster: str) -> None:
                result = summary.results[cluster]
                done = len(summary.results)
                if result["outcome"] != "upgraded":
                    print(f"  {cluster}: {result['outcome']}: {result.get('reason')}", flush=True)
                if done % max(1, args.clusters // 20) == 0 or done == len(rows):
                    print(
                        f"  {done}/{len(rows)} done at sim {connections.clock.now() - sim0:.0f} s "
                        f"(real {time.monotonic() - started:.0f} s), {summary.counts()}, "
                        f"load {load.last}",
                        flush=True,
                    )

            summary = FleetRunner(
                fleet,
                rows,
                policy,
                Timed(),
                store,
                "bench",
                release=release,
                upgrade=upgrade_policy,
                on_result=progress,
            ).run()
            makespan = connections.clock.now() - sim0
            cpu1 = resource.getrusage(resource.RUSAGE_SELF)
            shard_stats = shards.close() if shards is not None else None
            shard_cpu = shard_stats.cpu_s if shard_stats is not None else 0.0
            engine_cpu = 0.0
            if engine is not None:
                shard_cpu = engine.worker_cpu_s()
                engine_cpu = engine.server_cpu_s()
                engine.report(len(rows))
                engine.stop()
            load.stop()
            orchestrator_gc = [own_gc.describe(), *(shard_stats.gc if shard_stats else [])]
            pacers = {
                name: connections.pacer(name)
                for name in ("polls", "background_polls", "node_checks")
            }
            # Each subscription's ARM budget: reads, writes, deletes, disk lists.
            pacers.update(
                {name: pacer for name, pacer in connections.pacers().items() if ":" in name}
            )
            connections.close()
            state = sim_state()
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)

    counts = summary.counts()
    upgraded = counts.get("upgraded", 0)
    failures = sum(v for k, v in counts.items() if k != "upgraded")
    # The orchestrator is this process plus its shards (each reported its own CPU time).
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime) + shard_cpu
    nodes_done = upgraded * args.nodes
    per_node = max(nodes_done, 1)
    bound, why = lower_bound(fleet.clusters, args.nodes, slots)
    downtimes = sorted(
        c["downtime_total"] for c in state["clusters"].values() if c["downtime_intervals"]
    )
    table = Table(
        title=f"fleet run: {args.clusters} clusters x {args.nodes} VMs, time scale {args.time_scale:g}"
    )
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    table.add_row("clusters upgraded / failed", f"{upgraded} / {failures}", "all / 0")
    table.add_row("makespan (sim s)", f"{makespan:.0f}", "")
    table.add_row("lower bound (sim s)", f"{bound:.0f}", why)
    table.add_row(
        "P2 makespan / lower bound",
        f"{makespan / bound:.2f}",
        "<= 1.2" if args.clusters == 100 else "(P2 is the 100-cluster run)",
    )
    if args.processes > 1:
        table.add_row("orchestrator processes", str(args.processes), "")
    table.add_row("P3 orchestrator CPU s per node", f"{cpu / per_node:.3f}", "<= 0.2")
    window_s = args.window_min * 60
    table.add_row(
        f"P4 fleet in one {args.window_min:g}-min window",
        f"{makespan:.0f} s, {'fits' if makespan <= window_s else 'does not fit'}",
        f"<= {window_s:.0f} s, 0 failures",
    )
    if spans:
        # Did the fleet wait for admission (the ramp's schedule) or for slow clusters?
        last_start = max(start for start, _ in spans.values()) - sim0
        durations = sorted(end - start for start, end in spans.values())
        median_s = durations[len(durations) // 2]
        planned = (len(spans) - 1) * args.admit_every * args.time_scale
        table.add_row(
            "last cluster started at (sim s)",
            f"{last_start:.0f}",
            f"ramp schedule: {planned:.0f}" if args.admit_every else "",
        )
        table.add_row(
            "one cluster's upgrade median / p90 / max (sim s)",
            f"{median_s:.0f} / {durations[int(len(durations) * 0.9)]:.0f} / {durations[-1]:.0f}",
            "",
        )
    table.add_row("throttled requests (429)", str(state["throttled_requests"]), "")
    sim_cpu = state["process_cpu_s"] - state0["process_cpu_s"]
    arm_requests = state["requests"] - state0["requests"]
    ssh_commands = state["ssh"]["commands"] - state0["ssh"]["commands"]
    ssh_sessions = state["ssh"]["accepted"] - state0["ssh"]["accepted"]
    table.add_row("emulator CPU s per node", f"{sim_cpu / per_node:.3f}", "")
    table.add_row(
        "ARM requests / SSH commands / SSH sessions per node",
        f"{arm_requests / per_node:.1f} / {ssh_commands / per_node:.1f} / "
        f"{ssh_sessions / per_node:.1f}",
        "",
    )
    table.add_row(
        "customer downtime median / max (sim s)",
        f"{downtimes[len(downtimes) // 2]:.0f} / {downtimes[-1]:.0f}" if downtimes else "-",
        "<= 1800",
    )
    table.add_row(
        "evictions / data-disk changes / leaked disks",
        f"{sum(c['evictions'] for c in state['clusters'].values())} / "
        f"{len(state['data_disk_changes'])} / {len(state['leaked_disks'])}",
        "0 / 0 / 0",
    )
    table.add_row("max clusters in flight", str(summary.max_in_flight), f"<= {args.max_parallel}")
    for name, pacer in pacers.items():
        rate = f"{1 / pacer.interval:g}/s" if pacer.interval else "unpaced"
        name = name if ":" not in name else f"{name.split(':')[0]} of {name.split(':')[1][:8]}"
        table.add_row(
            f"{name} ({rate}): paced waits, mean",
            f"{pacer.events} / {pacer.waited_s / max(pacer.events, 1):.2f} s",
            "",
        )
    sim_gc = state.get("gc", {})
    table.add_row(
        "full GCs: emulator / orchestrator processes (count, longest ms)",
        " / ".join(
            f"{g.get('full_collections', 0)}, {g.get('max_ms', 0):.0f}"
            for g in [sim_gc, *orchestrator_gc]
        ),
        "",
    )
    table.add_row(
        "runnable threads: most seen (at real s) / load average max",
        f"{load.most_runnable} ({load.most_runnable_at:.0f}) / {load.max_load:.0f}",
        "",
    )
    Console().print(table)
    for name, g in zip(
        ["emulator"] + [f"orchestrator {i}" for i in range(len(orchestrator_gc))],
        [sim_gc, *orchestrator_gc],
        strict=True,
    ):
        print(
            f"full GCs, {name}: {g.get('full_collections', 0)} in {g.get('total_s', 0)} s "
            f"(CPU {g.get('cpu_s', 0)} s, {g.get('collected', 0)} objects freed); longest: "
            + ", ".join(
                f"{p['ms']:.0f} ms (CPU {p['cpu_ms']:.0f}, {p['collected']} freed) at {p['at_s']:.0f} s"
                for p in g.get("longest", [])
            )
        )
    breakdown = Table(title="per node, by kind")
    breakdown.add_column("ARM request kind")
    breakdown.add_column("per node", justify="right")
    breakdown.add_column("SSH command")
    breakdown.add_column("per node", justify="right")
    arm_kinds = _delta(state0["requests_by_kind"], state["requests_by_kind"])
    arm_kinds += [
        (f"  poll of {kind}", n)
        for kind, n in _delta(state0["polls_by_operation"], state["polls_by_operation"])
    ]
    ssh_heads = _delta(state0["ssh"]["commands_by_head"], state["ssh"]["commands_by_head"])
    for i in range(max(len(arm_kinds), len(ssh_heads))):
        arm = arm_kinds[i] if i < len(arm_kinds) else ("", 0)
        head = ssh_heads[i] if i < len(ssh_heads) else ("", 0)
        breakdown.add_row(
            arm[0],
            f"{arm[1] / per_node:.2f}" if arm[0] else "",
            head[0],
            f"{head[1] / per_node:.2f}" if head[0] else "",
        )
    Console().print(breakdown)
    print(
        f"clusters={args.clusters} nodes={args.nodes} upgraded={upgraded} failures={failures} "
        f"makespan_s={makespan:.0f} lower_bound_s={bound:.0f} p2_ratio={makespan / bound:.2f} "
        f"p3_cpu_s_per_node={cpu / per_node:.3f} throttled={state['throttled_requests']} "
        f"evictions={sum(c['evictions'] for c in state['clusters'].values())} "
        f"leaked={len(state['leaked_disks'])} sim_cpu_s_per_node={sim_cpu / per_node:.3f} "
        f"arm_per_node={arm_requests / per_node:.1f} ssh_cmds_per_node={ssh_commands / per_node:.1f} "
        f"fits_window={makespan <= window_s} cpu_count={os.cpu_count()} "
        f"processes={args.processes} task_workers={args.task_workers} "
        + (f"prefect_server_cpu_s={engine_cpu:.1f} " if args.task_workers else "")
        + f"orchestrator_nice={args.orchestrator_nice} "
        f"freeze_heap={not args.no_freeze_heap} sim_gc_max_ms={sim_gc.get('max_ms', 0)} "
        f"orch_gc_max_ms={max(g.get('max_ms', 0) for g in orchestrator_gc)} "
        f"most_runnable={load.most_runnable} max_load={load.max_load:.0f}"
        + (f" last_start_s={last_start:.0f} cluster_s_median={median_s:.0f}" if spans else "")
    )


#: Where --task-workers keeps the state store (a table of its own, dropped at the end).
POSTGRES_URL = os.environ.get("AMLFS_BENCH_POSTGRES_URL", "postgresql://root@127.0.0.1:5432/test")


def _group_cpu_s(pgid: int) -> float:
    """CPU seconds (user + system) of the live processes of process group ``pgid``."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid:  # fields after the name: state, ppid, pgrp, ...
            total += int(fields[11]) + int(fields[12])
    return total / ticks


class Engine:
    """Prefect's engine for the bench: a server on the local PostgreSQL, the state store in
    a PostgreSQL table, ``workers`` task-worker processes (``deployments.scaleout.ScaleOut``).
    ``report`` prints the dispatch latency (a task run's ``.delay()`` to its worker's start
    mark) and the CPU of the workers and the server while the fleet ran, per cluster.
    """

    def __init__(self, tmp: Path, workers: int, max_parallel: int) -> None:
        from deployments.scaleout import ScaleOut

        self.workers = workers
        self.submitted: dict[str, tuple[str, float]] = {}  # task run: (cluster, time)
        self.cpu0 = (0.0, 0.0)
        self.table = f"amlfs_bench_{os.getpid()}"
        self.store_url = f"{POSTGRES_URL}?table={self.table}"
        self.scale = ScaleOut(
            tmp / "prefect",
            workers=0,
            task_workers=workers,
            store=self.store_url,
            task_worker_limit=math.ceil(max_parallel / workers) + 5,
        )

    def start(self) -> Store:
        from amlfs.store import open_store

        self.scale.__enter__()
        # This process submits the task runs: the same server, settings read on first use.
        os.environ.update(
            {
                k: self.scale.env[k]
                for k in ("PREFECT_API_URL", "PREFECT_HOME", "PREFECT_LOGGING_LEVEL")
            }
        )
        self.store = open_store(self.store_url)
        self._wait_subscribed()
        self.cpu0 = (self.worker_cpu_s(), self.server_cpu_s())
        return self.store

    def _wait_subscribed(self, timeout_s: float = 120.0) -> None:
        """Until the server lists every worker (their start-up CPU is not the fleet's)."""
        url = f"{self.scale.env['PREFECT_API_URL']}/task_workers/filter"
        deadline = time.monotonic() + timeout_s
        seen = 0
        while time.monotonic() < deadline:
            seen = len(httpx.post(url, json={}, timeout=10).json())
            if seen >= self.workers:
                return
            time.sleep(0.5)
        raise RuntimeError(f"{seen} of {self.workers} task workers subscribed in {timeout_s} s")

    def executor(self, endpoint_file: Path) -> Executor:
        import contextvars

        from flows.taskworkers import TaskWorkerExecutor

        engine = self

        class Noted(TaskWorkerExecutor):
            def _submit(self, job: ClusterJob, attempts: list[str]) -> str:
                at = time.time()
                run_id = super()._submit(job, attempts)
                engine.submitted[run_id] = (job.name, at)
                return run_id

        connect = {"emulator_endpoint": str(endpoint_file), "azure_block": "-", "ssh_block": "-"}
        return Noted(self.store, "bench", connect, contextvars.copy_context())

    def report(self, jobs: int) -> None:
        from flows.taskworkers import STARTS

        waits = sorted(
            float(mark["at"]) - sent
            for run_id, (cluster, sent) in self.submitted.items()
            if (mark := self.store.get(STARTS, "bench", f"{cluster}.{run_id}")) is not None
        )
        worker_cpu = self.worker_cpu_s() - self.cpu0[0]
        server_cpu = self.server_cpu_s() - self.cpu0[1]

        def at(q: float) -> float:
            return waits[min(len(waits) - 1, int(len(waits) * q))] if waits else float("nan")

        print(
            f"task_workers: jobs={jobs} task_runs={len(self.submitted)} started={len(waits)} "
            f"dispatch_s_p50={at(0.5):.2f} dispatch_s_p90={at(0.9):.2f} "
            f"dispatch_s_max={at(1.0):.2f} worker_cpu_s={worker_cpu:.1f} "
            f"server_cpu_s={server_cpu:.1f} worker_cpu_s_per_cluster={worker_cpu / max(jobs, 1):.2f} "
            f"server_cpu_s_per_cluster={server_cpu / max(jobs, 1):.2f}",
            flush=True,
        )

    def worker_cpu_s(self) -> float:
        return sum(_group_cpu_s(w.pid) for w in self.scale.task_workers)

    def server_cpu_s(self) -> float:
        assert self.scale.server is not None
        return _group_cpu_s(self.scale.server.pid)

    def stop(self) -> None:
        import psycopg
        from psycopg import sql

        self.scale.__exit__(None, None, None)
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(self.table)))


class LoadWatch:
    """The machine's run queue every few seconds (/proc/loadavg): a GIL convoy shows as
    hundreds of runnable threads on 2 cores."""

    def __init__(self, every_s: float = 5.0) -> None:
        self.every_s = every_s
        self.most_runnable = 0
        self.most_runnable_at = 0.0
        self.max_load = 0.0
        self.last = "-"
        self._began = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load-watch", daemon=True)

    def start(self) -> LoadWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                fields = Path("/proc/loadavg").read_text().split()
            except OSError:
                return
            runnable = int(fields[3].split("/")[0])
            self.last = f"{fields[0]}, {fields[3]} runnable/threads"
            self.max_load = max(self.max_load, float(fields[0]))
            if runnable > self.most_runnable:
                self.most_runnable = runnable
                self.most_runnable_at = time.monotonic() - self._began


def fleet_now() -> Any:
    import datetime as dt

    return dt.datetime.now(dt.UTC)


if __name__ == "__main__":
    main()
