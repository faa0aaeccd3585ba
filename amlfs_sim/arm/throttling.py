"""Azure Compute request throttling: token buckets in sim time.

Compute meters requests per policy and answers 429 ``OperationNotAllowed`` with
``Retry-After`` when a bucket is empty, reporting what is left in
``x-ms-ratelimit-remaining-resource``. The emulator keeps one bucket per (policy, scope):
scope is the VM resource for the per-resource policy, (subscription, region) otherwise.
A rejected request takes no token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "Bucket",
    "BucketPolicy",
    "RequestClass",
    "ThrottleDecision",
    "ThrottlePolicy",
    "Throttler",
]


class RequestClass(StrEnum):
    """How Compute meters a request."""

    VM_WRITE = "vm_write"  # PUT/PATCH/DELETE VM and its actions (powerOff, start, ...)
    DISK_WRITE = "disk_write"  # PUT/PATCH/DELETE managed disk
    LOW_COST_GET = "low_cost_get"  # GET of a VM, disk, image version, instanceView, lists
    OPERATION_POLL = "operation_poll"  # GET of an Azure-AsyncOperation / Location URL


class BucketPolicy(BaseModel):
    """One metered policy: ``per_minute`` tokens refill, up to ``burst`` banked."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    per_minute: float = Field(gt=0)
    burst: float = Field(gt=0)
    per_resource: bool = False


class ThrottlePolicy(BaseModel):
    """The limits; defaults are the documented Compute ones (disk writes: our assumption)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    enabled: bool = True
    policies: dict[RequestClass, list[BucketPolicy]] = {
        RequestClass.VM_WRITE: [
            BucketPolicy(
                name="Microsoft.Compute/PutVMResource", per_minute=4, burst=12, per_resource=True
            ),
            BucketPolicy(
                name="Microsoft.Compute/PutVMSubscriptionMaximum", per_minute=500, burst=1500
            ),
        ],
        RequestClass.DISK_WRITE: [
            BucketPolicy(
                name="Microsoft.Compute/DiskWriteSubscriptionMaximum", per_minute=500, burst=1500
            ),
        ],
        RequestClass.LOW_COST_GET: [
            BucketPolicy(name="Microsoft.Compute/LowCostGet", per_minute=8000, burst=8000),
        ],
        RequestClass.OPERATION_POLL: [
            BucketPolicy(name="Microsoft.Compute/GetOperation", per_minute=5000, burst=5000),
        ],
    }


_EPSILON = 1e-9


@dataclass
class Bucket:
    rate_per_s: float
    capacity: float
    tokens: float
    updated: float

    def refill(self, now: float) -> None:
        if now > self.updated:
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate_per_s)
            self.updated = now

    @property
    def has_token(self) -> bool:
        return self.tokens >= 1.0 - _EPSILON  # refills accumulate float error

    def seconds_until_token(self) -> float:
        return max(0.0, (1.0 - self.tokens) / self.rate_per_s)


@dataclass(frozen=True)
class ThrottleDecision:
    allowed: bool
    retry_after_s: float  # sim seconds; 0 when allowed
    remaining_header: str  # x-ms-ratelimit-remaining-resource
    policy: str = ""  # the policy that refused, if any


@dataclass
class Throttler:
    """Token buckets keyed by (policy name, scope)."""

    policy: ThrottlePolicy = field(default_factory=ThrottlePolicy)
    buckets: dict[tuple[str, str], Bucket] = field(default_factory=dict)
    throttled_count: int = 0

    def reset(self) -> None:
        self.buckets.clear()
        self.throttled_count = 0

    def _bucket(self, policy: BucketPolicy, scope: str, now: float) -> Bucket:
        key = (policy.name, scope)
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = Bucket(policy.per_minute / 60.0, policy.burst, policy.burst, now)
            self.buckets[key] = bucket
        else:
            bucket.refill(now)
        return bucket

    def admit(
        self, request_class: RequestClass, *, region_scope: str, resource_scope: str, now: float
    ) -> ThrottleDecision:
        """Take one token from every bucket of the class, or none if any is empty."""
        policies: Sequence[BucketPolicy] = self.policy.policies.get(request_class, [])
        if not self.policy.enabled or not policies:
            return ThrottleDecision(True, 0.0, "")
        buckets = [
            (p, self._bucket(p, resource_scope if p.per_resource else region_scope, now))
            for p in policies
        ]
        empty = [(p, b) for p, b in buckets if not b.has_token]
        if empty:
            self.throttled_count += 1
            worst_policy, worst = max(empty, key=lambda pb: pb[1].seconds_until_token())
            return ThrottleDecision(
                False, worst.seconds_until_token(), _remaining(buckets), worst_policy.name
            )
        for _, bucket in buckets:
            bucket.tokens = max(0.0, bucket.tokens - 1.0)
        return ThrottleDecision(True, 0.0, _remaining(buckets))


def _remaining(buckets: Sequence[tuple[BucketPolicy, Bucket]]) -> str:
    return ",".join(f"{p.name};{math.floor(b.tokens)}" for p, b in buckets)
