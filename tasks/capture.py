"""Prefect task: Copy each node's cluster files into the durable state store."""

from __future__ import annotations

from tasks._step import step_task

capture = step_task("capture-config")
