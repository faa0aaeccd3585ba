"""Prefect task: one cluster's whole upgrade inside a fleet run (its steps are nested tasks).

The task run's state tells the cluster's truth (``outcome_state``), the result dict rides in
it: call it with ``return_state=True`` and read ``state.result(raise_on_failure=False)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State
from prefect.states import Cancelled, Completed, Failed

__all__ = ["ROLLED_BACK", "outcome_state", "settled", "upgrade_cluster"]

#: The name of the state of a cluster (or fleet) run whose upgrade was rolled back, serving.
ROLLED_BACK = "RolledBack"


def settled(state: State[Any]) -> bool:
    """True when nobody has to act: Completed, or rolled back and serving."""
    return state.is_completed() or (state.is_failed() and state.name == ROLLED_BACK)


def outcome_state(result: dict[str, Any]) -> State[Any]:
    """The Prefect state that says what happened to the cluster, carrying ``result``.

    * ``upgraded``, ``already_current``: Completed.
    * ``rolled_back``: Failed named ``RolledBack``, the reason as its message: the release is
      not there, and the UI shows it red at a glance, not green. It pages nobody by itself:
      Prefect's events are named after the state (``prefect.task-run.RolledBack``), so an
      automation on ``...Failed`` fires only for the clusters that need a human; nothing
      retries it (the task has no retries).
    * ``failed_needs_attention``: Failed, with the reason (what is left wrong).
    * ``busy`` (another orchestrator holds the cluster's lease: nothing was touched):
      Completed named ``Busy``; ``interrupted`` (its run was cancelled before it recorded an
      outcome): Cancelled named ``Interrupted``. Neither is final for the fleet: a resume
      runs the cluster again.
    """
    outcome = str(result.get("outcome", ""))
    reason = str(result.get("reason") or "") or None
    if outcome in ("upgraded", "already_current"):
        return Completed(message=reason or outcome, data=result)
    if outcome == "rolled_back":
        return Failed(name=ROLLED_BACK, message=reason, data=result)
    if outcome == "busy":
        return Completed(name="Busy", message=reason, data=result)
    if outcome == "interrupted":
        return Cancelled(name="Interrupted", message=reason, data=result)
    return Failed(message=f"{outcome}: {reason}" if reason else outcome, data=result)


def _upgrade(job: Callable[[], dict[str, Any]]) -> State[Any]:
    return outcome_state(job())


upgrade_cluster = task(name="cluster-upgrade", cache_policy=NO_CACHE, persist_result=False)(
    _upgrade
)
