"""The emulator's ARM contract, driven through the real azure-mgmt-compute client over HTTPS."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
from azure.mgmt.compute import ComputeManagementClient
from azure.mgmt.compute.models import (
    CreationData,
    Disk,
    DiskCreateOption,
    DiskProperties,
    DiskSecurityProfile,
)

from amlfs.azure.client import StaticTokenCredential, compute_client
from amlfs.ids import disk_id
from amlfs_sim import Emulator, EndpointInfo
from amlfs_sim.spec import SimWorld
from tests.conftest import TIME_SCALE, Sim, os_disk_body, trust

RELEASE = (
    "/subscriptions/4f6c1a52-7a3e-4d7e-9a55-2b1f0c9e8d01/resourceGroups/rg-amlfs-images/providers/"
    "Microsoft.Compute/galleries/amlfsgallery/images/amlfs-lustre/versions/2.15.6"
)


def new_os_disk(
    compute: ComputeManagementClient,
    sim: Sim,
    vm_name: str,
    disk_size_gb: int | None = None,
    **hardware: Any,
) -> Disk:
    """A release OS disk for ``vm_name``; ``hardware``: ``zones``, ``security_type`` (by
    default the small fleet's: zone "1", Trusted Launch)."""
    cluster = sim.cluster
    body = os_disk_body(
        cluster.region,
        RELEASE,
        disk_size_gb=disk_size_gb,
        **hardware,
        tags={
            "amlfs-run": "run-1",
            "amlfs-vm": vm_name,
            "amlfs-replaces": f"{vm_name}-osdisk-2.15.5",
        },
    )
    name = f"{vm_name}-os-2.15.6"
    return compute.disks.begin_create_or_update(cluster.resource_group, name, body).result()


def ops_of(sim: Sim, kind: str) -> list[dict[str, Any]]:
    return [op for op in sim.timeline()["operations"] if op["kind"] == kind]


def test_gallery_image_version_is_served(sim: Sim) -> None:
    compute = sim.compute()
    image = compute.gallery_image_versions.get(
        "rg-amlfs-images", "amlfsgallery", "amlfs-lustre", "2.15.6"
    )
    assert image.id == RELEASE
    assert image.storage_profile.os_disk_image.size_in_gb == 64
    assert image.tags["lustre-version"] == "2.15.6"


def test_create_disk_from_image_waits_for_the_lro(sim: Sim) -> None:
    compute = sim.compute()
    vm = sim.cluster.nodes[0].name
    disk = new_os_disk(compute, sim, vm)
    assert disk.provisioning_state == "Succeeded"
    assert disk.disk_state == "Unattached"
    assert disk.tags["amlfs-vm"] == vm
    assert disk.creation_data.gallery_image_reference.id == RELEASE
    listed = {d.name for d in compute.disks.list_by_resource_group(sim.cluster.resource_group)}
    assert disk.name in listed
    (op,) = ops_of(sim, "disk.create")
    duration = op["end"] - op["start"]
    assert op["status"] == "Succeeded"
    assert 30 <= duration <= 90 * 1.05, duration


def test_os_disk_swap_stop_put_start(sim: Sim) -> None:
    compute = sim.compute()
    rg = sim.cluster.resource_group
    vm_name = sim.cluster.nodes[1].name
    disk = new_os_disk(compute, sim, vm_name)

    compute.virtual_machines.begin_power_off(rg, vm_name).result()
    assert _power(compute, rg, vm_name) == "PowerState/stopped"

    vm = compute.virtual_machines.get(rg, vm_name)
    old_disk_name = vm.storage_profile.os_disk.name
    data_before = [(d.lun, d.managed_disk.id) for d in vm.storage_profile.data_disks]
    vm.storage_profile.os_disk.managed_disk.id = disk.id
    vm.storage_profile.os_disk.name = disk.name
    updated = compute.virtual_machines.begin_create_or_update(rg, vm_name, vm).result()
    assert updated.storage_profile.os_disk.managed_disk.id.lower() == disk.id.lower()
    assert _power(compute, rg, vm_name) == "PowerState/stopped"  # a stopped VM stays stopped

    compute.virtual_machines.begin_start(rg, vm_name).result()
    view = compute.virtual_machines.instance_view(rg, vm_name)
    assert [s.code for s in view.statuses] == ["ProvisioningState/succeeded", "PowerState/running"]
    after = compute.virtual_machines.get(rg, vm_name)
    assert [(d.lun, d.managed_disk.id) for d in after.storage_profile.data_disks] == data_before

    state = sim.state()
    row = next(v for v in state["vms"] if v["name"] == vm_name)
    assert row["os_disk"] == disk.name
    assert row["os_image"] == RELEASE
    assert state["data_disk_changes"] == []
    assert state["violations"] == []
    assert state["leaked_disks"] == [old_disk_name]  # until the orchestrator deletes it

    compute.disks.begin_delete(rg, old_disk_name).result()
    assert sim.state()["leaked_disks"] == []
    kinds = [op["kind"] for op in sim.timeline()["operations"]]
    assert kinds == ["disk.create", "vm.power_off", "vm.put", "vm.start", "disk.delete"]


def test_put_with_new_os_disk_on_running_vm_stops_swaps_and_boots(sim: Sim) -> None:
    compute = sim.compute()
    rg, vm_name = sim.cluster.resource_group, sim.cluster.nodes[2].name
    disk = new_os_disk(compute, sim, vm_name)
    vm = compute.virtual_machines.get(rg, vm_name)
    vm.storage_profile.os_disk.managed_disk.id = disk.id
    compute.virtual_machines.begin_create_or_update(rg, vm_name, vm).result()
    assert _power(compute, rg, vm_name) == "PowerState/running"
    (put,) = ops_of(sim, "vm.put")
    assert [p["name"] for p in put["phases"]] == ["powerOff", "swap", "start"]
    events = [e for e in sim.timeline()["events"] if e.get("vm") == vm_name]
    assert [e["state"] for e in events if e["type"] == "vm.power"] == [
        "stopping",
        "stopped",
        "starting",
        "running",
    ]
    booted = [e for e in events if e["type"] == "vm.booted"]
    assert booted[-1]["image"] == RELEASE


def test_failed_lro_raises_with_the_injected_code(sim: Sim) -> None:
    sim.fault(
        kind="disk.create",
        mode="fail",
        code="InternalDiskManagementError",
        message="Disk allocation failed.",
        count=1,
    )
    with pytest.raises(HttpResponseError) as caught:
        new_os_disk(sim.compute(), sim, sim.cluster.nodes[0].name)
    assert caught.value.error is not None
    assert caught.value.error.code == "InternalDiskManagementError"
    failed = [d for d in sim.state()["disks"] if d["provisioning_state"] == "Failed"]
    assert len(failed) == 1  # Azure leaves the failed resource behind for the caller to delete


def test_accept_phase_fault_answers_the_request_with_the_status(sim: Sim) -> None:
    sim.fault(
        kind="vm.power_off",
        mode="fail",
        phase="accept",
        status=409,
        code="OperationPreempted",
        count=1,
    )
    rg, vm_name = sim.cluster.resource_group, sim.cluster.nodes[0].name
    with pytest.raises(HttpResponseError) as caught:
        sim.compute().virtual_machines.begin_power_off(rg, vm_name)
    assert caught.value.status_code == 409
    assert caught.value.error is not None
    assert caught.value.error.code == "OperationPreempted"


def test_429_storm_is_retried_by_the_sdk_after_the_scaled_retry_after(sim: Sim) -> None:
    retry_after = 20.0
    sim.fault(kind="vm.get", mode="throttle", count=3, retry_after_s=retry_after)
    rg, vm_name = sim.cluster.resource_group, sim.cluster.nodes[0].name
    started = time.monotonic()
    vm = sim.compute().virtual_machines.get(rg, vm_name)
    elapsed = time.monotonic() - started
    assert vm.name == vm_name
    assert elapsed >= 3 * retry_after / TIME_SCALE * 0.9, elapsed
    assert elapsed < 3 * retry_after, "the SDK waited unscaled sim seconds"
    assert sim.state()["throttled_requests"] == 3


@pytest.fixture
def real_time_sim(small_world: SimWorld, tmp_path: Path) -> Iterator[EndpointInfo]:
    """An emulator at time scale 1, where 13 requests in a row cannot refill a bucket."""
    with Emulator(small_world, tmp_path) as endpoint:
        yield endpoint


def test_token_bucket_per_vm_throttles_the_thirteenth_write(
    real_time_sim: EndpointInfo, small_world: SimWorld
) -> None:
    cluster = small_world.fleet.clusters[0]
    url = f"{real_time_sim.arm_url}{cluster.vm_id(cluster.nodes[0])}"
    statuses = []
    with httpx.Client(verify=trust(real_time_sim), headers={"Authorization": "Bearer t"}) as http:
        # Every VM write is metered on admission, even one refused because the VM is busy.
        for _ in range(13):
            response = http.patch(
                url, params={"api-version": "2026-04-01"}, json={"tags": {"a": "b"}}
            )
            statuses.append(response.status_code)
    assert statuses == [200] + [409] * 11 + [429]
    assert response.json()["error"]["code"] == "OperationNotAllowed"
    assert 13 <= int(response.headers["Retry-After"]) <= 15  # one token per 15 s at 4/min
    remaining = dict(
        part.split(";") for part in response.headers["x-ms-ratelimit-remaining-resource"].split(",")
    )
    assert remaining["Microsoft.Compute/PutVMResource"] == "0"
    # 12 of 1500 taken; the 500/min subscription bucket refills a little while the test runs.
    assert 1488 <= int(remaining["Microsoft.Compute/PutVMSubscriptionMaximum"]) < 1500


def test_time_scaled_retry_after_is_in_real_milliseconds(sim: Sim) -> None:
    sim.fault(kind="vm.get", mode="throttle", count=1, retry_after_s=30)
    url = f"{sim.endpoint.arm_url}{sim.cluster.vm_id(sim.cluster.nodes[0])}"
    with httpx.Client(verify=trust(sim.endpoint), headers={"Authorization": "Bearer t"}) as http:
        response = http.get(url, params={"api-version": "2026-04-01"})
    assert response.status_code == 429
    # The generated clients parse Retry-After as an int: under a time scale it is left out.
    assert "Retry-After" not in response.headers
    assert int(response.headers["retry-after-ms"]) == round(30 / TIME_SCALE * 1000)
    assert response.headers["x-ms-sim-retry-after"] == "30"


def swap_refused(sim: Sim, compute: ComputeManagementClient, disk: Disk) -> HttpResponseError:
    """PUT the first VM with ``disk`` as its OS disk, which must be refused, and check that
    nothing changed: the VM keeps its disk, and no operation started."""
    rg, vm_name = sim.cluster.resource_group, sim.cluster.nodes[0].name
    vm = compute.virtual_machines.get(rg, vm_name)
    before = vm.storage_profile.os_disk.managed_disk.id
    vm.storage_profile.os_disk.managed_disk.id = disk.id
    vm.storage_profile.os_disk.name = disk.name
    with pytest.raises(HttpResponseError) as caught:
        compute.virtual_machines.begin_create_or_update(rg, vm_name, vm)
    after = compute.virtual_machines.get(rg, vm_name).storage_profile.os_disk.managed_disk.id
    assert after == before
    assert ops_of(sim, "vm.put") == []
    assert caught.value.error is not None
    return caught.value


def test_swap_to_a_bigger_disk_is_refused_as_a_shrink(sim: Sim) -> None:
    # The PUT carries osDisk.diskSizeGB as GET gave it (the current 64 GB): Compute reads it
    # as the size wanted, and a 128 GB disk cannot shrink to it (azure-docs issue 47704).
    compute = sim.compute()
    bigger = new_os_disk(compute, sim, sim.cluster.nodes[0].name, disk_size_gb=128)
    refused = swap_refused(sim, compute, bigger)
    assert refused.status_code == 400
    assert refused.error is not None
    assert refused.error.code == "BadRequest"
    assert "cannot be resized down" in str(refused)


def test_a_zonal_vm_and_its_disks_read_as_arm_returns_them(sim: Sim) -> None:
    compute = sim.compute()
    rg, vm_name = sim.cluster.resource_group, sim.cluster.nodes[0].name
    vm = compute.virtual_machines.get(rg, vm_name, expand="instanceView")
    assert vm.zones == ["1"]
    assert vm.security_profile.security_type == "TrustedLaunch"
    assert vm.security_profile.uefi_settings.secure_boot_enabled is True
    assert vm.security_profile.uefi_settings.v_tpm_enabled is True
    assert vm.instance_view.hyper_v_generation == "V2"
    os_disk = compute.disks.get(rg, vm.storage_profile.os_disk.name)
    assert os_disk.zones == ["1"]
    assert os_disk.disk_size_gb == 64
    assert os_disk.hyper_v_generation == "V2"
    assert os_disk.security_profile.security_type == "TrustedLaunch"
    data = compute.disks.get(rg, vm.storage_profile.data_disks[0].name)
    assert data.zones == ["1"]
    assert data.security_profile is None
    # The generation is the gallery image definition's, and every version has it.
    definition = compute.gallery_images.get("rg-amlfs-images", "amlfsgallery", "amlfs-lustre")
    assert definition.hyper_v_generation == "V2"
    assert [(f.name, f.value) for f in definition.features] == [
        ("SecurityType", "TrustedLaunchSupported")
    ]
    made = new_os_disk(compute, sim, vm_name, zones=("1",), security_type=None)
    assert made.hyper_v_generation == "V2"  # from the image, asked for or not
    assert made.security_profile is None  # only when asked for


@pytest.mark.parametrize(
    ("zones", "message"),
    [
        ((), "cannot be attached to the VM because it is not in zone '1'."),
        (
            ("2",),
            "cannot be attached to the VM because it is not in the same zone as the VM. "
            "VM zone: '1'. Disk zone: '2'.",
        ),
    ],
    ids=["regional-disk", "other-zone"],
)
def test_a_disk_outside_the_vms_zone_cannot_be_swapped_in(
    sim: Sim, zones: tuple[str, ...], message: str
) -> None:
    compute = sim.compute()
    disk = new_os_disk(compute, sim, sim.cluster.nodes[0].name, zones=zones)
    assert (disk.zones or []) == list(zones)
    refused = swap_refused(sim, compute, disk)
    assert refused.status_code == 400
    assert refused.error is not None
    assert refused.error.code == "BadRequest"
    assert f"Disk {disk.id} {message}" in str(refused)


def test_a_disk_without_the_vms_security_type_cannot_be_swapped_in(sim: Sim) -> None:
    compute = sim.compute()
    standard = new_os_disk(compute, sim, sim.cluster.nodes[0].name, security_type=None)
    refused = swap_refused(sim, compute, standard)
    assert refused.status_code == 409
    assert refused.error is not None
    assert refused.error.code == "PropertyChangeNotAllowed"
    assert "Security type of VM is not compatible with the security type" in str(refused)


def test_disk_creation_refuses_what_azure_refuses(sim: Sim) -> None:
    compute = sim.compute()
    rg = sim.cluster.resource_group
    # Trusted Launch only on a disk made from an image.
    empty = Disk(
        location=sim.cluster.region,
        zones=["1"],
        properties=DiskProperties(
            creation_data=CreationData(create_option=DiskCreateOption.EMPTY),
            disk_size_gb=64,
            security_profile=DiskSecurityProfile(security_type="TrustedLaunch"),
        ),
    )
    with pytest.raises(HttpResponseError) as caught:
        compute.disks.begin_create_or_update(rg, "empty-tl", empty)
    assert caught.value.status_code == 400
    assert "Security Type 'TrustedLaunch' is not supported for CreateOption 'Empty'" in str(
        caught.value
    )
    # A disk made from an image has the image's generation.
    body = os_disk_body(sim.cluster.region, RELEASE)
    body.properties.hyper_v_generation = "V1"
    with pytest.raises(HttpResponseError) as caught:
        compute.disks.begin_create_or_update(rg, "gen1-from-gen2", body)
    assert caught.value.status_code == 409
    assert "different Hypervisor generation ['V1']" in str(caught.value)
    for zones in (["1", "2"], ["4"]):
        body = os_disk_body(sim.cluster.region, RELEASE)
        body.zones = zones
        with pytest.raises(HttpResponseError) as caught:
            compute.disks.begin_create_or_update(rg, "many-zones", body)
        assert caught.value.status_code == 400
    assert {d["name"] for d in sim.state()["disks"]}.isdisjoint(
        {"empty-tl", "gen1-from-gen2", "many-zones"}
    )


def test_put_that_changes_data_disks_is_recorded_as_a_violation(sim: Sim) -> None:
    compute = sim.compute()
    rg = sim.cluster.resource_group
    oss = sim.cluster.nodes[1].name
    vm = compute.virtual_machines.get(rg, oss)
    assert len(vm.storage_profile.data_disks) == 2
    vm.storage_profile.data_disks = vm.storage_profile.data_disks[:1]
    compute.virtual_machines.begin_create_or_update(rg, oss, vm).result()
    state = sim.state()
    (violation,) = state["violations"]
    assert violation["vm"] == oss
    assert violation["request"] == "vm.put"
    assert [c["lun"] for c in state["data_disk_changes"]] == [1]


def test_data_disk_write_through_the_fault_api_changes_its_checksum(sim: Sim) -> None:
    oss = sim.cluster.nodes[1].name
    before = next(v for v in sim.state()["vms"] if v["name"] == oss)["data_disks"][0]
    sim.control.post(f"/data-disks/{before['disk']}/write").raise_for_status()
    after = next(v for v in sim.state()["vms"] if v["name"] == oss)["data_disks"][0]
    assert after["checksum"] != before["checksum"]
    (change,) = sim.state()["data_disk_changes"]
    assert change["vm"] == oss


def test_hang_leaves_the_poller_unfinished_and_the_vm_busy(sim: Sim) -> None:
    sim.fault(kind="vm.power_off", mode="hang", count=1)
    compute = sim.compute()
    rg, vm_name = sim.cluster.resource_group, sim.cluster.nodes[0].name
    poller = compute.virtual_machines.begin_power_off(rg, vm_name)
    poller.wait(timeout=600 / TIME_SCALE)  # ten sim minutes, far beyond any power-off
    assert not poller.done()
    with pytest.raises(HttpResponseError) as caught:
        compute.virtual_machines.begin_start(rg, vm_name)
    assert caught.value.status_code == 409
    assert "busy" in str(caught.value)
    # Reset forgets the hung operation: the poller's thread ends on a 404 instead of polling on.
    sim.control.post("/reset").raise_for_status()
    with pytest.raises(HttpResponseError) as ended:
        poller.result(timeout=30)
    assert poller.done()
    assert ended.value.status_code == 404


def test_slow_fault_stretches_the_operation(sim: Sim) -> None:
    sim.fault(kind="vm.power_off", mode="slow", factor=10, count=1)
    rg, vm_name = sim.cluster.resource_group, sim.cluster.nodes[0].name
    sim.compute().virtual_machines.begin_power_off(rg, vm_name).result()
    (op,) = ops_of(sim, "vm.power_off")
    assert op["end"] - op["start"] >= 200  # 20-40 s, ten times


def test_missing_vm_is_resource_not_found(sim: Sim) -> None:
    with pytest.raises(ResourceNotFoundError) as caught:
        sim.compute().virtual_machines.get(sim.cluster.resource_group, "no-such-vm")
    assert caught.value.error is not None
    assert caught.value.error.code == "ResourceNotFound"


def test_deleting_an_attached_disk_is_a_conflict(sim: Sim) -> None:
    rg = sim.cluster.resource_group
    attached = next(v for v in sim.state()["vms"] if v["cluster"] == sim.cluster.name)["os_disk"]
    with pytest.raises(HttpResponseError) as caught:
        sim.compute().disks.begin_delete(rg, attached)
    assert caught.value.status_code == 409
    assert "attached" in str(caught.value)


def test_deleting_a_missing_disk_succeeds(sim: Sim) -> None:
    sim.compute().disks.begin_delete(sim.cluster.resource_group, "never-existed").result()


@pytest.mark.parametrize(
    ("headers", "params", "status", "code"),
    [
        ({}, {"api-version": "2026-04-01"}, 401, "AuthenticationFailed"),
        ({"Authorization": "Bearer t"}, {}, 400, "MissingApiVersionParameter"),
        (
            {"Authorization": "Bearer t"},
            {"api-version": "2015-06-15"},
            400,
            "InvalidApiVersionParameter",
        ),
    ],
)
def test_request_admission_errors_are_arm_shaped(
    sim: Sim, headers: dict[str, str], params: dict[str, str], status: int, code: str
) -> None:
    vm = sim.cluster.vm_id(sim.cluster.nodes[0])
    with httpx.Client(verify=trust(sim.endpoint)) as http:
        response = http.get(f"{sim.endpoint.arm_url}{vm}", headers=headers, params=params)
    assert response.status_code == status
    assert response.json()["error"]["code"] == code


def test_unknown_subscription_and_group(sim: Sim) -> None:
    other = "00000000-0000-0000-0000-000000000000"
    with pytest.raises(HttpResponseError) as caught:
        sim.compute(other).virtual_machines.get("rg", "vm")
    assert caught.value.error is not None
    assert caught.value.error.code == "SubscriptionNotFound"
    with pytest.raises(HttpResponseError) as caught:
        sim.compute().disks.get("rg-nope", disk_id("x", "y", "z").rsplit("/", 1)[-1])
    assert caught.value.error is not None
    assert caught.value.error.code == "ResourceGroupNotFound"


def test_reset_restores_the_fleet(sim: Sim) -> None:
    compute = sim.compute()
    new_os_disk(compute, sim, sim.cluster.nodes[0].name)
    assert len(sim.state()["leaked_disks"]) == 1
    sim.control.post("/reset").raise_for_status()
    state = sim.state()
    assert state["leaked_disks"] == []
    assert sim.timeline()["operations"] == []
    assert {v["power_state"] for v in state["vms"]} == {"running"}


def _power(compute: ComputeManagementClient, rg: str, vm_name: str) -> str:
    view = compute.virtual_machines.instance_view(rg, vm_name)
    return next(s.code for s in view.statuses if s.code.startswith("PowerState/"))


def test_the_ca_bundle_is_looked_at_once_and_a_missing_one_is_refused(
    sim: Sim, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fleet client's HTTPS adapter checks its CA bundle once, not on every request
    (requests asks the file system 2-3 times per request, each a GIL hand-off at fleet scale)."""
    looked: list[str] = []
    isdir = os.path.isdir

    def counting_isdir(path: Any) -> bool:
        looked.append(str(path))
        return isdir(path)

    monkeypatch.setattr(os.path, "isdir", counting_isdir)
    compute = sim.compute(pool_size=4)
    vm_name = sim.cluster.nodes[0].name
    for _ in range(5):
        assert compute.virtual_machines.get(sim.cluster.resource_group, vm_name).name == vm_name
    assert looked.count(sim.endpoint.ca_file) == 1, looked

    missing = tmp_path / "no-such-ca.pem"
    client = compute_client(
        sim.cluster.subscription_id,
        StaticTokenCredential("emulator-token"),
        arm_url=sim.endpoint.arm_url,
        ca_file=str(missing),
        pool_size=4,
    )
    try:
        with pytest.raises(OSError, match=r"no-such-ca\.pem"):
            client.virtual_machines.get(sim.cluster.resource_group, vm_name)
    finally:
        client.close()
