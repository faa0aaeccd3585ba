"""P1: client downtime of one cluster upgrade vs the emulator's critical path, and vs a naive order.

Not a test: prints a table and a final ``key=value`` line. For each run an emulator serves
``examples/fleet-small.yaml`` and one cluster is upgraded to 2.15.6 with the real SDK and SSH.

* measured downtime: the emulator's customer view (``downtime_total``: from the first
  firewalled/stopped server to every target COMPLETE with clients back), never the
  orchestrator's own figure;
* critical path: what physics allows, from the emulator's timeline: the slowest VM's
  power-off + swap + start operations, plus the recovery replay once clients reconnect;
* naive order: disks created inside the downtime and the VMs swapped one at a time;
* where the rest goes, on the slowest VM: before its power-off was asked for, between its
  operations (polling lag) and after its start beyond the recovery replay (restore, services,
  health). At a time scale of N every real second the orchestrator spends is N sim seconds.

    .venv/bin/python bench/downtime.py [--runs 3] [--time-scale 20]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from amlfs.jobs import ClusterJob, run_job
from amlfs.models import load_release
from amlfs.runtime import Connections, from_endpoint
from amlfs.saga import ClusterUpgrade
from amlfs.store import StateStore
from amlfs_sim import Emulator
from amlfs_sim.nodes.lustre import REPLAY_SECONDS
from amlfs_sim.spec import load_world

REPO = Path(__file__).resolve().parent.parent
CLUSTER = "lustre-eus-01"


def _critical_vm(timeline: dict[str, Any], vms: set[str]) -> tuple[float, list[dict[str, Any]]]:
    """The slowest VM's power-off + swap + start time, and those operations in order."""
    per_vm: dict[str, list[dict[str, Any]]] = {}
    for op in timeline["operations"]:
        counted = op["kind"] in ("vm.power_off", "vm.put", "vm.start")
        if (
            counted
            and op["target"] in vms
            and op["end"] is not None
            and op["status"] == "Succeeded"
        ):
            per_vm.setdefault(op["target"], []).append(op)
    busy = {vm: sum(op["end"] - op["start"] for op in ops) for vm, ops in per_vm.items()}
    slowest = max(busy, key=lambda vm: busy[vm])
    return busy[slowest], sorted(per_vm[slowest], key=lambda op: op["start"])


def overheads(
    ops: list[dict[str, Any]], downtime: list[list[float | None]]
) -> tuple[float, float, float]:
    """Where the measured downtime exceeds the critical path, on the slowest VM, sim s:
    before its power-off was asked for (suspend, reads), between its operations (the
    orchestrator seeing one end and asking for the next: polling lag) and after its start
    ended beyond the recovery replay (boot to serving: restore, services, health).
    ``ops``: the slowest VM's operations in order (``_critical_vm``)."""
    begin, end = downtime[0][0], downtime[-1][1]
    if begin is None or end is None:
        raise SystemExit(f"downtime still open: {downtime}")
    between = sum(b["start"] - a["end"] for a, b in itertools.pairwise(ops))
    return ops[0]["start"] - begin, between, end - ops[-1]["end"] - REPLAY_SECONDS


VM_WRITES = ("vm.put", "vm.patch", "vm.power_off", "vm.start", "vm.restart", "vm.deallocate")


def write_tokens_per_vm(timeline: dict[str, Any], vms: set[str]) -> float:
    """VM writes per VM (each takes a token of Compute's per-VM and per-subscription write
    buckets, and each is one long-running operation to poll)."""
    writes = [
        op for op in timeline["operations"] if op["kind"] in VM_WRITES and op["target"] in vms
    ]
    return len(writes) / len(vms)


class NaiveOrder(ClusterUpgrade):
    """The baseline the product's order is measured against (this benchmark's, not the
    product's): capture and suspend first, the new disks created inside the downtime, then the
    VMs swapped one at a time, each node restored by the restore step afterwards."""

    def _prepare(self) -> None:
        self._step("capture", self.capture)
        self._step("suspend", self.suspend)
        self._step("prestage", self.prestage)

    def _swap_vms(self, one: Callable[[Any], None], deadline: float | None) -> None:
        for plan in self.plans.values():
            self._swap_vm(plan, plan.new_disk, plan.new_disk_id, deadline)


def one_run(
    seed: int, time_scale: float, naive: bool
) -> tuple[float, float, float, tuple[float, float, float], float]:
    world = load_world(REPO / "examples" / "fleet-small.yaml")
    release = load_release(REPO / "examples" / "release-2.15.6.yaml")
    cluster = world.fleet.cluster(CLUSTER)
    with tempfile.TemporaryDirectory() as tmp:
        emulator = Emulator(world, Path(tmp) / "sim", time_scale=time_scale, seed=seed)
        endpoint = emulator.start()
        try:
            azure, ssh = from_endpoint(Path(tmp) / "sim" / "endpoint.json")
            connections = Connections.create(azure, ssh)
            try:
                job = ClusterJob(cluster=cluster, release=release)
                result = run_job(
                    job,
                    connections,
                    StateStore(Path(tmp) / "state"),
                    saga=NaiveOrder if naive else ClusterUpgrade,
                )
            finally:
                connections.close()
            if result.outcome != "upgraded":
                raise SystemExit(f"run {seed}: {result.outcome}: {result.reason}")
            with httpx.Client(verify=str(endpoint.ca_file), timeout=30) as http:
                state = http.get(
                    f"{endpoint.control_url}/state", params={"cluster": CLUSTER}
                ).json()
                timeline = http.get(f"{endpoint.control_url}/timeline").json()
        finally:
            emulator.stop()
    measured = float(state["clusters"][CLUSTER]["downtime_total"])
    busy, ops = _critical_vm(timeline, {n.name for n in cluster.nodes})
    critical = busy + REPLAY_SECONDS
    spent = overheads(ops, state["clusters"][CLUSTER]["downtime_intervals"])
    tokens = write_tokens_per_vm(timeline, {n.name for n in cluster.nodes})
    return measured, critical, result.downtime_observed_s, spent, tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--time-scale", type=float, default=20.0)
    args = parser.parse_args()

    rows = []
    for seed in range(1, args.runs + 1):
        measured, critical, seen, spent, tokens = one_run(seed, args.time_scale, naive=False)
        naive, _, _, _, _ = one_run(seed, args.time_scale, naive=True)
        rows.append((seed, measured, critical, seen, naive, spent, tokens))

    table = Table(title=f"P1 downtime of one cluster ({CLUSTER}, 6 VMs), sim seconds")
    for column in (
        "seed",
        "measured",
        "critical path",
        "ratio",
        "orchestrator saw",
        "over: before / between / after",
        "naive",
        "naive / measured",
        "VM writes / VM",
    ):
        table.add_column(column, justify="right")
    for seed, measured, critical, seen, naive, spent, tokens in rows:
        table.add_row(
            str(seed),
            f"{measured:.1f}",
            f"{critical:.1f}",
            f"{measured / critical:.3f}",
            f"{seen:.1f}",
            " / ".join(f"{s:.1f}" for s in spent),
            f"{naive:.1f}",
            f"{measured / naive:.2f}",
            f"{tokens:.2f}",
        )
    Console().print(table)
    ratios = [m / c for _, m, c, _, _, _, _ in rows]
    vs_naive = [m / n for _, m, _, _, n, _, _ in rows]
    per_vm = [t for *_, t in rows]
    print(
        f"p1_ratio_median={statistics.median(ratios):.3f} p1_ratio_max={max(ratios):.3f} "
        f"target_ratio<=1.10 vs_naive_median={statistics.median(vs_naive):.2f} "
        f"target_vs_naive<=0.50 vm_write_tokens_per_vm={statistics.median(per_vm):.2f} "
        f"runs={len(rows)}"
    )


if __name__ == "__main__":
    main()
