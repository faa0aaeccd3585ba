"""State of the emulated Compute resources: VMs, managed disks, long-running operations.

Plain slotted dataclasses, so 8,000 VMs and their disks stay small in memory. All mutation
goes through ``ArmBackend`` under its lock; these classes only hold state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

from amlfs.ids import disk_id, vm_id

__all__ = [
    "DataDiskAttachment",
    "Disk",
    "Key",
    "OpStatus",
    "Operation",
    "Phase",
    "PowerState",
    "VirtualMachine",
    "key_of",
]

Key = tuple[str, str, str]  # (subscription, resource group lower-cased, name lower-cased)


def key_of(subscription_id: str, resource_group: str, name: str) -> Key:
    return (subscription_id.lower(), resource_group.lower(), name.lower())


class PowerState(StrEnum):
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    STARTING = "starting"
    DEALLOCATING = "deallocating"
    DEALLOCATED = "deallocated"

    @property
    def display(self) -> str:
        return f"VM {self.value}"


class OpStatus(StrEnum):
    IN_PROGRESS = "InProgress"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


@dataclass(slots=True)
class Disk:
    subscription_id: str
    resource_group: str
    name: str
    location: str
    size_gb: int
    sku: str
    os_type: str | None  # "Linux" for an OS disk, None for a data disk
    image_id: str | None  # gallery image version the disk was created from
    tags: dict[str, str]
    unique_id: str
    created_at: float
    provisioning_state: str = "Succeeded"
    managed_by: str | None = None  # id of the VM it is attached to
    checksum: str | None = None  # content checksum, data disks only
    generation: int = 0  # bumped by the fault API's write
    initial: bool = False  # part of the fleet as loaded
    busy_op: str | None = None
    zones: list[str] = field(default_factory=list)  # [] : a regional disk
    hyper_v_generation: str | None = None  # "V1"/"V2", OS disks only
    security_type: str | None = None  # securityProfile.securityType, e.g. "TrustedLaunch"

    @property
    def id(self) -> str:
        return disk_id(self.subscription_id, self.resource_group, self.name)

    @property
    def key(self) -> Key:
        return key_of(self.subscription_id, self.resource_group, self.name)


@dataclass(slots=True)
class DataDiskAttachment:
    lun: int
    disk: Key
    caching: str = "None"


@dataclass(slots=True)
class VirtualMachine:
    subscription_id: str
    resource_group: str
    name: str
    location: str
    vm_size: str
    cluster: str
    role: str
    os_disk: Key
    data_disks: list[DataDiskAttachment]
    unique_id: str
    tags: dict[str, str] = field(default_factory=dict)
    power_state: PowerState = PowerState.RUNNING
    provisioning_state: str = "Succeeded"
    busy_op: str | None = None
    image_reference: str | None = None
    zones: list[str] = field(default_factory=list)  # [] : a regional VM
    security_type: str = "TrustedLaunch"  # securityProfile.securityType
    hyper_v_generation: str = "V2"  # of the image it was created from

    @property
    def id(self) -> str:
        return vm_id(self.subscription_id, self.resource_group, self.name)

    @property
    def key(self) -> Key:
        return key_of(self.subscription_id, self.resource_group, self.name)


Effect = Callable[[float], None]


@dataclass(slots=True)
class Phase:
    """One timed part of an operation. ``commit`` marks where an injected failure lands."""

    name: str
    duration: float
    on_start: Effect | None = None
    on_end: Effect | None = None
    commit: bool = False


@dataclass(slots=True)
class Operation:
    id: str
    kind: str
    target: str  # resource name
    target_id: str
    subscription_id: str
    region: str
    start: float
    phases: list[Phase]
    on_fail: Effect | None = None
    on_finish: Effect | None = None
    status: OpStatus = OpStatus.IN_PROGRESS
    end: float | None = None
    error_code: str | None = None
    error_message: str | None = None
    fail_with: tuple[str, str] | None = None  # injected (code, message)
    hang: bool = False
    phase_index: int = 0
    phase_log: list[tuple[str, float, float]] = field(default_factory=list)
