"""Wire format: how ARM renders VMs, disks, image versions and operation status."""

from __future__ import annotations

import datetime as dt
from typing import Any

from amlfs.ids import parse_resource_id
from amlfs_sim.arm.backend import DISK_TYPE, IMAGE_TYPE, VM_TYPE, ArmBackend
from amlfs_sim.arm.models import Disk, Operation, OpStatus, PowerState, VirtualMachine
from amlfs_sim.spec import ImageSpec

__all__ = [
    "SimTime",
    "disk_json",
    "image_definition_json",
    "image_json",
    "instance_view_json",
    "operation_json",
    "vm_json",
]


class SimTime:
    """Renders sim seconds as ISO 8601 wall time, sim 0 being the emulator's start."""

    def __init__(self) -> None:
        self.origin = dt.datetime.now(dt.UTC)

    def iso(self, sim_seconds: float) -> str:
        return (self.origin + dt.timedelta(seconds=sim_seconds)).isoformat()


def vm_json(
    backend: ArmBackend, vm: VirtualMachine, times: SimTime, *, instance_view: bool = False
) -> dict[str, Any]:
    os_disk = backend.disks[vm.os_disk]
    properties: dict[str, Any] = {
        "vmId": vm.unique_id,
        "hardwareProfile": {"vmSize": vm.vm_size},
        "storageProfile": {
            "imageReference": {"id": vm.image_reference} if vm.image_reference else None,
            "osDisk": {
                "osType": "Linux",
                "name": os_disk.name,
                "createOption": "Attach",
                "caching": "ReadWrite",
                "managedDisk": {"id": os_disk.id, "storageAccountType": os_disk.sku},
                "diskSizeGB": os_disk.size_gb,
                "deleteOption": "Detach",
            },
            "dataDisks": [
                {
                    "lun": a.lun,
                    "name": backend.disks[a.disk].name,
                    "createOption": "Attach",
                    "caching": a.caching,
                    "managedDisk": {
                        "id": backend.disks[a.disk].id,
                        "storageAccountType": backend.disks[a.disk].sku,
                    },
                    "diskSizeGB": backend.disks[a.disk].size_gb,
                    "toBeDetached": False,
                    "deleteOption": "Detach",
                }
                for a in vm.data_disks
            ],
        },
        "osProfile": {
            "computerName": vm.name,
            "adminUsername": "azureuser",
            "linuxConfiguration": {"disablePasswordAuthentication": True},
        },
        "provisioningState": vm.provisioning_state,
    }
    if properties["storageProfile"]["imageReference"] is None:
        del properties["storageProfile"]["imageReference"]
    # securityProfile as ComputeRP returns it (virtualMachine.json, 2025-04-01 on: "If not
    # specified, Standard will be returned starting api version 2025-11-01"); a Trusted
    # Launch VM has Secure Boot and vTPM on (learn.microsoft.com/azure/virtual-machines/
    # trusted-launch).
    security: dict[str, Any] = {"securityType": vm.security_type}
    if vm.security_type == "TrustedLaunch":
        security["uefiSettings"] = {"secureBootEnabled": True, "vTpmEnabled": True}
    properties["securityProfile"] = security
    if instance_view:
        properties["instanceView"] = instance_view_json(backend, vm, times)
    body: dict[str, Any] = {
        "id": vm.id,
        "name": vm.name,
        "type": VM_TYPE,
        "location": vm.location,
        "tags": vm.tags,
        "properties": properties,
    }
    if vm.zones:
        body["zones"] = list(vm.zones)
    return body


def instance_view_json(backend: ArmBackend, vm: VirtualMachine, times: SimTime) -> dict[str, Any]:
    now = times.iso(backend.clock.now())
    provisioning = vm.provisioning_state
    statuses = [
        {
            "code": f"ProvisioningState/{provisioning.lower()}",
            "level": "Error" if provisioning == "Failed" else "Info",
            "displayStatus": f"Provisioning {provisioning.lower()}",
            "time": now,
        },
        {
            "code": f"PowerState/{vm.power_state.value}",
            "level": "Info",
            "displayStatus": PowerState(vm.power_state).display,
        },
    ]
    disk_names = [backend.disks[vm.os_disk].name] + [
        backend.disks[a.disk].name for a in vm.data_disks
    ]
    return {
        "computerName": vm.name,
        "osName": "ubuntu",
        "hyperVGeneration": vm.hyper_v_generation,
        "disks": [
            {
                "name": name,
                "statuses": [
                    {
                        "code": "ProvisioningState/succeeded",
                        "level": "Info",
                        "displayStatus": "Provisioning succeeded",
                    }
                ],
            }
            for name in disk_names
        ],
        "statuses": statuses,
    }


def disk_json(disk: Disk, times: SimTime) -> dict[str, Any]:
    properties: dict[str, Any] = {
        "diskSizeGB": disk.size_gb,
        "diskState": "Attached" if disk.managed_by else "Unattached",
        "provisioningState": disk.provisioning_state,
        "timeCreated": times.iso(disk.created_at),
        "uniqueId": disk.unique_id,
        "creationData": (
            {"createOption": "FromImage", "galleryImageReference": {"id": disk.image_id}}
            if disk.image_id
            else {"createOption": "Empty"}
        ),
    }
    if disk.os_type:
        properties["osType"] = disk.os_type
    if disk.hyper_v_generation:
        properties["hyperVGeneration"] = disk.hyper_v_generation
    if disk.security_type:
        properties["securityProfile"] = {"securityType": disk.security_type}
    body: dict[str, Any] = {
        "id": disk.id,
        "name": disk.name,
        "type": DISK_TYPE,
        "location": disk.location,
        "tags": disk.tags,
        "sku": {
            "name": disk.sku,
            "tier": "Premium" if disk.sku.startswith("Premium") else "Standard",
        },
        "properties": properties,
    }
    if disk.managed_by:
        body["managedBy"] = disk.managed_by
    if disk.zones:
        body["zones"] = list(disk.zones)
    return body


def image_json(image: ImageSpec) -> dict[str, Any]:
    rid = parse_resource_id(image.id)
    return {
        "id": image.id,
        "name": rid.name,
        "type": IMAGE_TYPE,
        "location": "global",
        "tags": {"lustre-version": image.lustre_version, "os-version": image.os_version},
        "properties": {
            "publishingProfile": {
                "replicaCount": 1,
                "excludeFromLatest": False,
                "storageAccountType": "Standard_LRS",
            },
            "storageProfile": {
                "osDiskImage": {"sizeInGB": image.disk_size_gb, "hostCaching": "ReadWrite"}
            },
            "provisioningState": "Succeeded",
        },
    }


def image_definition_json(image: ImageSpec) -> dict[str, Any]:
    """The gallery image definition a version belongs to: where ARM keeps hyperVGeneration
    and the Trusted Launch feature (galleryImage, GalleryRP 2025-03-03)."""
    rid = parse_resource_id(image.id)
    definition_id = image.id.rsplit("/versions/", 1)[0]
    features = (
        [{"name": "SecurityType", "value": "TrustedLaunchSupported"}]
        if image.hyper_v_generation == "V2"
        else []
    )
    return {
        "id": definition_id,
        "name": rid.names[1],
        "type": IMAGE_TYPE.rsplit("/versions", 1)[0],
        "location": "global",
        "properties": {
            "osType": "Linux",
            "osState": "Generalized",
            "hyperVGeneration": image.hyper_v_generation,
            "features": features,
            "identifier": {"publisher": "amlfs", "offer": rid.names[0], "sku": rid.names[1]},
            "provisioningState": "Succeeded",
        },
    }


def operation_json(op: Operation, times: SimTime) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": op.id,
        "startTime": times.iso(op.start),
        "status": op.status.value,
    }
    if op.end is not None:
        body["endTime"] = times.iso(op.end)
    if op.status is OpStatus.FAILED:
        body["error"] = {"code": op.error_code, "message": op.error_message}
    return body
