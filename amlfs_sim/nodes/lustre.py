"""Lustre nodes and the customers of each cluster, driven by the ARM emulator's events.

* An OS disk holds files (``DiskContent``): the cluster's config lives there, so booting a VM
  from a fresh release disk comes up without it, and swapping the old disk back brings it back.
* A node (``LustreNode``) is up while its VM runs; booting starts services from the files on
  its disk: LNet needs /etc/lnet.conf for NIDs, a pool imports only when /etc/hostid matches
  the host that last had it, targets mount per /etc/ldev.conf.
* A cluster (``ClusterSim``) has K clients. A client is *blocked* while any MDT/OST is down,
  unmounted, without NIDs, or drops client traffic on TCP 988; the file system *serves* when
  every target is reachable and COMPLETE, and the intervals when it does not are the
  customer's downtime. Evictions follow Lustre 2.15 (v2_15_5), each from its own timer:

  - **ping evictor**: a server that stays up evicts a client it has not heard from in
    ``PING_EVICT_TIMEOUT`` (6 x ``PING_INTERVAL``, ``PING_INTERVAL`` = ``timeout``/4), counted
    from the client's *last request* (its last ping before it was cut off, on a ping grid
    whose phase is seeded per client), after the evictor's second timer of 3 x
    ``PING_INTERVAL`` (lustre/include/obd_support.h, lustre/ptlrpc/service.c
    ``ptlrpc_update_export_timer``, lustre/ptlrpc/pinger.c ``ping_evictor_main``). Not while
    the target recovers, and not by a target that is down.
  - **lock callbacks**: clients hold locks on every target they are connected to. While a
    client is cut off from a target that is up, any conflicting request from inside the
    cluster (the ``hydrator`` running on an agent, a copytool ``lhsmd`` with a copy in flight,
    I/O by the in-cluster client) sends it a blocking AST it cannot answer: it is
    evicted ``ldlm_bl_timeout`` later, max(1.5 x its adaptive estimate, ``ldlm_enqueue_min``
    = 100 s) (``timeout``/2 with adaptive timeouts off), whatever ``timeout`` is
    (lustre/ldlm/ldlm_lockd.c ``ldlm_bl_timeout``, ``ldlm_server_blocking_ast``,
    ``waiting_locks_callback``; lustre/ldlm/ldlm_request.c ``ldlm_enqueue_min``).
  - **recovery**: a target that starts computes its windows at mount (after the MGS's params
    log: ``recovery_time_soft`` = max(what ``-P`` set, 3 x ``timeout`` shrunk by imperative
    recovery to factor 5/10, at least ``OBD_RECOVERY_TIME_MIN``), ``recovery_time_hard`` =
    9 x ``timeout``, whatever ``-P`` set: lustre/obdclass/obd_mount_server.c
    ``server_calc_timeout``). It waits for its clients (WAITING_FOR_CLIENTS) with no deadline
    until the first client connects (an in-cluster client, or for an OST the MDT); that
    starts the ``recovery_time_soft`` timer (RECOVERING), whose expiry evicts the clients that
    did not reconnect; ``recovery_time_hard`` after the start aborts it (lustre/ldlm/
    ldlm_lib.c ``target_handle_connect``, ``target_start_recovery_timer``,
    ``target_recovery_overseer``). Once every client reconnected it replays and is COMPLETE.

  Transitions are applied at their exact sim time, however late ``advance`` runs.
* HSM: while the coordinator is enabled, copytools (``lhsmd`` on the agents) run a seeded
  stream of copies; ``hsm_control=disabled`` only stops new ones: each active request ends
  when its copytool finishes copying it (lustre/mdt/mdt_coordinator.c: a disabled
  coordinator sleeps, ``hsm_control_store``), and a copy whose copytool is stopped does not
  progress.
"""

from __future__ import annotations

import fnmatch
import hashlib
import ipaddress
import math
import random
import shlex
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from amlfs.models import Cluster, Node, Role

__all__ = [
    "CLIENT_NETWORK",
    "CLUSTER_FILES",
    "DEFAULT_TUNABLES",
    "ClusterSim",
    "DiskContent",
    "HsmRequest",
    "HsmWorkload",
    "LustreNode",
    "Target",
    "recovery_windows",
]

FSNAME = "amlfs"
LNET_PORT = 988
# Customers' clients of cluster i are 10.8.i.k: addresses only, used to evaluate iptables -s.
CLIENT_NETWORK = "10.8.0.0/16"
REPLAY_SECONDS = 8.0  # a target's replay once every client reconnected
HSM_DRAIN_SECONDS = 15.0  # the longest copy of the default HSM workload (HsmCopies.copy_s)
HSM_BUSY_REQUESTS = 2  # copies in flight while the coordinator is enabled, by default
# lustre/ldlm/ldlm_request.c: ldlm_enqueue_min = OBD_TIMEOUT_DEFAULT (100 s), the floor of
# ldlm_bl_timeout (a module parameter, not an lctl tunable).
LDLM_ENQUEUE_MIN = 100.0
# lustre/obdclass/obd_mount_server.c server_calc_timeout: OBD_IR_FACTOR_DEFAULT / _MAX.
IR_FACTOR, IR_FACTOR_MAX = 5, 10
HSM_FID_SEQ = 0x200000401

LNET_CONF = "/etc/lnet.conf"
LUSTRE_CONF = "/etc/modprobe.d/lustre.conf"
LDEV_CONF = "/etc/ldev.conf"
HOSTID_FILE = "/etc/hostid"
HSM_AGENT_CONF = "/etc/lhsmd/agent"
HYDRATOR_CONF = "/etc/amlfs/hydrator.conf"
IPTABLES_RULES = "/etc/iptables/rules.v4"
CLUSTER_FILES = (
    LNET_CONF,
    LUSTRE_CONF,
    LDEV_CONF,
    HOSTID_FILE,
    HSM_AGENT_CONF,
    HYDRATOR_CONF,
    IPTABLES_RULES,
)

# Defaults of the global tunables the emulator models (Lustre 2.15 values). A target's
# recovery windows are not here: each target computes them when it mounts.
DEFAULT_TUNABLES: dict[str, str] = {
    "timeout": "100",
    "at_max": "600",
    "mdt.*.hsm_control": "enabled",
}
RECOVERY_WINDOW_PARAMS = ("recovery_time_soft", "recovery_time_hard")

Emit = Callable[..., Any]


def ping_interval(timeout: float) -> float:
    """``PING_INTERVAL`` = max(obd_timeout / 4, 1) (lustre/include/obd_support.h)."""
    return float(max(int(timeout) // 4, 1))


def recovery_windows(timeout: float, soft_param: float | None) -> tuple[float, float]:
    """(recovery_time_soft, recovery_time_hard) a target computes at mount.

    lustre/obdclass/obd_mount_server.c ``server_calc_timeout`` (v2_15_5), run after the
    target's config and the MGS's params log were processed: no mount option, so soft =
    ``OBD_RECOVERY_TIME_SOFT`` (3 x obd_timeout) and hard = ``OBD_RECOVERY_TIME_HARD``
    (9 x obd_timeout); imperative recovery (on by default) shrinks soft to factor/10 of it,
    not below ``OBD_RECOVERY_TIME_MIN`` = 2 x ``RECONNECT_DELAY_MAX``; then
    ``obd_recovery_timeout = max(what the params log set, soft)`` and
    ``obd_recovery_time_hard = hard``: a ``set_param -P`` of recovery_time_hard is
    overwritten at every mount, one of recovery_time_soft only counts when it is larger.
    """
    t = int(timeout)
    reconnect_delay_max = min(50, max(5, t)) + 5 + max(5, t // 20)
    soft = max(2 * reconnect_delay_max, 3 * t * IR_FACTOR // IR_FACTOR_MAX)
    return float(max(int(soft_param or 0), soft)), float(9 * t)


@dataclass
class DiskContent:
    """The files of one OS disk and the release it was made from."""

    files: dict[str, str]
    os_version: str
    lustre_version: str
    bad_image: bool
    own_hostid: str  # what `hostid` says when /etc/hostid is absent (a fresh install)


@dataclass
class Recovery:
    status: str = "INACTIVE"  # WAITING_FOR_CLIENTS, RECOVERING, COMPLETE
    start: float = 0.0  # mount; then the first connection (obd_recovery_start)
    end: float | None = None
    timer_start: float | None = None  # the first client connected: the soft timer runs
    timer_end: float | None = None  # timer_start + recovery_time_soft as armed then
    replay_end: float | None = None
    evicted: int = 0
    stuck: bool = False  # fault: recovery never completes


@dataclass
class Target:
    name: str  # amlfs-MDT0000, amlfs-OST0001, MGS
    kind: str  # mgs, mdt, ost
    pool: str
    dataset: str
    mounted: bool = False
    recovery: Recovery = field(default_factory=Recovery)
    # obd_recovery_timeout / obd_recovery_time_hard: computed at mount, set live by set_param.
    soft: float = 150.0
    hard: float = 900.0

    @property
    def param_prefix(self) -> str:
        return {"mdt": "mdt", "ost": "obdfilter", "mgs": "mgs"}[self.kind]

    @property
    def mountpoint(self) -> str:
        return f"/lustre/{FSNAME}/{self.dataset}"

    def param_name(self, leaf: str) -> str:
        return f"{self.param_prefix}.{self.name}.{leaf}"


@dataclass
class Client:
    address: str
    ping_phase: float = 0.0  # where on its ping grid this client pings (0..1 of an interval)
    bl_estimate: float = 1.0  # exp_bl_lock_at: how long it took to cancel locks lately (s)
    blocked_since: float | None = None
    evicted_in_episode: bool = False
    evictions: int = 0
    # Targets whose current incarnation has this client's export (and its locks).
    connected: set[str] = field(default_factory=set)
    # Target -> the client's last request to it before it was cut off (target still up).
    last_request: dict[str, float] = field(default_factory=dict)
    # Target -> (when a blocking AST was sent to it, by whom), while it cannot answer.
    bl_sent: dict[str, tuple[float, str]] = field(default_factory=dict)

    @property
    def nid(self) -> str:
        return f"{self.address}@tcp"

    @property
    def uuid(self) -> str:
        """The client's obd UUID as servers print it (a random UUID per mount)."""
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"lustre-client:{self.address}"))

    @property
    def export_ptr(self) -> str:
        low = int.from_bytes(hashlib.sha256(self.address.encode()).digest()[:4], "big")
        return f"{0xFFFF8A0000000000 + (low & 0xFFFFFFF0):016x}"


@dataclass
class HsmRequest:
    """One copy in the coordinator's active list (``mdt.*.hsm.active_requests``)."""

    serial: int  # the FID's object id and the cookie
    action: str  # ARCHIVE, RESTORE
    agent: str  # the node whose copytool runs it
    size: int  # bytes of the file
    duration: float  # seconds of copying the whole file takes
    copied_s: float = 0.0  # seconds of copying done so far

    @property
    def fid(self) -> str:
        return f"[0x{HSM_FID_SEQ:x}:0x{self.serial:x}:0x0]"

    @property
    def done(self) -> int:
        return min(self.size, int(self.size * self.copied_s / self.duration))


def _namespace(target: str) -> str:
    """The lock namespace of a target, as LDLM_ERROR prints it (``mdt-``/``filter-``)."""
    kind = "mdt" if "-MDT" in target else "filter"
    return f"{kind}-{target}_UUID"


class LustreNode:
    """One VM as a Lustre server or client."""

    def __init__(self, cluster: ClusterSim, node: Node, address: str, targets: list[Target]):
        self.cluster = cluster
        self.name = node.name
        self.role = node.role
        self.address = address
        self.nid = f"{address}@tcp"
        self.targets = targets
        self.up = False
        self.crashed = False
        self.disk: DiskContent | None = None
        self.services: dict[str, str] = {}
        self.nids: list[str] = []
        # set_param history (pattern, value), oldest first; -P ones are replayed at boot.
        self.settings: list[tuple[str, str]] = []
        self.iptables: list[str] = []
        self.pools: set[str] = set()
        self.client_mounted = False
        self.modules_loaded = False
        self.booted_at: float | None = None
        # The kernel's ring buffer (``dmesg``): (sim time, message, evictions it records),
        # emptied by each boot, and the boot's id (/proc/sys/kernel/random/boot_id, new at
        # every boot). ``log_read``: how many of its lines a ``dmesg`` has printed (the
        # ground truth of what an orchestrator could have counted).
        self.kernel_log: list[tuple[float, str, int]] = []
        self.log_read = 0
        self.boot_id = ""
        self.boots = 0

    # ------------------------------------------------------------------ facts

    @property
    def hostid(self) -> str:
        """What ``hostid`` prints and ZFS compares: glibc's ``gethostid`` reads the first 4
        bytes of ``/etc/hostid`` as a native-endian (x86: little-endian) 32-bit integer
        (glibc sysdeps/unix/sysv/linux/gethostid.c; OpenZFS ``zgenhostid`` writes the
        same 4 bytes). A shorter file falls back to the install's own id."""
        assert self.disk is not None
        raw = self.disk.files.get(HOSTID_FILE)
        if raw is None:
            return self.disk.own_hostid
        data = file_bytes(raw)
        if len(data) < 4:
            return self.disk.own_hostid
        return f"{struct.unpack('<I', data[:4])[0]:08x}"

    @property
    def lustre_version(self) -> str:
        return self.disk.lustre_version if self.disk else ""

    @property
    def is_mgs(self) -> bool:
        return any(t.kind == "mgs" and t.mounted for t in self.targets)

    def param(self, name: str) -> str | None:
        """Current value of parameter ``name``: its default, then every matching set_param.
        A target's recovery windows are its own (computed at mount, then set live)."""
        if name.endswith(RECOVERY_WINDOW_PARAMS):
            for target in self.targets:
                for leaf in RECOVERY_WINDOW_PARAMS:
                    if name == target.param_name(leaf):
                        if not target.mounted:
                            return None
                        return f"{int(target.soft if leaf.endswith('soft') else target.hard)}"
        value = next(
            (v for pat, v in DEFAULT_TUNABLES.items() if fnmatch.fnmatchcase(name, pat)), None
        )
        for pattern, setting in self.settings:
            if fnmatch.fnmatchcase(name, pattern):
                value = setting
        return value

    def param_names(self) -> list[str]:
        """The parameters ``lctl get_param`` can see: none until the modules are loaded."""
        if not self.up or not self.modules_loaded:
            return []
        names = ["version", "health_check", "timeout", "at_max"]
        for target in self.targets:
            if not target.mounted or target.kind == "mgs":
                continue
            base = f"{target.param_prefix}.{target.name}"
            names += [
                f"{base}.recovery_status",
                f"{base}.recovery_time_soft",
                f"{base}.recovery_time_hard",
            ]
            if target.kind == "mdt":
                names += [
                    f"{base}.hsm_control",
                    f"{base}.hsm.active_requests",
                    f"{base}.hsm.agents",
                ]
        return names

    def healthy(self) -> bool:
        return (
            self.up
            and self.modules_loaded
            and self.services.get("lnet") == "active"
            and all(t.mounted for t in self.targets)
        )

    def service_names(self) -> list[str]:
        names = ["lnet", "lustre"]
        if self.role in (Role.AGTPRI, Role.AGTSTD):
            names.append("lhsmd")
        if self.role is Role.AGTPRI:
            names.append("hydrator")
        return names

    def drops_client_traffic(self, client_address: str) -> bool:
        """Is LNet traffic between this server and a client cut, *both ways*?

        LNet's socklnd (lnet/klnds/socklnd, v2_15_5) connects in either direction: a client
        connects to the server's TCP 988, and a server opens its own connections to a
        client's 988 from a reserved source port (512-1023, ``lnet_acceptor_port`` and
        ``accept_port``/``lnet_connect``), e.g. to send a blocking callback. A rule on the
        server's INPUT chain for ``--dport 988`` stops the first kind only: the second goes
        out, and the client's answers come back with *source* port 988. The client is cut
        off only when both are: inbound to 988 dropped, and outbound to the client's 988
        dropped (OUTPUT ``-d CLIENT --dport 988``) or every packet from it dropped (INPUT
        without a port, or ``--sport 988``). Chains are walked in order, policy ACCEPT.
        """
        inbound = self._chain_drops("INPUT", "source", client_address, ("dport",))
        outbound = self._chain_drops(
            "OUTPUT", "dest", client_address, ("dport",)
        ) or self._chain_drops("INPUT", "source", client_address, ("sport",), portless=True)
        return inbound and outbound

    def firewall_one_way(self, client_address: str) -> bool:
        """Client-initiated LNet traffic dropped but the server's own connections let out."""
        inbound = self._chain_drops("INPUT", "source", client_address, ("dport",))
        return inbound and not self.drops_client_traffic(client_address)

    def _chain_drops(
        self,
        chain: str,
        peer_key: str,
        address: str,
        port_keys: tuple[str, ...],
        *,
        portless: bool = False,
    ) -> bool:
        """The verdict of ``chain`` for TCP to/from LNet's port with ``address`` as peer:
        the first matching DROP/REJECT or ACCEPT rule; no match: ACCEPT."""
        peer = ipaddress.ip_address(address)
        for rule in self.iptables:
            spec = _parse_rule(rule)
            if spec is None or spec.get("chain") != chain:
                continue
            ports = {k: spec.get(k) for k in ("dport", "sport")}
            if portless:
                # A rule that matches the client's answers: no port, or source port 988.
                if ports["dport"] is not None or ports["sport"] not in (None, str(LNET_PORT)):
                    continue
            elif any(ports[k] not in (None, str(LNET_PORT)) for k in port_keys) or any(
                ports[k] is not None for k in ("dport", "sport") if k not in port_keys
            ):
                continue
            if spec.get("proto") not in (None, "tcp"):
                continue
            cidr = spec.get(peer_key)
            if cidr is not None:
                try:
                    if peer not in ipaddress.ip_network(cidr, strict=False):
                        continue
                except ValueError:
                    continue
            verdict = spec.get("jump")
            if verdict in ("DROP", "REJECT"):
                return True
            if verdict == "ACCEPT":
                return False
        return False

    def kernel_message(self, at: float, text: str, evictions: int = 0) -> None:
        """A console message of this boot (what ``dmesg`` prints), recording ``evictions``."""
        if self.up:
            self.kernel_log.append((at, text, evictions))

    def unread_evictions(self) -> int:
        """Evictions this boot logged that no ``dmesg`` has printed yet."""
        return sum(e for _, _, e in self.kernel_log[self.log_read :])

    # ------------------------------------------------------------------ lifecycle

    def go_down(self, at: float) -> None:
        self.cluster.advance(at)
        self.power_off()
        self.cluster.changed(at)

    def power_off(self) -> None:
        """Lose everything that lives in memory; the disk's files stay."""
        self.up = False
        self.services = {}
        self.nids = []
        self.settings = []
        self.iptables = []
        self.pools = set()
        self.client_mounted = False
        self.modules_loaded = False
        for target in self.targets:
            target.mounted = False
            target.recovery = Recovery()

    def boot(
        self, disk: DiskContent, at: float, *, crash: bool = False, settled: bool = False
    ) -> None:
        """Boot from ``disk``: what starts depends on the files it holds."""
        self.cluster.advance(at)
        self.disk = disk
        self.booted_at = at
        self.boots += 1
        self.boot_id = str(uuid.UUID(bytes=self.cluster.digest("boot", self.name, self.boots)[:16]))
        # The ring buffer dies with the boot: what nobody read of it is lost for good.
        self.cluster.evictions_lost_from_logs += self.unread_evictions()
        self.kernel_log = []
        self.log_read = 0
        self.crashed = crash
        self.up = not crash
        self.services = {name: "inactive" for name in self.service_names()}
        self.nids, self.pools, self.iptables = [], set(), []
        self.settings = list(self.cluster.persistent.items())  # MGS config log, at mount
        if crash:
            self.cluster.changed(at)
            return
        self.modules_loaded = not disk.bad_image
        rules = disk.files.get(IPTABLES_RULES)
        if rules:
            self.iptables = [line for line in rules.splitlines() if line.startswith("-A ")]
        self.start_service("lnet", at)
        if self.nids:
            for target in self.targets:
                self.import_pool(target.pool, force=False)
            self.start_service("lustre", at)
            for name in ("lhsmd", "hydrator"):
                if name in self.services:
                    self.start_service(name, at)
        if settled:  # the fleet as loaded has been serving for a long time
            for target in self.targets:
                if target.mounted:
                    target.recovery = Recovery(status="COMPLETE", start=at, end=at)
        self.cluster.changed(at)

    def start_service(self, name: str, at: float) -> tuple[int, str]:
        """systemctl start NAME: (exit code, message)."""
        if name not in self.services:
            return 5, f"Failed to start {name}.service: Unit {name}.service not found.\n"
        assert self.disk is not None
        if name in ("lnet", "lustre") and not self.modules_loaded:
            self.services[name] = "failed"
            return 1, (
                f"Job for {name}.service failed because the control process exited with error "
                f'code.\nSee "systemctl status {name}.service" and "journalctl -xeu '
                f'{name}.service" for details.\n'
            )
        if name == "lnet":
            self.services["lnet"] = "active"
            self.nids = [self.nid] if LNET_CONF in self.disk.files else []
            return 0, ""
        if name == "lustre":
            if self.services.get("lnet") != "active":
                self.services["lustre"] = "failed"
                return (
                    1,
                    "A dependency job for lustre.service failed. See 'journalctl -xe' for details.\n",
                )
            if not self.targets:  # lclient and HSM agents mount the file system
                self.client_mounted = bool(self.nids)
                self.services["lustre"] = "active" if self.client_mounted else "failed"
                return (0, "") if self.client_mounted else (1, "mount.lustre: mount failed\n")
            ready = (
                bool(self.nids)
                and LDEV_CONF in self.disk.files
                and all(t.pool in self.pools for t in self.targets)
            )
            if not ready:
                self.services["lustre"] = "failed"
                return 1, (
                    "Job for lustre.service failed because the control process exited with "
                    'error code.\nSee "systemctl status lustre.service" and "journalctl '
                    '-xeu lustre.service" for details.\n'
                )
            self.services["lustre"] = "active"
            for target in self.targets:
                if not target.mounted:
                    target.mounted = True
                    self.cluster.target_started(self, target, at)
            return 0, ""
        # HSM copytool and hydrator need their config and a working LNet.
        conf = HSM_AGENT_CONF if name == "lhsmd" else HYDRATOR_CONF
        if conf not in self.disk.files or not self.nids:
            self.services[name] = "failed"
            return 1, f"Job for {name}.service failed. See 'journalctl -xeu {name}.service'.\n"
        self.services[name] = "active"
        return 0, ""

    def stop_service(self, name: str, at: float) -> tuple[int, str]:
        if name not in self.services:
            return 5, f"Failed to stop {name}.service: Unit {name}.service not loaded.\n"
        self.services[name] = "inactive"
        if name == "lustre":
            for target in self.targets:
                target.mounted = False
                target.recovery = Recovery()
            self.client_mounted = False
        if name == "lnet":
            self.nids = []
        return 0, ""

    def import_pool(self, pool: str, *, force: bool) -> tuple[int, str]:
        known = {t.pool for t in self.targets}
        if pool not in known:
            return 1, f"cannot import '{pool}': no such pool available\n"
        if pool in self.pools:
            return 1, f"cannot import '{pool}': a pool with that name already exists\n"
        last = self.cluster.pool_hostids.get(pool)
        if not force and last is not None and last != self.hostid:
            return 1, (
                f"cannot import '{pool}': pool was previously in use from another system.\n"
                f"Last accessed by {self.name} (hostid={last}) at Tue Nov 24 02:00:00 2026\n"
                "The pool can be imported, use 'zpool import -f' to import the pool.\n"
            )
        self.pools.add(pool)
        self.cluster.pool_hostids[pool] = self.hostid
        return 0, ""


def _parse_rule(rule: str) -> dict[str, str] | None:
    try:
        words = shlex.split(rule)
    except ValueError:
        return None
    spec: dict[str, str] = {}
    flags = {
        "-A": "chain",
        "-I": "chain",
        "-s": "source",
        "--source": "source",
        "-d": "dest",
        "--destination": "dest",
        "-p": "proto",
        "--dport": "dport",
        "--destination-port": "dport",
        "--sport": "sport",
        "--source-port": "sport",
        "-j": "jump",
    }
    i = 0
    while i < len(words):
        key = flags.get(words[i])
        if key is not None and i + 1 < len(words):
            spec[key] = words[i + 1]
            i += 2
        else:
            i += 1
    return spec


@dataclass(frozen=True)
class HsmWorkload:
    """The copies a cluster's coordinator keeps in flight while enabled (seeded)."""

    requests: int = HSM_BUSY_REQUESTS
    copy_low_s: float = 5.0
    copy_high_s: float = HSM_DRAIN_SECONDS
    bytes_per_s: float = 200e6


class ClusterSim:
    """The customer's view of one cluster: clients, recovery, downtime and evictions."""

    def __init__(
        self,
        cluster: Cluster,
        index: int,
        clients: int,
        emit: Emit,
        *,
        seed: int = 0,
        hsm: HsmWorkload | None = None,
    ) -> None:
        self.name = cluster.name
        self.spec = cluster
        self.index = index
        self.client_count = clients
        self.seed = seed
        self.hsm_workload = hsm or HsmWorkload()
        self._emit = emit
        self.nodes: list[LustreNode] = []
        self.reset()

    def digest(self, *parts: object) -> bytes:
        return hashlib.sha256(
            ":".join(str(p) for p in (self.seed, self.name, *parts)).encode()
        ).digest()

    def _client(self, k: int) -> Client:
        address = f"10.8.{self.index % 256}.{k + 1}"
        digest = self.digest("client", address)
        return Client(
            address,
            # Deterministic from the seed: where in its ping interval it pings, and its
            # blocking-callback estimate (a settled client cancels a lock in 1-10 s).
            ping_phase=int.from_bytes(digest[:4], "big") / 2**32,
            bl_estimate=float(1 + digest[4] % 10),
        )

    def reset(self) -> None:
        """Forget history: the state of a cluster about to be booted as loaded."""
        self.quiet = True  # no events while the fleet as loaded boots
        self.clients = [self._client(k) for k in range(self.client_count)]
        # lctl set_param -P: kept by the MGS on the MDT, so it survives an OS disk swap.
        self.persistent: dict[str, str] = {}
        self.pool_hostids: dict[str, str] = {}
        self.last_timeout = float(DEFAULT_TUNABLES["timeout"])
        self.serving = False
        self.downtime: list[list[float | None]] = []
        self.evictions: list[dict[str, Any]] = []
        self.evictions_lost_from_logs = 0  # see report()
        self.lustre_files: dict[str, str] = {}  # the file system's content, seen by lclients
        self.stuck_nodes: set[str] = set()  # recovery_stuck fault, consumed per target start
        # Servers up (targets mounted) while some client is cut off by their firewall.
        self.blocked_up: list[list[float | None]] = []
        self.lock_callbacks: list[dict[str, Any]] = []  # blocking ASTs to cut-off clients
        self.hsm_active: list[HsmRequest] = []
        self.hsm_serial = 0
        # Copies are accounted from the first look after settle (None until then): the
        # sim clock keeps running across a reset, the workload starts when it is watched.
        self.hsm_at: float | None = None
        self.now = 0.0

    def emit(self, at: float, type_: str, **data: Any) -> None:
        if not self.quiet:
            self._emit(at, type_, **data)

    # ------------------------------------------------------------------ queries

    @property
    def server_targets(self) -> list[tuple[LustreNode, Target]]:
        return [(n, t) for n in self.nodes for t in n.targets if t.kind in ("mdt", "ost")]

    @property
    def mds(self) -> LustreNode:
        return next(n for n in self.nodes if n.role is Role.MDS)

    def timeout(self) -> float:
        """The ``timeout`` clients run with: from the MGS config log, else the MDS's value."""
        if "timeout" in self.persistent:
            return float(self.persistent["timeout"])
        mds = self.mds
        value = mds.param("timeout") if mds.up and mds.modules_loaded else None
        return float(value) if value is not None else self.last_timeout

    def reachable(self, node: LustreNode, target: Target, address: str) -> bool:
        return (
            node.up
            and bool(node.nids)
            and target.mounted
            and not node.drops_client_traffic(address)
        )

    def cut_off(self, node: LustreNode, target: Target, address: str) -> bool:
        """The target is up and serving its exports, but its firewall cuts this client off."""
        return node.up and bool(node.nids) and target.mounted and node.drops_client_traffic(address)

    def blocked(self, client: Client) -> bool:
        return any(not self.reachable(n, t, client.address) for n, t in self.server_targets)

    def usable_from(self, address: str) -> bool:
        """Whether a client at ``address`` can do I/O now (every target reachable and done)."""
        targets = self.server_targets
        return bool(targets) and all(
            self.reachable(n, t, address) and t.recovery.status == "COMPLETE" for n, t in targets
        )

    def _serving(self) -> bool:
        targets = self.server_targets
        if not targets:
            return False
        if any(t.recovery.status != "COMPLETE" for _, t in targets):
            return False
        return not any(self.blocked(c) for c in self.clients) and all(
            n.up and n.nids and t.mounted for n, t in targets
        )

    def versions(self) -> list[str]:
        return sorted(
            {n.lustre_version for n in self.nodes if n.up and n.role in (Role.MDS, Role.OSS)}
        )

    @staticmethod
    def _total(spans: list[list[float | None]], now: float) -> float:
        total = 0.0
        for start, end in spans:
            assert start is not None
            total += (now if end is None else end) - start
        return total

    def downtime_total(self, now: float) -> float:
        return self._total(self.downtime, now)

    def blocked_while_up(self, now: float) -> float:
        return self._total(self.blocked_up, now)

    def in_cluster_actors(self) -> list[str]:
        """In-cluster work that takes locks conflicting with the customers' (``node/unit``),
        on an agent with the file system mounted: the hydrator while it runs (it imports and
        restores files all along), a copytool while it has a copy in flight (an idle one
        waits for the coordinator and touches nothing)."""
        copying = {r.agent for r in self.hsm_active}
        actors = []
        for n in self.nodes:
            if not (n.up and n.client_mounted):
                continue
            if n.services.get("hydrator") == "active":
                actors.append(f"{n.name}/hydrator")
            if n.services.get("lhsmd") == "active" and n.name in copying:
                actors.append(f"{n.name}/lhsmd")
        return actors

    def _settled(self, target: Target) -> bool:
        """Not in recovery: the ping evictor and lock timers run (in recovery the server is
        "nice to everyone", ptlrpc_update_export_timer; unreplayed locks are not held)."""
        return target.recovery.status in ("COMPLETE", "INACTIVE")

    # ------------------------------------------------------------------ HSM

    def _coordinator_enabled(self) -> bool:
        mds = self.mds
        mdt = next((t for t in mds.targets if t.kind == "mdt"), None)
        if not (mds.up and mds.modules_loaded and mdt is not None and mdt.mounted):
            return False
        return mds.param(mdt.param_name("hsm_control")) == "enabled"

    def _copytool_running(self, name: str) -> bool:
        node = next((n for n in self.nodes if n.name == name), None)
        return (
            node is not None
            and node.up
            and node.client_mounted
            and node.services.get("lhsmd") == "active"
        )

    def _dispatch(self, at: float) -> None:
        """An enabled coordinator hands new copies to the running copytools."""
        work = self.hsm_workload
        if not self._coordinator_enabled():
            return
        agents = [n.name for n in self.nodes if self._copytool_running(n.name)]
        while agents and len(self.hsm_active) < work.requests:
            self.hsm_serial += 1
            rng = random.Random(self.digest("hsm", self.hsm_serial))
            duration = max(1.0, rng.uniform(work.copy_low_s, work.copy_high_s))
            self.hsm_active.append(
                HsmRequest(
                    serial=self.hsm_serial,
                    action="RESTORE" if rng.random() < 0.25 else "ARCHIVE",
                    agent=agents[self.hsm_serial % len(agents)],
                    size=int(duration * work.bytes_per_s),
                    duration=duration,
                )
            )

    def hsm_update(self, now: float) -> None:
        """Copies progress while their copytool runs; each leaves the active list when its
        copy is done, and an enabled coordinator starts the next one at that moment."""
        if self.hsm_at is None:
            self.hsm_at = now
        at = self.hsm_at
        if now < at:
            return
        mds = self.mds
        if not (mds.up and any(t.mounted for t in mds.targets if t.kind == "mdt")):
            self.hsm_active = []  # the MDT stopped: its in-memory request list is gone
        while True:
            running = [r for r in self.hsm_active if self._copytool_running(r.agent)]
            ends = [at + r.duration - r.copied_s for r in running]
            step = min([now, *ends])
            for r in running:
                r.copied_s = min(r.duration, r.copied_s + step - at)
            at = step
            self.hsm_active = [r for r in self.hsm_active if r.copied_s < r.duration - 1e-9]
            self._dispatch(at)
            if step >= now:
                break
        self.hsm_at = now

    def hsm_active_requests(self, now: float) -> int:
        self.hsm_update(now)
        return len(self.hsm_active)

    def hsm_requests(self, now: float) -> list[HsmRequest]:
        self.hsm_update(now)
        return list(self.hsm_active)

    def hsm_purge(self, now: float) -> None:
        """``hsm_control=purge``: every action cancelled (hsm_cancel_all_actions)."""
        self.hsm_update(now)
        self.hsm_active = []

    def hsm_file_size(self, fid: str) -> int | None:
        return next((r.size for r in self.hsm_active if r.fid == fid), None)

    # ------------------------------------------------------------------ time

    def target_started(self, node: LustreNode, target: Target, at: float) -> None:
        stuck = node.name in self.stuck_nodes
        # Windows as server_calc_timeout computes them, after the params log (-P) applied.
        soft_param = None
        for pattern, value in self.persistent.items():
            if fnmatch.fnmatchcase(target.param_name("recovery_time_soft"), pattern):
                soft_param = float(value)
        target.soft, target.hard = recovery_windows(
            float(node.param("timeout") or DEFAULT_TUNABLES["timeout"]), soft_param
        )
        target.recovery = Recovery(status="WAITING_FOR_CLIENTS", start=at, stuck=stuck)
        for client in self.clients:  # a new incarnation: exports rebuilt from last_rcvd
            client.connected.discard(target.name)
            client.last_request.pop(target.name, None)
            client.bl_sent.pop(target.name, None)
        self.emit(
            at,
            "lustre.recovery_started",
            cluster=self.name,
            node=node.name,
            target=target.name,
            stuck=stuck,
            recovery_time_soft=target.soft,
            recovery_time_hard=target.hard,
        )
        self._try_reconnect(at)

    def _first_connection(self, node: LustreNode, target: Target) -> bool:
        """Has any client connected to this recovering target? In-cluster clients (lclient,
        HSM agents) reach every server; an OST's first client is usually the MDT itself.
        (An OST's lightweight LWP connection to the MDT does not count: target_handle_connect
        starts the timer for non-lightweight connections only.)"""
        if not (node.up and node.nids and target.mounted):
            return False
        if any(self.reachable(node, target, c.address) for c in self.clients):
            return True
        for member in self.nodes:
            if not (member.up and member.nids):
                continue
            if member.client_mounted:
                return True
            if target.kind == "ost" and any(t.kind == "mdt" and t.mounted for t in member.targets):
                return True
        return False

    def _ping_timeout(self) -> tuple[float, float]:
        """(PING_EVICT_TIMEOUT, the evictor's second timer): 6 and 3 ping intervals."""
        interval = ping_interval(self.timeout())
        return 6 * interval, 3 * interval

    def _bl_timeout(self, node: LustreNode, client: Client) -> float:
        """ldlm_bl_timeout: ``obd_timeout / 2`` with adaptive timeouts off (at_max=0), else
        max(1.5 x the export's estimate, ldlm_enqueue_min)."""
        if (node.param("at_max") or DEFAULT_TUNABLES["at_max"]) == "0":
            return self.timeout() / 2
        estimate = math.floor(client.bl_estimate)
        return max(estimate + estimate // 2, LDLM_ENQUEUE_MIN)

    def next_deadline(self) -> tuple[float, str, Any] | None:
        best: tuple[float, str, Any] | None = None

        def offer(cand: tuple[float, str, Any]) -> None:
            nonlocal best
            if best is None or cand[0] < best[0]:
                best = cand

        evict_after, second_timer = self._ping_timeout()
        for node, target in self.server_targets:
            rec = target.recovery
            if not rec.stuck:
                if rec.status == "RECOVERING" and rec.replay_end is not None:
                    offer((rec.replay_end, "replayed", target))
                elif rec.status == "RECOVERING" and rec.timer_start is not None:
                    assert rec.timer_end is not None
                    hard_end = rec.timer_start + target.hard
                    if hard_end <= rec.timer_end:
                        offer((hard_end, "recovery_time_hard", (node, target)))
                    else:
                        offer((rec.timer_end, "recovery_time_soft", (node, target)))
            lasts = [
                c.last_request[target.name]
                for c in self.clients
                if target.name in c.last_request and not c.evicted_in_episode
            ]
            if lasts and node.up and self._settled(target):
                offer((min(lasts) + evict_after + second_timer, "ping", (node, target)))
        for client in self.clients:
            if client.evicted_in_episode:
                continue
            for name, (sent, _) in client.bl_sent.items():
                node = next(n for n, t in self.server_targets if t.name == name)
                offer((sent + self._bl_timeout(node, client), "lock callback", (client, name)))
        return best

    def advance(self, now: float) -> None:
        """Apply every timed transition due by ``now``, each at its own time."""
        while True:
            due = self.next_deadline()
            if due is None or due[0] > now:
                break
            at, what, subject = due
            at = max(at, self.now)
            self.hsm_update(at)
            if what == "replayed":
                subject.recovery.status = "COMPLETE"
                subject.recovery.end = at
                self.emit(
                    at,
                    "lustre.recovery_complete",
                    cluster=self.name,
                    target=subject.name,
                    evicted=subject.recovery.evicted,
                )
            elif what in ("recovery_time_soft", "recovery_time_hard"):
                self._recovery_expired(subject[0], subject[1], at, what)
            elif what == "ping":
                node, target = subject
                evict_after, _ = self._ping_timeout()
                for client in self.clients:
                    last = client.last_request.get(target.name)
                    if last is not None and last < at - evict_after:
                        self._evict(
                            client,
                            at,
                            f"{target.name}: haven't heard from client in {at - last:.0f} "
                            f"seconds (ping evictor, timeout {self.timeout():g} s)",
                        )
                        # lustre/ptlrpc/pinger.c ping_evictor_main (LCONSOLE_WARN), v2_15_5
                        node.kernel_message(
                            at,
                            f"Lustre: {target.name}: haven't heard from client "
                            f"{client.uuid} (at {client.nid}) in {at - last:.0f} seconds. "
                            "I think it's dead, and I am evicting it. exp "
                            f"{client.export_ptr}, cur {at:.0f} expire "
                            f"{at - evict_after:.0f} last {last:.0f}",
                            evictions=1,
                        )
            else:
                client, name = subject
                sent, actor = client.bl_sent[name]
                node = next(n for n, t in self.server_targets if t.name == name)
                self._evict(
                    client,
                    at,
                    f"{name}: lock callback timer expired after {at - sent:.0f}s "
                    f"(conflicting request from {actor})",
                )
                # lustre/ldlm/ldlm_lockd.c expired_lock_main (LDLM_ERROR), v2_15_5
                node.kernel_message(
                    at,
                    "LustreError: 0:0:(ldlm_lockd.c:258:expired_lock_main()) ### lock "
                    f"callback timer expired after {at - sent:.0f}s: evicting client at "
                    f"{client.nid}  ns: {_namespace(name)} lock: {client.export_ptr}",
                    evictions=1,
                )
            self.now = at
            self._refresh(at)
        self.hsm_update(now)
        self.now = max(self.now, now)

    def _recovery_expired(self, node: LustreNode, target: Target, at: float, why: str) -> None:
        """The soft timer expired (class_disconnect_stale_exports of the clients that did not
        reconnect) or the hard limit aborted recovery: evicted, and the target completes."""
        rec = target.recovery
        rec.status, rec.end = "COMPLETE", at
        stale = 0
        for client in self.clients:
            if not self.reachable(node, target, client.address):
                rec.evicted += 1
                if not client.evicted_in_episode:
                    # Evicted here, its exports are gone everywhere (``_evict``): another
                    # target's expiry in the same episode finds no export of it to drop.
                    stale += 1
                    self._evict(client, at, f"{target.name} {why} expired")
        if stale:
            # lustre/ldlm/ldlm_lib.c target_recovery_overseer and lustre/obdclass/genops.c
            # class_disconnect_stale_exports (LCONSOLE_WARN), v2_15_5: one line per target
            # with the count; each client's own line is D_HA debug, not on the console.
            node.kernel_message(
                at, f"Lustre: {target.name}: recovery is timed out, evict stale exports"
            )
            node.kernel_message(
                at, f"Lustre: {target.name}: disconnecting {stale} stale clients", evictions=stale
            )
        self.emit(
            at,
            "lustre.recovery_complete",
            cluster=self.name,
            target=target.name,
            evicted=rec.evicted,
        )

    def _evict(self, client: Client, at: float, reason: str) -> None:
        client.evicted_in_episode = True
        client.evictions += 1
        # class_fail_export: its exports, and the locks with them, are gone.
        client.connected.clear()
        client.last_request.clear()
        client.bl_sent.clear()
        self.evictions.append({"at": round(at, 3), "client": client.address, "reason": reason})
        self.emit(
            at, "lustre.client_evicted", cluster=self.name, client=client.address, reason=reason
        )

    def changed(self, at: float) -> None:
        """Something that affects reachability happened at ``at`` (after ``advance(at)``)."""
        self.now = max(self.now, at)
        mds = next((n for n in self.nodes if n.role is Role.MDS), None)
        if mds is not None and mds.up and mds.modules_loaded:
            self.last_timeout = float(mds.param("timeout") or self.last_timeout)
        self.hsm_update(at)
        self._try_reconnect(at)
        self._refresh(at)

    def client_io(self, node: LustreNode, at: float) -> None:
        """The in-cluster client at ``node`` did I/O: conflicting requests to the clients
        that hold locks and cannot be reached get a blocking AST now."""
        self._send_blocking_asts(at, f"{node.name}/io")

    def _send_blocking_asts(self, at: float, actor: str) -> None:
        for client in self.clients:
            if client.evicted_in_episode:
                continue
            for node, target in self.server_targets:
                if (
                    target.name in client.connected
                    and target.name not in client.bl_sent
                    and self._settled(target)
                    and self.cut_off(node, target, client.address)
                ):
                    client.bl_sent[target.name] = (at, actor)
                    self.lock_callbacks.append(
                        {
                            "at": round(at, 3),
                            "client": client.address,
                            "target": target.name,
                            "from": actor,
                        }
                    )
                    self.emit(
                        at,
                        "lustre.blocking_ast",
                        cluster=self.name,
                        client=client.address,
                        target=target.name,
                        actor=actor,
                    )

    def _try_reconnect(self, at: float) -> None:
        for node, target in self.server_targets:
            rec = target.recovery
            if rec.status not in ("WAITING_FOR_CLIENTS", "RECOVERING"):
                continue
            everyone = not self.clients or all(
                self.reachable(node, target, c.address) for c in self.clients
            )
            if rec.timer_start is None and (everyone or self._first_connection(node, target)):
                # target_start_recovery_timer: armed with the soft window as it is now.
                rec.status = "RECOVERING"
                rec.start = rec.timer_start = at
                rec.timer_end = at + target.soft
            if everyone and rec.replay_end is None and not rec.stuck:
                rec.replay_end = at + REPLAY_SECONDS

    def _refresh(self, at: float) -> None:
        targets = self.server_targets
        actors = self.in_cluster_actors()
        any_cut = False
        for client in self.clients:
            blocked = False
            for node, target in targets:
                if self.reachable(node, target, client.address):
                    # (Re)connected: its export is live again (locks replayed in recovery).
                    client.connected.add(target.name)
                    client.last_request.pop(target.name, None)
                    client.bl_sent.pop(target.name, None)
                    continue
                blocked = True
                if self.cut_off(node, target, client.address):
                    any_cut = True
                    if target.name in client.connected and self._settled(target):
                        if target.name not in client.last_request:
                            client.last_request[target.name] = self._last_ping(client, at)
                        continue
                # Down, unmounted or recovering: no export to ping, no lock waiting.
                client.last_request.pop(target.name, None)
                client.bl_sent.pop(target.name, None)
            if blocked and client.blocked_since is None:
                client.blocked_since = at
            elif not blocked and client.blocked_since is not None:
                client.blocked_since = None
                client.evicted_in_episode = False
        for actor in actors:
            self._send_blocking_asts(at, actor)
        if any_cut and (not self.blocked_up or self.blocked_up[-1][1] is not None):
            self.blocked_up.append([at, None])
        elif not any_cut and self.blocked_up and self.blocked_up[-1][1] is None:
            self.blocked_up[-1][1] = at
        serving = self._serving()
        if serving != self.serving:
            if not serving:
                self.downtime.append([at, None])
                self.emit(at, "lustre.downtime_started", cluster=self.name)
            elif self.downtime:
                self.downtime[-1][1] = at
                start = self.downtime[-1][0]
                assert start is not None
                self.emit(
                    at, "lustre.downtime_ended", cluster=self.name, seconds=round(at - start, 3)
                )
            self.serving = serving

    def _last_ping(self, client: Client, at: float) -> float:
        """The client's last request at or before ``at``: its last ping (every
        ``PING_INTERVAL`` at its own phase; ptlrpc_pinger_main / ptlrpc_ping)."""
        interval = ping_interval(self.timeout())
        phase = client.ping_phase * interval
        return at - ((at - phase) % interval)

    def settle(self, at: float) -> None:
        """The fleet as loaded has served for a long time: no downtime is on record, and
        every client is connected to every target (holding locks there)."""
        for client in self.clients:
            client.connected = {t.name for _, t in self.server_targets}
        self._refresh(at)
        self.downtime = []
        self.evictions = []
        self.blocked_up = []
        self.lock_callbacks = []
        self.hsm_active, self.hsm_at = [], None
        for client in self.clients:
            client.evictions = 0
        self.quiet = False

    # ------------------------------------------------------------------ report

    def report(self, now: float) -> dict[str, Any]:
        return {
            "serving": self.serving,
            "lustre_versions": self.versions(),
            "downtime_intervals": [
                [round(s or 0.0, 3), None if e is None else round(e, 3)] for s, e in self.downtime
            ],
            "downtime_total": round(self.downtime_total(now), 3),
            "evictions": len(self.evictions),
            "eviction_log": list(self.evictions),
            # Of those, logged by a boot that ended before any dmesg printed them, and logged
            # by a running boot but not printed yet: what no orchestrator could have counted.
            "evictions_lost_from_logs": self.evictions_lost_from_logs,
            "evictions_unread": sum(n.unread_evictions() for n in self.nodes),
            "clients": len(self.clients),
            "clients_blocked": sum(1 for c in self.clients if c.blocked_since is not None),
            # Servers up with their targets mounted while their firewall cuts clients off:
            # where the ping evictor, lock callbacks and recovery timers run against them.
            "blocked_while_up_s": round(self.blocked_while_up(now), 3),
            "blocked_while_up_intervals": [
                [round(s or 0.0, 3), None if e is None else round(e, 3)] for s, e in self.blocked_up
            ],
            "lock_callbacks_to_blocked": len(self.lock_callbacks),
            "lock_callback_log": list(self.lock_callbacks[-50:]),
            "in_cluster_actors": self.in_cluster_actors(),
            "hsm_active_requests": len(self.hsm_active),
            "timeout": self.timeout(),
            "persistent_params": dict(self.persistent),
            "nodes": {
                n.name: {
                    "up": n.up,
                    "crashed": n.crashed,
                    "lustre_version": n.lustre_version,
                    "services": dict(n.services),
                    "nids": list(n.nids),
                    "firewall_rules": len(n.iptables),
                    # Client-initiated traffic dropped, the server's own connections not.
                    "firewall_one_way": any(n.firewall_one_way(c.address) for c in self.clients),
                }
                for n in self.nodes
            },
            "targets": [
                {
                    "node": n.name,
                    "target": t.name,
                    "mounted": t.mounted,
                    "recovery": t.recovery.status,
                    "evicted": t.recovery.evicted,
                    "recovery_time_soft": t.soft,
                    "recovery_time_hard": t.hard,
                }
                for n, t in self.server_targets
            ],
        }


def cluster_files(
    cluster: Cluster, node: Node, address: str, targets: list[Target], hostid: str, mds_address: str
) -> dict[str, str]:
    """The config a healthy node of ``cluster`` has on its OS disk."""
    files = {
        "/etc/os-release": "",
        LNET_CONF: (
            "net:\n    - net type: tcp\n      local NI(s):\n"
            f"        - nid: {address}@tcp\n          interfaces:\n              0: eth0\n"
        ),
        LUSTRE_CONF: "options lnet networks=tcp0(eth0)\noptions ptlrpc at_max=600\n",
        HOSTID_FILE: hostid_file(hostid),
    }
    if targets:
        files[LDEV_CONF] = "".join(
            f"{node.name} - {t.name} zfs:{t.pool}/{t.dataset}\n" for t in targets
        )
    if node.role in (Role.AGTPRI, Role.AGTSTD):
        files[HSM_AGENT_CONF] = (
            f'mount_point = "/lustre/{FSNAME}"\nlustre_mgs = "{mds_address}@tcp"\narchive_id = 1\n'
        )
    if node.role is Role.AGTPRI:
        files[HYDRATOR_CONF] = f"fsname={FSNAME}\nmgs={mds_address}@tcp\n"
    return files


def derive_hostid(material: str) -> str:
    return hashlib.sha256(material.encode()).hexdigest()[:8]


# File contents are kept as str holding one code point per byte (latin-1), so that a binary
# file (``/etc/hostid``) goes through ``tee`` and ``cat`` byte for byte, as on a real node.
def file_text(data: bytes) -> str:
    return data.decode("latin-1")


def file_bytes(text: str) -> bytes:
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:  # text put there by the emulator itself, not by a write
        return text.encode()


def hostid_file(hostid: str) -> str:
    """``/etc/hostid`` for ``hostid`` (8 hex digits): 4 binary bytes, little-endian."""
    return file_text(struct.pack("<I", int(hostid, 16)))
