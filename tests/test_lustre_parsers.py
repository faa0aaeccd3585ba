"""Parsers on captured Lustre 2.15 output (tests/data/lustre-2.15, see SOURCES.md), on the
emulator's output for the same commands, and on malformed input."""

from __future__ import annotations

from pathlib import Path

import pytest

from amlfs.errors import NodeOutputError
from amlfs.lustre.parsers import (
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
from amlfs_sim.nodes.formats import (
    Device,
    format_devices,
    format_net_show,
    format_params,
    format_recovery_status,
)

DATA = Path(__file__).parent / "data" / "lustre-2.15"


def fixture(name: str) -> str:
    return (DATA / name).read_text()


def test_every_fixture_has_a_source() -> None:
    sources = fixture("SOURCES.md")
    for path in DATA.glob("*.txt"):
        stem = path.name.rsplit("_", 1)[0] if "_" in path.stem else path.stem
        assert path.name in sources or stem.split("_")[0] in sources, path.name


def test_lctl_dl() -> None:
    mds = parse_devices(fixture("lctl_dl_mds.txt"))
    assert len(mds) == 12
    assert mds[6].type == "mdt"
    assert mds[6].name == "amlfs-MDT0000"
    assert mds[6].refcount == 14
    assert all_up(mds)
    stopping = parse_devices(fixture("lctl_dl_stopping.txt"))
    assert not all_up(stopping)
    assert stopping[3].status == "ST"
    assert [d.type for d in parse_devices(fixture("lctl_dl_oss.txt"))] == [
        "osd-zfs",
        "mgc",
        "ost",
        "obdfilter",
        "lwp",
    ]


def test_recovery_status_in_every_state() -> None:
    complete = parse_recovery_status(fixture("recovery_status_complete.txt"))
    assert complete.status == "COMPLETE"
    assert (complete.completed, complete.total, complete.evicted) == (4, 4, 0)
    assert complete.recovery_duration == 41
    recovering = parse_recovery_status(fixture("recovery_status_recovering.txt"))
    assert recovering.status == "RECOVERING"
    assert (recovering.connected, recovering.total, recovering.completed) == (3, 4, 2)
    assert recovering.time_remaining == 268
    assert parse_recovery_status(fixture("recovery_status_waiting.txt")).status == (
        "WAITING_FOR_CLIENTS"
    )
    assert parse_recovery_status(fixture("recovery_status_inactive.txt")).status == "INACTIVE"


def test_get_param_with_multi_line_values() -> None:
    params = parse_params(fixture("get_param_recovery_status_multi.txt"))
    assert list(params) == [
        "obdfilter.amlfs-OST0000.recovery_status",
        "obdfilter.amlfs-OST0001.recovery_status",
    ]
    second = parse_recovery_status(params["obdfilter.amlfs-OST0001.recovery_status"])
    assert second.status == "RECOVERING"
    assert second.evicted == 1
    assert parse_params(fixture("get_param_timeouts.txt")) == {"timeout": "100", "at_max": "600"}


def test_health_version_lnet_mounts_hsm_firewall() -> None:
    assert parse_health_check(fixture("health_check_healthy.txt")) is True
    assert parse_health_check(fixture("health_check_unhealthy.txt")) is False
    assert parse_version(fixture("version.txt")) == "2.15.5"
    assert parse_net_show(fixture("lnetctl_net_show.txt")) == ["10.0.0.4@tcp"]
    assert parse_net_show(fixture("lnetctl_net_show_no_nids.txt")) == []
    server = parse_lustre_mounts(fixture("mount_lustre_server.txt"))
    assert [m.svname for m in server] == ["MGS", "amlfs-MDT0000"]
    assert server[1].options["osd"] == "osd-zfs"
    (client,) = parse_lustre_mounts(fixture("mount_lustre_client.txt"))
    assert client.device == "10.0.0.4@tcp:/amlfs"
    assert client.svname is None
    assert parse_hsm_active_requests(fixture("hsm_active_requests_empty.txt")) == 0
    assert parse_hsm_active_requests(fixture("hsm_active_requests_busy.txt")) == 2
    agents = parse_hsm_agents(fixture("hsm_agents.txt"))
    assert [a.archive_ids for a in agents] == [[1], [1, 2]]
    assert parse_iptables_rules(fixture("iptables_S.txt")) == [
        "-A INPUT -s 10.8.0.0/16 -p tcp -m tcp --dport 988 -j DROP"
    ]


def test_emulator_output_round_trips_through_the_parsers() -> None:
    devices = [Device(0, "UP", "mgc", "MGC10.0.0.4@tcp", "uuid-1", 4)]
    assert parse_devices(format_devices(devices))[0].name == "MGC10.0.0.4@tcp"
    assert parse_net_show(format_net_show(["127.1.0.1@tcp"])) == ["127.1.0.1@tcp"]
    for status in ("COMPLETE", "RECOVERING", "WAITING_FOR_CLIENTS", "INACTIVE"):
        text = format_recovery_status(
            status,
            start=1764036000,
            duration=30,
            time_remaining=100,
            total_clients=4,
            connected=3,
            completed=2,
            evicted=1,
        )
        parsed = parse_recovery_status(text)
        assert parsed.status == status
        # The emulator prints exactly the keys Lustre prints in that state.
        real = {
            "COMPLETE": "recovery_status_complete.txt",
            "RECOVERING": "recovery_status_recovering.txt",
            "WAITING_FOR_CLIENTS": "recovery_status_waiting.txt",
            "INACTIVE": "recovery_status_inactive.txt",
        }[status]
        keys = [line.split(":")[0] for line in fixture(real).splitlines()]
        assert [line.split(":")[0] for line in text.splitlines()] == keys
    multi = format_params(
        [("mdt.amlfs-MDT0000.recovery_status", "status: COMPLETE\nrecovery_start: 1\n")],
        value_only=False,
    )
    assert parse_params(multi) == {
        "mdt.amlfs-MDT0000.recovery_status": "status: COMPLETE\nrecovery_start: 1"
    }


@pytest.mark.parametrize(
    ("parser", "text", "message"),
    [
        (parse_devices, "  0 UP osd-zfs\n", "lctl dl"),
        (parse_recovery_status, "status: SLEEPING\n", "unknown status"),
        (parse_recovery_status, "status: RECOVERING\nconnected_clients: x/4\n", "N or N/TOTAL"),
        (parse_version, "version=banana\n", "not a Lustre version"),
        (parse_lustre_mounts, "tmpfs on /tmp type tmpfs (rw)\n", "mount -t lustre"),
        (parse_hsm_agents, "archive_id=1\n", "uuid="),
        (parse_net_show, "net: [unclosed\n", "not YAML"),
        (parse_params, "garbage line\n", "expected name=value"),
        (parse_iptables_rules, "Chain INPUT (policy ACCEPT)\n", "iptables -S"),
    ],
)
def test_malformed_output_is_refused_naming_the_command(
    parser: object, text: str, message: str
) -> None:
    with pytest.raises(NodeOutputError, match=message):
        parser(text)  # type: ignore[operator]
