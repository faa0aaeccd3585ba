"""How the task-worker executor tells a job that will not finish (``TaskWorkerExecutor._dead``)
from one that is running or still queued: from what the worker left in the state store when it
began (host, pid) and the cluster's lease, never from a Prefect task-run state; and how a
worker finds which attempt of a job a task run is (from its name: task runs carry no tags)."""

from __future__ import annotations

import contextvars
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from amlfs.jobs import ClusterJob
from amlfs.lease import ClusterLease, holder_alive, process_alive
from amlfs.models import load_fleet
from amlfs.store import StateStore
from flows.taskworkers import OUTCOMES, STARTS, TaskWorkerExecutor, _attempt_of, attempt_run_name
from tests.conftest import SMALL_FLEET
from tests.test_fleet import RELEASE

RUN_ID = "7d0c1f8e-0000-4000-8000-000000000001"
CLUSTER = load_fleet(SMALL_FLEET).clusters[0]


def executor(store: StateStore, **options: float) -> TaskWorkerExecutor:
    return TaskWorkerExecutor(store, "w49", {}, contextvars.copy_context(), **options)  # type: ignore[arg-type]


def gone_pid() -> int:
    """A pid of this host whose process has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def started(store: StateStore, cluster: str, **mark: object) -> None:
    value = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": None, "at": time.time()}
    store.put(STARTS, "w49", f"{cluster}.{RUN_ID}", value={**value, **mark})


def test_a_queued_job_waits_then_is_submitted_again(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    job = ClusterJob(cluster=CLUSTER, release=RELEASE)
    ex = executor(store, start_timeout_s=60)
    assert ex._dead(job, RUN_ID, submitted=time.time() - 5) is None
    why = ex._dead(job, RUN_ID, submitted=time.time() - 61)
    assert why is not None
    assert "not started after 61 s" in why


def test_a_job_whose_worker_process_is_gone_is_dead_at_once(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    job = ClusterJob(cluster=CLUSTER, release=RELEASE)
    ex = executor(store)
    started(store, job.name)  # this process: alive
    assert ex._dead(job, RUN_ID, submitted=time.time()) is None
    pid = gone_pid()
    assert process_alive(socket.gethostname(), pid, None) is False
    started(store, job.name, pid=pid)
    why = ex._dead(job, RUN_ID, submitted=time.time())
    assert why is not None
    assert f"pid {pid}) is gone" in why
    # ... unless it wrote its outcome before it went: then it finished.
    store.put(OUTCOMES, "w49", f"{job.name}.{RUN_ID}", value={"outcome": "upgraded"})
    assert ex._dead(job, RUN_ID, submitted=time.time()) is None


@pytest.mark.parametrize("lease_alive", [True, False])
def test_a_job_on_another_host_is_judged_by_the_clusters_lease(
    tmp_path: Path, lease_alive: bool
) -> None:
    store = StateStore(tmp_path)
    job = ClusterJob(cluster=CLUSTER, release=RELEASE)
    ex = executor(store, lease_ttl_s=30)
    assert process_alive("another-host", 1, None) is None  # cannot be told from here
    started(store, job.name, host="another-host", pid=1, at=time.time() - 5)
    assert ex._dead(job, RUN_ID, submitted=time.time()) is None  # too soon to judge
    started(store, job.name, host="another-host", pid=1, at=time.time() - 31)
    lease = ClusterLease(store, job.name, "run-a", ttl_s=30)
    lease.acquire()
    if not lease_alive:
        lease.release()
    assert holder_alive(store, job.name) is lease_alive
    why = ex._dead(job, RUN_ID, submitted=time.time())
    if lease_alive:
        assert why is None
    else:
        assert why is not None
        assert "the cluster's lease expired" in why


def test_a_store_url_with_a_password_is_refused_without_showing_it() -> None:
    from pydantic import ValidationError

    from flows.cluster_upgrade import ClusterUpgradeParams
    from flows.fleet_maintenance import FleetParams

    url = "postgresql://amlfs:hunter2-secret@db.example:5432/amlfs"
    for make in (
        lambda: FleetParams(fleet_file="f", release_file="r", state_dir=url),
        lambda: ClusterUpgradeParams(fleet_file="f", cluster="c", release_file="r", state_dir=url),
    ):
        with pytest.raises(ValidationError) as caught:
            make()
        assert "PGPASSWORD" in str(caught.value)
        assert "hunter2" not in str(caught.value)
    assert FleetParams(
        fleet_file="f", release_file="r", state_dir=url.replace(":hunter2-secret", "")
    )


@pytest.mark.parametrize(
    ("name", "attempt"),
    [
        (attempt_run_name("lustre-eus-01", "3f2a1b0c9d8e"), "3f2a1b0c9d8e"),  # no flow run
        (attempt_run_name("lustre-eus-01", "3f2a1b0c9d8e") + "-12", "3f2a1b0c9d8e"),  # Prefect's -N
        ("lustre-eus-01-0", None),  # a task run of an earlier version (tags named its attempt)
        ("lustre-eus-01 #3f2a1b0c9d8e-0 copy", None),
    ],
)
def test_a_job_task_run_is_found_by_the_attempt_in_its_name(name: str, attempt: str | None) -> None:
    assert _attempt_of(name) == attempt
