"""The executors a fleet run chooses from, on Prefect's side of the seam (``amlfs.jobs``).

* ``PrefectTaskExecutor``: each job as a Prefect task run named after its cluster
  (``upgrade-<cluster>``) inside the fleet's flow run, its state telling the cluster's outcome
  (``tasks.cluster.outcome_state``); the job itself runs on the executor it wraps (this
  process, each step a nested task, or ``amlfs.shards.ShardPool``).
* ``DeploymentExecutor``: each job as its own flow run of the ``cluster-upgrade`` deployment on
  a work pool (``run_on_workers``), an abort carried to it as a request in the state store.

Either way the outcome the fleet records is the job's own record, never a Prefect state alone.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prefect.artifacts import create_table_artifact
from prefect.client.schemas.objects import State

from amlfs.jobs import ClusterJob, ClusterOutcome, Executor
from amlfs.store import Store
from flows.cluster_upgrade import (
    ABORTS,
    ClusterUpgradeParams,
    _artifact,
    cluster_artifact_key,
)

if TYPE_CHECKING:
    from flows.fleet_maintenance import FleetParams

__all__ = ["DeploymentExecutor", "PrefectTaskExecutor", "run_on_workers"]


class PrefectTaskExecutor:
    """Each job a Prefect task run of the fleet's flow run (``context``: a copy of the flow
    run's context; worker threads do not inherit it)."""

    def __init__(self, inner: Executor, context: contextvars.Context) -> None:
        self.inner = inner
        self.context = context

    def run(self, job: ClusterJob, should_abort: Callable[[], bool]) -> ClusterOutcome:
        from tasks.cluster import upgrade_cluster

        def body() -> dict[str, Any]:
            outcome = self.inner.run(job, should_abort)
            table, description = _artifact(outcome)
            # On the cluster's own task run: its steps with timings, how it ended, why.
            create_table_artifact(
                key=cluster_artifact_key(job.name), table=table, description=description
            )
            return outcome.record()

        state: State[Any] = self.context.copy().run(
            lambda: upgrade_cluster.with_options(task_run_name=f"upgrade-{job.name}")(
                body, return_state=True
            )
        )
        data = state.result(raise_on_failure=False)
        if isinstance(data, BaseException):
            raise data  # a bug in the job: FleetRunner records it as failed_needs_attention
        return ClusterOutcome.from_record(data)


class DeploymentExecutor:
    """Each job a flow run of ``deployment`` on a work pool, with the fleet run's connection
    settings (``params``) and the job's own fields."""

    def __init__(
        self,
        deployment: str,
        params: FleetParams,
        store: Store,
        logger: Any,
        *,
        context: contextvars.Context,
    ) -> None:
        self.deployment = deployment
        self.params = params
        self.store = store
        self.logger = logger
        self.context = context

    def run(self, job: ClusterJob, should_abort: Callable[[], bool]) -> ClusterOutcome:
        cluster_params = ClusterUpgradeParams(
            fleet_file=self.params.fleet_file,
            cluster=job.name,
            release_file=self.params.release_file,
            policy=job.policy,
            state_dir=self.params.state_dir,
            emulator_endpoint=self.params.emulator_endpoint,
            azure_block=self.params.azure_block,
            ssh_block=self.params.ssh_block,
            window_end=job.window_end,
            anchor=job.anchor,
            override_reason=job.override_reason,
            wave=job.wave,
        ).model_dump(mode="json")
        out = self.context.copy().run(
            run_on_workers,
            self.deployment,
            job.name,
            cluster_params,
            self.store,
            self.logger,
            self.params.dead_run_after_s,
            should_abort,
        )
        return ClusterOutcome.from_record(
            {**out, "wave": job.wave, "override": job.override_reason}
        )


FOLLOW_UPS = 2
BUSY_WAITS = 3  # follow-ups refused by a dead run's lease, waited out one lease each


def run_on_workers(
    deployment: str,
    cluster: str,
    cluster_params: dict[str, Any],
    store: Store,
    logger: Any,
    dead_after_s: float = 30.0,
    should_abort: Callable[[], bool] = lambda: False,
) -> dict[str, Any]:
    """One cluster as a flow run on the work pool; a run whose worker died is marked crashed
    and followed by a new run, which resumes the cluster from its journal. Once
    ``should_abort()`` says so, the run is asked to abort (an abort request in the state
    store, read at its step boundaries: the cluster rolls back where it runs, without its
    process being killed mid-swap)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments import run_deployment
    from prefect.states import Crashed

    reason = ""
    attempt = 0
    busy_waits = 0
    ttl = float((cluster_params.get("policy") or {}).get("lease_ttl_s", 60.0))
    for attempt in range(1 + FOLLOW_UPS + BUSY_WAITS):
        if attempt > FOLLOW_UPS + busy_waits:
            break
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
                if should_abort() and store.get(ABORTS, str(run.id)) is None:
                    store.put(ABORTS, str(run.id), value={"by": "the fleet run", "at": time.time()})
                    logger.info("%s: asked flow run %s to abort", cluster, run.id)
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
        # The run's own record of the outcome, whatever its state says: Completed, Failed
        # (needs attention), Cancelled (rolled back on a cancel) all leave one.
        result = store.get("cluster-results", str(run.id))
        if result is not None and state is not None and state.is_final() and not silent:
            if attempt and result.get("outcome") == "busy" and busy_waits < BUSY_WAITS:
                # A follow-up after a crash found the dead run's lease still live (its
                # worker was on another host: taken over once it expires). Wait it out.
                busy_waits += 1
                logger.info("%s: %s; trying again in %.0f s", cluster, result["reason"], ttl)
                time.sleep(ttl)
                continue
            result["flow_run"] = str(run.id)
            result["follow_ups"] = attempt
            return dict(result)
        if state is not None and state.is_completed():
            reason = f"flow run {run.id} completed without a result"
        elif state is not None and state.is_cancelled():
            # An operator's decision: no follow-up. Killed before it recorded an outcome,
            # the cluster may be half-way: a resume of the fleet run finds it.
            return {
                "cluster": cluster,
                "outcome": "interrupted",
                "reason": f"flow run {run.id} was cancelled before it recorded an outcome: "
                f"{state.message}",
                "flow_run": str(run.id),
                "follow_ups": attempt,
            }
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
