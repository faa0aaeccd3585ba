"""What one ``rollout-tick`` costs through Prefect at fleet scale: a generated 1,000-cluster
fleet (bench/rollout_forecast.py's random weekly windows, blackouts, stages canary 2% / wave1
/ wave2) served by ``amlfs-sim serve``, a real ``prefect server`` on PostgreSQL, and the real
``rollout-tick`` flow run in this process, tick by tick from the rollout's start.

Sampled ticks (the first week is the canary's, so almost every window that opens belongs to a
gated cluster): every tick in which a canary cluster's window opens (a fleet run upgrades it
through ARM and SSH) and ``--idle-every``-th of the others (the gate says idle: no fleet run).
Per tick: wall time, CPU of this process (the flows: ``time.process_time``), of the Prefect
server's process group and of PostgreSQL (every ``postgres`` process on the machine: nothing
else should run), and of the emulator (it stands for Azure and the nodes: not the product's).

Not a test: prints a table and a final ``key=value`` line.

    .venv/bin/python bench/rollout_tick.py [--clusters 1000] [--idle-every 12] [--seed 5]
        [--stage wave2 --work-ticks 24]   # a later stage's week: many of its windows a day
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from amlfs.models import load_fleet  # noqa: E402
from amlfs.rollout import RolloutBook, record_outcome  # noqa: E402
from amlfs.schedule import windows_opening_in  # noqa: E402
from amlfs.store import StateStore  # noqa: E402
from amlfs_sim.genfleet import dump_fleet_yaml  # noqa: E402
from bench.chaos import child_env, start_world  # noqa: E402
from bench.rollout_forecast import START, STRATEGY, make_fleet_doc  # noqa: E402
from deployments.scaleout import (  # noqa: E402
    create_database,
    drop_database,
    free_port,
    start_prefect_server,
)

DSN = os.environ.get("AMLFS_BENCH_PREFECT_DSN", "postgresql://postgres@127.0.0.1:5432")
TICK = dt.timedelta(minutes=15)
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _cpu_of(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def session_cpu(sid: int) -> float:
    """CPU seconds of every live process in session ``sid`` (a server and its children)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # field 6 of stat: session
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


def postgres_cpu() -> float:
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "postgres":
                continue
        except OSError:
            continue
        total += _cpu_of(int(entry.name))
    return total


@dataclass
class Sample:
    tick: dt.datetime
    upgraded: int
    wall_s: float
    flow_cpu_s: float
    server_cpu_s: float
    postgres_cpu_s: float
    emulator_cpu_s: float
    state: str = ""
    message: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def sampled_ticks(
    fleet_file: Path, stage: set[str], idle_every: int, limit: int
) -> list[tuple[dt.datetime, bool]]:
    """Ticks of the first week: each with a window of ``stage``'s clusters opening (the
    first ``limit`` of them), and every ``idle_every``-th of the others in which some
    window opens."""
    fleet = load_fleet(fleet_file)
    ticks: list[tuple[dt.datetime, bool]] = []
    others = 0
    tick = START.replace(minute=0)
    end = START + dt.timedelta(days=7)
    while tick < end and sum(1 for _, work in ticks if work) < limit:
        opening = {o.cluster for o in windows_opening_in(fleet, tick, tick + TICK)}
        if opening & stage:
            ticks.append((tick, True))
        elif opening:
            others += 1
            if others % idle_every == 0:
                ticks.append((tick, False))
        tick += TICK
    return ticks


def earlier_stages_done(rollout: Any, stage: str, at: dt.datetime) -> Any:
    """The rollout with every member of the stages before ``stage`` upgraded ``at``."""
    names = [s.name for s in rollout.strategy.stages]
    earlier = set(names[: names.index(stage)])
    for cluster, of in rollout.members.items():
        if of in earlier:
            rollout = record_outcome(rollout, cluster, "upgraded", at=at, run_name="earlier")
    return rollout


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--nodes", type=int, default=2, help="VMs per cluster (mds, oss...)")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--time-scale", type=float, default=100.0)
    parser.add_argument("--idle-every", type=int, default=12)
    parser.add_argument(
        "--stage",
        default="canary",
        choices=[s.name for s in STRATEGY.stages],
        help="Tick the week of this stage: the stages before it are recorded done and soaked",
    )
    parser.add_argument(
        "--work-ticks", type=int, default=1000, help="At most this many ticks upgrading"
    )
    parser.add_argument("--keep", action="store_true", help="Keep the work directory")
    args = parser.parse_args()

    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.rollouts import RolloutStartParams, RolloutTickParams, rollout_tick, start_rollout

    console = Console()
    root = Path(tempfile.mkdtemp(prefix="rollout-tick-bench-"))
    doc = make_fleet_doc(args.clusters, args.seed, nodes=args.nodes)
    doc["emulator"] = yaml.safe_load((REPO / "examples" / "fleet-small.yaml").read_text())[
        "emulator"
    ]
    fleet_file = root / "fleet.yaml"
    fleet_file.write_text(dump_fleet_yaml(doc))
    stage = {c["name"] for c in doc["clusters"] if c.get("wave") == args.stage}
    ticks = sampled_ticks(fleet_file, stage, args.idle_every, args.work_ticks)
    console.print(
        f"{args.clusters} clusters x {args.nodes} VMs, {len(stage)} in stage {args.stage}; "
        f"{sum(1 for _, c in ticks if c)} ticks of its windows, "
        f"{sum(1 for _, c in ticks if not c)} idle ticks sampled; "
        "starting the emulator and a Prefect server on PostgreSQL"
    )
    # A later stage's week: the rollout started 10 days earlier, its earlier stages finished
    # 9 days earlier (their soak is over), so this week's ticks admit the stage's clusters.
    started = START if args.stage == "canary" else START - dt.timedelta(days=10)
    database = f"amlfs_bench_tick_{os.getpid()}"
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = child_env(
        {
            "PREFECT_HOME": str(root / "prefect-home"),
            "PREFECT_API_DATABASE_CONNECTION_URL": (
                f"{DSN.replace('postgresql://', 'postgresql+asyncpg://')}/{database}"
            ),
            "PREFECT_UI_ENABLED": "false",
        }
    )
    log_path = root / "server.log"
    samples: list[Sample] = []
    world: Any = None
    server: Any = None
    create_database(database, DSN)
    try:
        world = start_world(
            fleet_file, root, time_scale=args.time_scale, seed=args.seed, timeout_s=600
        )
        with log_path.open("wb") as log:
            server = start_prefect_server(port, env, log, log_path)
        state_dir = root / "state"
        with temporary_settings(updates={PREFECT_API_URL: url}):
            start_rollout(
                RolloutStartParams(
                    name="bench",
                    fleet_file=str(fleet_file),
                    release_file=str(REPO / "examples" / "release-2.15.6.yaml"),
                    strategy=STRATEGY,
                    started_by="bench",
                    at=started,
                    state_dir=str(state_dir),
                )
            )
            book = RolloutBook(StateStore(state_dir))
            if args.stage != "canary":
                book.change(
                    "bench",
                    lambda r: earlier_stages_done(r, args.stage, started + dt.timedelta(days=1)),
                )
            for tick, _ in ticks:
                before = len(book.get("bench").clusters)
                marks = (
                    time.monotonic(),
                    time.process_time(),
                    session_cpu(server.pid),
                    postgres_cpu(),
                    session_cpu(world.proc.pid),
                )
                at = tick + dt.timedelta(minutes=1)
                state = rollout_tick(
                    RolloutTickParams(
                        at=at,
                        state_dir=str(state_dir),
                        emulator_endpoint=str(world.endpoint_file),
                    ),
                    return_state=True,
                )
                samples.append(
                    Sample(
                        tick,
                        len(book.get("bench").clusters) - before,
                        time.monotonic() - marks[0],
                        time.process_time() - marks[1],
                        session_cpu(server.pid) - marks[2],
                        postgres_cpu() - marks[3],
                        session_cpu(world.proc.pid) - marks[4],
                        state.name,
                        state.message or "",
                        # Releases the tick's census read (recorded as of the tick's instant).
                        {
                            "census": sum(
                                1
                                for seen in book.releases().values()
                                if seen.get("seen_at") == at.isoformat()
                            )
                        },
                    )
                )
                last = samples[-1]
                console.print(
                    f"{tick:%a %H:%M} {last.state:<10} upgraded {last.upgraded} "
                    f"census {last.extra['census']:3d} "
                    f"wall {last.wall_s:5.1f} s  flows {last.flow_cpu_s:5.2f}  "
                    f"server {last.server_cpu_s:5.2f}  postgres {last.postgres_cpu_s:5.2f}  "
                    f"emulator {last.emulator_cpu_s:5.2f} CPU-s"
                )
        record = state_dir / "rollouts" / "bench.json"
        record_kib = record.stat().st_size / 1024 if record.exists() else 0.0
        final = RolloutBook(StateStore(state_dir)).get("bench")
    finally:
        # Whatever failed, leave no server, emulator or database behind.
        if server is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=30)
        if world is not None:
            world.stop()
        drop_database(database, DSN)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    console.print(f"work directory {root}{'' if args.keep else ' (removed)'}")
    return report(console, args, samples, record_kib, final)


def report(
    console: Console, args: Any, samples: list[Sample], record_kib: float, final: Any
) -> int:
    busy = [s for s in samples if s.upgraded]
    idle = [s for s in samples if not s.upgraded]
    reading = [s for s in idle if s.extra.get("census")]
    quiet = [s for s in idle if not s.extra.get("census")]
    bad = [s for s in samples if s.state not in ("Completed",)]

    def med(values: list[float]) -> str:
        return f"{statistics.median(values):.2f}" if values else "-"

    table = Table(
        "ticks", "n", "wall s", "flows CPU-s", "server CPU-s", "postgres CPU-s", "emulator CPU-s"
    )
    for label, group in (
        ("upgrading a cluster", busy),
        ("admitting none", idle),
        ("  of which the census read releases", reading),
        ("  of which the census read none", quiet),
    ):
        table.add_row(
            label,
            str(len(group)),
            med([s.wall_s for s in group]),
            med([s.flow_cpu_s for s in group]),
            med([s.server_cpu_s for s in group]),
            med([s.postgres_cpu_s for s in group]),
            med([s.emulator_cpu_s for s in group]),
        )
    console.print(table)
    outcomes: dict[str, int] = {}
    for progress in final.clusters.values():
        outcomes[progress.outcome] = outcomes.get(progress.outcome, 0) + 1
    console.print(f"rollout record {record_kib:.0f} KiB; outcomes {outcomes}; medians above")
    for s in bad:
        console.print(f"[red]tick {s.tick:%a %H:%M}: {s.state}: {s.message}[/red]")
    print(
        f"clusters={args.clusters} stage={args.stage} ticks_upgrading={len(busy)} "
        f"ticks_admitting_none={len(idle)} "
        f"upgrading_wall_s={med([s.wall_s for s in busy])} "
        f"upgrading_orchestrator_cpu_s={med([s.flow_cpu_s + s.server_cpu_s for s in busy])} "
        f"idle_wall_s={med([s.wall_s for s in idle])} "
        f"idle_orchestrator_cpu_s={med([s.flow_cpu_s + s.server_cpu_s for s in idle])} "
        f"idle_census_ticks={len(reading)} "
        f"idle_no_census_orchestrator_cpu_s={med([s.flow_cpu_s + s.server_cpu_s for s in quiet])} "
        f"not_completed={len(bad)}"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
