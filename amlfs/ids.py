"""Azure Resource Manager resource ids: build and parse the few kinds this project uses.

A resource id looks like
``/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Compute/{type}/{name}[/{type}/{name}...]``.
ARM treats ids case-insensitively; these helpers keep the caller's spelling and compare
lower-cased.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "KEEP_TAG",
    "TAG_RELEASE",
    "TAG_REPLACES",
    "TAG_RUN",
    "TAG_VM",
    "ResourceId",
    "disk_id",
    "gallery_image_version_id",
    "new_os_disk_name",
    "parse_resource_id",
    "vm_id",
]

# Tags on the OS disks this tool creates: after a crash, Azure itself says which disk replaces
# which, for which VM, release and run. An old disk kept on purpose carries KEEP_TAG.
TAG_RUN = "amlfs-run"
TAG_VM = "amlfs-vm"
TAG_REPLACES = "amlfs-replaces"
TAG_RELEASE = "amlfs-release"
KEEP_TAG = "amlfs-keep-until"


def new_os_disk_name(vm: str, release_version: str) -> str:
    """The name of the OS disk made for ``vm`` from ``release_version`` (one per pair: a
    retried or resumed run finds the disk it made instead of making another)."""
    return f"{vm}-osdisk-{release_version}"


_GUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
_RG = r"[-\w._()]{1,90}"
_SEGMENT = r"[^/]+"
_ID_RE = re.compile(
    rf"^/subscriptions/(?P<sub>{_GUID})/resourceGroups/(?P<rg>{_RG})"
    rf"/providers/(?P<ns>[A-Za-z][\w.]*)(?P<rest>(?:/{_SEGMENT}/{_SEGMENT})+)$",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class ResourceId:
    """A parsed ARM resource id: subscription, group, provider namespace and type/name pairs."""

    subscription_id: str
    resource_group: str
    namespace: str
    types: tuple[str, ...]
    names: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.names[-1]

    @property
    def full_type(self) -> str:
        """``Microsoft.Compute/galleries/images/versions`` style type, as ARM spells it."""
        return "/".join((self.namespace, *self.types))

    def is_type(self, full_type: str) -> bool:
        return self.full_type.lower() == full_type.lower()

    def __str__(self) -> str:
        pairs = "".join(f"/{t}/{n}" for t, n in zip(self.types, self.names, strict=True))
        return (
            f"/subscriptions/{self.subscription_id}/resourceGroups/{self.resource_group}"
            f"/providers/{self.namespace}{pairs}"
        )


def parse_resource_id(value: str) -> ResourceId:
    """Parse an ARM resource id; raise ValueError saying what is malformed."""
    match = _ID_RE.match(value.strip())
    if match is None:
        raise ValueError(
            f"not an Azure resource id: {value!r} (expected /subscriptions/<guid>/resourceGroups/"
            "<group>/providers/<Namespace>/<type>/<name>)"
        )
    parts = match["rest"].strip("/").split("/")
    return ResourceId(
        subscription_id=match["sub"].lower(),
        resource_group=match["rg"],
        namespace=match["ns"],
        types=tuple(parts[0::2]),
        names=tuple(parts[1::2]),
    )


def vm_id(subscription_id: str, resource_group: str, name: str) -> str:
    return (
        f"/subscriptions/{subscription_id}/resourceGroups/{resource_group}"
        f"/providers/Microsoft.Compute/virtualMachines/{name}"
    )


def disk_id(subscription_id: str, resource_group: str, name: str) -> str:
    return (
        f"/subscriptions/{subscription_id}/resourceGroups/{resource_group}"
        f"/providers/Microsoft.Compute/disks/{name}"
    )


def gallery_image_version_id(
    subscription_id: str, resource_group: str, gallery: str, image: str, version: str
) -> str:
    return (
        f"/subscriptions/{subscription_id}/resourceGroups/{resource_group}"
        f"/providers/Microsoft.Compute/galleries/{gallery}/images/{image}/versions/{version}"
    )
