"""Prefect flow ``cluster-upgrade``: one cluster to one release by OS disk swap.

Thin: it resolves where to connect (the emulator's ``endpoint.json`` or the saved Blocks),
runs ``amlfs.saga.ClusterUpgrade`` with each step as its own Prefect task, and publishes the
result as a table artifact. Running it again for the same cluster after a crash resumes the
interrupted upgrade (the journal is in the state store, the truth in Azure and the nodes).

Its final state tells the cluster's truth (``tasks.cluster.outcome_state``): Completed when
upgraded, Failed named RolledBack when rolled back (serving), Failed when it needs attention. A
cancel in Prefect (the run goes to Cancelling, then the runner sends SIGTERM and kills the
process after its grace period), a SIGTERM, or an abort request from the fleet run that
dispatched it (``cluster-aborts`` in the state store) is an abort: the cluster rolls back, or
finishes when past the point of no return, and the run ends Cancelled with the outcome.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.client.schemas.objects import State
from prefect.states import Cancelled
from pydantic import BaseModel, ConfigDict, Field

from amlfs.errors import AmlfsError
from amlfs.forms import STATE_DIR, AzureBlockName, EmulatorEndpoint, SshBlockName, StateDir
from amlfs.jobs import ClockAnchor, ClusterJob, ClusterOutcome, run_job
from amlfs.models import load_fleet, load_release
from amlfs.runtime import AzureSettings, Connections, SshSettings, from_endpoint
from amlfs.saga import UpgradePolicy
from amlfs.store import Store, open_store
from flows.markdown import markdown_text

__all__ = [
    "ABORTS",
    "ClusterUpgradeParams",
    "StopSignals",
    "cluster_upgrade",
    "on_sigterm",
    "stop_signals",
]

#: State store collection: an abort request per cluster flow run id (written by the fleet
#: run that dispatched it, read by the cluster run at its step boundaries).
ABORTS = "cluster-aborts"


class ClusterUpgradeParams(BaseModel):
    """Parameters of one cluster's upgrade (rendered as a form in the Prefect UI)."""

    # hide_input_in_errors: a refused value may be a secret (a URL with a password).
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)
    fleet_file: str = Field(description="Fleet inventory YAML")
    cluster: str = Field(description="Cluster name in the inventory")
    release_file: str = Field(description="Release YAML (image, Lustre version, config)")
    policy: UpgradePolicy = UpgradePolicy()
    state_dir: StateDir = STATE_DIR
    emulator_endpoint: EmulatorEndpoint = ""
    azure_block: AzureBlockName = "amlfs-azure"
    ssh_block: SshBlockName = "amlfs-ssh"
    run_id: str | None = None
    window_end: dt.datetime | None = Field(
        default=None, description="UTC end of the window; steps that would cross it roll back"
    )
    anchor: ClockAnchor | None = Field(
        default=None,
        description="Fleet runs: the fleet run's UTC clock (a rehearsal's `at`, the emulator's "
        "time scale); empty: the real UTC clock",
    )
    override_reason: str | None = Field(
        default=None, description="Fleet hotfixes: why the window is overridden (recorded)"
    )
    wave: str | None = Field(default=None, description="Fleet runs: the cluster's wave")

    def job(self) -> ClusterJob:
        """The job these parameters describe (reads the inventory and the release)."""
        return ClusterJob(
            cluster=load_fleet(self.fleet_file).cluster(self.cluster),
            release=load_release(self.release_file),
            policy=self.policy,
            run_id=self.run_id,
            window_end=self.window_end,
            anchor=self.anchor,
            override_reason=self.override_reason,
            wave=self.wave,
        )


def connection_settings(
    emulator_endpoint: str | None, azure_block: str, ssh_block: str
) -> tuple[AzureSettings, SshSettings]:
    """Where and how to connect: the emulator's endpoint file, else the saved Blocks."""
    if emulator_endpoint:
        return from_endpoint(emulator_endpoint)
    from blocks import AzureTarget, SshAccess

    azure = AzureTarget.load(azure_block)
    ssh = SshAccess.load(ssh_block)
    return azure.settings(), ssh.settings()  # type: ignore[union-attr]


def resolve_settings(params: ClusterUpgradeParams) -> tuple[AzureSettings, SshSettings]:
    return connection_settings(params.emulator_endpoint, params.azure_block, params.ssh_block)


HEARTBEAT_S = 2.0  # real seconds between liveness records of a running cluster flow


# ------------------------------------------------------------------ stopping from outside

POLL_S = 1.0  # real seconds between reads of a run's own state in Prefect
_listeners: tuple[StopSignals, ...] = ()  # replaced whole: read by the signal handler
_listeners_lock = threading.Lock()
_sigterm_seen = threading.Event()


class StopSignals:
    """Whether a flow run must stop before its end, and why: SIGTERM (what Prefect's runner
    sends a cancelled run), its own flow run gone to Cancelling or Cancelled in Prefect, or
    an abort request for it in the state store. Prefect and the store are read at most
    every ``POLL_S``; a read that fails changes nothing (the Prefect API answering 503 must
    not stop a cluster)."""

    def __init__(
        self,
        flow_run_id: str | None,
        store: Store | None = None,
        *,
        log: Any = None,
    ) -> None:
        self.flow_run_id = flow_run_id
        self.store = store
        self.log = log or (lambda message: None)
        self.event = threading.Event()
        self.why = ""
        self.cancelled_in_prefect = False
        self._polled_at = -POLL_S
        self._polling = threading.Lock()

    def stop(self, why: str) -> None:
        if not self.event.is_set():
            self.why = why
            self.event.set()

    def requested(self) -> bool:
        if self.event.is_set():
            return True
        if time.monotonic() - self._polled_at >= POLL_S and self._polling.acquire(blocking=False):
            try:
                self._polled_at = time.monotonic()
                self._poll()
            finally:
                self._polling.release()
        return self.event.is_set()

    def _poll(self) -> None:
        if self.store is not None and self.flow_run_id:
            try:
                request = self.store.get(ABORTS, self.flow_run_id)
            except AmlfsError as err:
                self.log(f"cannot read the abort requests: {err}")
                request = None
            if request is not None:
                self.stop(f"abort requested by {request.get('by', 'the fleet run')}")
                return
        if not self.flow_run_id:
            return
        from prefect.client.orchestration import get_client

        try:
            with get_client(sync_client=True) as client:
                state = client.read_flow_run(UUID(self.flow_run_id)).state
        except Exception as err:  # the API down or slow: keep running, ask again later
            self.log(f"cannot read this flow run's state in Prefect: {err}")
            return
        if state is not None and (state.is_cancelling() or state.is_cancelled()):
            self.cancelled_in_prefect = True
            self.stop(f"flow run {state.type.value.lower()} in Prefect")


def on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM handler: every run of this process stops as an abort would (Prefect's runner
    sends SIGTERM to a cancelled run and SIGKILL after its grace period)."""
    _sigterm_seen.set()
    for listener in _listeners:
        listener.stop("SIGTERM")


@contextlib.contextmanager
def stop_signals(
    flow_run_id: str | None, store: Store | None = None, *, log: Any = None
) -> Iterator[StopSignals]:
    """A ``StopSignals`` for the calling run; in the main thread it also takes SIGTERM (the
    previous handler, Prefect's own, is put back at the end). Off the main thread (``amlfs
    run-fleet`` runs the flow in a thread) the caller's main thread installs ``on_sigterm``.
    """
    global _listeners
    stop = StopSignals(flow_run_id, store, log=log)
    with _listeners_lock:
        _listeners = (*_listeners, stop)
    if _sigterm_seen.is_set():
        stop.stop("SIGTERM")
    previous: Any = None
    installed = threading.current_thread() is threading.main_thread()
    if installed:
        previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield stop
    finally:
        if installed:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        with _listeners_lock:
            _listeners = tuple(x for x in _listeners if x is not stop)


def variable_says_abort(variable: Any, name: str = "amlfs-fleet-control") -> bool:
    """The fleet's operator control says abort (a failed read says nothing)."""
    try:
        return bool(variable.get(name, default="run") == "abort")
    except Exception:
        return False


def _heartbeat(store: Store, key: str, stop: threading.Event) -> None:
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
    """Upgrade one cluster; its final state carries the result (outcome, reason, timings,
    downtime). Prefect unwraps it: called directly the flow gives the result (and raises
    for a Failed run); with ``return_state=True``, the state (``state.result(
    raise_on_failure=False)`` is the result whatever the state)."""
    from prefect.runtime import flow_run
    from prefect.variables import Variable

    from tasks import run_step
    from tasks.cluster import outcome_state

    logger = get_run_logger()
    store = open_store(params.state_dir)
    flow_run_id = flow_run.get_id()
    run_key = str(flow_run_id or "local")
    done = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(store, run_key, done), daemon=True)
    beat.start()
    with stop_signals(flow_run_id, store, log=logger.warning) as stop:
        try:
            out = _cluster_upgrade(
                params,
                logger,
                run_step,
                # The fleet's operator control, a cancel of this run, SIGTERM, or the
                # dispatching fleet run's abort request: the cluster rolls back.
                lambda: stop.requested() or variable_says_abort(Variable),
            )
        finally:
            done.set()
            beat.join(timeout=10)
        store.put("cluster-results", run_key, value=out)
        if stop.event.is_set():
            # From Cancelling, Prefect accepts only Cancelled; the outcome is in the message
            # and the result (also in the state store under cluster-results).
            final: State[Any] = Cancelled(
                message=f"{stop.why}: {out['outcome']}"
                + (f": {out['reason']}" if out.get("reason") else ""),
                data=out,
            )
        else:
            final = outcome_state(out)
    # A returned state is the run's final state; Prefect hands its data to a direct caller.
    return final  # type: ignore[return-value]


def _cluster_upgrade(
    params: ClusterUpgradeParams, logger: Any, run_step: Any, should_abort: Any
) -> dict[str, Any]:
    job = params.job()
    cluster = job.cluster
    azure, ssh = resolve_settings(params)
    connections = Connections.create(azure, ssh)
    try:
        result = run_job(
            job,
            connections,
            open_store(params.state_dir),
            log=logger.info,
            runner=run_step,
            should_abort=should_abort,
        )
    finally:
        connections.close()
    out = result.record()
    logger.info(
        "%s: %s %s -> %s%s (downtime seen %.0f s)",
        cluster.name,
        result.outcome,
        result.release_before,
        result.release_after,
        f": {result.reason}" if result.reason else "",
        result.downtime_observed_s,
    )
    table, description = _artifact(result)
    create_table_artifact(
        key=f"cluster-{cluster.name}".lower().replace("_", "-"),
        table=table,
        description=description,
    )
    return out


def _artifact(result: ClusterOutcome) -> tuple[list[dict[str, Any]], str]:
    """The cluster's table artifact: its steps, and a description saying how it ended. The
    Prefect UI renders both as Markdown (string cells too): values are Markdown text."""
    table: list[dict[str, Any]] = [
        {
            "step": markdown_text(t.name),
            "status": markdown_text(t.status),
            "seconds": round(t.ended_s - t.started_s, 1),
        }
        for t in result.steps
    ]
    override = getattr(result, "override", None)
    seen = (
        f", evictions {result.evictions}, data-disk changes "
        f"{_listed(result.data_disk_changes)}, leaked disks {_listed(result.leaked_disks)}"
        if result.evictions is not None
        else ""
    )
    if result.unread:
        seen += f" (not read: {'; '.join(result.unread)})"
    description = markdown_text(
        f"{result.cluster}: {result.outcome}, {result.release_before} -> "
        f"{result.release_after}, downtime seen {result.downtime_observed_s:.0f} s"
        + seen
        + (f"; override: {override}" if override else "")
        + (f"; {result.reason}" if result.reason else "")
    )
    return table, description


def _listed(items: list[str] | None) -> str:
    """A count, and what it counts: ``2 (a, b)``; ``?`` when it could not be read."""
    if items is None:
        return "?"
    return f"{len(items)} ({', '.join(items)})" if items else "0"


def cluster_artifact_key(cluster: str) -> str:
    """The key of a cluster's own artifact (Prefect keys: lowercase letters, digits, dashes)."""
    return "cluster-" + cluster.lower()
