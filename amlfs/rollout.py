"""A release's rollout across the fleet, over many weekly windows: stages, soak, approvals,
a rollout-wide error budget and a deadline.

A ``Rollout`` is a durable record (``rollouts/NAME`` in the state store) of one release going
out to a selection of the fleet with a ``RolloutStrategy``. Its membership is fixed when it
starts: every selected cluster belongs to the first stage whose selector matches it (a
stage's default selector is the wave of its name). Each 15-minute tick (the
``rollout-tick`` flow) admits a cluster whose window opens only if its stage is open:

* every earlier stage has finished (each of its clusters upgraded, found on the release, or
  failed for good) and met its success threshold;
* the earlier stage's soak time has passed since its last cluster finished;
* the stage's approval, if it needs one, was given;
* the rollout is ``active`` (not halted, aborted or completed).

A failure beyond the rollout-wide budget, or a finished stage below its threshold, halts the
rollout for every later tick until an operator resumes it. A hotfix rollout may skip the soak
times and approvals only with a reason, recorded in the record and its events.

Everything here is pure except ``RolloutBook``, which reads and writes the records (each
change one atomic ``Store.update``). Times are aware datetimes on the run's clock (the
emulator's rehearsal clock, or UTC); naive ones are refused.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import re
import shlex
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from amlfs.errors import InventoryError, validation_problems
from amlfs.models import Cluster, Fleet, Text, read_yaml
from amlfs.schedule import ErrorBudget, next_window_opening, windows_opening_in

__all__ = [
    "Approval",
    "ClusterProgress",
    "Forecast",
    "Rollout",
    "RolloutBook",
    "RolloutEvent",
    "RolloutStrategy",
    "Stage",
    "StageView",
    "Upcoming",
    "awaiting_approval",
    "census_due",
    "cluster_gate",
    "compliance",
    "forecast",
    "load_strategy",
    "new_rollout",
    "record_outcome",
    "stage_views",
]

UTC = dt.UTC
RolloutState = Literal["active", "halted", "aborted", "completed"]
#: Outcomes that leave a cluster on the release.
SUCCEEDED = ("upgraded", "already_current")
#: Outcomes that count against the error budget.
FAILED = ("rolled_back", "failed_needs_attention")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,79}")
STRATEGY_MAX_BYTES = 256 * 1024


def _name(value: str) -> str:
    if not _NAME.fullmatch(value) or value.endswith("."):
        raise ValueError(
            f"{value[:80]!r} is not a valid name: letters, digits, '_', '.', '-' "
            "(1-80 characters, starting with a letter or digit)"
        )
    return value


Name = Annotated[str, AfterValidator(_name)]


def _aware(value: dt.datetime, what: str) -> dt.datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what} must carry a timezone (UTC), got {value}")
    return value.astimezone(UTC)


def _fmt(when: dt.datetime | None) -> str:
    return when.strftime("%a %Y-%m-%d %H:%M UTC") if when else "never"


def windows(count: int) -> str:
    return f"{count} window" + ("" if count == 1 else "s")


def _hours(delta: dt.timedelta) -> str:
    hours = delta.total_seconds() / 3600
    return f"{hours / 24:.1f} d" if hours >= 48 else f"{hours:.1f} h"


# ------------------------------------------------------------------------ strategy


class StageSelector(BaseModel):
    """Which of the rollout's clusters a stage holds; empty lists match everything."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    names: list[Text] = []
    waves: list[Text] = []
    regions: list[Text] = []
    tags: dict[Text, Text] = {}

    def matches(self, cluster: Cluster) -> bool:
        return (
            (not self.names or cluster.name in self.names)
            and (not self.waves or cluster.wave in self.waves)
            and (not self.regions or cluster.region in self.regions)
            and all(cluster.tags.get(k) == v for k, v in self.tags.items())
        )


class Stage(BaseModel):
    """One stage of a rollout: its clusters, what it must achieve, and what follows it."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: Name = Field(description="Stage name (by default also the wave it holds)")
    selector: StageSelector | None = Field(
        default=None, description="Its clusters; default: the clusters of the wave of its name"
    )
    soak_hours: float = Field(
        default=0.0, ge=0, le=24 * 90, description="Wait after its last cluster finished"
    )
    success_threshold: float = Field(
        default=1.0, ge=0, le=1, description="Share of its clusters that must end upgraded"
    )
    approval: bool = Field(default=False, description="An operator approves before it opens")

    @property
    def soak(self) -> dt.timedelta:
        return dt.timedelta(hours=self.soak_hours)

    def holds(self, cluster: Cluster) -> bool:
        selector = self.selector or StageSelector(waves=[self.name])
        return selector.matches(cluster)


class RolloutStrategy(BaseModel):
    """How a release goes out: ordered stages, a budget, retries and a deadline."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    stages: list[Stage] = Field(min_length=1, description="In order: each opens after the last")
    error_budget: int | str = Field(
        default=1, description="Failed upgrades tolerated across the rollout: count or '10%'"
    )
    retry_rolled_back: bool = Field(
        default=False, description="A cluster that rolled back is tried again in its next window"
    )
    deadline: dt.datetime | None = Field(
        default=None, description="Every cluster on the release by then (e.g. a CVE's date)"
    )

    @model_validator(mode="after")
    def _check(self) -> RolloutStrategy:
        names = [stage.name for stage in self.stages]
        if twice := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"stage names must be unique: {', '.join(twice)} repeated")
        try:
            ErrorBudget.parse(self.error_budget, selected=100)
        except InventoryError as err:
            raise ValueError(str(err)) from None
        if self.deadline is not None:
            object.__setattr__(self, "deadline", _aware(self.deadline, "deadline"))
        return self


def load_strategy(path: str | Path) -> RolloutStrategy:
    """A strategy from a small YAML file; an error names the file and the field."""
    data = read_yaml(path, kind="rollout strategy", max_bytes=STRATEGY_MAX_BYTES)
    try:
        return RolloutStrategy.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(validation_problems(err))
        raise InventoryError(f"{path}: invalid rollout strategy: {problems}") from None


# ------------------------------------------------------------------------ the record


class Approval(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    by: Text
    at: dt.datetime
    note: Text = ""


class ClusterProgress(BaseModel):
    """A cluster's latest result in the rollout. ``failures`` counts its failed attempts."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    outcome: str
    at: dt.datetime
    attempts: int = 1
    failures: int = 0
    run_name: str = ""
    reason: str = ""
    retry: bool = False  # an operator asked for another attempt (resume --retry-failed)


class RolloutEvent(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    at: dt.datetime
    what: str
    by: str = ""
    reason: str = ""


class Rollout(BaseModel):
    """The durable record of one release's rollout."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: Name
    release_version: Text
    release_file: Text
    fleet_file: Text
    strategy: RolloutStrategy
    members: dict[str, str] = Field(description="cluster -> stage, fixed at the start")
    created_at: dt.datetime
    created_by: Text = ""
    state: RolloutState = "active"
    state_reason: str = ""
    hotfix_reason: str | None = None
    skip_soak: bool = False
    skip_approvals: bool = False
    approvals: dict[str, Approval] = {}
    #: stage -> the Prefect flow run asking an operator for its approval (asked once).
    approval_requests: dict[str, str] = {}
    clusters: dict[str, ClusterProgress] = {}
    #: Failures an operator's resume forgave: the budget counts the ones after.
    forgiven_failures: int = 0
    events: list[RolloutEvent] = []
    #: The digest of the last forecast published as an artifact (a no-op tick publishes none).
    published: str = ""

    @model_validator(mode="after")
    def _check(self) -> Rollout:
        if (self.skip_soak or self.skip_approvals) and not (self.hotfix_reason or "").strip():
            raise ValueError("skipping soak or approvals is for a hotfix: give hotfix_reason")
        stages = {stage.name for stage in self.strategy.stages}
        if bad := sorted({s for s in self.members.values() if s not in stages}):
            raise ValueError(f"members name unknown stages: {', '.join(bad)}")
        return self

    def stage_of(self, cluster: str) -> str | None:
        return self.members.get(cluster)

    def failures(self) -> int:
        return sum(p.failures for p in self.clusters.values())

    def budget(self) -> ErrorBudget:
        return ErrorBudget.parse(self.strategy.error_budget, selected=len(self.members))

    def event(self, at: dt.datetime, what: str, *, by: str = "", reason: str = "") -> Rollout:
        entry = RolloutEvent(at=at, what=what, by=by, reason=reason)
        return self.model_copy(update={"events": [*self.events, entry]})


def new_rollout(
    name: str,
    fleet: Fleet,
    *,
    release_version: str,
    release_file: str,
    fleet_file: str,
    strategy: RolloutStrategy,
    now: dt.datetime,
    selected: Callable[[Cluster], bool] = lambda cluster: True,
    by: str = "",
    hotfix_reason: str | None = None,
    skip_soak: bool = False,
    skip_approvals: bool = False,
) -> Rollout:
    """A rollout of the selected clusters, each in the first stage that holds it. A selected
    cluster no stage holds is an error (it would never be upgraded), as is an empty one."""
    now = _aware(now, "now")
    members: dict[str, str] = {}
    homeless = []
    for cluster in fleet.clusters:
        if not selected(cluster):
            continue
        stage = next((s for s in strategy.stages if s.holds(cluster)), None)
        if stage is None:
            homeless.append(f"{cluster.name} (wave {cluster.wave})")
        else:
            members[cluster.name] = stage.name
    if homeless:
        raise InventoryError(
            f"rollout {name}: no stage holds {', '.join(homeless)}: add a stage for them or "
            "leave them out of the selection"
        )
    if not members:
        raise InventoryError(f"rollout {name}: the selection holds no cluster")
    try:
        rollout = Rollout(
            name=name,
            release_version=release_version,
            release_file=release_file,
            fleet_file=fleet_file,
            strategy=strategy,
            members=members,
            created_at=now,
            created_by=by,
            hotfix_reason=(hotfix_reason or "").strip() or None,
            skip_soak=skip_soak,
            skip_approvals=skip_approvals,
        )
    except ValidationError as err:
        raise InventoryError(
            f"rollout {name}: " + "; ".join(validation_problems(err, located=False))
        ) from None
    what = f"started: {release_version} to {len(members)} clusters in {len(strategy.stages)} stages"
    return rollout.event(now, what, by=by, reason=rollout.hotfix_reason or "")


# ------------------------------------------------------------------------ stages


@dataclass(frozen=True)
class StageView:
    """Where one stage stands at ``now``."""

    name: str
    members: tuple[str, ...]
    succeeded: tuple[str, ...]
    failed: tuple[str, ...]  # failed for good (not retried)
    pending: tuple[str, ...]
    finished_at: dt.datetime | None  # when its last cluster finished; None while pending
    opens_at: dt.datetime | None  # when the soak lets it open (None: an earlier stage pends)
    open: bool
    reason: str
    met: bool  # finished and at or above its threshold

    @property
    def ratio(self) -> float:
        return len(self.succeeded) / len(self.members) if self.members else 1.0


def _member_state(rollout: Rollout, cluster: str) -> Literal["succeeded", "failed", "pending"]:
    progress = rollout.clusters.get(cluster)
    if progress is None or progress.retry:
        return "pending"
    if progress.outcome in SUCCEEDED:
        return "succeeded"
    if progress.outcome == "rolled_back" and rollout.strategy.retry_rolled_back:
        return "pending"
    if progress.outcome in FAILED:
        return "failed"
    return "pending"  # busy, interrupted: said nothing of the release


def stage_views(rollout: Rollout, now: dt.datetime) -> list[StageView]:
    """Every stage's standing, in order: which clusters are done, whether it is open, why."""
    now = _aware(now, "now")
    views: list[StageView] = []
    previous: StageView | None = None
    previous_stage: Stage | None = None
    for stage in rollout.strategy.stages:
        members = tuple(sorted(c for c, s in rollout.members.items() if s == stage.name))
        states = {c: _member_state(rollout, c) for c in members}
        succeeded = tuple(c for c in members if states[c] == "succeeded")
        failed = tuple(c for c in members if states[c] == "failed")
        pending = tuple(c for c in members if states[c] == "pending")
        if previous is None:
            opens_at: dt.datetime | None = rollout.created_at
            blocked = ""
        elif previous.finished_at is None:
            opens_at, blocked = None, f"waits for stage {previous.name} to finish"
        elif not previous.met:
            opens_at = None
            blocked = (
                f"stage {previous.name} succeeded on {len(previous.succeeded)}/"
                f"{len(previous.members)} clusters, below its "
                f"{previous_stage.success_threshold if previous_stage else 1:.0%} threshold"
            )
        else:
            soak = dt.timedelta(0) if rollout.skip_soak else (previous_stage or stage).soak
            opens_at, blocked = previous.finished_at + soak, ""
            if now < opens_at:
                blocked = f"stage {previous.name} soaking until {_fmt(opens_at)}"
        needs_approval = (
            stage.approval and not rollout.skip_approvals and stage.name not in rollout.approvals
        )
        if rollout.state != "active":
            reason = f"rollout {rollout.state}" + (
                f": {rollout.state_reason}" if rollout.state_reason else ""
            )
        elif blocked:
            reason = blocked
        elif needs_approval:
            reason = (
                f"awaiting approval (amlfs rollout approve {rollout.name} --stage {stage.name})"
            )
        else:
            reason = "open"
            if rollout.skip_soak and previous is not None:
                reason += f" (soak skipped: hotfix: {rollout.hotfix_reason})"
        is_open = reason.startswith("open")
        finished_at = None
        if not pending:
            times = [rollout.clusters[c].at for c in members if c in rollout.clusters]
            finished_at = max(times) if times else opens_at
        met = finished_at is not None and (
            not members or len(succeeded) / len(members) >= stage.success_threshold
        )
        view = StageView(
            name=stage.name,
            members=members,
            succeeded=succeeded,
            failed=failed,
            pending=pending,
            finished_at=finished_at,
            opens_at=opens_at,
            open=is_open,
            reason=reason,
            met=met,
        )
        views.append(view)
        previous, previous_stage = view, stage
    return views


def awaiting_approval(rollout: Rollout, now: dt.datetime) -> list[str]:
    """Stages of an active rollout to ask an operator about now: each needs an approval not
    given nor asked for yet, and the stage before it finished and met its threshold (the
    approval may come during the soak)."""
    if rollout.state != "active" or rollout.skip_approvals:
        return []
    stages = {stage.name: stage for stage in rollout.strategy.stages}
    return [
        view.name
        for view in stage_views(rollout, now)
        if stages[view.name].approval
        and view.opens_at is not None
        and view.name not in rollout.approvals
        and view.name not in rollout.approval_requests
    ]


def cluster_gate(rollout: Rollout, views: Sequence[StageView], cluster: str) -> tuple[bool, str]:
    """May this tick start ``cluster`` for the rollout? ``(admitted, reason)``."""
    stage = rollout.stage_of(cluster)
    if stage is None:
        return False, f"not in rollout {rollout.name}"
    progress = rollout.clusters.get(cluster)
    state = _member_state(rollout, cluster)
    if state == "succeeded":
        assert progress is not None
        return False, f"rollout {rollout.name}: done ({progress.outcome}, {_fmt(progress.at)})"
    if state == "failed":
        assert progress is not None
        return False, (
            f"rollout {rollout.name}: {progress.outcome} on {_fmt(progress.at)}, not retried "
            f"(amlfs rollout resume {rollout.name} --retry-failed tries it again)"
        )
    view = next(v for v in views if v.name == stage)
    if not view.open:
        return False, f"rollout {rollout.name}, stage {stage}: {view.reason}"
    again = f" (attempt {progress.attempts + 1})" if progress and progress.attempts else ""
    return True, f"rollout {rollout.name}, stage {stage} open{again}"


def _judge(rollout: Rollout, now: dt.datetime) -> Rollout:
    """Halt on a spent budget or a finished stage below its threshold; complete when every
    stage met its threshold. Only an active rollout changes."""
    if rollout.state != "active":
        return rollout
    budget = rollout.budget()
    counted = max(0, rollout.failures() - rollout.forgiven_failures)
    if budget.exhausted(counted):
        why = f"{counted} failed upgrades: {budget} (amlfs rollout resume {rollout.name})"
        return rollout.model_copy(update={"state": "halted", "state_reason": why}).event(
            now, "halted", reason=why
        )
    views = stage_views(rollout, now)
    strategy = {s.name: s for s in rollout.strategy.stages}
    for view in views:
        if view.finished_at is not None and not view.met:
            why = (
                f"stage {view.name} succeeded on {len(view.succeeded)}/{len(view.members)} "
                f"clusters, below its {strategy[view.name].success_threshold:.0%} threshold"
            )
            return rollout.model_copy(update={"state": "halted", "state_reason": why}).event(
                now, "halted", reason=why
            )
    if all(view.met for view in views):
        return rollout.model_copy(update={"state": "completed", "state_reason": ""}).event(
            now, "completed"
        )
    return rollout


def record_outcome(
    rollout: Rollout,
    cluster: str,
    outcome: str,
    *,
    at: dt.datetime,
    run_name: str = "",
    reason: str = "",
) -> Rollout:
    """The rollout with ``cluster``'s result of one attempt, judged again (it may halt or
    complete). Recording the same run's same outcome again changes nothing, nor does any
    outcome of a cluster that succeeded already. A cluster not in
    the rollout, or an outcome that says nothing of the release
    (busy, interrupted) for a cluster with a result already, changes nothing."""
    at = _aware(at, "at")
    if cluster not in rollout.members:
        return rollout
    before = rollout.clusters.get(cluster)
    if (
        before is not None
        and run_name
        and (before.run_name, before.outcome) == (run_name, outcome)
        and not before.retry
    ):
        return rollout  # this run's result, recorded already
    if before is not None and before.outcome in SUCCEEDED and not before.retry:
        return rollout  # on the release already: a later reading finding it there is no news
    if outcome not in (*SUCCEEDED, *FAILED):
        if before is not None and not before.retry:
            return rollout
        # Not judged, but remembered: a resume of its fleet run finds it.
        progress = ClusterProgress(
            outcome=outcome,
            at=at,
            attempts=before.attempts if before else 0,
            failures=before.failures if before else 0,
            run_name=run_name,
            reason=reason,
            retry=before.retry if before else False,
        )
    else:
        progress = ClusterProgress(
            outcome=outcome,
            at=at,
            attempts=(before.attempts if before else 0) + 1,
            failures=(before.failures if before else 0) + (outcome in FAILED),
            run_name=run_name,
            reason=reason,
        )
    changed = rollout.model_copy(update={"clusters": {**rollout.clusters, cluster: progress}})
    if outcome in FAILED:
        changed = changed.event(at, f"{cluster}: {outcome}", reason=reason)
    return _judge(changed, at)


# ------------------------------------------------------------------------ operator actions


def halt(rollout: Rollout, *, at: dt.datetime, by: str, reason: str) -> Rollout:
    if rollout.state != "active":
        raise InventoryError(f"rollout {rollout.name} is {rollout.state}: only an active one halts")
    if not reason.strip():
        raise InventoryError("a halt needs a reason (it is recorded)")
    return rollout.model_copy(update={"state": "halted", "state_reason": reason}).event(
        at, "halted", by=by, reason=reason
    )


def resume(
    rollout: Rollout, *, at: dt.datetime, by: str, reason: str = "", retry_failed: bool = False
) -> Rollout:
    """Active again. The failures so far are forgiven (the budget counts the ones after);
    ``retry_failed`` makes every cluster that failed for good eligible again in its window."""
    if rollout.state != "halted":
        raise InventoryError(
            f"rollout {rollout.name} is {rollout.state}: only a halted one resumes"
        )
    clusters = dict(rollout.clusters)
    retried = []
    if retry_failed:
        for name, progress in clusters.items():
            if _member_state(rollout, name) == "failed":
                clusters[name] = progress.model_copy(update={"retry": True})
                retried.append(name)
    changed = rollout.model_copy(
        update={
            "state": "active",
            "state_reason": "",
            "clusters": clusters,
            "forgiven_failures": rollout.failures(),
        }
    )
    what = "resumed" + (f" (retrying {', '.join(retried)})" if retried else "")
    changed = changed.event(at, what, by=by, reason=reason)
    views = stage_views(changed, at)
    for view in views:
        if view.finished_at is not None and not view.met:
            raise InventoryError(
                f"rollout {rollout.name}: stage {view.name} ended below its threshold "
                f"({len(view.succeeded)}/{len(view.members)}); resuming would halt it again: "
                "add --retry-failed to try its failed clusters again"
            )
    return _judge(changed, at)


def abort(rollout: Rollout, *, at: dt.datetime, by: str, reason: str) -> Rollout:
    if rollout.state in ("aborted", "completed"):
        raise InventoryError(f"rollout {rollout.name} is already {rollout.state}")
    if not reason.strip():
        raise InventoryError("an abort needs a reason (it is recorded)")
    return rollout.model_copy(update={"state": "aborted", "state_reason": reason}).event(
        at, "aborted", by=by, reason=reason
    )


def approve(rollout: Rollout, stage: str, *, at: dt.datetime, by: str, note: str = "") -> Rollout:
    known = {s.name: s for s in rollout.strategy.stages}
    if stage not in known:
        raise InventoryError(
            f"rollout {rollout.name} has no stage {stage!r} (stages: {', '.join(known)})"
        )
    if not known[stage].approval:
        raise InventoryError(f"stage {stage} of rollout {rollout.name} needs no approval")
    if stage in rollout.approvals:
        given = rollout.approvals[stage]
        raise InventoryError(f"stage {stage} was approved by {given.by} on {_fmt(given.at)}")
    if not by.strip():
        raise InventoryError("an approval names who gives it (--by)")
    approval = Approval(by=by, at=at, note=note)
    changed = rollout.model_copy(update={"approvals": {**rollout.approvals, stage: approval}})
    return changed.event(at, f"stage {stage} approved", by=by, reason=note)


# ------------------------------------------------------------------------ forecast


@dataclass(frozen=True)
class ClusterForecast:
    cluster: str
    stage: str
    status: str  # succeeded, failed, pending
    next_window: dt.datetime | None  # the window it is projected to start in (pending ones)
    projected_done: dt.datetime | None
    late: bool  # projected after the deadline, or never


@dataclass(frozen=True)
class StageForecast:
    name: str
    members: int
    succeeded: int
    failed: int
    opens: dt.datetime | None
    projected_done: dt.datetime | None
    reason: str


@dataclass(frozen=True)
class Upcoming:
    """A member's window that opens soon, and whether that tick starts the cluster."""

    cluster: str
    stage: str
    window: dt.datetime
    runs: bool
    why: str


#: How far ahead the forecast says what will run ("tonight"), and how many lines of it the
#: text form shows (the artifact shows all).
UPCOMING = dt.timedelta(hours=24)
UPCOMING_SHOWN = 10


def upcoming(
    rollout: Rollout,
    fleet: Fleet,
    now: dt.datetime,
    horizon: dt.timedelta = UPCOMING,
    tick_minutes: int = 15,
) -> tuple[Upcoming, ...]:
    """The windows of members not yet on the release that open within ``horizon`` of
    ``now``, each with the rollout's gate as the tick that starts it would apply it (at
    the start of the ``tick_minutes`` tick the window opens in), as things stand now: a
    soak that ends before that tick counts as ended; outcomes still to come are not
    guessed. The fleet's own admission (the window's fit, caps) is the run's, not this.
    None for a rollout that is over (aborted, completed)."""
    now = _aware(now, "now")
    if rollout.state in ("aborted", "completed"):
        return ()
    views_at: dict[dt.datetime, list[StageView]] = {}
    found = []
    for occurrence in windows_opening_in(fleet, now, now + horizon):
        name = occurrence.cluster
        if name not in rollout.members or _member_state(rollout, name) == "succeeded":
            continue
        if rollout.state != "active":
            runs = False
            why = f"rollout {rollout.name} is {rollout.state}" + (
                f": {rollout.state_reason}" if rollout.state_reason else ""
            )
        else:
            start = occurrence.start
            tick = start.replace(second=0, microsecond=0) - dt.timedelta(
                minutes=start.minute % tick_minutes
            )
            if tick not in views_at:
                views_at[tick] = stage_views(rollout, tick)
            runs, why = cluster_gate(rollout, views_at[tick], name)
        found.append(Upcoming(name, rollout.members[name], occurrence.start, runs, why))
    return tuple(found)


@dataclass(frozen=True)
class Forecast:
    """Projected dates of a rollout, from its record, the windows and the blackouts."""

    rollout: str
    state: str
    state_reason: str
    at: dt.datetime
    stages: tuple[StageForecast, ...]
    clusters: tuple[ClusterForecast, ...]
    projected_done: dt.datetime | None
    deadline: dt.datetime | None
    late: tuple[str, ...]  # clusters that cannot make the deadline
    hotfix_command: str | None  # what would put the late ones on the release now
    upcoming: tuple[Upcoming, ...] = ()  # what the next UPCOMING's ticks start, and why

    def digest(self) -> str:
        """Of what an operator reads (not of ``at``): equal digests, nothing new to publish."""
        content = dataclasses.asdict(self)
        content.pop("at")
        text = json.dumps(content, default=str, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def forecast(
    rollout: Rollout,
    fleet: Fleet,
    now: dt.datetime,
    *,
    upgrade: dt.timedelta,
    state_dir: str = ".amlfs-state",
) -> Forecast:
    """Per stage when it opens and finishes, per pending cluster its next eligible window,
    the rollout's projected completion, and the clusters that cannot make the deadline.

    Assumes the clusters to come succeed, approvals are given when their stage could open,
    and a cluster starts in the tick its window opens (so a window that opens before its
    stage does waits a week). A halted or aborted rollout projects nothing more.
    """
    now = _aware(now, "now")
    views = stage_views(rollout, now)
    moving = rollout.state == "active"
    by_name = {c.name: c for c in fleet.clusters}
    stages: list[StageForecast] = []
    clusters: list[ClusterForecast] = []
    deadline = rollout.strategy.deadline
    previous_done: dt.datetime | None = None
    previous_stage: Stage | None = None
    for stage, view in zip(rollout.strategy.stages, views, strict=True):
        if view.opens_at is not None:
            opens: dt.datetime | None = view.opens_at
        elif previous_done is not None and previous_stage is not None and moving:
            opens = previous_done + (dt.timedelta(0) if rollout.skip_soak else previous_stage.soak)
        else:
            opens = None
        done_times = [rollout.clusters[c].at for c in view.succeeded + view.failed]
        projected: list[dt.datetime | None] = list(done_times)
        for name in view.members:
            status = (
                "succeeded"
                if name in view.succeeded
                else "failed"
                if name in view.failed
                else "pending"
            )
            window: dt.datetime | None = None
            done: dt.datetime | None = None
            if status == "pending" and moving and opens is not None and name in by_name:
                occurrence = next_window_opening(
                    by_name[name], max(opens, now), fleet.blackout_dates
                )
                if occurrence is not None:
                    window = occurrence.start
                    done = occurrence.start + upgrade
            if status == "pending":
                projected.append(done)
            finished = done if status == "pending" else rollout.clusters[name].at
            is_late = (
                status != "succeeded"
                and deadline is not None
                and (finished is None or finished > deadline or status == "failed")
            )
            clusters.append(
                ClusterForecast(
                    cluster=name,
                    stage=stage.name,
                    status=status,
                    next_window=window,
                    projected_done=done if status == "pending" else rollout.clusters[name].at,
                    late=is_late,
                )
            )
        known = [t for t in projected if t is not None]
        stage_done = max(known) if known and len(known) == len(projected) else None
        if not view.members:
            stage_done = opens
        stages.append(
            StageForecast(
                name=stage.name,
                members=len(view.members),
                succeeded=len(view.succeeded),
                failed=len(view.failed),
                opens=opens,
                projected_done=stage_done,
                reason=view.reason,
            )
        )
        previous_done, previous_stage = stage_done, stage
    all_done = stages[-1].projected_done if stages and moving else None
    if rollout.state == "completed":
        all_done = max((p.at for p in rollout.clusters.values()), default=rollout.created_at)
    late = tuple(c.cluster for c in clusters if c.late)
    command = None
    if late:
        command = shlex.join(
            [
                "amlfs",
                "run-fleet",
                "--fleet",
                rollout.fleet_file,
                "--release",
                rollout.release_file,
                "--state-dir",
                state_dir,
                "--run-name",
                f"{rollout.name}-deadline",
                "--hotfix-reason",
                f"rollout {rollout.name}: deadline {_fmt(deadline)}",
                *[part for name in late for part in ("--cluster", name)],
            ]
        )
    return Forecast(
        rollout=rollout.name,
        state=rollout.state,
        state_reason=rollout.state_reason,
        at=now,
        stages=tuple(stages),
        clusters=tuple(clusters),
        projected_done=all_done,
        deadline=deadline,
        late=late,
        hotfix_command=command,
        upcoming=upcoming(rollout, fleet, now),
    )


def forecast_lines(result: Forecast, *, upcoming: bool = True) -> list[str]:
    """The forecast as the operator reads it (plain text lines); ``upcoming``: with the
    first UPCOMING_SHOWN of the windows to come (else only their count)."""
    lines = [
        f"rollout {result.rollout}: {result.state}"
        + (f" ({result.state_reason})" if result.state_reason else "")
    ]
    for stage in result.stages:
        lines.append(
            f"  stage {stage.name}: {stage.succeeded}/{stage.members} upgraded"
            + (f", {stage.failed} failed" if stage.failed else "")
            + f"; opens {_fmt(stage.opens)}; done {_fmt(stage.projected_done)}; {stage.reason}"
        )
    lines.append(f"  projected completion: {_fmt(result.projected_done)}")
    runs = sum(1 for u in result.upcoming if u.runs)
    lines.append(
        f"  next {_hours(UPCOMING)}: {windows(len(result.upcoming))}, {runs} to start"
        + ("" if result.upcoming else " (no member's window opens)")
    )
    for u in result.upcoming[: UPCOMING_SHOWN if upcoming else 0]:
        verdict = "starts" if u.runs else "held"
        lines.append(f"    {_fmt(u.window)} {u.cluster} ({u.stage}): {verdict}: {u.why}")
    if upcoming and len(result.upcoming) > UPCOMING_SHOWN:
        lines.append(f"    ... and {len(result.upcoming) - UPCOMING_SHOWN} more")
    if result.deadline is not None:
        lines.append(f"  deadline: {_fmt(result.deadline)}")
        if result.late:
            lines.append(f"  cannot make the deadline: {', '.join(result.late)}")
            lines.append(f"  hotfix them now: {result.hotfix_command}")
        else:
            lines.append("  every cluster is projected to make the deadline")
    return lines


# ------------------------------------------------------------------------ compliance


@dataclass(frozen=True)
class ComplianceRow:
    cluster: str
    release: str | None  # None: not read yet
    seen_at: dt.datetime | None
    behind_since: dt.datetime | None  # None: on the latest release (or unknown)


def compliance(
    fleet: Fleet,
    releases: dict[str, dict[str, Any]],
    latest: str | None,
    latest_since: dt.datetime | None,
) -> tuple[Counter[str], list[ComplianceRow]]:
    """How many clusters run each release, and since when each is behind ``latest``.

    ``releases``: per cluster the last release seen on it (``{"release", "seen_at"}``, as
    ``RolloutBook.saw`` records it). ``latest_since``: when ``latest`` started rolling out;
    a cluster not on it is behind since then."""
    counts: Counter[str] = Counter()
    rows = []
    for cluster in fleet.clusters:
        seen = releases.get(cluster.name) or {}
        release = seen.get("release")
        seen_at = dt.datetime.fromisoformat(seen["seen_at"]) if seen.get("seen_at") else None
        counts[release or "unknown"] += 1
        behind = (
            latest_since
            if latest is not None and release is not None and release != latest
            else None
        )
        rows.append(ComplianceRow(cluster.name, release, seen_at, behind))
    return counts, rows


def census_due(
    fleet: Fleet,
    releases: Mapping[str, Mapping[str, Any]],
    now: dt.datetime,
    *,
    batch: int,
    fresh_for: dt.timedelta,
) -> list[str]:
    """The clusters whose release a tick reads for the compliance view: at most ``batch``,
    those never read first (in fleet order), then those read longest ago; none read within
    ``fresh_for`` of ``now``. A fleet of N clusters is known after N / ``batch`` ticks
    (1,000 at 50 a tick: 5 hours of 15-minute ticks), and stays fresh within ``fresh_for``
    plus that."""
    now = _aware(now, "now")
    due: list[tuple[bool, dt.datetime, int, str]] = []
    for index, cluster in enumerate(fleet.clusters):
        seen = (releases.get(cluster.name) or {}).get("seen_at")
        when = dt.datetime.fromisoformat(seen) if seen else None
        if when is not None and now - when < fresh_for:
            continue
        due.append((when is not None, when or now, index, cluster.name))
    due.sort()
    return [name for *_, name in due[: max(0, batch)]]


# ------------------------------------------------------------------------ the store


class RolloutBook:
    """Rollout records in a ``Store`` (``rollouts/NAME``), and the release last seen on each
    cluster (``cluster-releases/CLUSTER``). Each change is one atomic update."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def names(self) -> list[str]:
        return [n for n in self.store.names("rollouts")]

    def get(self, name: str) -> Rollout:
        data = self.store.get("rollouts", _name(name))
        if data is None:
            known = ", ".join(self.names()) or "none"
            raise InventoryError(f"no rollout named {name!r} (rollouts: {known})")
        return Rollout.model_validate(data)

    def all(self) -> list[Rollout]:
        return [self.get(name) for name in self.names()]

    def active(self) -> list[Rollout]:
        return [r for r in self.all() if r.state == "active"]

    def create(self, rollout: Rollout) -> Rollout:
        def change(current: Any) -> Any:
            if current is not None:
                raise InventoryError(
                    f"a rollout named {rollout.name} exists ({current.get('state')}): "
                    "pick another name"
                )
            return rollout.model_dump(mode="json")

        self.store.update("rollouts", rollout.name, change=change)
        return rollout

    def change(self, name: str, change: Callable[[Rollout], Rollout]) -> Rollout:
        """Apply ``change`` to the record atomically; its exceptions leave the record as is."""
        result: list[Rollout] = []

        def apply(current: Any) -> Any:
            if current is None:
                raise InventoryError(f"no rollout named {name!r}")
            changed = change(Rollout.model_validate(current))
            result.append(changed)
            return changed.model_dump(mode="json")

        self.store.update("rollouts", _name(name), change=apply)
        return result[-1]

    def saw(self, cluster: str, release: str, at: dt.datetime) -> None:
        """Remember the release seen on ``cluster`` at ``at`` (for compliance), unless a
        reading of a later instant is recorded already (a run and a census can race)."""
        seen = {"release": release, "seen_at": _aware(at, "at").isoformat()}

        def newer(current: Any) -> Any:
            try:
                kept = dt.datetime.fromisoformat(current["seen_at"])
            except (TypeError, KeyError, ValueError):
                return seen  # none, or not a reading: replaced
            return current if kept > _aware(at, "at") else seen

        self.store.update("cluster-releases", cluster, change=newer)

    def releases(self) -> dict[str, dict[str, Any]]:
        return dict(self.store.items("cluster-releases"))

    def latest(self) -> tuple[str | None, dt.datetime | None]:
        """The release of the most recently started rollout (not aborted), and when the
        first rollout of that release started."""
        live = [r for r in self.all() if r.state != "aborted"]
        if not live:
            return None, None
        newest = max(live, key=lambda r: r.created_at)
        first = min(
            (r.created_at for r in live if r.release_version == newest.release_version),
            default=newest.created_at,
        )
        return newest.release_version, first
