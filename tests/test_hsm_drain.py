"""HSM drains take as long as the copies (issue 18 item 9), on a fleet of its own whose
first cluster copies large files (2,000-3,000 s each) and whose second medium ones
(600-700 s); judged from the emulator's ground truth and the nodes' own answers.

``hsm_control=disabled`` only stops new actions: an active request ends when its copytool
has copied the file (lustre/mdt/mdt_coordinator.c, v2_15_5). The product reads the active
requests, measures each copy's rate, and waits only when the copies fit what the window
leaves; otherwise it gives up at once, before any downtime, and the way back restores
``timeout`` and HSM from the journal.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from amlfs.errors import NodeOutputError
from amlfs.lustre.parsers import parse_hsm_requests
from amlfs.lustre.procedures import SuspendPolicy
from amlfs.models import Cluster, read_yaml
from amlfs.runtime import Connections, from_endpoint
from amlfs.saga import ClusterUpgrade, Outcome, UpgradePolicy, UpgradeResult
from amlfs.ssh import NodeShell, SshPool, load_private_key
from amlfs.ssh.gateway import SshConfig
from amlfs.store import StateStore
from amlfs_sim import Emulator, EndpointInfo
from amlfs_sim.spec import SimWorld, build_world
from tests.conftest import SMALL_FLEET, TIME_SCALE, trust
from tests.test_cluster_upgrade import RELEASE

LONG, MEDIUM = "lustre-eus-01", "lustre-weu-01"
ACTIVE = ["lctl", "get_param", "-n", "mdt.*.hsm.active_requests"]


def hsm_world() -> SimWorld:
    data: dict[str, Any] = read_yaml(SMALL_FLEET, kind="fleet file", max_bytes=1 << 20)
    data["emulator"]["clusters"] = {
        LONG: {"hsm": {"requests": 2, "copy_s": [2000, 3000], "bytes_per_s": 100e6}},
        MEDIUM: {"hsm": {"requests": 2, "copy_s": [600, 700], "bytes_per_s": 100e6}},
    }
    return build_world(data, "hsm fleet")


@pytest.fixture(scope="module")
def hsm_sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Emulator, EndpointInfo]]:
    emulator = Emulator(
        hsm_world(), tmp_path_factory.mktemp("hsm-sim"), time_scale=TIME_SCALE, seed=17
    )
    endpoint = emulator.start()
    yield emulator, endpoint
    emulator.stop()


class World:
    def __init__(self, emulator: Emulator, endpoint: EndpointInfo) -> None:
        self.emulator, self.endpoint = emulator, endpoint
        self.control = httpx.Client(base_url=endpoint.control_url, verify=trust(endpoint))
        azure, ssh = from_endpoint(emulator.state_dir / "endpoint.json")
        self.conns = Connections.create(azure, ssh)
        keys = endpoint.ssh
        self.pool = SshPool(
            SshConfig(
                username=keys["username"],
                key=load_private_key(Path(keys["key_file"]).read_text()),
                known_hosts=Path(keys["known_hosts"]),
                port=keys["port"],
            )
        )

    def cluster(self, name: str) -> Cluster:
        return next(c for c in self.emulator.world.fleet.clusters if c.name == name)

    def shell(self, cluster: str, role: str) -> NodeShell:
        node = next(n for n in self.cluster(cluster).nodes if n.role.value == role)
        return self.pool.shell(node.name, str(node.address))

    def customer(self, cluster: str) -> dict[str, Any]:
        state = self.control.get("/state", params={"cluster": cluster}).json()
        return state["clusters"][cluster]  # type: ignore[no-any-return]

    def sleep_until(self, sim_s: float) -> None:
        self.conns.clock.sleep(max(0.0, sim_s - self.conns.clock.now()))

    def close(self) -> None:
        self.pool.close()
        self.conns.close()
        self.control.close()


@pytest.fixture
def world(hsm_sim: tuple[Emulator, EndpointInfo]) -> Iterator[World]:
    emulator, endpoint = hsm_sim
    with httpx.Client(base_url=endpoint.control_url, verify=trust(endpoint)) as control:
        control.post("/reset").raise_for_status()
    world = World(emulator, endpoint)
    yield world
    world.close()


def copies(world: World, cluster: str) -> dict[str, tuple[int, int]]:
    """Active requests as the MDS lists them: FID -> (bytes done, file size via the client)."""
    requests = parse_hsm_requests(world.shell(cluster, "mds").run(ACTIVE).stdout)
    client = world.shell(cluster, "lclient")
    return {
        r.fid: (
            r.done,
            int(client.run(["stat", "-c", "%s", f"/lustre/amlfs/.lustre/fid/{r.fid}"]).stdout),
        )
        for r in requests
    }


def test_a_disabled_coordinator_drains_as_fast_as_the_copies_run(world: World) -> None:
    mds = world.shell(MEDIUM, "mds")
    before = copies(world, MEDIUM)
    assert len(before) == 2
    mds.run(["lctl", "set_param", "mdt.*.hsm_control=disabled"])
    at = world.conns.clock.now()
    left = {fid: (size - done) / 100e6 for fid, (done, size) in copies(world, MEDIUM).items()}
    first, last = sorted(left.values())
    assert 400 < first <= last < 700  # what is left of 600-700 s copies begun at reset
    # A copytool stopped mid-copy does not progress; its request stays active.
    agents = [world.shell(MEDIUM, role) for role in ("agtpri", "agtstd")]
    for agent in agents:
        agent.run(["systemctl", "stop", "lhsmd"])
    world.sleep_until(at + 60)
    paused = {fid: (size - done) / 100e6 for fid, (done, size) in copies(world, MEDIUM).items()}
    # Within the few sim s the two commands took (at time scale 200 a loaded machine made
    # that 19 once): far from the 60 s a copy that went on would have moved.
    assert paused == pytest.approx(left, abs=30)
    for agent in agents:
        agent.run(["systemctl", "start", "lhsmd"])
    # Each request leaves when its own copy is done (60 s later for the pause); none starts.
    assert last - first > 20  # (seeded: ~28 s apart)
    world.sleep_until(at + 60 + first + 5)
    assert len(copies(world, MEDIUM)) == 1
    world.sleep_until(at + 60 + last + 5)
    assert mds.run(ACTIVE).stdout == ""
    # Enabled again: the coordinator hands out new copies (new FIDs).
    mds.run(["lctl", "set_param", "mdt.*.hsm_control=enabled"])
    again = copies(world, MEDIUM)
    assert len(again) == 2
    assert not set(again) & set(before)


def upgrade(
    world: World,
    cluster: str,
    store: Path,
    policy: UpgradePolicy,
    window_s: float | None = None,
) -> UpgradeResult:
    spec = world.cluster(cluster)
    clock = world.conns.clock
    start, anchor = clock.now(), dt.datetime(2026, 12, 1, 2, 0, tzinfo=dt.UTC)

    def now_utc() -> dt.datetime:  # the window on the sim clock
        return anchor + dt.timedelta(seconds=clock.now() - start)

    return ClusterUpgrade(
        spec,
        RELEASE,
        gateway=world.conns.gateway(spec.subscription_id),
        shells=world.conns.shells(),
        store=StateStore(store),
        clock=clock,
        policy=policy,
        window_end=None if window_s is None else anchor + dt.timedelta(seconds=window_s),
        now_utc=now_utc,
    ).run()


def assert_left_as_it_was(world: World, cluster: str) -> dict[str, Any]:
    """Nothing swapped, nobody lost service, and each node says it is back to normal."""
    customer = world.customer(cluster)
    assert customer["downtime_total"] == 0, customer["downtime_intervals"]
    assert customer["evictions"] == 0, customer["eviction_log"]
    assert customer["lustre_versions"] == ["2.15.5"]
    assert customer["blocked_while_up_s"] == 0
    mds = world.shell(cluster, "mds")
    params = mds.run(
        ["lctl", "get_param", "-n", "timeout", "mdt.*.hsm_control", "mdt.*.recovery_time_soft"]
    ).stdout.split()
    assert params == ["100", "enabled", "150"]
    for role in ("mds", "oss"):
        assert "DROP" not in world.shell(cluster, role).run(["iptables", "-S"]).stdout
    assert world.shell(cluster, "agtpri").run(
        ["systemctl", "is-active", "hydrator", "lhsmd"]
    ).stdout == ("active\nactive\n")
    return customer


def test_copies_longer_than_the_drain_allows_are_given_up_at_once_and_undone(
    world: World, tmp_path: Path
) -> None:
    before = copies(world, LONG)
    result = upgrade(world, LONG, tmp_path, UpgradePolicy())  # drain allowance: 300 s
    assert result.outcome is Outcome.ROLLED_BACK, result.reason
    assert_left_as_it_was(world, LONG)
    # Decided from the copies' rates within seconds, not by waiting the allowance out.
    suspend = next(t for t in result.steps if t.name == "suspend")
    assert suspend.ended_s - suspend.started_s < 200, result.reason  # (sim s; 300 if waited)
    assert "HSM requests still active" in result.reason
    assert "needs ~" in result.reason
    # The copies in flight were not disturbed: the same requests, further along.
    after = copies(world, LONG)
    assert set(after) == set(before)
    assert all(after[fid][0] > before[fid][0] for fid in before)


def test_the_window_decides_whether_to_wait_for_the_copies(world: World, tmp_path: Path) -> None:
    # The policy would wait an hour, but the window leaves 1,200 s less the time to suspend
    # (e) and the downtime and rollback reserved (750 s) for the drain: 450 - e s, where
    # 600 - e s of copies are left.
    policy = UpgradePolicy(suspend=SuspendPolicy(hsm_drain_timeout_s=3600))
    result = upgrade(world, MEDIUM, tmp_path / "short", policy, window_s=1200)
    assert result.outcome is Outcome.ROLLED_BACK, result.reason
    assert_left_as_it_was(world, MEDIUM)  # given up before any downtime
    assert "the window leaves" in result.reason, result.reason
    # A window with room for them: the drain waits the copies out, then the upgrade goes on.
    result = upgrade(world, MEDIUM, tmp_path / "long", policy, window_s=3000)
    assert result.outcome is Outcome.UPGRADED, result.reason
    suspend = next(t for t in result.steps if t.name == "suspend")
    assert suspend.ended_s - suspend.started_s > 100
    customer = world.customer(MEDIUM)
    assert customer["evictions"] == 0
    assert customer["lustre_versions"] == ["2.15.6"]


def test_active_requests_are_read_as_lustre_prints_them() -> None:
    real = Path(__file__).parent / "data" / "lustre-2.15" / "hsm_active_requests_busy.txt"
    requests = parse_hsm_requests(real.read_text())
    assert [(r.fid, r.action, r.done, r.canceled) for r in requests] == [
        ("[0x200000401:0x1:0x0]", "ARCHIVE", 0, False),
        ("[0x200000401:0x2:0x0]", "RESTORE", 1048576, False),
    ]
    assert requests[1].agent == "1a2b3c4d-5e6f-7081-92a3-b4c5d6e7f809"
    assert parse_hsm_requests("") == []
    actions = (real.parent / "hsm_actions.txt").read_text()  # the llog, another format
    with pytest.raises(NodeOutputError, match=r"hsm\.active_requests"):
        parse_hsm_requests(actions)
