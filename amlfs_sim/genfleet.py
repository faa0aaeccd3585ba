"""Generate large fleet files for scale tests and benchmarks (``amlfs-sim gen-fleet``)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import yaml

from amlfs.models import DayOfWeek

__all__ = ["dump_fleet_yaml", "generate_fleet", "loopback_address", "roles_for"]

_BASE_ROLES = ("mds", "oss", "oss", "agtpri", "agtstd", "lclient")
_SUBSCRIPTION_NAMESPACE = uuid.UUID("6a1d4c1e-2f0b-4e38-9d8e-0b5a3c7f1e20")
_FIRST_ADDRESS = (1 << 16) + 1  # 127.1.0.1: keeps 127.0.0.0/16 (127.0.0.1 and friends) free


def roles_for(nodes_per_cluster: int) -> list[str]:
    """mds, oss, oss, agtpri, agtstd, lclient, then more oss; the first two always mds, oss."""
    if nodes_per_cluster <= len(_BASE_ROLES):
        return list(_BASE_ROLES[:nodes_per_cluster])
    return list(_BASE_ROLES) + ["oss"] * (nodes_per_cluster - len(_BASE_ROLES))


def loopback_address(index: int) -> str:
    """The index-th usable loopback address from 127.1.0.1, skipping .0 and .255 hosts."""
    per_block = 254  # host parts 1..254 of each /24
    block, host = divmod(index, per_block)
    value = _FIRST_ADDRESS - 1 + block * 256 + host + 1
    if value >= 1 << 24:
        raise ValueError(f"address index {index} is beyond 127.255.255.254")
    return f"127.{(value >> 16) & 255}.{(value >> 8) & 255}.{value & 255}"


def generate_fleet(
    clusters: int,
    nodes_per_cluster: int,
    *,
    subscriptions: int = 1,
    regions: Sequence[str] = ("eastus", "westeurope", "southcentralus"),
    waves: Sequence[str] = ("canary", "wave1", "wave2"),
    seed: int = 0,
) -> dict[str, Any]:
    """A fleet document that ``amlfs.models.parse_fleet`` accepts, deterministic in ``seed``.

    The first ~2% of clusters (at least one) form the first wave; the rest alternate over the
    other waves. Windows start on 15-minute boundaries spread over the week.
    """
    if clusters < 1:
        raise ValueError(f"clusters must be >= 1, got {clusters}")
    if nodes_per_cluster < 2:
        raise ValueError(
            f"nodes_per_cluster must be >= 2 (an mds and an oss), got {nodes_per_cluster}"
        )
    if subscriptions < 1:
        raise ValueError(f"subscriptions must be >= 1, got {subscriptions}")
    if not regions or not waves:
        raise ValueError("regions and waves must not be empty")
    subs = [str(uuid.uuid5(_SUBSCRIPTION_NAMESPACE, f"{seed}:{i}")) for i in range(subscriptions)]
    days = list(DayOfWeek)
    slots_per_week = 7 * 24 * 4
    canary = max(1, clusters * 2 // 100)
    roles = roles_for(nodes_per_cluster)
    address = 0
    out: list[dict[str, Any]] = []
    for i in range(clusters):
        name = f"amlfs-{i:05d}"
        if len(waves) == 1 or i < canary:
            wave = waves[0]
        else:
            wave = waves[1 + (i - canary) % (len(waves) - 1)]
        slot = (i * 37 + seed) % slots_per_week  # 37 is coprime with the slot count
        day, minute_of_day = divmod(slot * 15, 24 * 60)
        counters: dict[str, int] = {}
        nodes = []
        for role in roles:
            k = counters.get(role, 0)
            counters[role] = k + 1
            nodes.append(
                {"name": f"{name}-{role}{k}", "role": role, "address": loopback_address(address)}
            )
            address += 1
        out.append(
            {
                "name": name,
                "subscription_id": subs[i % subscriptions],
                "resource_group": f"rg-{name}",
                "region": regions[i % len(regions)],
                "wave": wave,
                "window": {
                    "day_of_week": days[day].value,
                    "start_utc": f"{minute_of_day // 60:02d}:{minute_of_day % 60:02d}",
                    "duration_min": 30,
                },
                "nodes": nodes,
            }
        )
    return {"clusters": out}


def dump_fleet_yaml(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=120)
