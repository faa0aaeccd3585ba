"""The emulator's disk table: a resource group's list stays exact as disks come and go."""

from __future__ import annotations

from amlfs_sim.arm.backend import DiskTable
from amlfs_sim.arm.models import Disk


def _disk(sub: str, group: str, name: str) -> Disk:
    return Disk(sub, group, name, "eastus", 64, "Premium_LRS", "Linux", None, {}, name, 0.0)


def test_a_group_lists_its_own_disks_in_creation_order_and_forgets_deleted_ones() -> None:
    table = DiskTable()
    disks = [
        _disk("sub-a", "RG-1", "os-1"),
        _disk("sub-a", "rg-2", "os-2"),
        _disk("sub-b", "rg-1", "os-3"),
        _disk("sub-a", "rg-1", "os-4"),
        _disk("sub-a", "rg-1", "os-5"),
    ]
    for disk in disks:
        table[disk.key] = disk
    assert [d.name for d in table.in_group("sub-a", "rg-1")] == ["os-1", "os-4", "os-5"]

    table.pop(disks[3].key)
    del table[disks[0].key]
    assert table.pop(disks[0].key, None) is None  # already gone: the default, no error
    assert [d.name for d in table.in_group("sub-a", "rg-1")] == ["os-5"]
    assert [d.name for d in table.in_group("sub-a", "rg-2")] == ["os-2"]
    assert table.in_group("sub-c", "rg-1") == []
    assert set(table) == {disks[1].key, disks[2].key, disks[4].key}
