"""The Lustre side of the emulator, through real paramiko SSH and the real Compute SDK."""

from __future__ import annotations

import base64
import hashlib
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from amlfs.errors import CommandFailedError, NodeAccessDeniedError, NodeUnreachableError
from amlfs.lustre.parsers import parse_evictions, parse_hsm_requests, parse_lustre_mounts
from amlfs.ssh import NodeShell, SshPool
from amlfs.ssh.gateway import CommandResult, batch_command, split_batch
from tests.conftest import Sim, os_disk_body

GALLERY = (
    "/subscriptions/4f6c1a52-7a3e-4d7e-9a55-2b1f0c9e8d01/resourceGroups/rg-amlfs-images/providers/"
    "Microsoft.Compute/galleries/amlfsgallery/images/amlfs-lustre/versions/"
)
FIREWALL = ["-s", "10.8.0.0/16", "-p", "tcp", "--dport", "988", "-j", "DROP"]
# The server's own connections to clients' 988 (LNet connects both ways).
FIREWALL_OUT = ["-d", "10.8.0.0/16", "-p", "tcp", "--dport", "988", "-j", "DROP"]


def cut_clients(shell: NodeShell, action: str) -> None:
    """Drop client LNet traffic on a server both ways (``-A``), or let it through (``-D``)."""
    shell.run(["iptables", action, "INPUT", *FIREWALL])
    shell.run(["iptables", action, "OUTPUT", *FIREWALL_OUT])


CONFIG_FILES = (
    "/etc/lnet.conf",
    "/etc/modprobe.d/lustre.conf",
    "/etc/ldev.conf",
    "/etc/hostid",
)


def swap_to_release(sim: Sim, vm_name: str, version: str) -> None:
    """Create an OS disk from a gallery version and PUT the running VM with it (stop/swap/boot)."""
    compute = sim.compute()
    cluster = sim.cluster
    body = os_disk_body(cluster.region, GALLERY + version)
    disk = compute.disks.begin_create_or_update(
        cluster.resource_group, f"{vm_name}-os-{version}", body
    ).result()
    vm = compute.virtual_machines.get(cluster.resource_group, vm_name)
    vm.storage_profile.os_disk.managed_disk.id = disk.id
    compute.virtual_machines.begin_create_or_update(cluster.resource_group, vm_name, vm).result()


def test_mount_lists_lustre_mounts_as_lustre_2_15_prints_them(sim: Sim) -> None:
    # Real 2.15 output (tests/data/lustre-2.15, SOURCES.md says where each option comes from):
    # the emulated nodes must show the same options, only names and NIDs differ.
    data = Path(__file__).parent / "data" / "lustre-2.15"
    real = parse_lustre_mounts(
        (data / "mount_lustre_server.txt").read_text()
        + (data / "mount_lustre_oss.txt").read_text()
        + (data / "mount_lustre_client.txt").read_text()
    )
    emulated = parse_lustre_mounts(
        "".join(
            sim.shell(name).run(["mount", "-t", "lustre"]).stdout
            for name in ("eus01-mds0", "eus01-oss0", "eus01-lclient0")
        )
    )
    mds_nid = "127.1.0.1@tcp"  # not 10.0.0.4: the emulated fleet's MDS
    assert len(emulated) == len(real) == 4
    for got, want in zip(emulated, real, strict=True):
        assert got.options.keys() == want.options.keys(), (got, want)
        for key in ("ro", "rw", "mgs", "osd"):
            assert got.options.get(key) == want.options.get(key), (key, got, want)
        if "mgsnode" in want.options:
            assert got.options["mgsnode"] == mds_nid
    assert [m.svname for m in emulated] == ["MGS", "amlfs-MDT0000", "amlfs-OST0000", None]
    assert emulated[-1].device == f"{mds_nid}:/amlfs"


def target_row(sim: Sim, node: str) -> dict[str, object]:
    return next(t for t in sim.customer()["targets"] if t["node"] == node)


def test_every_node_of_the_fleet_answers_lctl_dl(sim: Sim) -> None:
    for _, node in sim.world.fleet.iter_nodes():
        out = sim.shell(node.name).run(["lctl", "dl"]).stdout
        lines = out.splitlines()
        assert lines, node.name
        assert all(line.split()[1] == "UP" for line in lines), out
    mds = sim.shell("eus01-mds0").run(["lctl", "dl"]).stdout
    assert " mdt amlfs-MDT0000 " in mds
    assert " mgs MGS " in mds
    client = sim.shell("eus01-lclient0").run(["mount", "-t", "lustre"]).stdout
    assert client.startswith("127.1.0.1@tcp:/amlfs on /lustre/amlfs type lustre")


def test_unknown_command_exits_127_and_arguments_are_not_interpreted(sim: Sim) -> None:
    shell = sim.shell("eus01-oss0")
    result = shell.run(["reboot"], check=False)
    assert result.status == 127
    assert "command not found" in result.stderr
    # One argv element with shell syntax stays one argument: no injection.
    result = shell.run(["cat", "/etc/hostid; reboot"], check=False)
    assert result.status == 1
    assert "No such file" in result.stderr


def test_unknown_host_key_is_rejected(sim: Sim, tmp_path: Path) -> None:
    ssh = sim.endpoint.ssh
    lines = Path(ssh["known_hosts"]).read_text().splitlines()
    # Give the mds the key of another node: a man in the middle as far as the client knows.
    other_key = next(ln for ln in lines if ln.startswith("[127.1.0.2]")).split(" ", 1)[1]
    forged = [
        f"[127.1.0.1]:{ssh['port']} {other_key}" if ln.startswith("[127.1.0.1]") else ln
        for ln in lines
    ]
    (tmp_path / "forged").write_text("\n".join(forged) + "\n")
    (tmp_path / "empty").write_text("")
    for known_hosts, reason in (
        (tmp_path / "forged", "does not match"),
        (tmp_path / "empty", "not found in known_hosts"),
    ):
        pool = SshPool(sim.ssh_config(known_hosts=known_hosts))
        try:
            with pytest.raises(NodeAccessDeniedError, match=reason):
                pool.shell("eus01-mds0", "127.1.0.1").run(["hostid"])
        finally:
            pool.close()


def test_stopped_vm_refuses_connections_and_ssh_fault_makes_a_node_unreachable(sim: Sim) -> None:
    compute = sim.compute()
    rg = sim.cluster.resource_group
    compute.virtual_machines.begin_power_off(rg, "eus01-oss1").result()
    port = sim.endpoint.ssh["port"]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.1.0.3", port), timeout=2).close()
    with pytest.raises(NodeUnreachableError, match="unreachable"):
        sim.shell("eus01-oss1").run(["hostid"])
    assert sim.customer()["serving"] is False
    compute.virtual_machines.begin_start(rg, "eus01-oss1").result()
    assert sim.shell("eus01-oss1").run(["systemctl", "is-active", "lustre"]).stdout == "active\n"

    sim.fault(kind="node.ssh", target="eus01-oss0", count=2)
    # One attempt per command: each refusal is seen (a retrying shell would ride them out).
    pool = SshPool(sim.ssh_config(attempts=1))
    try:
        shell = pool.shell("eus01-oss0", "127.1.0.2")
        for _ in range(2):
            with pytest.raises(NodeUnreachableError):
                shell.run(["hostid"])
        assert shell.run(["hostid"]).status == 0
    finally:
        pool.close()


def test_fresh_release_disk_keeps_lustre_down_until_config_is_restored(sim: Sim) -> None:
    oss = sim.shell("eus01-oss0")
    saved = {
        path: base64.b64decode(oss.run(["base64", "-w", "0", path]).stdout) for path in CONFIG_FILES
    }
    swap_to_release(sim, "eus01-oss0", "2.15.6")

    assert oss.run(["lctl", "get_param", "-n", "version"]).stdout == "2.15.6\n"
    net = oss.run(["lnetctl", "net", "show"]).stdout
    assert "@tcp" not in net  # LNet up without NIDs: no lnet.conf
    imported = oss.run(["zpool", "import", "eus01-oss0-ostpool"], check=False)
    assert imported.status == 1
    assert "previously in use from another system" in imported.stderr
    assert oss.run(["mount", "-t", "lustre"]).stdout == ""
    assert sim.customer()["serving"] is False

    for path, content in saved.items():
        oss.run(["tee", path], stdin=content)
    oss.run(["systemctl", "restart", "lnet"])
    assert "127.1.0.2@tcp" in oss.run(["lnetctl", "net", "show"]).stdout
    oss.run(["zpool", "import", "eus01-oss0-ostpool"])
    oss.run(["systemctl", "start", "lustre"])
    assert "svname=amlfs-OST0000" in oss.run(["mount", "-t", "lustre"]).stdout
    sim.sleep(30)  # clients reconnect, replay (8 s), recovery completes
    status = oss.run(["lctl", "get_param", "-n", "obdfilter.*.recovery_status"]).stdout
    assert status.startswith("status: COMPLETE"), status
    customer = sim.customer()
    assert customer["serving"] is True
    assert customer["evictions"] == 0
    assert "2.15.6" in customer["lustre_versions"]
    assert "2.15.5" in customer["lustre_versions"]
    assert len(customer["downtime_intervals"]) == 1


def test_bad_image_boots_without_lustre_modules(sim: Sim) -> None:
    swap_to_release(sim, "eus01-oss1", "2.15.7")
    oss = sim.shell("eus01-oss1")
    assert oss.run(["systemctl", "is-active", "lnet"], check=False).stdout == "failed\n"
    with pytest.raises(CommandFailedError, match="exited 2"):
        oss.run(["lctl", "dl"])
    with pytest.raises(CommandFailedError, match="could not insert 'lustre'"):
        oss.run(["modprobe", "lustre"])
    assert sim.customer()["serving"] is False


def test_boot_faults_crash_or_bad_image(sim: Sim) -> None:
    compute = sim.compute()
    rg = sim.cluster.resource_group
    sim.fault(kind="node.boot", target="eus01-agtstd0", count=1)
    compute.virtual_machines.begin_restart(rg, "eus01-agtstd0").result()
    with pytest.raises(NodeUnreachableError):
        sim.shell("eus01-agtstd0").run(["hostid"])
    assert sim.customer()["nodes"]["eus01-agtstd0"]["crashed"] is True
    compute.virtual_machines.begin_restart(rg, "eus01-agtstd0").result()
    assert sim.shell("eus01-agtstd0").run(["systemctl", "is-active", "lhsmd"]).status == 0

    sim.fault(kind="node.boot", target="eus01-agtpri0", code="BadImage", count=1)
    compute.virtual_machines.begin_restart(rg, "eus01-agtpri0").result()
    result = sim.shell("eus01-agtpri0").run(["systemctl", "is-active", "lnet"], check=False)
    assert result.stdout == "failed\n"


def firewall_servers(sim: Sim, action: str) -> None:
    for node in sim.cluster.nodes:
        if node.role.value in ("mds", "oss"):
            cut_clients(sim.shell(node.name), action)


def stop_in_cluster_work(sim: Sim) -> None:
    """What a suspend does before it firewalls: no hydrator, no copytool running."""
    sim.shell("eus01-agtpri0").run(["systemctl", "stop", "hydrator", "lhsmd"])
    sim.shell("eus01-agtstd0").run(["systemctl", "stop", "lhsmd"])


def logged_evictions(sim: Sim) -> int:
    """The evictions the servers' kernel logs record (what the product reads), summed."""
    return sum(
        parse_evictions(sim.shell(node.name).run(["dmesg"]).stdout)
        for node in sim.cluster.nodes
        if node.role.value in ("mds", "oss")
    )


def test_raised_timeout_before_a_long_outage_avoids_evictions(sim: Sim) -> None:
    # Changed with issue 18 item 6: the in-cluster work is stopped first. With it running,
    # its requests conflict with the cut-off clients' locks and evict them after 100 s,
    # whatever timeout says (test_a_lock_callback_evicts_...).
    mds = sim.shell("eus01-mds0")
    mds.run(["lctl", "set_param", "-P", "timeout=1200"])
    stop_in_cluster_work(sim)
    firewall_servers(sim, "-A")
    assert sim.customer()["clients_blocked"] == 4
    sim.sleep(600)
    firewall_servers(sim, "-D")
    customer = sim.customer()
    assert customer["evictions"] == 0
    assert customer["serving"] is True
    # From the 600 s asleep up to, not past, the raised timeout: at 200x the SSH round trips
    # around the sleep count a loaded machine's real seconds 200 times over (3 would reach it).
    assert 590 <= customer["downtime_total"] < 1200
    assert customer["lock_callbacks_to_blocked"] == 0
    assert 590 <= customer["blocked_while_up_s"] < 1200


def test_the_ping_evictor_counts_from_each_clients_last_ping(sim: Sim) -> None:
    # Changed with issue 18 item 6 (was: evicted 1.5 x timeout after being blocked).
    # obd_support.h: PING_INTERVAL = timeout/4 = 25 s, PING_EVICT_TIMEOUT = 6 of them; the
    # evictor then waits its second timer, 3 more (ptlrpc_update_export_timer). A client
    # last heard of at its last ping before the firewall: evicted 225 s after that ping.
    stop_in_cluster_work(sim)
    firewall_servers(sim, "-A")
    sim.sleep(600)
    firewall_servers(sim, "-D")
    customer = sim.customer()
    assert customer["evictions"] == 4
    assert all("haven't heard from client" in e["reason"] for e in customer["eviction_log"])
    assert all("ping evictor, timeout 100 s" in e["reason"] for e in customer["eviction_log"])
    # The servers' consoles say so too, one line per eviction, in 2.15's words.
    assert logged_evictions(sim) == 4
    dmesg = sim.shell("eus01-mds0").run(["dmesg"]).stdout
    assert "I think it's dead, and I am evicting it." in dmesg
    at = [e["at"] for e in customer["eviction_log"]]
    start = customer["downtime_intervals"][0][0]
    # From the oldest last ping (up to one interval before the firewall), not from the cut.
    assert all(200 <= t - start < 225 for t in at), (start, at)
    assert customer["lock_callbacks_to_blocked"] == 0


def test_a_lock_callback_evicts_a_cut_off_client_whatever_timeout_says(sim: Sim) -> None:
    # ldlm_lockd.c ldlm_bl_timeout: max(1.5 x the export's estimate, ldlm_enqueue_min =
    # 100 s). The hydrator and the copytools keep running: their requests conflict with
    # the locks the cut-off clients hold, and a raised timeout does not help.
    sim.shell("eus01-mds0").run(["lctl", "set_param", "-P", "timeout=1200"])
    firewall_servers(sim, "-A")
    sim.sleep(300)
    customer = sim.customer()
    start = customer["downtime_intervals"][0][0]
    assert customer["evictions"] == 4
    for eviction in customer["eviction_log"]:
        assert "lock callback timer expired after 100s" in eviction["reason"]
        assert "conflicting request from eus01-agt" in eviction["reason"]
        assert 99 <= eviction["at"] - start <= 102
    assert customer["lock_callbacks_to_blocked"] >= 4
    assert logged_evictions(sim) == 4
    firewall_servers(sim, "-D")


def test_in_cluster_io_against_cut_off_clients_evicts_them_100_s_later(sim: Sim) -> None:
    sim.shell("eus01-mds0").run(["lctl", "set_param", "-P", "timeout=1200"])
    stop_in_cluster_work(sim)
    firewall_servers(sim, "-A")
    sim.sleep(60)
    assert sim.customer()["lock_callbacks_to_blocked"] == 0  # no conflicting request yet
    client = sim.shell("eus01-lclient0")
    client.run(["tee", "/lustre/amlfs/in-cluster-io"], stdin=b"x\n")
    customer = sim.customer()
    sent = {e["at"] for e in customer["lock_callback_log"]}
    assert len(sent) == 1
    assert customer["lock_callbacks_to_blocked"] == 4 * 3  # every client, every target
    sim.sleep(150)
    customer = sim.customer()
    assert customer["evictions"] == 4
    assert all(99 <= e["at"] - min(sent) <= 102 for e in customer["eviction_log"])
    assert logged_evictions(sim) == 4
    firewall_servers(sim, "-D")


def test_a_server_that_is_down_evicts_nobody(sim: Sim) -> None:
    # Changed with issue 18 item 6: a client blocked by a stopped server is not evicted by
    # it (no export is alive to time out); it comes back through that server's recovery.
    stop_in_cluster_work(sim)
    compute = sim.compute()
    rg = sim.cluster.resource_group
    compute.virtual_machines.begin_power_off(rg, "eus01-oss1").result()
    sim.sleep(600)
    assert sim.customer()["evictions"] == 0
    compute.virtual_machines.begin_start(rg, "eus01-oss1").result()
    sim.sleep(30)
    customer = sim.customer()
    assert customer["serving"] is True
    assert customer["evictions"] == 0


def test_recovery_completes_only_after_clients_can_reach_the_server(sim: Sim) -> None:
    # Changed with issue 18 item 7: the MDT (an OST's first client) reconnects at once, so
    # the OST is RECOVERING with its soft timer running, 0 of the 4 customers back.
    oss = sim.shell("eus01-oss0")
    cut_clients(oss, "-A")
    oss.run(["systemctl", "restart", "lustre"])
    sim.sleep(60)
    status = oss.run(["lctl", "get_param", "-n", "obdfilter.*.recovery_status"]).stdout
    assert status.startswith("status: RECOVERING\n"), status
    assert "connected_clients: 0/4\n" in status
    remaining = int(status.split("time_remaining: ")[1].split()[0])
    assert 60 <= remaining <= 90  # 150 s soft window (timeout 100 s, IR) less the 60 s
    cut_clients(oss, "-D")
    sim.sleep(2)
    assert target_row(sim, "eus01-oss0")["recovery"] in ("RECOVERING", "COMPLETE")
    sim.sleep(20)
    assert target_row(sim, "eus01-oss0")["recovery"] == "COMPLETE"
    assert sim.customer()["serving"] is True
    assert sim.customer()["evictions"] == 0


def test_waiting_for_clients_has_no_deadline_until_the_first_client_connects(sim: Sim) -> None:
    # ldlm_lib.c: target_handle_connect starts the timer (check_and_start_recovery_timer)
    # at the first connection; target_recovery_overseer only "waits for the first client".
    for name in ("eus01-lclient0", "eus01-agtpri0", "eus01-agtstd0", "eus01-mds0"):
        sim.shell(name).run(["systemctl", "stop", "lustre"])
    oss = sim.shell("eus01-oss0")
    cut_clients(oss, "-A")
    oss.run(["systemctl", "restart", "lustre"])
    sim.sleep(1000)  # longer than recovery_time_hard (900 s)
    status = oss.run(["lctl", "get_param", "-n", "obdfilter.*.recovery_status"]).stdout
    assert status == "status: WAITING_FOR_CLIENTS\n", status
    assert sim.customer()["evictions"] == 0
    sim.shell("eus01-lclient0").run(["systemctl", "start", "lustre"])  # the first client
    status = oss.run(["lctl", "get_param", "-n", "obdfilter.*.recovery_status"]).stdout
    assert status.startswith("status: RECOVERING\n"), status
    remaining = int(status.split("time_remaining: ")[1].split()[0])
    assert 120 <= remaining <= 150, status  # the 150 s soft window, from just now
    sim.sleep(170)
    row = target_row(sim, "eus01-oss0")
    assert row["recovery"] == "COMPLETE"
    assert row["evicted"] == 4
    customer = sim.customer()
    assert {e["reason"] for e in customer["eviction_log"]} == {
        "amlfs-OST0000 recovery_time_soft expired"
    }


def test_recovery_windows_are_recomputed_at_mount_from_timeout(sim: Sim) -> None:
    # obd_mount_server.c server_calc_timeout, after the params log: soft = max(-P value,
    # 3 x timeout x 5/10), hard = 9 x timeout; a -P recovery_time_hard does not survive.
    mds = sim.shell("eus01-mds0")
    oss = sim.shell("eus01-oss0")
    windows = ["lctl", "get_param", "-n", "obdfilter.*.recovery_time_soft"]
    windows.append("obdfilter.*.recovery_time_hard")
    assert oss.run(windows).stdout == "150\n900\n"
    mds.run(
        [
            "lctl",
            "set_param",
            "-P",
            "timeout=1200",
            "*.*.recovery_time_soft=1000",
            "*.*.recovery_time_hard=2700",
        ]
    )
    assert oss.run(windows).stdout == "1000\n2700\n"  # applied live to the running target
    oss.run(["systemctl", "restart", "lustre"])
    assert oss.run(windows).stdout == "1800\n10800\n"
    mds.run(["lctl", "set_param", "-P", "*.*.recovery_time_soft=5000"])
    sim.compute().virtual_machines.begin_restart(sim.cluster.resource_group, "eus01-oss0").result()
    assert oss.run(windows).stdout == "5000\n10800\n"


def test_recovery_time_hard_evicts_clients_that_never_came_back(sim: Sim) -> None:
    oss = sim.shell("eus01-oss0")
    mds = sim.shell("eus01-mds0")
    mds.run(["lctl", "set_param", "-P", "timeout=3000"])  # no eviction by timeout
    oss.run(["lctl", "set_param", "obdfilter.*.recovery_time_hard=120"])
    cut_clients(oss, "-A")
    oss.run(["systemctl", "restart", "lustre"])  # plain set_param is lost with the restart...
    oss.run(["lctl", "set_param", "obdfilter.*.recovery_time_hard=120"])  # ...so set it again
    sim.sleep(200)
    row = target_row(sim, "eus01-oss0")
    assert row["recovery"] == "COMPLETE"
    assert row["evicted"] == 4
    assert sim.customer()["evictions"] == 4
    dmesg = oss.run(["dmesg"]).stdout
    assert "recovery is timed out, evict stale exports" in dmesg
    assert parse_evictions(dmesg) == 4
    assert logged_evictions(sim) == 4


def test_a_boot_empties_the_kernel_log_and_gets_a_new_boot_id(sim: Sim) -> None:
    # random(4): boot_id is a new UUID at each boot; dmesg is the ring buffer of this boot.
    stop_in_cluster_work(sim)
    firewall_servers(sim, "-A")
    sim.sleep(600)
    firewall_servers(sim, "-D")
    servers = [n.name for n in sim.cluster.nodes if n.role.value in ("mds", "oss")]
    # The first target whose evictor runs evicts each client (and its exports everywhere).
    name = next(n for n in servers if parse_evictions(sim.shell(n).run(["dmesg"]).stdout))
    oss = sim.shell(name)
    first = oss.run(["cat", "/proc/sys/kernel/random/boot_id"]).stdout.strip()
    compute = sim.compute()
    rg = sim.cluster.resource_group
    compute.virtual_machines.begin_restart(rg, name).result()
    second = oss.run(["cat", "/proc/sys/kernel/random/boot_id"]).stdout.strip()
    assert len(first) == len(second) == 36
    assert first != second
    assert parse_evictions(oss.run(["dmesg"]).stdout) == 0


def test_recovery_stuck_fault(sim: Sim) -> None:
    sim.fault(kind="node.recovery", target="eus01-oss1", mode="hang", count=1)
    compute = sim.compute()
    compute.virtual_machines.begin_restart(sim.cluster.resource_group, "eus01-oss1").result()
    sim.sleep(120)  # replay takes 8 s, recovery_time_hard does not apply once recovering
    assert target_row(sim, "eus01-oss1")["recovery"] == "RECOVERING"
    assert sim.customer()["serving"] is False


def test_persistent_params_survive_a_swap_and_plain_ones_do_not(sim: Sim) -> None:
    mds = sim.shell("eus01-mds0")
    mds.run(["lctl", "set_param", "-P", "timeout=900"])
    mds.run(["lctl", "set_param", "at_max=700"])
    with pytest.raises(CommandFailedError, match="needs the MGS"):
        sim.shell("eus01-oss0").run(["lctl", "set_param", "-P", "timeout=1"])
    assert mds.run(["lctl", "get_param", "timeout", "at_max"]).stdout == (
        "timeout=900\nat_max=700\n"
    )
    compute = sim.compute()
    compute.virtual_machines.begin_restart(sim.cluster.resource_group, "eus01-mds0").result()
    assert mds.run(["lctl", "get_param", "-n", "timeout", "at_max"]).stdout == "900\n600\n"
    assert sim.customer()["persistent_params"] == {"timeout": "900"}
    mds.run(["lctl", "set_param", "-P", "-d", "timeout"])
    assert mds.run(["lctl", "get_param", "-n", "timeout"]).stdout == "100\n"


def test_hsm_requests_drain_after_the_coordinator_is_disabled(sim: Sim) -> None:
    mds = sim.shell("eus01-mds0")
    active = ["lctl", "get_param", "-n", "mdt.*.hsm.active_requests"]
    assert len(mds.run(active).stdout.splitlines()) == 2
    agents = mds.run(["lctl", "get_param", "-n", "mdt.*.hsm.agents"]).stdout
    assert len(agents.splitlines()) == 2
    mds.run(["lctl", "set_param", "mdt.*.hsm_control=disabled"])
    assert len(mds.run(active).stdout.splitlines()) == 2
    sim.sleep(20)  # the default copies take 5-15 s
    assert mds.run(active).stdout == ""
    with pytest.raises(CommandFailedError, match="Invalid argument"):
        mds.run(["lctl", "set_param", "mdt.*.hsm_control=bogus"])


def test_hsm_active_requests_print_as_lustre_2_15_does(sim: Sim) -> None:
    # mdt_hsm_active_requests_proc_show: the same fields, in the same order, as the real
    # output captured in tests/data; the FIDs resolve through the client's .lustre/fid.
    real = Path(__file__).parent / "data" / "lustre-2.15" / "hsm_active_requests_busy.txt"
    text = sim.shell("eus01-mds0").run(["lctl", "get_param", "-n", "mdt.*.hsm.active_requests"])

    def keys(line: str) -> list[str]:
        return [word.split("=", 1)[0] for word in line.split()]

    lines = text.stdout.splitlines()
    assert [keys(line) for line in lines] == [keys(line) for line in real.read_text().splitlines()]
    requests = parse_hsm_requests(text.stdout)
    agents = sim.shell("eus01-mds0").run(["lctl", "get_param", "-n", "mdt.*.hsm.agents"]).stdout
    assert {r.agent for r in requests} <= {line.split()[0][5:] for line in agents.splitlines()}
    sizes = sim.shell("eus01-lclient0").run_batch(
        [["stat", "-c", "%s", f"/lustre/amlfs/.lustre/fid/{r.fid}"] for r in requests]
    )
    found = [(r, int(s.stdout)) for r, s in zip(requests, sizes, strict=True) if s.status == 0]
    assert found  # (a 5-15 s copy may just have ended)
    for request, size in found:
        assert 0 <= request.done <= size <= 15 * 200e6


def test_lclient_probe_reads_back_what_it_wrote_only_while_serving(sim: Sim) -> None:
    client = sim.shell("eus01-lclient0")
    client.run(["tee", "/lustre/amlfs/.amlfs-probe"], stdin=b"probe-1\n")
    assert client.run(["cat", "/lustre/amlfs/.amlfs-probe"]).stdout == "probe-1\n"
    sim.compute().virtual_machines.begin_power_off(
        sim.cluster.resource_group, "eus01-oss0"
    ).result()
    with pytest.raises(CommandFailedError, match="Input/output error"):
        client.run(["cat", "/lustre/amlfs/.amlfs-probe"])


def test_customer_view_lists_data_disk_checksums_and_nothing_changed(sim: Sim) -> None:
    state = sim.state(sim.cluster.name)
    checksums = [d["checksum"] for vm in state["vms"] for d in vm["data_disks"]]
    assert len(checksums) == 1 + 2 * 2 + 1  # mds 1, two oss x 2, agtpri 1
    assert state["clusters"][sim.cluster.name]["serving"] is True
    assert state["data_disk_changes"] == []


def test_shell_reuses_its_connection(sim: Sim) -> None:
    shell: NodeShell = sim.shell("eus01-oss0")
    before = sim.emulator.ssh.accepted
    for _ in range(5):
        shell.run(["hostid"])
    assert sim.emulator.ssh.accepted - before <= 1


# A batch mixing what splitting must keep exact: no trailing newline, blank lines, a
# non-zero exit with stderr, shell syntax inside one argument.
BATCH = [
    ["test", "-e", "/nonexistent/amlfs"],
    ["printf", "no newline"],
    ["printf", "two\\n\\n"],
    ["cat", "/nonexistent/amlfs"],
    ["echo", "it's; $HOME > /tmp/x"],
    ["true"],
]


def _shell_batch(shell_binary: str) -> list[CommandResult]:
    command, marker = batch_command(BATCH)
    done = subprocess.run([shell_binary, "-c", command], capture_output=True, text=True)
    results = split_batch(CommandResult(done.returncode, done.stdout, done.stderr), marker, 6)
    assert results is not None, (done.stdout, done.stderr)
    return results


@pytest.mark.parametrize("shell_binary", ["bash", "sh"])
def test_a_batch_splits_back_exactly_under_a_real_posix_shell(shell_binary: str) -> None:
    if shutil.which(shell_binary) is None:
        pytest.skip(f"no {shell_binary} here")
    results = _shell_batch(shell_binary)
    assert [r.status for r in results] == [1, 0, 0, 1, 0, 0]
    assert [r.stdout for r in results] == [
        "",
        "no newline",
        "two\n\n",
        "",
        "it's; $HOME > /tmp/x\n",
        "",
    ]
    assert "No such file" in results[3].stderr
    assert [r.stderr for r in results[:3]] == ["", "", ""]


def test_the_emulated_shell_answers_a_batch_like_a_real_shell(sim: Sim) -> None:
    shell = sim.shell("eus01-oss0")
    before = sim.emulator.ssh.describe()["commands"]
    emulated = shell.run_batch(BATCH)
    assert sim.emulator.ssh.describe()["commands"] - before == 1  # one exec for six commands
    real = _shell_batch("bash")
    assert [(r.status, r.stdout) for r in emulated] == [(r.status, r.stdout) for r in real]
    assert [bool(r.stderr) for r in emulated] == [bool(r.stderr) for r in real]


def test_a_batch_answered_short_is_an_error_not_a_result(sim: Sim) -> None:
    command, marker = batch_command(BATCH)
    full = sim.shell("eus01-oss0")._run_once(command, None, 10)
    assert split_batch(full, marker, len(BATCH)) is not None
    cut = CommandResult(full.status, full.stdout[: len(full.stdout) // 2], full.stderr)
    assert split_batch(cut, marker, len(BATCH)) is None
    assert split_batch(full, "@@amlfs-other", len(BATCH)) is None


def test_a_session_to_a_stopped_vm_ends_at_once_on_both_ends(sim: Sim) -> None:
    # The transport threads only wake every few seconds to look for their own close; the
    # close must not wait for that (a reused shell would hang on a half-dead connection).
    shell = sim.shell("eus01-oss1")
    shell.run(["hostid"])
    assert shell._client is not None
    transport = shell._client.get_transport()
    assert transport is not None
    assert transport.is_active()
    sim.compute().virtual_machines.begin_power_off(
        sim.cluster.resource_group, "eus01-oss1", polling=False
    )
    deadline = time.monotonic() + 1.0
    while transport.is_active() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not transport.is_active(), "the client did not see the node go away within 1 s"

    shell = sim.shell("eus01-oss0")
    shell.run(["hostid"])
    before = threading.active_count()
    started = time.monotonic()
    shell.close()
    assert time.monotonic() - started < 1.0
    deadline = time.monotonic() + 1.0
    while threading.active_count() >= before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert threading.active_count() < before, "the closed transport's thread is still running"


def test_node_changes_never_block_while_the_accept_loop_waits_for_the_lock(sim: Sim) -> None:
    # A command that changes a node tells the SSH server with the backend lock held. The
    # accept loop takes that lock too: if telling it could block (a full wake-up pipe), the
    # emulator froze. The 1,000-cluster bench did, with thousands of changes a minute.
    server = sim.emulator.ssh
    port = sim.endpoint.ssh["port"]
    names = [n.name for _, n in sim.world.fleet.iter_nodes()]
    finished = threading.Event()

    def many_changes() -> None:
        with server.lock:
            # The loop thread is now blocked in the accept of this connection, on the lock.
            pending = socket.create_connection(("127.1.0.1", port), timeout=5)
            time.sleep(0.2)
            for i in range(20_000):
                server._on_node_state(names[i % len(names)], True)
            finished.set()
        pending.close()

    thread = threading.Thread(target=many_changes, daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert finished.is_set(), "a node change blocked while the accept loop waited for the lock"
    assert sim.shell("eus01-mds0").run(["hostid"]).status == 0


def test_hostid_is_four_binary_bytes_and_a_text_copy_of_it_breaks_the_pool_import(
    sim: Sim,
) -> None:
    # glibc gethostid/sethostid and OpenZFS zgenhostid: /etc/hostid holds the 32-bit id as 4
    # native-endian bytes; `hostid` prints it as 8 hex digits.
    oss = sim.shell("eus01-oss0")
    raw = base64.b64decode(oss.run(["base64", "-w", "0", "/etc/hostid"]).stdout)
    assert len(raw) == 4
    assert oss.run(["hostid"]).stdout == f"{int.from_bytes(raw, 'little'):08x}\n"
    digest = oss.run(["sha256sum", "/etc/hostid"]).stdout
    assert digest == f"{hashlib.sha256(raw).hexdigest()}  /etc/hostid\n"
    assert any(byte >= 0x80 for byte in raw), "pick a node whose hostid is not ASCII"
    as_text = oss.run(["cat", "/etc/hostid"]).stdout  # decoded as text: bytes are replaced
    swap_to_release(sim, "eus01-oss0", "2.15.6")
    for path in CONFIG_FILES:
        if path != "/etc/hostid":
            continue
        oss.run(["tee", path], stdin=as_text.encode())
    imported = oss.run(["zpool", "import", "eus01-oss0-ostpool"], check=False)
    assert imported.status == 1
    assert "previously in use from another system" in imported.stderr
    oss.run(["tee", "/etc/hostid"], stdin=raw)  # byte for byte: the pool is ours again
    oss.run(["zpool", "import", "eus01-oss0-ostpool"])


def test_dropping_only_inbound_988_leaves_the_servers_own_connections_to_clients_open(
    sim: Sim,
) -> None:
    # LNet connects both ways: a rule on INPUT --dport 988 alone does not cut a client off.
    oss = sim.shell("eus01-oss0")
    oss.run(["iptables", "-A", "INPUT", *FIREWALL])
    customer = sim.customer()
    assert customer["clients_blocked"] == 0
    assert customer["nodes"]["eus01-oss0"]["firewall_one_way"] is True
    oss.run(["iptables", "-A", "OUTPUT", *FIREWALL_OUT])
    customer = sim.customer()
    assert customer["clients_blocked"] == customer["clients"]
    assert customer["nodes"]["eus01-oss0"]["firewall_one_way"] is False
    assert (
        "-A OUTPUT -d 10.8.0.0/16 -p tcp -m tcp --dport 988 -j DROP"
        in oss.run(["iptables", "-S", "OUTPUT"]).stdout
    )


def test_a_plain_hsm_control_is_lost_when_the_mdt_restarts_and_a_persistent_one_is_not(
    sim: Sim,
) -> None:
    # The coordinator comes back as the config says (enabled) after a restart: a suspend
    # that disabled it with a plain set_param has copies handed out again mid-swap.
    mds = sim.shell("eus01-mds0")
    control = ["lctl", "get_param", "-n", "mdt.*.hsm_control"]
    rg = sim.cluster.resource_group
    mds.run(["lctl", "set_param", "mdt.*.hsm_control=disabled"])
    sim.compute().virtual_machines.begin_restart(rg, "eus01-mds0").result()
    assert mds.run(control).stdout == "enabled\n"
    mds.run(["lctl", "set_param", "-P", "mdt.*.hsm_control=disabled"])
    sim.compute().virtual_machines.begin_restart(rg, "eus01-mds0").result()
    assert mds.run(control).stdout == "disabled\n"
    assert sim.customer()["hsm_active_requests"] == 0


def test_evictions_no_dmesg_printed_before_the_boot_ended_are_lost_from_the_logs(
    sim: Sim,
) -> None:
    # The truth of the product's blind spot: a ring buffer nobody read dies with its boot.
    stop_in_cluster_work(sim)
    firewall_servers(sim, "-A")
    sim.sleep(600)
    firewall_servers(sim, "-D")
    customer = sim.customer()
    assert customer["evictions"] == 4
    assert customer["evictions_unread"] == 4
    assert customer["evictions_lost_from_logs"] == 0
    compute = sim.compute()
    rg = sim.cluster.resource_group
    oss0 = sim.shell("eus01-oss0")
    read = parse_evictions(oss0.run(["dmesg"]).stdout)  # this one's lines are read
    for node in sim.cluster.nodes:
        if node.role.value in ("mds", "oss"):
            compute.virtual_machines.begin_restart(rg, node.name).result()
    customer = sim.customer()
    assert customer["evictions_unread"] == 0
    assert customer["evictions_lost_from_logs"] == 4 - read
