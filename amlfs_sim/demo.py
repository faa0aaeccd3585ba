"""``make demo``: one OS disk swap, end to end through the real azure-mgmt-compute client.

Starts the emulator on examples/fleet-small.yaml, then for one VM does what the upgrade does:
create the new OS disk from the release image (tagged with run, VM and the disk it replaces),
stop the VM without deallocating, PUT it with the new OS disk, start it, check instanceView,
delete the old disk. Prints each step and the emulator's own account of what happened.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from azure.mgmt.compute.models import (
    CreationData,
    Disk,
    DiskProperties,
    DiskSku,
    ImageDiskReference,
)
from rich.console import Console
from rich.table import Table

from amlfs.azure import StaticTokenCredential, compute_client
from amlfs.models import load_release
from amlfs_sim.control import snapshot_state, snapshot_timeline
from amlfs_sim.server import Emulator

REPO = Path(__file__).resolve().parent.parent
TIME_SCALE = 20.0


def main() -> int:
    console = Console()
    release = load_release(REPO / "examples" / "release-2.15.6.yaml")
    with tempfile.TemporaryDirectory(prefix="amlfs-demo-") as state_dir:
        emulator = Emulator.from_fleet_file(
            REPO / "examples" / "fleet-small.yaml", Path(state_dir), time_scale=TIME_SCALE
        )
        with emulator as endpoint:
            cluster = emulator.world.fleet.clusters[0]
            node = cluster.mds
            console.print(
                f"[bold]amlfs-sim[/] serving {len(emulator.backend.vms)} VMs at {endpoint.arm_url}"
                f" (time scale {TIME_SCALE:g}: sim seconds per real second)"
            )
            compute = compute_client(
                cluster.subscription_id,
                StaticTokenCredential("demo-token"),
                arm_url=endpoint.arm_url,
                ca_file=endpoint.ca_file,
            )
            rg, vm_name = cluster.resource_group, node.name
            started = time.monotonic()

            def step(text: str) -> None:
                sim_t = emulator.clock.now()
                console.print(f"  [dim]sim {sim_t:7.1f}s[/]  {text}")

            console.print(
                f"Swapping the OS disk of [bold]{vm_name}[/] ({cluster.name}) "
                f"to release {release.version}"
            )
            vm = compute.virtual_machines.get(rg, vm_name)
            old_disk = vm.storage_profile.os_disk.name
            step(f"current OS disk {old_disk}")
            new_name = f"{vm_name}-os-{release.version}"
            disk = compute.disks.begin_create_or_update(
                rg,
                new_name,
                Disk(
                    location=cluster.region,
                    sku=DiskSku(name="Premium_LRS"),
                    properties=DiskProperties(
                        creation_data=CreationData(
                            create_option="FromImage",
                            gallery_image_reference=ImageDiskReference(id=release.image_id),
                        )
                    ),
                    tags={"amlfs-run": "demo", "amlfs-vm": vm_name, "amlfs-replaces": old_disk},
                ),
            ).result()
            step(f"created {disk.name} from {release.image_version} ({disk.disk_size_gb} GB)")
            compute.virtual_machines.begin_power_off(rg, vm_name).result()
            step("stopped (not deallocated)")
            vm.storage_profile.os_disk.managed_disk.id = disk.id
            vm.storage_profile.os_disk.name = disk.name
            compute.virtual_machines.begin_create_or_update(rg, vm_name, vm).result()
            step(f"PUT with OS disk {disk.name}")
            compute.virtual_machines.begin_start(rg, vm_name).result()
            view = compute.virtual_machines.instance_view(rg, vm_name)
            shown = next(
                s.display_status
                for s in view.statuses or []
                if (s.code or "").startswith("PowerState")
            )
            step(f"started: {shown}")
            compute.disks.begin_delete(rg, old_disk).result()
            step(f"deleted old OS disk {old_disk}")
            compute.close()

            timeline = snapshot_timeline(emulator.backend)
            state = snapshot_state(emulator.backend, cluster.name)
            table = Table(title="Emulator timeline (sim seconds)")
            for column in ("operation", "target", "start", "end", "took", "status"):
                table.add_column(column)
            for op in timeline["operations"]:
                table.add_row(
                    op["kind"],
                    op["target"],
                    f"{op['start']:.1f}",
                    f"{op['end']:.1f}",
                    f"{op['end'] - op['start']:.1f}",
                    op["status"],
                )
            console.print(table)
            row = next(v for v in state["vms"] if v["name"] == vm_name)
            # Unavailable from the moment it began stopping until it ran again: the emulator's
            # events, so the orchestrator's polling lag between steps counts too.
            power = [
                e for e in timeline["events"] if e["type"] == "vm.power" and e["vm"] == vm_name
            ]
            downtime = power[-1]["at"] - power[0]["at"]
            console.print(
                f"{vm_name}: {row['power_state']}, OS disk {row['os_disk']}, "
                f"image {row['os_image'].rsplit('/', 1)[-1]}"
            )
            console.print(
                f"VM unavailable for {downtime:.0f} sim s (stop, swap, start and the "
                f"polls between them); the disk was created before, outside that time"
            )
            console.print(
                f"data-disk changes: {len(state['data_disk_changes'])}, "
                f"violations: {len(state['violations'])}, "
                f"leaked disks: {len(state['leaked_disks'])}"
            )
            console.print(f"[green]done[/] in {time.monotonic() - started:.1f} s real")
            ok = (
                row["os_image"] == release.image_id
                and not state["data_disk_changes"]
                and not state["leaked_disks"]
                and row["power_state"] == "running"
            )
            return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
