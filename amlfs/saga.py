"""One cluster's upgrade by OS disk swap, as ordered steps, and the way back.

    preflight  read VMs + health                      (nothing changed yet)
    prestage   create new OS disks, tagged            (outside the downtime)
    capture    node config -> state store             (outside the downtime)
    suspend    tunables up, HSM off + drained, firewall on the servers
    swap       stop, PUT new OS disk, start (all VMs in parallel), restore each node
    restore    release tunables, health on the release
    unsuspend  firewall off, clients back (recovery COMPLETE), then tunables and HSM back
    validate   health per role, 0 evicted, lclient probe, no DROP rule, tunables, HSM
    finalize   delete (or keep, tagged) the old disks (point of no return)

The cluster's lease (``amlfs.lease``) is taken before anything is read for a decision and
fences every Azure write, node command and journal write: one orchestrator per cluster.

The journal (state store) says what may have been done *before* it is done: the tunables
and HSM state are recorded before suspend changes the first of them, the originals of the
release's tunables before they are set. So the way back is not a replay of completed steps
but a convergence to the old normal from wherever the cluster is, every action idempotent
and checked before it changes anything (``rollback``): every VM back on its old OS disk,
running, its captured config restored and healthy; the release's tunables set back; then,
in the order that keeps clients safe, the firewall off on every server, recovery COMPLETE
with the clients back, and only then ``timeout``, the recovery windows and HSM restored
(lowering ``timeout`` while clients are blocked evicts them); the new disks deleted. The
cluster is claimed ``rolled_back`` only when the same checks as ``upgraded`` pass on the old
release; otherwise it is ``failed_needs_attention`` with what is left wrong, and its journal
stays so that running it again converges again.

Running the same cluster after a crash of the orchestrator resumes from the journal: forward
when its nodes were already verified on the release, else back. Before each irreversible
step the downtime budget and the window are checked with a predicted rollback reserved.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import functools
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar, cast

from pydantic import BaseModel, ConfigDict, Field
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from amlfs.azure.gateway import ComputeGateway, DiskInfo, VmInfo
from amlfs.clock import Clock, Pacer
from amlfs.errors import (
    AmlfsError,
    DeadlineError,
    HealthCheckError,
    NodeUnreachableError,
    RetryableAzureError,
)
from amlfs.fanout import run_all
from amlfs.forms import declared_order
from amlfs.ids import KEEP_TAG, TAG_RELEASE, TAG_REPLACES, TAG_RUN, TAG_VM, new_os_disk_name
from amlfs.lease import ClusterLease, FencedGateway, FencedShells, LeaseHeldError, LeaseLostError
from amlfs.lustre.procedures import (
    AGENT_ROLES,
    SERVER_ROLES,
    EvictionTally,
    LustreOps,
    NodeRef,
    ShellSource,
    SuspendPolicy,
)
from amlfs.models import Cluster, Release, Role
from amlfs.reconcile import ClusterPosition, inspect_cluster
from amlfs.store import Store

__all__ = [
    "AbortRequestedError",
    "ClusterUpgrade",
    "Outcome",
    "Predictions",
    "StepRunner",
    "UpgradePolicy",
    "UpgradeResult",
]

T = TypeVar("T")
StepRunner = Callable[[str, Callable[[], Any]], Any]


class AbortRequestedError(AmlfsError):
    """An operator aborted the fleet run: this cluster rolls back."""


class _AbortablePacer(Pacer):
    """The node-check pacer of one cluster: each wait for a slot (every turn of a loop that
    waits for boot, health, recovery or the HSM drain) first looks for an operator's abort,
    so an abort or a Prefect cancel lands within a poll instead of at the next step."""

    def __init__(self, clock: Clock, inner: Pacer | None, abort_now: Callable[[], bool]) -> None:
        super().__init__(clock, None)
        self.inner = inner
        self.abort_now = abort_now

    def wait(self) -> None:
        if self.abort_now():
            raise AbortRequestedError("operator abort while waiting on the nodes")
        if self.inner is not None:
            self.inner.wait()


class Outcome(StrEnum):
    UPGRADED = "upgraded"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed_needs_attention"
    ALREADY_CURRENT = "already_current"
    BUSY = "busy"  # another orchestrator holds (or took over) the cluster: not touched by us


class Predictions(BaseModel):
    """Expected durations (sim seconds), used to decide whether a step still fits."""

    model_config = ConfigDict(frozen=True, extra="forbid", json_schema_extra=declared_order)
    suspend_s: float = 30
    swap_s: float = 180  # the PUT that stops, swaps and boots one VM (all VMs in parallel)
    restore_s: float = 90
    unsuspend_s: float = 30
    validate_s: float = 60

    @property
    def downtime_s(self) -> float:
        return self.suspend_s + self.swap_s + self.restore_s + self.unsuspend_s + self.validate_s

    @property
    def rollback_s(self) -> float:
        return self.swap_s + self.restore_s + self.unsuspend_s + self.validate_s


class UpgradePolicy(BaseModel):
    """How one cluster is upgraded. Every field has a safe default."""

    model_config = ConfigDict(frozen=True, extra="forbid", json_schema_extra=declared_order)
    downtime_budget_s: float = Field(default=1800, gt=0, description="Customer downtime cap")
    keep_old_disks_days: int = Field(default=0, ge=0, description="0: delete old OS disks")
    boot_timeout_s: float = Field(default=600, gt=0)
    healthy_timeout_s: float = Field(default=600, gt=0)
    serving_timeout_s: float = Field(default=600, gt=0)
    lro_timeout_s: float = Field(default=900, gt=0)
    attempts: int = Field(default=8, ge=1, description="Tries of a transiently failing call")
    parallelism: int = Field(default=16, ge=1)
    predictions: Predictions = Predictions()
    suspend: SuspendPolicy = SuspendPolicy()
    lease_ttl_s: float = Field(
        default=60.0,
        gt=0,
        description="Real seconds a cluster's lease lasts unless renewed (renewed every "
        "quarter of it while the run lives); a dead holder on the same host is taken over at once",
    )


class StepTiming(BaseModel):
    name: str
    started_s: float
    ended_s: float
    status: str  # ok, failed, compensated


class UpgradeResult(BaseModel):
    cluster: str
    run_id: str
    outcome: Outcome
    reason: str = ""
    release_before: str
    release_after: str
    steps: list[StepTiming] = []
    downtime_observed_s: float = 0.0  # suspend start to validated, as the orchestrator saw it
    # Servers up with clients cut off (LustreOps.blocked), as the orchestrator saw it.
    blocked_while_up_s: float = 0.0
    elapsed_s: float = 0.0
    resumed: bool = False
    # What the run left, as it read the world back at its end (``ClusterUpgrade._aftermath``;
    # None: it changed nothing, or could not read it).
    evictions: int | None = None  # client evictions the servers logged during the run
    data_disk_changes: list[str] | None = None  # VM LUNs whose data disk is not as in preflight
    leaked_disks: list[str] | None = None  # disks it made or replaced, left unattached
    unread: list[str] = []  # what the end check could not read, and why


@dataclass
class _VmPlan:
    node: NodeRef
    old_disk: str
    old_disk_id: str
    new_disk: str
    new_disk_id: str = ""
    old_disk_info: DiskInfo | None = None  # as read in preflight (location, SKU)


@dataclass
class _State:
    """The journal: what a resuming worker needs beyond Azure's tags."""

    run_id: str
    release: str
    phase: str = "started"
    release_before: str = ""
    # Recorded before suspend changes anything: what the way back restores.
    tunables: dict[str, str] | None = None
    suspend_started: bool = False  # set (journaled) before the first suspend change
    # The release's tunables as they were, journaled before the release sets them.
    release_tunables_before: dict[str, str] | None = None
    vms: dict[str, dict[str, str]] = field(default_factory=dict)
    suspended_at: float | None = None  # this process's clock
    suspended_wall: float | None = None  # Unix time, to carry the downtime across a resume
    # Preflight's data-disk layout of each VM ([LUN, disk id] pairs): what the end compares.
    data_disks: dict[str, list[list[Any]]] | None = None
    evictions: dict[str, Any] | None = None  # EvictionTally.dump()

    def dump(self) -> dict[str, Any]:
        return dict(self.__dict__)


class ClusterUpgrade:
    """Upgrade ``cluster`` to ``release``; ``run()`` returns the result and never raises
    for an upgrade failure (it rolls back and says why)."""

    def __init__(
        self,
        cluster: Cluster,
        release: Release,
        *,
        gateway: ComputeGateway,
        shells: ShellSource,
        store: Store,
        clock: Clock,
        policy: UpgradePolicy | None = None,
        run_id: str | None = None,
        window_end: dt.datetime | None = None,
        now_utc: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        runner: StepRunner | None = None,
        log: Callable[[str], None] = lambda message: None,
        should_abort: Callable[[], bool] = lambda: False,
        node_checks: Pacer | None = None,
    ) -> None:
        self.cluster = cluster
        self.release = release
        self.store = store
        self.clock = clock
        self.policy = policy or UpgradePolicy()
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.lease = ClusterLease(store, cluster.name, self.run_id, ttl_s=self.policy.lease_ttl_s)
        # Every write to Azure and every command sent to a node first checks the fence.
        self.gw = cast(ComputeGateway, FencedGateway(gateway, self.lease.check))
        shells = cast(ShellSource, FencedShells(shells, self.lease.check))
        self.window_end = window_end
        self.now_utc = now_utc
        self.runner: StepRunner = runner or (lambda name, fn: fn())
        self.should_abort = should_abort
        self.log = log
        self.nodes = [
            NodeRef(n.name, n.role, str(n.address) if n.address else n.name) for n in cluster.nodes
        ]
        self.ops = LustreOps(
            shells,
            self.nodes,
            clock,
            self.policy.suspend,
            log,
            self.policy.parallelism,
            checks=_AbortablePacer(clock, node_checks, self._abort_now),
        )
        self._rolling_back = False
        self.rg = cluster.resource_group
        self.timings: list[StepTiming] = []
        self.started = clock.now()
        self.state = _State(self.run_id, release.version)
        self.plans: dict[str, _VmPlan] = {}
        self.serving_again_at: float | None = None
        self.restored: set[tuple[str, str]] = set()  # (node, release) restored in this process
        self.restored_locally: set[tuple[str, str]] = set()  # files, LNet, pools done
        self.already_current = False  # every VM already on the release (set by preflight)
        self.evictions = EvictionTally()
        self._read_at_start: ClusterPosition | None = None  # inspect_cluster's, for preflight
        self._deleted: set[str] = set()  # disks this run saw deleted (their LRO succeeded)

    # ------------------------------------------------------------------ plumbing

    def _key(self, *parts: str) -> tuple[str, ...]:
        return ("clusters", self.cluster.name, *parts)

    def _journal(self, phase: str) -> None:
        self.lease.check()  # only the lease holder writes the journal
        self.state.phase = phase
        self.state.vms = {
            name: {
                "old_disk": p.old_disk,
                "old_disk_id": p.old_disk_id,
                "new_disk": p.new_disk,
                "new_disk_id": p.new_disk_id,
            }
            for name, p in self.plans.items()
        }
        self.state.evictions = self.evictions.dump()
        self.store.put(*self._key("run"), value=self.state.dump())

    def _abort_now(self) -> bool:
        """An abort stops the forward path only: the way back always runs to its end."""
        return not self._rolling_back and self.should_abort()

    def _step(self, name: str, fn: Callable[[], T]) -> T:
        if name != "finalize" and self.should_abort():
            raise AbortRequestedError(f"operator abort before {name}")
        start = self.clock.now()
        self.log(f"{self.cluster.name}: {name}")
        try:
            result: T = self.runner(name, fn)
        except BaseException:
            self.timings.append(
                StepTiming(name=name, started_s=start, ended_s=self.clock.now(), status="failed")
            )
            raise
        self.timings.append(
            StepTiming(name=name, started_s=start, ended_s=self.clock.now(), status="ok")
        )
        return result

    def _retry(self, what: str, fn: Callable[[], T], *, deadline: float | None = None) -> T:
        """``fn`` with backoff on transient errors, never past ``deadline`` (sim time)."""

        def before_sleep(state: Any) -> None:
            err = state.outcome.exception() if state.outcome else None
            self.log(f"{self.cluster.name}: {what}: retrying after {err}")
            if deadline is not None and self.clock.now() + state.upcoming_sleep > deadline:
                raise DeadlineError(f"{what}: no time left to retry ({err})") from err

        retrying = Retrying(
            sleep=self.clock.sleep,
            wait=wait_exponential(multiplier=5, min=5, max=60),
            stop=stop_after_attempt(self.policy.attempts),
            retry=retry_if_exception_type((RetryableAzureError, NodeUnreachableError)),
            before_sleep=before_sleep,
            reraise=True,
        )
        return retrying(fn)

    def _each(self, fn: Callable[[_VmPlan], None], plans: list[_VmPlan] | None = None) -> None:
        """``fn`` for every VM in parallel; all run to the end, then the first error raises."""
        run_all(list(self.plans.values()) if plans is None else plans, fn, self.policy.parallelism)

    # ------------------------------------------------------------------ deadlines

    def _downtime_so_far(self) -> float:
        if self.state.suspended_at is None:
            return 0.0
        return self.clock.now() - self.state.suspended_at

    def _check_room(self, step: str, remaining_s: float) -> None:
        """Refuse ``step`` unless it, what follows and a rollback fit the budget and window."""
        reserve = self.policy.predictions.rollback_s
        need = self._downtime_so_far() + remaining_s + reserve
        if need > self.policy.downtime_budget_s:
            raise DeadlineError(
                f"before {step}: downtime so far {self._downtime_so_far():.0f} s + predicted "
                f"{remaining_s:.0f} s + rollback {reserve:.0f} s > budget "
                f"{self.policy.downtime_budget_s:.0f} s"
            )
        if self.window_end is not None:
            left = (self.window_end - self.now_utc()).total_seconds()
            if remaining_s + reserve > left:
                raise DeadlineError(
                    f"before {step}: window ends in {left:.0f} s, need {remaining_s:.0f} s + "
                    f"rollback {reserve:.0f} s"
                )

    def _lro_timeout(self) -> float:
        """An ARM wait never eats the time a rollback needs; the rollback's own waits use it
        (with the reserve counted as spent they would get the 5 s floor and give up)."""
        if self.state.suspended_at is None or self.state.phase == "rolling_back":
            return self.policy.lro_timeout_s
        left = (
            self.policy.downtime_budget_s
            - self._downtime_so_far()
            - self.policy.predictions.rollback_s
        )
        return max(5.0, min(self.policy.lro_timeout_s, left))

    def _swap_deadline(self) -> float | None:
        if self.state.suspended_at is None:
            return None
        return (
            self.state.suspended_at
            + self.policy.downtime_budget_s
            - self.policy.predictions.rollback_s
        )

    # ------------------------------------------------------------------ run

    def run(self) -> UpgradeResult:
        try:
            self.lease.acquire()
        except LeaseHeldError as err:
            return self._result(Outcome.BUSY, str(err))
        except AmlfsError as err:
            return self._result(Outcome.FAILED, f"cannot take the cluster's lease: {err}")
        self.lease.start_renewing()
        try:
            return self._run_leased()
        except LeaseLostError as err:
            # Another orchestrator took the cluster over: it owns the journal, the disks and
            # the way back now. Nothing more is changed from here, not even a rollback.
            self.log(f"{self.cluster.name}: {err}")
            return self._result(Outcome.BUSY, str(err))
        finally:
            self.lease.release()

    def _run_leased(self) -> UpgradeResult:
        try:
            position = inspect_cluster(self.cluster, self.gw, self.store)
        except AmlfsError as err:
            return self._result(Outcome.FAILED, f"cannot read the cluster's state: {err}")
        self._read_at_start = position
        if position.interrupted:
            assert position.journal is not None
            return self._resume(position.journal)
        foreign = [d for d in position.orphans if not self.lease.knows_run(d.tags.get(TAG_RUN, ""))]
        if foreign:
            names = ", ".join(f"{d.name} (run {d.tags.get(TAG_RUN, '?')})" for d in foreign)
            return self._result(
                Outcome.BUSY,
                f"OS disks made by runs this state store never saw: {names}. Another "
                "orchestrator, working from another state store, may be upgrading this "
                "cluster: not touching it. If no run is active, delete those disks (they are "
                "attached to nothing) and run again",
            )
        for disk in position.orphans:
            # Left by a run of this store that died before journaling it: ours, unattached.
            self.log(f"{self.cluster.name}: deleting {disk.name}, left by an earlier run")
            try:
                self._retry(
                    f"delete {disk.name}",
                    functools.partial(self.gw.delete_disk, self.rg, disk.name),
                )
            except LeaseLostError:
                raise
            except AmlfsError as err:
                self.log(f"{self.cluster.name}: could not delete {disk.name}: {err}")
        try:
            self._step("preflight", self.preflight)
        except LeaseLostError:
            raise
        except AmlfsError as err:
            return self._result(
                Outcome.FAILED, f"preflight: {err}", before=self.state.release_before
            )
        if self.already_current:
            return self._already_current()
        try:
            self._prepare()
            self._check_room(
                "swap", self.policy.predictions.downtime_s - self.policy.predictions.suspend_s
            )
            self._step("swap", self.swap)
            pred = self.policy.predictions
            self._check_room("restore", pred.restore_s + pred.unsuspend_s + pred.validate_s)
            self._step("restore", self.restore)
            self._step("unsuspend", self.unsuspend)
            self._step("validate", self.validate)
        except LeaseLostError:
            raise
        except Exception as err:  # any failure, expected or not, puts the old disks back
            self.log(f"{self.cluster.name}: upgrade failed, rolling back: {err}")
            return self.rollback(f"{type(err).__name__}: {err}")
        return self._finish_forward()

    def _already_current(self) -> UpgradeResult:
        """Every VM runs the release's image: claimed only if it also serves normally."""
        version = self.release.lustre_version or self._version_now()
        try:
            self.ops.wait_healthy(self.nodes, version, self.policy.healthy_timeout_s / 4)
            self.ops.wait_serving(self.policy.serving_timeout_s / 4, self.run_id)
            left = self.ops.left_suspended(None, dict(self.release.tunables))
        except LeaseLostError:
            raise
        except AmlfsError as err:
            left = [str(err)]
        if left:
            return self._result(
                Outcome.FAILED,
                f"on release {self.release.version} but not serving normally, and no "
                f"interrupted run of this state store to resume: {'; '.join(left)}",
                before=self.release.version,
            )
        return self._result(Outcome.ALREADY_CURRENT, f"already on {self.release.version}")

    def _finish_forward(self) -> UpgradeResult:
        try:
            self._step("finalize", self.finalize)
        except LeaseLostError:
            raise
        except AmlfsError as err:
            # Upgraded and serving; only the old disks are left behind.
            return self._result(Outcome.UPGRADED, f"old OS disks not removed: {err}")
        return self._result(Outcome.UPGRADED, "")

    def _compensate(self, name: str, fn: Callable[[], None], failures: list[str]) -> bool:
        """One part of the way back, as its own step; False (and why) if it failed."""
        start = self.clock.now()
        status = "compensated"
        try:
            self.runner(f"rollback: {name}", fn)
        except LeaseLostError:
            raise
        except Exception as err:  # the next part still runs where it is safe
            failures.append(f"{name}: {err}")
            status = "failed"
        self.timings.append(
            StepTiming(
                name=f"rollback: {name}", started_s=start, ended_s=self.clock.now(), status=status
            )
        )
        return status == "compensated"

    def rollback(self, reason: str) -> UpgradeResult:
        """Converge the cluster back to its old normal from wherever it is (see the module
        docstring); ``rolled_back`` only once verified, else ``failed_needs_attention``."""
        self._rolling_back = True
        self._journal("rolling_back")
        failures: list[str] = []
        serving = True
        if self.plans and self._needs_swap_back():
            serving = self._compensate("swap back", self.swap_back, failures)
        if self.state.release_tunables_before is not None:
            self._compensate("release tunables", self.undo_release_tunables, failures)
        if self.state.suspend_started:
            if serving:
                serving = self._compensate("clients back", self.let_clients_back, failures)
            if (
                serving
                and self.plans
                and self._agents_later()
                and self._needs_swap_back(self._agent_plans())
            ):
                serving = self._compensate("swap back agents", self.swap_back_agents, failures)
            if serving:
                serving = self._compensate("in-cluster work", self.resume_work, failures)
            if serving:
                # Only with clients back: a lower timeout would evict the ones still blocked.
                self._compensate("tunables and HSM back", self.restore_tunables, failures)
            else:
                failures.append(
                    "timeout and recovery windows left raised: clients are not back yet, and "
                    "lowering them now would evict them"
                )
        if self.plans:
            self._compensate("delete new disks", self.delete_new_disks, failures)
        if not failures:
            self._compensate("verify", self.verify_rolled_back, failures)
        if failures:
            self._journal("needs_attention")
            return self._result(
                Outcome.FAILED,
                f"{reason}; rollback incomplete: {'; '.join(failures)}. The journal is kept: "
                "running the cluster again retries the way back",
            )
        self._done()
        return self._result(Outcome.ROLLED_BACK, reason)

    def _result(self, outcome: Outcome, reason: str, before: str | None = None) -> UpgradeResult:
        after = (
            self.release.version
            if outcome in (Outcome.UPGRADED, Outcome.ALREADY_CURRENT)
            else (before or self.state.release_before)
        )
        downtime = 0.0
        if self.state.suspended_at is not None:
            # Until validated serving, or the end of the rollback that brought service back.
            end = self.serving_again_at
            if end is None:
                ends = [t.ended_s for t in self.timings if t.name.startswith("rollback")]
                end = max(ends) if ends else self.clock.now()
            downtime = end - self.state.suspended_at
        seen = self._aftermath() if self.plans and outcome is not Outcome.BUSY else {}
        return UpgradeResult(
            cluster=self.cluster.name,
            run_id=self.run_id,
            outcome=outcome,
            reason=reason,
            release_before=before or self.state.release_before,
            release_after=after,
            steps=list(self.timings),
            downtime_observed_s=round(max(downtime, 0.0), 3),
            blocked_while_up_s=round(self.ops.blocked.total(self.clock.now()), 3),
            elapsed_s=round(self.clock.now() - self.started, 3),
            resumed=False,
            **seen,
        )

    def _aftermath(self) -> dict[str, Any]:
        """What the run left, read back from the world at its end (never raises): the
        evictions its servers logged (``EvictionTally``), each VM's data disks against
        preflight's, and the disks it made or replaced that are left attached to nothing
        and not kept on purpose (``KEEP_TAG``). The emulator's ground truth is the judge
        of these figures in the tests; against Azure they are all the operator has."""
        unread: list[str] = []
        self.ops.read_evictions(self.evictions)
        unread += [f"{node}: kernel log: {why}" for node, why in self.evictions.unread.items()]
        changes: list[str] = []
        leaked: list[str] = []
        lock = threading.Lock()
        before = self.state.data_disks

        def one(plan: _VmPlan) -> None:
            name = plan.node.name
            found: list[str] = []
            known = set(self._deleted)  # gone: their delete succeeded in this run
            try:
                if before is not None:
                    vm = self._retry(
                        f"read VM {name}", functools.partial(self.gw.vm_info, self.rg, name)
                    )
                    known.add(vm.os_disk_name)  # attached: the VM's OS disk, just read
                    was = {int(lun): str(id_).lower() for lun, id_ in before.get(name, [])}
                    now = {lun: id_.lower() for lun, id_ in vm.data_disks}
                    for lun in sorted(set(was) | set(now)):
                        if was.get(lun) != now.get(lun):
                            changes_here = (
                                f"{name} LUN {lun}: {_disk_name(was.get(lun))} -> "
                                f"{_disk_name(now.get(lun))}"
                            )
                            with lock:
                                changes.append(changes_here)
                for disk_name in dict.fromkeys((plan.old_disk, plan.new_disk)):
                    if disk_name in known:
                        continue  # a GET would cost ARM's read budget for what is known
                    disk = self._retry(
                        f"read disk {disk_name}",
                        functools.partial(self.gw.get_disk, self.rg, disk_name),
                    )
                    if disk is not None and not disk.managed_by and KEEP_TAG not in disk.tags:
                        found.append(disk_name)
            except LeaseLostError:
                raise
            except AmlfsError as err:
                with lock:
                    unread.append(f"{name}: {err}")
            with lock:
                leaked.extend(found)

        try:
            run_all(list(self.plans.values()), one, self.policy.parallelism)
        except LeaseLostError:
            return {"unread": ["the cluster's lease was taken over: not read"]}
        return {
            "evictions": self.evictions.total(),
            "data_disk_changes": sorted(changes) if before is not None else None,
            "leaked_disks": sorted(leaked),
            "unread": unread,
        }

    def _done(self) -> None:
        self.lease.check()  # only the lease holder deletes the journal and the config
        self.store.delete(*self._key("run"))
        for node in self.nodes:
            self.store.delete(*self._key("config", node.name))

    # ------------------------------------------------------------------ steps

    def _is_release(self, disk: DiskInfo | None) -> bool:
        return disk is not None and (disk.image_id or "").lower() == self.release.image_id.lower()

    def preflight(self) -> list[VmInfo]:
        # The VMs and disks the start of this run read a moment ago (inspect_cluster), once:
        # read again only what it did not see (an OS disk in another resource group).
        seen, self._read_at_start = self._read_at_start, None
        vms = []
        for node in self.nodes:
            vm = seen.vms.get(node.name) if seen is not None else None
            if vm is None:
                vm = self._retry(
                    f"read VM {node.name}", functools.partial(self.gw.vm_info, self.rg, node.name)
                )
            if vm.power_state != "running":
                raise HealthCheckError(f"VM {node.name} is {vm.power_state}, not running")
            vms.append(vm)
        disks = [
            (seen.disks.get(vm.os_disk_id.lower()) if seen is not None else None)
            or self.gw.get_disk(self.rg, vm.os_disk_name)
            for vm in vms
        ]
        first = disks[0]
        self.state.release_before = (
            (first.image_id or "").rsplit("/", 1)[-1] if first else "unknown"
        )
        self.already_current = all(self._is_release(disk) for disk in disks)
        if self.already_current:
            return vms
        # The cluster must be healthy before we touch it: otherwise a rollback has no target.
        self.ops.wait_healthy(
            self.nodes, self._version_of(first), self.policy.healthy_timeout_s / 4
        )
        self.ops.read_evictions(self.evictions)
        self.state.data_disks = {vm.name: [[lun, id_] for lun, id_ in vm.data_disks] for vm in vms}
        for node, vm, disk in zip(self.nodes, vms, disks, strict=True):
            self.plans[node.name] = _VmPlan(
                node,
                old_disk=vm.os_disk_name,
                old_disk_id=vm.os_disk_id,
                new_disk=new_os_disk_name(node.name, self.release.version),
                old_disk_info=disk,
            )
        self._journal("preflight")
        return vms

    def _version_of(self, disk: DiskInfo | None) -> str:
        """The Lustre version nodes on ``disk`` run, as they report it (no image lookup)."""
        mds = self.ops.sh(self.ops.mds)
        out = self._retry(
            "read the Lustre version", lambda: mds.run(["lctl", "get_param", "-n", "version"])
        ).stdout
        return out.strip().removeprefix("version=")

    def prestage(self) -> None:
        vm_location = self.cluster.region

        def create(plan: _VmPlan) -> None:
            old = plan.old_disk_info or self.gw.get_disk(self.rg, plan.old_disk)
            disk = self._retry(
                f"create {plan.new_disk}",
                lambda: self.gw.create_os_disk(
                    self.rg,
                    plan.new_disk,
                    location=old.location if old else vm_location,
                    image_version_id=self.release.image_id,
                    sku=old.sku if old else None,
                    # Zone, size, generation and security type of the disk it replaces:
                    # Azure swaps in nothing else.
                    like=old,
                    tags={
                        TAG_RUN: self.run_id,
                        TAG_VM: plan.node.name,
                        TAG_REPLACES: plan.old_disk,
                        TAG_RELEASE: self.release.version,
                    },
                    timeout_s=self.policy.lro_timeout_s,
                ),
            )
            plan.new_disk_id = disk.id

        try:
            self._each(create)
        finally:
            self._journal("prestaged")

    def capture(self) -> None:
        def one(node: NodeRef) -> None:
            files = self.ops.capture_config(node)
            self.lease.check()
            self.store.put(*self._key("config", node.name), value=_encode_files(files))

        self.ops.each(self.nodes, one)
        self._journal("captured")

    def suspend(self) -> None:
        """Tunables up (what holds across the swap), HSM off and drained as far as the
        window allows, in-cluster work stopped, then client traffic dropped on every server.

        Journaled before the first change (the originals, the in-cluster work running and
        ``suspend_started``), so a failure or a crash anywhere in here is undone by the way
        back, part by part. From the firewall on, the servers are up with their clients cut
        off until the PUTs take them down: nothing else happens in between."""
        if self.state.tunables is None:
            tunables = self.ops.record_tunables()
            tunables["agent_work"] = self.ops.encode_agent_work(self.ops.agent_work())
            self.state.tunables = tunables
        self.state.suspend_started = True
        self._journal("suspending")
        self.ops.raise_tunables(self.state.tunables)
        # The drain is before the downtime, but it spends the window: what it may take is
        # what is left once the downtime and a rollback are reserved (as _check_room does).
        allowed = self.policy.suspend.hsm_drain_timeout_s
        if self.window_end is not None:
            pred = self.policy.predictions
            left = (self.window_end - self.now_utc()).total_seconds()
            allowed = min(allowed, left - pred.downtime_s - pred.rollback_s)
        self.ops.quiesce_hsm(allowed)
        self.ops.stop_agent_work()
        if self.state.suspended_at is None:
            self.state.suspended_at = self.clock.now()  # clients lose service from here
            self.state.suspended_wall = time.time()
        self._journal("suspending")
        now = self.clock.now()
        for server in self.ops.servers():
            self.ops.blocked.start(server.name, now)
        self.ops.guard_recovery(True)
        self.ops.each(self.ops.servers(), self.ops.firewall_on)
        self._journal("suspended")

    def swap(self) -> None:
        self._journal("swapping")
        deadline = self._swap_deadline()

        mds_done = threading.Event()

        def one(plan: _VmPlan) -> None:
            try:
                self._swap_vm(plan, plan.new_disk, plan.new_disk_id, deadline)
                # Pipelined: a node is restored as soon as it booted, while slower VMs are
                # still swapping. Its Lustre services start once the MDS is back (targets and
                # clients register with its MGS); the node-local part does not wait for it.
                if plan.node.role is Role.MDS:
                    self._restore_node(plan.node, self.release)
                else:
                    self._restore_node(plan.node, self.release, start=False)
                    mds_done.wait(self.policy.boot_timeout_s + self.policy.lro_timeout_s)
                    self._restore_node(plan.node, self.release)
            finally:
                if plan.node.role is Role.MDS:
                    mds_done.set()

        self._swap_vms(one, deadline)
        self._journal("swapped")

    def _prepare(self) -> None:
        """Up to the downtime: the new disks first (prestage), then the capture, and the
        suspend only once both are done and the downtime still fits the window."""
        self._step("prestage", self.prestage)
        self._step("capture", self.capture)
        self._check_room("suspend", self.policy.predictions.downtime_s)
        self._step("suspend", self.suspend)

    def _swap_vms(self, one: Callable[[_VmPlan], None], deadline: float | None) -> None:
        """Every VM through ``one`` (swap, then its node restored as soon as it booted), in
        parallel. ``deadline``: the swap's own, for an order that does not use ``one``."""
        self._each(one)

    def _swap_vm(self, plan: _VmPlan, disk_name: str, disk_id: str, deadline: float | None) -> None:
        """``plan``'s VM on ``disk_id`` and running.

        A running VM gets one PUT with the new ``osDisk.managedDisk.id``: Azure stops it (not
        deallocated), swaps the disk and boots it (the OS-disk-swap docs: stopping first is
        optional). That is one token of Compute's per-VM and per-subscription write buckets
        and one operation to poll, where stop + PUT + start cost three of each. A VM found
        stopped (someone stopped it, or a swap that failed half-way) is swapped, then
        started."""
        name = plan.node.name
        current = self._retry(
            f"read VM {name}", lambda: self.gw.vm_info(self.rg, name), deadline=deadline
        )
        if current.os_disk_id.lower() != disk_id.lower():
            target = DiskInfo(disk_id, disk_name, None, {}, None, None, "", None, None)
            running = current.power_state == "running"
            if not running:
                self.ops.blocked.end(name, self.clock.now())  # down already: cuts nobody

            attempts = 0

            def put() -> None:
                nonlocal attempts
                attempts += 1
                if running and plan.node.role in SERVER_ROLES:
                    # Its kernel log dies with this boot: the evictions it logged, first.
                    self.ops.read_evictions(self.evictions, [plan.node])
                self.gw.swap_os_disk(self.rg, name, target, self._lro_timeout())

            self._retry(f"swap {name} to {disk_name}", put, deadline=deadline)
            # Stopped by the PUT at some point before it returned (an upper bound).
            self.ops.blocked.end(name, self.clock.now())
            if current.power_state == "running" and attempts > 1:
                # Read again: a PUT retried after a failure half-way may have left it stopped.
                # One PUT that succeeded at once stopped, swapped and booted it (os-disk-swap:
                # Azure starts a VM it stopped for the swap): no read of ARM's budget for that.
                current = self._retry(
                    f"read VM {name}", lambda: self.gw.vm_info(self.rg, name), deadline=deadline
                )
            elif current.power_state == "running":
                current = dataclasses.replace(current, os_disk_id=disk_id, os_disk_name=disk_name)
            else:
                current = dataclasses.replace(current, power_state="stopped")
        if current.power_state != "running":
            self._retry(
                f"start {name}",
                lambda: self.gw.start(self.rg, name, self._lro_timeout()),
                deadline=deadline,
            )

    def restore(self) -> None:
        expected = self.release.lustre_version
        self._restore_nodes(self.release)
        self._apply_release_tunables()
        self.ops.wait_healthy(
            self.nodes, expected or self._version_now(), self.policy.healthy_timeout_s
        )
        self._journal("restored")

    def _version_now(self) -> str:
        return self._version_of(None)

    def _restore_node(self, node: NodeRef, release: Release | None, *, start: bool = True) -> None:
        """Restore ``node``; ``start=False``: only its node-local part (a later call then
        only starts its services)."""
        key = (node.name, release.version if release else "")
        if key not in self.restored_locally:
            self.ops.wait_reachable(node, self.policy.boot_timeout_s)
            stored = self.store.get(*self._key("config", node.name))
            if stored is None:
                raise HealthCheckError(f"{node.name}: no captured config in the state store")
            overlay = (
                {path: text.encode() for path, text in release.files_for(node.role).items()}
                if release is not None
                else None
            )
            self.ops.restore_local(node, _decode_files(stored), overlay)
            self.restored_locally.add(key)
        if start:
            self.ops.start_services(node)
            self.restored.add(key)

    def _restore_nodes(
        self, release: Release | None, nodes: Sequence[NodeRef] | None = None
    ) -> None:
        version = release.version if release else ""
        chosen = self.nodes if nodes is None else list(nodes)

        def one(node: NodeRef) -> None:
            if (node.name, version) not in self.restored:  # done while swapping
                self._restore_node(node, release)

        # MDS first: OSTs and clients register with the MGS.
        mds = [n for n in chosen if n.role is Role.MDS]
        self.ops.each(mds, one)
        self.ops.each([n for n in chosen if n.role is not Role.MDS], one)

    def _apply_release_tunables(self) -> None:
        if not self.release.tunables:
            return
        if self.state.release_tunables_before is None:
            # Journaled before they change: the way back sets them to these again.
            values = self.ops.read_params(self.ops.mds, list(self.release.tunables))
            self.state.release_tunables_before = {
                name: next(v for k, v in values.items() if k == name or k.endswith(f".{name}"))
                for name in self.release.tunables
            }
            self._journal("restoring")
        self.ops.sh(self.ops.mds).run(
            ["lctl", "set_param", "-P", *(f"{k}={v}" for k, v in self.release.tunables.items())]
        )

    def unsuspend(self) -> None:
        """Clients back first (firewall off everywhere, recovery COMPLETE with 0 evicted),
        then the tunables and HSM: lowering ``timeout`` under blocked clients evicts them."""
        self._journal("unsuspending")
        self.let_clients_back()
        self.resume_work()
        self.restore_tunables()
        self._journal("unsuspended")

    def let_clients_back(self) -> None:
        """Firewall off on every server (checked), recovery COMPLETE with the clients back
        (0 evicted, the in-cluster client's probe).

        The recovery windows each server reports are read back first: they are what the
        targets computed when they mounted (from the ``timeout`` suspend raised), not what
        was asked for."""
        windows = self.ops.recovery_windows()
        recovering = [w for w in windows if w.status != "COMPLETE"]
        if recovering:
            self.log(
                f"{self.cluster.name}: letting clients back into "
                + ", ".join(
                    f"{w.target} {w.status} (soft {w.soft} s, hard {w.hard} s"
                    + (f", {w.time_remaining} s left)" if w.time_remaining is not None else ")")
                    for w in recovering
                )
            )
        self.ops.each(self.ops.servers(), self.ops.firewall_off)
        left = [
            n.name
            for n, on in zip(
                self.ops.servers(),
                self.ops.each(self.ops.servers(), self.ops.firewalled).values(),
                strict=True,
            )
            if on
        ]
        if left:
            raise HealthCheckError(f"client traffic still dropped on {', '.join(left)}")
        self.ops.blocked.end_all(self.clock.now())
        self.ops.guard_recovery(False)
        self.ops.wait_serving(self.policy.serving_timeout_s, self.run_id)
        self.serving_again_at = self.clock.now()

    def resume_work(self) -> None:
        """The in-cluster work suspend recorded (and may have stopped), started again."""
        if self.state.tunables is not None:
            self.ops.resume_agent_work(
                self.ops.decode_agent_work(self.state.tunables.get("agent_work"))
            )

    def restore_tunables(self) -> None:
        saved = self.state.tunables
        if saved is None:
            return  # suspend never recorded them: it changed nothing
        self.ops.set_tunables(saved)
        self.ops.set_hsm_control(saved.get("hsm_control", "enabled"))

    def validate(self) -> None:
        """The release serves exactly as a normal cluster: the checks ``rolled_back`` uses."""
        self._verify_normal(self.release.lustre_version or self._version_now(), upgraded=True)
        self._journal("validated")

    def _verify_normal(self, version: str, *, upgraded: bool) -> None:
        self.ops.wait_healthy(self.nodes, version, self.policy.healthy_timeout_s)
        self.ops.wait_serving(self.policy.serving_timeout_s, self.run_id)
        wanted = dict(self.release.tunables) if upgraded else self.state.release_tunables_before
        left = self.ops.left_suspended(self.state.tunables, wanted)
        if left:
            raise HealthCheckError("; ".join(left))
        if self.serving_again_at is None:
            self.serving_again_at = self.clock.now()

    def finalize(self) -> None:
        self._journal("finalizing")
        keep_until = None
        if self.policy.keep_old_disks_days:
            keep_until = (
                (self.now_utc() + dt.timedelta(days=self.policy.keep_old_disks_days))
                .date()
                .isoformat()
            )

        def one(plan: _VmPlan) -> None:
            if keep_until is not None:
                self._retry(
                    f"tag {plan.old_disk}",
                    lambda: self.gw.tag_disk(
                        self.rg, plan.old_disk, {KEEP_TAG: keep_until, TAG_RUN: self.run_id}
                    ),
                )
            else:
                self._retry(
                    f"delete {plan.old_disk}", lambda: self.gw.delete_disk(self.rg, plan.old_disk)
                )
                self._deleted.add(plan.old_disk)

        self._each(one)
        self._done()

    # ------------------------------------------------------------------ compensations

    def _needs_swap_back(self, plans: Sequence[_VmPlan] | None = None) -> bool:
        """Is any VM of ``plans`` (default: all) off its old OS disk or not running (read
        from Azure)? A VM that cannot be read counts as off: the swap back then reads it
        again, or says why it cannot."""
        for plan in self.plans.values() if plans is None else plans:
            try:
                vm = self._retry(
                    f"read VM {plan.node.name}",
                    functools.partial(self.gw.vm_info, self.rg, plan.node.name),
                )
            except LeaseLostError:
                raise
            except AmlfsError as err:
                self.log(f"{self.cluster.name}: cannot read VM {plan.node.name}: {err}")
                return True
            if vm.os_disk_id.lower() != plan.old_disk_id.lower() or vm.power_state != "running":
                return True
        return False

    def _agents_later(self) -> bool:
        """Swap the HSM agents back only once the clients are back? Yes once suspend began:
        an agent's old disk boots with its hydrator and copytool running, and their I/O,
        while servers are up with clients cut off, sends those clients blocking callbacks
        they cannot answer: evicted ``ldlm_bl_timeout`` (>= 100 s) later, even if the work
        is stopped at once (lustre/ldlm/ldlm_lockd.c, v2_15_5)."""
        return self.state.suspend_started

    def _back_first(self) -> list[_VmPlan]:
        later = self._agents_later()
        return [p for p in self.plans.values() if not (later and p.node.role in AGENT_ROLES)]

    def swap_back(self) -> None:
        """Every VM back on its old OS disk, its captured config and services restored and
        healthy (the agents after the clients are back, see ``_agents_later``). The servers
        keep dropping client traffic until the clients may come back."""
        if self.state.tunables is not None:
            self._resuspend_for_swap_back()
        plans = self._back_first()

        def one(plan: _VmPlan) -> None:
            self._swap_vm(plan, plan.old_disk, plan.old_disk_id, None)

        self._each(one, plans)
        self.restored.clear()  # what was restored on the release's disks does not count
        self.restored_locally.clear()
        nodes = [p.node for p in plans]
        self._restore_nodes(None, nodes)
        self.ops.wait_healthy(nodes, self._version_now(), self.policy.healthy_timeout_s)

    def _agent_plans(self) -> list[_VmPlan]:
        return [p for p in self.plans.values() if p.node.role in AGENT_ROLES]

    def swap_back_agents(self) -> None:
        """The HSM agents back on their old disks, with the clients already back."""
        plans = self._agent_plans()

        def one(plan: _VmPlan) -> None:
            self._swap_vm(plan, plan.old_disk, plan.old_disk_id, None)

        self._each(one, plans)
        agents = [p.node for p in plans]
        for node in agents:
            self.restored_locally.discard((node.name, ""))
            self.restored.discard((node.name, ""))
        self._restore_nodes(None, agents)
        self.ops.wait_healthy(self.nodes, self._version_now(), self.policy.healthy_timeout_s)

    def _resuspend_for_swap_back(self) -> None:
        """Before VMs go down again: timeouts up (clients must survive it), HSM off, client
        traffic dropped on the servers that are up. Best effort on what cannot be reached:
        a node that is down has no clients to protect."""
        assert self.state.tunables is not None
        self.state.suspend_started = True
        self._journal("rolling_back")
        # The way back gets the clients back whatever it takes: no wait stops for a deadline.
        self.ops.guard_recovery(False)
        try:
            self.ops.raise_tunables(self.state.tunables)
            self.ops.set_hsm_control("disabled")
        except AmlfsError as err:
            if isinstance(err, LeaseLostError):
                raise
            self.log(f"{self.cluster.name}: MDS not reachable to raise the timeouts: {err}")
        # No conflicting in-cluster I/O while clients are cut off (see suspend).
        self.ops.stop_agent_work(best_effort=True)
        now = self.clock.now()
        for server in self.ops.servers():
            self.ops.blocked.start(server.name, now)

        def fence(node: NodeRef) -> None:
            try:
                self.ops.firewall_on(node)
            except AmlfsError as err:
                if isinstance(err, LeaseLostError):
                    raise
                self.log(f"{self.cluster.name}: {node.name} not firewalled (down?): {err}")

        self.ops.each(self.ops.servers(), fence)

    def undo_release_tunables(self) -> None:
        before = self.state.release_tunables_before
        if before:
            self.ops.sh(self.ops.mds).run(
                ["lctl", "set_param", "-P", *(f"{k}={v}" for k, v in before.items())]
            )

    def verify_rolled_back(self) -> None:
        """The old release serves as a normal cluster: the checks ``upgraded`` uses."""
        self._verify_normal(self._version_now(), upgraded=False)

    def delete_new_disks(self) -> None:
        def one(plan: _VmPlan) -> None:
            disk = self.gw.get_disk(self.rg, plan.new_disk)
            if disk is None:
                self._deleted.add(plan.new_disk)
                return
            if disk.tags.get(TAG_RUN) != self.run_id:
                return  # not ours (another run's, with the same name): never delete it
            if disk.managed_by:
                raise HealthCheckError(f"{plan.new_disk} is still attached to {disk.managed_by}")
            self._retry(
                f"delete {plan.new_disk}", lambda: self.gw.delete_disk(self.rg, plan.new_disk)
            )
            self._deleted.add(plan.new_disk)

        self._each(one)

    # ------------------------------------------------------------------ resume after a crash

    def _resume(self, journal: dict[str, Any]) -> UpgradeResult:
        """A previous run stopped mid-way: rebuild from Azure + the journal, then converge."""
        self.state = _State(**journal)
        self.run_id = self.state.run_id
        self.evictions = EvictionTally(self.state.evictions)
        if self.state.suspended_wall is not None:
            # The downtime so far, in this process's clock (sim seconds on the same scale).
            gone = (time.time() - self.state.suspended_wall) * self.clock.time_scale
            self.state.suspended_at = self.clock.now() - gone
        self.log(
            f"{self.cluster.name}: resuming run {self.run_id} interrupted at {self.state.phase}"
        )
        by_name = {n.name: n for n in self.nodes}
        for name, vm in self.state.vms.items():
            self.plans[name] = _VmPlan(
                by_name[name],
                vm["old_disk"],
                vm["old_disk_id"],
                vm["new_disk"],
                vm.get("new_disk_id", ""),
            )
        # Azure is the truth for disk ids: a disk created but not journaled is found by name.
        for plan in self.plans.values():
            if not plan.new_disk_id:
                disk = self.gw.get_disk(self.rg, plan.new_disk)
                if disk is not None and disk.tags.get(TAG_VM) == plan.node.name:
                    plan.new_disk_id = disk.id
        self.lease.adopt_run(self.run_id)
        released = self.release.version == self.state.release
        phase = self.state.phase
        if released and phase == "finalizing":
            result = self._finish_forward()  # old disks may be gone already: only forward
        elif released and phase in ("restored", "unsuspending", "unsuspended", "validated"):
            # Verified on the release before the crash; the world may have moved since (a
            # VM stopped by someone): validated again before the point of no return.
            try:
                if phase != "validated":
                    self._step("unsuspend", self.unsuspend)
                self._step("validate", self.validate)
            except LeaseLostError:
                raise
            except Exception as err:
                result = self.rollback(f"resumed at {phase}, validation failed: {err}")
            else:
                result = self._finish_forward()
        else:
            result = self.rollback(f"resumed after the orchestrator stopped at {phase}")
        result.resumed = True
        return result


def _disk_name(disk_id: str | None) -> str:
    return disk_id.rsplit("/", 1)[-1] if disk_id else "none"


def _encode_files(files: dict[str, bytes]) -> dict[str, dict[str, str]]:
    """Captured files as the store keeps them: base64, so binary files stay byte-exact."""
    return {"base64": {path: base64.b64encode(data).decode() for path, data in files.items()}}


def _decode_files(stored: dict[str, Any]) -> dict[str, bytes]:
    if "base64" in stored and isinstance(stored["base64"], dict):
        return {path: base64.b64decode(text) for path, text in stored["base64"].items()}
    # A journal written before files were kept as base64: they were text.
    return {path: str(text).encode() for path, text in stored.items()}
