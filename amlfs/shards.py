"""Run a fleet's clusters in several orchestrator processes on one machine.

One Python process runs its threads on one core (the GIL): with ~200 clusters in flight the
orchestrator process is saturated at 100% of a core while the machine still has CPU to spare
(bench/RESULTS.md, session 7). ``ShardPool`` keeps ``processes`` long-lived child processes
("shards"), each with its own connections (HTTPS pools, SSH sessions, and the process-wide
pacers at 1/N of their rates), running clusters on threads. Everything fleet-wide stays in
the parent: admission, caps, the ramp, the error budget and the record (``FleetRunner``
gives its jobs to a ``ShardPool``, an ``amlfs.jobs.Executor``, where it would run them
in-process; each shard runs a job with ``amlfs.jobs.run_job``).

A shard that dies (killed, out of memory) is seen at once (its pipe closes) and started
again; every cluster it was running is given to the new shard, which resumes it from its
journal in the state store, as a follow-up run does after a crash. A shard whose parent died
exits at once, so a resumed fleet run never races a leftover one on the same cluster.

Parent and shard talk over a socket pair with ``multiprocessing.connection`` (pickled
tuples). The shard is ``python -m amlfs.shards FD``, not a fork: a fork of a process with
hundreds of threads is unsafe, and ``multiprocessing``'s spawn would re-import the caller's
``__main__`` (a Prefect flow run, a benchmark).
"""

from __future__ import annotations

import dataclasses
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from amlfs.errors import AmlfsError
from amlfs.gcpauses import GcPauses, settle_heap
from amlfs.jobs import ClusterJob, ClusterOutcome, run_job
from amlfs.runtime import AzureSettings, Connections, SshSettings, share_of
from amlfs.store import open_store

__all__ = ["ShardError", "ShardPool", "ShardSpec", "ShardStats"]

Message = tuple[Any, ...]
# Real seconds between two looks at ``should_abort`` per cluster in flight: an abort reaches
# the shard's saga at most this much later than an in-process one.
ABORT_POLL_S = 0.2


class ShardError(AmlfsError):
    """An orchestrator process could not run a cluster (it would not start, or kept dying)."""


@dataclass(frozen=True)
class ShardSpec:
    """What every shard needs, sent to it once (through the pipe: secrets never touch argv,
    the environment or a file)."""

    azure: AzureSettings
    ssh: SshSettings
    state_dir: str
    forward_logs: bool = True
    # sys.setswitchinterval in the shard (None: Python's 5 ms). Hundreds of threads waiting
    # for the GIL each wake every interval: a fleet-sized shard wants a longer one.
    switch_interval_s: float | None = None
    # Freeze what the shard built at start-up out of full garbage collections (gcpauses).
    freeze_heap: bool = True

    def for_share(self, share: float) -> ShardSpec:
        """This spec with the process-wide rates cut to ``share`` of them (0 stays unpaced):
        the polls, and each subscription's ARM budget (reads, writes, deletes, disk lists),
        which the processes share because they run as one principal."""
        azure, ssh = share_of(self.azure, self.ssh, share)
        return dataclasses.replace(self, azure=azure, ssh=ssh)


@dataclass
class ShardStats:
    """CPU seconds the shards used (user + system, as each reported it on exit), restarts."""

    cpu_s: float = 0.0
    restarts: int = 0
    gc: list[dict[str, Any]] = field(default_factory=list)  # each shard's GcPauses, on exit
    lost_cpu: int = 0  # shards that died: their CPU time is not in cpu_s


@dataclass
class _Pending:
    job: ClusterJob
    done: threading.Event = field(default_factory=threading.Event)
    result: ClusterOutcome | None = None
    error: str | None = None
    abort_sent: bool = False


@dataclass
class _Shard:
    index: int
    generation: int
    process: subprocess.Popen[bytes]
    conn: Connection
    running: dict[str, _Pending] = field(default_factory=dict)
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    ready: threading.Event = field(default_factory=threading.Event)
    stopping: bool = False
    dead: bool = False  # its pipe closed: no new cluster goes to it

    def send(self, message: Message) -> bool:
        """False if the shard is gone (its reader thread restarts it)."""
        try:
            with self.send_lock:
                self.conn.send(message)
            return True
        except OSError:
            return False


class ShardPool:
    """``processes`` orchestrator processes; ``run`` runs one job on the least busy.

    Use as a context manager, or ``start()`` then ``close()``.
    """

    def __init__(
        self,
        spec: ShardSpec,
        processes: int,
        *,
        log: Callable[[str], None] = lambda message: None,
        max_restarts: int = 3,
        start_timeout_s: float = 120.0,
    ) -> None:
        if processes < 1:
            raise ValueError(f"processes must be >= 1, got {processes}")
        self.spec = spec.for_share(1.0 / processes)
        self.processes = processes
        self.log = log
        self.max_restarts = max_restarts
        self.start_timeout_s = start_timeout_s
        self.stats = ShardStats()
        self._shards: list[_Shard] = []
        self._lock = threading.Lock()
        self._closing = False

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> ShardPool:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        shards = [self._spawn(i, 0) for i in range(self.processes)]
        self._shards = shards
        for shard in shards:
            self._wait_ready(shard)
        self.log(
            f"orchestrator: {self.processes} processes (pids "
            f"{', '.join(str(s.process.pid) for s in shards)})"
        )

    def pids(self) -> list[int]:
        return [shard.process.pid for shard in self._shards]

    def pid_running(self, cluster: str) -> int | None:
        """The pid of the orchestrator process running ``cluster`` now (None: none is)."""
        with self._lock:
            for shard in self._shards:
                if cluster in shard.running and not shard.dead:
                    return shard.process.pid
        return None

    def close(self) -> ShardStats:
        """Stop every shard (a cluster still running on one is left to its journal)."""
        self._closing = True
        for shard in self._shards:
            shard.stopping = True
            shard.send(("stop",))
        for shard in self._shards:
            try:
                shard.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                shard.process.kill()
                shard.process.wait()
            shard.conn.close()
        return self.stats

    def _spawn(self, index: int, generation: int) -> _Shard:
        parent_end, child_end = socket.socketpair()
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "amlfs.shards", str(child_end.fileno())],
                pass_fds=(child_end.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        finally:
            child_end.close()
        shard = _Shard(index, generation, process, Connection(parent_end.detach()))
        shard.send(("spec", self.spec))
        threading.Thread(
            target=self._read, args=(shard,), name=f"shard-{index}-reader", daemon=True
        ).start()
        return shard

    def _wait_ready(self, shard: _Shard) -> None:
        if shard.ready.wait(self.start_timeout_s) and shard.dead:
            raise ShardError(
                f"orchestrator process {shard.index} (pid {shard.process.pid}) exited "
                f"({shard.process.wait()}) before it was ready: its error output is above"
            )
        if not shard.ready.is_set():
            shard.process.kill()
            raise ShardError(
                f"orchestrator process {shard.index} (pid {shard.process.pid}) did not start "
                f"within {self.start_timeout_s:.0f} s (exit {shard.process.poll()})"
            )

    # ------------------------------------------------------------------ clusters

    def run(
        self, job: ClusterJob, should_abort: Callable[[], bool] = lambda: False
    ) -> ClusterOutcome:
        """Run ``job`` on a shard and wait for its outcome. ``should_abort`` is asked every
        ``ABORT_POLL_S`` and passed on once it says yes."""
        cluster = job.cluster
        pending = _Pending(job)
        while True:
            with self._lock:
                if self._closing:
                    raise ShardError(f"{cluster.name}: the orchestrator processes are stopping")
                if not self._shards:
                    raise ShardError(f"{cluster.name}: no orchestrator process left")
                if any(cluster.name in s.running for s in self._shards):
                    raise ShardError(f"{cluster.name} is already running")
                live = [s for s in self._shards if not s.dead]
                if live:
                    shard = min(live, key=lambda s: len(s.running))
                    shard.running[cluster.name] = pending
                    break
            time.sleep(0.5)  # the only one is being started again
        shard.send(("run", job))  # if it is gone, the restart re-sends it
        while not pending.done.wait(ABORT_POLL_S):
            if not pending.abort_sent and should_abort():
                pending.abort_sent = True
                with self._lock:
                    owner = next(
                        (s for s in self._shards if s.running.get(cluster.name) is pending), None
                    )
                if owner is not None:
                    owner.send(("abort", cluster.name))
        if pending.error is not None:
            raise ShardError(pending.error)
        assert pending.result is not None
        return pending.result

    def _read(self, shard: _Shard) -> None:
        try:
            while True:
                message = shard.conn.recv()
                kind = message[0]
                if kind == "log":
                    self.log(message[1])
                elif kind in ("done", "error"):
                    with self._lock:
                        pending = shard.running.pop(message[1], None)
                    if pending is not None:
                        if kind == "done":
                            pending.result = message[2]
                        else:
                            pending.error = message[2]
                        pending.done.set()
                elif kind == "ready":
                    shard.ready.set()
                elif kind == "bye":
                    self.stats.cpu_s += message[1]
                    if len(message) > 2:
                        self.stats.gc.append(message[2])
                    return
        except (EOFError, OSError):
            pass
        if shard.stopping:
            return
        if not shard.ready.is_set():  # it never started: _wait_ready reports it
            shard.dead = True
            shard.ready.set()
            return
        self._lost(shard)

    def _lost(self, shard: _Shard) -> None:
        """``shard`` died: start it again and hand it the clusters it was running."""
        code = shard.process.wait()
        self.stats.lost_cpu += 1
        how = f"signal {-code}" if code < 0 else f"exit {code}"
        with self._lock:
            shard.dead = True
            orphans = dict(shard.running)
            shard.running.clear()
        names = ", ".join(sorted(orphans)) or "none"
        if shard.generation >= self.max_restarts:
            self.log(
                f"orchestrator process {shard.index} (pid {shard.process.pid}) died ({how}) "
                f"{shard.generation + 1} times; giving up its clusters: {names}"
            )
            for pending in orphans.values():
                pending.error = (
                    f"its orchestrator process died ({how}) {shard.generation + 1} times; the "
                    "cluster is where its journal says: resume it with a new run"
                )
                pending.done.set()
            with self._lock:
                self._shards = [s for s in self._shards if s is not shard]
            return
        self.log(
            f"orchestrator process {shard.index} (pid {shard.process.pid}) died ({how}): "
            f"starting it again; its clusters resume from their journals: {names}"
        )
        try:
            new = self._spawn(shard.index, shard.generation + 1)
            self._wait_ready(new)
        except (OSError, ShardError) as err:
            for pending in orphans.values():
                pending.error = f"its orchestrator process died ({how}) and did not restart: {err}"
                pending.done.set()
            with self._lock:
                self._shards = [s for s in self._shards if s is not shard]
            return
        self.stats.restarts += 1
        with self._lock:
            new.running.update(orphans)
            self._shards = [new if s is shard else s for s in self._shards]
        for name, pending in orphans.items():
            new.send(("run", pending.job))
            if pending.abort_sent:
                new.send(("abort", name))


# ---------------------------------------------------------------------- the shard process


def _serve(conn: Connection) -> None:
    # Prefect cancels a flow run by signalling its whole process group: the parent turns
    # SIGTERM into an abort and sends it to each cluster here. Dying on it instead would
    # leave the clusters in flight to a later resume rather than rolling them back now.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    kind, spec = conn.recv()
    if kind != "spec" or not isinstance(spec, ShardSpec):
        raise SystemExit(f"amlfs.shards: expected the spec first, got {kind!r}")
    if spec.switch_interval_s is not None:
        sys.setswitchinterval(spec.switch_interval_s)
    connections = Connections.create(spec.azure, spec.ssh)
    store = open_store(spec.state_dir)
    if spec.freeze_heap:
        settle_heap()
    pauses = GcPauses().install()
    send_lock = threading.Lock()
    aborted: set[str] = set()
    threads: list[threading.Thread] = []

    def send(message: Message) -> None:
        try:
            with send_lock:
                conn.send(message)
        except OSError:
            os._exit(3)  # the parent is gone: stop now, like a crash (journals resume)

    def log(message: str) -> None:
        if spec.forward_logs:
            send(("log", message))

    def run(job: ClusterJob) -> None:
        try:
            outcome = run_job(
                job, connections, store, should_abort=lambda: job.name in aborted, log=log
            )
            send(("done", job.name, outcome.model_copy(update={"orchestrator_pid": os.getpid()})))
        except Exception as err:  # reported to the parent, which records the cluster failed
            send(("error", job.name, f"{type(err).__name__}: {err}"))

    send(("ready",))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            os._exit(3)  # the parent died: never keep running clusters nobody records
        if message[0] == "run":
            job = message[1]
            aborted.discard(job.name)
            thread = threading.Thread(target=run, args=(job,), name=job.name)
            thread.start()
            threads = [t for t in threads if t.is_alive()] + [thread]
        elif message[0] == "abort":
            aborted.add(message[1])
        elif message[0] == "stop":
            # A cluster still running here is left to its journal, as after a crash (the
            # parent only stops the pool once every cluster it started has a result).
            if not any(t.is_alive() for t in threads):
                connections.close()
            usage = resource.getrusage(resource.RUSAGE_SELF)
            send(("bye", usage.ru_utime + usage.ru_stime, pauses.describe()))
            os._exit(0)


def main(argv: list[str]) -> None:
    conn = Connection(int(argv[1]))
    try:
        _serve(conn)
    finally:
        conn.close()


if __name__ == "__main__":
    # Run as ``python -m amlfs.shards``: this module is ``__main__`` here, so take the
    # functions (and the classes the parent pickles) from ``amlfs.shards`` itself.
    from amlfs.shards import main as _main

    _main(sys.argv)
