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
  a file system shared by the machines) and no tags: the job is in the store
  (``fleet-jobs/RUN/CLUSTER``), and the run is named after the cluster and the attempt
  (``NAME #ATTEMPT``, Prefect adds ``-N`` under a flow run); the attempt's document
  (``fleet-job-attempts/ATTEMPT``) names the fleet run and the cluster. No tags, because for
  every distinct set of tags a task worker's engine starts a concurrency-slot service while
  holding a lock its event loop also takes to emit the run's event: with runs arriving at
  once, the worker deadlocked and started nothing more (prefect 3.x; ``bench/RESULTS.md``);
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

import contextlib
import contextvars
import os
import re
import secrets
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
from flows.cluster_upgrade import connection_settings

__all__ = [
    "ABORTS",
    "ATTEMPTS",
    "JOBS",
    "OUTCOMES",
    "STARTS",
    "TaskWorkerExecutor",
    "cluster_job",
    "serve_task_workers",
]

JOBS = "fleet-jobs"
ATTEMPTS = "fleet-job-attempts"
STARTS = "fleet-job-starts"
OUTCOMES = "fleet-job-outcomes"
ABORTS = "fleet-job-aborts"
BUSY_WAITS = 3  # busy answers to a follow-up, each waited out one lease
# "NAME #ATTEMPT", and "-N" when Prefect numbers the runs of a flow run's task.
_ATTEMPT_IN_NAME = re.compile(r".+ #(?P<attempt>[0-9a-f]{12})(?:-\d+)?")
# Prefect numbers a flow run's task runs with a counter in the flow run's context, read and
# written without a lock: two threads may take one number, and the server then answers the
# second .delay() with the first one's task run (same flow run, task and number).
_SUBMIT_LOCK = threading.Lock()


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
        with self._lock:  # made once (cheap: clients and sessions open on first use)
            existing = self._connections.get(key)
            if existing is None:
                azure, ssh = connection_settings(*key)
                existing = self._connections[key] = Connections.create(
                    *share_of(azure, ssh, self.share)
                )
            return existing

    def begin(self, run: str) -> None:
        names = self._abort_requests(run) or set()  # now, not at the watcher's next turn
        with self._lock:
            self._in_flight[run] = self._in_flight.get(run, 0) + 1
            self._aborted[run] = names

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


def attempt_run_name(cluster: str, attempt: str) -> str:
    """The name of an attempt's task run (Prefect may add ``-N``)."""
    return f"{cluster} #{attempt}"


def _attempt_of(name: str) -> str | None:
    found = _ATTEMPT_IN_NAME.fullmatch(name)
    return found["attempt"] if found is not None else None


def _put_outcome(store: Store, run: str, key: str, record: dict[str, Any]) -> None:
    """Write the outcome, trying again for a minute: without it the fleet waits for it."""
    for attempt in range(12):
        try:
            store.put(OUTCOMES, run, key, value=record)
            return
        except StateStoreError:
            if attempt == 11:
                raise
            time.sleep(5.0)


def _cluster_job() -> State[Any]:
    """One cluster's job, as a task run on a task worker (see the module's docstring)."""
    from prefect.states import Completed

    from tasks import run_step
    from tasks.cluster import outcome_state

    worker = _WORKER
    if worker is None:
        raise RuntimeError("cluster-job runs inside `amlfs task-worker` processes only")
    name = task_run.get_name() or ""
    attempt = _attempt_of(name)
    store = worker.store
    whose = store.get(ATTEMPTS, attempt) if attempt is not None else None
    if whose is None:
        raise RuntimeError(
            f"task run {name!r} does not name an attempt of a fleet run's job "
            f"(CLUSTER #ATTEMPT, and {ATTEMPTS}/ATTEMPT in the state store)"
        )
    run, cluster = str(whose["fleet_run"]), str(whose["cluster"])
    key = f"{cluster}.{task_run.get_id()}"
    logger = get_run_logger()
    ticket = store.get(JOBS, run, cluster)
    if ticket is None or attempt not in ticket.get("attempts", []):
        # A copy the fleet run gave up on (it was queued too long, or its run decided), or
        # left from an earlier run of this name: it must not touch the cluster.
        why = f"{cluster}: not a live attempt of fleet run {run}'s job: nothing done"
        logger.warning(why)
        return Completed(name="Stale", message=why)
    store.put(STARTS, run, key, value=_started_mark())
    job: ClusterJob | None = None
    worker.begin(run)
    try:
        job = ClusterJob.model_validate(ticket["job"])
        outcome = run_job(
            job,
            worker.connections(ticket["connect"]),
            store,
            should_abort=lambda: worker.aborted(run, cluster),
            log=logger.info,
            runner=run_step,
        )
    except Exception as err:  # recorded: the fleet counts it failed, with the reason
        reason = f"{type(err).__name__}: {err}"
        outcome = (
            ClusterOutcome.failed(job, reason)
            if job is not None
            else ClusterOutcome(cluster=cluster, outcome="failed_needs_attention", reason=reason)
        )
    finally:
        worker.end(run)
    outcome.orchestrator_pid = os.getpid()
    record = outcome.record()
    _put_outcome(store, run, key, record)
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
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.task_worker import serve

    global _WORKER
    store = open_store(store_location)
    store.names(JOBS)  # reach it now: a wrong location is an error here, not a silent worker
    _WORKER = _Worker(store, share)
    # Start the event and log services before runs arrive. Else the first job's thread starts
    # the log service holding the lock that the worker's event loop takes for each run it
    # receives, and waits for that loop: the module docstring's deadlock, at most once a
    # process (read in prefect's services.py; not seen in the bench or the tests).
    EventsWorker.instance()
    APILogWorker.instance()
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

    def _ticket(self, job: ClusterJob, attempts: list[str]) -> None:
        """The job as the workers read it, with the attempts that may run it (none: the
        fleet run decided; a copy that runs later does nothing)."""
        self.store.put(
            JOBS,
            self.fleet_run,
            job.name,
            value={
                "job": job.model_dump(mode="json"),
                "connect": self.connect,
                "attempts": attempts,
            },
        )

    def _submit(self, job: ClusterJob, attempts: list[str]) -> str:
        """One more task run of ``job``; ``attempts``: the live ones so far (their ids)."""
        from prefect.context import TagsContext

        attempt = secrets.token_hex(6)
        self.store.put(ATTEMPTS, attempt, value={"fleet_run": self.fleet_run, "cluster": job.name})
        self._ticket(job, [*attempts, attempt])

        def submit() -> str:
            # Named after the cluster and the attempt (a task run name given to .delay() is
            # not used: the task's name is), without tags, not even the caller's (see the
            # module's docstring).
            options = cluster_job.with_options(name=attempt_run_name(job.name, attempt), tags=[])
            with _SUBMIT_LOCK, TagsContext(current_tags=set()):
                return str(options.delay().task_run_id)

        attempts.append(attempt)
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
        long_ago = time.time() - float(started["at"]) > self.lease_ttl_s
        if alive is False:
            why = f"its task worker (host {started['host']}, pid {started['pid']}) is gone"
        elif not long_ago or holder_alive(self.store, job.name):
            return None
        elif alive is None:
            why = f"task run {run_id} on host {started['host']}: the cluster's lease expired"
        else:
            # Its worker lives and nobody holds the lease: did the run end without writing
            # its outcome (the store refused it)? Only Prefect can say.
            ended = self._ended(run_id)
            if ended is None:
                return None
            why = f"task run {run_id} ended {ended} without recording an outcome"
        if self.store.get(OUTCOMES, self.fleet_run, key) is not None:
            return None  # it finished meanwhile
        return why

    def _ended(self, run_id: str) -> str | None:
        """The final state of task run ``run_id`` in Prefect (None: not final, or unknown)."""
        from prefect.client.orchestration import get_client

        try:
            with get_client(sync_client=True) as client:
                state = client.read_task_run(UUID(run_id)).state
        except Exception as err:  # unknown: judged again at the next check
            self.log(f"cannot read task run {run_id}: {err}")
            return None
        return state.type.value if state is not None and state.is_final() else None

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
        outcome = ClusterOutcome.from_record(answer)
        outcome.follow_ups = follow_ups
        return outcome

    def run(self, job: ClusterJob, should_abort: Callable[[], bool]) -> ClusterOutcome:
        attempt_ids: list[str] = []  # the attempts, in the JOBS document
        try:
            return self._run(job, should_abort, attempt_ids)
        finally:
            with contextlib.suppress(StateStoreError):  # else a late copy finds the lease
                self._ticket(job, [])

    def _run(
        self, job: ClusterJob, should_abort: Callable[[], bool], attempt_ids: list[str]
    ) -> ClusterOutcome:
        run = self.fleet_run
        self.store.delete(ABORTS, run, job.name)  # an earlier run's request of this name
        attempts = [(self._submit(job, attempt_ids), time.time())]
        answers: dict[str, dict[str, Any]] = {}
        abort_sent = False
        busy_waits = 0
        checked = time.monotonic()
        wake = threading.Event()
        while True:
            wake.wait(self.poll_s)
            try:
                if not abort_sent and should_abort():
                    self.store.put(ABORTS, run, job.name, value={"at": time.time()})
                    abort_sent = True
                decided = self._answers(job, attempts, answers)
                if decided is not None:
                    return self._outcome(job, decided, len(attempts) - 1)
                if time.monotonic() - checked < self.check_every_s:
                    continue
                checked = time.monotonic()
                latest, submitted = attempts[-1]
                if latest in answers:
                    # Busy: another orchestrator holds the cluster, or the lease of an earlier
                    # attempt whose worker died is not expired yet (clocks of two hosts
                    # differ): wait one lease, then try again, a few times.
                    waiting = [(r, t) for r, t in attempts if r not in answers]
                    if not all(self._dead(job, r, t) for r, t in waiting):
                        continue
                    if not waiting or busy_waits >= BUSY_WAITS:
                        return self._outcome(job, answers[latest], len(attempts) - 1)
                    busy_waits += 1
                    self.log(f"{job.name}: busy: trying again in {self.lease_ttl_s:.0f} s")
                    wake.wait(self.lease_ttl_s)
                    attempts.append((self._submit(job, attempt_ids), time.time()))
                    continue
                why = self._dead(job, latest, submitted)
                if why is None:
                    continue
                self._crash(latest, why)
                given_up = self._give_up(job, attempts, why)
                if given_up is not None:
                    return given_up
                started = self.store.get(STARTS, run, f"{job.name}.{latest}") is not None
                what = "resumes from its journal" if started else "was not started"
                self.log(f"{job.name}: {why}: submitting it again (it {what})")
                attempts.append((self._submit(job, attempt_ids), time.time()))
            except StateStoreError as err:  # the store did not answer: ask again next poll
                self.log(f"{job.name}: cannot read the state store: {err}; trying again")

    def _give_up(
        self, job: ClusterJob, attempts: list[tuple[str, float]], why: str
    ) -> ClusterOutcome | None:
        """The outcome once ``follow_ups`` more task runs did not finish (None: try again)."""
        if len(attempts) <= self.follow_ups:
            return None
        if not any(self.store.get(STARTS, self.fleet_run, f"{job.name}.{r}") for r, _ in attempts):
            # Never started anywhere: the cluster was not touched. Not a failure of the
            # release; a resume of the fleet run runs it again.
            return ClusterOutcome.failed(
                job,
                f"{why}: no task worker started any of its {len(attempts)} task runs (are "
                "`amlfs task-worker` processes running, on this state store, against this "
                "Prefect server, with --limit enough?); nothing was changed; run again with the "
                "same run name",
                outcome="interrupted",
            )
        return ClusterOutcome.failed(
            job,
            f"{why}; {len(attempts)} task runs did not finish: the cluster is where its "
            "journal says; run the fleet again with the same run name to resume it",
        )

    def _answers(
        self,
        job: ClusterJob,
        attempts: list[tuple[str, float]],
        answers: dict[str, dict[str, Any]],
    ) -> dict[str, Any] | None:
        """Collect the attempts' outcomes; the first that is not busy decides (one busy
        answer to a single attempt decides too)."""
        listed = self._outcomes_listed()
        for run_id, _ in attempts:
            key = f"{job.name}.{run_id}"
            if run_id not in answers and key in listed:
                answer = self.store.get(OUTCOMES, self.fleet_run, key)
                if answer is not None:
                    answers[run_id] = answer
        decided = next((a for a in answers.values() if a.get("outcome") != "busy"), None)
        if decided is None and len(attempts) == 1 and answers:
            decided = answers[attempts[0][0]]
        return decided
