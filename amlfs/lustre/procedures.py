"""The Lustre side of an upgrade: suspend, config capture and restore, health, unsuspend.

Every action is idempotent (it checks before it changes), so a retried step or a worker that
resumes after a crash converges. Commands are argument lists, quoted by the SSH gateway.

Suspend-prepare, in the deck's order: record the tunables the procedure changes, raise with
``lctl set_param -P`` on the MGS what holds across a target restart (``timeout``, from which
each target recomputes its recovery windows when it mounts, and ``recovery_time_soft`` as a
floor; ``recovery_time_hard`` is recomputed as 9 x ``timeout`` whatever was set:
lustre/obdclass/obd_mount_server.c ``server_calc_timeout``, v2_15_5), quiesce HSM (coordinator
disabled; the active requests drain as fast as the copytools copy, so wait only if the
window allows it), stop the in-cluster work that takes locks against the customers' clients
(the hydrator and the copytools on the agents; the in-cluster client does no I/O while they
are cut off), then drop client LNet traffic (TCP 988) on every server, both ways. From that
moment until a server goes down, any conflicting request would evict a client holding a
lock after ``ldlm_bl_timeout`` (>= 100 s, whatever ``timeout`` says), and the ping evictor
counts from the client's last ping: the window is kept short and measured
(``BlockedWhileUp``). After the swap, the first client to reconnect (an in-cluster one, or
the MDT for an OST) starts each target's ``recovery_time_soft`` timer: until the customers
are let back, no wait runs past the earliest recovery deadline the servers report
(``guard_recovery``). Each of these is a separate method so that the saga journals before
each and can undo exactly what was done. Unsuspend reverses them in the order that keeps
clients safe: firewall off, clients back, in-cluster work resumed, and only then the tunables
(``left_suspended`` says what is still not back).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from amlfs.clock import Clock, Pacer
from amlfs.errors import (
    CommandFailedError,
    HealthCheckError,
    NodeError,
    NodeOutputError,
    NodeUnreachableError,
)
from amlfs.fanout import run_all
from amlfs.forms import declared_order
from amlfs.lustre.parsers import (
    all_up,
    parse_devices,
    parse_evictions,
    parse_health_check,
    parse_hsm_agents,
    parse_hsm_requests,
    parse_lustre_mounts,
    parse_net_show,
    parse_params,
    parse_recovery_status,
    parse_sha256sum,
    parse_version,
)
from amlfs.models import Role
from amlfs.ssh import NodeShell

__all__ = [
    "CLUSTER_FILES",
    "BadReleaseError",
    "BlockedWhileUp",
    "HsmDrainError",
    "LustreOps",
    "NodeRef",
    "RecoveryDeadlineError",
    "RecoveryWindow",
    "SuspendPolicy",
]

T = TypeVar("T")

LNET_PORT = 988
FSNAME = "amlfs"
# The files that make a node a member of its cluster; a fresh release disk has none of them.
CLUSTER_FILES = (
    "/etc/lnet.conf",
    "/etc/modprobe.d/lustre.conf",
    "/etc/ldev.conf",
    "/etc/hostid",
    "/etc/lhsmd/agent",
    "/etc/amlfs/hydrator.conf",
)
SERVER_ROLES = (Role.MDS, Role.OSS)
AGENT_ROLES = (Role.AGTPRI, Role.AGTSTD)
PROBE_FILE = f"/lustre/{FSNAME}/.amlfs-maintenance-probe"


# The in-cluster work that takes locks against the customers' files: per agent role, its units.
AGENT_WORK = {Role.AGTPRI: ("hydrator", "lhsmd"), Role.AGTSTD: ("lhsmd",)}


class BadReleaseError(HealthCheckError):
    """The release itself is broken on this node (Lustre modules do not load): no retry."""


class HsmDrainError(HealthCheckError):
    """The active HSM requests cannot finish in the time the window leaves for them."""


class RecoveryDeadlineError(HealthCheckError):
    """A target's recovery window is about to close on clients that are still cut off."""


class SuspendPolicy(BaseModel):
    """Tunables raised while a cluster is suspended, and how long to wait for things."""

    model_config = ConfigDict(frozen=True, extra="forbid", json_schema_extra=declared_order)
    timeout_s: int = Field(
        default=1200,
        ge=100,
        description="Lustre `timeout` while suspended (set_param -P: it holds across the "
        "swap, and each target recomputes its recovery windows from it when it mounts)",
    )
    recovery_time_soft_s: int = Field(
        default=1800,
        ge=60,
        description="Floor of each target's recovery_time_soft at its next mount (set_param "
        "-P; recovery_time_hard is recomputed as 9 x timeout and caps it)",
    )
    client_cidr: str = Field(default="10.8.0.0/16", description="Customer client network")
    hsm_drain_timeout_s: float = Field(
        default=300,
        gt=0,
        description="Longest wait for the active HSM requests (the window may allow less)",
    )
    recovery_margin_s: float = Field(
        default=300,
        gt=0,
        description="While clients are cut off after the swap, stop waiting this long before "
        "the earliest recovery deadline a target reports (the way back must get the "
        "servers down, or the clients back, before it)",
    )
    recovery_check_s: float = Field(
        default=30, gt=0, description="How often a long wait reads the targets' recovery"
    )
    poll_s: float = Field(default=1.0, gt=0, description="Between checks, sim seconds")

    @model_validator(mode="after")
    def _soft_within_hard(self) -> SuspendPolicy:
        if self.recovery_time_soft_s > 9 * self.timeout_s:
            raise ValueError(
                f"recovery_time_soft_s ({self.recovery_time_soft_s}) above 9 x timeout_s: "
                "recovery_time_hard, recomputed at mount as 9 x timeout, would cut it short"
            )
        return self


@dataclass(frozen=True)
class RecoveryWindow:
    """One target's recovery as its server reports it (read back after it boots)."""

    node: str
    target: str
    status: str
    soft: int  # recovery_time_soft (obd_recovery_timeout), computed at mount
    hard: int  # recovery_time_hard
    time_remaining: int | None  # RECOVERING: until the soft timer expires
    connected: int | None
    total: int | None


class BlockedWhileUp:
    """Sim seconds during which a server may have been up with its targets serving while its
    firewall cut the customers' clients off, as the orchestrator sees it: from the moment it
    starts firewalling a server until the PUT that stops it has returned, and from the
    moment it starts a swapped server's targets until the firewall is off again.

    An upper bound: the orchestrator cannot see when Azure stopped the VM inside the PUT,
    so the stop, swap and boot of the slowest server are counted too. The emulator's own
    figure (``blocked_while_up_s`` in the customer view) is the ground truth."""

    def __init__(self) -> None:
        self._open: dict[str, float] = {}
        self._spans: list[tuple[float, float]] = []
        self._lock = threading.Lock()

    def start(self, server: str, at: float) -> None:
        with self._lock:
            self._open.setdefault(server, at)

    def end(self, server: str, at: float) -> None:
        with self._lock:
            began = self._open.pop(server, None)
            if began is not None:
                self._spans.append((began, at))

    def end_all(self, at: float) -> None:
        for server in list(self._open):
            self.end(server, at)

    def total(self, now: float) -> float:
        """The union of every server's spans (the cluster's clients are cut off then)."""
        with self._lock:
            spans = sorted([*self._spans, *((b, now) for b in self._open.values())])
        total, reach = 0.0, float("-inf")
        for began, ended in spans:
            if ended > reach:
                total += ended - max(began, reach)
                reach = ended
        return total


BOOT_ID = "/proc/sys/kernel/random/boot_id"  # random(4): a new UUID at every boot


class EvictionTally:
    """Client evictions the cluster's servers logged while this run had the cluster: counted
    from each server's kernel log (``parse_evictions``), by boot (``BOOT_ID``).

    The log of a boot is read at the start (the baseline: what was there before the run
    counts for nothing), before each running server's swap PUT (the ring buffer dies with
    that boot) and at the end. For each server and boot, the highest count read there
    minus the baseline of that boot counts. What a server logs between the last read and
    the PUT stopping it is not seen, and a server whose log could not be read at all is
    named in ``unread``: the figure is then a lower bound. JSON state (``dump``) so the
    journal carries it across a resume."""

    def __init__(self, state: dict[str, Any] | None = None) -> None:
        state = state or {}
        self._lock = threading.Lock()
        self.baseline: dict[str, list[Any]] = dict(state.get("baseline", {}))
        self.seen: dict[str, dict[str, int]] = {
            node: dict(boots) for node, boots in state.get("seen", {}).items()
        }
        self.unread: dict[str, str] = dict(state.get("unread", {}))

    def note(self, node: str, boot_id: str, count: int) -> None:
        """A read of ``node``'s log. Its first read is its baseline: the start, or for a
        server that could not be read then (or a journal from before the tally), a later
        read, from which on its evictions count (a lower bound)."""
        with self._lock:
            self.baseline.setdefault(node, [boot_id, count])
            boots = self.seen.setdefault(node, {})
            boots[boot_id] = max(boots.get(boot_id, 0), count)
            self.unread.pop(node, None)

    def missed(self, node: str, why: str) -> None:
        with self._lock:
            if node not in self.seen:
                self.unread[node] = why

    def total(self) -> int:
        with self._lock:
            total = 0
            for node, boots in self.seen.items():
                base_boot, base_count = self.baseline.get(node, ["", 0])
                for boot, count in boots.items():
                    total += max(0, count - (base_count if boot == base_boot else 0))
            return total

    def dump(self) -> dict[str, Any]:
        with self._lock:
            return {
                "baseline": {k: list(v) for k, v in self.baseline.items()},
                "seen": {k: dict(v) for k, v in self.seen.items()},
                "unread": dict(self.unread),
            }


@dataclass(frozen=True)
class NodeRef:
    name: str
    role: Role
    address: str


class ShellSource(Protocol):
    def shell(self, name: str, address: str) -> NodeShell: ...


@dataclass
class Problems:
    """What a health check found wrong, per node."""

    items: dict[str, list[str]] = field(default_factory=dict)

    def add(self, node: str, problem: str) -> None:
        self.items.setdefault(node, []).append(problem)

    def __bool__(self) -> bool:
        return bool(self.items)

    def __str__(self) -> str:
        return "; ".join(f"{node}: {', '.join(p)}" for node, p in sorted(self.items.items()))


class LustreOps:
    """Lustre procedures on the nodes of one cluster."""

    def __init__(
        self,
        shells: ShellSource,
        nodes: Sequence[NodeRef],
        clock: Clock,
        policy: SuspendPolicy | None = None,
        log: Callable[[str], None] = lambda message: None,
        parallelism: int = 16,
        checks: Pacer | None = None,
    ) -> None:
        self.shells = shells
        self.nodes = list(nodes)
        self.clock = clock
        self.policy = policy or SuspendPolicy()
        self.log = log
        self.parallelism = parallelism
        # Shared by the process: each check a wait loop makes on a node takes a slot.
        self.checks = checks or Pacer(clock, None)
        self.mds = next(n for n in self.nodes if n.role is Role.MDS)
        self.blocked = BlockedWhileUp()
        # Recovery guard (see guard_recovery): on while clients are cut off by the suspend.
        self._guard = False
        self._guard_lock = threading.Lock()
        self._guard_read_at = float("-inf")
        self._deadline: tuple[float, str] | None = None
        self.windows: dict[str, RecoveryWindow] = {}  # as last read back, by target

    # ------------------------------------------------------------------ plumbing

    def sh(self, node: NodeRef) -> NodeShell:
        return self.shells.shell(node.name, node.address)

    def servers(self) -> list[NodeRef]:
        return [n for n in self.nodes if n.role in SERVER_ROLES]

    def each(self, nodes: Iterable[NodeRef], fn: Callable[[NodeRef], T]) -> dict[str, T]:
        """``fn`` on every node in parallel; the first error is raised after all finished."""
        nodes = list(nodes)
        return dict(zip([n.name for n in nodes], run_all(nodes, fn, self.parallelism), strict=True))

    def firewall_rules(self) -> list[list[str]]:
        """The rules that cut client LNet traffic on a server, both ways.

        LNet connects in both directions (socklnd, lnet/lnet/acceptor.c at v2_15_5): clients
        to the server's TCP 988, and the server from a reserved port (512-1023) to a client's
        988, e.g. for a blocking callback. Dropping inbound 988 alone leaves the second open.
        """
        cidr = self.policy.client_cidr
        port = str(LNET_PORT)
        return [
            ["INPUT", "-s", cidr, "-p", "tcp", "--dport", port, "-j", "DROP"],
            ["OUTPUT", "-d", cidr, "-p", "tcp", "--dport", port, "-j", "DROP"],
        ]

    # ------------------------------------------------------------------ evictions

    def read_evictions(self, tally: EvictionTally, nodes: Iterable[NodeRef] | None = None) -> None:
        """Each server's kernel log into ``tally`` (one exec per node: its boot id and
        ``dmesg``). Never raises for a node: one that cannot answer is noted as unread."""

        def one(node: NodeRef) -> None:
            argvs = [["cat", BOOT_ID], ["dmesg"]]
            try:
                shell = self.sh(node)
                results = shell.run_batch(argvs)
                boot_id = shell.check(argvs[0], results[0]).stdout.strip()
                count = parse_evictions(shell.check(argvs[1], results[1]).stdout)
            except (NodeError, NodeOutputError) as err:
                tally.missed(node.name, str(err))
                return
            tally.note(node.name, boot_id, count)

        self.each(list(nodes) if nodes is not None else self.servers(), one)

    # ------------------------------------------------------------------ capture

    def capture_config(self, node: NodeRef) -> dict[str, bytes]:
        """The cluster files present on ``node`` (path -> content), byte for byte.

        Read as base64 and checked against the node's own sha256sum: ``/etc/hostid`` is 4
        binary bytes (glibc ``sethostid``, OpenZFS ``zgenhostid``), which a text read would
        corrupt on most hosts, and ``zpool import`` then refuses the pools on the new disk.
        """
        files = {}
        shell = self.sh(node)
        reads = [
            argv
            for path in CLUSTER_FILES
            for argv in (["test", "-e", path], ["base64", "-w", "0", path], ["sha256sum", path])
        ]
        results = shell.run_batch(reads)
        for i, path in enumerate(CLUSTER_FILES):
            if results[3 * i].status != 0:
                continue
            encoded = shell.check(reads[3 * i + 1], results[3 * i + 1]).stdout
            digest = parse_sha256sum(shell.check(reads[3 * i + 2], results[3 * i + 2]).stdout, path)
            try:
                content = base64.b64decode("".join(encoded.split()), validate=True)
            except binascii.Error as err:
                raise NodeOutputError(f"{node.name}: `base64 {path}` is not base64: {err}") from err
            if hashlib.sha256(content).hexdigest() != digest:
                raise NodeOutputError(
                    f"{node.name}: {path} read with another checksum than the node reports"
                )
            files[path] = content
        if "/etc/lnet.conf" not in files or "/etc/hostid" not in files:
            raise HealthCheckError(
                f"{node.name}: /etc/lnet.conf or /etc/hostid missing before the upgrade; "
                "refusing to swap a node whose config cannot be restored"
            )
        return files

    def record_tunables(self) -> dict[str, str]:
        """The values suspend will change, read from the MDS before they are raised:
        ``timeout``, the recovery windows and the HSM coordinator's state."""
        out = self.sh(self.mds).run(
            [
                "lctl",
                "get_param",
                "timeout",
                "mdt.*.recovery_time_soft",
                "mdt.*.recovery_time_hard",
                "mdt.*.hsm_control",
            ]
        )
        params = parse_params(out.stdout)
        soft = next(v for k, v in params.items() if k.endswith(".recovery_time_soft"))
        hard = next(v for k, v in params.items() if k.endswith(".recovery_time_hard"))
        hsm = next((v for k, v in params.items() if k.endswith(".hsm_control")), "enabled")
        return {
            "timeout": params["timeout"],
            "recovery_time_soft": soft,
            "recovery_time_hard": hard,
            "hsm_control": hsm,
        }

    def raised_tunables(self, saved: dict[str, str]) -> dict[str, str]:
        """What suspend sets with ``-P``: only what holds across the swap. ``timeout`` is
        applied from the MGS's params log before a mounting target computes its windows
        (``class_set_global``, then ``server_calc_timeout``), so it sets them (soft 3 x,
        shrunk by imperative recovery, hard 9 x timeout); a ``recovery_time_soft`` from the
        params log is kept when larger. ``recovery_time_hard`` is not sent: any value the log
        holds is overwritten at mount."""
        policy = self.policy
        return {
            "timeout": str(max(policy.timeout_s, int(saved["timeout"]))),
            "recovery_time_soft": str(policy.recovery_time_soft_s),
        }

    # ------------------------------------------------------------------ suspend

    def raise_tunables(self, saved: dict[str, str]) -> None:
        """``timeout`` and the recovery_time_soft floor up, persistently (clients must
        survive the outage, and the targets recompute their windows from them at mount)."""
        self.set_tunables(self.raised_tunables(saved))

    def set_tunables(self, values: dict[str, str]) -> None:
        """``set_param -P`` of whichever of ``timeout`` and the recovery windows ``values``
        has (the windows of every target; applied live to running ones)."""
        names = ("timeout", "recovery_time_soft", "recovery_time_hard")
        items = [
            f"{name if name == 'timeout' else '*.*.' + name}={values[name]}"
            for name in names
            if name in values
        ]
        if items:
            self.sh(self.mds).run(["lctl", "set_param", "-P", *items])

    def set_hsm_control(self, value: str) -> None:
        """The coordinator's state, persistently: a plain ``set_param`` is lost when the MDT
        restarts in the swap, and a coordinator enabled again from the config would hand
        copies to the copytools while the clients are still cut off."""
        self.sh(self.mds).run(["lctl", "set_param", "-P", f"mdt.*.hsm_control={value}"])

    def quiesce_hsm(self, allowed_s: float | None = None) -> None:
        """Coordinator disabled, then wait for the active requests, at most ``allowed_s``
        (what the window leaves; never more than ``hsm_drain_timeout_s``).

        ``disabled`` only stops new actions: a request in flight ends when its copytool has
        copied the file (lustre/mdt/mdt_coordinator.c, v2_15_5), which for a large file can
        take far longer than a window. Each request's rate is measured from the bytes it
        reports done (``hsm.active_requests`` ``done=``) and its file's size read through the
        in-cluster client (``.lustre/fid/[FID]``): as soon as one cannot finish in the time
        left, the drain gives up (``HsmDrainError``), before any downtime, so that the way
        back re-enables HSM at once instead of after the whole allowance.
        """
        allowed = self.policy.hsm_drain_timeout_s
        if allowed_s is not None:
            allowed = max(0.0, min(allowed, allowed_s))
        mds = self.sh(self.mds)
        self.set_hsm_control("disabled")
        deadline = self.clock.now() + allowed
        first: dict[str, tuple[float, int]] = {}  # fid -> (first seen, bytes done then)
        sizes: dict[str, int] = {}
        while True:
            self.checks.wait()
            out = mds.run(["lctl", "get_param", "-n", "mdt.*.hsm.active_requests"]).stdout
            requests = parse_hsm_requests(out)
            if not requests:
                return
            now = self.clock.now()
            self._file_sizes([r.fid for r in requests if r.fid not in sizes], sizes)
            slowest: tuple[float, str] | None = None
            for request in requests:
                seen_at, seen_done = first.setdefault(request.fid, (now, request.done))
                size = sizes.get(request.fid)
                if size is None or now <= seen_at or request.done <= seen_done:
                    continue  # no rate yet (or no progress): no estimate
                rate = (request.done - seen_done) / (now - seen_at)
                eta = max(0.0, (size - request.done) / rate)
                if slowest is None or eta > slowest[0]:
                    slowest = (eta, f"{request.action} of {request.fid}")
            left = deadline - now
            if slowest is not None and slowest[0] > left:
                raise HsmDrainError(
                    f"{len(requests)} HSM requests still active: the {slowest[1]} needs "
                    f"~{slowest[0]:.0f} s more at its copy rate, the window leaves {left:.0f} s "
                    f"(of {allowed:.0f} s) for the drain; not waiting"
                )
            if now >= deadline:
                raise HsmDrainError(
                    f"{len(requests)} HSM requests still active {allowed:.0f} s after the "
                    "coordinator was disabled"
                )
            self.clock.sleep(self.policy.poll_s)

    def _file_sizes(self, fids: Sequence[str], sizes: dict[str, int]) -> None:
        """Sizes of the files under ``fids``, through the in-cluster client (best effort:
        without one, or if it cannot tell, the drain simply waits)."""
        client = next((n for n in self.nodes if n.role is Role.LCLIENT), None)
        if client is None or not fids:
            return
        try:
            results = self.sh(client).run_batch(
                [["stat", "-c", "%s", f"/lustre/{FSNAME}/.lustre/fid/{fid}"] for fid in fids]
            )
        except NodeError as err:
            self.log(f"{client.name}: cannot read HSM file sizes: {err}")
            return
        for fid, result in zip(fids, results, strict=True):
            if result.status == 0 and result.stdout.strip().isdigit():
                sizes[fid] = int(result.stdout.strip())

    # ------------------------------------------------------------------ in-cluster work

    def agents(self) -> list[NodeRef]:
        return [n for n in self.nodes if n.role in AGENT_WORK]

    def agent_work(self) -> dict[str, list[str]]:
        """The in-cluster work running now, per agent (hydrator, copytool)."""

        def one(node: NodeRef) -> list[str]:
            units = AGENT_WORK[node.role]
            results = self.sh(node).run_batch([["systemctl", "is-active", u] for u in units])
            return [u for u, r in zip(units, results, strict=True) if r.status == 0]

        return self.each(self.agents(), one)

    def stop_agent_work(self, *, best_effort: bool = False) -> None:
        """Stop the hydrator and the copytools before clients are cut off: their requests
        conflict with the customers' locks, and a client that cannot answer the blocking
        callback is evicted ``ldlm_bl_timeout`` (>= 100 s) later (lustre/ldlm/ldlm_lockd.c
        ``ldlm_bl_timeout``, v2_15_5), whatever ``timeout`` says. ``best_effort``: an agent
        that cannot be reached (down: it does no I/O) is skipped."""

        def one(node: NodeRef) -> None:
            try:
                self.stop_node_work(node)
            except NodeError as err:
                if not best_effort:
                    raise
                self.log(f"{node.name}: in-cluster work not stopped (down?): {err}")

        self.each(self.agents(), one)

    def stop_node_work(self, node: NodeRef) -> None:
        """Stop ``node``'s hydrator and copytool, if it is an agent (a node booted from its
        old disk starts them on its own)."""
        if node.role in AGENT_WORK:
            self.sh(node).run(["systemctl", "stop", *AGENT_WORK[node.role]])

    def resume_agent_work(self, work: dict[str, list[str]] | None) -> None:
        """Start again what ``agent_work`` found running (the copytool before the hydrator);
        ``None`` (not recorded): what a serving cluster runs."""

        def one(node: NodeRef) -> None:
            units = AGENT_WORK[node.role] if work is None else work.get(node.name, [])
            for unit in sorted(units, key=lambda u: u != "lhsmd"):
                self._ensure_service(node, unit)

        self.each(self.agents(), one)

    @staticmethod
    def encode_agent_work(work: dict[str, list[str]]) -> str:
        return ";".join(f"{node}={','.join(units)}" for node, units in sorted(work.items()))

    @staticmethod
    def decode_agent_work(text: str | None) -> dict[str, list[str]] | None:
        if text is None:
            return None
        work: dict[str, list[str]] = {}
        for item in filter(None, text.split(";")):
            node, _, units = item.partition("=")
            work[node] = [u for u in units.split(",") if u]
        return work

    # ------------------------------------------------------------------ recovery

    def recovery_windows(self, nodes: Sequence[NodeRef] | None = None) -> list[RecoveryWindow]:
        """Each target's recovery as its server reports it: status, time remaining, and the
        windows it computed when it mounted. Servers that cannot answer are left out."""

        def one(node: NodeRef) -> list[RecoveryWindow]:
            try:
                out = (
                    self.sh(node)
                    .run(
                        [
                            "lctl",
                            "get_param",
                            "*.*.recovery_status",
                            "*.*.recovery_time_soft",
                            "*.*.recovery_time_hard",
                        ],
                        check=False,
                    )
                    .stdout
                )
                params = parse_params(out)
            except NodeError:
                return []
            found = []
            for name, value in params.items():
                if not name.endswith(".recovery_status"):
                    continue
                base = name.removesuffix(".recovery_status")
                status = parse_recovery_status(value)
                soft = params.get(f"{base}.recovery_time_soft", "0")
                hard = params.get(f"{base}.recovery_time_hard", "0")
                found.append(
                    RecoveryWindow(
                        node=node.name,
                        target=base.split(".", 1)[1],
                        status=status.status,
                        soft=int(soft) if soft.isdigit() else 0,
                        hard=int(hard) if hard.isdigit() else 0,
                        time_remaining=status.time_remaining,
                        connected=status.connected,
                        total=status.total,
                    )
                )
            return found

        windows = [w for found in self.each(nodes or self.servers(), one).values() for w in found]
        for window in windows:
            self.windows[window.target] = window
        return windows

    def guard_recovery(self, on: bool) -> None:
        """While on, every wait loop here stops ``recovery_margin_s`` before the earliest
        deadline a recovering target reports (``RecoveryDeadlineError``).

        After a target restarts, the first client to connect (an in-cluster client, or the
        MDT for an OST) starts its ``recovery_time_soft`` timer, and at its expiry the
        clients that did not reconnect are evicted (lustre/ldlm/ldlm_lib.c
        ``target_handle_connect`` -> ``check_and_start_recovery_timer``,
        ``target_recovery_overseer``, v2_15_5). The customers' clients are still cut off
        until unsuspend: waiting for a slow node past that deadline would evict them all.
        Stopping first lets the way back take the servers down (a stopped target evicts
        nobody; its clients are still in its last_rcvd for the next recovery)."""
        with self._guard_lock:
            self._guard = on
            self._guard_read_at = float("-inf")
            self._deadline = None

    def check_recovery_deadline(self) -> None:
        if not self._guard:
            return
        with self._guard_lock:
            now = self.clock.now()
            if now - self._guard_read_at >= self.policy.recovery_check_s:
                self._guard_read_at = now
                earliest: tuple[float, str] | None = None
                for window in self.recovery_windows():
                    if window.status != "RECOVERING" or window.time_remaining is None:
                        continue
                    at = now + window.time_remaining
                    if earliest is None or at < earliest[0]:
                        earliest = (at, f"{window.node}: {window.target}")
                self._deadline = earliest
            deadline = self._deadline
        if deadline is not None and now >= deadline[0] - self.policy.recovery_margin_s:
            raise RecoveryDeadlineError(
                f"{deadline[1]} recovery window closes in {max(0.0, deadline[0] - now):.0f} s "
                "with the customers' clients still cut off: not waiting longer (they would "
                "be evicted)"
            )

    def firewall_on(self, node: NodeRef) -> None:
        for rule in self.firewall_rules():
            self._rule_on(node, rule)

    def _rule_on(self, node: NodeRef, rule: list[str]) -> None:
        shell = self.sh(node)
        # A second insert adds a second rule: after a session dropped mid-insert, look again.
        for attempt in range(1, 4):
            if shell.run(["iptables", "-C", *rule], check=False).status == 0:
                return
            try:
                shell.run(["iptables", "-I", rule[0], "1", *rule[1:]], idempotent=False)
                return
            except NodeUnreachableError:
                if attempt == 3:
                    raise

    def firewall_off(self, node: NodeRef) -> None:
        """Outbound first: the way back opens in the reverse order of ``firewall_on``."""
        for rule in reversed(self.firewall_rules()):
            self._rule_off(node, rule)

    def _rule_off(self, node: NodeRef, rule: list[str]) -> None:
        shell = self.sh(node)
        for _ in range(10):  # every copy of the rule, in case a retry added two
            if shell.run(["iptables", "-C", *rule], check=False).status != 0:
                return
            try:
                # Not re-sent blindly: a -D that ran before its session dropped would fail
                # ("Bad rule") when sent again. The -C above looks again instead.
                shell.run(["iptables", "-D", *rule], idempotent=False)
            except NodeUnreachableError:
                continue

    def firewalled(self, node: NodeRef) -> bool:
        """Does ``node`` still drop client LNet traffic, in either direction?"""
        checks = [["iptables", "-C", *rule] for rule in self.firewall_rules()]
        return any(r.status == 0 for r in self.sh(node).run_batch(checks))

    def read_params(self, node: NodeRef, names: Sequence[str]) -> dict[str, str]:
        """``lctl get_param`` of ``names`` on ``node``, as name -> value."""
        return parse_params(self.sh(node).run(["lctl", "get_param", *names]).stdout)

    def left_suspended(
        self, saved: dict[str, str] | None, wanted: dict[str, str] | None = None
    ) -> list[str]:
        """What still differs from a cluster back to normal service: a DROP rule on a
        server, tunables not back to ``saved`` (plus the release's ``wanted`` values), the
        HSM coordinator not back. Empty when nothing is left."""
        problems = []
        firewalled = self.each(self.servers(), self.firewalled)
        problems += [
            f"{name}: still drops client traffic (TCP 988)" for name, on in firewalled.items() if on
        ]
        if saved is not None and "agent_work" in saved:
            work = self.decode_agent_work(saved["agent_work"]) or {}
            running = self.agent_work()
            problems += [
                f"{node}: {unit} not running again (stopped for the suspend)"
                for node, units in sorted(work.items())
                for unit in units
                if unit not in running.get(node, [])
            ]
        expected: dict[str, str] = {}
        if saved is not None:
            expected.update(
                {
                    "timeout": saved["timeout"],
                    "recovery_time_soft": saved["recovery_time_soft"],
                    "recovery_time_hard": saved["recovery_time_hard"],
                    "hsm_control": saved.get("hsm_control", "enabled"),
                }
            )
        expected.update(wanted or {})
        if not expected:
            return problems
        names = []
        for name in expected:
            names.append(f"mdt.*.{name}" if name.startswith(("recovery_", "hsm_")) else name)
        values = self.read_params(self.mds, names)
        for name, value in expected.items():
            seen = [v for k, v in values.items() if k == name or k.endswith(f".{name}")]
            if not seen:
                problems.append(f"{self.mds.name}: {name} unreadable")
            elif any(v != value for v in seen):
                problems.append(f"{self.mds.name}: {name}={seen[0]}, expected {value}")
        return problems

    # ------------------------------------------------------------------ boot + restore

    def wait_reachable(self, node: NodeRef, timeout_s: float) -> None:
        deadline = self.clock.now() + timeout_s
        while True:
            self.check_recovery_deadline()
            try:
                self.sh(node).run(["hostid"])
                return
            except NodeUnreachableError as err:
                if self.clock.now() >= deadline:
                    raise NodeUnreachableError(
                        f"{node.name} not reachable over SSH {timeout_s:.0f} s after start: {err}",
                        node=node.name,
                    ) from err
            self.clock.sleep(self.policy.poll_s)

    def restore_local(
        self,
        node: NodeRef,
        files: dict[str, bytes],
        overlay: dict[str, bytes] | None = None,
    ) -> None:
        """Bring a booted node back, first part: what needs nothing but the node itself.

        Config files (captured + release overlay), the client firewall on servers (the
        downtime lasts until unsuspend), LNet, ZFS pools. Done as soon as the node booted,
        while the MGS may still be down: only ``start_services`` (mounting targets or the
        client) needs it.
        """
        shell = self.sh(node)
        wanted = dict(files)
        wanted.update(overlay or {})
        changed = False
        digests = self._digests(node, list(wanted))
        written = []
        for path, content in wanted.items():
            if digests.get(path) != hashlib.sha256(content).hexdigest():
                shell.run(["tee", path], stdin=content)
                written.append(path)
                changed = True
        if written:  # read back: every byte, or the node does not come back as itself
            after = self._digests(node, written)
            wrong = [p for p in written if after.get(p) != hashlib.sha256(wanted[p]).hexdigest()]
            if wrong:
                raise HealthCheckError(
                    f"{node.name}: {', '.join(wrong)} read back with another checksum than written"
                )
        if node.role in SERVER_ROLES:
            self.firewall_on(node)
        self._ensure_lnet(node, restart=changed)
        if node.role in SERVER_ROLES:
            pools = _pools_of(wanted.get("/etc/ldev.conf", b"").decode(errors="replace"))
            # Importing an imported pool fails: after a session dropped mid-import, list again.
            for attempt in range(1, 4):
                imported = set(shell.run(["zpool", "list", "-H", "-o", "name"]).stdout.split())
                try:
                    for pool in (p for p in pools if p not in imported):
                        shell.run(["zpool", "import", pool], idempotent=False)
                    break
                except NodeUnreachableError:
                    if attempt == 3:
                        raise

    def _digests(self, node: NodeRef, paths: Sequence[str]) -> dict[str, str]:
        """sha256 of each of ``paths`` that exists on ``node``."""
        shell = self.sh(node)
        results = shell.run_batch([["sha256sum", path] for path in paths])
        return {
            path: parse_sha256sum(result.stdout, path)
            for path, result in zip(paths, results, strict=True)
            if result.status == 0
        }

    def start_services(self, node: NodeRef) -> None:
        """Lustre (targets register with the MGS, a client mounts through it), HSM copytools.

        A server's targets serve from here while its firewall still cuts the clients off
        (counted in ``blocked`` until unsuspend). The copytool starts (health needs the
        agents registered; with the coordinator disabled it has nothing to copy), the
        hydrator does not: it does I/O, and a server that was not restarted (a swap that
        failed for one VM) still holds the cut-off clients' locks. It starts with the
        clients back (``resume_agent_work``)."""
        if node.role in SERVER_ROLES:
            self.blocked.start(node.name, self.clock.now())
        self._ensure_service(node, "lustre")
        if node.role in AGENT_ROLES:
            self._ensure_service(node, "lhsmd")

    def _ensure_lnet(self, node: NodeRef, *, restart: bool) -> None:
        shell = self.sh(node)
        net = shell.run(["lnetctl", "net", "show"], check=False)
        if net.status == 0 and parse_net_show(net.stdout) and not restart:
            return
        if (
            net.status == 0
            and parse_net_show(net.stdout)
            and shell.run(["systemctl", "is-active", "lustre"], check=False).status == 0
        ):
            return  # Lustre is serving on it: never bounce LNet under mounted targets
        try:
            shell.run(["systemctl", "restart", "lnet"])
        except CommandFailedError as err:
            self._raise_if_bad_release(node, err)
            raise

    def _ensure_service(self, node: NodeRef, unit: str) -> None:
        shell = self.sh(node)
        if shell.run(["systemctl", "is-active", unit], check=False).status == 0:
            return
        try:
            shell.run(["systemctl", "start", unit])
        except CommandFailedError as err:
            self._raise_if_bad_release(node, err)
            raise

    def _raise_if_bad_release(self, node: NodeRef, err: CommandFailedError) -> None:
        probe = self.sh(node).run(["modprobe", "lustre"], check=False)
        if probe.status != 0:
            raise BadReleaseError(
                f"{node.name}: Lustre modules do not load on this image "
                f"({probe.stderr.strip() or 'modprobe failed'})"
            ) from err

    # ------------------------------------------------------------------ health

    def check_node(
        self, node: NodeRef, lustre_version: str, agents_expected: int | None = None
    ) -> list[str]:
        """What is wrong with ``node`` for a suspended cluster on ``lustre_version``; on the
        MDS, ``agents_expected`` HSM agents must be registered (None: every agent)."""
        problems: list[str] = []
        shell = self.sh(node)
        server = node.role in SERVER_ROLES
        # Everything read in one exec; what a failed early read makes moot is ignored.
        reads = [
            ["lnetctl", "net", "show"],
            ["lctl", "get_param", "-n", "version"],
            ["lctl", "dl"],
            ["mount", "-t", "lustre"],
        ]
        if server:
            reads += [
                ["lctl", "get_param", "-n", "health_check"],
                ["lctl", "get_param", "*.*.recovery_status"],
            ]
        if node.role is Role.MDS:
            reads.append(["lctl", "get_param", "-n", "mdt.*.hsm.agents"])
        results = shell.run_batch(reads)
        net, version, dl, mount = results[:4]
        if net.status != 0 or not parse_net_show(net.stdout):
            problems.append("LNet has no NIDs")
            return problems
        if version.status != 0:
            return [*problems, "lctl cannot read the version (modules not loaded?)"]
        if parse_version(version.stdout) != lustre_version:
            problems.append(f"runs Lustre {parse_version(version.stdout)}, not {lustre_version}")
        devices = parse_devices(shell.check(reads[2], dl).stdout)
        if not devices or not all_up(devices):
            problems.append("lctl dl: not every device UP")
        mounts = parse_lustre_mounts(shell.check(reads[3], mount).stdout)
        if server:
            health, recovery = results[4], results[5].stdout
            if health.status != 0 or not parse_health_check(health.stdout):
                problems.append("health_check is not healthy")
            if not any(m.svname for m in mounts):
                problems.append("no target mounted")
            for name, text in parse_params(recovery).items():
                status = parse_recovery_status(text).status
                if status not in ("WAITING_FOR_CLIENTS", "RECOVERING", "COMPLETE"):
                    problems.append(f"{name.split('.')[1]} recovery {status}")
        elif not mounts:
            problems.append("file system not mounted")
        if node.role is Role.MDS:
            agents = parse_hsm_agents(shell.check(reads[-1], results[-1]).stdout)
            expected = (
                sum(1 for n in self.nodes if n.role in AGENT_ROLES)
                if agents_expected is None
                else agents_expected
            )
            if len(agents) < expected:
                problems.append(f"{len(agents)}/{expected} HSM agents registered")
        return problems

    def wait_healthy(self, nodes: Sequence[NodeRef], lustre_version: str, timeout_s: float) -> None:
        deadline = self.clock.now() + timeout_s

        # The agents among ``nodes`` must be registered with the MDT; the others may be
        # elsewhere (swapped back later).
        agents = sum(1 for n in nodes if n.role in AGENT_ROLES)

        def check(node: NodeRef) -> list[str]:
            self.checks.wait()
            try:
                return self.check_node(node, lustre_version, agents)
            except NodeError as err:
                return [str(err)]

        while True:
            self.check_recovery_deadline()
            problems = Problems()
            for name, found in self.each(nodes, check).items():
                for problem in found:
                    problems.add(name, problem)
            if not problems:
                return
            if self.clock.now() >= deadline:
                raise HealthCheckError(f"not healthy after {timeout_s:.0f} s: {problems}")
            self.clock.sleep(self.policy.poll_s)

    def wait_serving(self, timeout_s: float, probe_id: str) -> None:
        """After unsuspend: every target COMPLETE with no client evicted, lclient I/O works."""
        deadline = self.clock.now() + timeout_s
        while True:
            problems = Problems()
            for node in self.servers():
                self.checks.wait()
                try:
                    text = self.sh(node).run(["lctl", "get_param", "*.*.recovery_status"]).stdout
                except NodeError as err:
                    problems.add(node.name, str(err))
                    continue
                for name, value in parse_params(text).items():
                    status = parse_recovery_status(value)
                    if status.status != "COMPLETE":
                        problems.add(node.name, f"{name.split('.')[1]} {status.status}")
                    elif status.evicted:
                        raise HealthCheckError(
                            f"{node.name}: {name.split('.')[1]} evicted {status.evicted} clients"
                        )
            if not problems:
                break
            if self.clock.now() >= deadline:
                raise HealthCheckError(f"recovery not complete after {timeout_s:.0f} s: {problems}")
            self.clock.sleep(self.policy.poll_s)
        self.probe(probe_id)

    def probe(self, probe_id: str) -> None:
        """Write, read back and remove a file through every in-cluster client."""
        for node in (n for n in self.nodes if n.role is Role.LCLIENT):
            shell = self.sh(node)
            payload = f"amlfs-maintenance probe {probe_id}\n"
            shell.run(["tee", PROBE_FILE], stdin=payload.encode())
            read = shell.run(["cat", PROBE_FILE]).stdout
            shell.run(["rm", "-f", PROBE_FILE])
            if read != payload:
                raise HealthCheckError(f"{node.name}: probe read back {read!r}, wrote {payload!r}")


def _pools_of(ldev_conf: str) -> list[str]:
    """Pools named in ldev.conf lines ``host foreign label zfs:pool/dataset``."""
    pools = []
    for line in ldev_conf.splitlines():
        words = line.split()
        if len(words) >= 4 and words[3].startswith("zfs:"):
            pool = words[3][4:].split("/", 1)[0]
            if pool not in pools:
                pools.append(pool)
    return pools
