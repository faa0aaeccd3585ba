"""Prefect task: Read every VM and check the cluster is healthy before anything changes."""

from __future__ import annotations

from tasks._step import step_task

preflight = step_task("preflight")
