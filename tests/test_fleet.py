"""Fleet runs on the emulator: plan changes nothing, caps hold on the emulator's timeline,
the error budget and operators stop admission, waves gate, a stopped run resumes."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from amlfs.fleet import ClusterSelector, FleetPolicy, FleetRunner, PlanRow, plan_fleet
from amlfs.models import Cluster, load_release
from amlfs.runtime import Connections
from amlfs.saga import UpgradePolicy
from amlfs.schedule import Prediction
from amlfs.store import StateStore
from flows.cluster_upgrade import run_cluster_upgrade
from flows.fleet_maintenance import FleetParams, _current_release
from tests.conftest import REPO, SMALL_FLEET, Sim, cli_args

RELEASE = load_release(REPO / "examples" / "release-2.15.6.yaml")
PREDICTION = Prediction(dt.timedelta(minutes=10), dt.timedelta(minutes=6))
# Tuesday 2026-12-01 02:05 UTC: inside lustre-eus-01's window (Tuesday 02:00 + 30 min) only.
IN_EUS_WINDOW = dt.datetime(2026, 12, 1, 2, 5, tzinfo=dt.UTC)


def plan(
    sim: Sim, conns: Connections, policy: FleetPolicy, now: dt.datetime, **selector: Any
) -> list[PlanRow]:
    return plan_fleet(
        sim.world.fleet,
        RELEASE,
        ClusterSelector(**selector),
        policy,
        now,
        PREDICTION,
        390.0,
        current_release=lambda c: _current_release(conns, c),
    )


def upgrader(
    conns: Connections, store: StateStore
) -> Callable[[Cluster, Callable[[], bool]], dict[str, Any]]:
    def upgrade(cluster: Cluster, should_abort: Callable[[], bool]) -> dict[str, Any]:
        result = run_cluster_upgrade(
            cluster, RELEASE, conns, store, UpgradePolicy(), should_abort=should_abort
        )
        return result.model_dump(mode="json")

    return upgrade


def test_plan_decides_per_window_and_changes_nothing(sim: Sim, conns: Connections) -> None:
    rows = plan(sim, conns, FleetPolicy(), IN_EUS_WINDOW)
    by_name = {r.cluster: r for r in rows}
    assert by_name["lustre-eus-01"].run is True
    assert "inside its window" in by_name["lustre-eus-01"].reason
    assert by_name["lustre-weu-01"].run is False
    assert by_name["lustre-weu-01"].reason.startswith("outside its window (next: Wed 2026-12-09")
    assert all(r.current_release == "2.15.5" for r in rows)
    assert [r.wave for r in rows] == ["canary", "wave1", "wave1"]
    assert sim.timeline()["operations"] == []  # reads only: no operation started in Azure


def test_hotfix_outside_the_window_needs_an_override_and_a_reason(
    sim: Sim, conns: Connections
) -> None:
    refused = plan(sim, conns, FleetPolicy(), IN_EUS_WINDOW, names=["lustre-weu-01"])
    assert [r.run for r in refused] == [False]
    with pytest.raises(ValidationError, match=r"needs policy\.reason"):
        FleetParams(
            fleet_file="f",
            release_file="r",
            mode="hotfix",
            selector=ClusterSelector(names=["lustre-weu-01"]),
            policy=FleetPolicy(override_window=True),
        )
    with pytest.raises(ValidationError, match="only for mode=hotfix"):
        FleetParams(
            fleet_file="f", release_file="r", policy=FleetPolicy(override_window=True, reason="x")
        )
    allowed = plan(
        sim,
        conns,
        FleetPolicy(override_window=True, reason="CVE-2026-1234"),
        IN_EUS_WINDOW,
        names=["lustre-weu-01"],
    )
    assert allowed[0].run is True
    assert "window overridden" in allowed[0].reason
    assert "CVE-2026-1234" in allowed[0].reason


def cluster_intervals(sim: Sim) -> dict[str, tuple[float, float]]:
    vm_cluster = {n.name: c.name for c, n in sim.world.fleet.iter_nodes()}
    disk_prefix = {n.name: c.name for c, n in sim.world.fleet.iter_nodes()}
    spans: dict[str, list[float]] = {}
    for op in sim.timeline()["operations"]:
        target = op["target"]
        name = vm_cluster.get(target) or next(
            (c for prefix, c in disk_prefix.items() if target.startswith(prefix)), None
        )
        if name is None or op["end"] is None:
            continue
        span = spans.setdefault(name, [op["start"], op["end"]])
        span[0], span[1] = min(span[0], op["start"]), max(span[1], op["end"])
    return {k: (v[0], v[1]) for k, v in spans.items()}


def test_caps_hold_on_the_emulator_timeline(sim: Sim, conns: Connections, tmp_path: Path) -> None:
    policy = FleetPolicy(
        waves=["all"],
        override_window=True,
        reason="test",
        max_parallel=2,
        max_per_subscription=1,
        error_budget=3,
    )
    rows = plan(sim, conns, policy, IN_EUS_WINDOW)
    rows = [PlanRow(**{**r.__dict__, "wave": "all"}) for r in rows]
    runner = FleetRunner(
        sim.world.fleet,
        rows,
        policy,
        upgrader(conns, StateStore(tmp_path)),
        StateStore(tmp_path),
        "caps",
    )
    summary = runner.run()
    assert summary.counts() == {"upgraded": 3}
    spans = cluster_intervals(sim)
    eus, weu = spans["lustre-eus-01"], spans["lustre-weu-01"]  # same subscription
    assert eus[1] <= weu[0] or weu[1] <= eus[0], spans
    assert summary.max_in_flight == 2


def test_error_budget_spent_stops_admission_and_failed_canary_closes_the_next_wave(
    sim: Sim, conns: Connections, tmp_path: Path
) -> None:
    sim.fault(kind="node.boot", target="eus01-oss0", code="BadImage", count=1)
    policy = FleetPolicy(override_window=True, reason="test", error_budget=0)
    rows = plan(sim, conns, policy, IN_EUS_WINDOW)
    store = StateStore(tmp_path)
    summary = FleetRunner(sim.world.fleet, rows, policy, upgrader(conns, store), store, "b").run()
    assert summary.results["lustre-eus-01"]["outcome"] == "rolled_back"
    assert set(summary.not_started) == {"lustre-weu-01", "lustre-scus-01"}
    assert summary.stopped is not None
    assert summary.stopped.startswith("error budget spent")
    state = sim.state()
    assert {vm["os_image"].rsplit("/", 1)[-1] for vm in state["vms"]} == {"2.15.5"}
    assert state["leaked_disks"] == []


def test_halt_then_resume_continues_without_redoing_finished_clusters(
    sim: Sim, conns: Connections, tmp_path: Path
) -> None:
    policy = FleetPolicy(override_window=True, reason="test", max_parallel=1, error_budget=3)
    rows = plan(sim, conns, policy, IN_EUS_WINDOW)
    store = StateStore(tmp_path)
    calls: list[str] = []
    upgrade = upgrader(conns, store)

    def counting(cluster: Cluster, should_abort: Callable[[], bool]) -> dict[str, Any]:
        calls.append(cluster.name)
        return upgrade(cluster, should_abort)

    control = {"value": "run"}

    def halt_after_first() -> Any:
        return "halt" if calls else "run"

    first = FleetRunner(
        sim.world.fleet, rows, policy, counting, store, "weekly", control=halt_after_first
    ).run()
    assert first.stopped == "halted by operator"
    assert list(first.results) == ["lustre-eus-01"]
    resumed = FleetRunner(
        sim.world.fleet, rows, policy, counting, store, "weekly", control=lambda: control["value"]
    ).run()
    assert calls == ["lustre-eus-01", "lustre-weu-01", "lustre-scus-01"]
    assert resumed.results["lustre-eus-01"]["resumed_from_record"] is True
    assert resumed.counts() == {"upgraded": 3}


def test_abort_rolls_back_in_flight_clusters(sim: Sim, conns: Connections, tmp_path: Path) -> None:
    policy = FleetPolicy(override_window=True, reason="test", error_budget=3)
    rows = plan(sim, conns, policy, IN_EUS_WINDOW, names=["lustre-eus-01"])
    store = StateStore(tmp_path)
    started: list[str] = []
    upgrade = upgrader(conns, store)

    def recording(cluster: Cluster, should_abort: Callable[[], bool]) -> dict[str, Any]:
        started.append(cluster.name)
        return upgrade(cluster, should_abort)

    def abort_once_running() -> Any:
        return "abort" if started else "run"

    summary = FleetRunner(
        sim.world.fleet, rows, policy, recording, store, "a", control=abort_once_running
    ).run()
    result = summary.results["lustre-eus-01"]
    assert result["outcome"] == "rolled_back"
    assert "operator abort" in result["reason"]
    assert sim.state()["leaked_disks"] == []


def test_fleet_params_reject_bad_input_by_name() -> None:
    with pytest.raises(ValidationError, match=r"selector\.names is empty"):
        FleetParams(fleet_file=str(SMALL_FLEET), release_file="r", mode="hotfix")
    with pytest.raises(ValidationError, match=r"percentage such as"):
        FleetParams(
            fleet_file=str(SMALL_FLEET), release_file="r", policy=FleetPolicy(error_budget="lots")
        )


def test_cli_plan_and_status(sim: Sim, conns: Connections, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from amlfs.cli import app

    runner = CliRunner()
    planned = runner.invoke(
        app,
        cli_args(
            "plan",
            sim.emulator.state_dir / "endpoint.json",
            "--at",
            IN_EUS_WINDOW.isoformat(),
        ),
        env={"COLUMNS": "250"},
    )
    assert planned.exit_code == 0, planned.output
    assert "inside its window" in planned.output
    assert "outside its window" in planned.output
    assert sim.timeline()["operations"] == []

    policy = FleetPolicy(override_window=True, reason="test", error_budget=3)
    rows = plan(sim, conns, policy, IN_EUS_WINDOW, names=["lustre-scus-01"])
    store = StateStore(tmp_path)
    FleetRunner(sim.world.fleet, rows, policy, upgrader(conns, store), store, "w48").run()
    shown = runner.invoke(
        app, ["status", "w48", "--state-dir", str(tmp_path)], env={"COLUMNS": "250"}
    )
    assert shown.exit_code == 0, shown.output
    assert "lustre-scus-01" in shown.output
    assert "upgraded" in shown.output
    missing = runner.invoke(app, ["status", "nope", "--state-dir", str(tmp_path)])
    assert missing.exit_code == 1


def test_cli_run_fleet_refuses_a_bad_policy_before_anything_changes(
    sim: Sim, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from amlfs.cli import app

    args = cli_args(
        "run-fleet",
        sim.emulator.state_dir / "endpoint.json",
        "--state-dir",
        str(tmp_path),
        "--hotfix-reason",
        "test",
    )
    for bad, field in (
        (["--admit-every", "-1"], "admit_every_s"),
        (["--max-per-subscription", "0"], "max_per_subscription"),
    ):
        refused = CliRunner().invoke(app, [*args, *bad], env={"COLUMNS": "250"})
        assert refused.exit_code == 2, refused.output
        assert field in refused.output
    assert sim.timeline()["operations"] == []
    assert not any(tmp_path.iterdir())
