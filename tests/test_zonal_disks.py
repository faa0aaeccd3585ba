"""Zonal, sized, secured OS disks: the emulator refuses what Azure refuses, the product copies
zone, size, SKU, generation and security type from the disk it replaces.

A fleet of its own: its first cluster in zone "2" with 128 GB Trusted Launch OS disks (bigger
than the 64 GB image), its second a regional Standard cluster, and a generation 1 image
definition beside the release's."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from azure.core.exceptions import HttpResponseError
from azure.mgmt.compute import ComputeManagementClient
from azure.mgmt.compute.models import Disk

from amlfs.azure import StaticTokenCredential, compute_client
from amlfs.models import Cluster, read_yaml
from amlfs.runtime import Connections, from_endpoint
from amlfs.saga import ClusterUpgrade, Outcome, UpgradePolicy, UpgradeResult
from amlfs.store import StateStore
from amlfs_sim import Emulator, EndpointInfo
from amlfs_sim.spec import SimWorld, build_world
from tests.conftest import SMALL_FLEET, TIME_SCALE, os_disk_body, trust
from tests.test_cluster_upgrade import RELEASE

GEN1 = RELEASE.image_id.replace("/images/amlfs-lustre/", "/images/amlfs-lustre-gen1/")


def zonal_world() -> SimWorld:
    data: dict[str, Any] = read_yaml(SMALL_FLEET, kind="fleet file", max_bytes=1 << 20)
    section = data["emulator"]
    section["images"].append({"id": GEN1, "lustre_version": "2.15.6", "hyper_v_generation": "V1"})
    first, second = (c["name"] for c in data["clusters"][:2])
    section["clusters"] = {
        first: {"zone": "2", "os_disk_size_gb": 128},
        second: {"zone": None, "security_type": "Standard"},
    }
    return build_world(data, "zonal fleet")


@pytest.fixture(scope="module")
def zonal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Emulator, EndpointInfo]]:
    emulator = Emulator(
        zonal_world(), tmp_path_factory.mktemp("zonal-sim"), time_scale=TIME_SCALE, seed=11
    )
    endpoint = emulator.start()
    yield emulator, endpoint
    emulator.stop()


@pytest.fixture
def world(zonal: tuple[Emulator, EndpointInfo]) -> tuple[Emulator, EndpointInfo]:
    """The module's emulator, reset to the fleet as loaded."""
    endpoint = zonal[1]
    with httpx.Client(base_url=endpoint.control_url, verify=trust(endpoint)) as control:
        control.post("/reset").raise_for_status()
    return zonal


@pytest.fixture
def compute(world: tuple[Emulator, EndpointInfo]) -> Iterator[ComputeManagementClient]:
    emulator, endpoint = world
    client = compute_client(
        emulator.world.fleet.clusters[0].subscription_id,
        StaticTokenCredential("emulator-token"),
        arm_url=endpoint.arm_url,
        ca_file=endpoint.ca_file,
    )
    yield client
    client.close()


def put_os_disk(
    compute: ComputeManagementClient, cluster: Cluster, name: str, image: str, **hardware: Any
) -> Disk:
    body = os_disk_body(cluster.region, image, **hardware)
    return compute.disks.begin_create_or_update(cluster.resource_group, name, body).result()


def swap(compute: ComputeManagementClient, cluster: Cluster, disk: Disk) -> None:
    vm_name = cluster.nodes[0].name
    vm = compute.virtual_machines.get(cluster.resource_group, vm_name)
    vm.storage_profile.os_disk.managed_disk.id = disk.id
    vm.storage_profile.os_disk.name = disk.name
    compute.virtual_machines.begin_create_or_update(cluster.resource_group, vm_name, vm).result()


def test_the_emulator_section_sets_zone_size_and_security_per_cluster(
    world: tuple[Emulator, EndpointInfo], compute: ComputeManagementClient
) -> None:
    emulator, endpoint = world
    zonal, regional = emulator.world.fleet.clusters[:2]
    vm = compute.virtual_machines.get(zonal.resource_group, zonal.nodes[0].name)
    assert vm.zones == ["2"]
    assert vm.security_profile.security_type == "TrustedLaunch"
    disk = compute.disks.get(zonal.resource_group, vm.storage_profile.os_disk.name)
    assert (disk.zones, disk.disk_size_gb) == (["2"], 128)
    assert vm.storage_profile.os_disk.disk_size_gb == 128
    other = compute_client(
        regional.subscription_id,
        StaticTokenCredential("emulator-token"),
        arm_url=endpoint.arm_url,
        ca_file=endpoint.ca_file,
    )
    try:
        vm = other.virtual_machines.get(regional.resource_group, regional.nodes[0].name)
        assert vm.zones is None
        assert vm.security_profile.security_type == "Standard"
        assert vm.security_profile.uefi_settings is None
        disk = other.disks.get(regional.resource_group, vm.storage_profile.os_disk.name)
        assert (disk.zones, disk.disk_size_gb, disk.security_profile) == (None, 64, None)
    finally:
        other.close()
    gen1 = compute.gallery_images.get("rg-amlfs-images", "amlfsgallery", "amlfs-lustre-gen1")
    assert gen1.hyper_v_generation == "V1"
    assert gen1.features == []


def test_a_generation_1_disk_cannot_replace_a_generation_2_one(
    world: tuple[Emulator, EndpointInfo], compute: ComputeManagementClient
) -> None:
    emulator, _ = world
    cluster = emulator.world.fleet.clusters[0]
    # Trusted Launch needs a V2 image: refused at creation.
    with pytest.raises(HttpResponseError) as caught:
        put_os_disk(compute, cluster, "gen1-tl", GEN1, zones=("2",), disk_size_gb=128)
    assert caught.value.status_code == 400
    assert "Trusted Launch Supported Gen2 OS Image" in str(caught.value)
    gen1 = put_os_disk(
        compute, cluster, "gen1", GEN1, zones=("2",), disk_size_gb=128, security_type=None
    )
    assert gen1.hyper_v_generation == "V1"
    with pytest.raises(HttpResponseError) as caught:
        swap(compute, cluster, gen1)
    assert caught.value.status_code == 409
    assert caught.value.error is not None
    assert caught.value.error.code == "PropertyChangeNotAllowed"
    assert "HyperVisor property on the OSDisk and VM do not match" in str(caught.value)
    assert "HyperVisor Generation 'V2'" in str(caught.value)


def test_a_disk_smaller_than_the_current_one_cannot_replace_it(
    world: tuple[Emulator, EndpointInfo], compute: ComputeManagementClient
) -> None:
    emulator, _ = world
    cluster = emulator.world.fleet.clusters[0]
    # What today's product makes: the image's size (64 GB) for a VM on 128 GB.
    small = put_os_disk(compute, cluster, "small", RELEASE.image_id, zones=("2",))
    assert small.disk_size_gb == 64
    with pytest.raises(HttpResponseError) as caught:
        swap(compute, cluster, small)
    assert caught.value.status_code == 400
    assert caught.value.error is not None
    assert caught.value.error.code == "OperationNotAllowed"
    assert "must be the same size" in str(caught.value)
    same = put_os_disk(compute, cluster, "same", RELEASE.image_id, zones=("2",), disk_size_gb=128)
    swap(compute, cluster, same)  # the same zone, size, generation and security: swapped


def upgrade(
    world: tuple[Emulator, EndpointInfo], cluster: Cluster, store_dir: Path
) -> UpgradeResult:
    emulator, _ = world
    azure, ssh = from_endpoint(emulator.state_dir / "endpoint.json")
    conns = Connections.create(azure, ssh)
    try:
        return ClusterUpgrade(
            cluster,
            RELEASE,
            gateway=conns.gateway(cluster.subscription_id),
            shells=conns.shells(),
            store=StateStore(store_dir),
            clock=conns.clock,
            policy=UpgradePolicy(),
        ).run()
    finally:
        conns.close()


@pytest.mark.parametrize("index", [0, 1], ids=["zone-2-trusted-launch-128gb", "regional-standard"])
def test_the_upgrade_copies_zone_size_sku_generation_and_security_to_the_new_disks(
    world: tuple[Emulator, EndpointInfo], tmp_path: Path, index: int
) -> None:
    emulator, endpoint = world
    cluster = emulator.world.fleet.clusters[index]
    client = compute_client(
        cluster.subscription_id,
        StaticTokenCredential("emulator-token"),
        arm_url=endpoint.arm_url,
        ca_file=endpoint.ca_file,
    )
    try:
        rg = cluster.resource_group
        before = {
            node.name: client.disks.get(
                rg, client.virtual_machines.get(rg, node.name).storage_profile.os_disk.name
            )
            for node in cluster.nodes
        }
        result = upgrade(world, cluster, tmp_path)
        assert result.outcome is Outcome.UPGRADED, result.reason
        for node in cluster.nodes:
            vm = client.virtual_machines.get(rg, node.name)
            new = client.disks.get(rg, vm.storage_profile.os_disk.name)
            old = before[node.name]
            assert new.name == f"{node.name}-osdisk-{RELEASE.version}"
            assert new.creation_data.gallery_image_reference.id == RELEASE.image_id
            assert new.zones == old.zones == vm.zones
            assert new.disk_size_gb == old.disk_size_gb
            assert new.sku.name == old.sku.name
            assert new.hyper_v_generation == old.hyper_v_generation == "V2"
            assert (new.security_profile and new.security_profile.security_type) == (
                old.security_profile and old.security_profile.security_type
            )
    finally:
        client.close()
    with httpx.Client(base_url=endpoint.control_url, verify=trust(endpoint)) as control:
        state = control.get("/state", params={"cluster": cluster.name}).json()
    assert {vm["os_image"] for vm in state["vms"]} == {RELEASE.image_id}
    assert state["leaked_disks"] == []
    assert state["clusters"][cluster.name]["serving"] is True
