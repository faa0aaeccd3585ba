"""Prefect flows of release rollouts: ``rollout-start`` (the typed form in the UI) and
``rollout-tick`` (every 15 minutes: each active rollout advanced by a ``fleet-maintenance``
run in scheduled mode, gated by the rollout's stages).

The rollout itself is ``amlfs.rollout``; its record lives in the state store, so the CLI
(``amlfs rollout ...``), these flows and every fleet run see the same rollout.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prefect import flow, get_run_logger
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from prefect.states import Completed, Failed
from pydantic import BaseModel, ConfigDict, Field, model_validator

from amlfs.errors import InventoryError, StateStoreError
from amlfs.fleet import ClusterSelector, FleetPolicy, read_all
from amlfs.forms import STATE_DIR, AzureBlockName, EmulatorEndpoint, SshBlockName, StateDir
from amlfs.models import Cluster, Fleet, load_fleet, load_release
from amlfs.rollout import (
    Forecast,
    Rollout,
    RolloutBook,
    RolloutStrategy,
    approve,
    awaiting_approval,
    census_due,
    cluster_gate,
    forecast,
    forecast_lines,
    halt,
    load_strategy,
    new_rollout,
    stage_views,
)
from amlfs.runtime import Connections
from amlfs.saga import UpgradePolicy
from amlfs.schedule import windows_opening_in
from amlfs.store import open_store
from flows.cluster_upgrade import connection_settings
from flows.fleet_maintenance import (
    STOPPED,
    FleetParams,
    _prediction,
    current_release,
    fleet_maintenance,
    with_journal,
)
from flows.rollout_view import publish_forecast
from tasks.cluster import ROLLED_BACK, settled

__all__ = [
    "APPROVAL_DEPLOYMENT",
    "ApprovalParams",
    "RolloutStartParams",
    "RolloutTickParams",
    "StageApproval",
    "rollout_approval",
    "rollout_start",
    "rollout_tick",
]

#: The deployment a tick starts when a stage waits for an operator's approval.
APPROVAL_DEPLOYMENT = "rollout-approval/amlfs-rollout-approval"


class RolloutStartParams(BaseModel):
    """Start a release's rollout across the fleet (a typed form in the Prefect UI)."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)
    name: str = Field(description="Rollout name, e.g. 2.15.6-2026w49 (unique)")
    fleet_file: str = Field(description="Fleet inventory YAML")
    release_file: str = Field(description="Release YAML")
    strategy: RolloutStrategy | None = Field(
        default=None, description="Stages, soak, thresholds, approvals, budget, deadline"
    )
    strategy_file: str | None = Field(default=None, description="Or: a strategy YAML file")
    selector: ClusterSelector = Field(
        default=ClusterSelector(), description="Which clusters (empty: the whole fleet)"
    )
    hotfix_reason: str | None = Field(
        default=None, description="A hotfix rollout: why (needed to skip soak or approvals)"
    )
    skip_soak: bool = False
    skip_approvals: bool = False
    started_by: str = Field(default="", description="Who starts it (recorded)")
    at: dt.datetime | None = Field(default=None, description="Start as of (rehearsals)")
    state_dir: StateDir = STATE_DIR

    @model_validator(mode="after")
    def _check(self) -> RolloutStartParams:
        if (self.strategy is None) == (self.strategy_file is None):
            raise ValueError("give the strategy or a strategy_file, one of them")
        if (self.skip_soak or self.skip_approvals) and not (self.hotfix_reason or "").strip():
            raise ValueError("skipping soak or approvals is for a hotfix: give hotfix_reason")
        if self.at is not None and self.at.tzinfo is None:
            raise ValueError("at must carry a timezone (UTC)")
        return self


@dataclass(frozen=True)
class Started:
    """A rollout just started, with what its forecast needs."""

    book: RolloutBook
    rollout: Rollout
    fleet: Fleet
    now: dt.datetime
    upgrade: dt.timedelta  # the predicted duration of one cluster's upgrade

    def forecast(self, state_dir: str) -> Forecast:
        return forecast(
            self.rollout, self.fleet, self.now, upgrade=self.upgrade, state_dir=state_dir
        )


def start_rollout(params: RolloutStartParams, *, upgrade: UpgradePolicy | None = None) -> Started:
    """Create the rollout's record (refused if the name is taken): what the CLI and the flow
    both do."""
    fleet = load_fleet(params.fleet_file)
    release = load_release(params.release_file)
    strategy = params.strategy or load_strategy(str(params.strategy_file))
    now = params.at or dt.datetime.now(dt.UTC)
    rollout = new_rollout(
        params.name,
        fleet,
        release_version=release.version,
        release_file=params.release_file,
        fleet_file=params.fleet_file,
        strategy=strategy,
        now=now,
        selected=params.selector.matches,
        by=params.started_by,
        hotfix_reason=params.hotfix_reason,
        skip_soak=params.skip_soak,
        skip_approvals=params.skip_approvals,
    )
    book = RolloutBook(open_store(params.state_dir))
    book.create(rollout)
    prediction, _ = _prediction(upgrade or UpgradePolicy())
    return Started(book, rollout, fleet, now, prediction.upgrade)


@flow(name="rollout-start", persist_result=False)
def rollout_start(params: RolloutStartParams) -> dict[str, Any]:
    """Start a rollout; its forecast (and the clusters that cannot make the deadline, with
    the hotfix command that would) is logged and published as the artifact ``rollout-NAME``."""
    logger = get_run_logger()
    started = start_rollout(params)
    result = started.forecast(params.state_dir)
    for line in forecast_lines(result):
        logger.info("%s", line)
    publish_forecast(
        started.book,
        started.rollout,
        started.fleet,
        started.now,
        upgrade=started.upgrade,
        state_dir=params.state_dir,
    )
    return {
        "rollout": started.rollout.name,
        "members": len(started.rollout.members),
        "projected_done": result.projected_done.isoformat() if result.projected_done else None,
        "late": list(result.late),
        "hotfix_command": result.hotfix_command,
    }


class RolloutTickParams(BaseModel):
    """One tick of every active rollout (the schedule's form)."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)
    tick_minutes: int = Field(default=15, ge=1, le=1440)
    at: dt.datetime | None = Field(default=None, description="Tick as of (rehearsals)")
    policy: FleetPolicy = Field(
        default=FleetPolicy(), description="Caps of each run (the rollout sets its budget)"
    )
    upgrade: UpgradePolicy = UpgradePolicy()
    state_dir: StateDir = STATE_DIR
    census_per_tick: int = Field(
        default=50,
        ge=0,
        le=1000,
        description="Clusters whose release each tick reads for the compliance view (never "
        "read first, then the oldest reading; two ARM GETs each; 0: none)",
    )
    emulator_endpoint: EmulatorEndpoint = ""
    azure_block: AzureBlockName = "amlfs-azure"
    ssh_block: SshBlockName = "amlfs-ssh"

    @model_validator(mode="after")
    def _check(self) -> RolloutTickParams:
        if self.at is not None and self.at.tzinfo is None:
            raise ValueError("at must carry a timezone (UTC)")
        if self.policy.override_window:
            raise ValueError("a rollout tick never overrides windows (a hotfix run does)")
        return self


@flow(name="rollout-tick", persist_result=False)
def rollout_tick(params: RolloutTickParams) -> Any:
    """Advance each active rollout by one scheduled fleet run (a subflow named after the
    rollout and the tick). Failed when a rollout's run failed (a cluster needs attention),
    Failed named RolledBack when a cluster rolled back, Completed named Stopped when a
    rollout is halted or its run stopped before starting what it planned."""
    logger = get_run_logger()
    book = RolloutBook(open_store(params.state_dir))
    when = params.at or dt.datetime.now(dt.UTC)
    tick = when.replace(second=0, microsecond=0)
    tick -= dt.timedelta(minutes=tick.minute % params.tick_minutes)
    everything = book.all()
    active = [r for r in everything if r.state == "active"]
    if not active:
        logger.info("tick %s: no active rollout", tick.isoformat())
    outcomes: dict[str, Any] = {}
    failed: list[str] = []
    rolled_back: list[str] = []
    idle_rollouts: list[tuple[str, Fleet]] = []
    # A halted rollout advances no more, every tick, until resumed: each tick says so in its
    # message and state (Stopped), so a halt left behind is seen and not silently kept.
    stopped: list[str] = []
    for rollout in (r for r in everything if r.state == "halted"):
        stopped.append(rollout.name)
        why = rollout.state_reason or "halted"
        outcomes[rollout.name] = {
            "state": STOPPED,
            "message": f"halted ({why}); `amlfs rollout resume {rollout.name}` resumes it",
        }
        logger.warning("rollout %s: %s", rollout.name, outcomes[rollout.name]["message"])
    for rollout in active:
        try:
            fleet = load_fleet(rollout.fleet_file)
            idle = _idle(book, rollout, fleet, tick, when, params.tick_minutes)
        except InventoryError as err:  # its fleet file changed or went away: say so, go on
            logger.error("rollout %s: %s", rollout.name, err)
            failed.append(rollout.name)
            continue
        if idle is not None:
            # No fleet run: it would start nothing, and its artifacts would hide the last
            # real results. The forecast may still have moved (a soak ended).
            logger.info("rollout %s: %s", rollout.name, idle)
            outcomes[rollout.name] = {"state": "Skipped", "message": idle}
            idle_rollouts.append((rollout.name, fleet))  # its forecast: after the census
            continue
        run = FleetParams(
            fleet_file=rollout.fleet_file,
            release_file=rollout.release_file,
            mode="scheduled",
            rollout=rollout.name,
            policy=params.policy,
            upgrade=params.upgrade,
            tick_minutes=params.tick_minutes,
            at=when,
            run_name=f"{rollout.name}-{tick:%Y%m%dT%H%M}",
            state_dir=params.state_dir,
            emulator_endpoint=params.emulator_endpoint,
            azure_block=params.azure_block,
            ssh_block=params.ssh_block,
        )
        try:
            state = fleet_maintenance.with_options(flow_run_name=run.run_name)(
                run, return_state=True
            )
        except InventoryError as err:  # its files changed or went away: say so, go on
            logger.error("rollout %s: %s", rollout.name, err)
            failed.append(rollout.name)
            continue
        outcomes[rollout.name] = {"state": state.name, "message": state.message}
        if not settled(state):
            failed.append(rollout.name)
        elif state.is_failed():
            rolled_back.append(rollout.name)
        elif state.name == STOPPED:
            stopped.append(rollout.name)
        logger.info("rollout %s: %s: %s", rollout.name, state.name, state.message)
        _ask_for_approvals(book, rollout.name, when, params.state_dir, logger)
    # The census after the fleet runs (a view never delays the work of a window), before
    # the forecasts of the rollouts that had no run (theirs say what it found).
    _census(book, everything, params, when, logger)
    prediction, _ = _prediction(params.upgrade)
    for name, fleet in idle_rollouts:
        try:
            publish_forecast(
                book,
                book.get(name),
                fleet,
                when,
                upgrade=prediction.upgrade,
                state_dir=params.state_dir,
            )
        except (InventoryError, StateStoreError) as err:  # a view: the tick goes on
            logger.warning("rollout %s: cannot publish its forecast: %s", name, err)
    message = (
        "; ".join(f"{name}: {o['message']}" for name, o in outcomes.items()) or "no active rollout"
    )
    if failed:
        return Failed(message=f"{', '.join(failed)} failed: {message}", data=outcomes)
    if rolled_back:
        return Failed(name=ROLLED_BACK, message=message, data=outcomes)
    if stopped:
        return Completed(name=STOPPED, message=message, data=outcomes)
    return Completed(message=message, data=outcomes)


#: A cluster's release read within this long is not read again by the census.
CENSUS_FRESH_FOR = dt.timedelta(hours=24)


def _census(
    book: RolloutBook,
    rollouts: list[Rollout],
    params: RolloutTickParams,
    when: dt.datetime,
    logger: Any,
) -> None:
    """Read the release of a few clusters of the rollouts' fleets (``census_per_tick``:
    never read first, then the oldest reading), so that compliance counts every cluster,
    not only those a run has read. ARM reads only, after the tick's fleet runs; a view, so
    nothing in it fails the tick (each problem is logged)."""
    if params.census_per_tick == 0 or not rollouts:
        return
    try:
        _read_releases(book, rollouts, params, when, logger)
    except Exception as err:  # a view: logged, the tick's own state stands
        logger.warning("census: stopped: %s: %s", type(err).__name__, err)


def _read_releases(
    book: RolloutBook,
    rollouts: list[Rollout],
    params: RolloutTickParams,
    when: dt.datetime,
    logger: Any,
) -> None:
    fleets: dict[str, Fleet] = {}
    for rollout in rollouts:
        if rollout.state == "aborted" or rollout.fleet_file in fleets:
            continue
        try:  # one rollout's fleet file gone (an old one) leaves the others' census alone
            fleets[rollout.fleet_file] = load_fleet(rollout.fleet_file)
        except InventoryError as err:
            logger.warning("census: rollout %s: %s", rollout.name, err)
    releases = book.releases()
    due: dict[str, Cluster] = {}
    for fleet in fleets.values():
        names = census_due(
            fleet,
            releases,
            when,
            batch=params.census_per_tick - len(due),
            fresh_for=CENSUS_FRESH_FOR,
        )
        due |= {n: fleet.cluster(n) for n in names if n not in due}
    if not due:
        return
    connections = Connections.create(
        *connection_settings(params.emulator_endpoint, params.azure_block, params.ssh_block)
    )
    try:
        found = read_all(list(due.values()), lambda c: current_release(connections, c), workers=8)
    finally:
        connections.close()
    for name, release in found.items():
        if release is None:
            continue
        try:
            book.saw(name, release, when)
        except StateStoreError as err:
            logger.warning("census: %s: cannot record its release: %s", name, err)
    unread = sorted(n for n, r in found.items() if r is None)
    logger.info(
        "census: read the release of %d clusters%s",
        len(found) - len(unread),
        f" ({len(unread)} could not be read: {', '.join(unread[:5])})" if unread else "",
    )


def _idle(
    book: RolloutBook,
    rollout: Rollout,
    fleet: Fleet,
    tick: dt.datetime,
    when: dt.datetime,
    minutes: int,
) -> str | None:
    """Why this tick starts nothing for ``rollout`` (no member's window opens in an open
    stage, and no member was left half-way), or None when it has work."""
    if any(n in rollout.members for n in with_journal(fleet, book.store)):
        return None
    opening = [
        o.cluster
        for o in windows_opening_in(fleet, tick, tick + dt.timedelta(minutes=minutes))
        if o.cluster in rollout.members
    ]
    views = stage_views(rollout, when)
    if any(cluster_gate(rollout, views, cluster)[0] for cluster in opening):
        return None
    if not opening:
        return "no window of its clusters opens in this tick"
    return f"nothing to start: {len(opening)} windows open, their stages closed"


def _ask_for_approvals(
    book: RolloutBook, name: str, now: dt.datetime, state_dir: str, logger: Any
) -> None:
    """Start one ``rollout-approval`` run (a paused run with a form in the UI) per stage
    that waits only for its approval; without that deployment, say how to approve."""
    rollout = book.get(name)
    for stage in awaiting_approval(rollout, now):
        try:
            run = run_deployment(
                APPROVAL_DEPLOYMENT,
                parameters={
                    "params": ApprovalParams(
                        rollout=name, stage=stage, state_dir=state_dir
                    ).model_dump(mode="json")
                },
                timeout=0,
                flow_run_name=f"approve-{name}-{stage}",
            )
        except ObjectNotFound:
            logger.warning(
                "rollout %s: stage %s waits for approval: amlfs rollout approve %s --stage %s "
                "(or deploy %s for a form in the UI)",
                name,
                stage,
                name,
                stage,
                APPROVAL_DEPLOYMENT,
            )
            continue
        assert isinstance(run, FlowRun)
        book.change(name, _requested(stage, str(run.id)))
        logger.info("rollout %s: stage %s: approval asked in flow run %s", name, stage, run.id)


def _requested(stage: str, run_id: str) -> Callable[[Rollout], Rollout]:
    def change(rollout: Rollout) -> Rollout:
        requests = {**rollout.approval_requests, stage: run_id}
        return rollout.model_copy(update={"approval_requests": requests})

    return change


class StageApproval(RunInput):
    """The operator's answer (the form of the paused run in the Prefect UI)."""

    approve: bool = Field(description="Open the stage; false halts the rollout")
    by: str = Field(description="Who decides (recorded)")
    note: str = Field(default="", description="Why (recorded)")


class ApprovalParams(BaseModel):
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)
    rollout: str
    stage: str
    state_dir: StateDir = STATE_DIR
    timeout_hours: float = Field(default=72.0, gt=0, le=24 * 30)
    poll_s: int = Field(default=2, ge=1, le=600, description="How often it looks for the answer")


@flow(name="rollout-approval", persist_result=False)
def rollout_approval(params: ApprovalParams) -> Any:
    """Pause until an operator answers the form: approve opens the stage, a refusal halts
    the rollout; either is recorded with who and why. Already approved: nothing to ask."""
    logger = get_run_logger()
    book = RolloutBook(open_store(params.state_dir))
    rollout = book.get(params.rollout)
    if params.stage in rollout.approvals:
        given = rollout.approvals[params.stage]
        return Completed(message=f"stage {params.stage} was approved by {given.by}")
    now = dt.datetime.now(dt.UTC)
    fleet = load_fleet(rollout.fleet_file)
    prediction, _ = _prediction(UpgradePolicy())
    for line in forecast_lines(forecast(rollout, fleet, now, upgrade=prediction.upgrade)):
        logger.info("%s", line)
    logger.info(
        "rollout %s: stage %s waits for approval: answer the form (Resume) in the UI",
        params.rollout,
        params.stage,
    )
    answer = pause_flow_run(
        wait_for_input=StageApproval.with_initial_data(
            description=f"Open stage {params.stage} of rollout {params.rollout}?",
            approve=True,
            by="",
        ),
        timeout=int(params.timeout_hours * 3600),
        poll_interval=params.poll_s,
        key=f"approve-{params.stage}",
    )
    when = dt.datetime.now(dt.UTC)
    if answer.approve:
        book.change(
            params.rollout,
            lambda r: approve(r, params.stage, at=when, by=answer.by, note=answer.note),
        )
        message = f"stage {params.stage} approved by {answer.by}"
    else:
        book.change(
            params.rollout,
            lambda r: halt(
                r,
                at=when,
                by=answer.by,
                reason=f"stage {params.stage} not approved: {answer.note or 'no reason given'}",
            ),
        )
        message = f"stage {params.stage} refused by {answer.by}: rollout halted"
    logger.info("rollout %s: %s", params.rollout, message)
    return Completed(message=message)
