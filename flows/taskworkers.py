"""Prefect task workers carry the fleet: each cluster's job is a task run of ``cluster-job``
served by ``amlfs task-worker`` processes (on this machine or others) that share the fleet
run's state store (a PostgreSQL store across machines; no shared file system).

What the design rests on (issue 19, measured with prefect 3.x; ``bench/RESULTS.md``): a task
run submitted with ``.delay()`` from the fleet's flow run is created under it, named after its
cluster, with its steps (nested tasks) recorded under it; but the task queue and part of the
task-run state pipeline live in the server's memory, a SIGKILLed worker's task runs stay
RUNNING (no task-run heartbeat), and a run it had received but not started stays SCHEDULED.
So Prefect carries the work and shows it; the state store says what happened:

* the task run has no parameters (nothing goes to Prefect's result storage, which would need
  a file system shared by the machines): the job is in the store (``fleet-jobs/RUN/CLUSTER``)
  and the task run's tags name it (``fleet-run:RUN``, ``cluster:NAME``); it is named after
  the cluster (``NAME-0``);
* the worker notes where it runs the job when it begins (``fleet-job-starts/RUN/CLUSTER.ID``:
  host, pid) and writes the outcome (``fleet-job-outcomes/RUN/CLUSTER.ID``); the fleet records
  that outcome, never a task run's state alone;
* liveness is the worker's process (same host: its pid) and the cluster's lease (renewed
  while the saga runs, on any host): a job whose process is gone or whose lease expired is
  submitted again, and the new task run resumes the cluster from its journal. A task run not
  started after ``start_timeout_s`` is submitted again too. Two runs of one job are safe: the
  lease lets one act, the other answers ``busy``, and the executor takes the first outcome
  that is not busy;
* an abort is a document (``fleet-job-aborts/RUN/CLUSTER``) each worker process reads once a
  second for the runs it has jobs of.
"""

from __future__ import annotations

import contextvars
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any
from uuid import UUID

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State
from prefect.runtime import task_run

from amlfs.errors import StateStoreError
from amlfs.jobs import ClusterJob, ClusterOutcome, run_job
from amlfs.lease import _process_start, holder_alive, process_alive
from amlfs.runtime import Connections, share_of
from amlfs.store import Store, open_store
from flows.cluster_upgrade import connection_settings, customer_view

__all__ = [
    "ABORTS",
    "JOBS",
    "OUTCOMES",
    "STARTS",
    "TaskWorkerExecutor",
    "cluster_job",
    "serve_task_workers",
]

JOBS = "fleet-jobs"
STARTS = "fleet-job-starts"
OUTCOMES = "fleet-job-outcomes"
ABORTS = "fleet-job-aborts"
RUN_TAG = "fleet-run:"
CLUSTER_TAG = "cluster:"


# ---------------------------------------------------------------------- the worker's side


class _Worker:
    """What a task-worker process shares between the jobs it runs: the store, one set of
    connections per target (its ``share`` of every rate), and the abort requests."""

    def __init__(self, store: Store, share: float) -> None:
        self.store = store
        self.share = share
        self._connections: dict[tuple[str | None, str, str], Connections] = {}
        self._lock = threading.Lock()
        self._in_flight: dict[str, int] = {}  # fleet run: jobs running here
        self._aborted: dict[str, set[str]] = {}  # fleet run: clusters asked to abort
        self._watcher = threading.Thread(target=self._watch, name="abort-watch", daemon=True)
        self._watcher.start()

    def connections(self, connect: dict[str, Any]) -> Connections:
        key = (connect.get("emulator_endpoint"), connect["azure_block"], connect["ssh_block"])
        with self._lock:
            existing = self._connections.get(key)
            if existing is not None:
                return existing
        azure, ssh = connection_settings(*key)
        made = Connections.create(*share_of(azure, ssh, self.share))
        with self._lock:
            return self._connections.setdefault(key, made)

    def begin(self, run: str) -> None:
        with self._lock:
            self._in_flight[run] = self._in_flight.get(run, 0) + 1

    def end(self, run: str) -> None:
        with self._lock:
            self._in_flight[run] -= 1
            if not self._in_flight[run]:
                del self._in_flight[run]
                self._aborted.pop(run, None)

    def aborted(self, run: str, cluster: str) -> bool:
        return cluster in self._aborted.get(run, ())

    def _watch(self) -> None:
        while True:
            time.sleep(1.0)
            with self._lock:
                runs = list(self._in_flight)
            for run in runs:
                names = self._abort_requests(run)
                if names is None:
                    continue  # the store did not answer: ask again in a second
                with self._lock:
                    if run in self._in_flight:
                        self._aborted[run] = names

    def _abort_requests(self, run: str) -> set[str] | None:
        try:
            return set(self.store.names(ABORTS, run))
        except StateStoreError:
            return None


_WORKER: _Worker | None = None


def _started_mark() -> dict[str, Any]:
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "pid": pid,
        "pid_start": _process_start(pid),
        "at": time.time(),
    }


def _cluster_job() -> State[Any]:
    """One cluster's job, as a task run on a task worker (see the module's docstring)."""
    from tasks import run_step
    from tasks.cluster import outcome_state

    worker = _WORKER
    if worker is None:
        raise RuntimeError("cluster-job runs inside `amlfs task-worker` processes only")
    tags = task_run.get_tags()
    runs = [t[len(RUN_TAG) :] for t in tags if t.startswith(RUN_TAG)]
    clusters = [t[len(CLUSTER_TAG) :] for t in tags if t.startswith(CLUSTER_TAG)]
    if len(runs) != 1 or len(clusters) != 1:
        raise RuntimeError(
            f"task run {task_run.get_name()!r} does not name one fleet run and one cluster "
            f"(tags {RUN_TAG}RUN, {CLUSTER_TAG}NAME): {tags}"
        )
    run, cluster = runs[0], clusters[0]
    key = f"{cluster}.{task_run.get_id()}"
    store = worker.store
    store.put(STARTS, run, key, value=_started_mark())
    logger = get_run_logger()
    ticket = store.get(JOBS, run, cluster)
    worker.begin(run)
    try:
        if ticket is None:
            raise RuntimeError(f"no job recorded for {cluster} in fleet run {run}")
        job = ClusterJob.model_validate(ticket["job"])
        try:
            outcome = run_job(
                job,
                worker.connections(ticket["connect"]),
                store,
                should_abort=lambda: worker.aborted(run, cluster),
                log=logger.info,
                runner=run_step,
            )
        except Exception as err:  # recorded: the fleet counts it failed, with the reason
            outcome = ClusterOutcome.failed(job, f"{type(err).__name__}: {err}")
    finally:
        worker.end(run)
    outcome.orchestrator_pid = os.getpid()
    record = outcome.record()
    store.put(OUTCOMES, run, key, value=record)
    logger.info("%s: %s %s", cluster, outcome.outcome, outcome.reason)
    return outcome_state(record)


# refresh_cache: without it, prefect 3.x reports every run of a parameterless deferred task
# after the first one "Cached" without running it, NO_CACHE notwithstanding (seen here).
cluster_job = task(
    name="cluster-job",
    cache_policy=NO_CACHE,
    persist_result=False,
    retries=0,
    refresh_cache=True,
)(_cluster_job)


def serve_task_workers(store_location: str, *, limit: int, share: float) -> None:
    """Serve ``cluster-job`` in this process until it is stopped (SIGTERM: Prefect's task
    worker shuts down gracefully). ``limit`` jobs at once; ``share`` of every rate."""
    from prefect.task_worker import serve

    global _WORKER
    _WORKER = _Worker(open_store(store_location), share)
    serve(cluster_job, limit=limit)


# ---------------------------------------------------------------------- the fleet's side


class TaskWorkerExecutor:
    """Jobs as ``cluster-job`` task runs of the fleet's flow run (``context``: a copy of its
    context), served by task workers sharing ``store``. ``connect`` names the target (the
    emulator's endpoint file or the Blocks) the workers resolve themselves: no secret passes
    through the store or Prefect."""

    def __init__(
        self,
        store: Store,
        fleet_run: str,
        connect: dict[str, Any],
        context: contextvars.Context,
        *,
        poll_s: float = 1.0,
        check_every_s: float = 5.0,
        start_timeout_s: float = 120.0,
        lease_ttl_s: float = 60.0,
        follow_ups: int = 2,
        emulator_endpoint: str | None = None,
        log: Callable[[str], None] = lambda message: None,
    ) -> None:
        self.store = store
        self.fleet_run = fleet_run
        self.connect = connect
        self.context = context
        self.poll_s = poll_s
        self.check_every_s = check_every_s
        self.start_timeout_s = start_timeout_s
        self.lease_ttl_s = lease_ttl_s
        self.follow_ups = follow_ups
        self.emulator_endpoint = emulator_endpoint
        self.log = log
        self._listed: set[str] = set()
        self._listed_at = 0.0
        self._list_lock = threading.Lock()

    def _outcomes_listed(self) -> set[str]:
        """The outcomes recorded for this fleet run: one listing a poll, for every job."""
        with self._list_lock:
            if time.monotonic() - self._listed_at >= self.poll_s:
                self._listed = set(self.store.names(OUTCOMES, self.fleet_run))
                self._listed_at = time.monotonic()
            return self._listed

    def _submit(self, job: ClusterJob) -> str:
        def submit() -> str:
            # Named after the cluster (Prefect adds -N; a task run name given to .delay() is
            # not used), the job found by its tags.
            options = cluster_job.with_options(
                name=job.name, tags=[f"{RUN_TAG}{self.fleet_run}", f"{CLUSTER_TAG}{job.name}"]
            )
            return str(options.delay().task_run_id)

        return self.context.copy().run(submit)

    def _dead(self, job: ClusterJob, run_id: str, submitted: float) -> str | None:
        """Why the task run ``run_id`` of ``job`` will not finish (None: it may)."""
        key = f"{job.name}.{run_id}"
        started = self.store.get(STARTS, self.fleet_run, key)
        if started is None:
            waited = time.time() - submitted
            if waited > self.start_timeout_s:
                return f"task run {run_id} not started after {waited:.0f} s"
            return None
        alive = process_alive(started["host"], started["pid"], started.get("pid_start"))
        if alive is False:
            why = f"its task worker (host {started['host']}, pid {started['pid']}) is gone"
        elif alive is None and time.time() - float(started["at"]) > self.lease_ttl_s:
            if holder_alive(self.store, job.name):
                return None
            why = f"task run {run_id} on host {started['host']}: the cluster's lease expired"
        else:
            return None
        if self.store.get(OUTCOMES, self.fleet_run, key) is not None:
            return None  # it finished meanwhile
        return why

    def _crash(self, run_id: str, why: str) -> None:
        """Mark an abandoned task run Crashed in Prefect, so that the UI does not show it
        RUNNING for ever (best effort: the store already says what happened)."""
        from prefect.client.orchestration import get_client
        from prefect.states import Crashed

        try:
            with get_client(sync_client=True) as client:
                client.set_task_run_state(UUID(run_id), Crashed(message=why), force=True)
        except Exception as err:
            self.log(f"could not mark task run {run_id} crashed: {err}")

    def _outcome(self, job: ClusterJob, answer: dict[str, Any], follow_ups: int) -> ClusterOutcome:
        outcome = ClusterOutcome.model_validate(answer)
        outcome.follow_ups = follow_ups
        if self.emulator_endpoint:
            outcome.customer_view = customer_view(self.emulator_endpoint, job.name)
        return outcome

    def run(self, job: ClusterJob, should_abort: Callable[[], bool]) -> ClusterOutcome:
        run = self.fleet_run
        self.store.delete(ABORTS, run, job.name)  # an earlier run's request of this name
        self.store.put(
            JOBS, run, job.name, value={"job": job.model_dump(mode="json"), "connect": self.connect}
        )
        attempts = [(self._submit(job), time.time())]
        answers: dict[str, dict[str, Any]] = {}
        abort_sent = False
        checked = time.monotonic()
        wake = threading.Event()
        while True:
            wake.wait(self.poll_s)
            if not abort_sent and should_abort():
                self.store.put(ABORTS, run, job.name, value={"at": time.time()})
                abort_sent = True
            listed = self._outcomes_listed()
            for run_id, _ in attempts:
                key = f"{job.name}.{run_id}"
                if run_id not in answers and key in listed:
                    answer = self.store.get(OUTCOMES, run, key)
                    if answer is not None:
                        answers[run_id] = answer
            decided = next((a for a in answers.values() if a.get("outcome") != "busy"), None)
            if decided is None and len(answers) == len(attempts):
                decided = answers[attempts[-1][0]]  # every run found the cluster busy
            if decided is not None:
                return self._outcome(job, decided, len(attempts) - 1)
            if time.monotonic() - checked < self.check_every_s:
                continue
            checked = time.monotonic()
            latest, submitted = attempts[-1]
            if latest in answers:  # busy: is an earlier run of the job still holding it?
                waiting = [(r, t) for r, t in attempts if r not in answers]
                if all(self._dead(job, r, t) for r, t in waiting):
                    return self._outcome(job, answers[latest], len(attempts) - 1)
                continue
            why = self._dead(job, latest, submitted)
            if why is None:
                continue
            self._crash(latest, why)
            if len(attempts) > self.follow_ups:
                return ClusterOutcome.failed(
                    job,
                    f"{why}; {len(attempts)} task runs did not finish: the cluster is where its "
                    "journal says; run the fleet again with the same run name to resume it",
                )
            self.log(f"{job.name}: {why}: submitting it again (it resumes from its journal)")
            attempts.append((self._submit(job), time.time()))
