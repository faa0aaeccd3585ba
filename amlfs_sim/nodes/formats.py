"""How Lustre 2.15 and the OS tools print what the emulated nodes are asked.

Formats follow the real tools (see tests/data/lustre-2.15/SOURCES.md): `lctl dl` columns,
`param=value` lines of `lctl get_param` (value only with `-n`), the YAML of `lnetctl net
show`, the multi-line `recovery_status`, `mount` lines, `zpool import` refusals.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "Device",
    "format_devices",
    "format_net_show",
    "format_params",
    "format_recovery_status",
]


@dataclass(frozen=True)
class Device:
    index: int
    status: str  # UP, ST (stopping), AT (attached)
    type: str
    name: str
    uuid: str
    refcount: int


def format_devices(devices: Sequence[Device]) -> str:
    # lctl's jt_obd_list: "%3d %s %s %s %s %d"
    return "".join(
        f"{d.index:3d} {d.status} {d.type} {d.name} {d.uuid} {d.refcount}\n" for d in devices
    )


def format_params(values: Sequence[tuple[str, str]], *, value_only: bool) -> str:
    """``lctl get_param`` output: ``name=value`` lines; a multi-line value starts on its own.

    An empty file (no HSM request, say) prints nothing, not even its name (``read_param`` in
    Lustre 2.15's ``lustre_cfg.c``). Not emulated: a name and value of 80 characters or more
    also put the value on its own line.
    """
    out = []
    for name, value in values:
        if not value:
            continue
        if value_only:
            out.append(value if value.endswith("\n") else value + "\n")
        elif "\n" in value.rstrip("\n"):
            out.append(f"{name}=\n{value if value.endswith(chr(10)) else value + chr(10)}")
        else:
            out.append(f"{name}={value.rstrip(chr(10))}\n")
    return "".join(out)


def format_recovery_status(
    status: str,
    *,
    start: int,
    duration: int,
    time_remaining: int,
    total_clients: int,
    connected: int,
    completed: int,
    evicted: int,
) -> str:
    """A target's ``recovery_status`` the way Lustre 2.15 prints each state
    (lprocfs_recovery_status_seq_show): WAITING_FOR_CLIENTS prints nothing more; RECOVERING
    counts ``connected_clients`` as N/M and ``completed_clients`` as N; COMPLETE as N/M."""
    if status == "COMPLETE":
        return (
            f"status: COMPLETE\nrecovery_start: {start}\nrecovery_duration: {duration}\n"
            f"completed_clients: {completed}/{total_clients}\nreplayed_requests: 0\n"
            f"last_transno: 4294967296\nVBR: DISABLED\nIR: ENABLED\n"
        )
    if status in ("INACTIVE", "WAITING_FOR_CLIENTS"):
        return f"status: {status}\n"
    return (
        f"status: {status}\nrecovery_start: {start}\ntime_remaining: {time_remaining}\n"
        f"connected_clients: {connected}/{total_clients}\nreq_replay_clients: 0\n"
        f"lock_repay_clients: 0\ncompleted_clients: {completed}\n"
        f"evicted_clients: {evicted}\nreplayed_requests: 0\nqueued_requests: 0\n"
        f"next_transno: 4294967297\n"
    )


def format_net_show(nids: Sequence[str], interface: str = "eth0") -> str:
    lines = [
        "net:",
        "    - net type: lo",
        "      local NI(s):",
        "        - nid: 0@lo",
        "          status: up",
    ]
    by_net: dict[str, list[str]] = {}
    for nid in nids:
        by_net.setdefault(nid.rsplit("@", 1)[1], []).append(nid)
    for net, members in by_net.items():
        lines += [f"    - net type: {net}", "      local NI(s):"]
        for nid in members:
            lines += [
                f"        - nid: {nid}",
                "          status: up",
                "          interfaces:",
                f"              0: {interface}",
            ]
    return "\n".join(lines) + "\n"
