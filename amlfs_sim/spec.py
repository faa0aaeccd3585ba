"""The emulator's own knobs: the optional ``emulator:`` section of a fleet file.

The orchestrator ignores this section; it describes the simulated world (gallery images and
which of them are bad, operation durations, data disks per role), not the inventory.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from amlfs.errors import InventoryError
from amlfs.ids import gallery_image_version_id, parse_resource_id
from amlfs.models import (
    FLEET_MAX_BYTES,
    Fleet,
    Text,
    check_image_version_id,
    parse_fleet,
    read_yaml,
)

__all__ = [
    "LOOPBACK",
    "ClusterHardware",
    "DurationRange",
    "Durations",
    "EmulatorSpec",
    "Hardware",
    "HsmCopies",
    "ImageSpec",
    "SimWorld",
    "check_loopback",
    "check_loopback_host",
    "load_world",
]

LOOPBACK = IPv4Network("127.0.0.0/8")

# Values as ARM spells them (azure-rest-api-specs, Microsoft.Compute ComputeRP/DiskRP
# 2025-01-02: HyperVGeneration "V1"/"V2"; a VM's securityProfile.securityType "Standard",
# "TrustedLaunch", ...; availability zones "1".."3").
HyperVGeneration = Literal["V1", "V2"]
SecurityType = Literal["Standard", "TrustedLaunch"]
Zone = Literal["1", "2", "3"]


class DurationRange(BaseModel):
    """Bounds of an operation's duration in sim seconds; each run draws uniformly in between."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    low: float = Field(ge=0)
    high: float = Field(ge=0)

    @model_validator(mode="before")
    @classmethod
    def _from_pair(cls, value: Any) -> Any:
        if isinstance(value, list | tuple) and len(value) == 2:
            return {"low": value[0], "high": value[1]}
        if isinstance(value, int | float):
            return {"low": value, "high": value}
        return value

    @model_validator(mode="after")
    def _ordered(self) -> DurationRange:
        if self.high < self.low:
            raise ValueError(f"high ({self.high}) must be >= low ({self.low})")
        return self


class Durations(BaseModel):
    """Per-operation durations (sim seconds), roughly what Azure takes."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    disk_create: DurationRange = DurationRange(low=30, high=90)
    disk_delete: DurationRange = DurationRange(low=5, high=15)
    disk_update: DurationRange = DurationRange(low=1, high=3)
    power_off: DurationRange = DurationRange(low=20, high=40)
    swap: DurationRange = DurationRange(low=10, high=30)
    start: DurationRange = DurationRange(low=30, high=60)
    deallocate: DurationRange = DurationRange(low=30, high=60)
    vm_update: DurationRange = DurationRange(low=2, high=5)


class HsmCopies(BaseModel):
    """The HSM copies a cluster's coordinator keeps in flight while enabled: ``requests``
    at a time, each copying for a duration drawn (seeded) from ``copy_s`` at ``bytes_per_s``
    (its file's size follows). Disabling the coordinator lets the active ones finish."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    requests: int = Field(default=2, ge=0, le=64)
    copy_s: DurationRange = DurationRange(low=5, high=15)
    bytes_per_s: float = Field(default=200e6, gt=0)


class ImageSpec(BaseModel):
    """A gallery image version the emulator serves, and what a node booted from it runs."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    id: Text
    os_version: Text = "ubuntu-22.04"
    lustre_version: Text = "2.15.5"
    disk_size_gb: int = Field(default=64, ge=1)
    # The generation of the gallery image definition this version belongs to (in ARM it is a
    # property of the definition, galleries/{g}/images/{i}: properties.hyperVGeneration); a
    # disk created from the version has it.
    hyper_v_generation: HyperVGeneration = "V2"
    bad: bool = False

    @field_validator("id")
    @classmethod
    def _is_image_version(cls, value: str) -> str:
        return check_image_version_id(value)

    @property
    def version(self) -> str:
        return parse_resource_id(self.id).name


class Hardware(BaseModel):
    """What one cluster's VMs are, as ARM describes them: zone (None: regional), security
    type, OS disk size (None: the initial image's size)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    zone: Zone | None = "1"
    security_type: SecurityType = "TrustedLaunch"
    os_disk_size_gb: int | None = Field(default=None, ge=1, le=4095)


class ClusterHardware(BaseModel):
    """Per-cluster overrides of the section's hardware; a field left out keeps the default
    (``zone: null`` makes the cluster regional)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    zone: Zone | None = None
    security_type: SecurityType | None = None
    os_disk_size_gb: int | None = Field(default=None, ge=1, le=4095)
    hsm: HsmCopies | None = None  # the cluster's HSM copies (not hardware; see hsm_copies)


class EmulatorSpec(BaseModel):
    """The ``emulator:`` section. Every field has a default so a plain inventory runs as is.

    Azure Managed Lustre is zonal: by default every VM is in zone "1", a Trusted Launch
    VM (generation V2, from its image), with an OS disk the size of its image (64 GiB).
    ``zone``, ``security_type`` and ``os_disk_size_gb`` change that for the whole fleet,
    ``clusters: {NAME: {...}}`` for one cluster."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    images: list[ImageSpec] = []
    initial_image: Text | None = None
    durations: Durations = Durations()
    data_disks: dict[Text, int] = {"mds": 1, "oss": 2, "agtpri": 1}
    data_disk_size_gb: int = 1024
    os_disk_sku: Text = "Premium_LRS"
    vm_size: Text = "Standard_E16s_v5"
    poll_interval_s: float = Field(default=3.0, gt=0)
    clients_per_cluster: int = Field(default=4, ge=0)
    zone: Zone | None = "1"
    security_type: SecurityType = "TrustedLaunch"
    os_disk_size_gb: int | None = Field(default=None, ge=1, le=4095)
    clusters: dict[Text, ClusterHardware] = {}
    hsm: HsmCopies = HsmCopies()

    @model_validator(mode="after")
    def _one_generation_per_definition(self) -> EmulatorSpec:
        # hyperVGeneration belongs to the image definition: its versions cannot differ.
        seen: dict[str, str] = {}
        for image in self.images:
            definition = image.id.lower().rsplit("/versions/", 1)[0]
            if seen.setdefault(definition, image.hyper_v_generation) != image.hyper_v_generation:
                raise ValueError(
                    f"images of one definition differ in hyper_v_generation: {image.id}"
                )
        return self

    def hardware(self, cluster: str) -> Hardware:
        """The zone, security type and OS disk size of ``cluster``'s VMs."""
        values: dict[str, Any] = {
            "zone": self.zone,
            "security_type": self.security_type,
            "os_disk_size_gb": self.os_disk_size_gb,
        }
        override = self.clusters.get(cluster)
        if override is not None:
            values.update(
                {k: getattr(override, k) for k in override.model_fields_set if k in values}
            )
        if values["security_type"] is None:
            values["security_type"] = self.security_type
        return Hardware.model_validate(values)

    def hsm_copies(self, cluster: str) -> HsmCopies:
        """``cluster``'s HSM copies: its ``clusters:`` entry, else the section's ``hsm``."""
        override = self.clusters.get(cluster)
        return override.hsm if override is not None and override.hsm is not None else self.hsm


class SimWorld(BaseModel):
    """Inventory plus emulator knobs, with defaults resolved (images, initial image)."""

    model_config = ConfigDict(frozen=True)
    fleet: Fleet
    spec: EmulatorSpec

    @property
    def images(self) -> list[ImageSpec]:
        return self.spec.images

    @property
    def initial_image(self) -> ImageSpec:
        wanted = (self.spec.initial_image or self.spec.images[0].id).lower()
        for image in self.spec.images:
            if image.id.lower() == wanted:
                return image
        raise InventoryError(f"emulator.initial_image {self.spec.initial_image} is not in images")

    def check_hardware(self, source: str) -> None:
        """Refuse hardware Azure would not build: a Trusted Launch VM from a generation 1
        image (learn.microsoft.com/azure/virtual-machines/trusted-launch: "Trusted launch
        ... generation 2 VMs"), an OS disk smaller than its image, an override of a
        cluster the fleet does not have."""
        image = self.initial_image
        names = {c.name for c in self.fleet.clusters}
        unknown = sorted(set(self.spec.clusters) - names)
        if unknown:
            raise InventoryError(
                f"{source}: emulator.clusters names clusters not in the fleet: "
                + ", ".join(unknown[:3])
            )
        for cluster in self.fleet.clusters:
            hw = self.spec.hardware(cluster.name)
            if hw.security_type == "TrustedLaunch" and image.hyper_v_generation != "V2":
                raise InventoryError(
                    f"{source}: cluster {cluster.name}: TrustedLaunch needs a generation V2 "
                    f"image; the initial image is {image.hyper_v_generation}"
                )
            if hw.os_disk_size_gb is not None and hw.os_disk_size_gb < image.disk_size_gb:
                raise InventoryError(
                    f"{source}: cluster {cluster.name}: os_disk_size_gb {hw.os_disk_size_gb} "
                    f"is smaller than the initial image's {image.disk_size_gb} GB"
                )


def default_images(fleet: Fleet) -> list[ImageSpec]:
    """Two releases in a gallery of the first subscription: the running one and the next."""
    sub = fleet.clusters[0].subscription_id
    ids = [
        gallery_image_version_id(sub, "rg-amlfs-images", "amlfsgallery", "amlfs-lustre", v)
        for v in ("2.15.5", "2.15.6")
    ]
    return [
        ImageSpec(id=ids[0], os_version="ubuntu-22.04.20260901", lustre_version="2.15.5"),
        ImageSpec(id=ids[1], os_version="ubuntu-22.04.20261101", lustre_version="2.15.6"),
    ]


def check_loopback(fleet: Fleet, source: str) -> None:
    """Refuse a fleet whose nodes would make the emulator listen beyond loopback.

    Each emulated node listens (SSH, keys derived from the seed) on its fleet ``address``
    itself: 10.0.0.4 from a real inventory, or 0.0.0.0, would open those to the network.
    """
    outside = [
        f"{cluster.name} > {node.name} > address {node.address}"
        for cluster, node in fleet.iter_nodes()
        if node.address is not None and node.address not in LOOPBACK
    ]
    if outside:
        shown = "; ".join(outside[:3]) + (
            f"; and {len(outside) - 3} more" if len(outside) > 3 else ""
        )
        raise InventoryError(
            f"{source}: the emulator listens on each node's address and only on loopback "
            f"({LOOPBACK}); {len(outside)} node(s) outside it: {shown}"
        )


def check_loopback_host(host: str) -> None:
    """Refuse an emulator HTTPS address beyond loopback (its control API has no auth)."""
    try:
        inside = IPv4Address(host) in LOOPBACK
    except ValueError:
        inside = False
    if not inside:
        raise InventoryError(f"the emulator serves only on loopback ({LOOPBACK}), got {host!r}")


def build_world(data: dict[str, Any], source: str) -> SimWorld:
    emulator_section = data.get("emulator") or {}
    fleet = parse_fleet(data, source=source)
    check_loopback(fleet, source)
    try:
        spec = EmulatorSpec.model_validate(emulator_section)
    except ValueError as err:
        raise InventoryError(f"invalid emulator section in {source}: {err}") from err
    if not spec.images:
        spec = spec.model_copy(update={"images": default_images(fleet)})
    world = SimWorld(fleet=fleet, spec=spec)
    world.initial_image  # noqa: B018  (validates initial_image early)
    world.check_hardware(source)
    return world


def load_world(path: str | Path) -> SimWorld:
    path = Path(path)
    data = read_yaml(path, kind="fleet file", max_bytes=FLEET_MAX_BYTES)
    if not isinstance(data, dict):
        raise InventoryError(f"fleet file {path}: top level must be a mapping")
    return build_world(data, str(path))
