"""Throttling as Azure does it: ARM's per-principal buckets, Compute's policies (token
buckets for VMs, windows for disks), their answers on the wire; and fault matching."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from amlfs_sim import Emulator, EndpointInfo
from amlfs_sim.arm.throttling import (
    ArmLimit,
    ArmOperation,
    RequestClass,
    ThrottlePolicy,
    Throttler,
    WindowPolicy,
)
from amlfs_sim.faults import FaultBook, FaultMode, FaultSpec
from amlfs_sim.spec import SimWorld
from tests.conftest import trust

DISK_API = "2026-03-02"
VM_API = "2026-04-01"


def test_per_vm_bucket_bursts_12_then_refills_4_per_minute() -> None:
    throttler = Throttler()
    admit = lambda vm, now: throttler.admit(  # noqa: E731
        RequestClass.VM_WRITE, region_scope="sub/eastus", resource_scope=vm, now=now
    )
    assert all(admit("vm1", 0.0).allowed for _ in range(12))
    refused = admit("vm1", 0.0)
    assert not refused.allowed
    assert refused.policy == "Microsoft.Compute/PutVMResource"
    assert refused.retry_after_s == pytest.approx(15.0)
    assert admit("vm2", 0.0).allowed  # another VM has its own bucket
    assert not admit("vm1", 14.9).allowed
    assert admit("vm1", 15.0).allowed
    assert throttler.throttled_count == 2


def test_subscription_bucket_caps_writes_across_vms() -> None:
    throttler = Throttler()
    allowed = sum(
        throttler.admit(
            RequestClass.VM_WRITE, region_scope="sub/eastus", resource_scope=f"vm{i // 10}", now=0.0
        ).allowed
        for i in range(2000)
    )
    assert allowed == 1500
    # Another region of the same subscription is a separate scope.
    assert throttler.admit(
        RequestClass.VM_WRITE, region_scope="sub/westeurope", resource_scope="vmX", now=0.0
    ).allowed


def test_refused_request_takes_no_token() -> None:
    throttler = Throttler()
    for _ in range(12):
        throttler.admit(RequestClass.VM_WRITE, region_scope="s", resource_scope="v", now=0.0)
    for _ in range(100):
        throttler.admit(RequestClass.VM_WRITE, region_scope="s", resource_scope="v", now=0.0)
    assert throttler.admit(
        RequestClass.VM_WRITE, region_scope="s", resource_scope="v", now=15.0
    ).allowed


def test_fault_count_glob_and_phase() -> None:
    book = FaultBook(random.Random(0))
    book.add(FaultSpec(kind="vm.*", target="eus01-oss*", count=2))
    book.add(FaultSpec(kind="disk.create", phase="accept"))
    assert book.take("vm.put", "eus01-mds0", (FaultMode.FAIL,)) is None
    assert book.take("vm.put", "EUS01-OSS1", (FaultMode.FAIL,)) is not None
    assert book.take("vm.start", "eus01-oss0", (FaultMode.FAIL,)) is not None
    assert book.take("vm.start", "eus01-oss0", (FaultMode.FAIL,)) is None  # used up
    assert book.take("disk.create", "d", (FaultMode.FAIL,)) is None  # accept-phase only
    assert book.take("disk.create", "d", (FaultMode.FAIL,), phase="accept") is not None


def test_fault_probability_is_seeded() -> None:
    def fired(seed: int) -> list[bool]:
        book = FaultBook(random.Random(seed))
        book.add(FaultSpec(kind="vm.get", mode=FaultMode.THROTTLE, probability=0.3))
        return [book.take("vm.get", "x", (FaultMode.THROTTLE,)) is not None for _ in range(200)]

    assert fired(1) == fired(1)
    assert 30 < sum(fired(1)) < 90


def test_unknown_fault_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="matches no operation kind"):
        FaultSpec(kind="vm.reimage")


# ---------------------------------------------------------------- ARM, without HTTP


def reads(throttler: Throttler, now: float, principal: str = "p") -> bool:
    return throttler.admit_arm(
        ArmOperation.READ, subscription="sub", principal=principal, now=now
    ).allowed


def test_arm_read_bucket_holds_250_and_refills_25_per_second() -> None:
    throttler = Throttler()
    assert all(reads(throttler, 0.0) for _ in range(250))
    refused = throttler.admit_arm(ArmOperation.READ, subscription="sub", principal="p", now=0.0)
    assert not refused.allowed
    assert refused.retry_after_s == pytest.approx(1 / 25)
    assert refused.headers() == {
        "x-ms-ratelimit-remaining-subscription-reads": "0",
        "x-ms-ratelimit-remaining-subscription-global-reads": str(15 * 250 - 250),
    }
    assert sum(reads(throttler, 1.0) for _ in range(40)) == 25  # one second of refill
    assert throttler.throttled_by_policy["arm/read"] == 16


def test_arm_writes_and_deletes_have_their_own_buckets_of_200_at_10_per_second() -> None:
    throttler = Throttler()

    def admit(operation: ArmOperation, now: float) -> bool:
        return throttler.admit_arm(operation, subscription="sub", principal="p", now=now).allowed

    assert sum(admit(ArmOperation.WRITE, 0.0) for _ in range(300)) == 200
    assert sum(admit(ArmOperation.DELETE, 0.0) for _ in range(300)) == 200
    assert reads(throttler, 0.0)
    assert sum(admit(ArmOperation.WRITE, 2.0) for _ in range(300)) == 20


def test_arm_meters_each_principal_and_caps_the_subscription_at_15_times() -> None:
    throttler = Throttler()
    for principal in range(15):
        assert all(reads(throttler, 0.0, f"p{principal}") for _ in range(250))
    refused = throttler.admit_arm(ArmOperation.READ, subscription="sub", principal="new", now=0)
    assert not refused.allowed
    assert refused.global_limit
    assert refused.remaining == 250  # the newcomer's own bucket is full: the global one is not
    assert throttler.admit_arm(
        ArmOperation.READ, subscription="other-sub", principal="new", now=0
    ).allowed


# ---------------------------------------------------------------- Compute's disk windows


def test_a_disk_list_spends_high_cost_get_3min_then_waits_out_its_window() -> None:
    throttler = Throttler()

    def lists(now: float) -> list[bool]:
        return [
            throttler.admit(
                RequestClass.DISK_LIST, region_scope="sub/eastus", resource_scope="rg", now=now
            ).allowed
            for _ in range(240)
        ]

    assert all(lists(0.0))
    refused = throttler.admit(
        RequestClass.DISK_LIST, region_scope="sub/eastus", resource_scope="rg", now=10.0
    )
    assert not refused.allowed
    assert refused.policy == "Microsoft.Compute/HighCostGet3Min"
    assert refused.retry_after_s == pytest.approx(170.0)  # the rest of the 3-minute window
    assert refused.window == (0.0, 180.0)
    assert (refused.allowed_count, refused.measured_count) == (240, 241)
    assert refused.remaining_header == (
        "Microsoft.Compute/HighCostGet3Min;0,Microsoft.Compute/HighCostGet30Min;1680"
    )
    # Seven more full 3-minute windows: 1,920 lists in 30 minutes spend the 30-minute one.
    for window in range(1, 8):
        assert all(lists(180.0 * window))
    late = throttler.admit(
        RequestClass.DISK_LIST, region_scope="sub/eastus", resource_scope="rg", now=1440.0
    )
    assert not late.allowed
    assert late.policy == "Microsoft.Compute/HighCostGet30Min"
    assert late.retry_after_s == pytest.approx(1800.0 - 1440.0)  # six minutes
    assert throttler.admit(
        RequestClass.DISK_LIST, region_scope="sub/westeurope", resource_scope="rg", now=1440.0
    ).allowed  # another region of the subscription is another scope


def test_disk_writes_and_deletes_are_metered_by_their_own_windows() -> None:
    throttler = Throttler()

    def admit(request_class: RequestClass, now: float) -> bool:
        return throttler.admit(
            request_class, region_scope="s/r", resource_scope="rg", now=now
        ).allowed

    assert sum(admit(RequestClass.DISK_WRITE, 0.0) for _ in range(1100)) == 1000
    assert sum(admit(RequestClass.DISK_DELETE, 0.0) for _ in range(3100)) == 3000
    assert sum(admit(RequestClass.DISK_WRITE, 179.0) for _ in range(10)) == 0
    assert sum(admit(RequestClass.DISK_WRITE, 180.0) for _ in range(10)) == 10


# ---------------------------------------------------------------- on the wire


@pytest.fixture
def real_time(small_world: SimWorld, tmp_path: Path) -> Iterator[tuple[Emulator, EndpointInfo]]:
    """A fresh emulator at time scale 1: a 3-minute window outlasts any test."""
    emulator = Emulator(small_world, tmp_path)
    endpoint = emulator.start()
    try:
        yield emulator, endpoint
    finally:
        emulator.stop()


def arm(endpoint: EndpointInfo, principal: str = "t") -> httpx.Client:
    return httpx.Client(
        base_url=endpoint.arm_url,
        verify=trust(endpoint),
        headers={"Authorization": f"Bearer {principal}"},
        timeout=30,
    )


def test_the_rate_limit_headers_read_as_azure_writes_them(
    real_time: tuple[Emulator, EndpointInfo], small_world: SimWorld
) -> None:
    _, endpoint = real_time
    cluster = small_world.fleet.clusters[0]
    disks = (
        f"/subscriptions/{cluster.subscription_id}/resourceGroups/{cluster.resource_group}"
        "/providers/Microsoft.Compute/disks"
    )
    body = {
        "location": cluster.region,
        "properties": {"creationData": {"createOption": "Empty"}, "diskSizeGB": 64},
    }
    with arm(endpoint) as http:
        created = http.put(f"{disks}/probe", params={"api-version": DISK_API}, json=body)
        read = http.get(f"{disks}/probe", params={"api-version": DISK_API})
        vm = http.get(cluster.vm_id(cluster.nodes[0]), params={"api-version": VM_API})
        gone = http.delete(f"{disks}/never-was", params={"api-version": DISK_API})
    assert created.status_code == 202
    # As recorded from Azure (2021, a first disk create in a subscription), one header with
    # the policies comma-separated; ARM's own count beside it.
    assert created.headers["x-ms-ratelimit-remaining-resource"] == (
        "Microsoft.Compute/CreateUpdateDisks3Min;999,Microsoft.Compute/CreateUpdateDisks30Min;7999"
    )
    assert created.headers["x-ms-ratelimit-remaining-subscription-writes"] == "199"
    assert created.headers["x-ms-ratelimit-remaining-subscription-global-writes"] == "2999"
    assert read.headers["x-ms-ratelimit-remaining-resource"] == (
        "Microsoft.Compute/LowCostGet3Min;14999,Microsoft.Compute/LowCostGet30Min;119999"
    )
    # A first read under the 2024 buckets: 249 of the principal's 250, 3,749 of the 3,750.
    assert read.headers["x-ms-ratelimit-remaining-subscription-reads"] == "249"
    assert read.headers["x-ms-ratelimit-remaining-subscription-global-reads"] == "3749"
    assert vm.headers["x-ms-ratelimit-remaining-resource"] == (
        "Microsoft.Compute/LowCostGetVMResource;35,"
        "Microsoft.Compute/LowCostGetVMSubscriptionMaximum;23999"
    )
    assert gone.status_code == 204
    assert gone.headers["x-ms-ratelimit-remaining-subscription-deletes"] == "199"
    assert gone.headers["x-ms-ratelimit-remaining-resource"] == (
        "Microsoft.Compute/DeleteDisks3Min;2999,Microsoft.Compute/DeleteDisks30Min;23999"
    )


def test_a_disk_list_beyond_high_cost_get_3min_answers_429_naming_the_policy(
    real_time: tuple[Emulator, EndpointInfo], small_world: SimWorld
) -> None:
    emulator, endpoint = real_time
    cluster = small_world.fleet.clusters[0]
    url = (
        f"/subscriptions/{cluster.subscription_id}/resourceGroups/{cluster.resource_group}"
        "/providers/Microsoft.Compute/disks"
    )
    with arm(endpoint) as http:
        # 241 reads: within ARM's bucket of 250 whatever the time they take.
        answers = [http.get(url, params={"api-version": DISK_API}) for _ in range(241)]
    assert [a.status_code for a in answers] == [200] * 240 + [429]
    refused = answers[-1]
    assert refused.headers["x-ms-ratelimit-remaining-resource"].startswith(
        "Microsoft.Compute/HighCostGet3Min;0,Microsoft.Compute/HighCostGet30Min;"
    )
    assert 1 <= int(refused.headers["Retry-After"]) <= 180  # the rest of the window
    error = refused.json()["error"]
    assert error["code"] == "OperationNotAllowed"
    assert error["message"].startswith("The server rejected the request because too many")
    (detail,) = error["details"]
    assert (detail["code"], detail["target"]) == ("TooManyRequests", "HighCostGet3Min")
    counts = json.loads(detail["message"])
    assert counts["operationGroup"] == "HighCostGet3Min"
    assert (counts["allowedRequestCount"], counts["measuredRequestCount"]) == (240, 241)
    assert counts["startTime"] < counts["endTime"]
    throttler = emulator.backend.throttler
    assert throttler.throttled_by_policy == {"Microsoft.Compute/HighCostGet3Min": 1}


@pytest.fixture
def tiny_arm(small_world: SimWorld, tmp_path: Path) -> Iterator[tuple[Emulator, EndpointInfo]]:
    """ARM reads of 3 tokens that practically never refill: the 4th read of a principal is
    refused whatever the time the test takes."""
    policy = ThrottlePolicy(arm={ArmOperation.READ: ArmLimit(bucket=3, per_second=0.0001)})
    emulator = Emulator(small_world, tmp_path, throttle=policy)
    endpoint = emulator.start()
    try:
        yield emulator, endpoint
    finally:
        emulator.stop()


def test_arm_refuses_a_principal_past_its_reads_before_compute_sees_the_request(
    tiny_arm: tuple[Emulator, EndpointInfo], small_world: SimWorld
) -> None:
    emulator, endpoint = tiny_arm
    cluster = small_world.fleet.clusters[0]
    url = cluster.vm_id(cluster.nodes[0])
    with arm(endpoint, "token-of-a") as first, arm(endpoint, "token-of-b") as second:
        answers = [first.get(url, params={"api-version": VM_API}) for _ in range(4)]
        other = second.get(url, params={"api-version": VM_API})
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    refused = answers[-1]
    error = refused.json()["error"]
    assert error["code"] == "SubscriptionRequestsThrottled"
    assert error["message"].startswith(
        f"Number of 'read' requests for subscription '{cluster.subscription_id}' actor '"
    )
    assert "token-of-a" not in refused.text  # the actor is a principal id, never the token
    assert "Please try again after '" in error["message"]
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.headers["x-ms-ratelimit-remaining-subscription-reads"] == "0"
    assert "x-ms-ratelimit-remaining-resource" not in refused.headers  # Compute never saw it
    assert other.status_code == 200  # another principal has its own bucket
    # Compute metered the four reads that passed: 36 - 4 of the VM's bucket are left.
    assert other.headers["x-ms-ratelimit-remaining-resource"].startswith(
        "Microsoft.Compute/LowCostGetVMResource;32,"
    )
    assert emulator.backend.throttler.throttled_by_policy == {"arm/read": 1}


def test_a_disk_list_window_is_configurable_per_fleet_policy() -> None:
    small = WindowPolicy(name="Microsoft.Compute/HighCostGet3Min", limit=2, minutes=3)
    policy = ThrottlePolicy(policies={RequestClass.DISK_LIST: [small]})
    throttler = Throttler(policy)
    allowed = [
        throttler.admit(
            RequestClass.DISK_LIST, region_scope="s/r", resource_scope="rg", now=0.0
        ).allowed
        for _ in range(3)
    ]
    assert allowed == [True, True, False]
