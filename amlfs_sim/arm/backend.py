"""The emulated Azure Compute control plane: resources, long-running operations, faults.

Operations are lists of timed phases on an event heap in sim time. ``advance()`` applies every
phase end that is due, at its exact sim timestamp, so the timeline does not depend on how
often clients poll. A pump thread in the server calls it regularly; every request calls it
first. One lock guards all state: the work under it is small and in memory.
"""

from __future__ import annotations

import collections
import fnmatch
import hashlib
import heapq
import itertools
import random
import threading
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from amlfs.clock import Clock
from amlfs.ids import (
    KEEP_TAG,  # an unattached disk with it is kept on purpose, not leaked
    parse_resource_id,
)
from amlfs.models import Cluster, Node
from amlfs_sim.arm.exceptions import ArmError, bad_request, conflict, not_found
from amlfs_sim.arm.models import (
    DataDiskAttachment,
    Disk,
    Key,
    Operation,
    OpStatus,
    Phase,
    PowerState,
    VirtualMachine,
    key_of,
)
from amlfs_sim.arm.throttling import (
    ArmDecision,
    ArmOperation,
    RequestClass,
    ThrottleDecision,
    ThrottlePolicy,
    Throttler,
)
from amlfs_sim.faults import FaultBook, FaultMode, FaultSpec
from amlfs_sim.spec import DurationRange, ImageSpec, SimWorld

__all__ = ["KEEP_TAG", "ArmBackend", "Event"]

VM_TYPE = "Microsoft.Compute/virtualMachines"
DISK_TYPE = "Microsoft.Compute/disks"
IMAGE_TYPE = "Microsoft.Compute/galleries/images/versions"

EventListener = Callable[["Event"], None]


@dataclass(frozen=True)
class Event:
    """A point in the emulator's history: power changes, swaps, boots, violations..."""

    seq: int
    at: float
    type: str
    data: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "at": round(self.at, 3), "type": self.type, **self.data}


@dataclass
class _Baseline:
    """Data-disk layout and contents at reset: the yardstick for 'customer data untouched'."""

    layout: dict[str, dict[int, tuple[str, str | None]]] = field(default_factory=dict)


class DiskTable(dict[Key, Disk]):
    """Every disk by key, and by (subscription, resource group) too: listing a group's disks
    reads that group, not the fleet's (a list of 16,000 disks under the backend lock was 7% of
    the emulator's GIL time in the 1,000-cluster bench)."""

    def __init__(self) -> None:
        super().__init__()
        self._groups: dict[tuple[str, str], dict[Key, Disk]] = {}

    def __setitem__(self, key: Key, disk: Disk) -> None:
        super().__setitem__(key, disk)
        self._groups.setdefault(key[:2], {})[key] = disk

    def __delitem__(self, key: Key) -> None:
        super().__delitem__(key)
        self._groups[key[:2]].pop(key, None)

    def pop(self, key: Key, *default: Any) -> Any:
        if key in self:
            self._groups[key[:2]].pop(key, None)
        return super().pop(key, *default)

    def in_group(self, subscription: str, resource_group: str) -> list[Disk]:
        return list(self._groups.get((subscription, resource_group), {}).values())


class ArmBackend:
    """All emulated ARM state and behaviour. Public methods are called with ``lock`` held."""

    def __init__(
        self,
        world: SimWorld,
        clock: Clock,
        *,
        seed: int = 0,
        throttle: ThrottlePolicy | None = None,
    ) -> None:
        self.world = world
        self.clock = clock
        self.seed = seed
        self.lock = threading.RLock()
        self.throttler = Throttler(throttle or ThrottlePolicy())
        self.listeners: list[EventListener] = []
        # Called with the lock held: after reset (the node layer rebuilds) and after each
        # advance (the node layer applies its own timed transitions up to now).
        self.reset_hooks: list[Callable[[], None]] = []
        self.tick_hooks: list[Callable[[float], None]] = []
        # The node layer's per-cluster customer view, for the control API's state.
        self.customer_view: Callable[[str | None], dict[str, Any]] | None = None
        self.ssh_stats: Callable[[], dict[str, Any]] | None = None
        self.gc_stats: Callable[[], dict[str, Any]] | None = None
        self.images: dict[str, ImageSpec] = {i.id.lower(): i for i in world.images}
        self.regions: dict[tuple[str, str], str] = {}
        for cluster in world.fleet.clusters:
            self.regions[(cluster.subscription_id, cluster.resource_group.lower())] = cluster.region
        default_region = world.fleet.clusters[0].region
        for image in world.images:
            rid = parse_resource_id(image.id)
            self.regions.setdefault(
                (rid.subscription_id, rid.resource_group.lower()), default_region
            )
        self.subscriptions = {sub for sub, _ in self.regions}
        self.reset()

    # ----------------------------------------------------------------- lifecycle

    def reset(self) -> None:
        """Back to the fleet as loaded: every VM running its initial image, no history."""
        with self.lock:
            self.rng = random.Random(self.seed)
            self.faults = FaultBook(random.Random(self.seed + 1))
            self.throttler.reset()
            self.vms: dict[Key, VirtualMachine] = {}
            self.disks = DiskTable()
            self.operations: dict[str, Operation] = {}
            self.history: list[Operation] = []
            self.events: list[Event] = []
            self.violations: list[dict[str, Any]] = []
            self._heap: list[tuple[float, int, str]] = []
            self._seq = itertools.count()
            self._event_seq = itertools.count(1)
            self.requests = 0
            self.requests_by_kind: collections.Counter[str] = collections.Counter()
            # Status polls by the kind of operation polled (what the polling budget is spent on).
            self.polls_by_operation: collections.Counter[str] = collections.Counter()
            for cluster in self.world.fleet.clusters:
                for node in cluster.nodes:
                    self._add_initial_vm(cluster, node)
            self.baseline = _Baseline({vm.name: self._data_layout(vm) for vm in self.vms.values()})
            for hook in self.reset_hooks:
                hook()

    def _add_initial_vm(self, cluster: Cluster, node: Node) -> None:
        spec = self.world.spec
        image = self.world.initial_image
        hardware = spec.hardware(cluster.name)
        zones = [hardware.zone] if hardware.zone else []
        sub, rg = cluster.subscription_id, cluster.resource_group
        os_disk = Disk(
            sub,
            rg,
            f"{node.name}-osdisk-{image.version}",
            cluster.region,
            hardware.os_disk_size_gb or image.disk_size_gb,
            spec.os_disk_sku,
            "Linux",
            image.id,
            {},
            str(uuid.UUID(int=self.rng.getrandbits(128))),
            0.0,
            initial=True,
            zones=list(zones),
            hyper_v_generation=image.hyper_v_generation,
            # The OS disk of a Trusted Launch VM carries the VM's security type; a Standard
            # VM's carries none (Disk_Create_WithSecurityProfile.json, DiskRP 2025-01-02).
            security_type=None if hardware.security_type == "Standard" else "TrustedLaunch",
        )
        attachments = []
        for lun in range(spec.data_disks.get(node.role.value, 0)):
            data = Disk(
                sub,
                rg,
                f"{node.name}-data{lun}",
                cluster.region,
                spec.data_disk_size_gb,
                spec.os_disk_sku,
                None,
                None,
                {},
                str(uuid.UUID(int=self.rng.getrandbits(128))),
                0.0,
                initial=True,
                zones=list(zones),
            )
            data.checksum = self._checksum(data)
            self.disks[data.key] = data
            attachments.append(DataDiskAttachment(lun, data.key))
        vm = VirtualMachine(
            sub,
            rg,
            node.name,
            cluster.region,
            spec.vm_size,
            cluster.name,
            node.role.value,
            os_disk.key,
            attachments,
            str(uuid.UUID(int=self.rng.getrandbits(128))),
            image_reference=image.id,
            zones=list(zones),
            security_type=hardware.security_type,
            hyper_v_generation=image.hyper_v_generation,
        )
        os_disk.managed_by = vm.id
        for attachment in attachments:
            self.disks[attachment.disk].managed_by = vm.id
        self.disks[os_disk.key] = os_disk
        self.vms[vm.key] = vm

    def _checksum(self, disk: Disk) -> str:
        material = f"{self.seed}:{disk.unique_id}:{disk.generation}".encode()
        return hashlib.sha256(material).hexdigest()[:16]

    # ----------------------------------------------------------------- time

    def advance(self) -> None:
        """Apply every phase end that is due, in sim-time order."""
        now = self.clock.now()
        while self._heap and self._heap[0][0] <= now:
            due, _, op_id = heapq.heappop(self._heap)
            op = self.operations.get(op_id)
            if op is not None and op.status is OpStatus.IN_PROGRESS:
                self._end_phase(op, due)
        for hook in self.tick_hooks:
            hook(now)

    def _draw(self, duration: DurationRange) -> float:
        return self.rng.uniform(duration.low, duration.high)

    def _start_operation(
        self,
        kind: str,
        target_name: str,
        target_id: str,
        subscription_id: str,
        region: str,
        phases: list[Phase],
        *,
        on_fail: Callable[[float], None] | None = None,
        on_finish: Callable[[float], None] | None = None,
    ) -> Operation:
        now = self.clock.now()
        op = Operation(
            str(uuid.uuid4()),
            kind,
            target_name,
            target_id,
            subscription_id,
            region,
            now,
            phases,
            on_fail=on_fail,
            on_finish=on_finish,
        )
        hang = self.faults.take(kind, target_name, (FaultMode.HANG,))
        if hang is not None and hang.hang_s is not None:
            phases[0].duration += hang.hang_s  # stuck, then Azure finishes it after all
        elif hang is not None:
            op.hang = True
        slow = self.faults.take(kind, target_name, (FaultMode.SLOW,))
        if slow is not None:
            for phase in phases:
                phase.duration *= slow.factor
        fail = self.faults.take(kind, target_name, (FaultMode.FAIL,))
        if fail is not None:
            op.fail_with = (fail.code, fail.message)
        self.operations[op.id] = op
        self.history.append(op)
        self._begin_phase(op, now)
        return op

    def _begin_phase(self, op: Operation, at: float) -> None:
        phase = op.phases[op.phase_index]
        if phase.on_start is not None:
            phase.on_start(at)
        if not op.hang:
            heapq.heappush(self._heap, (at + phase.duration, next(self._seq), op.id))

    def _end_phase(self, op: Operation, at: float) -> None:
        phase = op.phases[op.phase_index]
        op.phase_log.append((phase.name, at - phase.duration, at))
        failing_here = op.fail_with is not None and (
            phase.commit or op.phase_index == len(op.phases) - 1
        )
        if failing_here:
            assert op.fail_with is not None
            if op.on_fail is not None:
                op.on_fail(at)
            self._finish(op, at, OpStatus.FAILED, *op.fail_with)
            return
        if phase.on_end is not None:
            phase.on_end(at)
        op.phase_index += 1
        if op.phase_index < len(op.phases):
            self._begin_phase(op, at)
        else:
            self._finish(op, at, OpStatus.SUCCEEDED)

    def _finish(
        self,
        op: Operation,
        at: float,
        status: OpStatus,
        code: str | None = None,
        message: str | None = None,
    ) -> None:
        op.status, op.end, op.error_code, op.error_message = status, at, code, message
        if op.on_finish is not None:
            op.on_finish(at)

    def emit(self, at: float, type_: str, **data: Any) -> Event:
        event = Event(next(self._event_seq), at, type_, data)
        self.events.append(event)
        for listener in self.listeners:
            listener(event)
        return event

    # ----------------------------------------------------------------- admission

    def region_of(self, subscription_id: str, resource_group: str) -> str:
        self._check_subscription(subscription_id)
        region = self.regions.get((subscription_id.lower(), resource_group.lower()))
        if region is None:
            raise ArmError(
                404,
                "ResourceGroupNotFound",
                f"Resource group '{resource_group}' could not be found.",
            )
        return region

    def _check_subscription(self, subscription_id: str) -> None:
        if subscription_id.lower() not in self.subscriptions:
            raise ArmError(
                404,
                "SubscriptionNotFound",
                f"The subscription '{subscription_id}' could not be found.",
            )

    def admit_arm(
        self, kind: str, operation: ArmOperation, subscription_id: str, principal: str
    ) -> ArmDecision:
        """ARM's front-door metering of one request, before it reaches Compute."""
        self.requests += 1
        self.requests_by_kind[kind] += 1
        return self.throttler.admit_arm(
            operation, subscription=subscription_id, principal=principal, now=self.clock.now()
        )

    def admit(
        self,
        kind: str,
        request_class: RequestClass,
        subscription_id: str,
        region: str,
        resource_id: str,
        target_name: str,
    ) -> ThrottleDecision:
        """Compute's throttling and accept-phase faults for one request that ARM let through;
        raises ArmError to refuse it."""
        storm = self.faults.take(kind, target_name, (FaultMode.THROTTLE,))
        if storm is not None:
            self.throttler.throttled_count += 1
            return ThrottleDecision(False, storm.retry_after_s, "", "InjectedThrottle")
        decision = self.throttler.admit(
            request_class,
            region_scope=f"{subscription_id.lower()}/{region}",
            resource_scope=resource_id.lower(),
            now=self.clock.now(),
        )
        if decision.allowed:
            fail = self.faults.take(kind, target_name, (FaultMode.FAIL,), phase="accept")
            if fail is not None:
                raise ArmError(fail.status, fail.code, fail.message)
        return decision

    def add_fault(self, spec: FaultSpec) -> int:
        return self.faults.add(spec)

    def release_hung(self, target: str = "*") -> list[str]:
        """Let every operation held by a ``hang`` rule without ``hang_s`` (on a resource
        whose name matches the glob ``target``) go on: its current phase starts again now and
        runs its normal length. A test's handshake: hold a cluster in flight until the
        product has shown it read an operator's command, then let it go. Returns the ids."""
        with self.lock:
            now = self.clock.now()
            released = []
            for op in self.operations.values():
                if not (op.hang and op.status is OpStatus.IN_PROGRESS):
                    continue
                if not fnmatch.fnmatchcase(op.target.lower(), target.lower()):
                    continue
                op.hang = False
                phase = op.phases[op.phase_index]
                heapq.heappush(self._heap, (now + phase.duration, next(self._seq), op.id))
                released.append(op.id)
            return released

    # ----------------------------------------------------------------- VMs

    def vm(self, subscription_id: str, resource_group: str, name: str) -> VirtualMachine:
        self.region_of(subscription_id, resource_group)
        vm = self.vms.get(key_of(subscription_id, resource_group, name))
        if vm is None:
            raise not_found(VM_TYPE, name, resource_group)
        return vm

    def vms_in(self, subscription_id: str, resource_group: str) -> list[VirtualMachine]:
        self.region_of(subscription_id, resource_group)
        prefix = (subscription_id.lower(), resource_group.lower())
        return [vm for key, vm in self.vms.items() if key[:2] == prefix]

    def _check_idle(self, vm: VirtualMachine, action: str) -> None:
        if vm.busy_op is not None:
            busy = self.operations[vm.busy_op]
            raise conflict(
                "Conflict",
                f"Operation '{action}' is not allowed on VM '{vm.name}' since the VM is busy "
                f"with operation '{busy.kind}' ({busy.id}). Retry after it completes.",
            )

    def _vm_operation(
        self,
        vm: VirtualMachine,
        kind: str,
        phases: list[Phase],
        on_fail: Callable[[float], None] | None = None,
    ) -> Operation:
        vm.provisioning_state = "Updating"

        def finish(at: float) -> None:
            vm.busy_op = None
            failed = self.operations[op_id].status is OpStatus.FAILED
            vm.provisioning_state = "Failed" if failed else "Succeeded"

        op = self._start_operation(
            kind,
            vm.name,
            vm.id,
            vm.subscription_id,
            vm.location,
            phases,
            on_fail=on_fail,
            on_finish=finish,
        )
        op_id = op.id
        vm.busy_op = op.id
        self.emit(op.start, "operation.started", op=op.id, kind=kind, target=vm.name)
        return op

    def _set_power(self, vm: VirtualMachine, state: PowerState, at: float) -> None:
        if vm.power_state is not state:
            previous = vm.power_state
            vm.power_state = state
            self.emit(
                at,
                "vm.power",
                vm=vm.name,
                cluster=vm.cluster,
                state=state.value,
                previous=previous.value,
            )
            if state is PowerState.RUNNING:
                disk = self.disks.get(vm.os_disk)
                self.emit(
                    at,
                    "vm.booted",
                    vm=vm.name,
                    cluster=vm.cluster,
                    image=disk.image_id if disk else None,
                    os_disk=disk.name if disk else None,
                )

    def _power_phase(
        self,
        vm: VirtualMachine,
        name: str,
        duration: DurationRange,
        during: PowerState,
        after: PowerState,
        commit: bool = False,
    ) -> Phase:
        return Phase(
            name,
            self._draw(duration),
            on_start=lambda at: self._set_power(vm, during, at),
            on_end=lambda at: self._set_power(vm, after, at),
            commit=commit,
        )

    def _noop_phase(self) -> Phase:
        return Phase("noop", self._draw(self.world.spec.durations.vm_update), commit=True)

    def power_off(self, vm: VirtualMachine) -> Operation:
        self._check_idle(vm, "powerOff")
        d = self.world.spec.durations
        if vm.power_state is PowerState.RUNNING:
            phases = [
                self._power_phase(
                    vm,
                    "powerOff",
                    d.power_off,
                    PowerState.STOPPING,
                    PowerState.STOPPED,
                    commit=True,
                )
            ]
        else:
            phases = [self._noop_phase()]
        # A stop that fails leaves the VM running (it never got to stopped).
        running = vm.power_state is PowerState.RUNNING
        return self._vm_operation(
            vm,
            "vm.power_off",
            phases,
            on_fail=(lambda at: self._set_power(vm, PowerState.RUNNING, at)) if running else None,
        )

    def start(self, vm: VirtualMachine) -> Operation:
        self._check_idle(vm, "start")
        d = self.world.spec.durations
        if vm.power_state in (PowerState.STOPPED, PowerState.DEALLOCATED):
            back = vm.power_state
            phases = [
                self._power_phase(
                    vm, "start", d.start, PowerState.STARTING, PowerState.RUNNING, commit=True
                )
            ]
            return self._vm_operation(
                vm, "vm.start", phases, on_fail=lambda at: self._set_power(vm, back, at)
            )
        return self._vm_operation(vm, "vm.start", [self._noop_phase()])

    def restart(self, vm: VirtualMachine) -> Operation:
        self._check_idle(vm, "restart")
        if vm.power_state is not PowerState.RUNNING:
            raise conflict(
                "OperationNotAllowed",
                f"Cannot restart VM '{vm.name}': it is {vm.power_state.display.lower()}.",
            )
        d = self.world.spec.durations
        phases = [
            self._power_phase(vm, "powerOff", d.power_off, PowerState.STOPPING, PowerState.STOPPED),
            self._power_phase(
                vm, "start", d.start, PowerState.STARTING, PowerState.RUNNING, commit=True
            ),
        ]
        return self._vm_operation(vm, "vm.restart", phases)

    def deallocate(self, vm: VirtualMachine) -> Operation:
        self._check_idle(vm, "deallocate")
        d = self.world.spec.durations
        phases = [
            self._power_phase(
                vm,
                "deallocate",
                d.deallocate,
                PowerState.DEALLOCATING,
                PowerState.DEALLOCATED,
                commit=True,
            )
        ]
        # A stop that fails leaves the VM running (it never got to stopped).
        running = vm.power_state is PowerState.RUNNING
        return self._vm_operation(
            vm,
            "vm.deallocate",
            phases,
            on_fail=(lambda at: self._set_power(vm, PowerState.RUNNING, at)) if running else None,
        )

    def update_vm(self, vm: VirtualMachine, body: dict[str, Any], *, patch: bool) -> Operation:
        """PUT or PATCH of an existing VM: tags, an OS disk swap, and (guarded) data disks."""
        kind = "vm.patch" if patch else "vm.put"
        self._check_idle(vm, "PATCH" if patch else "PUT")
        if not isinstance(body, dict):
            raise bad_request("InvalidRequestContent", "The request content was invalid.")
        props = body.get("properties") or {}
        storage = props.get("storageProfile")
        new_os: Disk | None = None
        new_data: list[DataDiskAttachment] | None = None
        if isinstance(storage, dict):
            new_os = self._requested_os_disk(vm, storage)
            if "dataDisks" in storage or not patch:
                # PUT replaces the whole model: a storageProfile without dataDisks detaches them.
                new_data = self._requested_data_disks(vm, storage.get("dataDisks") or [])
                if self._layout_of(new_data) == self._layout_of(vm.data_disks):
                    new_data = None
        now = self.clock.now()
        if new_data is not None:
            self.violations.append(
                {
                    "at": round(now, 3),
                    "vm": vm.name,
                    "cluster": vm.cluster,
                    "request": kind,
                    "before": self._layout_of(vm.data_disks),
                    "after": self._layout_of(new_data),
                }
            )
            self.emit(now, "violation.data_disks", vm=vm.name, cluster=vm.cluster, request=kind)
        tags = body.get("tags")
        d = self.world.spec.durations

        def commit(at: float) -> None:
            if isinstance(tags, dict):
                vm.tags = {str(k): str(v) for k, v in tags.items()}
            if new_data is not None:
                self._attach_data_disks(vm, new_data)
            if new_os is not None:
                self._swap_os_disk(vm, new_os, at)

        if new_os is not None and vm.power_state is PowerState.RUNNING:
            # The deck's "new PUT": a running VM is stopped (not deallocated), swapped, booted.
            phases = [
                self._power_phase(
                    vm, "powerOff", d.power_off, PowerState.STOPPING, PowerState.STOPPED
                ),
                Phase("swap", self._draw(d.swap), on_end=commit, commit=True),
                self._power_phase(vm, "start", d.start, PowerState.STARTING, PowerState.RUNNING),
            ]
        elif new_os is not None:
            phases = [Phase("swap", self._draw(d.swap), on_end=commit, commit=True)]
        else:
            phases = [Phase("update", self._draw(d.vm_update), on_end=commit, commit=True)]
        if new_os is not None:
            new_os.busy_op = "reserved"
            op = self._vm_operation(vm, kind, phases)

            def release(at: float, disk: Disk = new_os, previous: Any = op.on_finish) -> None:
                disk.busy_op = None
                previous(at)

            op.on_finish = release
            return op
        return self._vm_operation(vm, kind, phases)

    def _requested_os_disk(self, vm: VirtualMachine, storage: dict[str, Any]) -> Disk | None:
        os_disk = storage.get("osDisk")
        if not isinstance(os_disk, dict):
            return None
        wanted = (os_disk.get("managedDisk") or {}).get("id")
        current = self.disks[vm.os_disk]
        if not wanted or wanted.lower() == current.id.lower():
            return None
        try:
            rid = parse_resource_id(wanted)
        except ValueError as err:
            raise bad_request("InvalidParameter", f"osDisk.managedDisk.id: {err}") from err
        if not rid.is_type(DISK_TYPE):
            raise bad_request("InvalidParameter", f"osDisk.managedDisk.id is not a disk: {wanted}")
        disk = self.disks.get(key_of(rid.subscription_id, rid.resource_group, rid.name))
        if disk is None:
            raise not_found(DISK_TYPE, rid.name, rid.resource_group)
        if disk.provisioning_state != "Succeeded":
            raise conflict(
                "OperationNotAllowed",
                f"Disk '{disk.name}' is not ready (provisioningState {disk.provisioning_state}).",
            )
        if disk.busy_op is not None:
            raise conflict(
                "OperationNotAllowed",
                f"Disk '{disk.name}' is busy with another operation. Retry after it completes.",
            )
        if disk.managed_by and disk.managed_by.lower() != vm.id.lower():
            raise conflict(
                "OperationNotAllowed",
                f"Disk '{disk.name}' is attached to VM '{disk.managed_by}'.",
            )
        if disk.location != vm.location:
            raise bad_request(
                "InvalidParameter",
                f"Disk '{disk.name}' is in {disk.location}, VM '{vm.name}' in {vm.location}.",
            )
        self._check_zone(vm, disk)
        self._check_swap_size(vm, disk, current, os_disk.get("diskSizeGB"))
        mismatch = [
            f"{what} {new!r} differs from the current OS disk's {old!r}"
            for what, new, old in (
                ("osType", disk.os_type, current.os_type),
                ("sku", disk.sku, current.sku),
            )
            if new != old
        ]
        if mismatch:
            raise bad_request(
                "OperationNotAllowed",
                f"Cannot swap the OS disk of VM '{vm.name}' to '{disk.name}': "
                + "; ".join(mismatch)
                + ".",
            )
        self._check_generation_and_security(vm, disk)
        return disk

    def _check_zone(self, vm: VirtualMachine, disk: Disk) -> None:
        """A zonal VM takes only a disk of its zone: 400 BadRequest, the zone named, worded
        as Compute words it (README: zones)."""
        if not vm.zones or disk.zones == vm.zones:
            return
        if not disk.zones:
            message = (
                f"Disk {disk.id} cannot be attached to the VM because it is not in zone "
                f"'{vm.zones[0]}'."
            )
        else:
            message = (
                f"Disk {disk.id} cannot be attached to the VM because it is not in the same "
                f"zone as the VM. VM zone: '{vm.zones[0]}'. Disk zone: '{disk.zones[0]}'."
            )
        raise bad_request("BadRequest", message)

    def _check_swap_size(
        self, vm: VirtualMachine, disk: Disk, current: Disk, requested: Any
    ) -> None:
        """The replacement OS disk must be the size of the current one (README: size).

        A PUT carries ``osDisk.diskSizeGB`` as GET returned it, the current disk's size:
        Compute reads it as the size wanted, and a bigger disk would have to shrink."""
        try:
            wanted = int(requested) if requested is not None else None
        except (TypeError, ValueError) as err:
            raise bad_request("InvalidParameter", f"osDisk.diskSizeGB {requested!r}") from err
        if wanted is not None and disk.size_gb > wanted:
            raise bad_request(
                "BadRequest",
                f"The disk {disk.id} cannot be resized down. Reducing disk/snapshot size is not "
                "supported in Azure to prevent data loss. If you do need to reduce the size of "
                "the disk, please create new snapshot/disks with the appropriate size. More "
                "information is available at https://aka.ms/AzureDisksFAQ.",
            )
        if disk.size_gb != current.size_gb:
            raise bad_request(
                "OperationNotAllowed",
                f"Cannot swap the OS disk of VM '{vm.name}' to '{disk.name}': its diskSizeGB "
                f"{disk.size_gb} differs from the current OS disk's {current.size_gb}; the "
                "current and replacement OS disks must be the same size.",
            )

    def _check_generation_and_security(self, vm: VirtualMachine, disk: Disk) -> None:
        """The disk's hyperVGeneration and security type must be the VM's: 409
        PropertyChangeNotAllowed (README: generation, security type)."""
        if disk.hyper_v_generation != vm.hyper_v_generation:
            raise conflict(
                "PropertyChangeNotAllowed",
                "Swapping OS Disk is not supported since HyperVisor property on the OSDisk and "
                "VM do not match. Please make sure the HyperVisor property on the OSDisk is "
                f"HyperVisor Generation '{vm.hyper_v_generation}'",
            )
        wanted = None if vm.security_type == "Standard" else vm.security_type
        if disk.security_type != wanted:
            raise conflict(
                "PropertyChangeNotAllowed",
                "Security type of VM is not compatible with the security type of attached OS "
                f"Disk. VM securityType: '{vm.security_type}'; disk {disk.name} securityType: "
                f"'{disk.security_type or 'None'}'.",
            )

    def _requested_data_disks(
        self, vm: VirtualMachine, requested: Iterable[Any]
    ) -> list[DataDiskAttachment]:
        result = []
        for entry in requested:
            if not isinstance(entry, dict) or "lun" not in entry:
                raise bad_request("InvalidParameter", "each dataDisks entry needs a lun")
            ref = (entry.get("managedDisk") or {}).get("id")
            if not ref:
                raise bad_request(
                    "InvalidParameter", f"dataDisks lun {entry['lun']}: no managedDisk.id"
                )
            rid = parse_resource_id(ref)
            key = key_of(rid.subscription_id, rid.resource_group, rid.name)
            if key not in self.disks:
                raise not_found(DISK_TYPE, rid.name, rid.resource_group)
            result.append(DataDiskAttachment(int(entry["lun"]), key, entry.get("caching", "None")))
        return result

    def _layout_of(self, attachments: Iterable[DataDiskAttachment]) -> list[list[Any]]:
        return sorted([a.lun, self.disks[a.disk].name] for a in attachments)

    def _attach_data_disks(self, vm: VirtualMachine, attachments: list[DataDiskAttachment]) -> None:
        for old in vm.data_disks:
            self.disks[old.disk].managed_by = None
        vm.data_disks = attachments
        for new in attachments:
            self.disks[new.disk].managed_by = vm.id

    def _swap_os_disk(self, vm: VirtualMachine, new_disk: Disk, at: float) -> None:
        old = self.disks[vm.os_disk]
        old.managed_by = None
        new_disk.managed_by = vm.id
        vm.os_disk = new_disk.key
        vm.image_reference = new_disk.image_id
        self.emit(
            at,
            "vm.os_disk_swapped",
            vm=vm.name,
            cluster=vm.cluster,
            old=old.name,
            new=new_disk.name,
            image=new_disk.image_id,
        )

    # ----------------------------------------------------------------- disks

    def disk(self, subscription_id: str, resource_group: str, name: str) -> Disk:
        self.region_of(subscription_id, resource_group)
        disk = self.disks.get(key_of(subscription_id, resource_group, name))
        if disk is None:
            raise not_found(DISK_TYPE, name, resource_group)
        return disk

    def disks_in(self, subscription_id: str, resource_group: str) -> list[Disk]:
        self.region_of(subscription_id, resource_group)
        return self.disks.in_group(subscription_id.lower(), resource_group.lower())

    def put_disk(
        self,
        subscription_id: str,
        resource_group: str,
        name: str,
        body: dict[str, Any],
        *,
        patch: bool = False,
    ) -> tuple[Disk, Operation, bool]:
        """Create (from a gallery image or empty) or update tags. Returns (disk, op, created)."""
        region = self.region_of(subscription_id, resource_group)
        if not isinstance(body, dict):
            raise bad_request("InvalidRequestContent", "The request content was invalid.")
        existing = self.disks.get(key_of(subscription_id, resource_group, name))
        d = self.world.spec.durations
        if existing is not None:
            if existing.busy_op is not None:
                raise conflict(
                    "OperationNotAllowed", f"Disk '{name}' is busy with another operation."
                )
            tags = body.get("tags")

            def update(at: float) -> None:
                if isinstance(tags, dict):
                    existing.tags = {str(k): str(v) for k, v in tags.items()}

            op = self._disk_operation(
                existing,
                "disk.update",
                [Phase("update", self._draw(d.disk_update), on_end=update, commit=True)],
            )
            return existing, op, False
        if patch:
            raise not_found(DISK_TYPE, name, resource_group)
        location = body.get("location")
        if not location:
            raise bad_request(
                "LocationRequired", "The location property is required for this definition."
            )
        if str(location).lower().replace(" ", "") != region:
            raise bad_request(
                "InvalidParameter",
                f"Disk location '{location}' differs from resource group region '{region}'.",
            )
        props = body.get("properties") or {}
        creation = props.get("creationData") or {}
        option = str(creation.get("createOption", ""))
        image: ImageSpec | None = None
        if option.lower() == "fromimage":
            ref = creation.get("galleryImageReference") or creation.get("imageReference") or {}
            image_id = ref.get("id") if isinstance(ref, dict) else None
            if not image_id:
                raise bad_request(
                    "InvalidParameter",
                    "creationData.galleryImageReference.id is required for FromImage.",
                )
            image = self.images.get(str(image_id).lower())
            if image is None:
                rid = parse_resource_id(str(image_id))
                raise not_found(IMAGE_TYPE, "/".join(rid.names), rid.resource_group)
            size = int(props.get("diskSizeGB") or image.disk_size_gb)
            if size < image.disk_size_gb:
                raise bad_request(
                    "InvalidParameter",
                    f"diskSizeGB {size} is smaller than the image's {image.disk_size_gb} GB.",
                )
            os_type: str | None = "Linux"
        elif option.lower() == "empty":
            size = int(props.get("diskSizeGB") or 0)
            if size <= 0:
                raise bad_request("InvalidParameter", "diskSizeGB is required for an Empty disk.")
            os_type = None
        else:
            raise bad_request(
                "InvalidParameter",
                f"creationData.createOption {option!r} is not supported by the emulator "
                "(FromImage, Empty).",
            )
        zones = self._requested_zones(body.get("zones"))
        generation, security = self._requested_os_properties(props, image, option)
        sku = str((body.get("sku") or {}).get("name") or "Premium_LRS")
        tags = body.get("tags") or {}
        disk = Disk(
            subscription_id.lower(),
            resource_group,
            name,
            region,
            size,
            sku,
            os_type,
            image.id if image else None,
            {str(k): str(v) for k, v in tags.items()},
            str(uuid.uuid4()),
            self.clock.now(),
            provisioning_state="Creating",
            zones=zones,
            hyper_v_generation=generation,
            security_type=security,
        )
        if os_type is None:
            disk.checksum = self._checksum(disk)
        self.disks[disk.key] = disk

        def created(at: float) -> None:
            disk.provisioning_state = "Succeeded"
            self.emit(at, "disk.created", disk=disk.name, image=disk.image_id)

        def failed(at: float) -> None:
            disk.provisioning_state = "Failed"

        op = self._disk_operation(
            disk,
            "disk.create",
            [Phase("create", self._draw(d.disk_create), on_end=created, commit=True)],
            on_fail=failed,
        )
        return disk, op, True

    @staticmethod
    def _requested_zones(zones: Any) -> list[str]:
        """``zones`` of a disk PUT: absent or [] is a regional disk, ["1"] a zonal one."""
        if zones is None:
            return []
        if not isinstance(zones, list) or not all(isinstance(z, str) for z in zones):
            raise bad_request("InvalidParameter", f"zones must be a list of strings: {zones!r}")
        if len(zones) > 1 or any(z not in ("1", "2", "3") for z in zones):
            raise bad_request(
                "InvalidParameter", f"A disk is in one availability zone ('1'-'3'): {zones!r}"
            )
        return list(zones)

    @staticmethod
    def _requested_os_properties(
        props: dict[str, Any], image: ImageSpec | None, option: str
    ) -> tuple[str | None, str | None]:
        """(hyperVGeneration, securityProfile.securityType) of a new disk (README: disks).

        A disk from an image has the image's generation; naming another one is refused.
        Trusted Launch needs a V2 image and a FromImage disk."""
        generation = props.get("hyperVGeneration")
        security = (props.get("securityProfile") or {}).get("securityType")
        if image is not None:
            if generation is not None and str(generation) != image.hyper_v_generation:
                raise conflict(
                    "Conflict",
                    f"The disk has a different Hypervisor generation ['{generation}'] than the "
                    f"parent gallery image Hypervisor generation ['{image.hyper_v_generation}'].",
                )
            generation = image.hyper_v_generation
        elif generation is not None and str(generation) not in ("V1", "V2"):
            raise bad_request("InvalidParameter", f"hyperVGeneration {generation!r}")
        if security is None:
            return (None if generation is None else str(generation)), None
        if security != "TrustedLaunch":
            raise bad_request(
                "InvalidParameter",
                f"securityProfile.securityType {security!r} is not supported by the emulator "
                "(TrustedLaunch).",
            )
        if image is None:
            raise bad_request(
                "BadRequest",
                f"Security Type 'TrustedLaunch' is not supported for CreateOption '{option}'. "
                "Supported create options are FromImage, Import, ImportSecure, "
                "UploadPreparedSecure.",
            )
        if image.hyper_v_generation != "V2":
            raise bad_request(
                "BadRequest",
                "Use of TrustedLaunch setting is not supported for the provided image. Please "
                "select Trusted Launch Supported Gen2 OS Image. For more information, see "
                "https://aka.ms/TrustedLaunch-FAQ.",
            )
        return str(generation), "TrustedLaunch"

    def delete_disk(self, subscription_id: str, resource_group: str, name: str) -> Operation | None:
        """Start deleting a disk; None when it does not exist (ARM answers 204)."""
        self.region_of(subscription_id, resource_group)
        disk = self.disks.get(key_of(subscription_id, resource_group, name))
        if disk is None:
            return None
        if disk.managed_by:
            raise conflict(
                "OperationNotAllowed",
                f"Disk {name} is attached to VM {disk.managed_by}.",
            )
        if disk.busy_op is not None:
            raise conflict("OperationNotAllowed", f"Disk '{name}' is busy with another operation.")

        def deleted(at: float) -> None:
            self.disks.pop(disk.key, None)
            self.emit(at, "disk.deleted", disk=disk.name)

        return self._disk_operation(
            disk,
            "disk.delete",
            [
                Phase(
                    "delete",
                    self._draw(self.world.spec.durations.disk_delete),
                    on_end=deleted,
                    commit=True,
                )
            ],
        )

    def _disk_operation(
        self,
        disk: Disk,
        kind: str,
        phases: list[Phase],
        on_fail: Callable[[float], None] | None = None,
    ) -> Operation:
        def finish(at: float) -> None:
            disk.busy_op = None

        op = self._start_operation(
            kind,
            disk.name,
            disk.id,
            disk.subscription_id,
            disk.location,
            phases,
            on_fail=on_fail,
            on_finish=finish,
        )
        disk.busy_op = op.id
        return op

    def image(
        self, subscription_id: str, resource_group: str, gallery: str, definition: str, version: str
    ) -> ImageSpec:
        self.region_of(subscription_id, resource_group)
        for image in self.images.values():
            rid = parse_resource_id(image.id)
            if (
                rid.subscription_id == subscription_id.lower()
                and rid.resource_group.lower() == resource_group.lower()
                and [n.lower() for n in rid.names]
                == [gallery.lower(), definition.lower(), version.lower()]
            ):
                return image
        raise not_found(IMAGE_TYPE, f"{gallery}/{definition}/{version}", resource_group)

    def image_definition(
        self, subscription_id: str, resource_group: str, gallery: str, definition: str
    ) -> ImageSpec:
        """A version of the definition (they share its generation: see ``EmulatorSpec``)."""
        self.region_of(subscription_id, resource_group)
        for image in self.images.values():
            rid = parse_resource_id(image.id)
            if (
                rid.subscription_id == subscription_id.lower()
                and rid.resource_group.lower() == resource_group.lower()
                and [n.lower() for n in rid.names[:2]] == [gallery.lower(), definition.lower()]
            ):
                return image
        raise not_found(IMAGE_TYPE.rsplit("/", 1)[0], f"{gallery}/{definition}", resource_group)

    # ----------------------------------------------------------------- fault API actions

    def write_data_disk(self, name: str) -> Disk:
        """The fault API's 'a process wrote to this data disk': its checksum changes."""
        for disk in self.disks.values():
            if disk.name.lower() == name.lower() and disk.os_type is None:
                disk.generation += 1
                disk.checksum = self._checksum(disk)
                self.emit(self.clock.now(), "disk.written", disk=disk.name)
                return disk
        raise not_found(DISK_TYPE, name, "*")

    # ----------------------------------------------------------------- ground truth

    def _data_layout(self, vm: VirtualMachine) -> dict[int, tuple[str, str | None]]:
        return {
            a.lun: (self.disks[a.disk].name, self.disks[a.disk].checksum) for a in vm.data_disks
        }

    def data_disk_changes(self) -> list[dict[str, Any]]:
        """Every (VM, LUN) whose disk or content differs from the layout at reset."""
        changes = []
        for vm in self.vms.values():
            before = self.baseline.layout.get(vm.name, {})
            after = self._data_layout(vm)
            for lun in sorted(set(before) | set(after)):
                if before.get(lun) != after.get(lun):
                    changes.append(
                        {
                            "vm": vm.name,
                            "cluster": vm.cluster,
                            "lun": lun,
                            "before": before.get(lun),
                            "after": after.get(lun),
                        }
                    )
        return changes

    def leaked_disks(self) -> list[str]:
        """Unattached disks not tagged for keeping: what an orchestrator left behind."""
        return sorted(
            d.name for d in self.disks.values() if not d.managed_by and KEEP_TAG not in d.tags
        )
