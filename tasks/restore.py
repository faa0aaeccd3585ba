"""Prefect task: Restore config + release overlay, start Lustre, check health on the release."""

from __future__ import annotations

from tasks._step import step_task

restore = step_task("restore-and-check")
