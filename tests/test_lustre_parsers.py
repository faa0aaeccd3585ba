"""Parsers on captured Lustre 2.15 output (tests/data/lustre-2.15, see SOURCES.md), on the
emulator's output for the same commands, and on malformed input."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from amlfs.errors import NodeOutputError
from amlfs.lustre.parsers import (
    Device,
    HsmAgent,
    RecoveryStatus,
    all_up,
    parse_devices,
    parse_health_check,
    parse_hsm_active_requests,
    parse_hsm_agents,
    parse_iptables_rules,
    parse_lustre_mounts,
    parse_net_show,
    parse_params,
    parse_recovery_status,
    parse_version,
)
from amlfs_sim.nodes import formats

DATA = Path(__file__).parent / "data" / "lustre-2.15"


def fixture(name: str) -> str:
    return (DATA / name).read_text()


def test_every_fixture_is_named_in_sources() -> None:
    sources = fixture("SOURCES.md")
    names = sorted(path.name for path in DATA.glob("*.txt"))
    assert len(names) >= 28
    for name in names:
        assert f"`{name}`" in sources, name


def test_lctl_dl_on_the_mds() -> None:
    mds = parse_devices(fixture("lctl_dl_mds.txt"))
    assert len(mds) == 12
    assert mds[0] == Device(0, "UP", "osd-zfs", "MGS-osd", "MGS-osd_UUID", 4)
    assert mds[6] == Device(6, "UP", "mdt", "amlfs-MDT0000", "amlfs-MDT0000_UUID", 14)
    assert mds[11].index == 11
    assert mds[11].name == "amlfs-OST0001-osc-MDT0000"
    assert [d.type for d in mds].count("osp") == 2
    assert all_up(mds)


def test_lctl_dl_on_an_oss_and_a_stopping_target() -> None:
    oss = parse_devices(fixture("lctl_dl_oss.txt"))
    assert [d.type for d in oss] == ["osd-zfs", "mgc", "ost", "obdfilter", "lwp"]
    assert oss[1].name == "MGC10.0.0.4@tcp"
    assert all_up(oss)
    stopping = parse_devices(fixture("lctl_dl_stopping.txt"))
    assert [d.status for d in stopping] == ["UP", "UP", "UP", "ST", "UP"]
    assert stopping[3].name == "amlfs-OST0001"
    assert not all_up(stopping)
    assert parse_devices("") == []


def test_recovery_status_complete() -> None:
    assert parse_recovery_status(fixture("recovery_status_complete.txt")) == RecoveryStatus(
        status="COMPLETE",
        recovery_start=1764036000,
        recovery_duration=41,
        completed=4,
        total=4,
        evicted=0,
    )


def test_recovery_status_complete_counts_evicted_clients_from_the_fraction() -> None:
    # COMPLETE has no evicted_clients line: completed_clients is (total - evicted)/total.
    status = parse_recovery_status("status: COMPLETE\ncompleted_clients: 3/4\n")
    assert (status.completed, status.total, status.evicted) == (3, 4, 1)


def test_recovery_status_recovering() -> None:
    assert parse_recovery_status(fixture("recovery_status_recovering.txt")) == RecoveryStatus(
        status="RECOVERING",
        recovery_start=1764036000,
        time_remaining=268,
        connected=3,
        completed=2,
        total=4,
        evicted=0,
    )


@pytest.mark.parametrize(
    ("name", "status"),
    [
        ("recovery_status_waiting.txt", "WAITING_FOR_CLIENTS"),
        ("recovery_status_inactive.txt", "INACTIVE"),
        ("recovery_status_waiting_mdts.txt", "WAITING"),
    ],
)
def test_recovery_status_without_counters(name: str, status: str) -> None:
    parsed = parse_recovery_status(fixture(name))
    assert parsed.status == status
    assert (parsed.connected, parsed.completed, parsed.total, parsed.evicted) == (
        None,
        None,
        None,
        0,
    )
    assert parsed.recovery_start == (1764036000 if status == "WAITING" else None)


def test_get_param_with_multi_line_values() -> None:
    params = parse_params(fixture("get_param_recovery_status_multi.txt"))
    assert list(params) == [
        "obdfilter.amlfs-OST0000.recovery_status",
        "obdfilter.amlfs-OST0001.recovery_status",
    ]
    first = params["obdfilter.amlfs-OST0000.recovery_status"]
    assert first.splitlines()[0] == "status: COMPLETE"
    assert first.endswith("IR: ENABLED")
    assert parse_recovery_status(first).recovery_duration == 38
    second = parse_recovery_status(params["obdfilter.amlfs-OST0001.recovery_status"])
    assert (second.status, second.connected, second.total, second.evicted) == (
        "RECOVERING",
        2,
        4,
        1,
    )
    assert second.time_remaining == 289


def test_get_param_single_line_values() -> None:
    assert parse_params(fixture("get_param_timeouts.txt")) == {"timeout": "100", "at_max": "600"}
    assert parse_params(fixture("version.txt")) == {"version": "2.15.5"}
    assert parse_params("") == {}
    assert parse_params("ldlm.namespaces.MGC10.0.0.4@tcp.lru_size=3200\n") == {
        "ldlm.namespaces.MGC10.0.0.4@tcp.lru_size": "3200"
    }


def test_get_param_value_lines_that_look_like_parameters() -> None:
    # hsm.agents lines are uuid=...: inside a multi-line value only a dotted name=
    # starts the next parameter.
    params = parse_params(fixture("get_param_hsm_agents.txt"))
    assert list(params) == ["mdt.amlfs-MDT0000.hsm.agents", "mdt.amlfs-MDT0000.hsm_control"]
    assert params["mdt.amlfs-MDT0000.hsm_control"] == "enabled"
    agents = parse_hsm_agents(params["mdt.amlfs-MDT0000.hsm.agents"])
    assert [a.archive_ids for a in agents] == [[1], [1, 2]]


def test_health_check() -> None:
    assert parse_health_check(fixture("health_check_healthy.txt")) is True
    assert parse_health_check(fixture("health_check_unhealthy.txt")) is False
    assert parse_health_check(fixture("health_check_lbug.txt")) is False
    assert fixture("health_check_unhealthy.txt").splitlines()[0] == "NOT HEALTHY"
    assert parse_health_check("") is False
    assert parse_health_check("healthy\nNOT HEALTHY\n") is False


def test_version() -> None:
    assert parse_version(fixture("version.txt")) == "2.15.5"
    assert parse_version("2.15.5\n") == "2.15.5"
    assert parse_version("2.15.4_12_g1a2b3c4\n") == "2.15.4_12_g1a2b3c4"


def test_net_show() -> None:
    assert parse_net_show(fixture("lnetctl_net_show.txt")) == ["10.0.0.4@tcp"]
    assert parse_net_show(fixture("lnetctl_net_show_no_nids.txt")) == []
    assert parse_net_show("") == []
    assert parse_net_show("net:\n") == []


def test_lustre_mounts() -> None:
    mgs, mdt = parse_lustre_mounts(fixture("mount_lustre_server.txt"))
    assert (mgs.device, mgs.mountpoint, mgs.svname) == (
        "mds0-mdtpool/mgs",
        "/lustre/amlfs/mgs",
        "MGS",
    )
    assert mgs.options == {"ro": None, "svname": "MGS", "mgs": None, "osd": "osd-zfs"}
    assert mdt.svname == "amlfs-MDT0000"
    assert mdt.options["mgsnode"] == "10.0.0.4@tcp"
    (ost,) = parse_lustre_mounts(fixture("mount_lustre_oss.txt"))
    assert (ost.device, ost.svname) == ("oss0-ostpool/ost0", "amlfs-OST0000")
    (client,) = parse_lustre_mounts(fixture("mount_lustre_client.txt"))
    assert (client.device, client.mountpoint) == ("10.0.0.4@tcp:/amlfs", "/lustre/amlfs")
    assert client.svname is None
    assert "flock" in client.options
    assert client.options["encrypt"] is None
    assert parse_lustre_mounts("") == []


def test_hsm() -> None:
    assert fixture("hsm_control.txt").strip() == "enabled"
    assert parse_hsm_active_requests(fixture("hsm_active_requests_empty.txt")) == 0
    assert parse_hsm_active_requests(fixture("hsm_active_requests_busy.txt")) == 2
    assert parse_hsm_active_requests(fixture("hsm_actions.txt")) == 2
    assert parse_hsm_agents(fixture("hsm_agents.txt")) == [
        HsmAgent("9c1f2e3d-4b5a-6978-8a9b-0c1d2e3f4a5b", [1]),
        HsmAgent("1a2b3c4d-5e6f-7081-92a3-b4c5d6e7f809", [1, 2]),
        HsmAgent("5d6e7f80-9a1b-2c3d-4e5f-60718293a4b5", []),
    ]
    assert parse_hsm_agents("") == []


def test_iptables_rules() -> None:
    assert parse_iptables_rules(fixture("iptables_S.txt")) == [
        "-A INPUT -s 10.8.0.0/16 -p tcp -m tcp --dport 988 -j DROP",
        "-A INPUT -i lo -j ACCEPT",
    ]
    assert parse_iptables_rules("-P INPUT ACCEPT\n-N FENCE\n-A FENCE -j DROP\n") == [
        "-A FENCE -j DROP"
    ]


def test_zpool_fixtures() -> None:
    # No parser reads these (the procedures only look at zpool's exit status); they pin
    # the wording the emulator reproduces.
    status = fixture("zpool_status.txt")
    assert status.splitlines()[:2] == ["  pool: oss0-ostpool", " state: ONLINE"]
    assert status.rstrip().endswith("errors: No known data errors")
    refusal = fixture("zpool_import_other_system.txt").splitlines()
    assert refusal[0] == (
        "cannot import 'oss0-ostpool': pool was previously in use from another system."
    )
    assert refusal[2] == "The pool can be imported, use 'zpool import -f' to import the pool."


def test_emulator_output_round_trips_through_the_parsers() -> None:
    devices = [formats.Device(0, "UP", "mgc", "MGC10.0.0.4@tcp", "uuid-1", 4)]
    assert parse_devices(formats.format_devices(devices)) == [
        Device(0, "UP", "mgc", "MGC10.0.0.4@tcp", "uuid-1", 4)
    ]
    assert parse_net_show(formats.format_net_show(["127.1.0.1@tcp"])) == ["127.1.0.1@tcp"]
    real = {
        "COMPLETE": "recovery_status_complete.txt",
        "RECOVERING": "recovery_status_recovering.txt",
        "WAITING_FOR_CLIENTS": "recovery_status_waiting.txt",
        "INACTIVE": "recovery_status_inactive.txt",
    }
    for status, name in real.items():
        text = formats.format_recovery_status(
            status,
            start=1764036000,
            duration=30,
            time_remaining=100,
            total_clients=4,
            connected=3,
            completed=3,
            evicted=1,
        )
        parsed = parse_recovery_status(text)
        assert parsed.status == status
        assert parsed.evicted == (1 if status in ("COMPLETE", "RECOVERING") else 0)
        # The emulator prints exactly the keys, in the order, Lustre prints in that state.
        keys = [line.split(":")[0] for line in fixture(name).splitlines()]
        assert [line.split(":")[0] for line in text.splitlines()] == keys
    multi = formats.format_params(
        [
            ("mdt.amlfs-MDT0000.recovery_status", "status: COMPLETE\nrecovery_start: 1\n"),
            ("mdt.amlfs-MDT0000.recovery_time_hard", "900"),
        ],
        value_only=False,
    )
    assert parse_params(multi) == {
        "mdt.amlfs-MDT0000.recovery_status": "status: COMPLETE\nrecovery_start: 1",
        "mdt.amlfs-MDT0000.recovery_time_hard": "900",
    }
    # An empty file prints nothing, with or without -n (SOURCES.md, lctl get_param).
    empty = [("mdt.amlfs-MDT0000.hsm.active_requests", "")]
    assert formats.format_params(empty, value_only=False) == ""
    assert formats.format_params(empty, value_only=True) == ""


@pytest.mark.parametrize(
    ("parser", "text", "message"),
    [
        (parse_devices, "  0 UP osd-zfs\n", r"`lctl dl`.*6 columns.*'  0 UP osd-zfs'"),
        (parse_devices, "  x UP mgc MGC MGC_uuid 4\n", r"`lctl dl`.*'  x UP mgc"),
        (parse_params, "timeout=100\ngarbage line\n", r"`lctl get_param`.*'garbage line'"),
        (parse_recovery_status, "status: SLEEPING\n", r"unknown status: 'status: SLEEPING'"),
        (parse_recovery_status, "recovery_start: 1\n", r"no status line: 'recovery_start: 1'"),
        (parse_recovery_status, "status COMPLETE\n", r"key: value: 'status COMPLETE'"),
        (
            parse_recovery_status,
            "status: RECOVERING\nconnected_clients: x/4\n",
            r"N or N/TOTAL: 'connected_clients: x/4'",
        ),
        (
            parse_recovery_status,
            "status: COMPLETE\nrecovery_duration: soon\n",
            r"integer: 'recovery_duration: soon'",
        ),
        (parse_version, "version=banana\n", r"not a Lustre version: 'version=banana'"),
        (parse_version, "", r"expected one line"),
        (parse_net_show, "net: [unclosed\n", r"`lnetctl net show` output is not YAML"),
        (parse_net_show, "- 10.0.0.4@tcp\n", r"expected a 'net:' list"),
        (parse_net_show, "net:\n  - net type: tcp\n", r"local NI\(s\)"),
        (
            parse_lustre_mounts,
            "tmpfs on /tmp type tmpfs (rw)\n",
            r"`mount -t lustre`.*'tmpfs on /tmp type tmpfs \(rw\)'",
        ),
        (parse_hsm_active_requests, "no requests\n", r"hsm.active_requests.*'no requests'"),
        (parse_hsm_agents, "archive_id=1\n", r"`hsm.agents`.*'archive_id=1'"),
        (
            parse_hsm_agents,
            "uuid=u archive_id=one requests=[current:0 ok:0 errors:0]\n",
            r"neither ANY nor integers",
        ),
        (parse_iptables_rules, "Chain INPUT (policy ACCEPT)\n", r"`iptables -S`.*'Chain INPUT"),
    ],
)
def test_malformed_output_is_refused_naming_the_command_and_line(
    parser: Callable[[str], object], text: str, message: str
) -> None:
    with pytest.raises(NodeOutputError, match=message):
        parser(text)
