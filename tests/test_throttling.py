"""Token-bucket arithmetic and fault matching, without HTTP."""

from __future__ import annotations

import random

import pytest

from amlfs_sim.arm.throttling import RequestClass, Throttler
from amlfs_sim.faults import FaultBook, FaultMode, FaultSpec


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
