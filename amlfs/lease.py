"""One orchestrator per cluster: a lease with a fencing token, kept in the state store.

A cluster upgrade takes its cluster's lease before it changes anything, renews it while it
runs and gives it back at the end. A second orchestrator (another fleet run, another worker,
a resume started too early) is refused with the holder's name and when the lease expires. A
resume takes over a lease only once it expired, or at once when its holder is a process of
this host that no longer exists (a SIGKILLed run: its pid is gone or belongs to a newer
process). Each takeover increments the token; every Azure write, node-changing command and
journal write of the holder first checks that the stored token is still its own
(``ClusterLease.check``), so an orchestrator that was paused past its expiry and wakes after a
takeover stops without changing anything more (``LeaseLostError``).

The record (``clusters/NAME/lease``) also keeps the ids of the runs that held it: an OS disk
tagged by one of them and attached to nothing is this store's own leftover (an orphan to
delete); a disk tagged by a run this store never saw may belong to an orchestrator working
from another state store, and is not touched.

Lease times are wall-clock seconds (``time.time``): the holders are different processes,
possibly on different machines, and the lease must mean the same to all of them.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from amlfs.errors import AmlfsError, StateStoreError
from amlfs.store import Store

__all__ = [
    "ClusterLease",
    "FencedGateway",
    "FencedShells",
    "LeaseHeldError",
    "LeaseLostError",
    "holder_alive",
    "process_alive",
]

RUNS_KEPT = 50


class LeaseHeldError(AmlfsError):
    """Another orchestrator holds the cluster's lease: nothing was changed."""


class LeaseLostError(AmlfsError):
    """This orchestrator's lease was taken over: it must stop changing the cluster."""


@dataclass(frozen=True)
class Holder:
    run_id: str
    host: str
    pid: int
    pid_start: str | None  # the process's start time (/proc), to tell a reused pid
    nonce: str

    def describe(self) -> str:
        return f"run {self.run_id} (host {self.host}, pid {self.pid})"


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), None if it is not running
    (gone or a zombie) or this system has no /proc."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            text = stat.read()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[-1].split()
    if not fields or fields[0] in ("Z", "X"):
        return None
    return fields[19] if len(fields) > 19 else None


def _has_proc() -> bool:
    return os.path.exists(f"/proc/{os.getpid()}/stat")


def process_alive(host: str | None, pid: int, pid_start: str | None) -> bool | None:
    """Is process ``pid`` (started at ``pid_start``, as ``/proc`` tells) of ``host`` still
    running? None when this cannot be told from here (another host, or no /proc)."""
    if host != socket.gethostname() or not _has_proc():
        return None
    start = _process_start(int(pid))
    return start is not None and (not pid_start or start == pid_start)


def _live(record: dict[str, Any] | None, now: float) -> bool:
    """Does ``record`` (a lease) name a live holder at wall time ``now``?"""
    holder = (record or {}).get("holder")
    if not record or not holder:
        return False
    if float(record.get("expires_at", 0)) <= now:
        return False
    alive = process_alive(holder.get("host"), int(holder.get("pid", 0)), holder.get("pid_start"))
    return alive is not False  # that process is gone: its lease dies with it


def holder_alive(store: Store, cluster: str, *, wall: Callable[[], float] = time.time) -> bool:
    """Does a live orchestrator hold ``cluster``'s lease now? (No when the lease expired, was
    given back, or its holder is a process of this host that is gone.)"""
    return _live(store.get("clusters", cluster, "lease"), wall())


class ClusterLease:
    """The lease of one cluster, for one orchestrator (one ``ClusterUpgrade``)."""

    def __init__(
        self,
        store: Store,
        cluster: str,
        run_id: str,
        *,
        ttl_s: float = 60.0,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        self.store = store
        self.cluster = cluster
        self.ttl_s = ttl_s
        self.wall = wall
        pid = os.getpid()
        self.holder = Holder(
            run_id, socket.gethostname(), pid, _process_start(pid), secrets.token_hex(8)
        )
        self.token: int | None = None
        self.runs: list[str] = []
        self._lost: str | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    @property
    def key(self) -> tuple[str, ...]:
        return ("clusters", self.cluster, "lease")

    # ------------------------------------------------------------------ acquire / release

    def _holder_alive(self, record: dict[str, Any]) -> bool:
        return _live(record, self.wall())

    def acquire(self) -> None:
        """Take the lease, or raise ``LeaseHeldError`` naming the live holder."""

        def change(record: dict[str, Any] | None) -> dict[str, Any]:
            record = dict(record or {"token": 0, "runs": []})
            holder = record.get("holder")
            mine = holder is not None and holder.get("nonce") == self.holder.nonce
            if not mine and self._holder_alive(record):
                assert holder is not None
                expires = time.strftime(
                    "%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(record["expires_at"]))
                )
                raise LeaseHeldError(
                    f"{self.cluster}: another orchestrator holds the cluster's lease: "
                    f"run {holder.get('run_id')} (host {holder.get('host')}, pid "
                    f"{holder.get('pid')}); it expires at {expires} unless renewed. Nothing "
                    "was changed; run again once that run has ended"
                )
            if not mine:
                record["token"] = int(record.get("token", 0)) + 1
            runs = [r for r in record.get("runs", []) if r != self.holder.run_id]
            record["runs"] = [*runs, self.holder.run_id][-RUNS_KEPT:]
            record["holder"] = asdict(self.holder)
            record["expires_at"] = self.wall() + self.ttl_s
            return record

        record = self.store.update(*self.key, change=change)
        assert record is not None
        self.token = int(record["token"])
        self.runs = list(record["runs"])
        self._lost = None

    def adopt_run(self, run_id: str) -> None:
        """Name the run this holder continues (a resume carries on the journal's run)."""
        if run_id == self.holder.run_id:
            return
        self.holder = Holder(
            run_id, self.holder.host, self.holder.pid, self.holder.pid_start, self.holder.nonce
        )
        self.renew()

    def knows_run(self, run_id: str) -> bool:
        """Did a run of this state store ever hold this cluster's lease?"""
        return run_id in self.runs

    def release(self) -> None:
        """Give the lease back (if still ours) and stop renewing it."""
        self.stop_renewing()
        if self.token is None:
            return

        def change(record: dict[str, Any] | None) -> dict[str, Any] | None:
            if record is None or not self._is_mine(record):
                return record
            record = dict(record)
            record["holder"] = None
            record["expires_at"] = 0
            return record

        with contextlib.suppress(StateStoreError):  # else it expires on its own
            self.store.update(*self.key, change=change)
        self.token = None

    # ------------------------------------------------------------------ fencing

    def _is_mine(self, record: dict[str, Any]) -> bool:
        holder = record.get("holder") or {}
        return record.get("token") == self.token and holder.get("nonce") == self.holder.nonce

    def renew(self) -> None:
        """Push the expiry on; ``LeaseLostError`` if another orchestrator took the lease."""

        def change(record: dict[str, Any] | None) -> dict[str, Any]:
            if record is None or not self._is_mine(record):
                raise self._lost_error(record)
            record = dict(record)
            record["holder"] = asdict(self.holder)
            record["expires_at"] = self.wall() + self.ttl_s
            return record

        self.store.update(*self.key, change=change)

    def _lost_error(self, record: dict[str, Any] | None) -> LeaseLostError:
        holder = (record or {}).get("holder") or {}
        who = f"run {holder.get('run_id')} (host {holder.get('host')}, pid {holder.get('pid')})"
        self._lost = (
            f"{self.cluster}: this orchestrator's lease (token {self.token}) was taken over by "
            f"{who if holder else 'nobody (it was released)'}: stopping without changing "
            "anything more"
        )
        return LeaseLostError(self._lost)

    def check(self) -> None:
        """The fence: raise ``LeaseLostError`` unless the lease is still ours. Called before
        every change to Azure, a node or the journal."""
        if self._lost is not None:
            raise LeaseLostError(self._lost)
        if self.token is None:
            raise LeaseLostError(f"{self.cluster}: no lease held: refusing to change anything")
        record = self.store.get(*self.key)
        if record is None or not self._is_mine(record):
            raise self._lost_error(record)
        if float(record.get("expires_at", 0)) <= self.wall():
            self.renew()  # paused past our expiry, and nobody took over: still ours

    # ------------------------------------------------------------------ renewal

    def start_renewing(self) -> None:
        """Renew every ttl/4 on a daemon thread until ``release``."""
        if self._renewer is not None:
            return
        self._stop.clear()

        def loop() -> None:
            while not self._stop.wait(self.ttl_s / 4):
                try:
                    self.renew()
                except LeaseLostError:
                    return
                except StateStoreError:
                    continue  # try again at the next turn; check() still fences

        self._renewer = threading.Thread(
            target=loop, name=f"amlfs-lease-{self.cluster}", daemon=True
        )
        self._renewer.start()

    def stop_renewing(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=10)
            self._renewer = None


# ---------------------------------------------------------------------- fenced gateways

GATEWAY_WRITES = frozenset(
    {"create_os_disk", "delete_disk", "tag_disk", "power_off", "start", "update_vm", "swap_os_disk"}
)


class FencedGateway:
    """A ``ComputeGateway`` whose writes first check the fence; reads pass through."""

    def __init__(self, inner: Any, fence: Callable[[], None]) -> None:
        self._inner = inner
        self._fence = fence

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._inner, name)
        if name not in GATEWAY_WRITES:
            return value

        def fenced(*args: Any, **kwargs: Any) -> Any:
            self._fence()
            return value(*args, **kwargs)

        return fenced


class _FencedShell:
    """A ``NodeShell`` whose ``run`` (the only way to change a node) first checks the fence;
    ``run_batch`` is read-only by contract and passes through."""

    def __init__(self, inner: Any, fence: Callable[[], None]) -> None:
        self._inner = inner
        self._fence = fence

    def run(self, *args: Any, **kwargs: Any) -> Any:
        self._fence()
        return self._inner.run(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class FencedShells:
    """A ``ShellSource`` handing out fenced shells."""

    def __init__(self, inner: Any, fence: Callable[[], None]) -> None:
        self._inner = inner
        self._fence = fence

    def shell(self, name: str, address: str) -> Any:
        return _FencedShell(self._inner.shell(name, address), self._fence)
