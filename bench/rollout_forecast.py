"""Rollouts at fleet scale: a generated 1,000-cluster fleet with random weekly windows and
blackouts, 3 stages; the rollout driven tick by tick through the product's own gating code
(``amlfs.rollout`` over the real state store) with every admitted cluster taking a fixed
upgrade time, against its lower bound and the day-one forecast; and what one tick costs.

Not a test: prints a table and a final ``key=value`` line.

* lower bound: stage by stage, each cluster at its first allowed (not blacked out) window
  opening at or after its stage could open (the previous stage's last cluster finished,
  plus the soak), with no cap and no approval delay: nothing can finish earlier;
* simulated: 15-minute ticks as the ``rollout-tick`` deployment runs them: the clusters
  whose window opens in the tick (``windows_opening_in``), gated by ``cluster_gate``,
  capped at ``--max-parallel`` per tick, each outcome recorded with ``record_outcome``
  through ``RolloutBook`` (one atomic rewrite of the record per outcome, as the flow does);
* CPU per tick: process CPU of the simulated ticks that admitted a cluster and of those that
  admitted none, split into planning (windows, gates) and recording, plus ``forecast``.

    .venv/bin/python bench/rollout_forecast.py [--clusters 1000] [--seed 5]
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from amlfs.models import Fleet, parse_fleet
from amlfs.rollout import (
    RolloutBook,
    RolloutStrategy,
    cluster_gate,
    forecast,
    new_rollout,
    record_outcome,
    stage_views,
)
from amlfs.schedule import next_window_opening, windows_opening_in
from amlfs.store import StateStore
from amlfs_sim.genfleet import generate_fleet

UTC = dt.UTC
TICK = dt.timedelta(minutes=15)
START = dt.datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
#: The rollout both rollout benchmarks drive (this one and bench/rollout_tick.py).
STRATEGY = RolloutStrategy.model_validate(
    {
        "stages": [
            {"name": "canary", "soak_hours": 24},
            {"name": "wave1", "soak_hours": 72, "success_threshold": 0.98},
            {"name": "wave2"},
        ],
        "error_budget": "2%",
    }
)


def make_fleet(clusters: int, seed: int) -> Fleet:
    return parse_fleet(make_fleet_doc(clusters, seed))


def make_fleet_doc(clusters: int, seed: int, nodes: int = 2) -> dict[str, Any]:
    """Random weekly windows (15-minute slots), ~3% of clusters with a blackout date in the
    first three weeks, a fleet-wide blackout day; waves canary (2%), wave1, wave2."""
    rng = random.Random(seed)
    doc = generate_fleet(clusters, nodes, seed=seed)
    days = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
    for cluster in doc["clusters"]:
        slot = rng.randrange(96)
        cluster["window"] = {
            "day_of_week": rng.choice(days),
            "start_utc": f"{slot // 4:02d}:{slot % 4 * 15:02d}",
            "duration_min": 30,
        }
        if rng.random() < 0.03:
            cluster["blackout_dates"] = [(START + dt.timedelta(days=rng.randrange(21))).date()]
    doc["blackout_dates"] = [dt.date(2026, 12, 25)]
    return doc


def lower_bound(
    fleet: Fleet, strategy: RolloutStrategy, members: dict[str, str], upgrade: dt.timedelta
) -> dt.datetime:
    by_name = {c.name: c for c in fleet.clusters}
    opens = START
    done = START
    for stage in strategy.stages:
        ends = []
        for name, of in members.items():
            if of != stage.name:
                continue
            occurrence = next_window_opening(by_name[name], opens, fleet.blackout_dates)
            assert occurrence is not None, name
            ends.append(occurrence.start + upgrade)
        done = max(ends) if ends else opens
        opens = done + stage.soak
    return done


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--upgrade-min", type=float, default=12.0)
    parser.add_argument("--max-parallel", type=int, default=25, help="Clusters started per tick")
    parser.add_argument("--weeks", type=int, default=8)
    args = parser.parse_args()
    upgrade = dt.timedelta(minutes=args.upgrade_min)
    fleet = make_fleet(args.clusters, args.seed)
    strategy = STRATEGY
    with tempfile.TemporaryDirectory(prefix="rollout-bench-") as root:
        book = RolloutBook(StateStore(Path(root)))
        rollout = new_rollout(
            "bench",
            fleet,
            release_version="2.15.6",
            release_file="release.yaml",
            fleet_file="fleet.yaml",
            strategy=strategy,
            now=START,
        )
        book.create(rollout)
        cpu = time.process_time()
        predicted = forecast(rollout, fleet, START, upgrade=upgrade)
        forecast_cpu = time.process_time() - cpu
        bound = lower_bound(fleet, strategy, rollout.members, upgrade)
        plan_cpu: list[float] = []
        idle_cpu: list[float] = []
        record_cpu: list[float] = []
        tick = START.replace(minute=0)
        end = START + dt.timedelta(weeks=args.weeks)
        started = 0
        capped = 0
        while tick < end:
            cpu = time.process_time()
            current = book.get("bench")
            if current.state != "active":
                break
            opening = windows_opening_in(fleet, tick, tick + TICK)
            views = stage_views(current, tick)
            admitted = [
                o
                for o in opening
                if o.cluster in current.members and cluster_gate(current, views, o.cluster)[0]
            ]
            capped += max(0, len(admitted) - args.max_parallel)
            admitted = admitted[: args.max_parallel]
            spent = time.process_time() - cpu
            (plan_cpu if admitted else idle_cpu).append(spent)
            for occurrence in admitted:
                cpu = time.process_time()
                book.change(
                    "bench",
                    lambda r, o=occurrence, t=tick: record_outcome(
                        r, o.cluster, "upgraded", at=o.start + upgrade, run_name=f"t{t:%j%H%M}"
                    ),
                )
                record_cpu.append(time.process_time() - cpu)
                started += 1
            tick += TICK
        final = book.get("bench")
        record_bytes = (
            len((Path(root) / "rollouts" / "bench.json").read_bytes())
            if (Path(root) / "rollouts" / "bench.json").exists()
            else 0
        )
    done = max((p.at for p in final.clusters.values()), default=None)
    table = Table("figure", "value")
    rows = [
        ("clusters", str(len(fleet.clusters))),
        (
            "stages (members)",
            ", ".join(
                f"{s.name} {sum(1 for v in final.members.values() if v == s.name)}"
                for s in strategy.stages
            ),
        ),
        ("state at the end", f"{final.state} ({len(final.clusters)} recorded)"),
        ("lower bound", bound.isoformat()),
        (
            "forecast on day one",
            predicted.projected_done.isoformat() if predicted.projected_done else "none",
        ),
        ("simulated completion", done.isoformat() if done else "none"),
        (
            "over the bound",
            f"{((done - bound).total_seconds() / 3600) if done else float('nan'):.2f} h",
        ),
        ("clusters held by the per-tick cap", str(capped)),
        ("ticks that admitted / idle", f"{len(plan_cpu)} / {len(idle_cpu)}"),
        (
            "CPU per admitting tick (plan) median / max",
            f"{statistics.median(plan_cpu) * 1000:.1f} / {max(plan_cpu) * 1000:.1f} ms",
        ),
        ("CPU per idle tick median", f"{statistics.median(idle_cpu) * 1000:.1f} ms"),
        (
            "CPU per recorded outcome median / max",
            f"{statistics.median(record_cpu) * 1000:.1f} / {max(record_cpu) * 1000:.1f} ms",
        ),
        ("forecast CPU (1,000 clusters)", f"{forecast_cpu * 1000:.0f} ms"),
        ("rollout record size", f"{record_bytes / 1024:.0f} KiB"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    Console().print(table)
    print(
        f"clusters={len(fleet.clusters)} state={final.state} "
        f"bound={bound.isoformat()} forecast={predicted.projected_done.isoformat() if predicted.projected_done else None} "
        f"simulated={done.isoformat() if done else None} "
        f"over_bound_h={((done - bound).total_seconds() / 3600) if done else -1:.2f} "
        f"tick_plan_ms={statistics.median(plan_cpu) * 1000:.1f} idle_tick_ms={statistics.median(idle_cpu) * 1000:.1f} "
        f"record_ms={statistics.median(record_cpu) * 1000:.1f} forecast_ms={forecast_cpu * 1000:.0f}"
    )


if __name__ == "__main__":
    main()
