"""``amlfs rollout ...``: start, follow and steer a release's rollout across weekly windows.

Every command reads and writes the rollout's record in the state store (``--state-dir``),
the same record the ``rollout-tick`` flow advances. Only ``tick`` runs a Prefect flow.
"""

from __future__ import annotations

import datetime as dt
import getpass
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from amlfs.errors import InventoryError, StateStoreError
from amlfs.models import load_fleet
from amlfs.rollout import (
    RolloutBook,
    abort,
    approve,
    compliance,
    forecast,
    forecast_lines,
    halt,
    resume,
)
from amlfs.store import open_store, without_password

rollout_app = typer.Typer(
    help="Release rollouts: stages, soak, approvals, budget and deadline, over weeks.",
    no_args_is_help=True,
)

StateDir = Annotated[
    str, typer.Option(help="Durable state store: a directory, or a postgresql:// URL")
]
At = Annotated[str | None, typer.Option(help="As of this UTC instant (ISO 8601; rehearsals)")]
By = Annotated[str, typer.Option(help="Who does it (recorded; default: the login name)")]


def _console(stderr: bool = False) -> Console:
    return Console(stderr=stderr, soft_wrap=True, highlight=False)


def _fail(err: BaseException | str, code: int = 2) -> typer.Exit:
    _console(stderr=True).print(Text.assemble(("error:", "red"), " ", str(err)))
    return typer.Exit(code)


def _when(at: str | None) -> dt.datetime:
    if at is None:
        return dt.datetime.now(dt.UTC)
    try:
        value = dt.datetime.fromisoformat(at)
    except ValueError:
        raise _fail(f"--at {at!r} is not an ISO 8601 instant") from None
    if value.tzinfo is None:
        raise _fail(f"--at {at!r} has no timezone: add Z or +00:00")
    return value.astimezone(dt.UTC)


def _who(by: str) -> str:
    if by:
        return by
    try:
        return getpass.getuser()
    except OSError:
        return "unknown"


def _book(state_dir: str) -> RolloutBook:
    try:
        return RolloutBook(open_store(without_password(state_dir)))
    except (StateStoreError, ValueError) as err:
        raise _fail(err) from err


@rollout_app.command("start")
def start_command(
    name: Annotated[str, typer.Argument(help="Rollout name (unique), e.g. 2.15.6-w49")],
    fleet: Annotated[Path, typer.Option(help="Fleet inventory YAML")],
    release: Annotated[Path, typer.Option(help="Release YAML")],
    strategy: Annotated[Path, typer.Option(help="Strategy YAML: stages, soak, budget...")],
    cluster: Annotated[list[str] | None, typer.Option(help="Only these clusters")] = None,
    wave: Annotated[list[str] | None, typer.Option(help="Only these waves")] = None,
    hotfix_reason: Annotated[
        str | None, typer.Option(help="A hotfix rollout: why (recorded)")
    ] = None,
    skip_soak: Annotated[bool, typer.Option(help="Hotfix: no soak between stages")] = False,
    skip_approvals: Annotated[bool, typer.Option(help="Hotfix: no approvals")] = False,
    by: By = "",
    at: At = None,
    state_dir: StateDir = ".amlfs-state",
) -> None:
    """Start a rollout: prints its forecast, and the clusters that cannot make the deadline
    with the hotfix command that would put them on the release now."""
    from amlfs.fleet import ClusterSelector
    from flows.rollouts import RolloutStartParams, start_rollout

    try:
        params = RolloutStartParams(
            name=name,
            fleet_file=str(fleet),
            release_file=str(release),
            strategy_file=str(strategy),
            selector=ClusterSelector(names=cluster or [], waves=wave or []),
            hotfix_reason=hotfix_reason,
            skip_soak=skip_soak,
            skip_approvals=skip_approvals,
            started_by=_who(by),
            at=_when(at),
            state_dir=without_password(state_dir),
        )
        started = start_rollout(params)
    except (InventoryError, StateStoreError, ValueError) as err:
        raise _fail(err) from err
    result = started.forecast(state_dir)
    console = _console()
    console.print(
        Text(f"started rollout {started.rollout.name}: {len(started.rollout.members)} clusters")
    )
    for line in forecast_lines(result):
        console.print(Text(line))


@rollout_app.command("status")
def status_command(
    name: Annotated[str | None, typer.Argument(help="Rollout (default: every rollout)")] = None,
    clusters: Annotated[bool, typer.Option(help="One line per cluster too")] = False,
    at: At = None,
    state_dir: StateDir = ".amlfs-state",
) -> None:
    """Each rollout's stages, projected dates, deadline, and the fleet's releases."""
    from amlfs.saga import UpgradePolicy
    from flows.fleet_maintenance import _prediction

    book = _book(state_dir)
    now = _when(at)
    try:
        rollouts = [book.get(name)] if name else book.all()
    except (InventoryError, StateStoreError) as err:
        raise _fail(err) from err
    if not rollouts:
        _console().print(Text("no rollout (amlfs rollout start ...)"))
        return
    upgrade = _prediction(UpgradePolicy())[0].upgrade
    console = _console()
    for rollout in rollouts:
        try:
            fleet = load_fleet(rollout.fleet_file)
        except InventoryError as err:
            raise _fail(f"rollout {rollout.name}: {err}") from err
        result = forecast(rollout, fleet, now, upgrade=upgrade, state_dir=state_dir)
        for line in forecast_lines(result):
            console.print(Text(line))
        if clusters:
            table = Table("cluster", "stage", "status", "last outcome", "next window", "late")
            for c in result.clusters:
                progress = rollout.clusters.get(c.cluster)
                table.add_row(
                    *[
                        Text(v)
                        for v in (
                            c.cluster,
                            c.stage,
                            c.status,
                            f"{progress.outcome} ({progress.reason[:60]})" if progress else "",
                            c.next_window.isoformat() if c.next_window else "",
                            "late" if c.late else "",
                        )
                    ]
                )
            console.print(table)
        for event in rollout.events[-5:]:
            console.print(
                Text(
                    f"  {event.at.isoformat()} {event.what}"
                    + (f" by {event.by}" if event.by else "")
                    + (f": {event.reason}" if event.reason else "")
                )
            )
    latest, since = book.latest()
    counts, rows = compliance(load_fleet(rollouts[-1].fleet_file), book.releases(), latest, since)
    console.print(
        Text(
            "fleet releases: "
            + ", ".join(f"{release}: {n}" for release, n in sorted(counts.items()))
        )
    )
    behind = [r for r in rows if r.behind_since is not None]
    if behind and latest:
        console.print(
            Text(
                f"{len(behind)} clusters behind {latest} since {min(r.behind_since for r in behind if r.behind_since).isoformat()}"
            )
        )


def _steer(state_dir: str, name: str, change: object) -> None:
    book = _book(state_dir)
    try:
        rollout = book.change(name, change)  # type: ignore[arg-type]
    except (InventoryError, StateStoreError) as err:
        raise _fail(err) from err
    last = rollout.events[-1] if rollout.events else None
    _console().print(
        Text(f"rollout {rollout.name}: {rollout.state}" + (f" ({last.what})" if last else ""))
    )


@rollout_app.command("halt")
def halt_command(
    name: Annotated[str, typer.Argument(help="Rollout")],
    reason: Annotated[str, typer.Option(help="Why (recorded)")],
    by: By = "",
    at: At = None,
    state_dir: StateDir = ".amlfs-state",
) -> None:
    """No cluster starts for this rollout until it is resumed (a run in flight stops
    admitting within a second)."""
    when, who = _when(at), _who(by)
    _steer(state_dir, name, lambda r: halt(r, at=when, by=who, reason=reason))


@rollout_app.command("resume")
def resume_command(
    name: Annotated[str, typer.Argument(help="Rollout")],
    reason: Annotated[str, typer.Option(help="Why (recorded)")] = "",
    retry_failed: Annotated[
        bool, typer.Option(help="Try the clusters that failed again in their next window")
    ] = False,
    by: By = "",
    at: At = None,
    state_dir: StateDir = ".amlfs-state",
) -> None:
    """Active again; the failures so far are forgiven by the error budget."""
    when, who = _when(at), _who(by)
    _steer(
        state_dir,
        name,
        lambda r: resume(r, at=when, by=who, reason=reason, retry_failed=retry_failed),
    )


@rollout_app.command("abort")
def abort_command(
    name: Annotated[str, typer.Argument(help="Rollout")],
    reason: Annotated[str, typer.Option(help="Why (recorded)")],
    by: By = "",
    at: At = None,
    state_dir: StateDir = ".amlfs-state",
) -> None:
    """End the rollout for good: clusters in flight roll back, no cluster starts again."""
    when, who = _when(at), _who(by)
    _steer(state_dir, name, lambda r: abort(r, at=when, by=who, reason=reason))


@rollout_app.command("approve")
def approve_command(
    name: Annotated[str, typer.Argument(help="Rollout")],
    stage: Annotated[str, typer.Option(help="The stage to open")],
    note: Annotated[str, typer.Option(help="A note (recorded)")] = "",
    by: By = "",
    at: At = None,
    state_dir: StateDir = ".amlfs-state",
) -> None:
    """Approve a stage that needs it (recorded with who and when)."""
    when, who = _when(at), _who(by)
    _steer(state_dir, name, lambda r: approve(r, stage, at=when, by=who, note=note))


@rollout_app.command("tick")
def tick_command(
    endpoint: Annotated[
        Path | None, typer.Option(help="amlfs-sim endpoint.json (else the saved Blocks)")
    ] = None,
    at: At = None,
    state_dir: StateDir = ".amlfs-state",
) -> None:
    """Run one tick of every active rollout now (what the ``amlfs-rollout-tick`` deployment
    does every 15 minutes). Exits 1 when a rollout's run failed."""
    import os

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.rollouts import RolloutTickParams, rollout_tick

    try:
        params = RolloutTickParams(
            at=_when(at) if at else None,
            state_dir=without_password(state_dir),
            emulator_endpoint=str(endpoint) if endpoint else "",
        )
    except ValueError as err:
        raise _fail(err) from err
    from prefect.client.schemas.objects import State

    state = rollout_tick(params, return_state=True)
    assert isinstance(state, State)
    _console().print(Text(f"rollout tick: {state.name}: {state.message}"))
    from tasks.cluster import settled

    if not settled(state):
        raise typer.Exit(1)
