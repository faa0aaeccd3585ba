"""``amlfs``: the operator's command line. Today: check an inventory (and a release) offline.

What it prints that came from outside (fleet and release files, options, the state store,
node output, error messages quoting any of these) goes to Rich as ``Text``, never as a markup
string: a name or reason with ``[/]`` in it would crash the print (MarkupError) and ``[bold]``
would vanish into styling. Markup is only ever in this module's own literals.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table
from rich.text import Text

from amlfs.errors import InventoryError, StateStoreError, validation_problems
from amlfs.fleet import SUCCEEDED, FleetPolicy
from amlfs.models import load_fleet, load_release
from amlfs.store import without_password
from amlfs_cli.rollout import rollout_app

app = typer.Typer(help="AMLFS fleet maintenance.", no_args_is_help=True, add_completion=False)
app.add_typer(rollout_app, name="rollout")


def _describe(err: BaseException) -> str:
    """An error as the operator reads it. pydantic's own text spans several lines and quotes
    each input value; here each problem is ``field: message`` on one line, joined by ``; ``."""
    if not isinstance(err, ValidationError):
        return str(err)
    problems = validation_problems(err)
    return f"invalid {err.title}: " + "; ".join(problems)


def _error(label: str, err: BaseException | str) -> None:
    """``label: message`` on stderr, the message as text. Never wrapped: in a pipe Rich's width
    is 80 columns and it would cut one error into several lines (``soft_wrap``)."""
    message = err if isinstance(err, str) else _describe(err)
    Console(stderr=True, soft_wrap=True, highlight=False).print(
        Text.assemble((f"{label}:", "red"), " ", message)
    )


def _stdout() -> Console:
    """The console of results: a line is never cut in two (a pipe is 80 columns wide to Rich);
    tables still fit the width."""
    return Console(soft_wrap=True)


def _cells(*values: object) -> list[Text]:
    """Table cells from values, as text."""
    return [value if isinstance(value, Text) else Text(str(value)) for value in values]


def _progress(console: Console) -> Progress:
    """The run-fleet progress bar: the run name and the last cluster's result, as text."""
    return Progress(
        TextColumn("{task.description}", style="bold", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[last]}", markup=False),
        console=console,
    )


@app.callback()
def main() -> None:
    """AMLFS fleet maintenance by OS disk swap."""


@app.command()
def validate(
    fleet: Annotated[Path, typer.Argument(help="Fleet inventory YAML")],
    release: Annotated[Path | None, typer.Option(help="Release YAML to check too")] = None,
) -> None:
    """Validate a fleet file (and a release) without touching Azure; exit 2 naming each problem."""
    console = _stdout()
    try:
        parsed = load_fleet(fleet)
        parsed_release = load_release(release) if release else None
    except InventoryError as err:
        _error("error", err)
        raise typer.Exit(2) from err
    table = Table(title=Text(f"{fleet}: {len(parsed.clusters)} clusters"))
    for column in ("cluster", "region", "wave", "window (UTC)", "nodes"):
        table.add_column(column)
    for cluster in parsed.clusters:
        roles = Counter(n.role.value for n in cluster.nodes)
        window = cluster.window
        table.add_row(
            *_cells(
                cluster.name,
                cluster.region,
                cluster.wave,
                f"{window.day_of_week.value} {window.start_utc} +{window.duration_min}m",
                " ".join(f"{role}x{count}" for role, count in roles.items()),
            )
        )
    console.print(table)
    if parsed_release is not None:
        console.print(Text(f"release {parsed_release.version}: {parsed_release.image_id}"))


def _print_result(console: Console, result: dict[str, object]) -> None:
    outcome = str(result["outcome"])
    colour = {"upgraded": "green", "rolled_back": "yellow", "already_current": "cyan"}.get(
        outcome, "red"
    )
    console.print(
        Text.assemble(
            (str(result["cluster"]), "bold"),
            ": ",
            (outcome, colour),
            f" {result['release_before']} -> {result['release_after']}",
            f"  reason: {result['reason']}" if result.get("reason") else "",
        )
    )
    table = Table(title="steps (sim seconds)")
    for column in ("step", "status", "seconds"):
        table.add_column(column)
    for step in result["steps"]:  # type: ignore[attr-defined]
        table.add_row(
            *_cells(step["name"], step["status"], f"{step['ended_s'] - step['started_s']:.1f}")
        )
    console.print(table)
    console.print(
        Text(f"downtime as the orchestrator saw it: {result['downtime_observed_s']:.0f} s")
    )
    if result.get("evictions") is not None:
        changes, leaked, unread = (
            result.get(key) for key in ("data_disk_changes", "leaked_disks", "unread")
        )
        changes_list = [str(c) for c in changes] if isinstance(changes, list) else None
        leaked_list = [str(d) for d in leaked] if isinstance(leaked, list) else []
        console.print(
            Text(
                f"what the run left, read back: evictions {result['evictions']}, data-disk "
                f"changes {'?' if changes_list is None else len(changes_list)}, leaked disks "
                f"{len(leaked_list)}"
            )
        )
        unread_list = [f"not read: {u}" for u in unread] if isinstance(unread, list) else []
        for line in [*(changes_list or []), *leaked_list, *unread_list]:
            console.print(Text(f"  {line}"))


@app.command("upgrade-cluster")
def upgrade_cluster(
    fleet: Annotated[Path, typer.Option(help="Fleet inventory YAML")],
    cluster: Annotated[str, typer.Option(help="Cluster name")],
    release: Annotated[Path, typer.Option(help="Release YAML")],
    endpoint: Annotated[
        Path | None, typer.Option(help="amlfs-sim endpoint.json (else the saved Blocks)")
    ] = None,
    state_dir: Annotated[
        str, typer.Option(help="Durable state store: a directory, or a postgresql:// URL")
    ] = ".amlfs-state",
    budget_min: Annotated[float, typer.Option(help="Customer downtime budget")] = 30.0,
    keep_old_disks_days: Annotated[int, typer.Option(help="Keep old OS disks N days")] = 0,
) -> None:
    """Upgrade one cluster now (the cluster-upgrade flow), print its result and downtime."""
    import os

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from amlfs.saga import UpgradePolicy
    from flows.cluster_upgrade import ClusterUpgradeParams, cluster_upgrade

    console = _stdout()
    try:
        parsed = load_fleet(fleet)
        parsed.cluster(cluster)
        load_release(release)
        params = ClusterUpgradeParams(
            fleet_file=str(fleet),
            cluster=cluster,
            release_file=str(release),
            policy=UpgradePolicy(
                downtime_budget_s=budget_min * 60, keep_old_disks_days=keep_old_disks_days
            ),
            state_dir=state_dir,
            emulator_endpoint=str(endpoint) if endpoint else "",
        )
    except (InventoryError, ValueError, KeyError) as err:
        _error("error", err)
        raise typer.Exit(2) from err
    # SIGTERM (a Prefect cancel, a kill) aborts it: the flow takes it in this main thread.
    state = cluster_upgrade(params, return_state=True)
    result = state.result(raise_on_failure=False)
    if not isinstance(result, dict):
        _error("cluster upgrade failed", str(result))
        raise typer.Exit(1)
    _print_result(console, result)
    if state.is_cancelled():
        console.print(Text(f"flow run {state.name}: {state.message}"))
    if result["outcome"] not in SUCCEEDED:
        raise typer.Exit(1)


@app.command()
def plan(
    fleet: Annotated[Path, typer.Option(help="Fleet inventory YAML")],
    release: Annotated[Path, typer.Option(help="Release YAML")],
    endpoint: Annotated[
        Path | None, typer.Option(help="amlfs-sim endpoint.json (else Azure, default credential)")
    ] = None,
    at: Annotated[
        str | None, typer.Option(help="Evaluate windows at this UTC instant (ISO 8601)")
    ] = None,
    cluster: Annotated[list[str] | None, typer.Option(help="Only these clusters")] = None,
    override_window: Annotated[bool, typer.Option(help="Hotfix: ignore windows")] = False,
    reason: Annotated[str | None, typer.Option(help="Why (with --override-window)")] = None,
    state_dir: Annotated[
        str,
        typer.Option(
            help="Durable state store (journals of interrupted runs): a directory, "
            "or a postgresql:// URL"
        ),
    ] = ".amlfs-state",
) -> None:
    """Dry run: per cluster its window, wave, current release, whether it would run and why.

    Reads Azure (each VM and its OS disk) and the journals, and changes nothing. A cluster
    an earlier run left half-way shows as "interrupted: resuming (what was found)".
    """
    import datetime as dt

    from amlfs.fleet import ClusterSelector, plan_fleet
    from amlfs.runtime import AzureSettings, Connections, SshSettings, from_endpoint
    from amlfs.saga import UpgradePolicy
    from amlfs.schedule import Prediction
    from amlfs.store import open_store

    console = _stdout()
    try:
        parsed = load_fleet(fleet)
        parsed_release = load_release(release)
        now = dt.datetime.fromisoformat(at) if at else dt.datetime.now(dt.UTC)
        if now.tzinfo is None:
            raise InventoryError(f"--at {at!r} needs a timezone, e.g. {at}+00:00")
        policy = FleetPolicy(override_window=override_window, reason=reason)
        if endpoint is not None:
            azure, ssh = from_endpoint(endpoint)
        else:
            azure = AzureSettings()
            ssh = SshSettings(username="-", private_key="-", known_hosts="-")
    except (InventoryError, ValueError) as err:
        _error("error", err)
        raise typer.Exit(2) from err
    predictions = UpgradePolicy().predictions
    prediction = Prediction(
        dt.timedelta(seconds=210 + predictions.downtime_s),
        dt.timedelta(seconds=predictions.rollback_s),
    )
    connections = Connections.create(azure, ssh)
    selector = ClusterSelector(names=cluster or [])

    try:
        from flows.fleet_maintenance import read_fleet

        readings = read_fleet(
            connections,
            [c for c in parsed.clusters if selector.matches(c)],
            parsed_release,
            open_store(without_password(state_dir)),
        )
        rows = plan_fleet(
            parsed,
            parsed_release,
            selector,
            policy,
            now,
            prediction,
            predictions.downtime_s,
            current_release=lambda c: readings[c.name].release,
            interrupted=lambda c: readings[c.name].interrupted,
        )
    except (InventoryError, StateStoreError, ValueError) as err:
        _error("error", err)
        raise typer.Exit(2) from err
    finally:
        connections.close()
    table = Table(
        title=Text(f"plan for {parsed_release.version} as of {now:%a %Y-%m-%d %H:%M} UTC")
    )
    for column in ("cluster", "wave", "window", "current", "runs", "predicted downtime", "why"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            *_cells(
                row.cluster,
                row.wave,
                row.window.split(": ", 1)[-1],
                row.current_release or "?",
                Text("yes", style="green") if row.run else "no",
                f"{row.predicted_downtime_s / 60:.1f} min" if row.run else "",
                row.reason,
            )
        )
    console.print(table)


@app.command()
def status(
    run_name: Annotated[str | None, typer.Argument(help="Fleet run name (default: all)")] = None,
    state_dir: Annotated[
        str, typer.Option(help="Durable state store: a directory, or a postgresql:// URL")
    ] = ".amlfs-state",
) -> None:
    """Show a running or finished fleet run from the state store (updated per cluster)."""
    from amlfs.store import open_store

    try:
        store = open_store(without_password(state_dir))
        names = [run_name] if run_name else store.names("fleet-runs")
        records = {name: store.get("fleet-runs", name) for name in names}
    except (StateStoreError, ValueError) as err:
        _error("error", err)
        raise typer.Exit(2) from err
    if not names:
        _error("error", f"no fleet run recorded in {store}")
        raise typer.Exit(1)
    console = _stdout()
    for name in names:
        record = records[name]
        if record is None:
            _error("error", f"no fleet run named {name!r} in {store}")
            raise typer.Exit(1)
        table = Table(title=Text(f"fleet run {name}: {record.get('counts', {})}"))
        columns = ("cluster", "wave", "result", "release", "downtime", "evictions", "reason")
        for column in columns:
            table.add_column(column)
        for cluster, result in record["results"].items():
            evictions = result.get("evictions")
            table.add_row(
                *_cells(
                    cluster,
                    result.get("wave", ""),
                    result["outcome"],
                    f"{result.get('release_before', '')} -> {result.get('release_after', '')}",
                    f"{result.get('downtime_observed_s', 0):.0f} s",
                    "" if evictions is None else str(evictions),
                    result.get("reason", ""),
                )
            )
        for cluster, reason in record.get("not_started", {}).items():
            table.add_row(*_cells(cluster, "", "not started", "", "", "", reason))
        console.print(table)
        if record.get("stopped"):
            console.print(Text(f"stopped admitting: {record['stopped']}"))


@app.command()
def control(
    action: Annotated[str, typer.Argument(help="run | halt | abort")],
) -> None:
    """Steer running fleet runs via the Prefect Variable they read between admissions.

    halt: admit no more clusters, let in-flight ones finish; abort: also roll back in-flight
    clusters; run: back to normal. Resume a stopped run by starting it again with the same
    run_name.
    """
    if action not in ("run", "halt", "abort"):
        _error("error", f"action must be run, halt or abort: {action!r}")
        raise typer.Exit(2)
    from prefect.variables import Variable

    from flows.fleet_maintenance import CONTROL_VARIABLE

    Variable.set(CONTROL_VARIABLE, action, overwrite=True)
    _stdout().print(Text(f"{CONTROL_VARIABLE} = {action}"))


#: The fleet policy's defaults, for the options that set it.
_POLICY = FleetPolicy().model_dump()


@app.command("run-fleet")
def run_fleet(
    fleet: Annotated[Path, typer.Option(help="Fleet inventory YAML")],
    release: Annotated[Path, typer.Option(help="Release YAML")],
    endpoint: Annotated[
        Path | None, typer.Option(help="amlfs-sim endpoint.json (else the saved Blocks)")
    ] = None,
    run_name: Annotated[str, typer.Option(help="Same name again: resume that run")] = "cli",
    cluster: Annotated[list[str] | None, typer.Option(help="Only these clusters")] = None,
    hotfix_reason: Annotated[
        str | None, typer.Option(help="Hotfix now, outside windows, for this reason")
    ] = None,
    at: Annotated[str | None, typer.Option(help="Evaluate windows at (ISO 8601, UTC)")] = None,
    dry_run: Annotated[bool, typer.Option(help="Plan only")] = False,
    max_parallel: Annotated[int, typer.Option(help="Clusters in flight")] = _POLICY["max_parallel"],
    max_per_subscription: Annotated[
        int, typer.Option(help="Clusters in flight per subscription")
    ] = _POLICY["max_per_subscription"],
    max_per_region: Annotated[int, typer.Option(help="Clusters in flight per region")] = _POLICY[
        "max_per_region"
    ],
    admit_every: Annotated[
        float, typer.Option(help="Start at most one cluster per this many seconds (0: no ramp)")
    ] = _POLICY["admit_every_s"],
    error_budget: Annotated[
        str, typer.Option(help="Failed clusters tolerated: a count or a percentage like 10%")
    ] = str(_POLICY["error_budget"]),
    bake: Annotated[
        float, typer.Option(help="Seconds (sim) to wait after a wave before the next")
    ] = _POLICY["bake_s"],
    state_dir: Annotated[
        str, typer.Option(help="Durable state store: a directory, or a postgresql:// URL")
    ] = ".amlfs-state",
    cluster_deployment: Annotated[
        str | None,
        typer.Option(help="Scale-out: each cluster as a run of this deployment on workers"),
    ] = None,
    dead_run_after: Annotated[
        float, typer.Option(help="Scale-out: seconds of heartbeat silence = dead worker")
    ] = 30.0,
    processes: Annotated[
        int, typer.Option(help="Orchestrator processes on this machine running the clusters")
    ] = 1,
    task_workers: Annotated[
        bool,
        typer.Option(
            help="Scale-out: each cluster as a task run served by `amlfs task-worker` processes "
            "sharing --state-dir"
        ),
    ] = False,
) -> None:
    """Run the fleet-maintenance flow from here, with a live progress bar.

    Exits 0 when the run completed (every cluster upgraded, already current or rolled back
    and serving), 1 when a cluster needs attention or the run was cancelled or failed.
    SIGTERM is a cancel: the clusters in flight roll back (or finish past the point of no
    return) and are recorded; run the same command again to resume what is left.
    """
    import datetime as dt
    import os
    import signal
    import threading

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from amlfs.fleet import ClusterSelector
    from amlfs.store import open_store
    from flows.cluster_upgrade import on_sigterm
    from flows.fleet_maintenance import FleetParams, fleet_maintenance

    try:
        parsed = load_fleet(fleet)
        params = FleetParams(
            fleet_file=str(fleet),
            release_file=str(release),
            mode="hotfix" if hotfix_reason else "manual",
            selector=ClusterSelector(names=cluster or []),
            policy=FleetPolicy(
                max_parallel=max_parallel,
                max_per_subscription=max_per_subscription,
                max_per_region=max_per_region,
                admit_every_s=admit_every,
                error_budget=int(error_budget) if error_budget.strip().isdigit() else error_budget,
                bake_s=bake,
                override_window=bool(hotfix_reason),
                reason=hotfix_reason,
            ),
            dry_run=dry_run,
            at=dt.datetime.fromisoformat(at) if at else None,
            run_name=run_name,
            state_dir=state_dir,
            emulator_endpoint=str(endpoint) if endpoint else "",
            cluster_deployment=cluster_deployment,
            dead_run_after_s=dead_run_after,
            processes=processes,
            task_workers=task_workers,
        )
    except (InventoryError, ValueError) as err:
        _error("error", err)
        raise typer.Exit(2) from err
    selected = [c.name for c in parsed.clusters if not cluster or c.name in cluster]
    outcome: dict[str, object] = {}

    def work() -> None:
        try:
            state = fleet_maintenance(params, return_state=True)
            outcome["state"] = state
            outcome["summary"] = state.result(raise_on_failure=False)
        except Exception as err:  # shown below; the flow run records it too
            outcome["error"] = err

    # The flow runs in a thread: SIGTERM is taken here, in the main thread, and handed to it.
    signal.signal(signal.SIGTERM, on_sigterm)
    thread = threading.Thread(target=work, name="fleet-run", daemon=True)
    thread.start()
    store = open_store(state_dir)
    console = _stdout()
    # Its own console: a live display redraws by counting lines, so it must crop, not overflow.
    with _progress(Console()) as progress:
        task = progress.add_task(f"fleet run {run_name}", total=len(selected), last="")
        while thread.is_alive():
            thread.join(0.5)
            try:
                record = store.get("fleet-runs", run_name) or {}
            except StateStoreError:
                continue  # the bar waits; the run itself retries or reports

            results = record.get("results", {})
            last = next(reversed(results.items()), None) if results else None
            progress.update(
                task,
                # The record also keeps what earlier runs of this name did elsewhere.
                completed=sum(
                    1 for n in {*results, *record.get("not_started", {})} if n in selected
                ),
                last=f"{last[0]}: {last[1]['outcome']}" if last else "",
            )
    summary = outcome.get("summary")
    if "error" in outcome or not isinstance(summary, dict):
        failure = outcome.get("error", summary)
        _error("fleet run failed", failure if isinstance(failure, BaseException) else str(failure))
        raise typer.Exit(1)
    if dry_run:
        for row in summary["plan"]:
            console.print(
                Text(f"{row['cluster']}: {'run' if row['run'] else 'no'} ({row['reason']})")
            )
        return
    status(run_name, state_dir)
    from prefect.client.schemas.objects import State

    state = outcome["state"]
    assert isinstance(state, State)
    console.print(Text(f"fleet run {run_name}: {state.name}: {state.message}"))
    from tasks.cluster import settled

    if not settled(state):
        raise typer.Exit(1)


@app.command("task-worker")
def task_worker(
    state_dir: Annotated[
        str,
        typer.Option(help="The fleet runs' state store: a directory, or a postgresql:// URL"),
    ] = ".amlfs-state",
    limit: Annotated[int, typer.Option(min=1, help="Clusters this process runs at once")] = 130,
    share: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="This process's share of every rate (polls, node checks, each "
            "subscription's ARM budget): 1/N with N workers of one principal",
        ),
    ] = 1.0,
) -> None:
    """Serve fleet runs' cluster jobs (Prefect task runs of `cluster-job`) until stopped.

    Needs PREFECT_API_URL (the server the fleet runs use) and, against real Azure, the
    amlfs-azure and amlfs-ssh Blocks; against the emulator, its endpoint file, named by
    each job. SIGTERM stops it gracefully.
    """
    import os

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.taskworkers import serve_task_workers

    if share <= 0:
        _error("error", "--share must be > 0")
        raise typer.Exit(2)
    try:
        serve_task_workers(without_password(state_dir), limit=limit, share=share)
    except (StateStoreError, ValueError) as err:
        _error("error", err)
        raise typer.Exit(2) from err


if __name__ == "__main__":
    app()
