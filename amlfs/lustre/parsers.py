"""Parsers of what Lustre 2.15 and the OS tools print, as pure functions.

Each takes a command's stdout and returns typed values, or raises ``NodeOutputError``
naming the command and the line it could not read: a node answering something unexpected
stops the procedure instead of being misread. No I/O here. The formats, and the Lustre
source each one comes from, are listed in tests/data/lustre-2.15/SOURCES.md.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import yaml

from amlfs.errors import NodeOutputError

__all__ = [
    "RECOVERY_STATES",
    "Device",
    "HsmAgent",
    "HsmRequest",
    "LustreMount",
    "RecoveryStatus",
    "all_up",
    "parse_devices",
    "parse_evictions",
    "parse_health_check",
    "parse_hsm_active_requests",
    "parse_hsm_agents",
    "parse_hsm_requests",
    "parse_iptables_rules",
    "parse_lustre_mounts",
    "parse_net_show",
    "parse_params",
    "parse_recovery_status",
    "parse_sha256sum",
    "parse_version",
]

# Console lines of a server evicting clients (dmesg), Lustre 2.15 (v2_15_5): the ping evictor
# (lustre/ptlrpc/pinger.c ping_evictor_main), an unanswered blocking callback (lustre/ldlm/
# ldlm_lockd.c expired_lock_main), an operator's eviction (lustre/obdclass/genops.c
# obd_export_evict_by_nid/_uuid), each one client; recovery's stale exports (genops.c
# class_disconnect_stale_exports): one line per target with the count. "This client was
# evicted by" is the other side (a target's own client, e.g. an OST's lwp to the MDT),
# and "Recovery over after" repeats the count: neither is counted again.
_EVICTED_ONE = re.compile(
    r"(?:I think it's dead, and I am evicting it\.|"
    r"lock callback timer expired after \d+s: evicting client at |"
    r": evicting \S+ \(at \S+\) by administrative request)"
)
_EVICTED_STALE = re.compile(r": disconnecting (\d+) stale clients?$")
_DMESG_LINE = re.compile(r"^\[\s*\d+\.\d+\] (.*)$")

# lprocfs_recovery_status_seq_show: WAITING is a DNE target waiting for other MDTs.
RECOVERY_STATES = ("INACTIVE", "COMPLETE", "WAITING", "WAITING_FOR_CLIENTS", "RECOVERING")

# A parameter line of `lctl get_param`: NAME=VALUE. Names are dotted paths whose parts may
# hold NIDs (ldlm.namespaces.MGC10.0.0.4@tcp.lru_size) or client instances (llite.amlfs-ffff…).
_PARAM = re.compile(r"^([A-Za-z0-9_][A-Za-z0-9_.@:*-]*)=(.*)$")
_VERSION = re.compile(r"^\d+\.\d+\.\d+(?:\.\d+)?(?:[_-][0-9A-Za-z._-]+)?$")
_MOUNT = re.compile(r"^(\S+) on (.+) type lustre \(([^)]*)\)$")
_AGENT = re.compile(r"^uuid=(\S+) archive_id=(\S+) requests=\[.*\]$")
# A line of mdt.*.hsm.active_requests (mdt_hsm_active_requests_proc_show, 2.15).
_HSM_REQUEST = re.compile(
    r"^fid=(\[0x[0-9a-f]+:0x[0-9a-f]+:0x[0-9a-f]+\]) dfid=\S+ "
    r"compound/cookie=(0x[0-9a-f]+|0)/(0x[0-9a-f]+|0) action=([A-Z]+) archive#=(\d+) "
    r"flags=\S+ extent=\S+ gid=\S+ data=\[[0-9A-F]*\] canceled=(\d+) uuid=(\S+) done=(\d+)$"
)


def _error(command: str, line: str, why: str) -> NodeOutputError:
    return NodeOutputError(f"`{command}` output: {why}: {line[:200]!r}")


# ---------------------------------------------------------------------------- lctl dl


@dataclass(frozen=True)
class Device:
    """One line of ``lctl dl``; status is UP, ST (stopping), IN (inactive), AT or --."""

    index: int
    status: str
    type: str
    name: str
    uuid: str
    refcount: int


def parse_devices(text: str) -> list[Device]:
    """``lctl dl``: ``index status type name uuid refcount`` per line."""
    devices = []
    for line in text.splitlines():
        if not line.strip():
            continue
        words = line.split()
        if len(words) != 6 or not words[0].isdigit() or not words[5].isdigit():
            raise _error("lctl dl", line, "expected 6 columns: index status type name uuid refs")
        devices.append(Device(int(words[0]), words[1], words[2], words[3], words[4], int(words[5])))
    return devices


def all_up(devices: Sequence[Device]) -> bool:
    """Whether every device is set up and not stopping (``UP``)."""
    return all(d.status == "UP" for d in devices)


# ---------------------------------------------------------------------- lctl get_param


def parse_params(text: str) -> dict[str, str]:
    """``lctl get_param`` without ``-n``: ``name=value`` lines, in order.

    lctl prints ``name=`` alone and the value on the following lines when the value holds
    a newline or is long (recovery_status, hsm.agents). Inside such a value only a dotted
    ``a.b=`` line starts the next parameter, so value lines like ``uuid=…`` stay in it.
    lctl prints nothing at all for an empty value, so absent names mean empty files.
    """
    params: dict[str, str] = {}
    name: str | None = None
    lines: list[str] = []
    multi_line = False
    for line in text.splitlines():
        match = _PARAM.match(line)
        starts = match is not None and (not multi_line or "." in match.group(1))
        if match is not None and starts:
            if name is not None:
                params[name] = "\n".join(lines)
            name, first = match.group(1), match.group(2)
            multi_line = first == ""
            lines = [] if multi_line else [first]
        elif multi_line:
            lines.append(line)
        elif line.strip():
            raise _error("lctl get_param", line, "expected name=value")
    if name is not None:
        params[name] = "\n".join(lines)
    return params


@dataclass(frozen=True)
class RecoveryStatus:
    """A target's ``recovery_status``; fields absent in the state's output are None."""

    status: str
    recovery_start: int | None = None
    recovery_duration: int | None = None
    time_remaining: int | None = None
    connected: int | None = None
    completed: int | None = None
    total: int | None = None
    evicted: int = 0


def parse_recovery_status(text: str) -> RecoveryStatus:
    """``lctl get_param -n *.*.recovery_status`` for one target (``key: value`` lines).

    COMPLETE prints ``completed_clients: N/M`` with N = M minus the evicted clients and no
    ``evicted_clients`` line, so there ``evicted`` is M - N; RECOVERING prints
    ``connected_clients: N/M``, ``completed_clients: N`` and ``evicted_clients``.
    """
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        if not sep or not key.strip():
            raise _error("recovery_status", line, "expected key: value")
        fields[key.strip()] = value.strip()
    status = fields.get("status")
    if status is None:
        first = next((line for line in text.splitlines() if line.strip()), "")
        raise _error("recovery_status", first, "no status line")
    if status not in RECOVERY_STATES:
        raise _error("recovery_status", f"status: {status}", "unknown status")

    def number(key: str) -> int | None:
        value = fields.get(key)
        if value is None:
            return None
        if not value.isdigit():
            raise _error("recovery_status", f"{key}: {value}", "expected an integer")
        return int(value)

    def fraction(key: str) -> tuple[int | None, int | None]:
        value = fields.get(key)
        if value is None:
            return None, None
        done, slash, total = value.partition("/")
        if not done.isdigit() or (slash and not total.isdigit()):
            raise _error("recovery_status", f"{key}: {value}", "expected N or N/TOTAL")
        return int(done), int(total) if slash else None

    connected, total = fraction("connected_clients")
    completed, completed_of = fraction("completed_clients")
    if total is None:
        total = completed_of
    evicted = number("evicted_clients")
    if evicted is None and completed is not None and completed_of is not None:
        evicted = completed_of - completed
    return RecoveryStatus(
        status=status,
        recovery_start=number("recovery_start"),
        recovery_duration=number("recovery_duration"),
        time_remaining=number("time_remaining"),
        connected=connected,
        completed=completed,
        total=total,
        evicted=evicted or 0,
    )


def parse_evictions(text: str) -> int:
    """How many client evictions a server's kernel log records (``dmesg``: ``[seconds]
    message`` lines since its boot). Lines without a timestamp are refused: a ``dmesg``
    that prints another format (``-T``, journald) must not be read as zero evictions."""
    evicted = 0
    for line in text.splitlines():
        if not line.strip():
            continue
        match = _DMESG_LINE.match(line)
        if match is None:
            raise _error("dmesg", line, "expected [seconds.micro] message")
        message = match.group(1).rstrip()
        if _EVICTED_ONE.search(message):
            evicted += 1
        elif stale := _EVICTED_STALE.search(message):
            evicted += int(stale.group(1))
    return evicted


def parse_health_check(text: str) -> bool:
    """``lctl get_param -n health_check``: True only for exactly ``healthy``.

    2.15 prints ``healthy``, ``NOT HEALTHY`` or ``LBUG``; older releases listed the
    unhealthy devices before ``NOT HEALTHY``. Anything but ``healthy`` is False.
    """
    return text.strip() == "healthy"


def parse_version(text: str) -> str:
    """``lctl get_param [-n] version``: ``2.15.5`` (a ``version=`` prefix is allowed)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) != 1:
        raise _error("lctl get_param version", text.strip(), "expected one line")
    value = lines[0].removeprefix("version=")
    if not _VERSION.match(value):
        raise _error("lctl get_param version", lines[0], "not a Lustre version")
    return value


# ------------------------------------------------------------------------------ LNet


def parse_net_show(text: str) -> list[str]:
    """``lnetctl net show``: the NIDs of every network but loopback (``0@lo``)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise NodeOutputError(f"`lnetctl net show` output is not YAML: {err}") from err
    if data is None:
        return []
    if not isinstance(data, dict) or not isinstance(data.get("net") or [], list):
        first = text.strip().splitlines()[0]
        raise _error("lnetctl net show", first, "expected a 'net:' list")
    nids = []
    for net in data.get("net") or []:
        nis = net.get("local NI(s)") if isinstance(net, dict) else None
        if not isinstance(nis, list):
            raise _error("lnetctl net show", str(net), "expected 'local NI(s)' under a net")
        for ni in nis:
            if not isinstance(ni, dict) or "nid" not in ni:
                raise _error("lnetctl net show", str(ni), "expected a 'nid' in a local NI")
            nid = str(ni["nid"])
            if not nid.endswith("@lo"):
                nids.append(nid)
    return nids


# ---------------------------------------------------------------------------- mounts


@dataclass(frozen=True)
class LustreMount:
    """One ``mount -t lustre`` line; flag options map to None."""

    device: str
    mountpoint: str
    options: dict[str, str | None]

    @property
    def svname(self) -> str | None:
        """The target a server mount serves (``amlfs-MDT0000``, ``MGS``); None on clients."""
        return self.options.get("svname")


def parse_lustre_mounts(text: str) -> list[LustreMount]:
    """``mount -t lustre``: ``DEVICE on DIR type lustre (OPTIONS)`` per line."""
    mounts = []
    for line in text.splitlines():
        if not line.strip():
            continue
        match = _MOUNT.match(line.strip())
        if not match:
            raise _error("mount -t lustre", line, "expected 'DEVICE on DIR type lustre (OPTIONS)'")
        options: dict[str, str | None] = {}
        for option in filter(None, match.group(3).split(",")):
            key, sep, value = option.partition("=")
            options[key] = value if sep else None
        mounts.append(LustreMount(match.group(1), match.group(2), options))
    return mounts


# ------------------------------------------------------------------------------- HSM


def parse_hsm_active_requests(text: str) -> int:
    """``lctl get_param -n mdt.*.hsm.active_requests``: the number of request lines.

    An empty list prints nothing. Lines of ``hsm.actions`` (``lrh=[…] fid=…``) count too.
    """
    count = 0
    for line in text.splitlines():
        if not line.strip():
            continue
        if not line.startswith(("fid=[", "lrh=[")) or " action=" not in line:
            raise _error("hsm.active_requests", line, "expected 'fid=[…] … action=…'")
        count += 1
    return count


@dataclass(frozen=True)
class HsmRequest:
    """An active HSM request: its file's FID, the copytool (agent uuid) doing it and the
    bytes it has copied so far (``done``, the progress the copytool reported)."""

    fid: str
    cookie: int
    action: str
    agent: str
    done: int
    canceled: bool


def parse_hsm_requests(text: str) -> list[HsmRequest]:
    """``lctl get_param -n mdt.*.hsm.active_requests``, one request per line.

    ``fid=[…] dfid=[…] compound/cookie=C/K action=A archive#=N flags=F extent=O-L gid=G
    data=[HEX] canceled=0|1 uuid=AGENT done=BYTES`` (lustre/mdt/mdt_hsm_cdt_requests.c,
    ``mdt_hsm_active_requests_proc_show``, v2_15_5). An empty list prints nothing.
    """
    requests = []
    for line in text.splitlines():
        if not line.strip():
            continue
        match = _HSM_REQUEST.match(line.strip())
        if not match:
            raise _error("hsm.active_requests", line, "expected 'fid=[…] … action=… uuid=… done=N'")
        fid, _, cookie, action, _, canceled, agent, done = match.groups()
        requests.append(HsmRequest(fid, int(cookie, 16), action, agent, int(done), canceled != "0"))
    return requests


@dataclass(frozen=True)
class HsmAgent:
    """A registered copytool; ``archive_ids`` is empty for ``archive_id=ANY``."""

    uuid: str
    archive_ids: list[int]


def parse_hsm_agents(text: str) -> list[HsmAgent]:
    """``lctl get_param -n mdt.*.hsm.agents``: ``uuid=U archive_id=N[,M]|ANY requests=[…]``."""
    agents = []
    for line in text.splitlines():
        if not line.strip():
            continue
        match = _AGENT.match(line.strip())
        if not match:
            raise _error("hsm.agents", line, "expected 'uuid=… archive_id=… requests=[…]'")
        ids = match.group(2)
        if ids == "ANY":
            archive_ids = []
        elif all(part.isdigit() for part in ids.split(",")):
            archive_ids = [int(part) for part in ids.split(",")]
        else:
            raise _error("hsm.agents", line, "archive_id is neither ANY nor integers")
        agents.append(HsmAgent(match.group(1), archive_ids))
    return agents


# -------------------------------------------------------------------------- firewall


def parse_iptables_rules(text: str) -> list[str]:
    """``iptables -S``: the ``-A`` rules in order (``-P`` policies, ``-N`` chains left out)."""
    rules = []
    for line in text.splitlines():
        if line.startswith("-A "):
            rules.append(line.rstrip())
        elif line.strip() and not line.startswith(("-P ", "-N ")):
            raise _error("iptables -S", line, "expected -P, -N or -A lines")
    return rules


_SHA256 = re.compile(r"([0-9a-f]{64})  (.+)")


def parse_sha256sum(text: str, path: str) -> str:
    """``sha256sum PATH``: the hex digest coreutils prints for ``PATH``."""
    lines = text.splitlines()
    found = _SHA256.fullmatch(lines[0]) if len(lines) == 1 else None
    if found is None or found.group(2) != path:
        raise _error(f"sha256sum {path}", text, "expected one line '<64 hex>  PATH'")
    return found.group(1)
