"""Prefect task: Delete (or keep, tagged) the old OS disks."""

from __future__ import annotations

from tasks._step import step_task

finalize = step_task("finalize")
