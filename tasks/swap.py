"""Prefect task: Stop, PUT the new OS disk, start: every VM of the cluster in parallel."""

from __future__ import annotations

from tasks._step import step_task

swap = step_task("swap-os-disks")
