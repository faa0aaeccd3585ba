"""Prefect flows (cluster upgrade, fleet maintenance): thin, the logic lives in amlfs."""
