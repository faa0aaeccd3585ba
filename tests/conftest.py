"""Shared fixtures: one in-process emulator per session, reset before each test that uses it."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from azure.mgmt.compute import ComputeManagementClient
from azure.mgmt.compute.models import (
    CreationData,
    Disk,
    DiskCreateOption,
    DiskProperties,
    DiskSecurityProfile,
    DiskSku,
    ImageDiskReference,
)

from amlfs.azure import StaticTokenCredential, compute_client
from amlfs.clock import ScaledClock
from amlfs.fleet import FleetPolicy, FleetRunner, PlanRow
from amlfs.jobs import ClusterJob, ClusterOutcome, Executor, run_job
from amlfs.models import Cluster, Fleet, Release, load_release
from amlfs.runtime import Connections, from_endpoint
from amlfs.saga import ClusterUpgrade, UpgradePolicy, UpgradeResult
from amlfs.ssh import NodeShell, SshConfig, SshPool, load_private_key
from amlfs.store import StateStore, Store
from amlfs_sim import Emulator, EndpointInfo
from amlfs_sim.spec import SimWorld, load_world

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Served deployments and workers look for new runs every second, not every 10 s (Prefect's
# defaults): a test waits for the run it created, not for the next poll. Child processes
# (the served deployments, the work-pool workers of deployments.scaleout) inherit these.
os.environ.setdefault("PREFECT_RUNNER_POLL_FREQUENCY", "1")
os.environ.setdefault("PREFECT_WORKER_QUERY_SECONDS", "1")

REPO = Path(__file__).resolve().parent.parent
SMALL_FLEET = REPO / "examples" / "fleet-small.yaml"
RELEASE_FILE = REPO / "examples" / "release-2.15.6.yaml"
# 200 sim seconds per real second: a 60 s VM start takes 0.3 s, a 3 s poll interval 15 ms.
TIME_SCALE = 200.0


def trust(endpoint: EndpointInfo) -> ssl.SSLContext:
    """TLS context trusting the emulator's CA (httpx wants a context, not a path)."""
    return ssl.create_default_context(cafile=endpoint.ca_file)


@dataclass
class Sim:
    """A running emulator as tests see it: endpoint, control API, and the world it serves."""

    emulator: Emulator
    endpoint: EndpointInfo
    world: SimWorld
    control: httpx.Client
    clients: list[ComputeManagementClient] = field(default_factory=list)
    pools: list[SshPool] = field(default_factory=list)

    @property
    def cluster(self) -> Cluster:
        return self.world.fleet.clusters[0]

    def state(self, cluster: str | None = None) -> dict[str, Any]:
        params = {"cluster": cluster} if cluster else {}
        response = self.control.get("/state", params=params)
        response.raise_for_status()
        return response.json()  # type: ignore[no-any-return]

    def timeline(self) -> dict[str, Any]:
        response = self.control.get("/timeline")
        response.raise_for_status()
        return response.json()  # type: ignore[no-any-return]

    def fault(self, **spec: Any) -> int:
        response = self.control.post("/faults", json=spec)
        response.raise_for_status()
        return int(response.json()["id"])

    def compute(self, subscription_id: str | None = None, **kwargs: Any) -> ComputeManagementClient:
        client = compute_client(
            subscription_id or self.cluster.subscription_id,
            StaticTokenCredential("emulator-token"),
            arm_url=self.endpoint.arm_url,
            ca_file=self.endpoint.ca_file,
            **kwargs,
        )
        self.clients.append(client)
        return client

    def ssh_config(self, **overrides: Any) -> SshConfig:
        ssh = self.endpoint.ssh
        values: dict[str, Any] = {
            "username": ssh["username"],
            "key": load_private_key(Path(ssh["key_file"]).read_text()),
            "known_hosts": Path(ssh["known_hosts"]),
            "port": ssh["port"],
            "connect_timeout_s": 5.0,
            "command_timeout_s": 10.0,
        }
        values.update(overrides)
        return SshConfig(**values)

    def shell(self, node_name: str) -> NodeShell:
        """An SSH shell on a node of the small fleet (real paramiko, verified host key)."""
        if not self.pools:
            # Retries back off on the emulator's time scale, as the orchestrator's would.
            clock = ScaledClock(self.endpoint.time_scale)
            self.pools.append(SshPool(self.ssh_config(), clock))
        _, node = next((c, n) for c, n in self.world.fleet.iter_nodes() if n.name == node_name)
        return self.pools[0].shell(node_name, str(node.address))

    def sleep(self, sim_seconds: float) -> None:
        """Let ``sim_seconds`` of emulator time pass."""
        time.sleep(sim_seconds / self.endpoint.time_scale)

    def customer(self, cluster: str | None = None) -> dict[str, Any]:
        name = cluster or self.cluster.name
        return self.state(name)["clusters"][name]  # type: ignore[no-any-return]

    def close_clients(self) -> None:
        while self.clients:
            self.clients.pop().close()
        while self.pools:
            self.pools.pop().close()


@pytest.fixture(scope="session")
def small_world() -> SimWorld:
    return load_world(SMALL_FLEET)


@pytest.fixture(scope="session")
def _session_sim(small_world: SimWorld, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sim]:
    emulator = Emulator(small_world, tmp_path_factory.mktemp("sim"), time_scale=TIME_SCALE, seed=7)
    endpoint = emulator.start()
    with httpx.Client(base_url=endpoint.control_url, verify=trust(endpoint), timeout=30) as control:
        yield Sim(emulator, endpoint, small_world, control)
    emulator.stop()


@pytest.fixture
def sim(_session_sim: Sim) -> Iterator[Sim]:
    """The session emulator, reset to the fleet as loaded (all VMs running, no history)."""
    _session_sim.control.post("/reset").raise_for_status()
    yield _session_sim
    _session_sim.close_clients()


@pytest.fixture
def conns(sim: Sim) -> Iterator[Connections]:
    """The orchestrator's connections to ``sim``, as a real run builds them from its endpoint."""
    azure, ssh = from_endpoint(sim.emulator.state_dir / "endpoint.json")
    connections = Connections.create(azure, ssh)
    yield connections
    connections.close()


@dataclass
class PrefectServer:
    """A real ``prefect server`` on its own PostgreSQL database (the machine's server) for
    tests that run flows in other processes or deployments; ``env`` points a child process at
    it. Not SQLite: under load (a chaos case's orchestrators, a parallel test) SQLite answers
    ``503 database is locked``, and a run that cannot reach its server is not what a test of
    the product should fail on."""

    url: str
    env: dict[str, str]


PREFECT_DSN = os.environ.get("AMLFS_TEST_PREFECT_DSN", "postgresql://postgres@127.0.0.1:5432")


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    import subprocess

    from deployments.scaleout import (
        create_database,
        drop_database,
        free_port,
        start_prefect_server,
    )

    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    database = f"amlfs_tests_{os.getpid()}_{port}"
    create_database(database, PREFECT_DSN)
    env = dict(os.environ)
    env.update(
        {
            "PREFECT_HOME": str(home),
            "PREFECT_API_DATABASE_CONNECTION_URL": (
                f"{PREFECT_DSN.replace('postgresql://', 'postgresql+asyncpg://')}/{database}"
            ),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            # The UI too: tests/test_prefect_ui.py reads it in a real browser.
            "PREFECT_UI_ENABLED": "true",
            "PREFECT_UI_API_URL": url,
            "PREFECT_LOGGING_LEVEL": "WARNING",
        }
    )
    log = (home / "server.log").open("w")
    try:
        proc = start_prefect_server(port, env, log, home / "server.log", timeout_s=90)
    except BaseException:
        log.close()
        drop_database(database, PREFECT_DSN)
        raise
    client_env = dict(env)
    client_env["PREFECT_API_URL"] = url
    client_env.pop("PREFECT_API_DATABASE_CONNECTION_URL")
    try:
        yield PrefectServer(url, client_env)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()
        drop_database(database, PREFECT_DSN)


def os_disk_body(
    region: str,
    image_id: str,
    *,
    disk_size_gb: int | None = None,
    tags: dict[str, str] | None = None,
    zones: tuple[str, ...] = ("1",),
    security_type: str | None = "TrustedLaunch",
) -> Disk:
    """The SDK body of a Premium OS disk created from a gallery image version, by default
    one a VM of the emulator's default hardware takes (zone "1", Trusted Launch)."""
    return Disk(
        location=region,
        sku=DiskSku(name="Premium_LRS"),
        zones=list(zones) or None,
        properties=DiskProperties(
            creation_data=CreationData(
                create_option=DiskCreateOption.FROM_IMAGE,
                gallery_image_reference=ImageDiskReference(id=image_id),
            ),
            disk_size_gb=disk_size_gb,
            security_profile=(
                DiskSecurityProfile(security_type=security_type) if security_type else None
            ),
        ),
        tags=tags,
    )


def long_windows(path: Path, minutes: int = 90) -> Path:
    """The small fleet written to ``path`` with each window ``minutes`` long (same starts,
    same days). At 200 simulated seconds per real one a 30-minute window is 9 real seconds:
    a test that runs a cluster in its window from the window's start, and asserts it was
    upgraded, would depend on the machine's load. The emulator's world is the same."""
    import yaml

    doc = yaml.safe_load(SMALL_FLEET.read_text())
    for cluster in doc["clusters"]:
        cluster["window"]["duration_min"] = minutes
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def cli_args(command: str, endpoint: Path, *options: str) -> list[str]:
    """``amlfs COMMAND`` on the small fleet, release 2.15.6 and the emulator at ``endpoint``."""
    fleet = ["--fleet", str(SMALL_FLEET), "--release", str(RELEASE_FILE)]
    return [command, *fleet, "--endpoint", str(endpoint), *options]


def upgrade_cluster(
    sim: Sim, conns: Connections, store_dir: Path, release: Release | None = None, **options: Any
) -> UpgradeResult:
    """One upgrade of the small fleet's first cluster, with the orchestrator's real
    connections; ``options`` are ``ClusterUpgrade``'s keywords (policy, runner, should_abort,
    log...)."""
    cluster = sim.cluster
    before = sim.state(cluster.name)
    result = ClusterUpgrade(
        cluster,
        release or load_release(RELEASE_FILE),
        gateway=conns.gateway(cluster.subscription_id),
        shells=conns.shells(),
        store=StateStore(store_dir),
        clock=conns.clock,
        **options,
    ).run()
    assert_figures_match_the_truth(result, before, sim.state(cluster.name))
    return result


def _layout_changes(state: dict[str, Any]) -> set[tuple[str, int, str, str]]:
    """The emulator's data-disk changes that ARM can show (which disk is at a LUN; a
    change of content alone is invisible to ARM, and so to the orchestrator)."""
    return {
        (c["vm"], c["lun"], (c["before"] or ["none"])[0], (c["after"] or ["none"])[0])
        for c in state["data_disk_changes"]
        if (c["before"] or [None])[0] != (c["after"] or [None])[0]
    }


def assert_figures_match_the_truth(
    result: UpgradeResult | ClusterOutcome, before: dict[str, Any], after: dict[str, Any]
) -> None:
    """What the run says it left (evictions, data-disk changes, leaked disks: read back by
    the orchestrator itself, ``ClusterUpgrade._aftermath``) against the emulator's ground
    truth, from ``before`` the run to ``after`` it (``/state`` of the cluster)."""
    name = result.cluster
    if result.evictions is None:
        return  # the run changed nothing (busy, already current, refused in preflight)
    was, now = before["clusters"][name], after["clusters"][name]
    evicted = now["evictions"] - was["evictions"]
    # What no dmesg printed before its boot ended (between a server's last read and its
    # PUT stopping it), or has printed yet: the figure's blind spot, as the truth knows it.
    blind = now["evictions_lost_from_logs"] - was["evictions_lost_from_logs"]
    blind += now["evictions_unread"]
    # A resumed run cannot count what the dead one read and did not journal.
    least = 0 if result.resumed else max(0, evicted - blind)
    assert least <= result.evictions <= evicted, (
        result.evictions,
        evicted,
        blind,
        now["eviction_log"],
    )
    if result.data_disk_changes is not None:
        new = _layout_changes(after) - _layout_changes(before)
        assert len(result.data_disk_changes) == len(new), (result.data_disk_changes, new)
        for vm, lun, _, _ in new:
            assert any(c.startswith(f"{vm} LUN {lun}:") for c in result.data_disk_changes)
    assert result.leaked_disks is not None
    leaked_now, leaked_before = set(after["leaked_disks"]), set(before["leaked_disks"])
    assert set(result.leaked_disks) <= leaked_now, (result.leaked_disks, leaked_now)
    # A data disk someone detached is a data-disk change, not a disk the run left behind.
    data_disks = {d["disk"] for vm in before["vms"] for d in vm["data_disks"]}
    new_leaks = leaked_now - leaked_before - data_disks
    assert new_leaks <= set(result.leaked_disks), (result.leaked_disks, leaked_now)


class CallExecutor:
    """A test's stand-in for an executor: ``fn(cluster, should_abort)`` returns the outcome
    (a ``ClusterOutcome`` or its fields)."""

    def __init__(self, fn: Callable[[Cluster, Callable[[], bool]], Any]) -> None:
        self.fn = fn

    def run(self, job: ClusterJob, should_abort: Callable[[], bool]) -> ClusterOutcome:
        out = self.fn(job.cluster, should_abort)
        return out if isinstance(out, ClusterOutcome) else ClusterOutcome.model_validate(out)


def fleet_runner(
    fleet: Fleet,
    rows: Sequence[PlanRow],
    policy: FleetPolicy,
    upgrade: Executor | Callable[[Cluster, Callable[[], bool]], Any],
    store: Store,
    run_name: str,
    **options: Any,
) -> FleetRunner:
    """A ``FleetRunner`` of the release ``RELEASE_FILE`` (unless ``options`` name one) whose
    executor is ``upgrade``, or a ``CallExecutor`` of it."""
    executor = upgrade if hasattr(upgrade, "run") else CallExecutor(upgrade)  # type: ignore[arg-type]
    options.setdefault("release", load_release(RELEASE_FILE))
    return FleetRunner(fleet, rows, policy, executor, store, run_name, **options)  # type: ignore[arg-type]


def run_cluster(
    cluster: Cluster,
    release: Release,
    connections: Connections,
    store: Store,
    policy: UpgradePolicy | None = None,
    **options: Any,
) -> ClusterOutcome:
    """``run_job`` of one cluster's job; ``options``: its keywords (should_abort, log, runner)."""
    job = ClusterJob(cluster=cluster, release=release, policy=policy or UpgradePolicy())
    return run_job(job, connections, store, **options)


# A handshake instead of a timing margin: an operation held until the test lets it go.


def hold(http: httpx.Client, kind: str, target: str) -> None:
    """The next ``kind`` operation on ``target`` stays in progress until ``release``."""
    spec = {"kind": kind, "target": target, "mode": "hang", "count": 1}
    http.post("/faults", json=spec).raise_for_status()


def wait_until(
    what: str,
    check: Callable[[], object],
    proc: Any = None,
    timeout_s: float = 120,
) -> None:
    """Poll ``check`` until it is truthy; fail naming ``what`` (with ``proc``'s output if the
    process it waits on has ended)."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the process ended first:\n{proc.communicate()[0]}")
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s"
        time.sleep(0.05)


def held(http: httpx.Client) -> bool:
    """Whether an operation held by ``hold`` is in progress."""
    operations = http.get("/timeline").json()["operations"]
    return any(op["hang"] and op["status"] == "InProgress" for op in operations)


def release(http: httpx.Client) -> None:
    released = http.post("/faults/release").raise_for_status().json()["released"]
    assert released, "nothing was held"


def fleet_record(tmp_path: Path, run_name: str) -> dict[str, Any]:
    """The record of fleet run ``run_name`` in ``tmp_path/state`` as saved so far ({} if none)."""
    path = tmp_path / "state" / "fleet-runs" / f"{run_name}.json"
    return json.loads(path.read_text()) if path.exists() else {}  # type: ignore[no-any-return]


def control(server: PrefectServer, action: str) -> None:
    """``amlfs control ACTION`` in its own process against ``server``, as an operator runs it."""
    subprocess.run(
        [sys.executable, "-m", "amlfs_cli", "control", action],
        env=server.env,
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=120,
    )
