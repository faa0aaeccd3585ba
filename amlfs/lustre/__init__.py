"""Lustre procedures, commands and output parsers; no Prefect."""
