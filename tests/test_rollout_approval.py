"""A stage's approval through Prefect's own input mechanism: the ``rollout-approval`` run
pauses with a typed form on a real Prefect server; the answer given through the API (as the
UI's Resume button sends it) opens the stage or halts the rollout, recorded with who and why.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName
from prefect.settings import PREFECT_API_URL, temporary_settings

from amlfs.models import load_fleet
from amlfs.rollout import RolloutBook, RolloutStrategy, Stage, awaiting_approval, new_rollout
from amlfs.store import StateStore
from flows.rollouts import ApprovalParams, rollout_approval
from tests.conftest import SMALL_FLEET, PrefectServer

pytestmark = pytest.mark.integration
NOW = dt.datetime(2026, 12, 2, 12, tzinfo=dt.UTC)


def paused_run(server: PrefectServer, rollout: str, deadline_s: float = 120.0) -> Any:
    """The rollout-approval run of ``rollout`` once it is Paused (polled until then)."""
    give_up = time.monotonic() + deadline_s
    with get_client(sync_client=True) as client:
        while time.monotonic() < give_up:
            runs = client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=["rollout-approval"]))
            )
            for run in runs:
                if (
                    run.parameters["params"]["rollout"] == rollout
                    and run.state
                    and run.state.is_paused()
                ):
                    return run
            time.sleep(0.5)
    raise AssertionError(f"no paused rollout-approval run of {rollout} on {server.url}")


@pytest.mark.parametrize("approve", [True, False], ids=["approved", "refused"])
def test_a_stage_waits_for_the_answer_to_the_paused_runs_form(
    prefect_server: PrefectServer, tmp_path: Path, approve: bool
) -> None:
    name = f"r-{'yes' if approve else 'no'}"
    book = RolloutBook(StateStore(tmp_path))
    book.create(
        new_rollout(
            name,
            load_fleet(SMALL_FLEET),
            release_version="2.15.6",
            release_file="release.yaml",
            fleet_file=str(SMALL_FLEET),
            strategy=RolloutStrategy(
                stages=[Stage(name="canary"), Stage(name="wave1", approval=True)]
            ),
            now=NOW,
        )
    )
    outcome: dict[str, Any] = {}

    def work() -> None:
        with temporary_settings(updates={PREFECT_API_URL: prefect_server.url}):
            outcome["state"] = rollout_approval(
                ApprovalParams(rollout=name, stage="wave1", state_dir=str(tmp_path), poll_s=1),
                return_state=True,
            )

    thread = threading.Thread(target=work, name="approval-run")
    thread.start()
    try:
        with temporary_settings(updates={PREFECT_API_URL: prefect_server.url}):
            run = paused_run(prefect_server, name)
            assert book.get(name).approvals == {}  # nothing until the operator answers
            with get_client(sync_client=True) as client:
                client.resume_flow_run(
                    run.id, run_input={"approve": approve, "by": "carol", "note": "dashboards ok"}
                )
    finally:
        thread.join(120)
    assert not thread.is_alive()
    state = outcome["state"]
    assert state.is_completed(), state
    rollout = book.get(name)
    if approve:
        assert state.message == "stage wave1 approved by carol"
        assert rollout.approvals["wave1"].by == "carol"
        assert rollout.approvals["wave1"].note == "dashboards ok"
        assert rollout.state == "active"
    else:
        assert state.message == "stage wave1 refused by carol: rollout halted"
        assert rollout.state == "halted"
        assert rollout.state_reason == "stage wave1 not approved: dashboards ok"
        assert rollout.events[-1].by == "carol"


def test_a_stage_is_asked_for_its_approval_once() -> None:
    rollout = new_rollout(
        "r",
        load_fleet(SMALL_FLEET),
        release_version="2.15.6",
        release_file="release.yaml",
        fleet_file=str(SMALL_FLEET),
        strategy=RolloutStrategy(stages=[Stage(name="canary", approval=True)]),
        now=NOW,
        selected=lambda cluster: cluster.wave == "canary",
    )
    assert awaiting_approval(rollout, NOW) == ["canary"]
    asked = rollout.model_copy(update={"approval_requests": {"canary": "run-1"}})
    assert awaiting_approval(asked, NOW) == []


def test_approval_is_asked_once_the_stage_before_finished_even_while_it_soaks() -> None:
    from amlfs.rollout import record_outcome

    rollout = new_rollout(
        "r",
        load_fleet(SMALL_FLEET),
        release_version="2.15.6",
        release_file="release.yaml",
        fleet_file=str(SMALL_FLEET),
        strategy=RolloutStrategy(
            stages=[Stage(name="canary", soak_hours=24), Stage(name="wave1", approval=True)]
        ),
        now=NOW,
    )
    assert awaiting_approval(rollout, NOW) == []  # the canary has not finished
    done = record_outcome(rollout, "lustre-eus-01", "upgraded", at=NOW)
    assert awaiting_approval(done, NOW) == ["wave1"]  # soaking: asked ahead of the opening
    failed = record_outcome(rollout, "lustre-eus-01", "rolled_back", at=NOW)
    assert awaiting_approval(failed, NOW) == []  # halted: nothing to approve
