"""Prefect flow ``cluster-upgrade``: one cluster to one release by OS disk swap.

Thin: it resolves where to connect (the emulator's ``endpoint.json`` or the saved Blocks),
runs ``amlfs.saga.ClusterUpgrade`` with each step as its own Prefect task, and publishes the
result as a table artifact. Running it again for the same cluster after a crash resumes the
interrupted upgrade (the journal is in the state store, the truth in Azure and the nodes).
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from pydantic import BaseModel, ConfigDict, Field

from amlfs.models import load_fleet, load_release
from amlfs.runtime import (
    AzureSettings,
    Connections,
    SshSettings,
    from_endpoint,
    run_cluster_upgrade,
)
from amlfs.saga import UpgradePolicy
from amlfs.store import StateStore

__all__ = ["ClusterUpgradeParams", "cluster_upgrade", "run_cluster_upgrade"]


class ClusterUpgradeParams(BaseModel):
    """Parameters of one cluster's upgrade (rendered as a form in the Prefect UI)."""

    model_config = ConfigDict(extra="forbid")
    fleet_file: str = Field(description="Fleet inventory YAML")
    cluster: str = Field(description="Cluster name in the inventory")
    release_file: str = Field(description="Release YAML (image, Lustre version, config)")
    policy: UpgradePolicy = UpgradePolicy()
    state_dir: str = Field(default=".amlfs-state", description="Durable state store root")
    emulator_endpoint: str | None = Field(
        default=None, description="amlfs-sim endpoint.json; empty: use the Blocks below"
    )
    azure_block: str = "amlfs-azure"
    ssh_block: str = "amlfs-ssh"
    run_id: str | None = None
    window_end: dt.datetime | None = Field(
        default=None, description="UTC end of the window; steps that would cross it roll back"
    )


def resolve_settings(params: ClusterUpgradeParams) -> tuple[AzureSettings, SshSettings]:
    if params.emulator_endpoint:
        return from_endpoint(params.emulator_endpoint)
    from blocks import AzureTarget, SshAccess

    azure = AzureTarget.load(params.azure_block)
    ssh = SshAccess.load(params.ssh_block)
    return azure.settings(), ssh.settings()  # type: ignore[union-attr]


def customer_view(endpoint_file: str, cluster: str) -> dict[str, Any] | None:
    """The emulator's ground truth for ``cluster`` (None against real Azure)."""
    import json

    endpoint = json.loads(Path(endpoint_file).read_text())
    context = ssl.create_default_context(cafile=endpoint["ca_file"])
    response = httpx.get(
        f"{endpoint['control_url']}/state", params={"cluster": cluster}, verify=context, timeout=30
    )
    response.raise_for_status()
    state = response.json()
    view: dict[str, Any] = state["clusters"][cluster]
    view["data_disk_changes"] = len(state["data_disk_changes"])
    view["leaked_disks"] = state["leaked_disks"]
    return view


HEARTBEAT_S = 2.0  # real seconds between liveness records of a running cluster flow


def _heartbeat(store: StateStore, key: str, stop: threading.Event) -> None:
    """Record that this flow run is alive, where, until ``stop``: a fleet flow that dispatched
    it to a worker declares it dead (and starts a follow-up run) when the record goes stale."""
    while True:
        store.put(
            "cluster-runs",
            key,
            value={"host": socket.gethostname(), "pid": os.getpid(), "at": time.time()},
        )
        if stop.wait(HEARTBEAT_S):
            return


@flow(name="cluster-upgrade", persist_result=False, log_prints=False)
def cluster_upgrade(params: ClusterUpgradeParams) -> dict[str, Any]:
    """Upgrade one cluster; returns the result (outcome, reason, timings, downtime)."""
    from prefect.runtime import flow_run
    from prefect.variables import Variable

    from tasks import run_step

    logger = get_run_logger()
    store = StateStore(params.state_dir)
    run_key = str(flow_run.get_id() or "local")
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(store, run_key, stop), daemon=True)
    beat.start()
    try:
        out = _cluster_upgrade(params, logger, run_step, Variable)
    finally:
        stop.set()
        beat.join(timeout=10)
    store.put("cluster-results", run_key, value=out)
    return out


def _cluster_upgrade(
    params: ClusterUpgradeParams, logger: Any, run_step: Any, variable: Any
) -> dict[str, Any]:
    fleet = load_fleet(params.fleet_file)
    cluster = fleet.cluster(params.cluster)
    release = load_release(params.release_file)
    azure, ssh = resolve_settings(params)
    connections = Connections.create(azure, ssh)
    try:
        result = run_cluster_upgrade(
            cluster,
            release,
            connections,
            StateStore(params.state_dir),
            params.policy,
            run_id=params.run_id,
            window_end=params.window_end,
            log=logger.info,
            runner=run_step,
            # The fleet's operator control: abort rolls this cluster back too.
            should_abort=lambda: variable.get("amlfs-fleet-control", default="run") == "abort",
        )
    finally:
        connections.close()
    out = result.model_dump(mode="json")
    if params.emulator_endpoint:
        out["customer_view"] = customer_view(params.emulator_endpoint, cluster.name)
    logger.info(
        "%s: %s %s -> %s%s (downtime seen %.0f s)",
        cluster.name,
        result.outcome.value,
        result.release_before,
        result.release_after,
        f": {result.reason}" if result.reason else "",
        result.downtime_observed_s,
    )
    create_table_artifact(
        key=f"cluster-{cluster.name}".lower().replace("_", "-"),
        table=[
            {"step": t.name, "status": t.status, "seconds": round(t.ended_s - t.started_s, 1)}
            for t in result.steps
        ],
        description=(
            f"{cluster.name}: {result.outcome.value}, {result.release_before} -> "
            f"{result.release_after}, downtime seen {result.downtime_observed_s:.0f} s"
            + (f"; {result.reason}" if result.reason else "")
        ),
    )
    return out
