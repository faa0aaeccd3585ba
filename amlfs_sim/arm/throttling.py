"""Azure's request throttling at both of its layers, in sim time.

1. **Azure Resource Manager**, the front door, meters every request first (learn.microsoft.com
   "Understand how Azure Resource Manager throttles requests", the 2024 token-bucket model): per
   subscription, per principal and per operation type (reads, writes, deletes) a bucket of
   250 / 200 / 200 tokens refilled 25 / 10 / 10 per second, and across all principals of the
   subscription a global bucket 15 times that. A refused request answers 429
   ``SubscriptionRequestsThrottled``; every answer carries what is left in
   ``x-ms-ratelimit-remaining-subscription-{reads,writes,deletes}`` and
   ``x-ms-ratelimit-remaining-subscription-global-{reads,writes,deletes}``.
2. **Compute**, behind it, meters by policy per region ("Troubleshooting API throttling
   errors", "Compute throttling limits") and answers 429 ``OperationNotAllowed`` with a
   ``TooManyRequests`` detail naming the policy; ``x-ms-ratelimit-remaining-resource`` lists
   every policy of the request as ``Microsoft.Compute/<policy>;<count>``. VM policies are the
   2024 token buckets (per VM and per subscription); the disk resource provider's policies
   count requests in fixed windows of 3 and 30 minutes (``CreateUpdateDisks3Min``,
   ``HighCostGet30Min``...), so once one is spent, Retry-After is the rest of its window:
   minutes.

Scopes: a VM's own buckets are keyed by its resource id, Compute's subscription buckets by
(subscription, region), ARM's by (subscription, principal) and, for the global ones,
subscription. A refused request takes no token (ARM: "your request isn't processed"); a
refused request is counted in a window's measured requests, as Compute's error detail shows
(``measuredRequestCount`` above ``allowedRequestCount``). Sources per limit:
amlfs_sim/arm/README.md, "Throttling".
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ArmDecision",
    "ArmLimit",
    "ArmOperation",
    "Bucket",
    "BucketPolicy",
    "RequestClass",
    "ThrottleDecision",
    "ThrottlePolicy",
    "Throttler",
    "Window",
    "WindowPolicy",
]


class ArmOperation(StrEnum):
    """How ARM counts a request: by its HTTP method."""

    READ = "read"  # GET (HEAD)
    WRITE = "write"  # PUT, PATCH, POST
    DELETE = "delete"  # DELETE

    @classmethod
    def of_method(cls, method: str) -> ArmOperation:
        method = method.upper()
        if method in ("GET", "HEAD"):
            return cls.READ
        if method == "DELETE":
            return cls.DELETE
        return cls.WRITE


class RequestClass(StrEnum):
    """How Compute meters a request (the policy group it falls in)."""

    VM_WRITE = "vm_write"  # "Update VM": PUT/PATCH of an existing VM, powerOff, start, restart
    VM_DELETE = "vm_delete"  # "Delete VM": delete, deallocate
    VM_GET = "vm_get"  # "Low Cost Get VM": GET of one VM, instanceView
    VM_LIST = "vm_list"  # "High Cost Get VM": list VMs
    VM_OPERATION_POLL = "vm_operation_poll"  # "Get Operation": status of a VM operation
    DISK_WRITE = "disk_write"  # disk RP: create or update a disk
    DISK_DELETE = "disk_delete"  # disk RP: delete a disk
    DISK_GET = "disk_get"  # disk RP: GET of one disk
    DISK_LIST = "disk_list"  # disk RP: list disks (a high-cost GET)
    DISK_OPERATION_POLL = "disk_operation_poll"  # disk RP: status of a disk operation
    GALLERY_GET = "gallery_get"  # gallery images: ARM's read limit only (no policy emulated)


class BucketPolicy(BaseModel):
    """A token bucket: ``per_minute`` tokens refill, up to ``burst`` banked."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["bucket"] = "bucket"
    name: str
    per_minute: float = Field(gt=0)
    burst: float = Field(gt=0)
    per_resource: bool = False


class WindowPolicy(BaseModel):
    """At most ``limit`` requests in a fixed window of ``minutes``, which opens at the first
    request after the previous one closed."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["window"] = "window"
    name: str
    limit: int = Field(gt=0)
    minutes: float = Field(gt=0)
    per_resource: bool = False


Policy = Annotated[BucketPolicy | WindowPolicy, Field(discriminator="kind")]


class ArmLimit(BaseModel):
    """One ARM bucket per (subscription, principal): ``bucket`` tokens, ``per_second`` refill."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    bucket: float = Field(gt=0)
    per_second: float = Field(gt=0)


def _vm_buckets(
    policy: str, per_vm: tuple[float, float], per_sub: tuple[float, float]
) -> list[Policy]:
    # Azure publishes the 2024 buckets' limits, not the names it reports them under: the names
    # keep the family of the wire names recorded before (PutVM3Min, LowCostGet3Min...), with
    # the scope as the suffix (amlfs_sim/arm/README.md).
    return [
        BucketPolicy(
            name=f"Microsoft.Compute/{policy}Resource",
            per_minute=per_vm[0],
            burst=per_vm[1],
            per_resource=True,
        ),
        BucketPolicy(
            name=f"Microsoft.Compute/{policy}SubscriptionMaximum",
            per_minute=per_sub[0],
            burst=per_sub[1],
        ),
    ]


def _windows(policy: str, three_min: int, thirty_min: int) -> list[Policy]:
    return [
        WindowPolicy(name=f"Microsoft.Compute/{policy}3Min", limit=three_min, minutes=3),
        WindowPolicy(name=f"Microsoft.Compute/{policy}30Min", limit=thirty_min, minutes=30),
    ]


class ThrottlePolicy(BaseModel):
    """The limits; the defaults are Azure's (sources in amlfs_sim/arm/README.md)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    enabled: bool = True
    arm: dict[ArmOperation, ArmLimit] = {
        ArmOperation.READ: ArmLimit(bucket=250, per_second=25),
        ArmOperation.WRITE: ArmLimit(bucket=200, per_second=10),
        ArmOperation.DELETE: ArmLimit(bucket=200, per_second=10),
    }
    # "global subscription limits that are equivalent to 15 times the individual service
    # principal limits for each operation type"
    arm_global_factor: float = Field(default=15, gt=0)
    policies: dict[RequestClass, list[Policy]] = {
        # Compute throttling limits (2024): per VM refill/min and burst, per subscription.
        RequestClass.VM_WRITE: _vm_buckets("PutVM", (4, 12), (500, 1500)),
        RequestClass.VM_DELETE: _vm_buckets("DeleteVM", (4, 12), (500, 1500)),
        RequestClass.VM_GET: _vm_buckets("LowCostGetVM", (12, 36), (8000, 24000)),
        RequestClass.VM_LIST: [
            BucketPolicy(
                name="Microsoft.Compute/HighCostGetVMSubscriptionMaximum", per_minute=300, burst=900
            )
        ],
        RequestClass.VM_OPERATION_POLL: _vm_buckets("GetOperation", (15, 45), (5000, 15000)),
        # The disk resource provider, as its answers name and count them.
        RequestClass.DISK_WRITE: _windows("CreateUpdateDisks", 1000, 8000),
        RequestClass.DISK_DELETE: _windows("DeleteDisks", 3000, 24000),
        RequestClass.DISK_GET: _windows("LowCostGet", 15000, 120000),
        RequestClass.DISK_LIST: _windows("HighCostGet", 240, 1920),
        RequestClass.DISK_OPERATION_POLL: _windows("GetOperation", 50000, 400000),
    }


_EPSILON = 1e-9


@dataclass
class Bucket:
    rate_per_s: float
    capacity: float
    tokens: float
    updated: float
    refused: int = 0  # refusals since the last admitted request

    def refill(self, now: float) -> None:
        if now > self.updated:
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate_per_s)
            self.updated = now

    @property
    def has_token(self) -> bool:
        return self.tokens >= 1.0 - _EPSILON  # refills accumulate float error

    @property
    def remaining(self) -> int:
        return max(0, math.floor(self.tokens + _EPSILON))

    def seconds_until_token(self, now: float) -> float:
        return max(0.0, (1.0 - self.tokens) / self.rate_per_s)

    def take(self) -> None:
        self.tokens = max(0.0, self.tokens - 1.0)
        self.refused = 0

    def refuse(self) -> None:
        self.refused += 1

    def report(self, now: float) -> tuple[float, float, int, int]:
        """(start, end, allowed, measured) for a refusal's detail: the time until a token is
        back, the burst, and the burst plus the refusals since (our assumption for buckets)."""
        allowed = math.floor(self.capacity)
        return now, now + self.seconds_until_token(now), allowed, allowed + self.refused


@dataclass
class Window:
    limit: int
    length_s: float
    start: float
    count: int = 0  # requests admitted in this window
    measured: int = 0  # requests seen in this window, refused ones included

    def refill(self, now: float) -> None:
        if now >= self.start + self.length_s:
            self.start, self.count, self.measured = now, 0, 0

    @property
    def has_token(self) -> bool:
        return self.count < self.limit

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.count)

    def seconds_until_token(self, now: float) -> float:
        return 0.0 if self.has_token else max(0.0, self.start + self.length_s - now)

    def take(self) -> None:
        self.count += 1
        self.measured += 1

    def refuse(self) -> None:
        self.measured += 1

    def report(self, now: float) -> tuple[float, float, int, int]:
        return self.start, self.start + self.length_s, self.limit, self.measured


Meter = Bucket | Window


@dataclass(frozen=True)
class ThrottleDecision:
    """Compute's answer to one request."""

    allowed: bool
    retry_after_s: float  # sim seconds; 0 when allowed
    remaining_header: str  # x-ms-ratelimit-remaining-resource
    policy: str = ""  # the policy that refused, if any
    # The refusing policy's window in sim seconds, its allowed and measured request counts
    # (the TooManyRequests detail of Compute's 429).
    window: tuple[float, float] = (0.0, 0.0)
    allowed_count: int = 0
    measured_count: int = 0


@dataclass(frozen=True)
class ArmDecision:
    """ARM's answer to one request; ``remaining`` None: not metered (throttling off)."""

    allowed: bool
    operation: ArmOperation
    retry_after_s: float = 0.0
    remaining: int | None = None  # this principal's bucket in the subscription
    global_remaining: int | None = None  # the subscription's, across principals
    global_limit: bool = False  # refused by the global bucket

    def headers(self) -> dict[str, str]:
        if self.remaining is None or self.global_remaining is None:
            return {}
        kind = f"{self.operation.value}s"
        return {
            f"x-ms-ratelimit-remaining-subscription-{kind}": str(self.remaining),
            f"x-ms-ratelimit-remaining-subscription-global-{kind}": str(self.global_remaining),
        }


@dataclass
class Throttler:
    """Buckets and windows keyed by (policy name, scope)."""

    policy: ThrottlePolicy = field(default_factory=ThrottlePolicy)
    meters: dict[tuple[str, str], Meter] = field(default_factory=dict)
    throttled_count: int = 0
    throttled_by_policy: Counter[str] = field(default_factory=Counter)

    def reset(self) -> None:
        self.meters.clear()
        self.throttled_count = 0
        self.throttled_by_policy.clear()

    def _meter(self, policy: BucketPolicy | WindowPolicy, scope: str, now: float) -> Meter:
        key = (policy.name, scope)
        meter = self.meters.get(key)
        if meter is None:
            if isinstance(policy, BucketPolicy):
                meter = Bucket(policy.per_minute / 60.0, policy.burst, policy.burst, now)
            else:
                meter = Window(policy.limit, policy.minutes * 60.0, now)
            self.meters[key] = meter
        else:
            meter.refill(now)
        return meter

    def _arm_bucket(self, key: tuple[str, str], limit: ArmLimit, now: float) -> Bucket:
        meter = self.meters.get(key)
        if not isinstance(meter, Bucket):
            meter = Bucket(limit.per_second, limit.bucket, limit.bucket, now)
            self.meters[key] = meter
        else:
            meter.refill(now)
        return meter

    def admit_arm(
        self, operation: ArmOperation, *, subscription: str, principal: str, now: float
    ) -> ArmDecision:
        """ARM's buckets for the request's operation type: the principal's and the global one."""
        limit = self.policy.arm.get(operation)
        if not self.policy.enabled or limit is None:
            return ArmDecision(True, operation)
        subscription = subscription.lower()
        factor = self.policy.arm_global_factor
        own = self._arm_bucket((f"arm/{operation}", f"{subscription}/{principal}"), limit, now)
        everyone = self._arm_bucket(
            (f"arm-global/{operation}", subscription),
            ArmLimit(bucket=limit.bucket * factor, per_second=limit.per_second * factor),
            now,
        )
        empty = [b for b in (own, everyone) if not b.has_token]
        if empty:
            self.throttled_count += 1
            worst = max(empty, key=lambda b: b.seconds_until_token(now))
            self.throttled_by_policy[f"arm/{operation}"] += 1
            return ArmDecision(
                False,
                operation,
                worst.seconds_until_token(now),
                own.remaining,
                everyone.remaining,
                global_limit=worst is everyone,
            )
        own.take()
        everyone.take()
        return ArmDecision(True, operation, 0.0, own.remaining, everyone.remaining)

    def admit(
        self, request_class: RequestClass, *, region_scope: str, resource_scope: str, now: float
    ) -> ThrottleDecision:
        """Take one token from every policy of the class, or none if any is spent."""
        policies: Sequence[BucketPolicy | WindowPolicy] = self.policy.policies.get(
            request_class, []
        )
        if not self.policy.enabled or not policies:
            return ThrottleDecision(True, 0.0, "")
        meters = [
            (p, self._meter(p, resource_scope if p.per_resource else region_scope, now))
            for p in policies
        ]
        empty = [(p, m) for p, m in meters if not m.has_token]
        if empty:
            self.throttled_count += 1
            for _, meter in meters:
                meter.refuse()
            worst_policy, worst = max(empty, key=lambda pm: pm[1].seconds_until_token(now))
            self.throttled_by_policy[worst_policy.name] += 1
            start, end, allowed, measured = worst.report(now)
            return ThrottleDecision(
                False,
                worst.seconds_until_token(now),
                _remaining(meters),
                worst_policy.name,
                (start, end),
                allowed,
                measured,
            )
        for _, meter in meters:
            meter.take()
        return ThrottleDecision(True, 0.0, _remaining(meters))


def _remaining(meters: Sequence[tuple[BucketPolicy | WindowPolicy, Meter]]) -> str:
    # One header, the policies comma-separated, as recorded from Azure:
    # "Microsoft.Compute/PutVM3Min;239,Microsoft.Compute/PutVM30Min;1198".
    return ",".join(f"{p.name};{m.remaining}" for p, m in meters)
