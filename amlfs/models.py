"""Fleet inventory and releases: what the orchestrator is told to maintain.

A fleet is a list of clusters; a cluster is a set of Azure VMs (nodes) with Lustre roles, a
weekly maintenance window, a wave and blackout dates. Everything is validated up front with
errors that name the field, because nothing may change in Azure on the strength of a bad file.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import threading
from collections.abc import Iterator, Sequence
from enum import StrEnum
from ipaddress import IPv4Address
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError
from yaml.scanner import ScannerError

from amlfs.errors import InventoryError, validation_problem
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
    "Text",
    "Window",
    "check_image_version_id",
    "is_blacked_out",
    "load_fleet",
    "load_release",
    "parse_fleet",
    "parse_release",
    "read_yaml",
]

FLEET_MAX_BYTES = 8 * 1024 * 1024
RELEASE_MAX_BYTES = 2 * 1024 * 1024  # the files it brings may total 1 MiB, plus the YAML around
RELEASE_FILE_MAX_BYTES = 64 * 1024
RELEASE_FILES_MAX_BYTES = 1024 * 1024
YAML_MAX_DEPTH = 20  # a fleet file nests 5 deep; the emulator section a few more
SHOWN_CHARS = 80  # a value quoted in an error is cut to this: values may be huge, or secret


def _show(value: object) -> str:
    """``repr(value)``, cut to SHOWN_CHARS: error messages quote input without echoing all of it."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else f"{text[: SHOWN_CHARS - 5]}...{text[-2:]}"


# C0, DEL, C1, the line/paragraph separators, bidi overrides and zero-width characters: none
# belongs in a name, address, tag, path or tunable; each would reach a node's command line,
# a file or a log, and a trailing newline passed the old `^...$` checks.
_CONTROL_CLASS = (
    r"\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2064"
    r"\u2066-\u2069\ufeff\ud800-\udfff"
)
_CONTROL = re.compile(rf"[\t\n{_CONTROL_CLASS}]")
_CONTROL_IN_CONTENT = re.compile(rf"[{_CONTROL_CLASS}]")  # file contents keep \n and \t


def _no_control(value: str) -> str:
    found = _CONTROL.search(value)
    if found is not None:
        raise ValueError(
            f"must not contain control characters, found {found.group()!r} at position "
            f"{found.start()} of {_show(value)}"
        )
    return value


Text = Annotated[str, AfterValidator(_no_control)]  # every string of the fleet and release


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
    if isinstance(value, str):
        _no_control(value)  # before strip(): "tuesday\n" is not a day name
    if isinstance(value, bool):
        raise ValueError("day_of_week must be a day name or 0-6 (0 = monday)")
    if isinstance(value, int):
        if 0 <= value <= 6:
            return days[value]
        raise ValueError(f"day_of_week must be 0-6 (0 = monday), got {_show(value)}")
    if isinstance(value, str):
        text = value.strip().lower()
        for day in days:
            if text in (day.value, day.value[:3]):
                return day
    raise ValueError(
        f"day_of_week must be one of {', '.join(d.value for d in days)} (or mon..sun, 0-6), "
        f"got {_show(value)}"
    )


_HHMM = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])")


class Window(BaseModel):
    """A cluster's weekly maintenance window, in UTC."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    day_of_week: Annotated[DayOfWeek, BeforeValidator(_day_of_week)]
    start_utc: str
    duration_min: int = Field(default=30, ge=1, le=1440)

    @field_validator("start_utc", mode="before")
    @classmethod
    def _hhmm(cls, value: Any) -> Any:
        if not isinstance(value, str) or not _HHMM.fullmatch(value):
            raise ValueError(f"start_utc must be HH:MM in UTC (00:00-23:59), got {_show(value)}")
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
                + validation_problem(e)
                for e in err.errors(include_url=False, include_input=False)
            )
            raise ValueError(f"blackout range: {problems}") from None
    if isinstance(value, str):
        try:
            return dt.date.fromisoformat(value)
        except ValueError:
            pass
    raise ValueError(
        "a blackout is a date (YYYY-MM-DD) or {start: YYYY-MM-DD, end: YYYY-MM-DD}, "
        f"got {_show(value)}"
    )


def _blackout_json(value: dt.date | DateRange) -> Any:
    return value.model_dump(mode="json") if isinstance(value, DateRange) else value.isoformat()


Blackout = Annotated[
    dt.date | DateRange,
    PlainValidator(_blackout),
    # Without it, pydantic's union serializer warns on every JSON dump (a job, a record).
    PlainSerializer(_blackout_json, when_used="json"),
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


# Every pattern is used with fullmatch: `^...$` with match() also accepts a trailing newline.
_VM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_CLUSTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,79}")
_GUID = re.compile(r"[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
_RESOURCE_GROUP = re.compile(r"[-\w.()]{1,90}")  # ARM allows Unicode letters and digits here
_REGION = re.compile(r"[a-z0-9]{1,40}")
_WAVE = re.compile(r"[A-Za-z0-9_-]{1,40}")
_RELEASE_VERSION = re.compile(r"[A-Za-z0-9._-]{1,64}")
_LUSTRE_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
_TAG_NAME_MAX, _TAG_VALUE_MAX = 512, 256  # Azure's limits on tags


class Node(BaseModel):
    """One Azure VM of a cluster."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: Text
    role: Role
    address: IPv4Address | None = None

    @field_validator("name")
    @classmethod
    def _vm_name(cls, value: str) -> str:
        if not _VM_NAME.fullmatch(value) or value[-1] in ".-":
            raise ValueError(
                f"{_show(value)} is not a valid Azure VM name (1-64 letters, digits, '_', '.', '-'; "
                "starts with a letter or digit, does not end with '.' or '-')"
            )
        return value


class Cluster(BaseModel):
    """One AMLFS cluster: where it lives in Azure, when it may be maintained, its VMs."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: Text
    subscription_id: Text
    resource_group: Text
    region: Text
    window: Window
    wave: Text = "default"
    blackout_dates: list[Blackout] = []
    tags: dict[Text, Text] = {}
    nodes: list[Node] = Field(min_length=1)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _CLUSTER_NAME.fullmatch(value):
            raise ValueError(
                f"{_show(value)} is not a valid cluster name (1-80 letters, digits, '-', "
                "starting with a letter or digit)"
            )
        return value

    @field_validator("subscription_id")
    @classmethod
    def _subscription(cls, value: str) -> str:
        if not _GUID.fullmatch(value):
            raise ValueError(f"subscription_id must be a GUID, got {_show(value)}")
        return value.lower()

    @field_validator("resource_group")
    @classmethod
    def _resource_group(cls, value: str) -> str:
        if not _RESOURCE_GROUP.fullmatch(value) or value.endswith("."):
            raise ValueError(
                f"{_show(value)} is not a valid resource group name (1-90 letters, digits, "
                "'_', '-', '.', '(', ')'; not ending with '.')"
            )
        return value

    @field_validator("region")
    @classmethod
    def _region(cls, value: str) -> str:
        if not _REGION.fullmatch(value):
            raise ValueError(
                f"region must be an Azure region name such as 'eastus', got {_show(value)}"
            )
        return value

    @field_validator("wave")
    @classmethod
    def _wave(cls, value: str) -> str:
        if not _WAVE.fullmatch(value):
            raise ValueError(f"wave must be 1-40 letters, digits, '_' or '-', got {_show(value)}")
        return value

    @field_validator("tags")
    @classmethod
    def _tags(cls, value: dict[str, str]) -> dict[str, str]:
        for name, setting in value.items():
            if not 1 <= len(name) <= _TAG_NAME_MAX:
                raise ValueError(f"tag names are 1-{_TAG_NAME_MAX} characters, got {_show(name)}")
            if len(setting) > _TAG_VALUE_MAX:
                raise ValueError(
                    f"tag {_show(name)}: values are at most {_TAG_VALUE_MAX} characters, "
                    f"got {len(setting)}"
                )
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
# The whole id, as ARM names its parts (gallery: letters, digits, '_', '.'; image definition:
# also '-'; version: three integers). Checked on the value stored, not a stripped copy.
_IMAGE_VERSION_ID = re.compile(
    r"/subscriptions/[0-9a-f]{8}-(?:[0-9a-f]{4}-){3}[0-9a-f]{12}"
    r"/resourceGroups/[-\w.()]{0,89}[-\w()]"
    r"/providers/Microsoft\.Compute/galleries/[a-z0-9][a-z0-9_.]{0,79}"
    r"/images/[a-z0-9][a-z0-9_.-]{0,79}/versions/[0-9]{1,10}\.[0-9]{1,10}\.[0-9]{1,10}",
    re.IGNORECASE,
)


def check_image_version_id(value: str) -> str:
    """A gallery image version id, checked whole; returns it as given (ARM ignores case)."""
    _no_control(value)
    if value != value.strip():
        raise ValueError(f"must not start or end with spaces, got {_show(value)}")
    try:
        rid = parse_resource_id(value)
    except ValueError:
        raise ValueError(
            f"not an Azure resource id: {_show(value)} (expected /subscriptions/<guid>/"
            "resourceGroups/<group>/providers/<Namespace>/<type>/<name>)"
        ) from None
    if not rid.is_type(IMAGE_VERSION_TYPE):
        raise ValueError(
            f"must be a gallery image version id (.../galleries/<g>/images/<i>/versions/<v>), "
            f"got a {_show(rid.full_type)}"
        )
    if not re.fullmatch(r"[0-9]{1,10}\.[0-9]{1,10}\.[0-9]{1,10}", rid.name):
        raise ValueError(
            f"gallery image version must be MAJOR.MINOR.PATCH integers, got {_show(rid.name)}"
        )
    if not _IMAGE_VERSION_ID.fullmatch(value):
        raise ValueError(
            "gallery image version id has a malformed resource group, gallery or image name "
            "(gallery: 1-80 letters, digits, '_', '.'; image: also '-'; each starting with a "
            f"letter or digit), got {_show(value)}"
        )
    return value


# Where a release may put config: Lustre's, ours, the HSM agent's (the hydrator's is under
# /etc/amlfs/). Anything else (/etc/shadow, sudoers, sshd drop-ins) is not a release's business.
RELEASE_FILE_DIRS = ("/etc/lustre/", "/etc/amlfs/", "/etc/lhsmd/")
_MODPROBE_LUSTRE = re.compile(r"/etc/modprobe\.d/lustre[A-Za-z0-9_.+@-]*\.conf")
# Captured from each node before the swap and restored after it: they make the node itself
# (its pools' hostid, its targets, its NIDs), so a fleet-wide file must not replace them.
NODE_IDENTITY_FILES = (
    "/etc/hostid",
    "/etc/ldev.conf",
    "/etc/lnet.conf",
    "/etc/modprobe.d/lustre.conf",
)
_PATH_COMPONENTS = re.compile(r"(?:/[A-Za-z0-9_.+@-]+)+")
_PATH_MAX = 255


def _release_path(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError(f"must be an absolute path, got {_show(value)}")
    if "//" in value or value.endswith("/"):
        raise ValueError(f"must not contain '//' or end with '/', got {_show(value)}")
    if any(part in (".", "..") for part in value.split("/")):
        raise ValueError(f"must not contain '.' or '..' components, got {_show(value)}")
    if not _PATH_COMPONENTS.fullmatch(value) or len(value) > _PATH_MAX:
        raise ValueError(
            f"must be at most {_PATH_MAX} characters, letters, digits and '_', '.', '+', '@', "
            f"'-' between the slashes, got {_show(value)}"
        )
    if value in NODE_IDENTITY_FILES:
        raise ValueError(
            f"{value} is a node's own identity (captured before the swap and restored after "
            "it); a release may not replace it"
        )
    if not (value.startswith(RELEASE_FILE_DIRS) or _MODPROBE_LUSTRE.fullmatch(value)):
        raise ValueError(
            f"a release may write only under {', '.join(RELEASE_FILE_DIRS)} or "
            f"/etc/modprobe.d/lustre*.conf, got {_show(value)}"
        )
    return value


def _size(limit: int) -> str:
    unit = f"{limit >> 20} MiB" if limit % (1 << 20) == 0 else f"{limit >> 10} KiB"
    return f"{unit} ({limit:,} bytes)"


class ReleaseFile(BaseModel):
    """A config file the release adds or replaces on nodes of the given roles."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    path: Text
    content: str
    roles: list[Role] = list(Role)

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        return _release_path(value)

    @field_validator("content")
    @classmethod
    def _content(cls, value: str) -> str:
        # The content itself is never quoted: config files may carry credentials.
        found = _CONTROL_IN_CONTENT.search(value)
        if found is not None:
            line = value.count("\n", 0, found.start()) + 1
            raise ValueError(
                f"content has control character {found.group()!r} at line {line} (only newlines "
                "and tabs are allowed)"
            )
        size = len(value.encode())
        if size > RELEASE_FILE_MAX_BYTES:
            raise ValueError(
                f"content is {size:,} bytes, more than the {_size(RELEASE_FILE_MAX_BYTES)} "
                "a release file may have"
            )
        return value


_TUNABLE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.*-]{0,127}")
_TUNABLE_VALUE = re.compile(r"[A-Za-z0-9_.:,/-]{1,256}")


class Release(BaseModel):
    """What to install: a gallery image version, the Lustre it runs, and its config changes.

    ``files`` are overlaid on each node's restored config; ``tunables`` are set with
    ``lctl set_param -P`` on the MGS after the swap (name -> value).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    image_id: Text
    version: Text
    lustre_version: Text | None = None  # checked on every node after the swap when given
    files: list[ReleaseFile] = []
    tunables: dict[str, str] = {}

    @field_validator("tunables")
    @classmethod
    def _tunables(cls, value: dict[str, str]) -> dict[str, str]:
        for name, setting in value.items():
            if not _TUNABLE_NAME.fullmatch(name):
                raise ValueError(
                    f"tunable name {_show(name)} is not a Lustre parameter name (a letter, then "
                    "up to 127 letters, digits, '_', '.', '*', '-')"
                )
            if not _TUNABLE_VALUE.fullmatch(setting):
                raise ValueError(
                    f"tunable {name}: value {_show(setting)} must be 1-256 letters, digits, "
                    "'_', '.', ':', ',', '/', '-'"
                )
        return value

    @field_validator("files")
    @classmethod
    def _files(cls, value: list[ReleaseFile]) -> list[ReleaseFile]:
        total = sum(len(f.content.encode()) for f in value)
        if total > RELEASE_FILES_MAX_BYTES:
            raise ValueError(
                f"files total {total:,} bytes, more than the {_size(RELEASE_FILES_MAX_BYTES)} "
                "a release may bring"
            )
        roles_by_path: dict[str, set[Role]] = {}
        for file in value:
            seen = roles_by_path.setdefault(file.path, set())
            if twice := seen & set(file.roles):
                raise ValueError(
                    f"{file.path} is listed twice for role(s) "
                    f"{', '.join(sorted(r.value for r in twice))}"
                )
            seen.update(file.roles)
        return value

    def files_for(self, role: Role) -> dict[str, str]:
        return {f.path: f.content for f in self.files if role in f.roles}

    @field_validator("image_id")
    @classmethod
    def _image_id(cls, value: str) -> str:
        return check_image_version_id(value)

    @field_validator("version")
    @classmethod
    def _version(cls, value: str) -> str:
        if not _RELEASE_VERSION.fullmatch(value):
            raise ValueError(
                f"version must be 1-64 letters, digits, '.', '_' or '-' (it becomes an Azure tag), "
                f"got {_show(value)}"
            )
        return value

    @field_validator("lustre_version")
    @classmethod
    def _lustre_version(cls, value: str | None) -> str | None:
        if value is not None and not _LUSTRE_VERSION.fullmatch(value):
            raise ValueError(
                "lustre_version must be what `lctl get_param -n version` prints, 1-64 letters, "
                f"digits, '.', '_', '+', '-', got {_show(value)}"
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


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_.*-]{1,64}")
MAX_PROBLEMS_SHOWN = 100


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
                parts[-1] += label + (f" {_show(name)}" if isinstance(name, str) else "")
            else:
                parts.append(label)
        else:
            node = node.get(item) if isinstance(node, dict) else None
            if "[" in str(item):  # pydantic's validator tags, e.g. function-after[...], skip
                continue
            # Keys come from the file (extra fields, tag names): quoted and cut unless plain.
            parts.append(item if _PLAIN_KEY.fullmatch(item) else _show(item))
    return " > ".join(parts) or "(top level)"


def _invalid(kind: str, source: str, data: Any, err: ValidationError) -> InventoryError:
    lines = []
    for problem in err.errors(include_url=False, include_input=False):
        message = validation_problem(problem)
        lines.append(f"{source}: {_describe_location(data, tuple(problem['loc']))}: {message}")
    unique = list(dict.fromkeys(lines))
    shown = unique[:MAX_PROBLEMS_SHOWN]
    if len(unique) > len(shown):
        shown.append(f"... and {len(unique) - len(shown)} more")
    return InventoryError(f"invalid {kind} {source}: {len(unique)} problem(s)\n" + "\n".join(shown))


class _StrictConstructor:
    """Mappings as an inventory needs them: no merge keys (<<), no key given twice (the
    second would silently win)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, Any] = {}  # key -> the mark where it first appears
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise ConstructorError(
                    None, None, "merge keys (<<) are not allowed", key_node.start_mark
                )
            key = self.construct_object(key_node, deep=True)  # type: ignore[attr-defined]
            try:
                earlier = first.get(key)
            except TypeError:
                continue  # unhashable: SafeConstructor refuses it with its own message
            if earlier is not None:
                raise ConstructorError(
                    None,
                    None,
                    f"duplicate key {_show(key)} (first at line {earlier.line + 1})",
                    key_node.start_mark,
                )
            first[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)  # type: ignore[misc,no-any-return]


def _timestamp(loader: Any, node: yaml.ScalarNode) -> Any:
    """A YAML date or timestamp, or a refusal naming it and its line: SafeConstructor's
    own raises a bare ValueError for a date that does not exist (2024-02-30)."""
    try:
        return yaml.SafeLoader.construct_yaml_timestamp(loader, node)
    except (ValueError, OverflowError) as err:
        raise ConstructorError(
            None, None, f"not a date: {_cut(node.value)} ({err})", node.start_mark
        ) from None


def _refusal(event: Any, depth: int) -> str | None:
    """Why ``event`` (at nesting ``depth``, counting it) has no place in an inventory."""
    if isinstance(event, yaml.AliasEvent):
        return f"aliases are not allowed (*{_cut(event.anchor)})"
    anchor = getattr(event, "anchor", None)
    if anchor is not None:
        return f"anchors are not allowed (&{_cut(anchor)})"
    if depth > YAML_MAX_DEPTH:
        return f"nested deeper than {YAML_MAX_DEPTH} levels"
    return None


_NESTS = (yaml.MappingStartEvent, yaml.SequenceStartEvent)
_ENDS = (yaml.MappingEndEvent, yaml.SequenceEndEvent)


class _InventoryLoader(_StrictConstructor, yaml.SafeLoader):
    """SafeLoader without what an inventory never needs and a hostile file would use.

    Anchors and aliases are refused (a few KB of nested aliases expand to gigabytes, and an
    error message quoting the value would print them), so are merge keys, mappings that give a
    key twice (the second silently won), and nesting deeper than YAML_MAX_DEPTH (the composer
    recurses). Pure Python: used where PyYAML has no libyaml (see ``_load``).
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        event: Any = self.peek_event()  # type: ignore[no-untyped-call]
        nests = isinstance(event, _NESTS)
        if nests:
            self._depth += 1
        try:
            if why := _refusal(event, self._depth):
                raise ComposerError(None, None, why, event.start_mark)
            return super().compose_node(parent, index)
        finally:
            if nests:
                self._depth -= 1


_CSafeLoader: Any = getattr(yaml, "CSafeLoader", None)


def _load(text: str) -> Any:
    """One YAML document, refused as ``_InventoryLoader`` refuses. With libyaml (PyYAML's
    wheels have it) the events are first checked in one pass of its C parser, then the
    document is composed in C: a 1,000-cluster fleet file in ~0.3 CPU-s instead of ~1.5
    (profiled: the pure-Python scanner was 90% of an idle rollout tick's CPU). A document
    libyaml or that check refuses is read again by ``_InventoryLoader``, whose error (or
    value) stands: the messages are the same whichever parser PyYAML has."""
    # libyaml takes tabs where PyYAML's own scanner refuses them ("a:\t1", "a: 1\t# c"):
    # a document with a tab goes the pure-Python way, so both give the same verdict.
    if _CSafeLoader is not None and "\t" not in text:
        try:
            depth = 0
            for event in yaml.parse(text, Loader=_CSafeLoader):
                if isinstance(event, _NESTS):
                    depth += 1
                elif isinstance(event, _ENDS):
                    depth -= 1
                if _refusal(event, depth):
                    raise yaml.YAMLError("refused")
            fast = _FastInventoryLoader(text)
            try:
                return fast.get_single_data()
            finally:
                fast.dispose()
        except (yaml.YAMLError, ValueError, OverflowError):
            pass  # the pure-Python loader below says what is wrong, as it always has
    loader = _InventoryLoader(text)
    try:
        return loader.get_single_data()
    # PyYAML's own ValueError ("\U00110000" is chr()'s), at the reader's position.
    except (ValueError, OverflowError) as err:
        mark: Any = loader.get_mark()
        raise ScannerError(None, None, _cut(err), mark) from None
    finally:
        loader.dispose()


_InventoryLoader.add_constructor("tag:yaml.org,2002:timestamp", _timestamp)

if _CSafeLoader is not None:

    class _FastInventoryLoader(_StrictConstructor, _CSafeLoader):  # type: ignore[misc]
        """libyaml's parser and composer, the strict constructor (events checked first)."""

    _FastInventoryLoader.add_constructor("tag:yaml.org,2002:timestamp", _timestamp)


def _cut(value: object, limit: int = SHOWN_CHARS) -> str:
    text = str(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _read_bounded(path: Path, *, kind: str, max_bytes: int) -> bytes:
    try:
        with path.open("rb") as stream:
            raw = stream.read(max_bytes + 1)
    except OSError as err:
        raise InventoryError(f"cannot read {kind} {path}: {err.strerror or err}") from err
    if len(raw) > max_bytes:
        raise InventoryError(f"{kind} {path} is larger than the {_size(max_bytes)} limit")
    return raw


def _parse_yaml(raw: bytes, path: Path, *, kind: str) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise InventoryError(
            f"{kind} {path} is not valid UTF-8 (byte {raw[err.start]:#04x} at line {line})"
        ) from None
    try:
        return _load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = _cut(getattr(err, "problem", None) or "syntax error", 2 * SHOWN_CHARS)
        raise InventoryError(f"{kind} {path} is not valid YAML{where}: {problem}") from err


def read_yaml(path: str | Path, *, kind: str, max_bytes: int) -> Any:
    """Read one YAML document of at most ``max_bytes`` UTF-8 bytes; InventoryError (one line,
    naming the file and the line) for anything that is not plain, bounded YAML."""
    path = Path(path)
    return _parse_yaml(_read_bounded(path, kind=kind, max_bytes=max_bytes), path, kind=kind)


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


#: Fleets parsed in this process, by the SHA-256 of their file's bytes (a tick reads its
#: fleet file in the rollout tick, the census and the fleet run: parsed once). Keyed by
#: content, not by path and mtime, so that a file rewritten in place is read afresh.
_FLEETS: dict[bytes, Fleet] = {}
_FLEETS_KEPT = 8
_FLEETS_LOCK = threading.Lock()


def load_fleet(path: str | Path) -> Fleet:
    path = Path(path)
    raw = _read_bounded(path, kind="fleet file", max_bytes=FLEET_MAX_BYTES)
    key = hashlib.sha256(raw).digest()
    with _FLEETS_LOCK:
        known = _FLEETS.get(key)
    if known is not None:
        return known
    fleet = parse_fleet(_parse_yaml(raw, path, kind="fleet file"), source=str(path))
    with _FLEETS_LOCK:
        while len(_FLEETS) >= _FLEETS_KEPT:
            del _FLEETS[next(iter(_FLEETS))]
        _FLEETS[key] = fleet
    return fleet


def parse_release(data: object, *, source: str = "<release>") -> Release:
    if not isinstance(data, dict):
        raise InventoryError(f"invalid release {source}: the top level must be a mapping")
    try:
        return Release.model_validate(data)
    except ValidationError as err:
        raise _invalid("release", source, data, err) from None


def load_release(path: str | Path) -> Release:
    path = Path(path)
    data = read_yaml(path, kind="release", max_bytes=RELEASE_MAX_BYTES)
    return parse_release(data, source=str(path))
