"""What every step task is: a named Prefect task that runs one saga step (``amlfs.saga``).

The step's logic, retries and compensation live in ``amlfs``; the task gives it a name, a
state and timings in the Prefect UI. No caching (a step is never skipped because it "ran
before": idempotence is the saga's job) and no result persistence (results stay in memory).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import Task, task
from prefect.cache_policies import NO_CACHE


def _run(step: Callable[[], Any]) -> Any:
    return step()


def step_task(name: str) -> Task[[Callable[[], Any]], Any]:
    decorate = task(name=name, cache_policy=NO_CACHE, persist_result=False, retries=0)
    return decorate(_run)
