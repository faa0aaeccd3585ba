"""Prefect task: one cluster's whole upgrade inside a fleet run (its steps are nested tasks)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE


def _upgrade(job: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    return job()


upgrade_cluster = task(name="cluster-upgrade", cache_policy=NO_CACHE, persist_result=False)(
    _upgrade
)
