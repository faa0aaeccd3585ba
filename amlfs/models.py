"""Fleet inventory and releases: what the orchestrator is told to maintain.

A fleet is a list of clusters; a cluster is a set of Azure VMs (nodes) with Lustre roles, a
weekly maintenance window, a wave and blackout dates. Everything is validated up front with
errors that name the field, because nothing may change in Azure on the strength of a bad file.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator, Sequence
from enum import StrEnum
from ipaddress import IPv4Address
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from amlfs.errors import InventoryError
from amlfs.ids import parse_resource_id, vm_id

__all__ = [
    "Blackout",
    "Cluster",
    "DateRange",
    "DayOfWeek",
    "Fleet",
    "Node",
    "Release",
    "Role",
    "Window",
    "is_blacked_out",
    "load_fleet",
    "load_release",
    "parse_fleet",
    "parse_release",
]


class Role(StrEnum):
    """Lustre role of a node, as in the deck."""

    MDS = "mds"  # MGS + MDT
    OSS = "oss"  # OSTs
    AGTPRI = "agtpri"  # primary HSM agent, runs the hydrator
    AGTSTD = "agtstd"  # standard HSM agent
    LCLIENT = "lclient"  # in-cluster Lustre client used for checks


class DayOfWeek(StrEnum):
    MONDAY = "monday"
    TUESDAY = "tuesday"
    WEDNESDAY = "wednesday"
    THURSDAY = "thursday"
    FRIDAY = "friday"
    SATURDAY = "saturday"
    SUNDAY = "sunday"

    @property
    def weekday(self) -> int:
        """0 for Monday .. 6 for Sunday, as ``datetime.date.weekday()``."""
        return list(DayOfWeek).index(self)


def _day_of_week(value: Any) -> Any:
    days = list(DayOfWeek)
    if isinstance(value, bool):
        raise ValueError("day_of_week must be a day name or 0-6 (0 = monday)")
    if isinstance(value, int):
        if 0 <= value <= 6:
            return days[value]
        raise ValueError(f"day_of_week must be 0-6 (0 = monday), got {value}")
    if isinstance(value, str):
        text = value.strip().lower()
        for day in days:
            if text in (day.value, day.value[:3]):
                return day
    raise ValueError(
        f"day_of_week must be one of {', '.join(d.value for d in days)} (or mon..sun, 0-6), "
        f"got {value!r}"
    )


_HHMM = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")


class Window(BaseModel):
    """A cluster's weekly maintenance window, in UTC."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    day_of_week: Annotated[DayOfWeek, BeforeValidator(_day_of_week)]
    start_utc: str
    duration_min: int = Field(default=30, ge=1, le=1440)

    @field_validator("start_utc", mode="before")
    @classmethod
    def _hhmm(cls, value: Any) -> Any:
        if not isinstance(value, str) or not _HHMM.match(value):
            raise ValueError(f"start_utc must be HH:MM in UTC (00:00-23:59), got {value!r}")
        return value

    @property
    def start_time(self) -> dt.time:
        hours, minutes = self.start_utc.split(":")
        return dt.time(int(hours), int(minutes))


class DateRange(BaseModel):
    """Inclusive range of dates."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    start: dt.date
    end: dt.date

    @model_validator(mode="after")
    def _ordered(self) -> DateRange:
        if self.end < self.start:
            raise ValueError(f"end {self.end} is before start {self.start}")
        return self

    def contains(self, day: dt.date) -> bool:
        return self.start <= day <= self.end


def _blackout(value: Any) -> dt.date | DateRange:
    # One validator instead of a union, so a bad entry gets one error, not one per branch.
    if isinstance(value, DateRange | dt.date) and not isinstance(value, dt.datetime):
        return value
    if isinstance(value, dict):
        try:
            return DateRange.model_validate(value)
        except ValidationError as err:
            problems = "; ".join(
                ("{}: ".format(".".join(map(str, e["loc"]))) if e["loc"] else "")
                + str(e["msg"]).removeprefix("Value error, ")
                for e in err.errors(include_url=False)
            )
            raise ValueError(f"blackout range: {problems}") from None
    if isinstance(value, str):
        try:
            return dt.date.fromisoformat(value)
        except ValueError:
            pass
    raise ValueError(
        f"a blackout is a date (YYYY-MM-DD) or {{start: YYYY-MM-DD, end: YYYY-MM-DD}}, got {value!r}"
    )


Blackout = Annotated[
    dt.date | DateRange,
    PlainValidator(_blackout),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "format": "date"},
                {
                    "type": "object",
                    "properties": {
                        "start": {"type": "string", "format": "date"},
                        "end": {"type": "string", "format": "date"},
                    },
                    "required": ["start", "end"],
                },
            ]
        }
    ),
]


def is_blacked_out(day: dt.date, blackouts: Sequence[Blackout]) -> bool:
    return any((b.contains(day) if isinstance(b, DateRange) else b == day) for b in blackouts)


_VM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_CLUSTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,79}$")
_GUID = re.compile(r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")
_RESOURCE_GROUP = re.compile(r"^[-\w.()]{1,90}$")
_REGION = re.compile(r"^[a-z0-9]+$")
_WAVE = re.compile(r"^[A-Za-z0-9_-]{1,40}$")
_RELEASE_VERSION = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_GALLERY_VERSION = re.compile(r"^\d+\.\d+\.\d+$")


class Node(BaseModel):
    """One Azure VM of a cluster."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    role: Role
    address: IPv4Address | None = None

    @field_validator("name")
    @classmethod
    def _vm_name(cls, value: str) -> str:
        if not _VM_NAME.match(value) or value[-1] in ".-":
            raise ValueError(
                f"{value!r} is not a valid Azure VM name (1-64 letters, digits, '_', '.', '-'; "
                "starts with a letter or digit, does not end with '.' or '-')"
            )
        return value


class Cluster(BaseModel):
    """One AMLFS cluster: where it lives in Azure, when it may be maintained, its VMs."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    subscription_id: str
    resource_group: str
    region: str
    window: Window
    wave: str = "default"
    blackout_dates: list[Blackout] = []
    tags: dict[str, str] = {}
    nodes: list[Node] = Field(min_length=1)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _CLUSTER_NAME.match(value):
            raise ValueError(
                f"{value!r} is not a valid cluster name (1-80 letters, digits, '-', "
                "starting with a letter or digit)"
            )
        return value

    @field_validator("subscription_id")
    @classmethod
    def _subscription(cls, value: str) -> str:
        if not _GUID.match(value):
            raise ValueError(f"subscription_id must be a GUID, got {value!r}")
        return value.lower()

    @field_validator("resource_group")
    @classmethod
    def _resource_group(cls, value: str) -> str:
        if not _RESOURCE_GROUP.match(value) or value.endswith("."):
            raise ValueError(
                f"{value!r} is not a valid resource group name (1-90 letters, digits, "
                "'_', '-', '.', '(', ')'; not ending with '.')"
            )
        return value

    @field_validator("region")
    @classmethod
    def _region(cls, value: str) -> str:
        if not _REGION.match(value):
            raise ValueError(f"region must be an Azure region name such as 'eastus', got {value!r}")
        return value

    @field_validator("wave")
    @classmethod
    def _wave(cls, value: str) -> str:
        if not _WAVE.match(value):
            raise ValueError(f"wave must be 1-40 letters, digits, '_' or '-', got {value!r}")
        return value

    @model_validator(mode="after")
    def _roles(self) -> Cluster:
        mds = self.nodes_with_role(Role.MDS)
        if len(mds) != 1:
            raise ValueError(
                f"cluster {self.name!r} must have exactly one mds node, found {len(mds)}"
            )
        if not self.nodes_with_role(Role.OSS):
            raise ValueError(f"cluster {self.name!r} must have at least one oss node, found 0")
        seen: set[str] = set()
        for node in self.nodes:
            if node.name.lower() in seen:
                raise ValueError(f"cluster {self.name!r} lists node {node.name!r} twice")
            seen.add(node.name.lower())
        return self

    def nodes_with_role(self, role: Role) -> list[Node]:
        return [n for n in self.nodes if n.role is role]

    @property
    def mds(self) -> Node:
        return self.nodes_with_role(Role.MDS)[0]

    def vm_id(self, node: Node) -> str:
        return vm_id(self.subscription_id, self.resource_group, node.name)


class Fleet(BaseModel):
    """Every cluster under maintenance, plus fleet-wide blackout dates."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    clusters: list[Cluster] = Field(min_length=1)
    blackout_dates: list[Blackout] = []

    @model_validator(mode="after")
    def _unique(self) -> Fleet:
        names: set[str] = set()
        vms: dict[tuple[str, str, str], str] = {}
        addresses: dict[IPv4Address, str] = {}
        for cluster in self.clusters:
            if cluster.name in names:
                raise ValueError(f"cluster name {cluster.name!r} is used twice")
            names.add(cluster.name)
            for node in cluster.nodes:
                key = (cluster.subscription_id, cluster.resource_group.lower(), node.name.lower())
                if key in vms and vms[key] != cluster.name:
                    raise ValueError(
                        f"VM {node.name!r} of cluster {cluster.name!r} is also in cluster "
                        f"{vms[key]!r} (same subscription and resource group)"
                    )
                vms[key] = cluster.name
                if node.address is not None:
                    if node.address in addresses:
                        raise ValueError(
                            f"address {node.address} of {node.name!r} is also used by "
                            f"{addresses[node.address]!r}"
                        )
                    addresses[node.address] = node.name
        return self

    def cluster(self, name: str) -> Cluster:
        for cluster in self.clusters:
            if cluster.name == name:
                return cluster
        raise KeyError(f"no cluster named {name!r} in the fleet")

    def iter_nodes(self) -> Iterator[tuple[Cluster, Node]]:
        for cluster in self.clusters:
            for node in cluster.nodes:
                yield cluster, node


IMAGE_VERSION_TYPE = "Microsoft.Compute/galleries/images/versions"


class ReleaseFile(BaseModel):
    """A config file the release adds or replaces on nodes of the given roles."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    path: str
    content: str
    roles: list[Role] = list(Role)

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/etc/") or ".." in value.split("/"):
            raise ValueError(f"must be an absolute path under /etc/, got {value!r}")
        return value


class Release(BaseModel):
    """What to install: a gallery image version, the Lustre it runs, and its config changes.

    ``files`` are overlaid on each node's restored config; ``tunables`` are set with
    ``lctl set_param -P`` on the MGS after the swap (name -> value).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    image_id: str
    version: str
    lustre_version: str | None = None  # checked on every node after the swap when given
    files: list[ReleaseFile] = []
    tunables: dict[str, str] = {}

    @field_validator("tunables")
    @classmethod
    def _tunables(cls, value: dict[str, str]) -> dict[str, str]:
        for name, setting in value.items():
            if not re.match(r"^[A-Za-z0-9_.*-]+$", name):
                raise ValueError(f"tunable name {name!r} is not a Lustre parameter name")
            if not re.match(r"^[A-Za-z0-9_.:,/-]+$", str(setting)):
                raise ValueError(f"tunable {name}: value {setting!r} has unexpected characters")
        return value

    def files_for(self, role: Role) -> dict[str, str]:
        return {f.path: f.content for f in self.files if role in f.roles}

    @field_validator("image_id")
    @classmethod
    def _image_id(cls, value: str) -> str:
        rid = parse_resource_id(value)
        if not rid.is_type(IMAGE_VERSION_TYPE):
            raise ValueError(
                f"must be a gallery image version id (.../galleries/<g>/images/<i>/versions/<v>), "
                f"got a {rid.full_type}"
            )
        if not _GALLERY_VERSION.match(rid.name):
            raise ValueError(
                f"gallery image version must be MAJOR.MINOR.PATCH integers, got {rid.name!r}"
            )
        return value

    @field_validator("version")
    @classmethod
    def _version(cls, value: str) -> str:
        if not _RELEASE_VERSION.match(value):
            raise ValueError(
                f"version must be 1-64 letters, digits, '.', '_' or '-' (it becomes an Azure tag), "
                f"got {value!r}"
            )
        return value

    @property
    def subscription_id(self) -> str:
        return parse_resource_id(self.image_id).subscription_id

    @property
    def resource_group(self) -> str:
        return parse_resource_id(self.image_id).resource_group

    @property
    def gallery(self) -> str:
        return parse_resource_id(self.image_id).names[0]

    @property
    def image_definition(self) -> str:
        return parse_resource_id(self.image_id).names[1]

    @property
    def image_version(self) -> str:
        return parse_resource_id(self.image_id).names[2]


# ------------------------------------------------------------------------ loading


def _describe_location(data: Any, loc: tuple[int | str, ...]) -> str:
    """``clusters[1] 'lustre-b' > nodes[0] 'lustre-b-oss0' > role`` from pydantic's loc."""
    parts: list[str] = []
    node: Any = data
    for item in loc:
        if isinstance(item, int):
            label = f"[{item}]"
            node = node[item] if isinstance(node, list) and item < len(node) else None
            name = node.get("name") if isinstance(node, dict) else None
            if parts:
                parts[-1] += label + (f" {name!r}" if isinstance(name, str) else "")
            else:
                parts.append(label)
        else:
            node = node.get(item) if isinstance(node, dict) else None
            if "[" in str(item):  # pydantic's validator tags, e.g. function-after[...], skip
                continue
            parts.append(str(item))
    return " > ".join(parts) or "(top level)"


def _invalid(kind: str, source: str, data: Any, err: ValidationError) -> InventoryError:
    lines = []
    for problem in err.errors(include_url=False, include_input=False):
        message = str(problem["msg"]).removeprefix("Value error, ")
        lines.append(f"{source}: {_describe_location(data, tuple(problem['loc']))}: {message}")
    unique = list(dict.fromkeys(lines))
    return InventoryError(
        f"invalid {kind} {source}: {len(unique)} problem(s)\n" + "\n".join(unique)
    )


def _read_yaml(path: Path, kind: str) -> Any:
    try:
        text = path.read_text()
    except OSError as err:
        raise InventoryError(f"cannot read {kind} {path}: {err.strerror or err}") from err
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "syntax error"
        raise InventoryError(f"{kind} {path} is not valid YAML{where}: {problem}") from err


def parse_fleet(data: object, *, source: str = "<fleet>") -> Fleet:
    """Validate an already-loaded fleet document; raise InventoryError naming each bad field."""
    if not isinstance(data, dict):
        raise InventoryError(f"invalid fleet file {source}: the top level must be a mapping")
    # The emulator's own section (images, durations...) is read only by amlfs_sim.
    inventory = {k: v for k, v in data.items() if k != "emulator"}
    try:
        return Fleet.model_validate(inventory)
    except ValidationError as err:
        raise _invalid("fleet file", source, inventory, err) from None


def load_fleet(path: str | Path) -> Fleet:
    path = Path(path)
    return parse_fleet(_read_yaml(path, "fleet file"), source=str(path))


def parse_release(data: object, *, source: str = "<release>") -> Release:
    if not isinstance(data, dict):
        raise InventoryError(f"invalid release {source}: the top level must be a mapping")
    try:
        return Release.model_validate(data)
    except ValidationError as err:
        raise _invalid("release", source, data, err) from None


def load_release(path: str | Path) -> Release:
    path = Path(path)
    return parse_release(_read_yaml(path, "release"), source=str(path))
