"""The two state store backends as one fixture: every test that takes ``store_location`` runs
once on a directory and once on its own PostgreSQL table (the machine's server; CI has it),
dropped at the end. ``AMLFS_TEST_POSTGRES_URL`` names another database."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

POSTGRES_URL = os.environ.get("AMLFS_TEST_POSTGRES_URL", "postgresql://root@127.0.0.1:5432/test")


def postgres_location(table: str) -> str:
    joiner = "&" if "?" in POSTGRES_URL else "?"
    return f"{POSTGRES_URL}{joiner}table={table}"


@pytest.fixture(params=["filesystem", "postgresql"])
def store_location(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Where a test's store is: ``open_store`` (and so a child process) opens it."""
    if request.param == "filesystem":
        yield str(tmp_path / "state")
        return
    table = f"amlfs_test_{secrets.token_hex(8)}"
    yield postgres_location(table)
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table)))
