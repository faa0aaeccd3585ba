"""Scale-out on one machine: a Prefect server on PostgreSQL, a process work pool, N workers,
and the fleet flow dispatching each cluster as its own flow run (``run_deployment``).

    make scaleout-demo        # = python -m deployments.scaleout --workers 2

On several machines the same pieces run apart: the server (and its PostgreSQL) on one,
``prefect worker start --pool amlfs-process`` on each worker machine (with this repo, the
Blocks, and a state directory shared by all of them, e.g. NFS), and the fleet flow anywhere.
``ScaleOut`` is also what the scale-out test uses.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
POOL = "amlfs-process"
CLUSTER_DEPLOYMENT = "cluster-upgrade/amlfs-cluster-upgrade"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_prefect_server(
    port: int, env: dict[str, str], log: Any, log_path: Path, timeout_s: float = 120
) -> subprocess.Popen[bytes]:
    """``prefect server start`` on 127.0.0.1:``port`` (its own session), once /health answers."""
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/api/health"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise RuntimeError(f"prefect server did not start: {log_path.read_text()[-3000:]}")
        time.sleep(0.5)


def create_database(name: str, dsn: str) -> None:
    import asyncio

    import asyncpg

    async def create() -> None:
        conn = await asyncpg.connect(f"{dsn}/postgres")
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(create())


def drop_database(name: str, dsn: str) -> None:
    import asyncio

    import asyncpg

    async def drop() -> None:
        conn = await asyncpg.connect(f"{dsn}/postgres")
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    asyncio.run(drop())


class ScaleOut:
    """Server on PostgreSQL + pool + workers, started in ``__enter__``, stopped in ``__exit__``."""

    def __init__(
        self,
        home: Path,
        *,
        workers: int = 2,
        task_workers: int = 0,
        store: str | None = None,
        task_worker_limit: int = 130,
        dsn: str = "postgresql://postgres@127.0.0.1:5432",
        database: str | None = None,
    ) -> None:
        """``workers`` process-pool workers (each cluster a flow run of the deployment), or
        ``task_workers`` ``amlfs task-worker`` processes of ``store`` (each cluster a task
        run), ``task_worker_limit`` clusters each, each with 1/N of every rate."""
        if task_workers and not store:
            raise ValueError("task workers need the fleet's state store (store=...)")
        self.home = home
        self.workers_wanted = workers
        self.task_workers_wanted = task_workers
        self.store = store
        self.task_worker_limit = task_worker_limit
        self.dsn = dsn
        self.database = database or f"amlfs_scaleout_{os.getpid()}"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.server: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        self.task_workers: list[subprocess.Popen[bytes]] = []
        self._logs: list[Any] = []
        base = dict(os.environ)
        base.update(
            {
                "PREFECT_HOME": str(home),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_UI_ENABLED": "false",
                "PREFECT_LOGGING_LEVEL": os.environ.get("AMLFS_SCALEOUT_LOG_LEVEL", "WARNING"),
            }
        )
        self.server_env = dict(base)
        self.server_env["PREFECT_API_DATABASE_CONNECTION_URL"] = (
            f"{dsn.replace('postgresql://', 'postgresql+asyncpg://')}/{self.database}"
        )
        self.env = dict(base)
        self.env["PREFECT_API_URL"] = self.url
        self.env.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)

    def _log(self, name: str) -> Any:
        handle = (self.home / f"{name}.log").open("w")
        self._logs.append(handle)
        return handle

    def __enter__(self) -> ScaleOut:
        self.home.mkdir(parents=True, exist_ok=True)
        create_database(self.database, self.dsn)
        self.server = start_prefect_server(
            self.port, self.server_env, self._log("server"), self.home / "server.log"
        )
        if self.workers_wanted:
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "prefect",
                    "work-pool",
                    "create",
                    POOL,
                    "--type",
                    "process",
                    "--overwrite",
                ],
                env=self.env,
                check=True,
                stdout=subprocess.DEVNULL,
                cwd=REPO,
            )
            subprocess.run(
                [sys.executable, "-m", "deployments.scaleout", "--register"],
                env=self.env,
                check=True,
                cwd=REPO,
                stdout=subprocess.DEVNULL,
            )
        for index in range(self.workers_wanted):
            self.start_worker(index)
        for index in range(self.task_workers_wanted):
            self.start_task_worker(index)
        return self

    def start_task_worker(self, index: int) -> subprocess.Popen[bytes]:
        """``amlfs task-worker`` number ``index`` (its own session: a kill takes only it)."""
        assert self.store is not None
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "amlfs_cli",
                "task-worker",
                "--state-dir",
                self.store,
                "--limit",
                str(self.task_worker_limit),
                "--share",
                str(1.0 / self.task_workers_wanted),
            ],
            env=self.env,
            cwd=REPO,
            stdout=self._log(f"task-worker-{index}"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.task_workers.append(worker)
        return worker

    def start_worker(self, index: int) -> subprocess.Popen[bytes]:
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "prefect",
                "worker",
                "start",
                "--pool",
                POOL,
                "--type",
                "process",
                "--name",
                f"amlfs-worker-{index}",
                "--limit",
                "4",
            ],
            env=self.env,
            cwd=REPO,
            stdout=self._log(f"worker-{index}"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.workers.append(worker)
        return worker

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for proc in [*self.workers, *self.task_workers, *([self.server] if self.server else [])]:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in [*self.workers, *self.task_workers, *([self.server] if self.server else [])]:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        for handle in self._logs:
            handle.close()
        try:
            drop_database(self.database, self.dsn)
        except Exception as err:  # teardown goes on; the name says which database is left
            print(f"could not drop database {self.database}: {err}", file=sys.stderr)


def register() -> None:
    """Deploy ``cluster-upgrade`` from this checkout onto the process pool."""
    from flows.cluster_upgrade import cluster_upgrade

    cluster_upgrade.from_source(  # type: ignore[attr-defined]
        source=str(REPO), entrypoint="flows/cluster_upgrade.py:cluster_upgrade"
    ).deploy(
        name="amlfs-cluster-upgrade",
        work_pool_name=POOL,
        print_next_steps=False,
        ignore_warnings=True,
    )


def demo(workers: int) -> int:
    import tempfile

    from rich.console import Console
    from rich.table import Table

    console = Console(width=150)
    with (
        tempfile.TemporaryDirectory(prefix="amlfs-scaleout-") as tmp,
        ScaleOut(Path(tmp) / "prefect", workers=workers) as scale,
    ):
        console.print(
            f"prefect server on PostgreSQL database {scale.database} at {scale.url}, "
            f"work pool {POOL}, {workers} workers"
        )
        os.environ.update({k: v for k, v in scale.env.items() if k.startswith("PREFECT_")})
        from amlfs.fleet import ClusterSelector, FleetPolicy
        from amlfs_sim.server import Emulator
        from flows.fleet_maintenance import FleetParams, fleet_maintenance

        emulator = Emulator.from_fleet_file(
            REPO / "examples" / "fleet-small.yaml", Path(tmp) / "sim", time_scale=50
        )
        with emulator:
            names = [c.name for c in emulator.world.fleet.clusters]
            final = fleet_maintenance(
                FleetParams(
                    fleet_file=str(REPO / "examples" / "fleet-small.yaml"),
                    release_file=str(REPO / "examples" / "release-2.15.6.yaml"),
                    mode="hotfix",
                    selector=ClusterSelector(names=names),
                    policy=FleetPolicy(override_window=True, reason="scale-out demo"),
                    emulator_endpoint=str(Path(tmp) / "sim" / "endpoint.json"),
                    state_dir=str(Path(tmp) / "state"),
                    cluster_deployment=CLUSTER_DEPLOYMENT,
                    run_name="scaleout-demo",
                ),
                return_state=True,
            )
            # Failed when a cluster needs attention: the summary is still the state's data.
            summary = final.result(raise_on_failure=False)
            if not isinstance(summary, dict):
                raise SystemExit(f"the fleet run ended {final.type.value}: {final.message}")
    table = Table(title="scale-out demo: each cluster a flow run on the work pool")
    for column in ("cluster", "result", "release", "flow run", "downtime"):
        table.add_column(column)
    for name, result in summary["results"].items():
        view = result.get("customer_view") or {}
        table.add_row(
            name,
            result["outcome"],
            f"{result.get('release_before')} -> {result.get('release_after')}",
            str(result.get("flow_run", "")),
            f"{view.get('downtime_total', 0):.0f} s",
        )
    console.print(table)
    return 0 if set(summary["counts"]) <= {"upgraded"} else 1


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--register", action="store_true", help="deploy cluster-upgrade only")
    args = parser.parse_args()
    if args.register:
        register()
        return 0
    return demo(args.workers)


if __name__ == "__main__":
    sys.exit(main())
