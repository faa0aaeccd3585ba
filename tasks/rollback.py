"""Prefect task: Run one compensation of the rollback (swap back, unsuspend, delete new disks)."""

from __future__ import annotations

from tasks._step import step_task

rollback = step_task("rollback")
