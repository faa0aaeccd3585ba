"""One cluster's upgrade as a job, and the one seam every way of running it goes through.

A ``ClusterJob`` is frozen and serializable (JSON or pickle): the cluster, the release, the
upgrade policy, the end of the cluster's window, the clock anchor (a rehearsal evaluates
windows as of ``at``, on the emulator's time scale), and the override reason of a hotfix.
The fleet core (``amlfs.fleet.FleetRunner``) builds one per admitted cluster from its plan.

An ``Executor`` runs jobs and reports a typed ``ClusterOutcome``; an abort reaches every
executor the same way, through the ``should_abort`` callable it is given with the job (an
in-process saga reads it at its step boundaries and inside its waits; an executor that runs
the job elsewhere forwards it). The fleet runner, the flows, the demo and the benchmarks
only choose an executor:

* ``InProcessExecutor`` (here): threads of this process, optionally with each step run by a
  ``StepRunner`` (the Prefect flows make each step a task);
* ``amlfs.shards.ShardPool``: child processes on this machine;
* ``flows.fleet_maintenance``: each cluster a Prefect task run, or a flow run on a work pool.

``run_job`` is the one place that runs a cluster's saga.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from amlfs.models import Cluster, Release
from amlfs.runtime import Connections
from amlfs.saga import ClusterUpgrade, StepRunner, StepTiming, UpgradePolicy, UpgradeResult
from amlfs.store import Store

__all__ = [
    "ClockAnchor",
    "ClusterJob",
    "ClusterOutcome",
    "Executor",
    "InProcessExecutor",
    "OutcomeName",
    "run_job",
]

#: What can happen to a cluster in a run: the saga's outcomes, and ``interrupted`` (its run
#: was cancelled or stopped before it recorded one: a resume finds it).
OutcomeName = Literal[
    "upgraded", "rolled_back", "already_current", "failed_needs_attention", "busy", "interrupted"
]


class ClockAnchor(BaseModel):
    """The run's UTC clock: ``utc`` at Unix time ``wall``, running ``time_scale`` times as
    fast as the wall clock (the emulator's time scale). Carried by each job so that a job run
    in another process or on another machine judges its window on the same clock."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    utc: dt.datetime
    wall: float
    time_scale: float = Field(default=1.0, gt=0)

    @classmethod
    def start(cls, utc: dt.datetime | None = None, *, time_scale: float = 1.0) -> ClockAnchor:
        """The clock of a run starting now, at ``utc`` (default: the real UTC now)."""
        return cls(utc=utc or dt.datetime.now(dt.UTC), wall=time.time(), time_scale=time_scale)

    def now_utc(self) -> dt.datetime:
        return self.utc + dt.timedelta(seconds=(time.time() - self.wall) * self.time_scale)


class ClusterJob(BaseModel):
    """One cluster to one release, as the fleet's plan admitted it."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    cluster: Cluster
    release: Release
    policy: UpgradePolicy = UpgradePolicy()
    run_id: str | None = Field(default=None, description="None: a new run id (or the journal's)")
    window_end: dt.datetime | None = Field(
        default=None, description="When the cluster's window closes; None: no window (hotfix)"
    )
    anchor: ClockAnchor | None = Field(default=None, description="None: the real UTC clock")
    override_reason: str | None = Field(
        default=None, description="Why a hotfix overrides the window (recorded in the outcome)"
    )
    wave: str | None = None
    fleet_run: str | None = Field(default=None, description="The fleet run that admitted it")

    @property
    def name(self) -> str:
        return self.cluster.name


class ClusterOutcome(BaseModel):
    """What happened to a job's cluster: the saga's result and where it ran."""

    model_config = ConfigDict(extra="forbid")
    cluster: str
    outcome: OutcomeName
    reason: str = ""
    run_id: str = ""
    release_before: str = ""
    release_after: str = ""
    steps: list[StepTiming] = []
    downtime_observed_s: float = 0.0
    blocked_while_up_s: float = 0.0
    elapsed_s: float = 0.0
    resumed: bool = False
    wave: str | None = None
    override: str | None = None  # the job's override reason
    orchestrator_pid: int | None = None  # the process that ran it, when not this one
    flow_run: str | None = None  # the Prefect flow run that ran it (work pools)
    follow_ups: int = 0  # runs started again after the one running it died
    # What the run read back at its end (see UpgradeResult): the operator's figures.
    evictions: int | None = None
    data_disk_changes: list[str] | None = None
    leaked_disks: list[str] | None = None
    unread: list[str] = []

    @classmethod
    def of(cls, job: ClusterJob, result: UpgradeResult, **extra: Any) -> ClusterOutcome:
        return cls(
            **result.model_dump(mode="json"),
            wave=job.wave,
            override=job.override_reason,
            **extra,
        )

    @classmethod
    def failed(
        cls, job: ClusterJob, reason: str, outcome: OutcomeName = "failed_needs_attention"
    ) -> ClusterOutcome:
        """A job that ended without a result of the saga (its process died, it was
        cancelled before it recorded one): ``reason`` says what is known."""
        return cls(
            cluster=job.name, outcome=outcome, reason=reason, wave=job.wave,
            override=job.override_reason,
        )  # fmt: skip

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> ClusterOutcome:
        """An outcome another process recorded (it may run another version: fields this one
        does not know are left out)."""
        return cls.model_validate({k: v for k, v in record.items() if k in cls.model_fields})

    def record(self) -> dict[str, Any]:
        """As the fleet record keeps it (JSON; fields never set are left out)."""
        return self.model_dump(mode="json", exclude_none=True)


class Executor(Protocol):
    """Runs one job to its outcome; called from many threads at once, one per job."""

    def run(self, job: ClusterJob, should_abort: Callable[[], bool]) -> ClusterOutcome: ...


def run_job(
    job: ClusterJob,
    connections: Connections,
    store: Store,
    *,
    should_abort: Callable[[], bool] = lambda: False,
    log: Callable[[str], None] = lambda message: None,
    runner: StepRunner | None = None,
    saga: type[ClusterUpgrade] = ClusterUpgrade,
) -> ClusterOutcome:
    """Run ``job``'s saga here (or resume it from its journal) with ``connections``; the
    cluster's SSH sessions are closed at the end. ``runner`` runs each step (default: a
    plain call); ``saga``: the saga's class (a benchmark's baseline order subclasses it)."""
    upgrade = saga(
        job.cluster,
        job.release,
        gateway=connections.gateway(job.cluster.subscription_id),
        shells=connections.shells(),
        store=store,
        clock=connections.clock,
        policy=job.policy,
        run_id=job.run_id,
        window_end=job.window_end,
        runner=runner,
        log=log,
        should_abort=should_abort,
        node_checks=connections.pacer("node_checks"),
        **({"now_utc": job.anchor.now_utc} if job.anchor is not None else {}),
    )
    try:
        return ClusterOutcome.of(job, upgrade.run())
    finally:
        connections.shells().release(node.name for node in job.cluster.nodes)


class InProcessExecutor:
    """Jobs on the calling thread of this process, sharing ``connections`` (HTTPS pools, SSH
    sessions, pacers) and ``store``."""

    def __init__(
        self,
        connections: Connections,
        store: Store,
        *,
        log: Callable[[str], None] = lambda message: None,
        runner: StepRunner | None = None,
        runner_for: Callable[[ClusterJob], StepRunner] | None = None,
    ) -> None:
        """``runner`` runs every job's steps; ``runner_for(job)``, when given, makes one per
        job instead (the flows name each step's task run after its cluster)."""
        self.connections = connections
        self.store = store
        self.log = log
        self.runner = runner
        self.runner_for = runner_for

    def run(self, job: ClusterJob, should_abort: Callable[[], bool]) -> ClusterOutcome:
        return run_job(
            job,
            self.connections,
            self.store,
            should_abort=should_abort,
            log=self.log,
            runner=self.runner_for(job) if self.runner_for is not None else self.runner,
        )
