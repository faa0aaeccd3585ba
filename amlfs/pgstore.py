"""The state store on PostgreSQL: one store shared by orchestrators on several machines.

Each document is a row ``(parent, name, value)`` of one table (``parent`` is the key's
leading parts joined with ``/``, ``value`` JSONB), created on first use. Every write is one
transaction. ``update`` inserts a placeholder row if the document is missing (``INSERT ... ON
CONFLICT DO NOTHING``: a second inserter waits for the first one's transaction), then locks
the row with ``SELECT ... FOR UPDATE`` and writes or deletes it before committing, so it is
atomic across processes and machines; a placeholder never outlives its transaction. The
cluster lease lives in its row like any document: its fencing token is in the value, and
``ClusterLease`` takes and checks it through ``update`` and ``get`` as on the filesystem.

Connections come from one pool per process and connection string, shared by the stores that
use it (the saga calls the store from many threads at once), checked before use and closed
at exit; a process started by ``fork`` opens its own. A password in the URL appears in no
repr, error or log line of this module.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import TupleRow

from amlfs.errors import StateStoreError
from amlfs.store import check_key

__all__ = ["PostgresStore"]

DEFAULT_TABLE = "amlfs_state"
DEFAULT_POOL_SIZE = 10
_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

_pools: dict[tuple[int, str], _Pool] = {}  # (pid, connection string): the process's pool
_ready: set[tuple[int, str, str]] = set()  # (pid, connection string, table) created
_pools_lock = threading.Lock()


class _PoolBusyError(Exception):
    """No connection of the pool came free in time."""


class _Pool:
    """At most ``size`` connections (autocommit; transactions are explicit), reused last in,
    first out. An idle connection is checked with an empty query before it is handed out (a
    server restart breaks them all). A connection error comes out as psycopg raised it, with
    libpq's reason (a pool that retries in the background would only say it timed out)."""

    def __init__(self, conninfo: str, size: int) -> None:
        self.conninfo = conninfo
        self.size = size
        self._slots = threading.BoundedSemaphore(size)
        self._idle: list[psycopg.Connection[TupleRow]] = []
        self._lock = threading.Lock()

    @contextmanager
    def connection(self, timeout_s: float) -> Iterator[psycopg.Connection[TupleRow]]:
        if not self._slots.acquire(timeout=timeout_s):
            raise _PoolBusyError(
                f"all {self.size} connections of this process were busy for {timeout_s:g} s"
            )
        conn: psycopg.Connection[TupleRow] | None = None
        try:
            conn = self._checkout(timeout_s)
            yield conn
        finally:
            if conn is not None:
                self._checkin(conn)
            self._slots.release()

    def _checkout(self, timeout_s: float) -> psycopg.Connection[TupleRow]:
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return psycopg.connect(
                    self.conninfo, autocommit=True, connect_timeout=max(2, round(timeout_s))
                )
            try:
                conn.execute("")
            except psycopg.Error:
                conn.close()
                continue
            return conn

    def _checkin(self, conn: psycopg.Connection[TupleRow]) -> None:
        idle = conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        if conn.closed or conn.broken or not idle:
            conn.close()
            return
        with self._lock:
            self._idle.append(conn)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def _close_pools() -> None:
    with _pools_lock:
        mine = [key for key in _pools if key[0] == os.getpid()]
        pools = [_pools.pop(key) for key in mine]
    for pool in pools:
        pool.close()


atexit.register(_close_pools)


def _shared_pool(conninfo: str, size: int) -> _Pool:
    """The pool of this process for ``conninfo`` (a forked child opens its own: the parent's
    sockets are not its to use). Its size is the first store's that asked."""
    key = (os.getpid(), conninfo)
    with _pools_lock:
        pool = _pools.get(key)
        if pool is None:
            pool = _pools[key] = _Pool(conninfo, size)
        return pool


class PostgresStore:
    """JSON documents in the PostgreSQL table ``schema.table`` (``schema`` None: the first
    schema of the search path), reached at ``conninfo`` (a libpq URL or ``key=value``
    string) through at most ``pool_size`` connections of this process. ``timeout_s`` bounds
    the wait for a connection (the server is down, or every connection is busy)."""

    def __init__(
        self,
        conninfo: str,
        *,
        table: str = DEFAULT_TABLE,
        schema: str | None = None,
        pool_size: int = DEFAULT_POOL_SIZE,
        timeout_s: float = 30.0,
    ) -> None:
        for what, name in (("table", table), ("schema", schema)):
            if name is not None and not _IDENTIFIER.match(name):
                raise StateStoreError(
                    f"PostgreSQL {what} name {name!r} is not a lower-case identifier "
                    "(letters, digits, _; at most 63)"
                )
        if pool_size < 1:
            raise StateStoreError(f"pool_size must be >= 1, got {pool_size}")
        try:
            params = conninfo_to_dict(conninfo)
        except psycopg.Error as err:
            secret = urlsplit(conninfo).password if "://" in conninfo else None
            raise StateStoreError(
                f"invalid PostgreSQL connection string: {_scrub(str(err), secret or '')}"
            ) from err
        self._conninfo = conninfo
        self._password = str(params.get("password") or "")
        self.table = table
        self.schema = schema
        self.pool_size = pool_size
        self.timeout_s = timeout_s
        self._where = _describe(params)
        self._table = sql.Identifier(schema, table) if schema is not None else sql.Identifier(table)

    @classmethod
    def from_url(cls, url: str, *, timeout_s: float = 30.0) -> PostgresStore:
        """A store from ``postgresql://USER[:PASSWORD]@HOST[:PORT]/DB[?table=T&schema=S&
        pool_size=N&<libpq parameters>]``."""
        parts = urlsplit(url)
        ours: dict[str, str] = {}
        theirs: list[tuple[str, str]] = []
        for name, value in parse_qsl(parts.query, keep_blank_values=True):
            if name in ("table", "schema", "pool_size"):
                ours[name] = value
            else:
                theirs.append((name, value))
        conninfo = urlunsplit(parts._replace(query=urlencode(theirs)))
        try:
            pool_size = int(ours.get("pool_size", DEFAULT_POOL_SIZE))
        except ValueError as err:
            raise StateStoreError(f"pool_size {ours['pool_size']!r} is not a number") from err
        return cls(
            conninfo,
            table=ours.get("table", DEFAULT_TABLE),
            schema=ours.get("schema"),
            pool_size=pool_size,
            timeout_s=timeout_s,
        )

    # ------------------------------------------------------------------ documents

    def put(self, *parts: str, value: Any) -> None:
        parent, name = _split(parts)
        text = json.dumps(value, sort_keys=True)  # the C encoder, as the filesystem store
        with self._connection("write", parts) as conn, conn.transaction():
            conn.execute(
                sql.SQL(
                    "INSERT INTO {} (parent, name, value) VALUES (%s, %s, %s::jsonb) "
                    "ON CONFLICT (parent, name) DO UPDATE SET value = EXCLUDED.value, "
                    "updated_at = now()"
                ).format(self._table),
                (parent, name, text),
            )

    def get(self, *parts: str) -> Any | None:
        parent, name = _split(parts)
        with self._connection("read", parts) as conn:
            row = conn.execute(
                sql.SQL("SELECT value::text FROM {} WHERE parent = %s AND name = %s").format(
                    self._table
                ),
                (parent, name),
            ).fetchone()
        return None if row is None else _loads(row[0])

    def delete(self, *parts: str) -> None:
        parent, name = _split(parts)
        with self._connection("delete", parts) as conn, conn.transaction():
            conn.execute(
                sql.SQL("DELETE FROM {} WHERE parent = %s AND name = %s").format(self._table),
                (parent, name),
            )

    def update(self, *parts: str, change: Callable[[Any | None], Any | None]) -> Any | None:
        """Read-modify-write one document under its row lock, in one transaction."""
        parent, name = _split(parts)
        with self._connection("update", parts) as conn, conn.transaction():
            conn.execute(
                sql.SQL(
                    "INSERT INTO {} (parent, name, value) VALUES (%s, %s, NULL) "
                    "ON CONFLICT (parent, name) DO NOTHING"
                ).format(self._table),
                (parent, name),
            )
            row = conn.execute(
                sql.SQL(
                    "SELECT value::text FROM {} WHERE parent = %s AND name = %s FOR UPDATE"
                ).format(self._table),
                (parent, name),
            ).fetchone()
            current = None if row is None or row[0] is None else _loads(row[0])
            new = change(current)  # raising rolls the transaction (and placeholder) back
            if new is None:
                conn.execute(
                    sql.SQL("DELETE FROM {} WHERE parent = %s AND name = %s").format(self._table),
                    (parent, name),
                )
            else:
                conn.execute(
                    sql.SQL(
                        "UPDATE {} SET value = %s::jsonb, updated_at = now() "
                        "WHERE parent = %s AND name = %s"
                    ).format(self._table),
                    (json.dumps(new, sort_keys=True), parent, name),
                )
            return new

    def names(self, *prefix: str) -> list[str]:
        check_key(prefix, prefix=True)
        with self._connection("list", prefix) as conn:
            rows = conn.execute(
                sql.SQL("SELECT name FROM {} WHERE parent = %s AND value IS NOT NULL").format(
                    self._table
                ),
                ("/".join(prefix),),
            ).fetchall()
        return sorted(row[0] for row in rows)  # Python's order, as the filesystem store

    def items(self, *prefix: str) -> dict[str, Any]:
        check_key(prefix, prefix=True)
        with self._connection("list", prefix) as conn:
            rows = conn.execute(
                sql.SQL(
                    "SELECT name, value::text FROM {} WHERE parent = %s AND value IS NOT NULL"
                ).format(self._table),
                ("/".join(prefix),),
            ).fetchall()
        return {name: _loads(text) for name, text in sorted(rows)}

    # ------------------------------------------------------------------ connections

    @contextmanager
    def _connection(
        self, verb: str, parts: tuple[str, ...]
    ) -> Iterator[psycopg.Connection[TupleRow]]:
        """A pooled connection to a database where the table exists; psycopg's errors come
        out as ``StateStoreError`` naming what failed, without the password. Errors raised by
        the caller's own code inside (an ``update``'s change) pass through unchanged."""
        key = "/".join(parts)
        try:
            pool = _shared_pool(self._conninfo, self.pool_size)
            with pool.connection(self.timeout_s) as conn:
                self._ensure_table(conn)
                try:
                    yield conn
                except psycopg.errors.UndefinedTable:
                    # Dropped behind our back: create it again for the next call.
                    _ready.discard((os.getpid(), self._conninfo, self._qualified))
                    raise
        except (psycopg.Error, _PoolBusyError) as err:
            raise StateStoreError(
                f"cannot {verb} {key!r} in {self!r}: {type(err).__name__}: "
                f"{_scrub(str(err).strip(), self._password)}"
            ) from err

    @property
    def _qualified(self) -> str:
        return f"{self.schema}.{self.table}" if self.schema else self.table

    def _ensure_table(self, conn: psycopg.Connection[TupleRow]) -> None:
        ready = (os.getpid(), self._conninfo, self._qualified)
        if ready in _ready:
            return
        with conn.transaction():
            # CREATE ... IF NOT EXISTS races with itself (a duplicate pg_type row): several
            # processes opening a new store at once take turns on an advisory lock.
            conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext(%s))", (f"amlfs-state:{self._qualified}",)
            )
            if self.schema is not None:
                conn.execute(
                    sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema))
                )
            conn.execute(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {} ("
                    "parent text NOT NULL, name text NOT NULL, value jsonb, "
                    "updated_at timestamptz NOT NULL DEFAULT now(), "
                    "PRIMARY KEY (parent, name))"
                ).format(self._table)
            )
        _ready.add(ready)

    def __repr__(self) -> str:
        return f"PostgresStore({self._where!r}, table={self._qualified!r})"


def _loads(text: str) -> Any:
    """JSON as the filesystem store gives it back: objects with their keys in sorted order
    (it writes them sorted; JSONB keeps them shortest first)."""
    return json.loads(text, object_pairs_hook=lambda pairs: dict(sorted(pairs)))


def _split(parts: tuple[str, ...]) -> tuple[str, str]:
    check_key(parts)
    return "/".join(parts[:-1]), parts[-1]


def _describe(params: dict[str, Any]) -> str:
    """``postgresql://USER@HOST:PORT/DB``: where the store is, never its password."""
    user = f"{params['user']}@" if params.get("user") else ""
    host = params.get("host") or params.get("hostaddr") or ""
    port = f":{params['port']}" if params.get("port") else ""
    return f"postgresql://{user}{host}{port}/{params.get('dbname') or ''}"


def _scrub(text: str, secret: str) -> str:
    return text.replace(secret, "***") if secret else text
