"""The job and the executor seam (``amlfs.jobs``): a job carries everything a cluster's run
needs, whichever executor runs it (this process or another one), and the outcome is typed."""

from __future__ import annotations

import datetime as dt
import pickle
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from amlfs.jobs import ClockAnchor, ClusterJob, ClusterOutcome, Executor, InProcessExecutor
from amlfs.runtime import Connections, from_endpoint
from amlfs.saga import UpgradePolicy
from amlfs.shards import ShardPool, ShardSpec
from amlfs.store import StateStore
from tests.conftest import REPO, Sim
from tests.test_fleet import RELEASE

# Two days ahead by the real clock: only the job's own clock can say it is about to close.
WINDOW_END = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(days=2)


def job_for(sim: Sim, anchor: ClockAnchor | None) -> ClusterJob:
    return ClusterJob(
        cluster=sim.cluster,
        release=RELEASE,
        policy=UpgradePolicy(),
        window_end=WINDOW_END,
        anchor=anchor,
        override_reason=None,
        wave="canary",
        fleet_run="w49",
    )


@pytest.mark.filterwarnings("error")  # a serializer warning is a field that may not come back
def test_a_job_is_frozen_and_survives_json_and_pickle(sim: Sim) -> None:
    anchor = ClockAnchor.start(WINDOW_END - dt.timedelta(hours=1), time_scale=20)
    job = job_for(sim, anchor).model_copy(
        update={"cluster": sim.world.fleet.cluster("lustre-weu-01")}  # it has a blackout date
    )
    assert job.cluster.blackout_dates
    assert ClusterJob.model_validate_json(job.model_dump_json()) == job
    assert ClusterJob.model_validate(job.model_dump(mode="json")) == job
    assert pickle.loads(pickle.dumps(job)) == job  # noqa: S301 (our own bytes)
    with pytest.raises(ValidationError):
        job.window_end = None  # type: ignore[misc]
    with pytest.raises(ValidationError, match="unknown"):
        ClusterJob.model_validate({**job.model_dump(), "unknown": 1})


def test_the_clock_anchor_runs_at_the_time_scale() -> None:
    utc = dt.datetime(2026, 12, 6, 23, 0, tzinfo=dt.UTC)
    anchor = ClockAnchor(utc=utc, wall=time.time() - 10.0, time_scale=30.0)
    elapsed = (anchor.now_utc() - utc).total_seconds()
    assert 300.0 <= elapsed < 300.0 + 30.0 * 60  # 10 real s at 30x, however slow this machine


def test_an_outcome_is_typed_and_refuses_what_is_not_an_outcome() -> None:
    with pytest.raises(ValidationError, match="outcome"):
        ClusterOutcome(cluster="c", outcome="fine")  # type: ignore[arg-type]
    done = ClusterOutcome(cluster="c", outcome="upgraded", wave="canary")
    assert done.record() == {**done.model_dump(mode="json", exclude_none=True)}
    assert "orchestrator_pid" not in done.record()


def run_both(sim: Sim, tmp_path: Path, job: ClusterJob) -> dict[str, ClusterOutcome]:
    """``job`` on this process's executor and on a shard process, each on a fresh store."""
    azure, ssh = from_endpoint(sim.emulator.state_dir / "endpoint.json")
    outcomes: dict[str, ClusterOutcome] = {}
    connections = Connections.create(azure, ssh)
    try:
        executor: Executor = InProcessExecutor(connections, StateStore(tmp_path / "here"))
        outcomes["here"] = executor.run(job, lambda: False)
    finally:
        connections.close()
    with ShardPool(ShardSpec(azure, ssh, str(tmp_path / "shard")), 1) as pool:
        outcomes["shard"] = pool.run(job, lambda: False)
    return outcomes


def test_every_executor_judges_the_window_on_the_jobs_clock(sim: Sim, tmp_path: Path) -> None:
    # A rehearsal whose clock stands 10 minutes before the window closes: too little for an
    # upgrade and a rollback. Both executors refuse before anything changes in Azure, on the
    # job's clock, not the real one (by which the window is two days away).
    anchor = ClockAnchor.start(WINDOW_END - dt.timedelta(minutes=10), time_scale=1.0)
    outcomes = run_both(sim, tmp_path, job_for(sim, anchor))
    for where, outcome in outcomes.items():
        assert outcome.outcome in ("rolled_back", "failed_needs_attention"), (where, outcome)
        assert "window ends in" in outcome.reason, (where, outcome.reason)
        assert outcome.wave == "canary", where
    assert outcomes["shard"].orchestrator_pid is not None
    assert outcomes["here"].orchestrator_pid is None
    state = sim.state()
    assert {vm["os_image"].rsplit("/", 1)[-1] for vm in state["vms"]} == {"2.15.5"}
    assert state["leaked_disks"] == []
    assert sim.customer()["evictions"] == 0


def test_the_core_imports_neither_prefect_nor_anything_above_it() -> None:
    """``amlfs/`` is the Prefect-free core: no module of it imports Prefect, the flows,
    tasks, blocks, deployments or the CLI (``amlfs_cli/``, which sits above them all), at
    the top or inside a function."""
    import ast

    above = {"prefect", "flows", "tasks", "blocks", "deployments", "amlfs_cli"}
    found = []
    for path in sorted((REPO / "amlfs").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            found += [
                f"{path.relative_to(REPO)}:{node.lineno} {name}"
                for name in names
                if name.split(".")[0] in above
            ]
    assert found == []
