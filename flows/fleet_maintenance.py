"""Prefect flow ``fleet-maintenance``: the weekly run, the manual run and the hotfix.

One typed parameter model (the UI renders it as a form). ``mode`` says how it was started:

* ``scheduled``: a cron tick (every 15 min); only clusters whose window opens in the tick;
* ``manual``: the operator's selection, each cluster admitted only inside its window;
* ``hotfix``: named clusters now; outside their window only with ``override_window`` and a
  ``reason`` (recorded in the plan, the artifacts and the result).

Every run first reads each selected cluster (``amlfs.reconcile.read_cluster``: read-only
GETs; a cluster an earlier run left half-way is resumed before the waves, whatever its
MDS's image or window say), then plans (a table artifact: per cluster its window, wave,
whether it runs and why, predicted downtime). ``dry_run`` stops there; nothing in Azure
changes. Otherwise the admitted clusters run wave by wave (``amlfs.fleet.FleetRunner``) as
``cluster-upgrade`` tasks within the caps; the Prefect Variable ``amlfs-fleet-control``
(``run``/``halt``/``abort``) and the run's own state in Prefect are read between admissions.
A cancel in Prefect (Cancelling; then the runner's SIGTERM, and SIGKILL after its grace
period) or a SIGTERM is an abort: the clusters in flight roll back (or finish past the point
of no return), each recorded ``interrupted`` until its outcome is known, so that a resume
finds them. With ``processes`` > 1 the clusters run in that many orchestrator processes on
this machine (``amlfs.shards``: one core each); with ``cluster_deployment`` each runs as its
own flow run on a work pool. Results are saved in the state store under the run name, so a
run started again with the same ``run_name`` continues where it stopped.

The run's final state counts the outcomes in its message (``3 upgraded, 1 rolled_back, 0
failed_needs_attention``): Failed if any cluster needs attention, Cancelled if it was
cancelled, Failed named RolledBack if a cluster rolled back (serving on its old release:
nobody has to act, but it is not green), Completed named Stopped if a halt, an abort or a
wave gate left planned clusters unstarted, else Completed; each cluster's task run tells its
own outcome (``tasks.cluster.outcome_state``).
"""

from __future__ import annotations

import contextvars
import datetime as dt
import os
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, Literal
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.client.schemas.objects import State
from prefect.exceptions import MissingContextError
from prefect.runtime import flow_run
from prefect.settings import PREFECT_API_URL
from prefect.states import Cancelled, Completed, Failed
from prefect.variables import Variable
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.json_schema import SkipJsonSchema

from amlfs.errors import AmlfsError, InventoryError, StateStoreError
from amlfs.fleet import (
    RESUME_WAVE,
    SUCCEEDED,
    ClusterSelector,
    Control,
    FleetPolicy,
    FleetRunner,
    FleetSummary,
    plan_fleet,
    read_all,
)
from amlfs.forms import (
    STATE_DIR,
    AzureBlockName,
    EmulatorEndpoint,
    SshBlockName,
    StateDir,
    declared_order,
)
from amlfs.jobs import ClockAnchor, Executor, InProcessExecutor
from amlfs.models import Cluster, Fleet, Release, load_fleet, load_release
from amlfs.reconcile import ClusterReading, read_cluster
from amlfs.rollout import Rollout, RolloutBook
from amlfs.runtime import Connections
from amlfs.saga import UpgradePolicy
from amlfs.schedule import Prediction, windows_opening_in
from amlfs.shards import ShardPool, ShardSpec
from amlfs.store import Store, open_store
from flows.cluster_upgrade import (
    ClusterUpgradeParams,
    resolve_settings,
    stop_signals,
)
from flows.executors import DeploymentExecutor, PrefectTaskExecutor
from flows.markdown import markdown_text
from flows.rollout_view import RolloutLink, gate_for_other_rollouts, publish_forecast
from flows.taskworkers import TaskWorkerExecutor
from tasks.cluster import ROLLED_BACK

#: A run's final state when it stopped (halt, abort, a wave gate) with clusters it had
#: planned left unstarted and none broken: Completed, named so that it is not read as done.
STOPPED = "Stopped"

__all__ = ["CONTROL_VARIABLE", "FleetParams", "current_release", "fleet_maintenance"]

CONTROL_VARIABLE = "amlfs-fleet-control"


class FleetParams(BaseModel):
    """A fleet maintenance run (rendered as a typed form in the Prefect UI)."""

    # hide_input_in_errors: a refused value may be a secret (a URL with a password).
    # The rules that span fields are in the JSON schema too (RULES), so that the Prefect
    # server refuses a bad run (the UI's form, the REST API) before it is scheduled, with
    # the rule's message, instead of a run that fails on its parameters.
    model_config = ConfigDict(
        extra="forbid", hide_input_in_errors=True, json_schema_extra=lambda s: _rules(s)
    )
    # The operator's fields first: the UI's form shows them in this order.
    fleet_file: str = Field(description="Fleet inventory YAML")
    release_file: str = Field(description="Release YAML")
    mode: Literal["scheduled", "manual", "hotfix"] = Field(
        default="manual",
        description="scheduled: the clusters whose window opens in this tick; manual: the "
        "selected ones whose window is open now (or at `at`); hotfix: the clusters named in "
        "selector.names (policy.override_window, with a reason, runs them outside their window)",
    )
    selector: ClusterSelector = ClusterSelector()
    dry_run: bool = Field(default=False, description="Plan only: nothing changes in Azure")
    at: dt.datetime | None = Field(
        default=None, description="Evaluate windows as of this UTC instant (rehearsals)"
    )
    run_name: str | None = Field(default=None, description="Same name: resume that run")
    rollout: str | None = Field(
        default=None,
        description="Advance this rollout (amlfs rollout start): only clusters of its open "
        "stages run; outcomes are recorded in it",
    )
    policy: FleetPolicy = FleetPolicy()
    upgrade: UpgradePolicy = UpgradePolicy()
    tick_minutes: int = Field(default=15, ge=1, le=1440, description="Scheduled mode's tick")
    # Scale-out is the platform's choice, not the operator's: out of the form and the
    # parameter schema (SkipJsonSchema), set from Python (CLI, benchmarks) or, for a
    # deployment, from its environment (job_variables.env: AMLFS_PROCESSES, ...).
    dead_run_after_s: SkipJsonSchema[float] = Field(
        default_factory=lambda: float(os.environ.get("AMLFS_DEAD_RUN_AFTER_S", "30")),
        gt=0,
        description="Scale-out: real seconds without a heartbeat before a cluster run is dead",
    )
    cluster_deployment: SkipJsonSchema[str | None] = Field(
        default_factory=lambda: os.environ.get("AMLFS_CLUSTER_DEPLOYMENT") or None,
        description=(
            "Scale-out: run each cluster as a flow run of this deployment "
            "(e.g. cluster-upgrade/amlfs-cluster-upgrade) on a work pool; empty: in this process"
        ),
    )
    processes: SkipJsonSchema[int] = Field(
        default_factory=lambda: int(os.environ.get("AMLFS_PROCESSES", "1")),
        ge=1,
        le=64,
        description=(
            "Orchestrator processes on this machine running the clusters (each its own core, "
            "HTTPS pools and SSH sessions; the poll and check rates are split between them). "
            "1: in this process, each step a Prefect task"
        ),
    )
    task_workers: SkipJsonSchema[bool] = Field(
        default_factory=lambda: os.environ.get("AMLFS_TASK_WORKERS", "") in ("1", "true"),
        description=(
            "Scale-out: run each cluster as a task run served by `amlfs task-worker` processes "
            "(this machine or others) sharing state_dir (a postgresql:// URL across machines)"
        ),
    )
    state_dir: StateDir = STATE_DIR
    emulator_endpoint: EmulatorEndpoint = ""
    azure_block: AzureBlockName = "amlfs-azure"
    ssh_block: SshBlockName = "amlfs-ssh"

    @model_validator(mode="after")
    def _check(self) -> FleetParams:
        if self.mode == "hotfix" and not self.selector.names:
            raise ValueError("a hotfix names its clusters: selector.names is empty")
        if self.policy.override_window and self.mode != "hotfix":
            raise ValueError("override_window is only for mode=hotfix")
        if self.policy.override_window and not (self.policy.reason or "").strip():
            raise ValueError("override_window needs policy.reason (recorded with the run)")
        if self.rollout is not None and self.mode == "hotfix":
            raise ValueError(
                "a rollout is advanced by scheduled or manual runs; a hotfix names its clusters"
            )
        if self.at is not None and self.at.tzinfo is None:
            raise ValueError("at must carry a timezone (UTC)")
        spreads = [
            name
            for name, chosen in (
                ("processes > 1", self.processes > 1),
                ("cluster_deployment", bool(self.cluster_deployment)),
                ("task_workers", self.task_workers),
            )
            if chosen
        ]
        if len(spreads) > 1:
            raise ValueError(f"{' and '.join(spreads)} are ways to spread clusters: pick one")
        return self


def _rules(schema: dict[str, Any]) -> None:
    """The cross-field rules of ``FleetParams._check`` as JSON schema (draft 2020-12), and
    each field's ``position`` (Prefect's form order: the server keeps schemas in JSONB, which
    does not keep the properties' order).

    The rules sit under ``dependentSchemas`` (objects all the way down), not ``allOf`` (a
    list): Prefect 3.9.1 checks a deployment's own defaults with every ``required`` removed
    (``remove_nested_keys``, which does not descend into lists), and a run of it with them.
    So the hotfix deployment, whose defaults name no cluster, can be created, and a run of it
    that names none is refused before it exists. The conditions do not use ``required``
    either (``not``/``not const`` says "present and equal"), so that removing it at
    deployment time cannot turn a condition on."""
    declared_order(schema)

    def present_and(name: str, value: Any) -> dict[str, Any]:
        return {"not": {"properties": {name: {"not": {"const": value}}}}}

    schema["dependentSchemas"] = {
        "mode": {  # a hotfix names its clusters
            "if": present_and("mode", "hotfix"),
            "then": {
                "required": ["selector"],
                "properties": {
                    "selector": {"required": ["names"], "properties": {"names": {"minItems": 1}}}
                },
            },
        },
        "policy": {  # an override is a hotfix's, with a reason
            "if": {"properties": {"policy": present_and("override_window", True)}},
            "then": {
                "required": ["mode"],
                "properties": {
                    "mode": {"const": "hotfix"},
                    "policy": {
                        "required": ["reason"],
                        "properties": {"reason": {"type": "string", "pattern": "\\S"}},
                    },
                },
            },
        },
    }


def _prediction(policy: UpgradePolicy) -> tuple[Prediction, float]:
    pred = policy.predictions
    upgrade = 120 + 30 + pred.downtime_s + 60  # prestage + capture + downtime + finalize
    return (
        Prediction(dt.timedelta(seconds=upgrade), dt.timedelta(seconds=pred.rollback_s)),
        pred.downtime_s,
    )


def current_release(connections: Connections, cluster: Cluster) -> str | None:
    """The gallery version the MDS's OS disk was made from (an ARM read, no change)."""
    gateway = connections.gateway(cluster.subscription_id)
    try:
        vm = gateway.vm_info(cluster.resource_group, cluster.mds.name)
        disk = gateway.get_disk(cluster.resource_group, vm.os_disk_name)
    except AmlfsError:
        return None
    return (disk.image_id or "").rsplit("/", 1)[-1] if disk and disk.image_id else None


def read_fleet(
    connections: Connections,
    clusters: list[Cluster],
    release: Release,
    store: Store,
    workers: int = 16,
) -> dict[str, ClusterReading]:
    """Every cluster read for planning (``read_cluster``), ``workers`` at a time."""
    return read_all(
        clusters,
        lambda c: read_cluster(
            c, connections.gateway(c.subscription_id), store, release_version=release.version
        ),
        workers,
    )


def with_journal(fleet: Fleet, store: Store) -> list[str]:
    """Clusters whose journal says a run stopped half-way (state store reads only)."""
    names = []
    for cluster in fleet.clusters:
        journal = store.get("clusters", cluster.name, "run")
        if journal is not None and journal.get("phase") not in (None, "done"):
            names.append(cluster.name)
    return names


class _Control:
    """The operator's Variable, read at most every ``every_s``; the last value stands when
    the Prefect API does not answer (a 503 must not stop, or restart, a fleet run)."""

    def __init__(self, every_s: float = 1.0, log: Callable[[str], None] = lambda m: None):
        self.every_s = every_s
        self.log = log
        self.value: Control = "run"
        self._read_at = -every_s
        self._seen = False

    def __call__(self) -> Control:
        if time.monotonic() - self._read_at >= self.every_s:
            self._read_at = time.monotonic()
            try:
                value = Variable.get(CONTROL_VARIABLE, default="run")
            except Exception as err:
                self.log(f"cannot read {CONTROL_VARIABLE}: {err}; still {self.value}")
            else:
                read: Control = (
                    "halt" if value == "halt" else "abort" if value == "abort" else "run"
                )
                if read != self.value or not self._seen:
                    if read != "run":
                        # Visible on the run, and never silently carried into later runs.
                        self.log(
                            f"{CONTROL_VARIABLE} says {read}"
                            + (" (set before this run started)" if not self._seen else "")
                            + ": admitting no more clusters"
                            + (", rolling back those in flight" if read == "abort" else "")
                            + "; `amlfs control run` clears it"
                        )
                    elif self._seen:
                        self.log(f"{CONTROL_VARIABLE} says run again")
                self.value = read
                self._seen = True
        return self.value


def outcome_message(summary: FleetSummary) -> str:
    """``3 upgraded, 1 rolled_back, 0 failed_needs_attention`` (+ any other outcome)."""
    counts: Counter[str] = summary.counts()
    main = ("upgraded", "rolled_back", "failed_needs_attention")
    parts = [f"{counts.get(name, 0)} {name}" for name in main]
    parts += [f"{n} {name}" for name, n in sorted(counts.items()) if name not in main]
    if not_started := len(summary.all_not_started()):
        parts.append(f"{not_started} not started")
    return ", ".join(parts)


#: The results table's columns: what an operator reads first, then the details.
RESULT_COLUMNS = (
    "cluster",
    "result",
    "downtime (s)",
    "reason",
    "wave",
    "release before",
    "release after",
    "evictions",
    "data-disk changes",
    "leaked disks",
    "override",
)
REASON_CHARS = 160  # in a table cell; the cluster's own artifact and logs have all of it


def _short(text: str) -> str:
    return text if len(text) <= REASON_CHARS else text[: REASON_CHARS - 1] + "\u2026"


def _table(summary: FleetSummary, names: list[str] | None = None) -> list[dict[str, Any]]:
    """The rows of a table artifact (``RESULT_COLUMNS``). The Prefect UI renders every string
    cell as Markdown, so strings are Markdown text here (``markdown_text``): a reason quotes
    node output and the operator's words. ``_markdown`` puts these cells into its table as
    they are. Downtime, evictions, data-disk changes and leaked disks are the run's own
    figures, read back from the world at its end (``ClusterUpgrade._aftermath``); empty
    where the run changed nothing or could not read them."""
    rows = []
    for name, result in summary.all_results().items():
        if names is not None and name not in names:
            continue
        changes, leaked = result.get("data_disk_changes"), result.get("leaked_disks")
        evictions = result.get("evictions")
        rows.append(
            {
                "cluster": name,
                "result": result["outcome"],
                "downtime (s)": round(result.get("downtime_observed_s", 0)),
                "reason": _short(str(result.get("reason", ""))),
                "wave": result.get("wave", ""),
                "release before": result.get("release_before", ""),
                "release after": result.get("release_after", ""),
                "evictions": "" if evictions is None else evictions,
                "data-disk changes": "" if changes is None else len(changes),
                "leaked disks": "" if leaked is None else len(leaked),
                "override": result.get("override") or "",
            }
        )
    for name, reason in summary.all_not_started().items():
        if names is None or name in names:
            rows.append({"cluster": name, "result": "not started", "reason": _short(reason)})
    return [
        {
            column: markdown_text(row[column]) if isinstance(row.get(column), str) else row[column]
            for column in RESULT_COLUMNS
            if column in row
        }
        for row in rows
    ]


@flow(name="fleet-maintenance", persist_result=False, log_prints=False)
def fleet_maintenance(params: FleetParams) -> dict[str, Any]:
    """Plan, then upgrade the admitted clusters wave by wave. A dry run returns the plan;
    a run returns its final state, carrying the fleet summary, its message counting the
    outcomes. Prefect unwraps it: called directly the flow gives the summary (and raises
    for a Failed run); with ``return_state=True``, the state (``state.result(
    raise_on_failure=False)`` is the summary whatever the state)."""
    logger = get_run_logger()
    with stop_signals(flow_run.get_id(), log=logger.warning) as stop:
        outcome = _fleet_maintenance(params, logger, stop)
    # A returned state is the run's final state; Prefect hands its data to a direct caller.
    return outcome  # type: ignore[return-value]


def _fleet_maintenance(params: FleetParams, logger: Any, stop: Any) -> dict[str, Any] | State[Any]:
    from tasks import steps_of

    if params.task_workers and not PREFECT_API_URL.value():
        # Else this run talks to a temporary server of its own that no task worker can reach.
        raise InventoryError(
            "task_workers needs a Prefect server the `amlfs task-worker` processes share: "
            "set PREFECT_API_URL"
        )
    fleet = load_fleet(params.fleet_file)
    release = load_release(params.release_file)
    azure, ssh = resolve_settings(
        ClusterUpgradeParams(
            fleet_file=params.fleet_file,
            cluster=fleet.clusters[0].name,
            release_file=params.release_file,
            emulator_endpoint=params.emulator_endpoint,
            azure_block=params.azure_block,
            ssh_block=params.ssh_block,
        )
    )
    connections = Connections.create(azure, ssh)
    start_utc = params.at or dt.datetime.now(dt.UTC)
    # The run's UTC clock, on the emulator's time scale when there is one; every cluster's job
    # carries it, wherever it runs.
    anchor = ClockAnchor.start(start_utc, time_scale=connections.clock.time_scale)
    now_utc = anchor.now_utc

    store = open_store(params.state_dir)
    book = RolloutBook(store)
    selector = params.selector
    link: RolloutLink | None = None
    if params.rollout is not None:
        try:
            link = RolloutLink(book, params.rollout, release, now=now_utc, log=logger.info)
        except (InventoryError, StateStoreError):
            connections.close()
            raise
        members = [c.name for c in fleet.clusters if c.name in link.members and selector.matches(c)]
        selector = selector.model_copy(update={"names": members or ["<none>"]})
    if params.mode == "scheduled":
        tick_start = start_utc.replace(second=0, microsecond=0)
        tick_start -= dt.timedelta(minutes=tick_start.minute % params.tick_minutes)
        opening = windows_opening_in(
            fleet, tick_start, tick_start + dt.timedelta(minutes=params.tick_minutes)
        )
        names = [w.cluster for w in opening if selector.matches(fleet.cluster(w.cluster))]
        logger.info("scheduled tick %s: windows opening for %s", tick_start, names or "no cluster")
        # And whatever an earlier run left half-way (its journal says so): resumed now, not
        # when its window next opens.
        halfway = [
            n
            for n in with_journal(fleet, store)
            if n not in names and selector.matches(fleet.cluster(n))
        ]
        if halfway:
            logger.info(
                "scheduled tick %s: journals of interrupted runs for %s", tick_start, halfway
            )
        selector = selector.model_copy(update={"names": (names + halfway) or ["<none>"]})
        if not names and not halfway:
            # Nothing to do: no artifact either, so the last real results stay in view.
            if link is not None:
                _publish(book, link.rollout, fleet, anchor, params, logger)
            connections.close()
            return Completed(
                message="no window opens in this tick",
                data={"run_name": params.run_name, "results": {}, "plan": [], "counts": {}},
            )
    prediction, downtime = _prediction(params.upgrade)
    try:
        readings = read_fleet(
            connections, [c for c in fleet.clusters if selector.matches(c)], release, store
        )
        for reading in readings.values():
            if reading.error:
                logger.warning("%s: cannot read it: %s", reading.cluster, reading.error)
        rows = plan_fleet(
            fleet,
            release,
            selector,
            params.policy,
            start_utc,
            prediction,
            downtime,
            current_release=lambda c: readings[c.name].release,
            interrupted=lambda c: readings[c.name].interrupted,
        )
    except (InventoryError, AmlfsError):
        connections.close()
        raise
    run_name = params.run_name or str(flow_run.get_name() or "fleet-run")
    for reading in readings.values():
        if reading.release is not None:
            _saw(book, reading.cluster, reading.release, now_utc(), logger)
    policy = params.policy
    if link is not None:
        rows = link.gate(rows)
        for row in rows:
            if row.skipped and row.cluster in link.members:
                link.record(row.cluster, "already_current", run_name, row.reason)
        policy = policy.model_copy(update={"error_budget": link.remaining_budget()})
    elif params.mode == "scheduled":
        rows = gate_for_other_rollouts(book, rows, start_utc)
    create_table_artifact(
        key="fleet-plan",
        table=[r.as_dict() for r in rows],
        description=f"{run_name}: plan for {release.version} ({params.mode}"
        + (", dry run" if params.dry_run else "")
        + ")",
    )
    for row in rows:
        logger.info("plan %s: %s (%s)", row.cluster, "run" if row.run else "no", row.reason)
    if params.dry_run:
        connections.close()
        return {"run_name": run_name, "dry_run": True, "plan": [r.as_dict() for r in rows]}

    admitted = [r for r in rows if r.run]
    progress: UUID | None = None
    if admitted:
        created = create_progress_artifact(progress=0.0, key="fleet-progress", description=run_name)
        progress = created if isinstance(created, UUID) else None
    executor: Executor
    shards: ShardPool | None = None
    if params.task_workers:
        executor = TaskWorkerExecutor(
            store,
            run_name,
            {
                "emulator_endpoint": params.emulator_endpoint,
                "azure_block": params.azure_block,
                "ssh_block": params.ssh_block,
            },
            contextvars.copy_context(),
            lease_ttl_s=params.upgrade.lease_ttl_s,
            log=logger.info,
        )
    elif params.cluster_deployment:
        executor = DeploymentExecutor(
            params.cluster_deployment,
            params,
            store,
            logger,
            context=contextvars.copy_context(),
        )
    else:
        if params.processes > 1 and admitted:
            # In other processes: their steps are not Prefect tasks, their log lines come here.
            shards = ShardPool(
                ShardSpec(azure, ssh, params.state_dir), params.processes, log=logger.info
            )
            shards.start()
        executor = PrefectTaskExecutor(
            shards
            or InProcessExecutor(
                connections,
                store,
                log=_run_log(logger),
                runner_for=lambda job: steps_of(job.name),
            ),
            contextvars.copy_context(),
        )

    def on_result(summary: FleetSummary, cluster: str) -> None:
        result = summary.results[cluster]
        logger.info("%s: %s %s", cluster, result["outcome"], result.get("reason", ""))
        if result["outcome"] in SUCCEEDED:
            _saw(book, cluster, release.version, now_utc(), logger)
        if link is not None:
            link.record(cluster, result["outcome"], run_name, result.get("reason", ""))
        if progress is not None:
            update_progress_artifact(progress, 100.0 * len(summary.results) / len(admitted))

    operator = _Control(log=logger.warning)

    def control() -> Control:
        # A cancel of this flow run in Prefect, or SIGTERM, is an abort of the whole run.
        if stop.requested():
            return "cancel"
        value = operator()
        return link.control() if value == "run" and link is not None else value

    runner = FleetRunner(
        fleet,
        rows,
        policy,
        executor,
        store,
        run_name,
        release=release,
        upgrade=params.upgrade,
        anchor=anchor,
        control=control,
        now=now_utc,
        sleep=connections.clock.sleep,
        # Waits (the bake time) ask the controls about once a real second.
        control_every_s=connections.clock.time_scale,
        on_result=on_result,
        log=logger.info,
    )
    try:
        summary = runner.run()
    finally:
        if shards is not None:
            shards.close()
        connections.close()
    if link is not None:
        for cluster, result in summary.results.items():  # any a failing store missed
            link.record(cluster, result["outcome"], run_name, result.get("reason", ""))
        _publish(book, link.rollout, fleet, anchor, params, logger)
    for wave in summary.waves:
        if wave["wave"] == RESUME_WAVE:
            names = [r.cluster for r in rows if r.interrupted]
        else:
            names = [r.cluster for r in rows if r.wave == wave["wave"] and not r.interrupted]
        create_table_artifact(
            key=f"fleet-wave-{wave['wave']}".lower().replace("_", "-"),
            table=_table(summary, names),
            description=f"{run_name}: wave {wave['wave']}",
        )
    table = _table(summary)
    create_table_artifact(key="fleet-results", table=table, description=f"{run_name}: fleet")
    counts = summary.counts()
    message = outcome_message(summary)
    if summary.stopped:
        message += f"; stopped: {summary.stopped}"
    create_markdown_artifact(
        key="fleet-summary",
        markdown=_markdown(run_name, release.version, params, summary, table),
        description=markdown_text(f"{run_name}: {message}"),
    )
    out = summary.as_dict()
    out["plan"] = [r.as_dict() for r in rows]
    if link is not None:
        out["rollout"] = {"name": link.name, "state": link.rollout.state}
    logger.info(
        "fleet run %s done: %s",
        run_name,
        message,
    )
    if summary.cancelled or stop.event.is_set():
        # From Cancelling, Prefect accepts only Cancelled.
        return Cancelled(message=f"{stop.why or 'cancelled'}: {message}", data=out)
    if counts.get("failed_needs_attention"):
        return Failed(message=message, data=out)
    if counts.get("rolled_back"):
        # Red at a glance, named apart from a run that needs a human (tasks.cluster).
        return Failed(name=ROLLED_BACK, message=message, data=out)
    if summary.stopped and summary.all_not_started():
        # Nothing is broken, but the run left clusters it planned: not a plain Completed.
        return Completed(name=STOPPED, message=message, data=out)
    return Completed(message=message, data=out)


def _run_log(fallback: Any) -> Callable[[str], None]:
    """Log on the Prefect run of the calling thread (a cluster's task run: its lines on its
    own run), else on ``fallback`` (the fleet run's logger; threads without a run)."""

    def log(message: str) -> None:
        try:
            logger = get_run_logger()
        except MissingContextError:
            logger = fallback
        logger.info("%s", message)

    return log


def _saw(book: RolloutBook, cluster: str, version: str, at: dt.datetime, logger: Any) -> None:
    try:
        book.saw(cluster, version, at)
    except StateStoreError as err:  # compliance is a view: a run never stops for it
        logger.warning("%s: cannot record its release: %s", cluster, err)


def _publish(
    book: RolloutBook,
    rollout: Rollout,
    fleet: Fleet,
    anchor: ClockAnchor,
    params: FleetParams,
    logger: Any,
) -> None:
    try:
        prediction, _ = _prediction(params.upgrade)
        if publish_forecast(
            book,
            book.get(rollout.name),
            fleet,
            anchor.now_utc(),
            upgrade=prediction.upgrade,
            state_dir=params.state_dir,
        ):
            logger.info("rollout %s: forecast published", rollout.name)
    except (StateStoreError, InventoryError) as err:
        logger.warning("rollout %s: cannot publish its forecast: %s", rollout.name, err)


def _markdown(
    run_name: str,
    version: str,
    params: FleetParams,
    summary: FleetSummary,
    table: list[dict[str, Any]],
) -> str:
    """The fleet-summary artifact. ``table``: rows from ``_table`` (cells already Markdown
    text); every other value is escaped here."""
    reason = params.policy.reason
    lines = [
        f"# Fleet maintenance {markdown_text(run_name)}",
        "",
        f"Release **{markdown_text(version)}**, mode **{markdown_text(params.mode)}**"
        + (
            f", window overridden: {markdown_text(reason or '')}"
            if params.policy.override_window
            else ""
        ),
        "",
        "| cluster | result | downtime (s) | reason | wave | before | after |",
        "|---|---|---|---|---|---|---|",
    ]
    columns = (
        "cluster", "result", "downtime (s)", "reason", "wave", "release before", "release after"
    )  # fmt: skip
    for row in table:
        cells = [str(row.get(column, "")) for column in columns]
        lines.append("| " + " | ".join(cells) + " |")
    if summary.stopped:
        lines += ["", f"Stopped admitting: {markdown_text(summary.stopped)}"]
    return "\n".join(lines) + "\n"
