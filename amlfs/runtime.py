"""Where and how to connect: ARM endpoint, credential, SSH access, clock, state store.

Plain settings objects (pydantic, secrets as ``SecretStr``) that the Prefect Blocks turn into,
so domain code builds its gateways without importing Prefect. ``from_endpoint`` reads the
emulator's ``endpoint.json``; real Azure uses ``DefaultAzureCredential`` unless told otherwise.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from amlfs.azure.client import StaticTokenCredential, compute_client
from amlfs.azure.gateway import ComputeGateway, OperationTimes, arm_budget_of
from amlfs.clock import Clock, Pacer, ScaledClock
from amlfs.errors import InventoryError
from amlfs.ssh import SshConfig, SshPool, load_private_key

__all__ = [
    "AzureSettings",
    "Connections",
    "SshSettings",
    "from_endpoint",
    "share_of",
]


class AzureSettings(BaseModel):
    """How to reach ARM. ``credential``: default (DefaultAzureCredential / managed identity),
    client_secret (service principal), or static_token (the emulator)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    arm_url: str | None = Field(default=None, description="None: https://management.azure.com")
    ca_file: str | None = Field(default=None, description="CA bundle (the emulator's own CA)")
    credential: Literal["default", "client_secret", "static_token"] = "default"
    tenant_id: str | None = Field(default=None, description="client_secret only")
    client_id: str | None = Field(default=None, description="client_secret only")
    client_secret: SecretStr | None = Field(default=None, description="client_secret only")
    token: SecretStr | None = Field(default=None, description="static_token only (emulator)")
    time_scale: float = Field(default=1.0, gt=0, description="Emulator sim seconds per second")
    poll_interval_s: float = Field(default=1.0, gt=0, description="LRO polling, sim seconds")
    max_polls_per_s: float = Field(
        default=40,
        ge=0,
        description="Operation status polls per second, whole process, for VM operations "
        "in the customer's downtime (0: unpaced)",
    )
    max_background_polls_per_s: float = Field(
        default=10, ge=0, description="The same for disk operations outside the downtime"
    )
    # Azure Resource Manager meters every request per subscription and principal: reads in a
    # bucket of 250 refilled 25/s, writes and deletes each 200 refilled 10/s (learn.microsoft
    # .com, "Understand how Azure Resource Manager throttles requests"). Processes that share a
    # principal and a subscription share these: each gets its share (amlfs.shards does).
    max_arm_reads_per_s: float = Field(
        default=20,
        ge=0,
        description="ARM reads (every GET: VMs, disks, operation status polls) per second per "
        "subscription, this process; ARM refills a principal's reads 25/s (0: unpaced)",
    )
    max_arm_writes_per_s: float = Field(
        default=8,
        ge=0,
        description="ARM writes (PUT, PATCH, POST) per second per subscription, this process; "
        "ARM refills a principal's writes 10/s (0: unpaced)",
    )
    max_arm_deletes_per_s: float = Field(
        default=8,
        ge=0,
        description="ARM deletes per second per subscription, this process; ARM refills a "
        "principal's deletes 10/s (0: unpaced)",
    )
    max_disk_lists_per_s: float = Field(
        default=1.0,
        ge=0,
        description="Disk lists per second per subscription, this process: each is one of "
        "Compute's high-cost GETs (240 per 3 min, 1,920 per 30 min per subscription and region; "
        "once spent, 429 for the rest of the window) (0: unpaced)",
    )

    def credential_object(self) -> object:
        if self.credential == "static_token":
            return StaticTokenCredential(self.token or SecretStr("emulator"))
        if self.credential == "client_secret":
            if not (self.tenant_id and self.client_id and self.client_secret):
                raise InventoryError(
                    "azure credential client_secret needs tenant_id, client_id and client_secret"
                )
            from azure.identity import ClientSecretCredential

            return ClientSecretCredential(
                self.tenant_id, self.client_id, self.client_secret.get_secret_value()
            )
        from azure.identity import DefaultAzureCredential

        return DefaultAzureCredential()


class SshSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    username: str
    private_key: SecretStr = Field(description="OpenSSH private key (Ed25519, ECDSA or RSA)")
    known_hosts: str = Field(description="Path of the known_hosts file on the worker")
    port: int = Field(default=22, ge=1, le=65535)
    connect_timeout_s: float = Field(default=10.0, gt=0)
    command_timeout_s: float = Field(default=60.0, gt=0)
    attempts: int = Field(
        default=5,
        ge=1,
        description="Tries of one command on transient SSH failures (refused or dropped)",
    )
    retry_wait_s: float = Field(default=0.5, gt=0, description="First backoff, sim seconds")
    retry_wait_max_s: float = Field(default=2.0, gt=0, description="Longest backoff, sim s")
    retry_budget_s: float = Field(
        default=30.0, gt=0, description="No retry of a command starts later than this, sim s"
    )
    max_checks_per_s: float = Field(
        default=40,
        ge=0,
        description="Node checks per second while waiting (health, recovery, HSM drain), "
        "whole process (0: unpaced)",
    )

    def config(self, clock: Clock) -> SshConfig:
        # Timeouts are real seconds on the wire; never shorter than a few seconds.
        return SshConfig(
            username=self.username,
            key=load_private_key(self.private_key.get_secret_value()),
            known_hosts=Path(self.known_hosts),
            port=self.port,
            connect_timeout_s=max(2.0, clock.to_real(self.connect_timeout_s)),
            command_timeout_s=max(5.0, clock.to_real(self.command_timeout_s)),
            # Sim seconds: the pool waits on the same clock.
            attempts=self.attempts,
            retry_wait_s=self.retry_wait_s,
            retry_wait_max_s=self.retry_wait_max_s,
            retry_budget_s=self.retry_budget_s,
        )


@dataclass
class Connections:
    """Gateways for one orchestrator process: ARM per subscription, one SSH pool, one clock."""

    azure: AzureSettings
    ssh: SshSettings
    clock: Clock = field(default_factory=ScaledClock)
    pool_size: int = 64  # HTTPS connections per ARM host (many VMs in flight at once)
    # Learned operation durations, shared by the subscriptions' gateways (first-poll delay).
    times: OperationTimes = field(default_factory=OperationTimes)
    _gateways: dict[str, ComputeGateway] = field(default_factory=dict)
    _pool: SshPool | None = None
    _pacers: dict[str, Pacer] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    # Gateways and the SSH pool are made on first use, from any thread (a fleet run's
    # planning reads clusters on 16): once each, never a second client left unclosed.
    _making: threading.Lock = field(default_factory=threading.Lock)

    def pacer(self, name: str) -> Pacer:
        """The process's pacer ``polls``, ``background_polls`` or ``node_checks``."""
        rate = {
            "polls": self.azure.max_polls_per_s,
            "background_polls": self.azure.max_background_polls_per_s,
            "node_checks": self.ssh.max_checks_per_s,
        }[name]
        return self._paced(name, rate, burst=1.0)

    def arm_pacer(self, subscription_id: str, name: str) -> Pacer:
        """This process's share of a subscription's ARM budget: ``reads``, ``writes``,
        ``deletes`` (every request, by its method), or ``disk_lists`` (Compute's high-cost GET,
        on top of a read). The ARM ones let a second's worth through at once: ARM's buckets
        hold ten (reads) and twenty (writes, deletes) seconds of their refill."""
        rate = {
            "reads": self.azure.max_arm_reads_per_s,
            "writes": self.azure.max_arm_writes_per_s,
            "deletes": self.azure.max_arm_deletes_per_s,
            "disk_lists": self.azure.max_disk_lists_per_s,
        }[name]
        burst = 1.0 if name == "disk_lists" else max(1.0, rate)
        return self._paced(f"{name}:{subscription_id.lower()}", rate, burst=burst)

    def pacers(self) -> dict[str, Pacer]:
        """Every pacer made so far, by name (``reads:<subscription>`` for the ARM ones)."""
        with self._lock:
            return dict(self._pacers)

    def _paced(self, key: str, rate: float, *, burst: float) -> Pacer:
        with self._lock:
            pacer = self._pacers.get(key)
            if pacer is None:
                pacer = self._pacers[key] = Pacer(self.clock, rate, burst=burst)
            return pacer

    def _arm_hook(self, subscription_id: str) -> Callable[[Any], None]:
        """Called by azure-core before every attempt of every request of the subscription's
        client (retries and the SDK's own polls included): waits for its ARM slot."""
        pacers = {
            name: self.arm_pacer(subscription_id, name) for name in ("reads", "writes", "deletes")
        }

        def hook(request: Any) -> None:
            pacers[arm_budget_of(request.http_request.method)].wait()

        return hook

    @classmethod
    def create(cls, azure: AzureSettings, ssh: SshSettings) -> Connections:
        return cls(azure, ssh, ScaledClock(azure.time_scale))

    def gateway(self, subscription_id: str) -> ComputeGateway:
        with self._making:
            return self._gateways.get(subscription_id) or self._make_gateway(subscription_id)

    def _make_gateway(self, subscription_id: str) -> ComputeGateway:
        scale = self.azure.time_scale
        client = compute_client(
            subscription_id,
            self.azure.credential_object(),  # type: ignore[arg-type]
            arm_url=self.azure.arm_url,
            ca_file=self.azure.ca_file,
            polling_interval=self.clock.to_real(self.azure.poll_interval_s),
            retry_backoff_factor=0.8 / scale,
            retry_backoff_max=max(1.0, 60.0 / scale),
            pool_size=self.pool_size,
            raw_request_hook=self._arm_hook(subscription_id),
        )
        gateway = ComputeGateway(
            client,
            self.clock,
            times=self.times,
            polls=self.pacer("polls"),
            background_polls=self.pacer("background_polls"),
            disk_lists=self.arm_pacer(subscription_id, "disk_lists"),
        )
        self._gateways[subscription_id] = gateway
        return gateway

    def shells(self) -> SshPool:
        with self._making:
            if self._pool is None:
                self._pool = SshPool(self.ssh.config(self.clock), self.clock)
            return self._pool

    def close(self) -> None:
        for gateway in self._gateways.values():
            gateway.compute.close()
        self._gateways.clear()
        if self._pool is not None:
            self._pool.close()
            self._pool = None


def from_endpoint(path: str | Path) -> tuple[AzureSettings, SshSettings]:
    """Settings for the emulator described by its ``endpoint.json``."""
    try:
        endpoint = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise InventoryError(f"cannot read emulator endpoint {path}: {err}") from err
    ssh = endpoint["ssh"]
    azure = AzureSettings(
        arm_url=endpoint["arm_url"],
        ca_file=endpoint["ca_file"],
        credential="static_token",
        token=SecretStr("emulator"),
        time_scale=endpoint["time_scale"],
        poll_interval_s=1.0,
    )
    return azure, SshSettings(
        username=ssh["username"],
        private_key=SecretStr(Path(ssh["key_file"]).read_text()),
        known_hosts=ssh["known_hosts"],
        port=ssh["port"],
    )


def share_of(
    azure: AzureSettings, ssh: SshSettings, share: float
) -> tuple[AzureSettings, SshSettings]:
    """The settings of one of several orchestrator processes that run as one principal: every
    rate (polls, node checks, each subscription's ARM budget: reads, writes, deletes, disk
    lists) cut to ``share`` of it (0 stays unpaced)."""
    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1], got {share}")
    rates = [name for name in type(azure).model_fields if name.startswith("max_")]
    return (
        azure.model_copy(update={name: getattr(azure, name) * share for name in rates}),
        ssh.model_copy(update={"max_checks_per_s": ssh.max_checks_per_s * share}),
    )
