"""The orchestrator keeps to ARM's and Compute's budgets: every request waits for its
subscription's slot (reads, writes, deletes), a process or several sharing a principal stay
under its buckets, and cluster starts queue their disk lists under HighCostGet."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from amlfs.clock import Pacer
from amlfs.reconcile import inspect_cluster
from amlfs.runtime import AzureSettings, Connections, SshSettings, from_endpoint
from amlfs.shards import ShardSpec
from amlfs.store import StateStore
from amlfs_sim import Emulator, EndpointInfo
from amlfs_sim.arm.throttling import (
    ArmLimit,
    ArmOperation,
    RequestClass,
    ThrottlePolicy,
    WindowPolicy,
)
from amlfs_sim.spec import SimWorld


class ManualClock:
    """Sim time that moves only when someone sleeps: pacing arithmetic without timing."""

    time_scale = 1.0

    def __init__(self) -> None:
        self.t = 0.0
        self.sleeps: list[float] = []

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.t += seconds

    def to_real(self, seconds: float) -> float:
        return seconds


def test_a_pacer_lets_its_burst_through_then_spaces_the_rest() -> None:
    clock = ManualClock()
    pacer = Pacer(clock, per_second=10, burst=5)
    for _ in range(5):
        pacer.wait()
    assert clock.sleeps == []
    pacer.wait()
    pacer.wait()
    assert clock.sleeps == pytest.approx([0.1, 0.1])
    clock.t += 10.0  # idle: the bucket fills back to its burst, not beyond
    for _ in range(6):
        pacer.wait()
    assert clock.sleeps == pytest.approx([0.1, 0.1, 0.1])
    assert pacer.events == 13


def test_a_shard_gets_its_share_of_every_subscription_budget() -> None:
    azure = AzureSettings()
    spec = ShardSpec(
        azure,
        SshSettings(username="u", private_key=SecretStr("k"), known_hosts="/dev/null"),
        "/tmp/state",
    ).for_share(0.25)
    assert spec.azure.max_arm_reads_per_s == azure.max_arm_reads_per_s / 4
    assert spec.azure.max_arm_writes_per_s == azure.max_arm_writes_per_s / 4
    assert spec.azure.max_arm_deletes_per_s == azure.max_arm_deletes_per_s / 4
    assert spec.azure.max_disk_lists_per_s == azure.max_disk_lists_per_s / 4
    # At the defaults, what one principal may ask of ARM stays under its refill.
    assert azure.max_arm_reads_per_s <= 25
    assert azure.max_arm_writes_per_s <= 10
    assert azure.max_arm_deletes_per_s <= 10


def emulator_with(
    world: SimWorld, state_dir: Path, policy: ThrottlePolicy, time_scale: float
) -> Callable[[], Iterator[tuple[Emulator, EndpointInfo]]]:
    def run() -> Iterator[tuple[Emulator, EndpointInfo]]:
        emulator = Emulator(world, state_dir, throttle=policy, time_scale=time_scale)
        endpoint = emulator.start()
        try:
            yield emulator, endpoint
        finally:
            emulator.stop()

    return run


@pytest.fixture
def small_read_bucket(
    small_world: SimWorld, tmp_path: Path
) -> Iterator[tuple[Emulator, EndpointInfo]]:
    """ARM's read bucket scaled down (20 tokens, 5 per second, real time), so that a burst a
    test can afford would spend it: 30 reads at once take 25 of them at most."""
    policy = ThrottlePolicy(arm={ArmOperation.READ: ArmLimit(bucket=20, per_second=5)})
    yield from emulator_with(small_world, tmp_path / "sim", policy, 1.0)()


def connections(emulator: Emulator, **rates: float) -> Connections:
    azure, ssh = from_endpoint(emulator.state_dir / "endpoint.json")
    return Connections.create(azure.model_copy(update=rates), ssh)


def burst_of_reads(conns: Connections, world: SimWorld, count: int) -> None:
    """``count`` reads: a VM, then its OS disk from ``count - 1`` threads at once."""
    cluster = world.fleet.clusters[0]
    gateway = conns.gateway(cluster.subscription_id)
    disk = gateway.vm_info(cluster.resource_group, cluster.nodes[0].name).os_disk_name
    errors: list[BaseException] = []

    def read() -> None:
        try:
            gateway.get_disk(cluster.resource_group, disk)
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=read) for _ in range(count - 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors


def test_a_burst_of_reads_from_one_subscription_is_paced_and_never_throttled(
    small_read_bucket: tuple[Emulator, EndpointInfo], small_world: SimWorld
) -> None:
    emulator, _ = small_read_bucket
    # 4 reads/s, a second's worth at once: at most 4 + 4 t against ARM's 20 + 5 t.
    conns = connections(emulator, max_arm_reads_per_s=4)
    try:
        burst_of_reads(conns, small_world, 30)
        assert emulator.backend.throttler.throttled_count == 0
        assert emulator.backend.requests_by_kind["disk.get"] == 29
        reads = conns.arm_pacer(small_world.fleet.clusters[0].subscription_id, "reads")
        assert reads.events == 30
        assert reads.waited_s > 0
    finally:
        conns.close()


def test_processes_sharing_a_principal_stay_under_its_bucket_together(
    small_read_bucket: tuple[Emulator, EndpointInfo], small_world: SimWorld
) -> None:
    emulator, _ = small_read_bucket
    # Two orchestrators, one principal (the same token), each with half of the budget.
    pair = [connections(emulator, max_arm_reads_per_s=2) for _ in range(2)]
    try:
        threads = [
            threading.Thread(target=burst_of_reads, args=(conns, small_world, 15)) for conns in pair
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        for conns in pair:
            conns.close()
    assert emulator.backend.throttler.throttled_count == 0
    assert emulator.backend.requests_by_kind["disk.get"] == 28


@pytest.fixture
def small_high_cost_window(
    small_world: SimWorld, tmp_path: Path
) -> Iterator[tuple[Emulator, EndpointInfo]]:
    """HighCostGet3Min cut to 10 disk lists (the 30-minute window as Azure's), time scale 50:
    twelve starts at once in one subscription and region would spend it."""
    policies = dict(ThrottlePolicy().policies)
    policies[RequestClass.DISK_LIST] = [
        WindowPolicy(name="Microsoft.Compute/HighCostGet3Min", limit=10, minutes=3),
        WindowPolicy(name="Microsoft.Compute/HighCostGet30Min", limit=1920, minutes=30),
    ]
    policy = ThrottlePolicy(policies=policies)
    yield from emulator_with(small_world, tmp_path / "sim", policy, 50.0)()


def test_cluster_starts_queue_their_disk_lists_under_high_cost_get(
    small_high_cost_window: tuple[Emulator, EndpointInfo],
    small_world: SimWorld,
    tmp_path: Path,
) -> None:
    emulator, _ = small_high_cost_window
    # One list per 30 sim s: any 3-minute window holds 1 + 180 / 30 = 7 of the 10.
    conns = connections(emulator, max_disk_lists_per_s=1 / 30)
    store = StateStore(tmp_path / "state")
    errors: list[BaseException] = []

    # Twelve starts of one cluster: Compute meters lists per subscription and region.
    cluster = small_world.fleet.clusters[0]

    def start() -> None:
        try:
            position = inspect_cluster(cluster, conns.gateway(cluster.subscription_id), store)
            assert not position.interrupted
        except BaseException as err:
            errors.append(err)

    try:
        threads = [threading.Thread(target=start) for _ in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        conns.close()
    assert not errors
    assert emulator.backend.throttler.throttled_by_policy == {}
    assert emulator.backend.requests_by_kind["disk.list"] == 12
    assert conns.arm_pacer(cluster.subscription_id, "disk_lists").events == 12
