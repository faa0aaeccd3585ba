"""The durable state store: what cannot be rebuilt from Azure and the nodes.

The node config captured before a swap (the fresh release disk does not have it) and the
tunables recorded before suspend (once raised, the nodes no longer show the originals) are
written here before the step that needs them, as JSON files replaced atomically (write, fsync,
rename), readable by any worker that resumes the cluster. Files are created 0600 and
directories 0700, every one of them: node config may hold credentials of the HSM agents.

Two backends answer the one ``Store`` protocol: ``StateStore``, JSON files under a directory
(the embedded default, shared between machines only through a network file system), and
``amlfs.pgstore.PostgresStore``, rows of one PostgreSQL table (several machines, no shared
file system). ``open_store(location)`` picks one: a ``postgresql://`` URL or a directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Protocol

from pydantic import AfterValidator

from amlfs.errors import StateStoreError

__all__ = ["StateStore", "Store", "check_key", "make_private_dir", "open_store"]

_SAFE = re.compile(r"^[A-Za-z0-9._-]+$")
_URL_SCHEMES = ("postgresql://", "postgres://")


class Store(Protocol):
    """A durable store of JSON documents, each addressed by a key of safe name parts
    (letters, digits, ``.``, ``_``, ``-``; not ``.`` or ``..``).

    ``get`` of a missing document is None. ``update(*key, change=f)`` reads the document,
    calls ``f(current)`` (None when missing) and writes what it returns (None: deletes the
    document), atomically with respect to every other ``update`` of that document from any
    thread, process or machine using the same store; it returns the new value. An exception
    raised by ``f`` leaves the document as it was and propagates unchanged. Failures of the
    store itself raise ``StateStoreError``."""

    def put(self, *parts: str, value: Any) -> None: ...

    def get(self, *parts: str) -> Any | None: ...

    def delete(self, *parts: str) -> None: ...

    def update(self, *parts: str, change: Callable[[Any | None], Any | None]) -> Any | None: ...

    def names(self, *prefix: str) -> list[str]:
        """The last parts of the documents whose key is ``prefix`` plus one part, sorted."""
        ...

    def items(self, *prefix: str) -> dict[str, Any]:
        """Those documents, by their last part (sorted), in one read where the backend can
        (a fleet's thousand records are one query, not a thousand)."""
        ...


def check_key(parts: tuple[str, ...], *, prefix: bool = False) -> None:
    """Refuse a key (or, with ``prefix``, a key prefix, which may be empty) that is not a
    tuple of safe name parts."""
    if not parts and not prefix:
        raise StateStoreError("a state store key needs at least one part")
    for part in parts:
        if not isinstance(part, str) or not _SAFE.match(part) or part in (".", ".."):
            raise StateStoreError(f"state store key part {part!r} is not a safe name")


def without_password(location: str) -> str:
    """``location`` unchanged, or ``ValueError`` when it is a URL that carries a password: a
    store location given to a flow is a Prefect parameter (kept by the server, shown in the
    UI) and one given on a command line is in every process listing."""
    if location.startswith(_URL_SCHEMES):
        from urllib.parse import urlsplit

        if urlsplit(location).password is not None:
            raise ValueError(
                "the state store URL carries a password: leave it out (postgresql://USER@HOST"
                "/DB) and give it to libpq in PGPASSWORD or ~/.pgpass (PGPASSFILE)"
            )
    return location


#: A store location as a parameter or an option: a directory, or a URL without a password.
StoreLocation = Annotated[str, AfterValidator(without_password)]


def open_store(location: str | Path) -> Store:
    """The store at ``location``: a ``postgresql://USER@HOST:PORT/DB`` URL (query parameters
    ``table``, ``schema`` and ``pool_size`` are the store's, the rest libpq's) opens the
    PostgreSQL backend, anything else is a directory for ``StateStore``."""
    if isinstance(location, str) and location.startswith(_URL_SCHEMES):
        from amlfs.pgstore import PostgresStore

        return PostgresStore.from_url(location)
    return StateStore(location)


def make_private_dir(path: str | Path) -> None:
    """Create ``path`` and each missing parent 0700 (``Path.mkdir(parents=True, mode=...)``
    gives the mode to the last one only: its parents got 0777 & ~umask). Directories that
    already exist are left as they are."""
    path = Path(path)
    missing: list[Path] = []
    while not path.is_dir():
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            if not directory.is_dir():  # a file (or a dangling link) where a directory goes
                raise


class StateStore:
    """JSON documents under ``root``, addressed by a path of safe name parts."""

    def __init__(self, root: str | Path) -> None:
        if isinstance(root, str) and root.startswith(_URL_SCHEMES):
            # Not a directory named "postgresql:": the caller wants the other backend.
            raise StateStoreError(
                "StateStore is the filesystem store; open a PostgreSQL store with "
                "amlfs.store.open_store(url)"
            )
        self.root = Path(root)

    def _path(self, *parts: str) -> Path:
        check_key(parts)
        return self.root.joinpath(*parts[:-1], parts[-1] + ".json")

    def put(self, *parts: str, value: Any) -> None:
        path = self._path(*parts)
        try:
            make_private_dir(path.parent)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
            try:
                # One line, by the C encoder: with indent (or json.dump) the pure-Python
                # encoder ran, ~5x slower, holding the GIL (a 1,000-cluster record is ~1 MB).
                text = json.dumps(value, sort_keys=True)
                with os.fdopen(fd, "w") as out:
                    out.write(text)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as err:
            raise StateStoreError(f"cannot write {path}: {err.strerror}") from err

    def get(self, *parts: str) -> Any | None:
        path = self._path(*parts)
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except OSError as err:
            raise StateStoreError(f"cannot read {path}: {err.strerror}") from err
        except json.JSONDecodeError as err:
            raise StateStoreError(f"{path} is not valid JSON: {err}") from err

    def delete(self, *parts: str) -> None:
        path = self._path(*parts)
        try:
            path.unlink(missing_ok=True)
        except OSError as err:
            raise StateStoreError(f"cannot delete {path}: {err.strerror}") from err

    def items(self, *prefix: str) -> dict[str, Any]:
        found = {name: self.get(*prefix, name) for name in self.names(*prefix)}
        return {name: value for name, value in found.items() if value is not None}

    def names(self, *prefix: str) -> list[str]:
        check_key(prefix, prefix=True)
        directory = self.root.joinpath(*prefix)
        try:
            entries = list(directory.iterdir())
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as err:
            raise StateStoreError(f"cannot list {directory}: {err.strerror}") from err
        return sorted(
            entry.name[: -len(".json")]
            for entry in entries
            if entry.name.endswith(".json")
            and not entry.name.startswith(".tmp-")  # put's file before its rename
            and _SAFE.match(entry.name[: -len(".json")])
            and entry.is_file()
        )

    @contextlib.contextmanager
    def _locked(self, *parts: str) -> Iterator[None]:
        """An exclusive lock on one document, across processes (``flock`` on a lock file
        beside it; NFS v4 and Azure Files NFS map it to byte-range locks)."""
        path = self._path(*parts)
        lock_path = path.with_name(f".{path.name}.lock")
        try:
            make_private_dir(path.parent)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as err:
            raise StateStoreError(f"cannot lock {path}: {err.strerror}") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def update(self, *parts: str, change: Callable[[Any | None], Any | None]) -> Any | None:
        """Read-modify-write one document atomically with respect to every other ``update``
        of it: ``change(current)`` returns the new value (None: delete it); returns it."""
        with self._locked(*parts):
            new = change(self.get(*parts))
            if new is None:
                self.delete(*parts)
            else:
                self.put(*parts, value=new)
            return new

    def __repr__(self) -> str:
        return f"StateStore({str(self.root)!r})"
