"""Prefect task: Create the new OS disks from the release image, tagged (outside the downtime)."""

from __future__ import annotations

from tasks._step import step_task

prestage = step_task("prestage-os-disks")
