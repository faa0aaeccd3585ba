"""One orchestrator per cluster: the lease, its fencing token, and what a second orchestrator
does (nothing) — judged from the state store's record and the emulator's ground truth."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from amlfs.lease import ClusterLease, LeaseHeldError, LeaseLostError
from amlfs.models import load_release
from amlfs.runtime import Connections
from amlfs.saga import Outcome, UpgradeResult
from amlfs.store import StateStore, open_store
from tests import stores
from tests.conftest import REPO, SMALL_FLEET, Sim, upgrade_cluster

# The lease's own tests run on both backends: it lives in one document, through update/get.
store_location = stores.store_location

RELEASE_FILE = REPO / "examples" / "release-2.15.6.yaml"
RELEASE = load_release(RELEASE_FILE)


class Wall:
    """A wall clock the test moves (lease expiry is wall time, shared by processes)."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_a_second_holder_is_refused_with_the_holder_and_the_expiry(store_location: str) -> None:
    store, wall = open_store(store_location), Wall()
    first = ClusterLease(store, "c1", "run-a", ttl_s=60, wall=wall)
    first.acquire()
    second = ClusterLease(store, "c1", "run-b", ttl_s=60, wall=wall)
    with pytest.raises(LeaseHeldError, match=r"run run-a \(host .*, pid \d+\); it expires at"):
        second.acquire()
    first.check()  # still ours
    first.release()
    second.acquire()
    assert second.token == 2  # every new holder gets a larger token
    assert second.knows_run("run-a")
    assert second.knows_run("run-b")
    with pytest.raises(LeaseLostError):
        first.check()


def test_an_expired_lease_is_taken_over_and_fences_its_old_holder(store_location: str) -> None:
    store, wall = open_store(store_location), Wall()
    old = ClusterLease(store, "c1", "run-a", ttl_s=60, wall=wall)
    old.acquire()
    wall.now += 59
    with pytest.raises(LeaseHeldError):
        ClusterLease(store, "c1", "run-b", ttl_s=60, wall=wall).acquire()
    wall.now += 2  # the old holder was paused past its expiry
    new = ClusterLease(store, "c1", "run-b", ttl_s=60, wall=wall)
    new.acquire()
    with pytest.raises(LeaseLostError, match="taken over by run run-b"):
        old.check()
    with pytest.raises(LeaseLostError):
        old.renew()
    new.check()


def test_a_paused_holder_nobody_took_over_from_keeps_its_lease(store_location: str) -> None:
    store, wall = open_store(store_location), Wall()
    lease = ClusterLease(store, "c1", "run-a", ttl_s=60, wall=wall)
    lease.acquire()
    wall.now += 600
    lease.check()  # expired but untouched: renewed on the spot
    with pytest.raises(LeaseHeldError):
        ClusterLease(store, "c1", "run-b", ttl_s=60, wall=wall).acquire()


def test_the_lease_of_a_process_that_died_on_this_host_is_taken_over_at_once(
    store_location: str,
) -> None:
    script = textwrap.dedent(
        f"""
        from amlfs.lease import ClusterLease
        from amlfs.store import open_store
        ClusterLease(open_store({store_location!r}), "c1", "dead-run", ttl_s=3600).acquire()
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO, timeout=60)
    record = open_store(store_location).get("clusters", "c1", "lease")
    assert record["holder"]["run_id"] == "dead-run"
    lease = ClusterLease(open_store(store_location), "c1", "resume", ttl_s=60)
    lease.acquire()  # its pid is gone: no need to wait an hour
    assert lease.knows_run("dead-run")


def test_processes_racing_for_a_lease_get_it_exactly_once(
    store_location: str, tmp_path: Path
) -> None:
    go, done = tmp_path / "go", tmp_path / "done"
    script = textwrap.dedent(
        f"""
        import pathlib, sys, time
        from amlfs.lease import ClusterLease, LeaseHeldError
        from amlfs.store import open_store
        store = open_store({store_location!r})
        store.get("clusters", "c1", "lease")  # connected before the start line
        lease = ClusterLease(store, "c1", sys.argv[1], ttl_s=3600)
        print("ready", flush=True)
        while not pathlib.Path({str(go)!r}).exists():  # start together
            time.sleep(0.005)
        try:
            lease.acquire()
        except LeaseHeldError:
            print("refused", flush=True)
        else:
            print("acquired", flush=True)
        while not pathlib.Path({str(done)!r}).exists():  # every racer alive until all tried
            time.sleep(0.005)
        """
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, f"run-{i}"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(6)
    ]
    try:
        for proc in procs:  # every racer at the start line before the start
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
        go.touch()
        outputs = []
        for proc in procs:
            assert proc.stdout is not None
            outputs.append(proc.stdout.readline().strip())
    finally:
        done.touch()
        for proc in procs:
            proc.communicate(timeout=60)
    assert sorted(outputs) == ["acquired"] + ["refused"] * 5, outputs


# ---------------------------------------------------------------------- two orchestrators


def upgrade(
    sim: Sim,
    conns: Connections,
    store_dir: Path,
    *,
    runner: Callable[[str, Callable[[], Any]], Any] | None = None,
) -> UpgradeResult:
    return upgrade_cluster(sim, conns, store_dir, RELEASE, runner=runner)


def test_a_second_orchestrator_changes_nothing_while_the_first_works(
    sim: Sim, conns: Connections, tmp_path: Path
) -> None:
    in_swap, go_on = threading.Event(), threading.Event()

    def first_runner(name: str, fn: Callable[[], Any]) -> Any:
        if name == "restore":
            in_swap.set()
            assert go_on.wait(60)
        return fn()

    results: list[UpgradeResult] = []
    first = threading.Thread(
        target=lambda: results.append(upgrade(sim, conns, tmp_path, runner=first_runner))
    )
    first.start()
    try:
        assert in_swap.wait(120), "the first orchestrator never reached restore"
        journal = StateStore(tmp_path).get("clusters", sim.cluster.name, "run")
        operations = len(sim.timeline()["operations"])
        second = upgrade(sim, conns, tmp_path)
        assert second.outcome is Outcome.BUSY, second.reason
        assert f"run {journal['run_id']}" in second.reason
        # It did nothing: no ARM operation, the first one's journal and config untouched.
        assert len(sim.timeline()["operations"]) == operations
        assert StateStore(tmp_path).get("clusters", sim.cluster.name, "run") == journal
    finally:
        go_on.set()
        first.join(180)
    assert results[0].outcome is Outcome.UPGRADED, results[0].reason
    state = sim.state(sim.cluster.name)
    assert {vm["os_image"].rsplit("/", 1)[-1] for vm in state["vms"]} == {"2.15.6"}
    assert state["leaked_disks"] == []
    assert sim.customer()["evictions"] == 0


CHILD = textwrap.dedent(
    """
    import json, sys
    from amlfs.models import load_fleet, load_release
    from amlfs.jobs import ClusterJob, run_job
    from amlfs.runtime import Connections, from_endpoint
    from amlfs.saga import UpgradePolicy
    from amlfs.store import StateStore
    fleet, release, endpoint, state_dir, ttl = sys.argv[1:6]
    connections = Connections.create(*from_endpoint(endpoint))
    job = ClusterJob(
        cluster=load_fleet(fleet).clusters[0], release=load_release(release),
        policy=UpgradePolicy(lease_ttl_s=float(ttl)),
    )
    result = run_job(job, connections, StateStore(state_dir))
    print(json.dumps({"outcome": result.outcome, "reason": result.reason}))
    """
)


def test_an_orchestrator_paused_past_its_lease_wakes_fenced_and_changes_nothing(
    sim: Sim, conns: Connections, tmp_path: Path
) -> None:
    endpoint = sim.emulator.state_dir / "endpoint.json"
    paused = subprocess.Popen(
        [
            sys.executable,
            "-c",
            CHILD,
            str(SMALL_FLEET),
            str(RELEASE_FILE),
            str(endpoint),
            str(tmp_path),
            "2",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not any(
            e["type"] == "vm.os_disk_swapped" for e in sim.timeline()["events"]
        ):  # mid-swap
            assert paused.poll() is None, paused.communicate()
            assert time.monotonic() < deadline, "the first orchestrator never swapped a disk"
            time.sleep(0.02)
        paused.send_signal(signal.SIGSTOP)
        # Still alive, but its lease runs out (2 s): a resume takes the cluster over.
        holder = StateStore(tmp_path).get("clusters", sim.cluster.name, "lease")["holder"]
        while (
            time.time()
            < StateStore(tmp_path).get("clusters", sim.cluster.name, "lease")["expires_at"]
        ):
            time.sleep(0.1)
        resumed = upgrade(sim, conns, tmp_path)
        assert resumed.resumed
        assert resumed.outcome is Outcome.ROLLED_BACK, resumed.reason
        after_takeover = len(sim.timeline()["operations"])
    finally:
        paused.send_signal(signal.SIGCONT)
    out, err = paused.communicate(timeout=120)
    claimed = json.loads(out.strip().splitlines()[-1])
    assert claimed["outcome"] == "busy", (claimed, err[-2000:])
    assert "taken over" in claimed["reason"]
    # The woken orchestrator started nothing in Azure after the takeover (an operation it
    # had in flight when it was paused may still have been polled, never a new one).
    started_after = [
        op
        for op in sim.timeline()["operations"][after_takeover:]
        if not op["kind"].endswith(("get", "list", "instance_view", "poll"))
    ]
    assert started_after == [], started_after
    state = sim.state(sim.cluster.name)
    assert {vm["os_image"].rsplit("/", 1)[-1] for vm in state["vms"]} == {"2.15.5"}
    assert all(vm["power_state"] == "running" for vm in state["vms"])
    assert state["leaked_disks"] == []
    customer = sim.customer()
    assert customer["serving"] is True
    assert customer["evictions"] == 0
    assert holder["pid"] == paused.pid
