"""Parsers of what Lustre 2.15 and the OS tools print, as pure functions.

Each takes a command's stdout and returns typed values, or raises ``NodeOutputError``
naming the command and the line it could not read: a node answering something unexpected
stops the procedure instead of being misread. Formats: see tests/data/lustre-2.15/SOURCES.md.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import yaml

from amlfs.errors import NodeOutputError

__all__ = [
    "Device",
    "HsmAgent",
    "LustreMount",
    "RecoveryStatus",
    "all_up",
    "parse_devices",
    "parse_health_check",
    "parse_hsm_active_requests",
    "parse_hsm_agents",
    "parse_iptables_rules",
    "parse_lustre_mounts",
    "parse_net_show",
    "parse_params",
    "parse_recovery_status",
    "parse_version",
]

RECOVERY_STATES = ("COMPLETE", "INACTIVE", "WAITING_FOR_CLIENTS", "RECOVERING", "WAITING")
_PARAM_LINE = re.compile(r"^([A-Za-z0-9_-]+(?:\.[A-Za-z0-9_*-]+)*)=(.*)$")
_VERSION = re.compile(r"^\d+\.\d+\.\d+(?:[._-][0-9A-Za-z._-]+)?$")


def _fail(command: str, line: str, why: str) -> NodeOutputError:
    return NodeOutputError(f"`{command}` output: {why}: {line[:200]!r}")


@dataclass(frozen=True)
class Device:
    index: int
    status: str
    type: str
    name: str
    uuid: str
    refcount: int


def parse_devices(text: str) -> list[Device]:
    """``lctl dl``: ``idx status type name uuid refcount`` per line."""
    devices = []
    for line in text.splitlines():
        if not line.strip():
            continue
        words = line.split()
        if len(words) != 6 or not words[0].isdigit() or not words[5].isdigit():
            raise _fail("lctl dl", line, "expected 6 columns: index status type name uuid refs")
        devices.append(Device(int(words[0]), words[1], words[2], words[3], words[4], int(words[5])))
    return devices


def all_up(devices: Sequence[Device]) -> bool:
    return all(d.status == "UP" for d in devices)


def parse_params(text: str) -> dict[str, str]:
    """``lctl get_param`` without ``-n``: ``name=value``; a multi-line value follows ``name=``."""
    params: dict[str, str] = {}
    current: str | None = None
    lines: list[str] = []
    for line in text.splitlines():
        match = _PARAM_LINE.match(line)
        if match and ":" not in match.group(1):
            if current is not None:
                params[current] = "\n".join(lines)
            current, first = match.group(1), match.group(2)
            lines = [first] if first else []
        elif current is not None:
            lines.append(line)
        elif line.strip():
            raise _fail("lctl get_param", line, "expected name=value")
    if current is not None:
        params[current] = "\n".join(lines)
    return params


@dataclass(frozen=True)
class RecoveryStatus:
    status: str
    recovery_start: int | None = None
    recovery_duration: int | None = None
    time_remaining: int | None = None
    connected: int | None = None
    completed: int | None = None
    total: int | None = None
    evicted: int = 0


def parse_recovery_status(text: str) -> RecoveryStatus:
    """A target's ``recovery_status`` (YAML-like ``key: value`` lines)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise _fail("recovery_status", line, "expected key: value")
        fields[key.strip()] = value.strip()
    status = fields.get("status")
    if status not in RECOVERY_STATES:
        raise _fail(
            "recovery_status",
            text.strip().splitlines()[0] if text.strip() else "",
            f"unknown status {status!r}",
        )

    def number(key: str) -> int | None:
        value = fields.get(key)
        if value is None:
            return None
        try:
            return int(value)
        except ValueError as err:
            raise _fail("recovery_status", f"{key}: {value}", "not an integer") from err

    def fraction(key: str) -> tuple[int | None, int | None]:
        value = fields.get(key)
        if value is None:
            return None, None
        done, slash, total = value.partition("/")
        if not done.isdigit() or (slash and not total.isdigit()):
            raise _fail("recovery_status", f"{key}: {value}", "expected N or N/TOTAL")
        return int(done), int(total) if slash else None

    connected, total = fraction("connected_clients")
    completed, total_completed = fraction("completed_clients")
    return RecoveryStatus(
        status=status,
        recovery_start=number("recovery_start"),
        recovery_duration=number("recovery_duration"),
        time_remaining=number("time_remaining"),
        connected=connected,
        completed=completed,
        total=total if total is not None else total_completed,
        evicted=number("evicted_clients") or 0,
    )


def parse_net_show(text: str) -> list[str]:
    """``lnetctl net show``: the NIDs of every network but loopback."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise NodeOutputError(f"`lnetctl net show` output is not YAML: {err}") from err
    if data is None:
        return []
    if not isinstance(data, dict) or not isinstance(data.get("net"), list):
        raise _fail("lnetctl net show", text.strip()[:80], "expected a 'net' list")
    nids = []
    for net in data["net"]:
        for ni in (net or {}).get("local NI(s)") or []:
            nid = str((ni or {}).get("nid", ""))
            if nid and not nid.endswith("@lo"):
                nids.append(nid)
    return nids


def parse_health_check(text: str) -> bool:
    """``lctl get_param -n health_check``: exactly ``healthy``, or not."""
    return text.strip() == "healthy"


def parse_version(text: str) -> str:
    """``lctl get_param [-n] version``: ``2.15.5`` (``version=`` prefix allowed)."""
    value = text.strip()
    if "\n" in value:
        value = value.splitlines()[0].strip()
    value = value.removeprefix("version=").removeprefix("lustre: ").strip()
    if not _VERSION.match(value):
        raise _fail("lctl get_param version", value, "not a Lustre version")
    return value


@dataclass(frozen=True)
class LustreMount:
    device: str
    mountpoint: str
    options: dict[str, str | None]

    @property
    def svname(self) -> str | None:
        return self.options.get("svname")


_MOUNT = re.compile(r"^(\S+) on (\S+) type lustre \(([^)]*)\)$")


def parse_lustre_mounts(text: str) -> list[LustreMount]:
    """``mount -t lustre``: ``DEV on DIR type lustre (opts)`` per line."""
    mounts = []
    for line in text.splitlines():
        if not line.strip():
            continue
        match = _MOUNT.match(line.strip())
        if not match:
            raise _fail("mount -t lustre", line, "expected 'DEV on DIR type lustre (OPTIONS)'")
        options: dict[str, str | None] = {}
        for option in match.group(3).split(","):
            key, sep, value = option.partition("=")
            options[key] = value if sep else None
        mounts.append(LustreMount(match.group(1), match.group(2), options))
    return mounts


def parse_hsm_active_requests(text: str) -> int:
    """``mdt.*.hsm.active_requests``: one request per line."""
    count = 0
    for line in text.splitlines():
        if not line.strip():
            continue
        if "action=" not in line:
            raise _fail("hsm.active_requests", line, "expected a request with action=")
        count += 1
    return count


@dataclass(frozen=True)
class HsmAgent:
    uuid: str
    archive_ids: list[int]


def parse_hsm_agents(text: str) -> list[HsmAgent]:
    """``mdt.*.hsm.agents``: ``uuid=... archive_id=N[,M] requests=[...]`` per line."""
    agents = []
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = dict(
            part.split("=", 1) for part in line.split() if "=" in part and not part.startswith("[")
        )
        if "uuid" not in fields or "archive_id" not in fields:
            raise _fail("hsm.agents", line, "expected uuid= and archive_id=")
        ids = fields["archive_id"]
        try:
            archive_ids = [] if ids in ("ANY", "") else [int(x) for x in ids.split(",")]
        except ValueError as err:
            raise _fail("hsm.agents", line, "archive_id is not a list of integers") from err
        agents.append(HsmAgent(fields["uuid"], archive_ids))
    return agents


def parse_iptables_rules(text: str) -> list[str]:
    """``iptables -S``: the ``-A`` rules (policies and chain creations are left out)."""
    rules = []
    for line in text.splitlines():
        if line.startswith("-A "):
            rules.append(line.strip())
        elif line.strip() and not line.startswith(("-P ", "-N ")):
            raise _fail("iptables -S", line, "expected -P, -N or -A lines")
    return rules
