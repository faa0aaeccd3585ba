"""Thin Prefect tasks, one module per cluster-upgrade step; the logic is in ``amlfs``.

``run_step(name, fn)`` is the ``StepRunner`` the cluster flow hands to the saga: it runs the
saga's step ``fn`` as the Prefect task of that step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tasks.capture import capture
from tasks.finalize import finalize
from tasks.preflight import preflight
from tasks.prestage import prestage
from tasks.restore import restore
from tasks.rollback import rollback
from tasks.suspend import suspend
from tasks.swap import swap
from tasks.unsuspend import unsuspend
from tasks.validate import validate

__all__ = ["STEP_TASKS", "run_step", "steps_of"]

STEP_TASKS = {
    "preflight": preflight,
    "prestage": prestage,
    "capture": capture,
    "suspend": suspend,
    "swap": swap,
    "restore": restore,
    "unsuspend": unsuspend,
    "validate": validate,
    "finalize": finalize,
}


def run_step(name: str, fn: Callable[[], Any], *, cluster: str | None = None) -> Any:
    """Run the saga's step ``name`` as its task; with ``cluster``, the task run is named
    after the cluster too (``lustre-eus-01 swap``), as a fleet run shows many side by side."""
    step = STEP_TASKS.get(name)
    if step is None:  # rollback compensations are named "rollback: <what>"
        step = rollback.with_options(name=name.replace(": ", "-").replace(" ", "-"))
    if cluster is not None:
        step = step.with_options(task_run_name=f"{cluster} {name}")
    return step(fn)


def steps_of(cluster: str) -> Callable[[str, Callable[[], Any]], Any]:
    """The step runner of one cluster's saga: each step a task run named after it."""

    def run(name: str, fn: Callable[[], Any]) -> Any:
        return run_step(name, fn, cluster=cluster)

    return run
