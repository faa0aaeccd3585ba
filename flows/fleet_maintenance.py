"""Prefect flow ``fleet-maintenance``: the weekly run, the manual run and the hotfix.

One typed parameter model (the UI renders it as a form). ``mode`` says how it was started:

* ``scheduled``: a cron tick (every 15 min); only clusters whose window opens in the tick;
* ``manual``: the operator's selection, each cluster admitted only inside its window;
* ``hotfix``: named clusters now; outside their window only with ``override_window`` and a
  ``reason`` (recorded in the plan, the artifacts and the result).

Every run plans first (a table artifact: per cluster its window, wave, whether it runs and
why, predicted downtime). ``dry_run`` stops there; nothing in Azure changes. Otherwise the
admitted clusters run wave by wave (``amlfs.fleet.FleetRunner``) as ``cluster-upgrade`` tasks
within the caps; the Prefect Variable ``amlfs-fleet-control`` (``run``/``halt``/``abort``)
is read between admissions. With ``processes`` > 1 the clusters run in that many orchestrator
processes on this machine (``amlfs.shards``: one core each); with ``cluster_deployment``
each runs as its own flow run on a work pool. Results are saved in the state store under the
run name, so a run started again with the same ``run_name`` continues where it stopped.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import time
from typing import Any, Literal
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.runtime import flow_run
from prefect.variables import Variable
from pydantic import BaseModel, ConfigDict, Field, model_validator

from amlfs.errors import AmlfsError, InventoryError
from amlfs.fleet import ClusterSelector, FleetPolicy, FleetRunner, FleetSummary, plan_fleet
from amlfs.models import Cluster, load_fleet, load_release
from amlfs.runtime import Connections
from amlfs.saga import UpgradePolicy
from amlfs.schedule import Prediction, windows_opening_in
from amlfs.shards import ShardPool, ShardSpec
from amlfs.store import StateStore
from flows.cluster_upgrade import ClusterUpgradeParams, resolve_settings, run_cluster_upgrade

__all__ = ["CONTROL_VARIABLE", "FleetParams", "fleet_maintenance"]

CONTROL_VARIABLE = "amlfs-fleet-control"


class FleetParams(BaseModel):
    """A fleet maintenance run (rendered as a typed form in the Prefect UI)."""

    model_config = ConfigDict(extra="forbid")
    fleet_file: str = Field(description="Fleet inventory YAML")
    release_file: str = Field(description="Release YAML")
    mode: Literal["scheduled", "manual", "hotfix"] = "manual"
    selector: ClusterSelector = ClusterSelector()
    policy: FleetPolicy = FleetPolicy()
    upgrade: UpgradePolicy = UpgradePolicy()
    dry_run: bool = Field(default=False, description="Plan only: nothing changes in Azure")
    tick_minutes: int = Field(default=15, ge=1, le=1440, description="Scheduled mode's tick")
    at: dt.datetime | None = Field(
        default=None, description="Evaluate windows as of this UTC instant (rehearsals)"
    )
    run_name: str | None = Field(default=None, description="Same name: resume that run")
    dead_run_after_s: float = Field(
        default=30.0,
        gt=0,
        description="Scale-out: real seconds without a heartbeat before a cluster run is dead",
    )
    cluster_deployment: str | None = Field(
        default=None,
        description=(
            "Scale-out: run each cluster as a flow run of this deployment "
            "(e.g. cluster-upgrade/amlfs-cluster-upgrade) on a work pool; empty: in this process"
        ),
    )
    processes: int = Field(
        default=1,
        ge=1,
        le=64,
        description=(
            "Orchestrator processes on this machine running the clusters (each its own core, "
            "HTTPS pools and SSH sessions; the poll and check rates are split between them). "
            "1: in this process, each step a Prefect task"
        ),
    )
    state_dir: str = ".amlfs-state"
    emulator_endpoint: str | None = None
    azure_block: str = "amlfs-azure"
    ssh_block: str = "amlfs-ssh"

    @model_validator(mode="after")
    def _check(self) -> FleetParams:
        if self.mode == "hotfix" and not self.selector.names:
            raise ValueError("a hotfix names its clusters: selector.names is empty")
        if self.policy.override_window and self.mode != "hotfix":
            raise ValueError("override_window is only for mode=hotfix")
        if self.policy.override_window and not (self.policy.reason or "").strip():
            raise ValueError("override_window needs policy.reason (recorded with the run)")
        if self.at is not None and self.at.tzinfo is None:
            raise ValueError("at must carry a timezone (UTC)")
        if self.processes > 1 and self.cluster_deployment:
            raise ValueError(
                "processes > 1 and cluster_deployment are two ways to spread clusters: pick one"
            )
        return self


def _prediction(policy: UpgradePolicy) -> tuple[Prediction, float]:
    pred = policy.predictions
    upgrade = 120 + 30 + pred.downtime_s + 60  # prestage + capture + downtime + finalize
    return (
        Prediction(dt.timedelta(seconds=upgrade), dt.timedelta(seconds=pred.rollback_s)),
        pred.downtime_s,
    )


def _current_release(connections: Connections, cluster: Cluster) -> str | None:
    """The gallery version the MDS's OS disk was made from (an ARM read, no change)."""
    gateway = connections.gateway(cluster.subscription_id)
    try:
        vm = gateway.vm_info(cluster.resource_group, cluster.mds.name)
        disk = gateway.get_disk(cluster.resource_group, vm.os_disk_name)
    except AmlfsError:
        return None
    return (disk.image_id or "").rsplit("/", 1)[-1] if disk and disk.image_id else None


def _control() -> Literal["run", "halt", "abort"]:
    value = Variable.get(CONTROL_VARIABLE, default="run")
    return value if value in ("halt", "abort") else "run"  # type: ignore[return-value]


def _table(summary: FleetSummary, names: list[str] | None = None) -> list[dict[str, Any]]:
    rows = []
    for name, result in summary.results.items():
        if names is not None and name not in names:
            continue
        view = result.get("customer_view") or {}
        rows.append(
            {
                "cluster": name,
                "wave": result.get("wave", ""),
                "result": result["outcome"],
                "release before": result.get("release_before", ""),
                "release after": result.get("release_after", ""),
                "downtime (s)": round(
                    view.get("downtime_total", result.get("downtime_observed_s", 0))
                ),
                "reason": result.get("reason", ""),
            }
        )
    for name, reason in summary.not_started.items():
        if names is None or name in names:
            rows.append({"cluster": name, "result": "not started", "reason": reason})
    return rows


@flow(name="fleet-maintenance", persist_result=False, log_prints=False)
def fleet_maintenance(params: FleetParams) -> dict[str, Any]:
    """Plan, then upgrade the admitted clusters wave by wave; returns the fleet summary."""
    from tasks import run_step
    from tasks.cluster import upgrade_cluster

    logger = get_run_logger()
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
    start_clock = connections.clock.now()

    def now_utc() -> dt.datetime:  # on the emulator's time scale when there is one
        return start_utc + dt.timedelta(seconds=connections.clock.now() - start_clock)

    selector = params.selector
    if params.mode == "scheduled":
        tick_start = start_utc.replace(second=0, microsecond=0)
        tick_start -= dt.timedelta(minutes=tick_start.minute % params.tick_minutes)
        opening = windows_opening_in(
            fleet, tick_start, tick_start + dt.timedelta(minutes=params.tick_minutes)
        )
        names = [w.cluster for w in opening if selector.matches(fleet.cluster(w.cluster))]
        logger.info("scheduled tick %s: windows opening for %s", tick_start, names or "no cluster")
        selector = selector.model_copy(update={"names": names or ["<none>"]})
    prediction, downtime = _prediction(params.upgrade)
    try:
        rows = plan_fleet(
            fleet,
            release,
            selector,
            params.policy,
            start_utc,
            prediction,
            downtime,
            current_release=lambda c: _current_release(connections, c),
        )
    except InventoryError:
        connections.close()
        raise
    run_name = params.run_name or str(flow_run.get_name() or "fleet-run")
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

    store = StateStore(params.state_dir)
    admitted = [r for r in rows if r.run]
    progress: UUID | None = None
    if admitted:
        created = create_progress_artifact(progress=0.0, key="fleet-progress", description=run_name)
        progress = created if isinstance(created, UUID) else None
    window_ends = {r.cluster: r.window_end for r in rows}
    context = contextvars.copy_context()

    def dispatched(cluster: Cluster, should_abort: Any) -> dict[str, Any]:
        assert params.cluster_deployment is not None
        cluster_params = ClusterUpgradeParams(
            fleet_file=params.fleet_file,
            cluster=cluster.name,
            release_file=params.release_file,
            policy=params.upgrade,
            state_dir=params.state_dir,
            emulator_endpoint=params.emulator_endpoint,
            azure_block=params.azure_block,
            ssh_block=params.ssh_block,
            window_end=None if params.policy.override_window else window_ends[cluster.name],
        ).model_dump(mode="json")
        out = context.copy().run(
            run_on_workers,
            params.cluster_deployment,
            cluster.name,
            cluster_params,
            store,
            logger,
            params.dead_run_after_s,
        )
        if params.policy.override_window:
            out["override"] = params.policy.reason
        return out

    shards: ShardPool | None = None
    if params.processes > 1 and admitted:
        spec = ShardSpec(
            azure,
            ssh,
            release,
            params.upgrade,
            params.state_dir,
            utc_anchor=now_utc(),
            wall_anchor=time.time(),
        )
        shards = ShardPool(spec, params.processes, log=logger.info)
        shards.start()

    def upgrade(cluster: Cluster, should_abort: Any) -> dict[str, Any]:
        if params.cluster_deployment:
            return dispatched(cluster, should_abort)
        window_end = None if params.policy.override_window else window_ends[cluster.name]

        def job() -> dict[str, Any]:
            if shards is not None:
                # In another process: its steps are not Prefect tasks, its log lines come here.
                out = shards.upgrade(cluster, should_abort, window_end)
            else:
                out = run_cluster_upgrade(
                    cluster,
                    release,
                    connections,
                    store,
                    params.upgrade,
                    log=logger.info,
                    runner=run_step,
                    should_abort=should_abort,
                    window_end=window_end,
                    now_utc=now_utc,
                ).model_dump(mode="json")
            if params.emulator_endpoint:
                from flows.cluster_upgrade import customer_view

                out["customer_view"] = customer_view(params.emulator_endpoint, cluster.name)
            if params.policy.override_window:
                out["override"] = params.policy.reason
            return out

        # Worker threads do not inherit the flow's context: run the task inside a copy of it.
        return context.copy().run(
            upgrade_cluster.with_options(task_run_name=f"upgrade-{cluster.name}"), job
        )

    def on_result(summary: FleetSummary, cluster: str) -> None:
        result = summary.results[cluster]
        logger.info("%s: %s %s", cluster, result["outcome"], result.get("reason", ""))
        if progress is not None:
            update_progress_artifact(progress, 100.0 * len(summary.results) / len(admitted))

    runner = FleetRunner(
        fleet,
        rows,
        params.policy,
        upgrade,
        store,
        run_name,
        control=_control,
        now=now_utc,
        sleep=connections.clock.sleep,
        on_result=on_result,
        log=logger.info,
    )
    try:
        summary = runner.run()
    finally:
        if shards is not None:
            shards.close()
        connections.close()
    for wave in summary.waves:
        names = [r.cluster for r in rows if r.wave == wave["wave"]]
        create_table_artifact(
            key=f"fleet-wave-{wave['wave']}".lower().replace("_", "-"),
            table=_table(summary, names),
            description=f"{run_name}: wave {wave['wave']}",
        )
    table = _table(summary)
    create_table_artifact(key="fleet-results", table=table, description=f"{run_name}: fleet")
    counts = summary.counts()
    create_markdown_artifact(
        key="fleet-summary",
        markdown=_markdown(run_name, release.version, params, summary, table),
        description=f"{run_name}: {dict(counts)}",
    )
    out = summary.as_dict()
    out["plan"] = [r.as_dict() for r in rows]
    logger.info(
        "fleet run %s done: %s%s",
        run_name,
        dict(counts),
        f"; stopped: {summary.stopped}" if summary.stopped else "",
    )
    return out


FOLLOW_UPS = 2


def run_on_workers(
    deployment: str,
    cluster: str,
    cluster_params: dict[str, Any],
    store: StateStore,
    logger: Any,
    dead_after_s: float = 30.0,
) -> dict[str, Any]:
    """One cluster as a flow run on the work pool; a run whose worker died is marked crashed
    and followed by a new run, which resumes the cluster from its journal."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments import run_deployment
    from prefect.states import Crashed

    reason = ""
    attempt = 0
    for attempt in range(1 + FOLLOW_UPS):
        run = run_deployment(
            name=deployment,
            parameters={"params": cluster_params},
            timeout=0,
            flow_run_name=f"{cluster}-{attempt}" if attempt else cluster,
        )
        assert isinstance(run, FlowRun)
        logger.info("%s: dispatched as flow run %s", cluster, run.id)
        started = time.time()
        silent = ""
        with get_client(sync_client=True) as client:
            while True:
                time.sleep(1.0)
                current = client.read_flow_run(run.id)
                state = current.state
                if state is not None and state.is_final():
                    break
                beat = store.get("cluster-runs", str(run.id))
                last = beat["at"] if beat else started
                if state is not None and state.is_running() and time.time() - last > dead_after_s:
                    silent = f"flow run {run.id} silent for {time.time() - last:.0f} s"
                    logger.warning(
                        "%s: %s: marking it crashed, starting a follow-up", cluster, silent
                    )
                    client.set_flow_run_state(run.id, Crashed(message=silent), force=True)
                    break
        if state is not None and state.is_completed():
            result = store.get("cluster-results", str(run.id))
            if result is not None:
                result["flow_run"] = str(run.id)
                result["follow_ups"] = attempt
                return dict(result)
            reason = f"flow run {run.id} completed without a result"
        elif state is not None and state.is_cancelled():
            reason = f"flow run {run.id} was cancelled: {state.message}"
            break  # an operator's decision: no follow-up
        else:
            # Crashed (its worker or process died or went silent) or failed (an error escaped
            # the flow): the cluster may be mid-swap, and a follow-up resumes it from its
            # journal. Only a cancel stops here.
            what = f"{state.type.value}: {state.message}" if state is not None else "no state"
            reason = silent or f"flow run {run.id} ended {what}"
        logger.warning("%s: %s", cluster, reason)
    return {
        "cluster": cluster,
        "outcome": "failed_needs_attention",
        "reason": reason,
        "follow_ups": attempt,
    }


def _markdown(
    run_name: str,
    version: str,
    params: FleetParams,
    summary: FleetSummary,
    table: list[dict[str, Any]],
) -> str:
    lines = [
        f"# Fleet maintenance {run_name}",
        "",
        f"Release **{version}**, mode **{params.mode}**"
        + (f", window overridden: {params.policy.reason}" if params.policy.override_window else ""),
        "",
        "| cluster | wave | result | before | after | downtime (s) | reason |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in table:
        lines.append(
            "| {cluster} | {wave} | {result} | {before} | {after} | {down} | {reason} |".format(
                cluster=row["cluster"],
                wave=row.get("wave", ""),
                result=row["result"],
                before=row.get("release before", ""),
                after=row.get("release after", ""),
                down=row.get("downtime (s)", ""),
                reason=str(row.get("reason", "")).replace("|", "/"),
            )
        )
    if summary.stopped:
        lines += ["", f"Stopped admitting: {summary.stopped}"]
    return "\n".join(lines) + "\n"
