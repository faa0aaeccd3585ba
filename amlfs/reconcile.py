"""Where a cluster stands, rebuilt from Azure (disk tags, the VMs' OS disks) and the journal.

Used when a cluster upgrade starts: an interrupted run is resumed (``ClusterUpgrade`` goes
forward if its nodes were verified on the release, else back to the old disks), and OS disks
an earlier run left behind (tagged by this tool, attached to nothing, not kept on purpose)
are found so they can be removed instead of leaking.

Used before a fleet run plans (``read_cluster``, read-only): a cluster left half-way by an
orchestrator that died is resumed whatever its MDS's image, its window or its wave say. What
says "half-way" is the world, not one VM: a journal not done, a VM not running, VMs on disks
of different runs or on different images, an OS disk this tool made for the release that is
attached to nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from amlfs.azure.gateway import ComputeGateway, DiskInfo, VmInfo
from amlfs.errors import AmlfsError
from amlfs.ids import KEEP_TAG, TAG_REPLACES, TAG_RUN, TAG_VM, new_os_disk_name
from amlfs.models import Cluster
from amlfs.store import Store

__all__ = [
    "ClusterPosition",
    "ClusterReading",
    "inspect_cluster",
    "interrupted_reason",
    "read_cluster",
]


@dataclass
class ClusterPosition:
    cluster: str
    journal: dict[str, Any] | None
    os_disks: dict[str, str] = field(default_factory=dict)  # VM -> OS disk name
    on_swapped_disk: list[str] = field(default_factory=list)  # VMs running a disk we made
    orphans: list[DiskInfo] = field(default_factory=list)  # ours, unattached, not kept
    # What was read (each VM with its power state; every disk of the resource group, by its
    # id in lower case), for a caller that goes on at once: read again, they would cost ARM's
    # budget twice.
    vms: dict[str, VmInfo] = field(default_factory=dict)
    disks: dict[str, DiskInfo] = field(default_factory=dict)

    @property
    def interrupted(self) -> bool:
        return self.journal is not None and self.journal.get("phase") not in (None, "done")

    def describe(self) -> str:
        if self.interrupted:
            assert self.journal is not None
            return (
                f"run {self.journal.get('run_id')} interrupted at {self.journal.get('phase')}; "
                f"{len(self.on_swapped_disk)} VM(s) on new disks"
            )
        if self.orphans:
            return f"{len(self.orphans)} OS disk(s) left by an earlier run"
        return "clean"


def inspect_cluster(cluster: Cluster, gateway: ComputeGateway, store: Store) -> ClusterPosition:
    """Read-only: the journal, which OS disk each VM runs, and disks left unattached.

    One disk list of the resource group, the rest GETs by name. The list stays because only a
    list sees an OS disk this tool made for a release it no longer knows: a disk's name comes
    from its VM and release (``new_os_disk_name``), and a run that died before it journaled,
    or an orchestrator on another state store, leaves one under a name no journal holds. It
    is one of Compute's high-cost GETs (``HighCostGet3Min`` 240, ``HighCostGet30Min`` 1,920
    per subscription and region, and a spent window answers 429 for the rest of it, up to 30
    minutes): the gateway paces it per subscription (``max_disk_lists_per_s``), so a fleet
    starting many clusters at once queues its lists instead of spending the window."""
    journal = store.get("clusters", cluster.name, "run")
    position = ClusterPosition(cluster.name, journal)
    vms = {n.name for n in cluster.nodes}
    disks = gateway.list_disks(cluster.resource_group)
    position.disks = {d.id.lower(): d for d in disks}
    ours = {d.name: d for d in disks if d.tags.get(TAG_VM) in vms}
    for node in cluster.nodes:
        vm = position.vms[node.name] = gateway.vm_info(cluster.resource_group, node.name)
        position.os_disks[node.name] = vm.os_disk_name
        disk = ours.get(vm.os_disk_name)
        if disk is not None and TAG_REPLACES in disk.tags:
            position.on_swapped_disk.append(node.name)
    referenced: set[str] = set()
    if position.interrupted and journal is not None:
        for entry in (journal.get("vms") or {}).values():
            referenced.update({entry.get("old_disk", ""), entry.get("new_disk", "")})
    for disk in ours.values():
        if disk.managed_by or KEEP_TAG in disk.tags or disk.name in referenced:
            continue
        position.orphans.append(disk)
    return position


@dataclass(frozen=True)
class ClusterReading:
    """What a fleet run's planning needs of one cluster, read without changing anything."""

    cluster: str
    release: str | None  # the gallery version the MDS's OS disk was made from (None: unknown)
    interrupted: str | None  # what says an earlier run stopped half-way (None: at rest)
    error: str | None = None  # Azure could not be read (release None; only the journal judged)


def new_disk_name(vm: str, version: str) -> str:
    """The name ``ClusterUpgrade`` gives the OS disk it makes for ``vm`` and ``version``."""
    return new_os_disk_name(vm, version)


def _version(image_id: str | None) -> str | None:
    return image_id.rsplit("/", 1)[-1] if image_id else None


def _names(vms: list[str]) -> str:
    return ", ".join(vms[:3]) + (f" and {len(vms) - 3} more" if len(vms) > 3 else "")


def read_cluster(
    cluster: Cluster,
    gateway: ComputeGateway,
    store: Store,
    *,
    release_version: str | None = None,
) -> ClusterReading:
    """Read-only: the MDS's release, and whether the cluster was left half-way.

    GETs by name only (each VM with its instance view, each VM's OS disk and, when
    ``release_version`` is given and nothing else was found, the disk this tool would have
    made for each VM): no disk list of the resource group. An ARM read that fails gives
    ``error``, and a verdict from the journal alone: the upgrade itself then reports it.
    """
    found: list[str] = []
    journal = store.get("clusters", cluster.name, "run")
    if journal is not None and journal.get("phase") not in (None, "done"):
        found.append(f"journal of run {journal.get('run_id')} at {journal.get('phase')}")
    rg = cluster.resource_group
    try:
        vms = [gateway.vm_info(rg, node.name) for node in cluster.nodes]
        disks = {vm.name: gateway.get_disk(rg, vm.os_disk_name) for vm in vms}
    except AmlfsError as err:  # the journal's word stands without Azure's
        return ClusterReading(cluster.name, None, "; ".join(found) or None, error=str(err))
    mds = next((vm for vm in vms if vm.name == cluster.mds.name), vms[0])
    mds_disk = disks.get(mds.name)
    release = _version(mds_disk.image_id) if mds_disk is not None else None

    stopped = [
        f"{vm.name} is {vm.power_state or 'in an unknown power state'}"
        for vm in vms
        if vm.power_state != "running"
    ]
    if stopped:
        found.append(
            "VM " + "; ".join(stopped[:3]) + (f" (+{len(stopped) - 3})" if len(stopped) > 3 else "")
        )
    missing = [vm.name for vm in vms if disks[vm.name] is None]
    if missing:
        found.append(f"OS disk not found for {_names(missing)}")
    # Which run made each VM's OS disk (None: not this tool): after a whole upgrade or a
    # whole rollback every VM runs a disk of the same origin.
    origin: dict[str | None, list[str]] = {}
    images: dict[str | None, list[str]] = {}
    for vm in vms:
        disk = disks[vm.name]
        if disk is None:
            continue
        made_by = (
            disk.tags.get(TAG_RUN) if (TAG_REPLACES in disk.tags or TAG_RUN in disk.tags) else None
        )
        origin.setdefault(made_by, []).append(vm.name)
        images.setdefault(_version(disk.image_id), []).append(vm.name)
    if len(origin) > 1:
        found.append(
            "VMs on OS disks of different runs: "
            + "; ".join(
                f"{_names(names)} on {f'run {run}' if run else 'disks not made by this tool'}"
                for run, names in origin.items()
            )
        )
    if len(images) > 1:
        found.append(
            "VMs on mixed images: "
            + ", ".join(f"{image or 'unknown'} ({len(names)})" for image, names in images.items())
        )
    if not found and release_version is not None:
        for vm in vms:
            name = new_disk_name(vm.name, release_version)
            if name == vm.os_disk_name:
                continue
            try:
                disk = gateway.get_disk(rg, name)
            except AmlfsError as err:
                return ClusterReading(cluster.name, release, None, error=str(err))
            if (
                disk is not None
                and disk.tags.get(TAG_VM) == vm.name
                and not disk.managed_by
                and KEEP_TAG not in disk.tags
            ):
                run = disk.tags.get(TAG_RUN)
                found.append(f"OS disk {name} made by run {run} is attached to nothing")
    return ClusterReading(cluster.name, release, "; ".join(found) or None)


def interrupted_reason(
    cluster: Cluster,
    gateway: ComputeGateway,
    store: Store,
    *,
    release_version: str | None = None,
) -> str | None:
    """What says an earlier run left ``cluster`` half-way, or None (``read_cluster``)."""
    return read_cluster(cluster, gateway, store, release_version=release_version).interrupted
