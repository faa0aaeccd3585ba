"""A multi-week rehearsal of release rollouts on the emulator: 12 clusters in 3 stages,
ticks driven by ``at`` over three simulated weeks, each tick a real ``rollout-tick`` flow run
on a real Prefect server (PostgreSQL) advancing the rollout through real ARM and SSH.

The emulator's ground truth judges the end (every VM's image and power state, each node's
firewall, tunables and HSM, evictions, leaks: ``bench.chaos.judge``), not the rollout's
record. Ticks are the 15-minute ticks in which some window opens (a cron tick in which
none opens is the early return the last test checks), plus a no-op tick between them.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.settings import PREFECT_API_URL, temporary_settings
from typer.testing import CliRunner

from amlfs.models import load_fleet
from amlfs.rollout import RolloutBook, approve
from amlfs.schedule import windows_opening_in
from amlfs.store import StateStore
from amlfs_cli.main import app
from amlfs_sim import Emulator
from amlfs_sim.genfleet import dump_fleet_yaml, generate_fleet
from amlfs_sim.spec import load_world
from bench.chaos import Claim, Control, judge, record_baseline
from flows.rollout_view import artifact_key
from flows.rollouts import RolloutStartParams, RolloutTickParams, rollout_tick, start_rollout
from tests.conftest import REPO, SMALL_FLEET, TIME_SCALE, PrefectServer

pytestmark = pytest.mark.integration

GOOD = REPO / "examples" / "release-2.15.6.yaml"
BAD = REPO / "examples" / "release-2.15.7.yaml"  # the emulator's bad image: must roll back
UTC = dt.UTC
START = dt.datetime(2026, 12, 6, 12, 0, tzinfo=UTC)  # a Sunday
WEEKS = 3
# Windows share ticks, as on a real fleet: canary Monday 02:00; wave1 Wednesday 03:00 and
# Thursday 02:00; wave2 Monday and Tuesday 03:00.
LAYOUT = [
    ("canary", "monday", "02:00"),
    ("canary", "monday", "02:00"),
    ("wave1", "wednesday", "03:00"),
    ("wave1", "wednesday", "03:00"),
    ("wave1", "thursday", "02:00"),
    ("wave1", "thursday", "02:00"),
    ("wave2", "monday", "03:00"),
    ("wave2", "monday", "03:00"),
    ("wave2", "monday", "03:00"),
    ("wave2", "tuesday", "03:00"),
    ("wave2", "tuesday", "03:00"),
    ("wave2", "tuesday", "03:00"),
]
STRATEGY = {
    "stages": [
        {"name": "canary", "soak_hours": 24},
        {"name": "wave1", "soak_hours": 48, "success_threshold": 1.0},
        {"name": "wave2", "approval": True},
    ],
    "error_budget": 1,
}


@dataclass
class Rehearsal:
    fleet_file: Path
    endpoint_file: Path
    control: Control
    server: PrefectServer


@pytest.fixture(scope="module")
def rehearsal(
    tmp_path_factory: pytest.TempPathFactory, prefect_server: PrefectServer
) -> Iterator[Rehearsal]:
    root = tmp_path_factory.mktemp("rehearsal")
    doc = generate_fleet(len(LAYOUT), 6, seed=3)
    for cluster, (wave, day, start) in zip(doc["clusters"], LAYOUT, strict=True):
        cluster["wave"] = wave
        # 90-minute windows: at 200 simulated seconds per real one, a 30-minute window is 9
        # real seconds, and a loaded machine (another test file in the other process) once
        # stretched an upgrade past it (a DeadlineError rollback, not the rollout's doing).
        # What this file tests is the rollout's sequencing, which the length does not change.
        cluster["window"] = {"day_of_week": day, "start_utc": start, "duration_min": 90}
    doc["emulator"] = yaml.safe_load(SMALL_FLEET.read_text())["emulator"]
    fleet_file = root / "fleet.yaml"
    fleet_file.write_text(dump_fleet_yaml(doc))
    emulator = Emulator(load_world(fleet_file), root / "sim", time_scale=TIME_SCALE, seed=11)
    emulator.start()
    control = Control.from_endpoint(emulator.state_dir / "endpoint.json")
    try:
        yield Rehearsal(fleet_file, emulator.state_dir / "endpoint.json", control, prefect_server)
    finally:
        control.http.close()
        emulator.stop()


def tick_instants(fleet_file: Path, start: dt.datetime, weeks: int) -> list[dt.datetime]:
    """The 15-minute ticks in which a window opens, from ``start`` for ``weeks``."""
    fleet = load_fleet(fleet_file)
    openings = windows_opening_in(fleet, start, start + dt.timedelta(weeks=weeks))
    ticks = []
    for occurrence in openings:
        tick = occurrence.start.replace(minute=occurrence.start.minute // 15 * 15)
        if tick not in ticks:
            ticks.append(tick)
    return ticks


def run_ticks(
    rehearsal: Rehearsal,
    state_dir: Path,
    ticks: list[dt.datetime],
    between: Any = None,
    *,
    after_the_end: int | None = None,
) -> list[Any]:
    """One ``rollout-tick`` run per tick; with ``after_the_end``, only that many more once
    no rollout is active (they find nothing to do; the rest of the weeks would too)."""
    states = []
    book = RolloutBook(StateStore(state_dir))
    with temporary_settings(updates={PREFECT_API_URL: rehearsal.server.url}):
        for tick in ticks:
            if after_the_end is not None and not book.active():
                if after_the_end == 0:
                    break
                after_the_end -= 1
            if between is not None:
                between(tick)
            states.append(
                rollout_tick(
                    RolloutTickParams(
                        at=tick,
                        state_dir=str(state_dir),
                        emulator_endpoint=str(rehearsal.endpoint_file),
                    ),
                    return_state=True,
                )
            )
    return states


def start(rehearsal: Rehearsal, state_dir: Path, name: str, release: Path, **extra: Any) -> Any:
    return start_rollout(
        RolloutStartParams(
            name=name,
            fleet_file=str(rehearsal.fleet_file),
            release_file=str(release),
            strategy=STRATEGY | extra,
            started_by="rehearsal",
            at=START,
            state_dir=str(state_dir),
        )
    )


def test_a_good_release_reaches_every_cluster_on_the_forecasts_dates(
    rehearsal: Rehearsal, tmp_path: Path
) -> None:
    rehearsal.control.http.post("/reset").raise_for_status()
    baseline = record_baseline(rehearsal.control, GOOD)
    started = start(rehearsal, tmp_path, "good", GOOD)
    predicted = started.forecast(str(tmp_path))
    windows = {c.cluster: c.next_window for c in predicted.clusters}
    assert all(windows.values()), windows
    book = RolloutBook(StateStore(tmp_path))

    def approve_wave2(tick: dt.datetime) -> None:
        # The operator approves wave2 on the Saturday (the forecast assumed it would be).
        rollout = book.get("good")
        if tick >= dt.datetime(2026, 12, 12, 12, tzinfo=UTC) and "wave2" not in rollout.approvals:
            book.change("good", lambda r: approve(r, "wave2", at=tick, by="carol"))

    states = run_ticks(
        rehearsal,
        tmp_path,
        tick_instants(rehearsal.fleet_file, START, WEEKS),
        approve_wave2,
        after_the_end=2,
    )
    assert all(s.is_completed() for s in states), [(s.name, s.message) for s in states]
    rollout = book.get("good")
    assert rollout.state == "completed", rollout.state_reason
    # Each cluster upgraded in the very window the forecast named on the first day: by the
    # fleet run of the tick that opened it (the run's name carries the tick). Its finish time
    # on the time-scaled clock is not compared: at 200x a loaded CI machine's few seconds
    # are tens of simulated minutes, and the forecast's promise is the window, not the minute.
    for name, progress in rollout.clusters.items():
        assert progress.outcome == "upgraded", (name, progress)
        window = windows[name]
        assert window is not None
        assert progress.run_name == f"good-{window:%Y%m%dT%H%M}", (name, window, progress)
        assert progress.at >= window, (name, window, progress.at)
    # The projected completion is the last named window plus the predicted upgrade time.
    assert predicted.projected_done is not None
    last_window = max(w for w in windows.values() if w is not None)
    assert last_window < predicted.projected_done <= last_window + dt.timedelta(minutes=30)
    # Stage order held: no wave1 cluster started before the canary stage soaked a day.
    by_stage: dict[str, list[dt.datetime]] = {}
    for name, progress in rollout.clusters.items():
        by_stage.setdefault(rollout.members[name], []).append(progress.at)
    assert min(by_stage["wave1"]) >= max(by_stage["canary"]) + dt.timedelta(hours=24)
    assert min(by_stage["wave2"]) >= max(by_stage["wave1"]) + dt.timedelta(hours=48)
    verdicts = judge(
        rehearsal.control,
        {n: [Claim(n, p.outcome, p.reason, "rollout")] for n, p in rollout.clusters.items()},
        baseline,
    )
    broken = [(v.cluster, [str(p) for p in v.problems]) for v in verdicts if not v.healthy]
    assert not broken
    assert {v.release for v in verdicts} == {"new"}


def test_a_release_that_fails_on_a_canary_halts_before_any_later_stage_is_touched(
    rehearsal: Rehearsal, tmp_path: Path
) -> None:
    rehearsal.control.http.post("/reset").raise_for_status()
    baseline = record_baseline(rehearsal.control, BAD)
    start(rehearsal, tmp_path, "bad", BAD)
    states = run_ticks(
        rehearsal, tmp_path, tick_instants(rehearsal.fleet_file, START, WEEKS), after_the_end=4
    )
    book = RolloutBook(StateStore(tmp_path))
    rollout = book.get("bad")
    assert rollout.state == "halted"
    assert "canary" in rollout.state_reason or "failed upgrades" in rollout.state_reason
    assert {rollout.members[n] for n in rollout.clusters} == {"canary"}
    assert all(p.outcome == "rolled_back" for p in rollout.clusters.values())
    # Once halted, later ticks advance nothing, and each says so at a glance: Stopped, with
    # the reason and the command that resumes it (a halt is not silently kept).
    halted = [s for s in states if s.name == "Stopped"]
    assert halted, [(s.name, s.message) for s in states]
    assert all("bad: halted (" in (s.message or "") for s in halted), halted[0].message
    assert "`amlfs rollout resume bad`" in (halted[-1].message or "")
    assert states[-1].name == "Stopped", (states[-1].name, states[-1].message)
    state = rehearsal.control.state()
    operations = rehearsal.control._get("/timeline")["operations"]
    touched = {
        name for op in operations for name in rollout.members if op["target"].startswith(name + "-")
    }
    later = {n for n, stage in rollout.members.items() if stage != "canary"}
    assert touched, "the canaries were upgraded through ARM"
    assert not touched & later, sorted(touched & later)
    verdicts = judge(
        rehearsal.control,
        {n: [Claim(n, "rolled_back", "", "rollout")] for n in rollout.members},
        baseline,
    )
    broken = [(v.cluster, [str(p) for p in v.problems]) for v in verdicts if not v.healthy]
    assert not broken
    assert {v.release for v in verdicts} == {"old"}
    assert not state["leaked_disks"]


def test_a_deadline_the_windows_cannot_meet_is_flagged_the_day_the_rollout_starts(
    rehearsal: Rehearsal, tmp_path: Path
) -> None:
    strategy = tmp_path / "strategy.yaml"
    strategy.write_text(yaml.safe_dump(STRATEGY | {"deadline": "2026-12-15T00:00:00Z"}))
    out = CliRunner().invoke(
        app,
        [
            "rollout",
            "start",
            "cve",
            "--fleet",
            str(rehearsal.fleet_file),
            "--release",
            str(GOOD),
            "--strategy",
            str(strategy),
            "--at",
            START.isoformat(),
            "--state-dir",
            str(tmp_path / "state"),
        ],
    )
    assert out.exit_code == 0, out.output
    fleet = load_fleet(rehearsal.fleet_file)
    # wave2 opens on Saturday the 12th after wave1's 48 h soak: its Monday-14 windows make the
    # deadline (the 15th), its Tuesday-15 ones cannot.
    late = sorted(
        c.name for c, (wave, day, _) in zip(fleet.clusters, LAYOUT, strict=True)
        if wave == "wave2" and day == "tuesday"
    )  # fmt: skip
    assert f"cannot make the deadline: {', '.join(late)}" in out.stdout
    command = next(line for line in out.stdout.splitlines() if "hotfix them now:" in line)
    for name in late:
        assert f"--cluster {name}" in command
    assert "amlfs run-fleet" in command


def test_a_tick_with_no_window_opening_publishes_nothing(
    rehearsal: Rehearsal, tmp_path: Path
) -> None:
    start(rehearsal, tmp_path, "quiet", GOOD)
    # Wednesday 02:00 and 02:15: no window opens in either tick, but Thursday 02:00's windows
    # come within 24 hours of the second: the artifact's list of windows to come runs to the
    # end of the next day (Friday 00:00), so it says the same in both ticks.
    quiet = START + dt.timedelta(days=2, hours=14)
    assert quiet.strftime("%A %H:%M") == "Wednesday 02:00"
    book = RolloutBook(StateStore(tmp_path))
    with temporary_settings(updates={PREFECT_API_URL: rehearsal.server.url}):
        states = run_ticks(rehearsal, tmp_path, [quiet, quiet + dt.timedelta(minutes=15)])
        with get_client(sync_client=True) as client:
            artifacts = client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[artifact_key("quiet")]))
            )
    assert [s.message for s in states] == [
        "quiet: no window of its clusters opens in this tick"
    ] * 2
    # The first tick published the rollout's forecast; the second had nothing new to say.
    assert len(artifacts) == 1
    assert book.get("quiet").published
    # The first tick's census read every cluster's release through ARM (no run had read any):
    # compliance counts the fleet's real release, not "unknown"; the second read none again.
    images = {vm["name"]: vm["os_image"] for vm in rehearsal.control.state()["vms"]}
    truth = {
        c.name: images[c.mds.name].rsplit("/", 1)[-1]
        for c in load_fleet(rehearsal.fleet_file).clusters
    }
    known = book.releases()
    assert sorted(known) == sorted(truth)
    assert {n: r["release"] for n, r in known.items()} == truth
    assert {r["seen_at"] for r in known.values()} == {quiet.isoformat()}
    assert "| unknown |" not in (artifacts[0].data or "")
