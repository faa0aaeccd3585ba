"""Prefect tasks, one small module per step, each calling amlfs."""
