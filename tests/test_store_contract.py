"""One contract, both state store backends (a directory and a PostgreSQL table): what the
journals, the captured config, the leases and the fleet records rely on."""

from __future__ import annotations

import contextlib
import secrets
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import psycopg.sql
import pytest

from amlfs.errors import StateStoreError
from amlfs.pgstore import PostgresStore
from amlfs.store import StateStore, open_store
from tests import stores
from tests.conftest import REPO

store_location = stores.store_location


def test_open_store_picks_the_backend_from_the_location(tmp_path: Path) -> None:
    assert type(open_store(tmp_path)) is StateStore
    assert type(open_store(str(tmp_path / "state"))) is StateStore
    pg = open_store("postgresql://root@127.0.0.1:5432/test?table=amlfs_x&schema=amlfs_s")
    assert isinstance(pg, PostgresStore)
    assert (pg.schema, pg.table) == ("amlfs_s", "amlfs_x")
    assert isinstance(open_store("postgres://root@127.0.0.1/test"), PostgresStore)
    # The filesystem store never takes a URL for a directory (a folder named "postgresql:").
    with pytest.raises(StateStoreError, match="open_store"):
        StateStore("postgresql://root:secret@127.0.0.1:5432/test")


def test_put_get_delete_round_trip(store_location: str) -> None:
    store = open_store(store_location)
    store.put("clusters", "c1", "run", value={"phase": "swap", "run_id": "r1"})
    assert store.get("clusters", "c1", "run") == {"phase": "swap", "run_id": "r1"}
    store.put("clusters", "c1", "run", value={"phase": "done"})  # replaced whole
    assert store.get("clusters", "c1", "run") == {"phase": "done"}
    # Another store object on the same location (another worker) reads the same document.
    assert open_store(store_location).get("clusters", "c1", "run") == {"phase": "done"}
    store.delete("clusters", "c1", "run")
    assert store.get("clusters", "c1", "run") is None
    store.delete("clusters", "c1", "run")  # deleting what is not there is no error


def test_a_missing_document_is_none(store_location: str) -> None:
    store = open_store(store_location)
    assert store.get("clusters", "nobody", "run") is None
    assert store.get("x") is None
    seen: list[Any] = []
    assert store.update("clusters", "nobody", "lease", change=lambda c: seen.append(c)) is None
    assert seen == [None]
    assert store.get("clusters", "nobody", "lease") is None


def test_keys_of_different_lengths_are_different_documents(store_location: str) -> None:
    store = open_store(store_location)
    store.put("a", value=1)
    store.put("a", "b", value=2)
    store.put("a", "b", "c", value=3)
    store.put("ab", value=4)
    assert [store.get("a"), store.get("a", "b"), store.get("a", "b", "c"), store.get("ab")] == [
        1,
        2,
        3,
        4,
    ]


@pytest.mark.parametrize(
    "parts",
    [("..",), (".",), ("clusters", "a/b"), ("",), ("a b",), ("clusters", "ü"), ("x\x00",), ()],
    ids=["dotdot", "dot", "slash", "empty", "space", "non-ascii", "nul", "no-parts"],
)
def test_unsafe_key_parts_are_refused(store_location: str, parts: tuple[str, ...]) -> None:
    store = open_store(store_location)
    with pytest.raises(StateStoreError):
        store.put(*parts, value=1)
    with pytest.raises(StateStoreError):
        store.get(*parts)
    with pytest.raises(StateStoreError):
        store.delete(*parts)
    with pytest.raises(StateStoreError):
        store.update(*parts, change=lambda current: 1)
    if parts:
        with pytest.raises(StateStoreError):
            store.names(*parts)
    assert store.names() == []  # nothing was written anywhere


def test_names_lists_the_documents_one_part_below(store_location: str) -> None:
    store = open_store(store_location)
    assert store.names("fleet-runs") == []
    for name in ("run-b", "run-a", "run.c"):
        store.put("fleet-runs", name, value={"name": name})
    store.put("fleet-runs", "run-a", "detail", value={})  # deeper: not a fleet run
    store.put("fleet-runs-other", "x", value={})
    store.put("top", value={})
    assert store.names("fleet-runs") == ["run-a", "run-b", "run.c"]
    assert store.names() == ["top"]
    store.delete("fleet-runs", "run-b")
    assert store.names("fleet-runs") == ["run-a", "run.c"]
    # items: the same documents with their values, in one read.
    assert store.items("fleet-runs") == {"run-a": {"name": "run-a"}, "run.c": {"name": "run.c"}}
    assert list(store.items("fleet-runs")) == ["run-a", "run.c"]
    assert store.items("nothing-here") == {}
    assert store.items() == {"top": {}}


def test_update_returns_and_stores_the_new_value(store_location: str) -> None:
    store = open_store(store_location)
    assert store.update("c", change=lambda current: {"n": 1} if current is None else None) == {
        "n": 1
    }
    assert store.update("c", change=lambda current: {"n": current["n"] + 1}) == {"n": 2}
    assert store.get("c") == {"n": 2}


def test_update_returning_none_deletes(store_location: str) -> None:
    store = open_store(store_location)
    store.put("clusters", "c1", "lease", value={"token": 3})
    assert store.update("clusters", "c1", "lease", change=lambda current: None) is None
    assert store.get("clusters", "c1", "lease") is None
    assert store.names("clusters", "c1") == []


class Refused(Exception):
    pass


def test_an_update_whose_change_raises_changes_nothing(store_location: str) -> None:
    store = open_store(store_location)
    store.put("doc", value={"token": 1})

    def refuse(current: Any) -> Any:
        raise Refused(current)

    with pytest.raises(Refused):  # the caller's own error, not a StateStoreError
        store.update("doc", change=refuse)
    assert store.get("doc") == {"token": 1}
    with pytest.raises(Refused):
        store.update("missing", change=refuse)
    assert store.get("missing") is None
    assert store.names() == ["doc"]  # no placeholder left behind
    assert store.update("doc", change=lambda c: {"token": c["token"] + 1}) == {"token": 2}


def increment(current: Any | None) -> dict[str, int]:
    return {"n": (current or {"n": 0})["n"] + 1}


def test_update_is_atomic_under_threads(store_location: str) -> None:
    workers, times = 8, 40
    store = open_store(store_location)
    start = threading.Barrier(workers)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            start.wait(30)
            for _ in range(times):
                store.update("counter", change=increment)
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=work) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    assert store.get("counter") == {"n": workers * times}


COUNTER = textwrap.dedent(
    """
    import pathlib, sys, time
    from amlfs.store import open_store
    location, go, times = sys.argv[1], pathlib.Path(sys.argv[2]), int(sys.argv[3])
    store = open_store(location)
    store.get("warm-up")  # connected (and the table made) before the start line
    print("ready", flush=True)
    while not go.exists():
        time.sleep(0.005)
    for _ in range(times):
        store.update("counter", change=lambda c: {"n": (c or {"n": 0})["n"] + 1})
    """
)


def test_update_is_atomic_across_processes(store_location: str, tmp_path: Path) -> None:
    workers, times = 4, 50
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", COUNTER, store_location, str(go), str(times)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(workers)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
        go.touch()
        for proc in procs:
            proc.communicate(timeout=120)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert [proc.returncode for proc in procs] == [0] * workers
    assert open_store(store_location).get("counter") == {"n": workers * times}


def test_json_values_round_trip(store_location: str) -> None:
    store = open_store(store_location)
    value = {
        "nested": {"list": [1, 2.5, -3, True, False, None, [], {}], "deep": {"a": {"b": ["c"]}}},
        "unicode": "lustre ✓ — Größe 日本語 🚀",
        "escapes": 'quote " backslash \\ newline \n tab \t',
        "big": 2**62,
        "float": 0.1,
        "empty": "",
    }
    store.put("doc", value=value)
    assert store.get("doc") == value
    assert store.update("doc", change=lambda current: {**current, "more": "ü"}) == {
        **value,
        "more": "ü",
    }
    assert store.get("doc") == {**value, "more": "ü"}
    store.put("order", value={"dd": 1, "b": {"zz": 1, "a": 2}, "ccc": 3, "a": 4})
    got = store.get("order")
    assert list(got) == ["a", "b", "ccc", "dd"]  # keys come back sorted, on both backends
    assert list(got["b"]) == ["a", "zz"]
    for scalar in (7, "text", [1, "two"], 1.5):
        store.put("scalar", value=scalar)
        assert store.get("scalar") == scalar


def test_a_large_value_round_trips(store_location: str) -> None:
    store = open_store(store_location)
    # A 1,000-cluster fleet record is ~1 MB.
    results = {
        f"cluster-{i:04d}": {"outcome": "upgraded", "reason": "ü" + "x" * 900, "wave": i % 7}
        for i in range(1100)
    }
    store.put("fleet-runs", "big", value={"results": results})
    got = store.get("fleet-runs", "big")
    assert got == {"results": results}
    assert len(str(got)) > 1_000_000


def test_a_value_that_is_not_json_is_refused_before_anything_is_written(
    store_location: str,
) -> None:
    store = open_store(store_location)
    with pytest.raises(TypeError):
        store.put("doc", value={"when": object()})
    assert store.get("doc") is None


# ---------------------------------------------------------------------- PostgreSQL only


def pg_table_exists(table: str) -> bool:
    with psycopg.connect(stores.POSTGRES_URL, autocommit=True) as conn:
        row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()
    assert row is not None
    return bool(row[0])


def test_postgres_store_makes_its_table_and_schema_on_first_use() -> None:
    schema = f"amlfs_test_{secrets.token_hex(6)}"
    try:
        store = open_store(f"{stores.POSTGRES_URL}?schema={schema}&table=docs")
        assert not pg_table_exists(f"{schema}.docs")
        store.put("a", value=1)
        assert pg_table_exists(f"{schema}.docs")
        assert open_store(f"{stores.POSTGRES_URL}?schema={schema}&table=docs").get("a") == 1
        assert open_store(f"{stores.POSTGRES_URL}?schema={schema}&table=other").get("a") is None
    finally:
        with psycopg.connect(stores.POSTGRES_URL, autocommit=True) as conn:
            conn.execute(
                psycopg.sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                    psycopg.sql.Identifier(schema)
                )
            )


def test_postgres_store_password_is_in_no_repr_or_error() -> None:
    url = "postgresql://root:hunter2-not-shown@127.0.0.1:5432/amlfs_no_such_database"
    store = open_store(url + "?table=t")
    assert "hunter2" not in repr(store)
    assert repr(store) == (
        "PostgresStore('postgresql://root@127.0.0.1:5432/amlfs_no_such_database', table='t')"
    )
    with pytest.raises(StateStoreError) as caught:
        store.get("clusters", "c1", "lease")
    message = str(caught.value)
    assert "does not exist" in message
    assert "clusters/c1/lease" in message
    assert "hunter2" not in message
    assert "hunter2" not in str(caught.value.__cause__)


def test_postgres_store_errors_are_state_store_errors() -> None:
    with pytest.raises(StateStoreError, match="not a lower-case identifier"):
        open_store(f"{stores.POSTGRES_URL}?table=Robert'); DROP TABLE x;--")
    with pytest.raises(StateStoreError, match="pool_size"):
        open_store(f"{stores.POSTGRES_URL}?pool_size=many")
    # A port nobody listens on: refused at once, named, as the store's own error.
    with socket_free_port() as port:
        store = open_store(f"postgresql://root@127.0.0.1:{port}/test?table=t")
        with pytest.raises(StateStoreError, match=r"cannot write 'x' in PostgresStore\("):
            store.put("x", value=1)


@contextlib.contextmanager
def socket_free_port() -> Iterator[int]:
    """A loopback port held bound but not listening: connections to it are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])
