"""The Lustre side of the emulated fleet, driven by the ARM backend's events.

A VM's OS disk carries files (``DiskContent``): the disks the fleet starts with hold the
cluster's config; a disk created from a gallery image holds only what the image has. When a
VM boots, its node boots from whatever OS disk is attached; when it stops, the node goes down.
Timed Lustre transitions (recovery, evictions) are applied in sim-time order by ``tick``.
"""

from __future__ import annotations

import heapq
import ipaddress
from collections.abc import Callable
from typing import Any

from amlfs.models import Role
from amlfs_sim.arm.backend import ArmBackend, Event
from amlfs_sim.faults import FaultMode
from amlfs_sim.nodes.lustre import (
    FSNAME,
    ClusterSim,
    DiskContent,
    HsmWorkload,
    LustreNode,
    Target,
    cluster_files,
    derive_hostid,
)

__all__ = ["NodeFleet"]

NodeStateListener = Callable[[str, bool], None]
NOT_RUNNING = {"stopping", "stopped", "deallocating", "deallocated"}


class NodeFleet:
    """Every VM of the world as a Lustre node, plus the customers of every cluster."""

    def __init__(self, backend: ArmBackend) -> None:
        self.backend = backend
        self.world = backend.world
        self.listeners: list[NodeStateListener] = []  # (node name, reachable) for the SSH server
        self.clusters: dict[str, ClusterSim] = {}
        self.nodes: dict[str, LustreNode] = {}
        self.addresses: dict[str, LustreNode] = {}
        self._build()
        self.contents: dict[str, DiskContent] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._heap_seq = 0
        self.reset()
        backend.listeners.append(self.on_event)
        backend.reset_hooks.append(self.reset)
        backend.tick_hooks.append(self.tick)

    # ------------------------------------------------------------------ topology

    def _build(self) -> None:
        used = {n.address for _, n in self.world.fleet.iter_nodes() if n.address is not None}
        spare = (ipaddress.IPv4Address("127.200.0.1") + i for i in range(1 << 22))
        for index, cluster in enumerate(self.world.fleet.clusters):
            copies = self.world.spec.hsm_copies(cluster.name)
            sim = ClusterSim(
                cluster,
                index,
                self.world.spec.clients_per_cluster,
                self.backend.emit,
                seed=self.backend.seed,
                hsm=HsmWorkload(
                    requests=copies.requests,
                    copy_low_s=copies.copy_s.low,
                    copy_high_s=copies.copy_s.high,
                    bytes_per_s=copies.bytes_per_s,
                ),
            )
            osts = 0
            for node in cluster.nodes:
                if node.address is not None:
                    address = str(node.address)
                else:
                    address = str(next(a for a in spare if a not in used and a.packed[3] != 0))
                targets: list[Target] = []
                if node.role is Role.MDS:
                    targets = [
                        Target("MGS", "mgs", f"{node.name}-mdtpool", "mgs"),
                        Target(f"{FSNAME}-MDT0000", "mdt", f"{node.name}-mdtpool", "mdt0"),
                    ]
                elif node.role is Role.OSS:
                    targets = [
                        Target(
                            f"{FSNAME}-OST{osts:04x}", "ost", f"{node.name}-ostpool", f"ost{osts}"
                        )
                    ]
                    osts += 1
                lustre_node = LustreNode(sim, node, address, targets)
                sim.nodes.append(lustre_node)
                self.nodes[node.name] = lustre_node
                self.addresses[address] = lustre_node
            self.clusters[cluster.name] = sim

    def reset(self) -> None:
        """Every node boots from its initial disk, serving as if for months (no downtime)."""
        self.contents = {}
        self._heap = []
        for cluster in self.world.fleet.clusters:
            sim = self.clusters[cluster.name]
            sim.reset()
            mds_address = self.nodes[cluster.mds.name].address
            for node in cluster.nodes:
                lustre_node = self.nodes[node.name]
                vm = self.backend.vm(cluster.subscription_id, cluster.resource_group, node.name)
                disk = self.backend.disks[vm.os_disk]
                image = self.backend.images[(disk.image_id or "").lower()]
                hostid = derive_hostid(f"{self.backend.seed}:{node.name}")
                content = DiskContent(
                    files=cluster_files(
                        cluster,
                        node,
                        lustre_node.address,
                        lustre_node.targets,
                        hostid,
                        mds_address,
                    ),
                    os_version=image.os_version,
                    lustre_version=image.lustre_version,
                    bad_image=image.bad,
                    own_hostid=hostid,
                )
                self.contents[disk.name] = content
                for target in lustre_node.targets:
                    sim.pool_hostids[target.pool] = hostid
                lustre_node.power_off()
            for node in cluster.nodes:
                lustre_node = self.nodes[node.name]
                vm = self.backend.vm(cluster.subscription_id, cluster.resource_group, node.name)
                lustre_node.boot(
                    self.contents[self.backend.disks[vm.os_disk].name], 0.0, settled=True
                )
            sim.settle(0.0)
        for name in self.nodes:
            self._notify(name)

    # ------------------------------------------------------------------ events

    def on_event(self, event: Event) -> None:
        data = event.data
        if event.type == "vm.power":
            node = self.nodes.get(data["vm"])
            if node is not None and data["state"] in NOT_RUNNING and (node.up or node.crashed):
                node.go_down(event.at)
                node.crashed = False
                self._after_change(node)
            elif node is not None and data["state"] in NOT_RUNNING:
                node.crashed = False
        elif event.type == "vm.booted":
            node = self.nodes.get(data["vm"])
            if node is not None:
                self._boot(node, data.get("os_disk"), data.get("image"), event.at)
        elif event.type == "disk.deleted":
            self.contents.pop(data["disk"], None)

    def _boot(
        self, node: LustreNode, disk_name: str | None, image_id: str | None, at: float
    ) -> None:
        content = self.contents.get(disk_name or "")
        if content is None:
            image = self.backend.images.get((image_id or "").lower())
            content = DiskContent(
                files={},
                os_version=image.os_version if image else "unknown",
                lustre_version=image.lustre_version if image else "",
                bad_image=image.bad if image else True,
                own_hostid=derive_hostid(f"fresh:{disk_name}"),
            )
            self.contents[disk_name or ""] = content
        faults = self.backend.faults
        crash = False
        fault = faults.take("node.boot", node.name, (FaultMode.FAIL,))
        if fault is not None:
            if fault.code == "BadImage":
                content.bad_image = True
            else:
                crash = True
        sim = node.cluster
        sim.stuck_nodes.discard(node.name)
        if faults.take("node.recovery", node.name, (FaultMode.HANG, FaultMode.FAIL)) is not None:
            sim.stuck_nodes.add(node.name)
        node.boot(content, at, crash=crash)
        self.backend.emit(
            at,
            "node.booted",
            vm=node.name,
            cluster=sim.name,
            lustre_version=content.lustre_version,
            crashed=crash,
            modules_loaded=node.modules_loaded,
            config=bool(content.files),
        )
        self._after_change(node)

    def _after_change(self, node: LustreNode) -> None:
        self._schedule(node.cluster)
        self._notify(node.name)

    def _notify(self, name: str) -> None:
        reachable = self.nodes[name].up
        for listener in self.listeners:
            listener(name, reachable)

    # ------------------------------------------------------------------ time

    def _schedule(self, sim: ClusterSim) -> None:
        due = sim.next_deadline()
        if due is not None:
            self._heap_seq += 1
            heapq.heappush(self._heap, (due[0], self._heap_seq, sim.name))

    def tick(self, now: float) -> None:
        """Apply the clusters' timed transitions due by ``now`` (called after ARM advance)."""
        while self._heap and self._heap[0][0] <= now:
            _, _, name = heapq.heappop(self._heap)
            sim = self.clusters[name]
            sim.advance(now)
            self._schedule(sim)

    def touched(self, node: LustreNode) -> None:
        """A command changed ``node``: re-evaluate reachability and deadlines."""
        node.cluster.changed(self.backend.clock.now())
        self._after_change(node)

    # ------------------------------------------------------------------ report

    def report(self, cluster: str | None = None) -> dict[str, Any]:
        now = self.backend.clock.now()
        out: dict[str, Any] = {}
        for name, sim in self.clusters.items():
            if cluster is not None and name != cluster:
                continue
            sim.advance(now)
            report = sim.report(now)
            cluster_spec = sim.spec
            report["data_disks"] = {
                self.backend.disks[a.disk].name: self.backend.disks[a.disk].checksum
                for node in cluster_spec.nodes
                for a in self.backend.vm(
                    cluster_spec.subscription_id, cluster_spec.resource_group, node.name
                ).data_disks
            }
            out[name] = report
        return out
