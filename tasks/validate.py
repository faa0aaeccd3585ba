"""Prefect task: Recovery COMPLETE with no eviction; in-cluster client read/write probe."""

from __future__ import annotations

from tasks._step import step_task

validate = step_task("validate")
