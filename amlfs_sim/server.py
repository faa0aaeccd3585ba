"""Run the emulator: HTTPS ARM + control API on one port, sim time pumped in the background.

``Emulator`` serves in threads of the calling process (test fixtures, the demo) and writes
``endpoint.json`` the way ``amlfs-sim serve`` does, so clients find it the same way.
``serve_process`` starts ``amlfs-sim serve`` as its own process (benchmarks: the emulator's
CPU is then measured apart from the orchestrator's) and waits for its ``endpoint.json``.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import uvicorn

from amlfs.clock import ScaledClock
from amlfs.gcpauses import GcPauses, settle_heap
from amlfs.store import make_private_dir
from amlfs_sim.arm.backend import ArmBackend
from amlfs_sim.arm.responses import SimTime
from amlfs_sim.arm.throttling import ThrottlePolicy
from amlfs_sim.arm.urls import create_app
from amlfs_sim.nodes.fleet import NodeFleet
from amlfs_sim.nodes.ssh import SshServer
from amlfs_sim.spec import SimWorld, check_loopback, check_loopback_host, load_world
from amlfs_sim.tls import make_tls_files

__all__ = ["Emulator", "EndpointInfo", "serve_process"]

PUMP_INTERVAL_S = 0.02  # real seconds between sim-time advances when nobody calls in


@dataclass(frozen=True)
class EndpointInfo:
    """Contents of ``endpoint.json``: how a client reaches this emulator."""

    arm_url: str
    ca_file: str
    subscription_id: str
    time_scale: float
    control_url: str
    ssh: dict[str, Any] = field(default_factory=dict)

    def write(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        tmp.replace(path)  # readers never see a half-written file

    @classmethod
    def read(cls, path: Path) -> EndpointInfo:
        return cls(**json.loads(path.read_text()))


class _Server(uvicorn.Server):
    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await super().shutdown(sockets)
        # Clients that keep a connection open past the graceful period (an SDK poller thread,
        # a keep-alive pool) would leave their sockets to the garbage collector: close them,
        # and let the loop run the close callbacks before it ends.
        # uvicorn only tracks connections whose TLS handshake finished, so close every transport
        # of this loop (the loop is ours alone: it runs in the emulator's thread).
        loop = asyncio.get_running_loop()
        transports = getattr(loop, "_transports", {})
        for transport in list(transports.values()):
            if transport is not None and not transport.is_closing():
                transport.close()
        await asyncio.sleep(0.05)


class Emulator:
    """The emulated fleet, served over HTTPS on 127.0.0.1 until ``stop()``."""

    def __init__(
        self,
        world: SimWorld,
        state_dir: Path,
        *,
        time_scale: float = 1.0,
        seed: int = 0,
        host: str = "127.0.0.1",
        port: int = 0,
        throttle: ThrottlePolicy | None = None,
        ssh_port: int = 0,
    ) -> None:
        # Before anything listens: nodes listen on their fleet addresses with seed-derived keys.
        check_loopback(world.fleet, "the emulated fleet")
        check_loopback_host(host)
        self.world = world
        self.state_dir = Path(state_dir)
        self.host = host
        self.port = port
        self.clock = ScaledClock(time_scale)
        self.backend = ArmBackend(world, self.clock, seed=seed, throttle=throttle)
        self.nodes = NodeFleet(self.backend)
        self.backend.customer_view = self.nodes.report
        self.ssh = SshServer(self.nodes, self.state_dir, seed=seed, port=ssh_port)
        self.backend.ssh_stats = self.ssh.describe
        self.gc = GcPauses()
        self.backend.gc_stats = self.gc.describe
        self.times = SimTime()
        self._server: _Server | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self.endpoint: EndpointInfo | None = None

    @classmethod
    def from_fleet_file(cls, fleet_file: Path, state_dir: Path, **kwargs: Any) -> Emulator:
        return cls(load_world(fleet_file), state_dir, **kwargs)

    def start(self, *, timeout: float = 30.0, freeze_heap: bool = False) -> EndpointInfo:
        """Serve; ``freeze_heap`` (for a process that is only this emulator, as ``amlfs-sim
        serve``) takes the fleet built so far out of later full garbage collections."""
        # 0700 all the way down: the TLS key and the SSH client key are in here.
        for directory in (self.state_dir, self.state_dir / "tls", self.ssh.dir):
            make_private_dir(directory)
        tls = make_tls_files(self.state_dir / "tls", self.host)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted sockets inherit this. Without it every response waits ~40 ms for Nagle and
        # the client's delayed ACK (measured: 44 ms per GET, 1.4 ms with it).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            create_app(self.backend, self.times),
            ssl_certfile=str(tls.cert_file),
            ssl_keyfile=str(tls.key_file),
            http="httptools",
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=2,
        )
        self._server = _Server(config)
        serve = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="amlfs-sim-arm", daemon=True
        )
        pump = threading.Thread(target=self._pump, name="amlfs-sim-clock", daemon=True)
        self._threads = [serve, pump]
        serve.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not serve.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"amlfs-sim did not start on {self.host}:{self.port}")
            time.sleep(0.01)
        pump.start()
        ssh = self.ssh.start()
        if freeze_heap:
            settle_heap()
        self.gc.install()
        base = f"https://{self.host}:{self.port}"
        self.endpoint = EndpointInfo(
            arm_url=base,
            ca_file=str(tls.ca_file),
            subscription_id=self.world.fleet.clusters[0].subscription_id,
            time_scale=self.clock.time_scale,
            control_url=f"{base}/_sim",
            ssh=asdict(ssh),
        )
        self.endpoint.write(self.state_dir / "endpoint.json")
        return self.endpoint

    def _pump(self) -> None:
        while not self._stopping.wait(PUMP_INTERVAL_S):
            with self.backend.lock:
                self.backend.advance()

    def stop(self) -> None:
        self._stopping.set()
        self.gc.uninstall()
        if self.ssh.info is not None:
            self.ssh.stop()
        if self._server is not None:
            self._server.should_exit = True
        for thread in self._threads:
            thread.join(timeout=10)
        self._threads = []

    def __enter__(self) -> EndpointInfo:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def serve_process(
    fleet_file: Path,
    state_dir: Path,
    *options: str,
    timeout_s: float = 120.0,
    **popen: Any,
) -> tuple[subprocess.Popen[Any], EndpointInfo]:
    """Start ``amlfs-sim serve`` (with CLI ``options``) and wait until its endpoint.json exists.

    Raises RuntimeError, with what the process wrote if it captured it, when the process exits
    first or ``timeout_s`` passes (the process is then killed). The caller stops it (SIGTERM).
    """
    endpoint_file = Path(state_dir) / "endpoint.json"
    command = [sys.executable, "-m", "amlfs_sim.cli", "serve", "--fleet", str(fleet_file)]
    proc = subprocess.Popen([*command, "--state-dir", str(state_dir), *options], **popen)
    deadline = time.monotonic() + timeout_s
    while not endpoint_file.exists():
        if proc.poll() is not None:
            out = proc.communicate()
            raise RuntimeError(f"amlfs-sim serve exited with {proc.returncode}: {out}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"amlfs-sim serve wrote no {endpoint_file} in {timeout_s:.0f} s")
        time.sleep(0.1)
    return proc, EndpointInfo.read(endpoint_file)
