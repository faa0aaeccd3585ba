"""Fleet runs on the emulator: plan changes nothing, caps hold on the emulator's timeline,
the error budget and operators stop admission, waves gate, a stopped run resumes."""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from amlfs.fleet import ClusterSelector, FleetPolicy, PlanRow, plan_fleet
from amlfs.models import Cluster, load_release
from amlfs.runtime import Connections
from amlfs.schedule import Prediction
from amlfs.store import StateStore
from flows.fleet_maintenance import FleetParams, current_release, read_fleet
from tests.conftest import REPO, SMALL_FLEET, Sim, cli_args, fleet_runner, run_cluster, wait_until

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
        current_release=lambda c: current_release(conns, c),
    )


def upgrader(
    conns: Connections, store: StateStore
) -> Callable[[Cluster, Callable[[], bool]], dict[str, Any]]:
    def upgrade(cluster: Cluster, should_abort: Callable[[], bool]) -> dict[str, Any]:
        return run_cluster(cluster, RELEASE, conns, store, should_abort=should_abort).record()

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
    runner = fleet_runner(
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
    summary = fleet_runner(sim.world.fleet, rows, policy, upgrader(conns, store), store, "b").run()
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

    first = fleet_runner(
        sim.world.fleet, rows, policy, counting, store, "weekly", control=halt_after_first
    ).run()
    assert first.stopped == "halted by operator"
    assert list(first.results) == ["lustre-eus-01"]
    resumed = fleet_runner(
        sim.world.fleet, rows, policy, counting, store, "weekly", control=lambda: control["value"]
    ).run()
    assert calls == ["lustre-eus-01", "lustre-weu-01", "lustre-scus-01"]
    assert resumed.results["lustre-eus-01"]["resumed_from_record"] is True
    assert resumed.counts() == {"upgraded": 3}


def test_a_halt_read_while_the_last_of_a_wave_is_in_flight_is_recorded_at_once(
    sim: Sim, conns: Connections, tmp_path: Path
) -> None:
    """The canary wave's only cluster is in flight when the operator halts: `amlfs status`
    shows the halt before that cluster finishes, and the later waves are not opened."""
    policy = FleetPolicy(override_window=True, reason="test", error_budget=3)
    rows = plan(sim, conns, policy, IN_EUS_WINDOW)
    assert [r.wave for r in rows].count("canary") == 1
    store = StateStore(tmp_path)
    upgrade = upgrader(conns, store)
    started = threading.Event()
    seen: list[Any] = []

    def saved_stop() -> Any:
        return (store.get("fleet-runs", "halted-canary") or {}).get("stopped")

    def halt_seen_first(cluster: Cluster, should_abort: Callable[[], bool]) -> dict[str, Any]:
        started.set()
        # A handshake, not a margin: this cluster finishes only once the record says halted.
        wait_until("the halt recorded", saved_stop, timeout_s=30)
        seen.append(saved_stop())
        return upgrade(cluster, should_abort)

    summary = fleet_runner(
        sim.world.fleet,
        rows,
        policy,
        halt_seen_first,
        store,
        "halted-canary",
        control=lambda: "halt" if started.is_set() else "run",
    ).run()
    assert seen == ["halted by operator"]
    assert summary.counts() == {"upgraded": 1}, summary.as_dict()
    assert set(summary.not_started.values()) == {"halted by operator"}
    assert len(summary.not_started) == len(rows) - 1


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

    summary = fleet_runner(
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

    from amlfs_cli.main import app

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
    fleet_runner(sim.world.fleet, rows, policy, upgrader(conns, store), store, "w48").run()
    shown = runner.invoke(
        app, ["status", "w48", "--state-dir", str(tmp_path)], env={"COLUMNS": "250"}
    )
    assert shown.exit_code == 0, shown.output
    assert "lustre-scus-01" in shown.output
    assert "upgraded" in shown.output
    assert "evictions" in shown.output  # the run's own figure, read back at its end
    missing = runner.invoke(app, ["status", "nope", "--state-dir", str(tmp_path)])
    assert missing.exit_code == 1


def test_cli_run_fleet_refuses_a_bad_policy_before_anything_changes(
    sim: Sim, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from amlfs_cli.main import app

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


# ------------------------------------------------------------------ resume from the truth


def read_plan(
    sim: Sim, conns: Connections, store: StateStore, policy: FleetPolicy, **selector: Any
) -> list[PlanRow]:
    """The plan as the fleet flow makes it: every selected cluster read first (read-only)."""
    chosen = ClusterSelector(**selector)
    readings = read_fleet(
        conns, [c for c in sim.world.fleet.clusters if chosen.matches(c)], RELEASE, store
    )
    return plan_fleet(
        sim.world.fleet,
        RELEASE,
        chosen,
        policy,
        IN_EUS_WINDOW,
        PREDICTION,
        390.0,
        current_release=lambda c: readings[c.name].release,
        interrupted=lambda c: readings[c.name].interrupted,
    )


def test_plan_admits_clusters_left_half_way_first_whatever_their_window(
    sim: Sim, conns: Connections, tmp_path: Path
) -> None:
    store = StateStore(tmp_path)
    weu = sim.world.fleet.cluster("lustre-weu-01")
    # Someone (or a run that died) left a VM of lustre-weu-01 stopped; a journal says a run
    # of lustre-scus-01 stopped mid-swap. Both are outside their windows.
    conns.gateway(weu.subscription_id).power_off(weu.resource_group, "weu01-oss1")
    store.put("clusters", "lustre-scus-01", "run", value={"run_id": "r1", "phase": "swapping"})
    operations = len(sim.timeline()["operations"])
    rows = read_plan(sim, conns, store, FleetPolicy())
    assert len(sim.timeline()["operations"]) == operations  # planning changed nothing
    by_name = {r.cluster: r for r in rows}
    assert [r.cluster for r in rows[:2]] == ["lustre-weu-01", "lustre-scus-01"]
    assert by_name["lustre-weu-01"].run is True
    assert by_name["lustre-weu-01"].interrupted is True
    assert by_name["lustre-weu-01"].reason.startswith("interrupted: resuming (VM weu01-oss1 is")
    assert by_name["lustre-scus-01"].reason == (
        "interrupted: resuming (journal of run r1 at swapping)"
    )
    assert by_name["lustre-eus-01"].interrupted is False
    assert "inside its window" in by_name["lustre-eus-01"].reason


def test_a_half_swapped_cluster_is_interrupted_though_its_mds_is_on_the_release(
    sim: Sim, conns: Connections, tmp_path: Path
) -> None:
    from amlfs.reconcile import read_cluster

    store = StateStore(tmp_path)
    cluster = sim.world.fleet.cluster("lustre-eus-01")
    gateway = conns.gateway(cluster.subscription_id)
    # The MDS alone on a disk of the release, made and tagged the way a run makes it.
    old = gateway.vm_info(cluster.resource_group, cluster.mds.name)
    disk = gateway.create_os_disk(
        cluster.resource_group,
        f"{cluster.mds.name}-osdisk-{RELEASE.version}",
        location=cluster.region,
        image_version_id=RELEASE.image_id,
        sku=None,
        like=gateway.get_disk(cluster.resource_group, old.os_disk_name),  # its zone, size
        tags={
            "amlfs-run": "r2",
            "amlfs-vm": cluster.mds.name,
            "amlfs-replaces": old.os_disk_name,
            "amlfs-release": RELEASE.version,
        },
    )
    gateway.power_off(cluster.resource_group, cluster.mds.name)
    gateway.swap_os_disk(cluster.resource_group, cluster.mds.name, disk)
    gateway.start(cluster.resource_group, cluster.mds.name)
    reading = read_cluster(cluster, gateway, store, release_version=RELEASE.version)
    assert reading.release == RELEASE.version  # what planning used to judge by alone
    assert reading.interrupted is not None
    assert "VMs on OS disks of different runs" in reading.interrupted
    assert "VMs on mixed images: 2.15.6 (1), 2.15.5 (5)" in reading.interrupted
    # An OS disk a run made for the release and left unattached is a sign too.
    other = sim.world.fleet.cluster("lustre-weu-01")
    vm = other.nodes[1].name
    conns.gateway(other.subscription_id).create_os_disk(
        other.resource_group,
        f"{vm}-osdisk-{RELEASE.version}",
        location=other.region,
        image_version_id=RELEASE.image_id,
        sku=None,
        tags={"amlfs-run": "r3", "amlfs-vm": vm, "amlfs-replaces": "x"},
    )
    found = read_cluster(other, gateway, store, release_version=RELEASE.version).interrupted
    assert found == f"OS disk {vm}-osdisk-{RELEASE.version} made by run r3 is attached to nothing"
    clean = sim.world.fleet.cluster("lustre-scus-01")
    reading = read_cluster(
        clean, conns.gateway(clean.subscription_id), store, release_version=RELEASE.version
    )
    assert reading.interrupted is None
    assert reading.release == "2.15.5"


def test_a_resumed_run_keeps_every_cluster_of_the_original_run(
    sim: Sim, conns: Connections, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from amlfs_cli.main import app

    store = StateStore(tmp_path)
    policy = FleetPolicy(override_window=True, reason="test", max_parallel=1, error_budget=3)
    rows = read_plan(sim, conns, store, policy)
    first = fleet_runner(
        sim.world.fleet,
        rows,
        policy,
        upgrader(conns, store),
        store,
        "keep",
        control=lambda: "halt" if store_results(store, "keep") else "run",  # after the first
    ).run()
    assert list(first.results) == ["lustre-eus-01"]
    # Resumed for one cluster: lustre-eus-01 is now on the release (planned "already on
    # release", not run) and lustre-scus-01 is not selected; the record still has both.
    rows = read_plan(sim, conns, store, policy)
    assert {r.cluster: r.run for r in rows}["lustre-eus-01"] is False
    rows = [r for r in rows if r.cluster == "lustre-weu-01"]
    fleet_runner(sim.world.fleet, rows, policy, upgrader(conns, store), store, "keep").run()
    record = store.get("fleet-runs", "keep")
    assert {k: v["outcome"] for k, v in record["results"].items()} == {
        "lustre-eus-01": "upgraded",
        "lustre-weu-01": "upgraded",
    }
    assert set(record["not_started"]) == {"lustre-scus-01"}
    assert record["counts"] == {"upgraded": 2}
    shown = CliRunner().invoke(
        app, ["status", "keep", "--state-dir", str(tmp_path)], env={"COLUMNS": "250"}
    )
    assert shown.exit_code == 0, shown.output
    for name in ("lustre-eus-01", "lustre-weu-01", "lustre-scus-01"):
        assert name in shown.output


def store_results(store: StateStore, run_name: str) -> list[str]:
    return list((store.get("fleet-runs", run_name) or {}).get("results") or {})


# ------------------------------------------------------------------ bake time


@dataclasses.dataclass
class RunClock:
    """The fleet runner's clock, advanced only by its own waits (the upgrades run on the
    emulator's): what the runner waited is exactly what it asked to wait."""

    now_at: dt.datetime = IN_EUS_WINDOW
    waits: list[float] = dataclasses.field(default_factory=list)

    def now(self) -> dt.datetime:
        return self.now_at

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now_at += dt.timedelta(seconds=seconds)


def test_the_next_wave_waits_the_bake_time(sim: Sim, conns: Connections, tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    policy = FleetPolicy(override_window=True, reason="test", bake_s=900, error_budget=3)
    rows = read_plan(sim, conns, store, policy, names=["lustre-eus-01", "lustre-weu-01"])
    clock = RunClock()
    started: dict[str, dt.datetime] = {}
    upgrade = upgrader(conns, store)

    def timed(cluster: Cluster, should_abort: Callable[[], bool]) -> dict[str, Any]:
        started[cluster.name] = clock.now()
        return upgrade(cluster, should_abort)

    summary = fleet_runner(
        sim.world.fleet,
        rows,
        policy,
        timed,
        store,
        "bake",
        now=clock.now,
        sleep=clock.sleep,
        control_every_s=60,
    ).run()
    assert summary.counts() == {"upgraded": 2}, summary.as_dict()
    assert sum(clock.waits) == 900
    assert max(clock.waits) <= 60  # the controls were asked at least every 60 s
    assert started["lustre-weu-01"] - started["lustre-eus-01"] == dt.timedelta(seconds=900)


def test_a_halt_cuts_the_bake_time_short(sim: Sim, conns: Connections, tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    policy = FleetPolicy(override_window=True, reason="test", bake_s=900, error_budget=3)
    rows = read_plan(sim, conns, store, policy, names=["lustre-eus-01", "lustre-weu-01"])
    clock = RunClock()
    summary = fleet_runner(
        sim.world.fleet,
        rows,
        policy,
        upgrader(conns, store),
        store,
        "halted-bake",
        control=lambda: "halt" if clock.waits else "run",  # once the bake began
        now=clock.now,
        sleep=clock.sleep,
        control_every_s=60,
    ).run()
    assert clock.waits == [60]
    assert summary.results["lustre-eus-01"]["outcome"] == "upgraded"
    assert summary.not_started == {"lustre-weu-01": "halted by operator"}
    assert {vm["os_image"].rsplit("/", 1)[-1] for vm in sim.state("lustre-weu-01")["vms"]} == {
        "2.15.5"
    }


def test_a_resume_records_a_cluster_the_dead_run_upgraded_but_never_recorded(
    sim: Sim, conns: Connections, tmp_path: Path
) -> None:
    # The first run started the cluster (its start is in the store), upgraded it, and died
    # before saving the result. The resumed run plans it "already on release", and still
    # checks it and records it: the record keeps every cluster of the original run.
    policy = FleetPolicy(override_window=True, reason="test")
    store = StateStore(tmp_path)
    first = upgrader(conns, store)(sim.cluster, lambda: False)
    assert first["outcome"] == "upgraded"
    store.put("fleet-starts", "died", sim.cluster.name, value={"wave": "canary"})
    rows = plan(sim, conns, policy, IN_EUS_WINDOW, names=[sim.cluster.name])
    assert [r.skipped for r in rows] == [True]  # planning alone would forget it
    summary = fleet_runner(
        sim.world.fleet, rows, policy, upgrader(conns, store), store, "died"
    ).run()
    result = summary.results[sim.cluster.name]
    assert result["outcome"] == "already_current", result
    record = store.get("fleet-runs", "died")
    assert record["results"][sim.cluster.name]["outcome"] == "already_current"


def test_a_run_notes_each_cluster_it_starts_before_it_starts_it(
    sim: Sim, conns: Connections, tmp_path: Path
) -> None:
    policy = FleetPolicy(override_window=True, reason="test")
    store = StateStore(tmp_path)
    seen: list[list[str]] = []

    def upgrade(cluster: Cluster, should_abort: Callable[[], bool]) -> dict[str, Any]:
        seen.append(store.names("fleet-starts", "noted"))  # what a resume would find now
        return {"cluster": cluster.name, "outcome": "upgraded"}

    rows = plan(sim, conns, policy, IN_EUS_WINDOW, names=[sim.cluster.name])
    fleet_runner(sim.world.fleet, rows, policy, upgrade, store, "noted").run()
    assert seen == [[sim.cluster.name]]
