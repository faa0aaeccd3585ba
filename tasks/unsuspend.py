"""Prefect task: Remove the firewall, restore tunables, re-enable HSM."""

from __future__ import annotations

from tasks._step import step_task

unsuspend = step_task("unsuspend")
