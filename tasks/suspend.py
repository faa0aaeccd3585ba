"""Prefect task: Raise Lustre timeouts (-P), quiesce HSM, firewall client LNet traffic."""

from __future__ import annotations

from tasks._step import step_task

suspend = step_task("suspend")
