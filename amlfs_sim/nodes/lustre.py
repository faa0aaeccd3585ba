"""Lustre nodes and the customers of each cluster, driven by the ARM emulator's events.

* An OS disk holds files (``DiskContent``): the cluster's config lives there, so booting a VM
  from a fresh release disk comes up without it, and swapping the old disk back brings it back.
* A node (``LustreNode``) is up while its VM runs; booting starts services from the files on
  its disk: LNet needs /etc/lnet.conf for NIDs, a pool imports only when /etc/hostid matches
  the host that last had it, targets mount per /etc/ldev.conf.
* A cluster (``ClusterSim``) has K clients. A client is *blocked* while any MDT/OST is down,
  unmounted, without NIDs, or drops client traffic on TCP 988; a client blocked longer than
  1.5 x the cluster's ``timeout`` is evicted. A target that starts waits for its clients
  (WAITING_FOR_CLIENTS), replays (RECOVERING), then is COMPLETE; if clients cannot reach it
  before ``recovery_time_hard`` it completes and evicts them. The file system *serves* when
  every target is reachable and COMPLETE; the intervals when it does not are the customer's
  downtime. Transitions are applied at their exact sim time, however late ``advance`` runs.
"""

from __future__ import annotations

import fnmatch
import hashlib
import ipaddress
import shlex
import struct
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
    "LustreNode",
    "Target",
]

FSNAME = "amlfs"
LNET_PORT = 988
# Customers' clients of cluster i are 10.8.i.k: addresses only, used to evaluate iptables -s.
CLIENT_NETWORK = "10.8.0.0/16"
REPLAY_SECONDS = 8.0  # a target's replay once every client reconnected
HSM_DRAIN_SECONDS = 15.0  # active HSM requests finish this long after the coordinator stops
HSM_BUSY_REQUESTS = 2  # archive requests in flight while the coordinator is enabled

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

# Defaults of the tunables the emulator models, by parameter pattern (Lustre 2.15 values).
DEFAULT_TUNABLES: dict[str, str] = {
    "timeout": "100",
    "at_max": "600",
    "*.*.recovery_time_soft": "300",
    "*.*.recovery_time_hard": "900",
    "mdt.*.hsm_control": "enabled",
}

Emit = Callable[..., Any]


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
    start: float = 0.0
    end: float | None = None
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

    @property
    def param_prefix(self) -> str:
        return {"mdt": "mdt", "ost": "obdfilter", "mgs": "mgs"}[self.kind]

    @property
    def mountpoint(self) -> str:
        return f"/lustre/{FSNAME}/{self.dataset}"


@dataclass
class Client:
    address: str
    blocked_since: float | None = None
    evicted_in_episode: bool = False
    evictions: int = 0


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
        """Current value of parameter ``name``: its default, then every matching set_param."""
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


class ClusterSim:
    """The customer's view of one cluster: clients, recovery, downtime and evictions."""

    def __init__(self, cluster: Cluster, index: int, clients: int, emit: Emit) -> None:
        self.name = cluster.name
        self.spec = cluster
        self.index = index
        self.client_count = clients
        self._emit = emit
        self.nodes: list[LustreNode] = []
        self.reset()

    def reset(self) -> None:
        """Forget history: the state of a cluster about to be booted as loaded."""
        self.quiet = True  # no events while the fleet as loaded boots
        self.clients = [
            Client(f"10.8.{self.index % 256}.{k + 1}") for k in range(self.client_count)
        ]
        # lctl set_param -P: kept by the MGS on the MDT, so it survives an OS disk swap.
        self.persistent: dict[str, str] = {}
        self.pool_hostids: dict[str, str] = {}
        self.last_timeout = float(DEFAULT_TUNABLES["timeout"])
        self.serving = False
        self.downtime: list[list[float | None]] = []
        self.evictions: list[dict[str, Any]] = []
        self.lustre_files: dict[str, str] = {}  # the file system's content, seen by lclients
        self.hsm_disabled_at: float | None = None
        self.stuck_nodes: set[str] = set()  # recovery_stuck fault, consumed per target start
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

    def downtime_total(self, now: float) -> float:
        total = 0.0
        for start, end in self.downtime:
            assert start is not None
            total += (now if end is None else end) - start
        return total

    def hsm_active_requests(self, now: float) -> int:
        mds = self.mds
        control = mds.param(f"mdt.{FSNAME}-MDT0000.hsm_control") if mds.up else None
        if control == "enabled":
            return HSM_BUSY_REQUESTS
        if self.hsm_disabled_at is not None and now < self.hsm_disabled_at + HSM_DRAIN_SECONDS:
            return HSM_BUSY_REQUESTS
        return 0

    def hsm_control_changed(self, value: str, at: float) -> None:
        if value == "enabled":
            self.hsm_disabled_at = None
        elif self.hsm_disabled_at is None:
            self.hsm_disabled_at = at

    # ------------------------------------------------------------------ time

    def target_started(self, node: LustreNode, target: Target, at: float) -> None:
        stuck = node.name in self.stuck_nodes
        target.recovery = Recovery(status="WAITING_FOR_CLIENTS", start=at, stuck=stuck)
        self.emit(
            at,
            "lustre.recovery_started",
            cluster=self.name,
            node=node.name,
            target=target.name,
            stuck=stuck,
        )
        self._try_reconnect(at)

    def next_deadline(self) -> tuple[float, str, Any] | None:
        best: tuple[float, str, Any] | None = None
        for node, target in self.server_targets:
            rec = target.recovery
            if rec.stuck:
                continue
            if rec.status == "RECOVERING" and rec.replay_end is not None:
                cand: tuple[float, str, Any] = (rec.replay_end, "replayed", target)
            elif rec.status == "WAITING_FOR_CLIENTS":
                hard = node.param(f"{target.param_prefix}.{target.name}.recovery_time_hard")
                cand = (rec.start + float(hard or 900), "hard", target)
            else:
                continue
            if best is None or cand[0] < best[0]:
                best = cand
        limit = 1.5 * self.timeout()
        for client in self.clients:
            if client.blocked_since is not None and not client.evicted_in_episode:
                cand = (client.blocked_since + limit, "evict", client)
                if best is None or cand[0] < best[0]:
                    best = cand
        return best

    def advance(self, now: float) -> None:
        """Apply every timed transition due by ``now``, each at its own time."""
        while True:
            due = self.next_deadline()
            if due is None or due[0] > now:
                break
            at, what, subject = due
            at = max(at, self.now)
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
            elif what == "hard":
                rec = subject.recovery
                rec.status, rec.end = "COMPLETE", at
                for client in self.clients:
                    if not all(
                        self.reachable(n, t, client.address)
                        for n, t in self.server_targets
                        if t is subject
                    ):
                        rec.evicted += 1
                        if not client.evicted_in_episode:
                            self._evict(client, at, f"{subject.name} recovery_time_hard expired")
                self.emit(
                    at,
                    "lustre.recovery_complete",
                    cluster=self.name,
                    target=subject.name,
                    evicted=rec.evicted,
                )
            else:
                self._evict(
                    subject, at, f"blocked longer than 1.5 x timeout ({self.timeout():g} s)"
                )
            self.now = at
            self._refresh(at)
        self.now = max(self.now, now)

    def _evict(self, client: Client, at: float, reason: str) -> None:
        client.evicted_in_episode = True
        client.evictions += 1
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
        self._try_reconnect(at)
        self._refresh(at)

    def _try_reconnect(self, at: float) -> None:
        for node, target in self.server_targets:
            rec = target.recovery
            if rec.status != "WAITING_FOR_CLIENTS":
                continue
            if not self.clients or all(
                self.reachable(node, target, c.address) for c in self.clients
            ):
                rec.status = "RECOVERING"
                rec.replay_end = None if rec.stuck else at + REPLAY_SECONDS

    def _refresh(self, at: float) -> None:
        for client in self.clients:
            blocked = self.blocked(client)
            if blocked and client.blocked_since is None:
                client.blocked_since = at
            elif not blocked and client.blocked_since is not None:
                client.blocked_since = None
                client.evicted_in_episode = False
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

    def settle(self, at: float) -> None:
        """The fleet as loaded has served for a long time: no downtime is on record."""
        self._refresh(at)
        self.downtime = []
        self.evictions = []
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
            "clients": len(self.clients),
            "clients_blocked": sum(1 for c in self.clients if c.blocked_since is not None),
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
