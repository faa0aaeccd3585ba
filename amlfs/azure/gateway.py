"""The ARM calls an OS disk swap needs, over ``azure-mgmt-compute``, with errors mapped.

* Every VM update goes through ``update_vm``, the one guard that refuses a body whose
  ``storageProfile.dataDisks`` differs from the VM's current one, before anything is sent.
* azure-core errors become ``RetryableAzureError`` (429, 5xx, a 409 of a VM or disk busy with
  another operation, transport errors, a long-running operation that did not finish in time)
  or ``PermanentAzureError`` (the rest, other 409s included: PropertyChangeNotAllowed...). The
  SDK's own retry policy honours ``Retry-After``; callers retry what is left with backoff on
  the clock.
* A replacement OS disk copies the zone, size, SKU, generation and security type of the one
  it replaces (``create_os_disk(like=...)``): Azure swaps in nothing else.
* Long-running operations are awaited with a deadline in sim seconds (``Clock``): a hung
  operation becomes a retryable error instead of a stuck orchestrator.
"""

from __future__ import annotations

import copy
import datetime as dt
import http.client
import re
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from amlfs.clock import Clock, Pacer
from amlfs.errors import (
    AzureError,
    DataDiskGuardError,
    PermanentAzureError,
    RetryableAzureError,
)
from azure.core.exceptions import (
    AzureError as SdkAzureError,
)
from azure.core.exceptions import (
    HttpResponseError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.core.polling import LROPoller
from azure.mgmt.compute import ComputeManagementClient
from azure.mgmt.compute.models import (
    CreationData,
    DataDisk,
    Disk,
    DiskCreateOption,
    DiskProperties,
    DiskSecurityProfile,
    DiskSku,
    ImageDiskReference,
    OSDisk,
    StorageProfile,
    VirtualMachine,
)
from azure.mgmt.core.polling.arm_polling import ARMPolling

__all__ = [
    "ComputeGateway",
    "DiskInfo",
    "OperationTimes",
    "VmInfo",
    "arm_budget_of",
    "data_disk_layout",
    "is_busy_conflict",
    "map_azure_error",
]

T = TypeVar("T")

# What the HTTP stack under azure-core can raise past it when a connection dies under a
# response being read (seen at fleet scale: "ValueError: I/O operation on closed file" from
# http.client). The request is retried like any transient error: every caller re-reads the
# truth from Azure before it acts again.
TRANSPORT_ODDITIES: tuple[type[Exception], ...] = (ValueError, http.client.HTTPException)


def transport_error(err: Exception, what: str) -> RetryableAzureError:
    return RetryableAzureError(
        f"{what}: the connection failed under the request ({type(err).__name__}: {err})",
        code="TransportError",
    )


# 409 Conflict is "not allowed in the resource's current state" (learn.microsoft.com/azure/
# azure-resource-manager/troubleshooting/common-deployment-errors): only a state that another
# operation is about to end is worth another try. These codes say so by themselves: another
# operation is in progress (AnotherOperationInProgress, same page), a more recent operation
# preempted this one (OperationPreempted), "A retryable error occurred" (RetryableError, with
# RetryableErrorDueToAnotherOperation as its detail). Sources: amlfs_sim/arm/README.md, "409".
BUSY_CONFLICT_CODES = {
    "anotheroperationinprogress",
    "operationpreempted",
    "retryableerror",
    "retryableerrorduetoanotheroperation",
}
# Conflict and OperationNotAllowed are umbrella codes: busy only when the message says another
# operation holds the resource ("... since the VM is busy with operation ...", "Another
# operation ... is in progress", "... is currently being updated"). The rest, like
# PropertyChangeNotAllowed ("Swapping OS Disk is not supported since HyperVisor property on
# the OSDisk and VM do not match"), "The operation requires the VM to be running" or "the VM is
# marked for deletion", will answer the same to every retry.
BUSY_UMBRELLA_CODES = {"conflict", "operationnotallowed"}
BUSY_MESSAGE = re.compile(
    r"another operation|operation[^.]* in progress|is busy|currently being (updated|modified)"
    r"|retry after it completes",
    re.IGNORECASE,
)


def is_busy_conflict(code: str | None, message: str) -> bool:
    """Whether a 409 says the resource is busy with another operation (retry once it ends)."""
    code = (code or "").lower()
    if code in BUSY_CONFLICT_CODES:
        return True
    return code in BUSY_UMBRELLA_CODES and BUSY_MESSAGE.search(message) is not None


# Codes of a failed long-running operation that are worth another try.
RETRYABLE_CODES = {
    "internalservererror",
    "internalexecutionerror",
    "operationpreempted",
    "retryableerror",
    "toomanyrequests",
    "serviceunavailable",
    "operationnotallowed",  # throttling answered as an operation error
    "conflictingoperation",
    "requesttimeout",
    "gatewaytimeout",
}


def map_azure_error(err: Exception, what: str) -> AzureError:
    """The project's error for an azure-core exception, naming the operation."""
    if isinstance(err, AzureError):
        return err
    if isinstance(err, ServiceRequestError | ServiceResponseError):
        return RetryableAzureError(f"{what}: connection failed: {type(err).__name__}")
    if isinstance(err, HttpResponseError):
        status = err.status_code
        code = None
        if err.error is not None:
            code = err.error.code
        message = err.error.message if err.error is not None and err.error.message else ""
        text = f"{what}: {code or 'error'}{f' ({status})' if status else ''}: {message}".rstrip(
            ": "
        )
        # A 409 is retried only when the VM or disk is busy with another operation: a
        # permanent one (PropertyChangeNotAllowed...) fails at once, since each retry in the
        # customer's downtime costs the customer.
        retryable = (
            status in (408, 429)
            or (status == 409 and is_busy_conflict(code, message))
            or (status is not None and status >= 500)
            or (status in (None, 200) and (code or "").lower() in RETRYABLE_CODES)
        )
        kind = RetryableAzureError if retryable else PermanentAzureError
        return kind(text, code=code, status=status)
    if isinstance(err, SdkAzureError):
        return RetryableAzureError(f"{what}: {type(err).__name__}: {err.message}")
    raise err


def arm_budget_of(method: str) -> str:
    """Which of ARM's per-subscription budgets an HTTP request spends: ``reads`` (GET),
    ``deletes`` (DELETE) or ``writes`` (PUT, PATCH, POST)."""
    method = method.upper()
    if method in ("GET", "HEAD"):
        return "reads"
    return "deletes" if method == "DELETE" else "writes"


def data_disk_layout(disks: list[DataDisk] | None) -> list[tuple[int, str]]:
    """(lun, managed disk id) pairs, the identity of a VM's data disks."""
    layout = []
    for disk in disks or []:
        disk_id = disk.managed_disk.id if disk.managed_disk is not None else None
        layout.append((int(disk.lun), (disk_id or disk.name or "").lower()))
    return sorted(layout)


class OperationTimes:
    """How long each kind of long-running operation took lately, to skip pointless polls.

    Polling an operation that cannot be done yet is the orchestrator's largest cost at fleet
    scale (and counts against Azure's GetOperation limit). Once ``min_samples`` operations of a
    kind have been seen, the first poll of the next one waits ``margin`` x the ``quantile`` of
    the recent durations; later polls keep the normal interval. An operation faster than that
    is seen at most ``margin`` x quantile late, so the detection latency of a typical one is
    unchanged. Background operations (outside the customer's downtime, where a few seconds of
    lag cost nothing) wait for the ``background_quantile`` instead.
    """

    def __init__(
        self,
        *,
        window: int = 64,
        min_samples: int = 8,
        quantile: float = 0.1,
        margin: float = 0.95,
        background_quantile: float = 0.5,
    ) -> None:
        self.window = window
        self.min_samples = min_samples
        self.quantile = quantile
        self.margin = margin
        self.background_quantile = background_quantile
        self._seen: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def observe(self, kind: str, seconds: float) -> None:
        with self._lock:
            self._seen.setdefault(kind, deque(maxlen=self.window)).append(seconds)

    def recent(self, kind: str) -> list[float]:
        """The durations learned lately for ``kind``, oldest first."""
        with self._lock:
            return list(self._seen.get(kind, ()))

    def first_poll_after(self, kind: str, *, background: bool = False) -> float:
        """Sim seconds to wait before the first poll of a new operation of ``kind``."""
        with self._lock:
            seen = sorted(self._seen.get(kind, ()))
        if len(seen) < self.min_samples:
            return 0.0
        if background:
            return seen[int(self.background_quantile * (len(seen) - 1))]
        return self.margin * seen[int(self.quantile * (len(seen) - 1))]


def operation_seconds(body: Any) -> float | None:
    """How long ARM says an operation ran (``endTime - startTime`` of its status), or None.

    Compute's Azure-AsyncOperation status carries both times; they are the service's own, so
    they do not grow when the orchestrator is slow to look (its polls late under load).
    """
    if not isinstance(body, dict):
        return None
    try:
        start = _iso_time(body["startTime"])
        end = _iso_time(body["endTime"])
    except (KeyError, TypeError, ValueError):
        return None
    seconds = (end - start).total_seconds()
    return seconds if seconds >= 0 else None


def _iso_time(text: str) -> dt.datetime:
    # Azure writes 7 fractional digits and sometimes "Z"; fromisoformat wants at most 6.
    text = text.strip().replace("Z", "+00:00")
    match = _FRACTION.search(text)
    if match is not None:
        text = text[: match.start()] + match.group(0)[:7] + text[match.end() :]
    when = dt.datetime.fromisoformat(text)
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)


_FRACTION = re.compile(r"\.\d+")


class _FirstPollLater(ARMPolling):
    """ARM polling whose first poll waits ``first_delay`` real seconds (or Retry-After).

    Azure's Retry-After is the least a client should wait. azure-core uses it instead of the
    interval, so a longer interval asked for a background operation would be lost: with
    ``at_least_interval`` the wait is the larger of the two. azure-core also asks for the
    status once at once, before any wait: with a first delay that request is skipped (an
    operation that cannot be done yet is only a request that costs CPU on both sides).
    ``server_seconds``: the operation's duration as ARM reported it when it ended.
    ``final_get=False``: no GET of the resource once the operation succeeded (azure-core
    always makes one after a PUT): for a caller that reads the resource itself next, that
    GET is a read of ARM's budget spent twice. The poller's result is then the operation's
    status body, not the resource.
    """

    def __init__(
        self,
        interval: float,
        first_delay: float,
        base_url: str,
        *,
        at_least_interval: bool,
        lro_options: dict[str, str] | None = None,
        pacer: Pacer | None = None,
        final_get: bool = True,
    ) -> None:
        super().__init__(
            interval, lro_options=lro_options, path_format_arguments={"endpoint": base_url}
        )
        self._final_get = final_get
        self._first_delay = first_delay
        self._interval = interval
        self._at_least_interval = at_least_interval
        self._pacer = pacer
        self.server_seconds: float | None = None

    def initialize(self, client: Any, initial_response: Any, deserialization_callback: Any) -> None:
        super().initialize(client, initial_response, deserialization_callback)
        if not self._final_get:
            # azure-core asks the operation (chosen in initialize) for the final GET's URL
            # once the status says Succeeded (LROBasePolling._poll): none.
            self._operation.get_final_get_url = lambda _response: None  # type: ignore[method-assign,assignment]

    def _extract_delay(self) -> float:
        delay = float(super()._extract_delay())
        return max(delay, self._interval) if self._at_least_interval else delay

    def _delay(self) -> None:
        first, self._first_delay = self._first_delay, 0.0
        if first > 0:
            self._sleep(max(first, self._extract_delay()))
        else:
            super()._delay()
        if self._pacer is not None:
            self._pacer.wait()

    def _poll(self) -> None:
        if self._first_delay > 0 and not self.finished():
            # azure-core's own _poll would ask for the status now, before any wait.
            self._delay()
        super()._poll()

    def update_status(self) -> None:
        super().update_status()
        if self.finished() and self.server_seconds is None:
            try:
                body = self._pipeline_response.http_response.json()
            except (AttributeError, ValueError):
                return
            self.server_seconds = operation_seconds(body)


@dataclass(frozen=True)
class DiskInfo:
    id: str
    name: str
    image_id: str | None
    tags: dict[str, str]
    managed_by: str | None
    provisioning_state: str | None
    location: str
    size_gb: int | None
    sku: str | None
    # What a replacement OS disk must copy to be swapped in (os-disk-swap: same size; the
    # VM's zone, hyperVGeneration and security type): () is a regional disk.
    zones: tuple[str, ...] = ()
    hyper_v_generation: str | None = None
    security_type: str | None = None


@dataclass(frozen=True)
class VmInfo:
    id: str
    name: str
    location: str
    os_disk_id: str
    os_disk_name: str
    power_state: str | None  # running, stopped, deallocated... (from the instance view)
    data_disks: tuple[tuple[int, str], ...]


def _unlike(disk: DiskInfo, like: DiskInfo) -> bool:
    """Whether ``disk`` differs from ``like`` in what an OS disk swap needs to match."""
    return (
        tuple(disk.zones) != tuple(like.zones)
        or (like.size_gb is not None and disk.size_gb != like.size_gb)
        or (
            like.hyper_v_generation is not None
            and disk.hyper_v_generation != like.hyper_v_generation
        )
        or disk.security_type != like.security_type
    )


def _disk_info(disk: Disk) -> DiskInfo:
    image = None
    creation = disk.creation_data
    if creation is not None and creation.gallery_image_reference is not None:
        image = creation.gallery_image_reference.id
    return DiskInfo(
        id=str(disk.id),
        name=str(disk.name),
        image_id=image,
        tags=dict(disk.tags or {}),
        managed_by=disk.managed_by,
        provisioning_state=disk.provisioning_state,
        location=str(disk.location),
        size_gb=disk.disk_size_gb,
        sku=disk.sku.name if disk.sku is not None else None,
        zones=tuple(disk.zones or ()),
        hyper_v_generation=disk.hyper_v_generation,
        security_type=(
            disk.security_profile.security_type if disk.security_profile is not None else None
        ),
    )


class ComputeGateway:
    """Disks and VMs of one subscription, through one ``ComputeManagementClient``."""

    def __init__(
        self,
        compute: ComputeManagementClient,
        clock: Clock,
        *,
        lro_timeout_s: float = 1800.0,
        slow_poll_s: float = 10.0,
        times: OperationTimes | None = None,
        polls: Pacer | None = None,
        background_polls: Pacer | None = None,
        disk_lists: Pacer | None = None,
    ) -> None:
        self.compute = compute
        self.clock = clock
        self.lro_timeout_s = lro_timeout_s
        self.times = times if times is not None else OperationTimes()
        # Shared by every gateway of the process: status polls of operations in the customer's
        # downtime, and of background ones (disks), each paced on its own.
        self.polls = polls
        self.background_polls = background_polls
        # A disk list is one of Compute's high-cost GETs (HighCostGet3Min, HighCostGet30Min,
        # per subscription and region); a spent window answers 429 for the rest of it.
        self.disk_lists = disk_lists
        # Disk operations run outside the customer's downtime: poll them less often (polling
        # the SDK's LROs was the orchestrator's largest CPU cost in the fleet profile).
        self.slow_poll = clock.to_real(slow_poll_s)
        self.poll = float(compute._config.polling_interval)

    # ------------------------------------------------------------------ plumbing

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except (SdkAzureError, HttpResponseError) as err:
            raise map_azure_error(err, what) from err
        except TRANSPORT_ODDITIES as err:
            raise transport_error(err, what) from err

    def _wait(self, what: str, poller: LROPoller[T], timeout_s: float | None = None) -> T:
        limit = self.lro_timeout_s if timeout_s is None else timeout_s
        try:
            poller.wait(timeout=self.clock.to_real(limit))
            if not poller.done():
                raise RetryableAzureError(
                    f"{what}: still running after {limit:.0f} s", code="OperationTimedOut"
                )
            return poller.result()
        except (SdkAzureError, HttpResponseError) as err:
            raise map_azure_error(err, what) from err
        except TRANSPORT_ODDITIES as err:
            raise transport_error(err, what) from err

    def _lro(
        self,
        what: str,
        kind: str,
        begin: Callable[[_FirstPollLater], LROPoller[T]],
        timeout_s: float | None,
        *,
        background: bool = False,
        action: bool = False,
        final_get: bool = True,
    ) -> T:
        """Start an operation of ``kind`` with ``begin(polling)``, wait for it, learn its time.

        A ``background`` operation (outside the customer's downtime) is polled every
        ``slow_poll`` and first at its learned median. The first poll never waits more than half
        the caller's timeout: a short wait (a retry of an operation that is already done) still
        sees the result. An ``action`` (a POST with no result: power off, start) ends when its
        operation says Succeeded, without the extra GET of its Location; so does a PUT with
        ``final_get=False`` (its result is then not the resource).
        """
        limit = self.lro_timeout_s if timeout_s is None else timeout_s
        first = min(self.times.first_poll_after(kind, background=background), limit / 2)
        polling = _FirstPollLater(
            self.slow_poll if background else self.poll,
            self.clock.to_real(first),
            str(self.compute._config.base_url),
            at_least_interval=background,
            lro_options={"final-state-via": "azure-async-operation"} if action else None,
            pacer=self.background_polls if background else self.polls,
            final_get=final_get,
        )
        started = self.clock.now()
        result = self._wait(what, self._call(what, lambda: begin(polling)), timeout_s)
        # Learn from ARM's own start and end when it gives them: the time we measured includes
        # our own lateness, and under load (or after our first poll waited on an estimate
        # already too long) that fed back into ever later first polls: in one 1,000-cluster
        # run the estimates grew past 10 minutes and the fleet sat idle waiting for them.
        took = polling.server_seconds
        if took is None:
            took = self.clock.now() - started
        # An operation answered at once (already stopped, a retry) says nothing of how long
        # the real work takes.
        if took >= self.poll / self.clock.to_real(1.0):
            self.times.observe(kind, took)
        return result

    # ------------------------------------------------------------------ reads

    def get_vm(self, resource_group: str, name: str) -> VirtualMachine:
        return self._call(
            f"get VM {name}", lambda: self.compute.virtual_machines.get(resource_group, name)
        )

    def vm_info(self, resource_group: str, name: str) -> VmInfo:
        """The VM and its power state, in one request (``$expand=instanceView``)."""
        vm = self._call(
            f"get VM {name}",
            lambda: self.compute.virtual_machines.get(resource_group, name, expand="instanceView"),
        )
        power = None
        view = vm.instance_view
        for status in (view.statuses if view is not None else None) or []:
            if status.code and status.code.startswith("PowerState/"):
                power = status.code.split("/", 1)[1]
        storage = vm.storage_profile
        if not isinstance(storage, StorageProfile) or not isinstance(storage.os_disk, OSDisk):
            # Seen once in a chaos run (a body whose storage profile came back from the
            # SDK's deserializer as a plain dict): read again rather than crash the caller.
            raise RetryableAzureError(
                f"get VM {name}: the answer has no readable storageProfile.osDisk",
                code="MalformedResponse",
            )
        managed = storage.os_disk.managed_disk
        os_disk_id = str(managed.id if managed is not None else "")
        return VmInfo(
            id=str(vm.id),
            name=str(vm.name),
            location=str(vm.location),
            os_disk_id=os_disk_id,
            os_disk_name=os_disk_id.rsplit("/", 1)[-1],
            power_state=power,
            data_disks=tuple(data_disk_layout(storage.data_disks)),
        )

    def get_disk(self, resource_group: str, name: str) -> DiskInfo | None:
        try:
            disk = self.compute.disks.get(resource_group, name)
        except ResourceNotFoundError:
            return None
        except (SdkAzureError, HttpResponseError) as err:
            raise map_azure_error(err, f"get disk {name}") from err
        return _disk_info(disk)

    def list_disks(self, resource_group: str) -> list[DiskInfo]:
        """Every disk of the group: a high-cost GET, paced by ``disk_lists``. A GET by name
        (``get_disk``) is the cheap read whenever the name is known."""
        if self.disk_lists is not None:
            self.disk_lists.wait()
        return self._call(
            f"list disks of {resource_group}",
            lambda: [
                _disk_info(d) for d in self.compute.disks.list_by_resource_group(resource_group)
            ],
        )

    # ------------------------------------------------------------------ writes

    def create_os_disk(
        self,
        resource_group: str,
        name: str,
        *,
        location: str,
        image_version_id: str,
        sku: str | None,
        tags: dict[str, str],
        like: DiskInfo | None = None,
        timeout_s: float | None = None,
    ) -> DiskInfo:
        """Create (or find, if a previous attempt made it) an OS disk from a gallery image.

        ``like``: the OS disk it replaces. The new disk copies its zone, size, SKU (unless
        ``sku`` names one), hyperVGeneration and security type, without which Azure refuses
        the swap: a disk outside the VM's zone cannot be attached, the current and the
        replacement OS disk must be the same size, and the generation and security type must
        be the VM's (os-disk-swap, amlfs_sim/arm/README.md). A disk of that name left by an
        earlier attempt that differs from it, unattached, is made again."""
        existing = self.get_disk(resource_group, name)
        if (
            existing is not None
            and existing.provisioning_state == "Failed"
            and not existing.managed_by
        ):
            # A create that failed leaves the disk behind, unusable: start over.
            self.delete_disk(resource_group, name, timeout_s)
            existing = None
        if existing is not None and existing.provisioning_state == "Succeeded":
            if (existing.image_id or "").lower() != image_version_id.lower():
                raise PermanentAzureError(
                    f"disk {name} exists from another image ({existing.image_id})",
                    code="DiskExists",
                )
            if like is None or existing.managed_by or not _unlike(existing, like):
                return existing
            # Made by an attempt that did not copy the old disk, it cannot be swapped in; it
            # is attached to nothing: make it again.
            self.delete_disk(resource_group, name, timeout_s)
        if like is not None and sku is None:
            sku = like.sku
        body = Disk(
            location=location,
            sku=DiskSku(name=sku) if sku else None,
            zones=list(like.zones) if like is not None and like.zones else None,
            properties=DiskProperties(
                creation_data=CreationData(
                    create_option=DiskCreateOption.FROM_IMAGE,
                    gallery_image_reference=ImageDiskReference(id=image_version_id),
                ),
                disk_size_gb=like.size_gb if like is not None else None,
                hyper_v_generation=like.hyper_v_generation if like is not None else None,
                security_profile=(
                    DiskSecurityProfile(security_type=like.security_type)
                    if like is not None and like.security_type
                    else None
                ),
            ),
            tags=tags,
        )
        what = f"create OS disk {name}"
        created = self._lro(
            what,
            "disk.create",
            lambda polling: self.compute.disks.begin_create_or_update(
                resource_group, name, body, polling=polling
            ),
            timeout_s,
            background=True,
        )
        disk = _disk_info(created)
        if disk.provisioning_state not in (None, "Succeeded"):
            raise RetryableAzureError(f"{what}: disk is {disk.provisioning_state}")
        return disk

    def delete_disk(self, resource_group: str, name: str, timeout_s: float | None = None) -> None:
        self._lro(
            f"delete disk {name}",
            "disk.delete",
            lambda polling: self.compute.disks.begin_delete(resource_group, name, polling=polling),
            timeout_s,
            background=True,
        )

    def tag_disk(self, resource_group: str, name: str, tags: dict[str, str]) -> None:
        what = f"tag disk {name}"
        poller = self._call(
            what,
            lambda: self.compute.disks.begin_update(
                resource_group, name, {"tags": tags}, polling_interval=self.slow_poll
            ),
        )
        self._wait(what, poller)

    def power_off(self, resource_group: str, name: str, timeout_s: float | None = None) -> None:
        """Stop the VM without deallocating it (the swap keeps the VM's host)."""
        self._lro(
            f"power off VM {name}",
            "vm.power_off",
            lambda polling: self.compute.virtual_machines.begin_power_off(
                resource_group, name, skip_shutdown=False, polling=polling
            ),
            timeout_s,
            action=True,
        )

    def start(self, resource_group: str, name: str, timeout_s: float | None = None) -> None:
        self._lro(
            f"start VM {name}",
            "vm.start",
            lambda polling: self.compute.virtual_machines.begin_start(
                resource_group, name, polling=polling
            ),
            timeout_s,
            action=True,
        )

    def update_vm(
        self,
        resource_group: str,
        current: VirtualMachine,
        desired: VirtualMachine,
        timeout_s: float | None = None,
    ) -> None:
        """PUT ``desired``; refused before sending if its data disks differ from ``current``.

        Returns when Azure says the operation succeeded, without reading the VM back (one
        read of the subscription's ARM budget per VM: the saga reads the VM, with its power
        state, right after)."""
        before = data_disk_layout(
            current.storage_profile.data_disks if current.storage_profile else None
        )
        after = data_disk_layout(
            desired.storage_profile.data_disks if desired.storage_profile else None
        )
        if before != after:
            raise DataDiskGuardError(
                f"refusing to update VM {current.name}: dataDisks would change from {before} "
                f"to {after}; customer data disks are never modified"
            )
        name = str(current.name)
        self._lro(
            f"update VM {name}",
            "vm.put",
            lambda polling: self.compute.virtual_machines.begin_create_or_update(
                resource_group, name, desired, polling=polling
            ),
            timeout_s,
            final_get=False,
        )

    def swap_os_disk(
        self, resource_group: str, name: str, new_disk: DiskInfo, timeout_s: float | None = None
    ) -> None:
        """Point the VM's OS disk at ``new_disk`` (a running VM is stopped, swapped and booted
        by this one PUT); data disks are carried unchanged."""
        current = self.get_vm(resource_group, name)
        desired = copy.deepcopy(current)
        storage = desired.storage_profile
        assert storage is not None
        assert storage.os_disk is not None
        assert storage.os_disk.managed_disk is not None
        if (storage.os_disk.managed_disk.id or "").lower() == new_disk.id.lower():
            return  # already swapped (a retry after a lost answer)
        storage.os_disk.managed_disk.id = new_disk.id
        storage.os_disk.name = new_disk.name
        self.update_vm(resource_group, current, desired, timeout_s)

    def describe(self) -> dict[str, Any]:
        return {"lro_timeout_s": self.lro_timeout_s}
