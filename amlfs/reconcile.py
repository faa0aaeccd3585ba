"""Where a cluster stands, rebuilt from Azure (disk tags, the VMs' OS disks) and the journal.

Used when a cluster upgrade starts: an interrupted run is resumed (``ClusterUpgrade`` goes
forward if its nodes were verified on the release, else back to the old disks), and OS disks
an earlier run left behind (tagged by this tool, attached to nothing, not kept on purpose)
are found so they can be removed instead of leaking.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from amlfs.azure.gateway import ComputeGateway, DiskInfo
from amlfs.models import Cluster
from amlfs.store import StateStore

__all__ = ["ClusterPosition", "inspect_cluster"]

TAG_VM = "amlfs-vm"
TAG_REPLACES = "amlfs-replaces"
TAG_RELEASE = "amlfs-release"
KEEP_TAG = "amlfs-keep-until"


@dataclass
class ClusterPosition:
    cluster: str
    journal: dict[str, Any] | None
    os_disks: dict[str, str] = field(default_factory=dict)  # VM -> OS disk name
    on_swapped_disk: list[str] = field(default_factory=list)  # VMs running a disk we made
    orphans: list[DiskInfo] = field(default_factory=list)  # ours, unattached, not kept

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


def inspect_cluster(
    cluster: Cluster, gateway: ComputeGateway, store: StateStore
) -> ClusterPosition:
    """Read-only: the journal, which OS disk each VM runs, and disks left unattached."""
    journal = store.get("clusters", cluster.name, "run")
    position = ClusterPosition(cluster.name, journal)
    vms = {n.name for n in cluster.nodes}
    disks = gateway.list_disks(cluster.resource_group)
    ours = {d.name: d for d in disks if d.tags.get(TAG_VM) in vms}
    for node in cluster.nodes:
        vm = gateway.vm_info(cluster.resource_group, node.name)
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
