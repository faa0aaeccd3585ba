"""Transient SSH failures are retried, final ones are not (issue 17), against the emulator's
real SSH server: sessions dropped after the command ran, refused connections, a wrong key,
a changed host key. The world is the judge: the node's iptables, pools, files and tunables,
and the emulator's SSH counters."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paramiko
import pytest

from amlfs.clock import ScaledClock
from amlfs.errors import NodeAccessDeniedError, NodeUnreachableError
from amlfs.lustre.procedures import LustreOps, NodeRef
from amlfs.ssh import SshPool
from tests.conftest import TIME_SCALE, Sim
from tests.test_nodes import swap_to_release

OSS = "eus01-oss0"
OSS_ADDRESS = "127.1.0.2"
MDS = "eus01-mds0"
MDS_ADDRESS = "127.1.0.1"
DROP = "-A INPUT -s 10.8.0.0/16 -p tcp -m tcp --dport 988 -j DROP"


class BackoffClock(ScaledClock):
    """The project's clock, whose sim time moves only when someone sleeps on it: every
    backoff is recorded, and a budget in sim seconds does not depend on how fast the machine
    runs the attempts. Sleeps still wait (scaled), as the orchestrator's do."""

    def __init__(self) -> None:
        super().__init__(TIME_SCALE)
        self.sleeps: list[float] = []

    def now(self) -> float:
        return sum(self.sleeps)

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        super().sleep(seconds)


@pytest.fixture
def clock() -> BackoffClock:
    return BackoffClock()


@pytest.fixture
def pools() -> Iterator[list[SshPool]]:
    """Pools a test opened, closed after it."""
    opened: list[SshPool] = []
    yield opened
    for pool in opened:
        pool.close()


def new_pool(sim: Sim, clock: BackoffClock, pools: list[SshPool], **config: Any) -> SshPool:
    pool = SshPool(sim.ssh_config(**config), clock)
    pools.append(pool)
    return pool


def ssh_stats(sim: Sim) -> dict[str, Any]:
    return sim.state()["ssh"]  # type: ignore[no-any-return]


def ops_for(sim: Sim, pool: SshPool, clock: BackoffClock) -> LustreOps:
    nodes = [NodeRef(n.name, n.role, str(n.address)) for n in sim.cluster.nodes]
    return LustreOps(pool, nodes, clock)


def node_ref(sim: Sim, name: str) -> NodeRef:
    node = next(n for n in sim.cluster.nodes if n.name == name)
    return NodeRef(node.name, node.role, str(node.address))


def drop_rules(sim: Sim, pool: SshPool) -> list[str]:
    rules = pool.shell(OSS, OSS_ADDRESS).run(["iptables", "-S", "INPUT"]).stdout.splitlines()
    return [rule for rule in rules if rule.endswith("-j DROP")]


def test_firewall_on_under_a_session_dropped_after_the_insert_leaves_one_rule(
    sim: Sim, clock: BackoffClock, pools: list[SshPool]
) -> None:
    pool = new_pool(sim, clock, pools)
    sim.fault(kind="node.ssh", target=OSS, phase="complete", command="iptables -I *", count=1)
    dropped = ssh_stats(sim)["dropped"]

    ops_for(sim, pool, clock).firewall_on(node_ref(sim, OSS))

    assert ssh_stats(sim)["dropped"] == dropped + 1, "the insert's session was not dropped"
    assert drop_rules(sim, pool) == [DROP]  # inserted once: the re-check saw it, no second -I


def test_firewall_off_under_a_session_dropped_after_the_delete_leaves_no_rule(
    sim: Sim, clock: BackoffClock, pools: list[SshPool]
) -> None:
    pool = new_pool(sim, clock, pools)
    ops = ops_for(sim, pool, clock)
    ops.firewall_on(node_ref(sim, OSS))
    assert drop_rules(sim, pool) == [DROP]
    sim.fault(kind="node.ssh", target=OSS, phase="complete", command="iptables -D *", count=1)
    dropped = ssh_stats(sim)["dropped"]

    ops.firewall_off(node_ref(sim, OSS))

    assert ssh_stats(sim)["dropped"] == dropped + 1, "the delete's session was not dropped"
    assert drop_rules(sim, pool) == []


def test_a_non_idempotent_command_is_not_sent_again_after_a_drop(
    sim: Sim, clock: BackoffClock, pools: list[SshPool]
) -> None:
    pool = new_pool(sim, clock, pools)
    sim.fault(kind="node.ssh", target=OSS, phase="complete", command="iptables -I *", count=1)
    insert = ["iptables", "-I", "INPUT", "1", *DROP.split()[2:]]
    with pytest.raises(NodeUnreachableError, match="no exit status"):
        pool.shell(OSS, OSS_ADDRESS).run(insert, idempotent=False)
    assert drop_rules(sim, pool) == [DROP]  # the command ran (once) though no status came


def test_restore_local_under_a_session_dropped_after_zpool_import_imports_once(
    sim: Sim, clock: BackoffClock, pools: list[SshPool]
) -> None:
    pool = new_pool(sim, clock, pools)
    ops = ops_for(sim, pool, clock)
    oss = node_ref(sim, OSS)
    files = ops.capture_config(oss)
    swap_to_release(sim, OSS, "2.15.6")  # boots without the cluster's files or pools
    sim.fault(kind="node.ssh", target=OSS, phase="complete", command="zpool import *", count=1)
    dropped = ssh_stats(sim)["dropped"]

    ops.restore_local(oss, files)

    assert ssh_stats(sim)["dropped"] == dropped + 1
    listed = pool.shell(OSS, OSS_ADDRESS).run(["zpool", "list", "-H", "-o", "name"]).stdout
    assert listed.split() == ["eus01-oss0-ostpool"]


def test_idempotent_commands_ride_out_one_drop(
    sim: Sim, clock: BackoffClock, pools: list[SshPool]
) -> None:
    mds = new_pool(sim, clock, pools).shell(MDS, MDS_ADDRESS)
    dropped = ssh_stats(sim)["dropped"]
    for argv, stdin in (
        (["tee", "/etc/amlfs/probe.conf"], b"written once\n"),
        (["lctl", "set_param", "timeout=150"], None),
    ):
        sim.fault(kind="node.ssh", target=MDS, phase="complete", count=1)
        assert mds.run(argv, stdin=stdin).status == 0
    sim.fault(kind="node.ssh", target=MDS, phase="complete", count=1)
    content, timeout = mds.run_batch(
        [["cat", "/etc/amlfs/probe.conf"], ["lctl", "get_param", "-n", "timeout"]]
    )

    assert ssh_stats(sim)["dropped"] == dropped + 3
    assert content.stdout == "written once\n"
    assert timeout.stdout == "150\n"
    assert len(clock.sleeps) == 3  # one backoff per drop


def test_refused_connections_are_retried_with_backoff_on_the_clock(
    sim: Sim, clock: BackoffClock, pools: list[SshPool]
) -> None:
    shell = new_pool(sim, clock, pools).shell(OSS, OSS_ADDRESS)
    sim.fault(kind="node.ssh", target=OSS, count=3)
    accepted = ssh_stats(sim)["accepted"]

    assert shell.run(["hostid"]).status == 0

    assert ssh_stats(sim)["accepted"] == accepted + 1  # three refused, the fourth let in
    assert clock.sleeps == [0.5, 1.0, 2.0]  # exponential, on the injected clock


def test_more_refusals_than_attempts_is_unreachable_naming_the_node(
    sim: Sim, clock: BackoffClock, pools: list[SshPool]
) -> None:
    shell = new_pool(sim, clock, pools, attempts=3).shell(OSS, OSS_ADDRESS)
    sim.fault(kind="node.ssh", target=OSS, count=10)
    with pytest.raises(NodeUnreachableError, match=f"^{OSS}: .*gave up after 3 attempts") as err:
        shell.run(["hostid"])
    assert err.value.node == OSS
    assert clock.sleeps == [0.5, 1.0]


def test_retries_stop_at_the_budget_in_sim_seconds(
    sim: Sim, clock: BackoffClock, pools: list[SshPool]
) -> None:
    shell = new_pool(sim, clock, pools, attempts=10, retry_budget_s=1.2).shell(OSS, OSS_ADDRESS)
    sim.fault(kind="node.ssh", target=OSS, count=10)
    with pytest.raises(NodeUnreachableError, match="gave up after 2 attempts"):
        shell.run(["hostid"])
    assert clock.sleeps == [0.5]  # a second backoff (1 s) would end past the 1.2 s budget


def test_a_wrong_key_is_denied_at_once(sim: Sim, clock: BackoffClock, pools: list[SshPool]) -> None:
    pool = new_pool(sim, clock, pools, key=paramiko.ECDSAKey.generate())
    accepted = ssh_stats(sim)["accepted"]
    with pytest.raises(NodeAccessDeniedError, match="authentication as 'amlfs' failed"):
        pool.shell(MDS, MDS_ADDRESS).run(["hostid"])
    assert ssh_stats(sim)["accepted"] == accepted + 1  # one connection: no retry
    assert clock.sleeps == []


def test_a_changed_host_key_is_denied_at_once(
    sim: Sim, clock: BackoffClock, pools: list[SshPool], tmp_path: Path
) -> None:
    ssh = sim.endpoint.ssh
    lines = Path(ssh["known_hosts"]).read_text().splitlines()
    oss_key = next(ln for ln in lines if ln.startswith(f"[{OSS_ADDRESS}]")).split(" ", 1)[1]
    forged = [
        f"[{MDS_ADDRESS}]:{ssh['port']} {oss_key}" if ln.startswith(f"[{MDS_ADDRESS}]") else ln
        for ln in lines
    ]
    (tmp_path / "known_hosts").write_text("\n".join(forged) + "\n")
    pool = new_pool(sim, clock, pools, known_hosts=tmp_path / "known_hosts")
    accepted = ssh_stats(sim)["accepted"]
    with pytest.raises(NodeAccessDeniedError, match="does not match known_hosts"):
        pool.shell(MDS, MDS_ADDRESS).run(["hostid"])
    assert ssh_stats(sim)["accepted"] == accepted + 1
    assert clock.sleeps == []
    assert not isinstance(NodeAccessDeniedError("x", node=MDS), NodeUnreachableError)
