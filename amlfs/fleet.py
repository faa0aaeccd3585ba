"""A fleet's maintenance run: which clusters, in which waves, how many at a time, when to stop.

``plan_fleet`` decides per cluster (selected? left half-way by an earlier run? already on
the release? inside a window with room for an upgrade and a rollback?) without changing
anything. A cluster an earlier run left half-way (``amlfs.reconcile.read_cluster``) is
admitted whatever its MDS's image, window or wave say, and runs first, ahead of the waves:
its resume decides forward or back. ``FleetRunner`` makes a ``ClusterJob`` of each admitted
cluster and runs them wave by wave on an ``Executor`` (``amlfs.jobs``), never exceeding the caps (overall, per
subscription, per region), waiting the bake time between waves, stopping admission when the
error budget is spent or an operator halts, asking in-flight clusters to roll back on abort
or cancel, and recording every result in the state store so a stopped run resumes without
redoing finished clusters. A run's record is merged with what an earlier run of the same
name recorded: no cluster of the original run is forgotten.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime as dt
import queue as queue_module
import threading
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from amlfs.errors import InventoryError
from amlfs.fanout import run_all
from amlfs.forms import declared_order
from amlfs.jobs import ClockAnchor, ClusterJob, ClusterOutcome, Executor
from amlfs.models import Cluster, Fleet, Release
from amlfs.saga import UpgradePolicy
from amlfs.schedule import ErrorBudget, Prediction, WaveGate, admit, order_waves, wave_gate
from amlfs.store import Store

__all__ = [
    "FINAL",
    "NOT_JUDGED",
    "RESUME_WAVE",
    "SUCCEEDED",
    "ClusterSelector",
    "FleetPolicy",
    "FleetRunner",
    "FleetSummary",
    "PlanRow",
    "plan_fleet",
    "read_all",
]

T = TypeVar("T")

FINAL = ("upgraded", "rolled_back", "already_current", "failed_needs_attention")
SUCCEEDED = ("upgraded", "already_current")  # outcomes that leave the cluster on the release
# Outcomes that say nothing of the release: not final (a resume runs the cluster again), not
# a failure for the error budget, not counted when a wave's success ratio opens the next.
# busy: another orchestrator holds the cluster's lease; interrupted: in flight when the run
# was cancelled or stopped (it may be half-way: a resume finds it and resumes it).
NOT_JUDGED = ("busy", "interrupted")
FAILED = ("rolled_back", "failed_needs_attention")
STARTS = "fleet-starts"  # STARTS/RUN/CLUSTER: written when a run starts a cluster


def _rows_to_run(
    rows: Sequence[PlanRow], recorded: dict[str, dict[str, Any]], started: Collection[str]
) -> list[PlanRow]:
    """The admitted rows, plus those a resumed run must look at again: a cluster an earlier
    run of this name started and has no final result for (it died before saving it), or
    recorded as interrupted, is run when planning found it on the release (``skipped``); the
    upgrade verifies it serves normally before it claims ``already_current``. (One not on the
    release was left half-way: planning finds it interrupted and admits it anyway.)"""
    chosen = []
    for row in rows:
        earlier = (recorded.get(row.cluster) or {}).get("outcome")
        unfinished = earlier == "interrupted" or (row.cluster in started and earlier not in FINAL)
        if row.run:
            chosen.append(row)
        elif unfinished and row.skipped:  # found on the release
            what = earlier or "started without a recorded result"
            chosen.append(
                dataclasses.replace(
                    row,
                    run=True,
                    skipped=False,
                    reason=f"{what} when this run stopped: checked again ({row.reason})",
                )
            )
    return chosen


#: The group of clusters an earlier run left half-way: run before the first wave.
RESUME_WAVE = "interrupted"


class ClusterSelector(BaseModel):
    """Which clusters a run considers; empty lists select everything."""

    model_config = ConfigDict(frozen=True, extra="forbid", json_schema_extra=declared_order)
    names: list[str] = Field(default=[], description="Cluster names (a hotfix names at least one)")
    regions: list[str] = []
    waves: list[str] = []
    tags: dict[str, str] = Field(default={}, description="Every tag must match")

    def matches(self, cluster: Cluster) -> bool:
        return (
            (not self.names or cluster.name in self.names)
            and (not self.regions or cluster.region in self.regions)
            and (not self.waves or cluster.wave in self.waves)
            and all(cluster.tags.get(k) == v for k, v in self.tags.items())
        )


class FleetPolicy(BaseModel):
    """Waves, caps and the error budget of a fleet run."""

    model_config = ConfigDict(frozen=True, extra="forbid", json_schema_extra=declared_order)
    waves: list[str] = Field(default=["canary", "wave1", "wave2", "wave3"])
    max_parallel: int = Field(default=10, ge=1, description="Clusters in flight, overall")
    max_per_subscription: int = Field(default=5, ge=1)
    max_per_region: int = Field(default=5, ge=1)
    admit_every_s: float = Field(
        default=0.0,
        ge=0,
        description="Start one cluster per this many (real) seconds: a wave ramps up instead "
        "of starting max_parallel clusters at the same instant. Starts follow a fixed schedule "
        "(the k-th no earlier than k intervals after the first), so a late start is made up "
        "instead of delaying every later one",
    )
    error_budget: int | str = Field(
        default=1, description="Failed clusters tolerated: a count or a percentage like '10%'"
    )
    success_threshold: float = Field(default=1.0, ge=0, le=1, description="To open next wave")
    bake_s: float = Field(default=0.0, ge=0, description="Wait after a wave before the next")
    override_window: bool = Field(default=False, description="Hotfix: ignore windows")
    reason: str | None = Field(default=None, description="Why (required with override)")

    @field_validator("error_budget")
    @classmethod
    def _budget(cls, value: int | str) -> int | str:
        try:
            ErrorBudget.parse(value, selected=100)
        except InventoryError as err:
            raise ValueError(str(err)) from None
        return value


@dataclass(frozen=True)
class PlanRow:
    cluster: str
    wave: str
    subscription_id: str
    region: str
    window: str
    window_end: dt.datetime | None
    current_release: str | None
    run: bool
    skipped: bool
    reason: str
    predicted_downtime_s: float
    interrupted: bool = False  # left half-way by an earlier run: resumed before the waves

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["window_end"] = self.window_end.isoformat() if self.window_end else None
        return out


def plan_fleet(
    fleet: Fleet,
    release: Release,
    selector: ClusterSelector,
    policy: FleetPolicy,
    now: dt.datetime,
    prediction: Prediction,
    predicted_downtime_s: float,
    current_release: Callable[[Cluster], str | None] = lambda cluster: None,
    interrupted: Callable[[Cluster], str | None] = lambda cluster: None,
) -> list[PlanRow]:
    """Per selected cluster: will it run now, and why (not). Changes nothing.

    ``interrupted(cluster)`` says what shows that an earlier run left it half-way (None: at
    rest): such a cluster is admitted whatever its release, window or wave, and its row comes
    first (``FleetRunner`` runs these before the waves).
    """
    if policy.override_window and not (policy.reason or "").strip():
        raise InventoryError("override_window needs a reason (it is recorded with the run)")
    rows = []
    resumed = []
    known = set(policy.waves)
    for wave, clusters in order_waves(
        [c for c in fleet.clusters if selector.matches(c)], policy.waves
    ):
        for cluster in clusters:
            current = current_release(cluster)
            found = interrupted(cluster)
            if found is not None:
                decision = admit(
                    cluster,
                    now,
                    prediction,
                    fleet_blackouts=fleet.blackout_dates,
                    override_window=True,
                )
                resumed.append(
                    PlanRow(
                        cluster=cluster.name,
                        wave=wave,
                        subscription_id=cluster.subscription_id,
                        region=cluster.region,
                        window=str(decision.window) if decision.window else "none",
                        window_end=decision.window.end if decision.window else None,
                        current_release=current,
                        run=True,
                        skipped=False,
                        reason=f"interrupted: resuming ({found})",
                        predicted_downtime_s=predicted_downtime_s,
                        interrupted=True,
                    )
                )
                continue
            decision = admit(
                cluster,
                now,
                prediction,
                fleet_blackouts=fleet.blackout_dates,
                current_release=current,
                target_release=release.version,
                override_window=policy.override_window,
            )
            reason = decision.reason
            if policy.override_window and decision.admitted:
                reason = f"{reason} [{policy.reason}]"
            if wave not in known and decision.admitted:
                reason += f" (wave {wave!r} is not in the wave order: runs last)"
            rows.append(
                PlanRow(
                    cluster=cluster.name,
                    wave=wave,
                    subscription_id=cluster.subscription_id,
                    region=cluster.region,
                    window=str(decision.window) if decision.window else "none",
                    window_end=decision.window.end if decision.window else None,
                    current_release=current,
                    run=decision.admitted,
                    skipped=decision.skipped,
                    reason=reason,
                    predicted_downtime_s=predicted_downtime_s if decision.admitted else 0.0,
                )
            )
    return resumed + rows


def read_all(
    clusters: Sequence[Cluster], read: Callable[[Cluster], T], workers: int = 16
) -> dict[str, T]:
    """``read(cluster)`` for every cluster, ``workers`` at a time (planning reads the fleet)."""
    values = run_all(list(clusters), read, workers)
    return {cluster.name: value for cluster, value in zip(clusters, values, strict=True)}


#: run; halt: admit no more; abort: also roll back the clusters in flight; cancel: abort
#: because the process is being stopped (a Prefect cancel, SIGTERM).
Control = Literal["run", "halt", "abort", "cancel"]


@dataclass
class FleetSummary:
    """This run's results, over what earlier runs of the same name recorded (``earlier``)."""

    run_name: str
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    not_started: dict[str, str] = field(default_factory=dict)
    waves: list[dict[str, Any]] = field(default_factory=list)
    stopped: str | None = None
    max_in_flight: int = 0
    earlier: dict[str, dict[str, Any]] = field(default_factory=dict)
    earlier_not_started: dict[str, str] = field(default_factory=dict)
    cancelled: bool = False

    def all_results(self) -> dict[str, dict[str, Any]]:
        """Every cluster's latest result: an earlier one stays unless this run made a newer."""
        return {**self.earlier, **self.results}

    def all_not_started(self) -> dict[str, str]:
        results = self.all_results()
        merged = {**self.earlier_not_started, **self.not_started}
        return {name: why for name, why in merged.items() if name not in results}

    def counts(self) -> Counter[str]:
        return Counter(str(r["outcome"]) for r in self.all_results().values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_name": self.run_name,
            "results": self.all_results(),
            "not_started": self.all_not_started(),
            "waves": self.waves,
            "stopped": self.stopped,
            "cancelled": self.cancelled,
            "max_in_flight": self.max_in_flight,
            "counts": dict(self.counts()),
        }


class FleetRunner:
    """Run the planned clusters' jobs on ``executor`` within the caps and the budget."""

    def __init__(
        self,
        fleet: Fleet,
        rows: Sequence[PlanRow],
        policy: FleetPolicy,
        executor: Executor,
        store: Store,
        run_name: str,
        *,
        release: Release,
        upgrade: UpgradePolicy | None = None,
        anchor: ClockAnchor | None = None,
        control: Callable[[], Control] = lambda: "run",
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        sleep: Callable[[float], object] | None = None,
        control_every_s: float = 1.0,
        on_result: Callable[[FleetSummary, str], None] = lambda summary, cluster: None,
        log: Callable[[str], None] = lambda message: None,
    ) -> None:
        """Each cluster's job carries ``release``, the ``upgrade`` policy, the window end
        from its plan row (none when the policy overrides windows, its reason recorded) and
        ``anchor`` (the jobs' UTC clock; None: the real one). ``now`` and ``sleep`` share one
        unit (seconds of the run's clock; by default real seconds, the wait cut short by an
        abort); ``control_every_s`` in that unit is how often a wait (the bake time) asks
        ``control`` whether to stop."""
        self.fleet = fleet
        record = store.get("fleet-runs", run_name) or {}
        self.rows = _rows_to_run(rows, record.get("results") or {}, store.names(STARTS, run_name))
        self.policy = policy
        self.executor = executor
        self.release = release
        self.upgrade = upgrade or UpgradePolicy()
        self.anchor = anchor
        self.store = store
        self.run_name = run_name
        self.control = control
        self.now = now
        self.abort = threading.Event()
        self.sleep: Callable[[float], object] = sleep or self.abort.wait
        self.control_every_s = control_every_s
        self.on_result = on_result
        self.log = log
        self.summary = FleetSummary(
            run_name,
            earlier=dict(record.get("results") or {}),
            earlier_not_started=dict(record.get("not_started") or {}),
        )
        self.previous: dict[str, dict[str, Any]] = {
            name: result
            for name, result in self.summary.earlier.items()
            if result.get("outcome") in FINAL
        }
        self.budget = ErrorBudget.parse(policy.error_budget, selected=max(1, len(self.rows)))
        self._unsaved = False
        self._saved_at: dt.datetime | None = None
        self._urgent = False  # stopping: every result is saved at once
        self._stop: str | None = None  # abort or cancel: sticky for the rest of the run
        self._in_flight: dict[str, PlanRow] = {}
        self._in_flight_lock = threading.Lock()

    # A success not yet in the record costs nothing if the run dies: a resumed run finds that
    # cluster already on the release. Rewriting the whole record after each of 1,000 results
    # did cost: the record grows with the fleet, and the loop that admits clusters waited.
    SAVE_SUCCESSES_EVERY_S = 2.0

    def _save(self) -> None:
        self.store.put("fleet-runs", self.run_name, value=self.summary.as_dict())
        self._unsaved = False
        self._saved_at = self.now()

    def _record(self, result: dict[str, Any]) -> None:
        """Record a cluster's result: at once unless it succeeded, else within a few seconds."""
        self._unsaved = True
        if result["outcome"] not in SUCCEEDED or self._urgent:
            self._save()  # a failure is never re-run by a resume: it must not be lost
        else:
            self._save_if_due()

    def _save_if_due(self) -> None:
        if self._unsaved and (
            self._saved_at is None
            or (self.now() - self._saved_at).total_seconds() >= self.SAVE_SUCCESSES_EVERY_S
        ):
            self._save()

    def job(self, cluster: Cluster, row: PlanRow) -> ClusterJob:
        """The job of ``row``'s cluster: what the executor runs."""
        override = self.policy.override_window
        return ClusterJob(
            cluster=cluster,
            release=self.release,
            policy=self.upgrade,
            window_end=None if override else row.window_end,
            anchor=self.anchor,
            override_reason=self.policy.reason if override else None,
            wave=row.wave,
            fleet_run=self.run_name,
        )

    def failures(self) -> int:
        return sum(1 for r in self.summary.results.values() if r["outcome"] in FAILED)

    def run(self) -> FleetSummary:
        resume = [r for r in self.rows if r.interrupted]
        by_wave: dict[str, list[PlanRow]] = {}
        for row in self.rows:
            if not row.interrupted:
                by_wave.setdefault(row.wave, []).append(row)
        if resume:
            # Left half-way by an earlier run: brought back to one release before any wave,
            # even when halted or out of error budget (a half-swapped cluster is the worst
            # state to leave); an abort still reaches them (they roll back), a cancel does not
            # start them (the process is about to be stopped).
            self._run_wave(RESUME_WAVE, resume, resuming=True)
        previous_results: list[bool] = []
        previous_end: dt.datetime | None = None
        for wave, rows in by_wave.items():
            if not self.summary.stopped:
                self.summary.stopped = self._stop_reason()
            gate = self._gate(previous_results, previous_end)
            if not gate.open and gate.bake_left > dt.timedelta(0) and not self.summary.stopped:
                assert previous_end is not None  # a bake follows a finished wave
                self._bake(wave, previous_end + dt.timedelta(seconds=self.policy.bake_s))
                gate = self._gate(previous_results, previous_end)
            if not gate.open or self.summary.stopped:
                reason = self.summary.stopped or f"wave {wave} not opened: {gate.reason}"
                for row in rows:
                    self.summary.not_started[row.cluster] = reason
                self.summary.waves.append({"wave": wave, "opened": False, "reason": reason})
                self.summary.stopped = self.summary.stopped or reason
                continue
            results = self._run_wave(wave, rows)
            previous_results = [
                r["outcome"] in SUCCEEDED for r in results if r["outcome"] not in NOT_JUDGED
            ]
            previous_end = self.now()
        self._save()
        return self.summary

    def _gate(self, previous_results: list[bool], previous_end: dt.datetime | None) -> WaveGate:
        return wave_gate(
            previous_results,
            success_threshold=self.policy.success_threshold,
            finished_at=previous_end,
            bake=dt.timedelta(seconds=self.policy.bake_s),
            now=self.now(),
        )

    def _bake(self, wave: str, until: dt.datetime) -> None:
        """Wait until ``until`` before ``wave``, asking ``control`` every ``control_every_s``:
        a halt, an abort or a cancel ends the wait (and the run's admissions)."""
        self.log(f"wave {wave}: baking {(until - self.now()).total_seconds():.0f} s")
        while not self.summary.stopped:
            left = (until - self.now()).total_seconds()
            if left <= 0:
                return
            self.sleep(min(left, self.control_every_s))
            self.summary.stopped = self._stop_reason()

    def _stop_reason(self) -> str | None:
        if self._stop is not None:
            return self._stop
        control = self.control()
        if control in ("abort", "cancel"):
            self.abort.set()  # in-flight clusters roll back (or finish past no return)
            self.summary.cancelled = control == "cancel"
            self._stop = (
                "aborted by operator"
                if control == "abort"
                else "cancelled (Prefect cancel or SIGTERM): clusters in flight roll back"
            )
            self._interrupt_in_flight(self._stop)
            return self._stop
        if control == "halt":
            return "halted by operator"
        if self.budget.exhausted(self.failures()):
            return f"error budget spent ({self.failures()} failed, budget {self.budget})"
        return None

    def _interrupt_in_flight(self, reason: str) -> None:
        """Record the clusters in flight as ``interrupted`` now, and every result from now on
        at once: if the process is killed before they finish (Prefect kills a cancelled run
        after its grace period), the record still names each of them, and a resume with the
        same run name finds them. A cluster that finishes replaces its entry."""
        with self._in_flight_lock:
            in_flight = dict(self._in_flight)
        for name, row in in_flight.items():
            if name not in self.summary.results:
                self.summary.results[name] = {
                    "cluster": name,
                    "outcome": "interrupted",
                    "reason": f"in flight when the run stopped ({reason}); "
                    "run again with the same run_name to resume it",
                    "wave": row.wave,
                }
        self._urgent = True
        self._save()

    def _run_wave(
        self, wave: str, rows: list[PlanRow], *, resuming: bool = False
    ) -> list[dict[str, Any]]:
        self.log(f"wave {wave}: {len(rows)} clusters")
        clusters = {c.name: c for c in self.fleet.clusters}
        queue = list(rows)
        running: dict[concurrent.futures.Future[ClusterOutcome], PlanRow] = {}
        results: list[dict[str, Any]] = []
        per_sub: Counter[str] = Counter()
        per_region: Counter[str] = Counter()
        ramp = dt.timedelta(seconds=self.policy.admit_every_s)
        # The ramp's schedule: when the next cluster may start. Each start moves it one interval
        # on from where it was, not from when the start happened (under load the loop wakes up
        # late, and measuring from the start made every delay push back all later clusters).
        next_slot: dt.datetime | None = None
        finished: queue_module.SimpleQueue[concurrent.futures.Future[ClusterOutcome]]
        finished = queue_module.SimpleQueue()

        def ramp_wait() -> float:
            """Seconds until the ramp lets the next cluster start (0: now)."""
            if not ramp or next_slot is None:
                return 0.0
            return max(0.0, (next_slot - self.now()).total_seconds())

        with concurrent.futures.ThreadPoolExecutor(self.policy.max_parallel) as pool:
            while queue or running:
                stop = self._stop_reason()
                if stop is not None and resuming and not self.summary.cancelled:
                    stop = None  # see run(): only a cancel keeps interrupted clusters waiting
                if stop is not None and (queue or not self.summary.stopped):
                    # Recorded when read, even with this wave's queue empty (a canary wave in
                    # flight): `amlfs status` shows the stop now, not when the wave ends, and
                    # the later waves are not opened.
                    self.summary.stopped = self.summary.stopped or stop
                    for row in queue:
                        self.summary.not_started[row.cluster] = stop
                    queue = []
                    self._save()
                admitted = True
                while (
                    queue
                    and admitted
                    and len(running) < self.policy.max_parallel
                    and ramp_wait() == 0
                ):
                    admitted = False
                    for row in queue:
                        if row.cluster in self.previous and not row.interrupted:
                            queue.remove(row)
                            result = dict(self.previous[row.cluster], resumed_from_record=True)
                            self.summary.results[row.cluster] = result
                            results.append(result)
                            admitted = True
                            break
                        if (
                            per_sub[row.subscription_id] < self.policy.max_per_subscription
                            and per_region[row.region] < self.policy.max_per_region
                        ):
                            queue.remove(row)
                            per_sub[row.subscription_id] += 1
                            per_region[row.region] += 1
                            now = self.now()
                            # Never more than one interval of starts made up at once.
                            next_slot = max(next_slot or now, now - ramp) + ramp
                            # Known before it starts (one small document, not the whole
                            # record): if this process dies, a resume checks the cluster
                            # even when it finds it on the release (its result unsaved).
                            self.store.put(STARTS, self.run_name, row.cluster, value={"wave": wave})
                            future = pool.submit(
                                self.executor.run,
                                self.job(clusters[row.cluster], row),
                                self.abort.is_set,
                            )
                            running[future] = row
                            with self._in_flight_lock:
                                self._in_flight[row.cluster] = row
                            future.add_done_callback(finished.put)
                            self.summary.max_in_flight = max(
                                self.summary.max_in_flight, len(running)
                            )
                            self.log(f"{row.cluster}: started ({len(running)} in flight)")
                            admitted = True
                            break
                if not running:
                    self.abort.wait(ramp_wait())  # a real wait, cut short by an abort
                    continue
                # One queue of finished clusters instead of concurrent.futures.wait over all
                # of those in flight: that re-armed a waiter on each of ~200 futures per turn.
                done = []
                try:
                    done.append(finished.get(timeout=min(1.0, ramp_wait() or 1.0)))
                    while True:
                        done.append(finished.get_nowait())
                except queue_module.Empty:
                    pass
                self._save_if_due()
                for future in done:
                    row = running.pop(future)
                    with self._in_flight_lock:
                        self._in_flight.pop(row.cluster, None)
                    per_sub[row.subscription_id] -= 1
                    per_region[row.region] -= 1
                    try:
                        outcome = future.result()
                    except Exception as err:  # an orchestrator bug must not lose the fleet
                        outcome = ClusterOutcome.failed(
                            self.job(clusters[row.cluster], row), f"{type(err).__name__}: {err}"
                        )
                    result = outcome.record()
                    result["wave"] = row.wave
                    self.summary.results[row.cluster] = result
                    results.append(result)
                    self._record(result)
                    self.on_result(self.summary, row.cluster)
        self.summary.waves.append(
            {
                "wave": wave,
                "opened": True,
                "clusters": len(rows),
                "succeeded": sum(1 for r in results if r["outcome"] in SUCCEEDED),
                **({"names": [r.cluster for r in rows]} if resuming else {}),
            }
        )
        self._save()
        return results
