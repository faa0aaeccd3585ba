"""``amlfs-sim serve`` as a separate process: endpoint.json, the real SDK, clean SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from amlfs.azure import StaticTokenCredential, compute_client
from amlfs.clock import ScaledClock
from amlfs.errors import NodeUnreachableError
from amlfs.models import parse_fleet
from amlfs.ssh import SshConfig, SshPool, load_private_key
from amlfs_sim.server import serve_process
from tests.conftest import SMALL_FLEET

pytestmark = pytest.mark.process


def test_serve_process_swaps_a_disk_and_stops_on_sigterm(tmp_path: Path) -> None:
    proc, _ = serve_process(
        SMALL_FLEET,
        tmp_path,
        "--time-scale",
        "300",
        "--seed",
        "3",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # The file itself, as a client in another language would read it.
        endpoint = json.loads((tmp_path / "endpoint.json").read_text())
        assert set(endpoint) == {
            "arm_url",
            "ca_file",
            "subscription_id",
            "time_scale",
            "control_url",
            "ssh",
        }
        assert str(endpoint["arm_url"]).startswith("https://127.0.0.1:")
        assert endpoint["time_scale"] == 300
        compute = compute_client(
            str(endpoint["subscription_id"]),
            StaticTokenCredential("t"),
            arm_url=str(endpoint["arm_url"]),
            ca_file=str(endpoint["ca_file"]),
        )
        rg = "rg-lustre-eus-01"
        compute.virtual_machines.begin_power_off(rg, "eus01-oss0").result()
        vm = compute.virtual_machines.get(rg, "eus01-oss0", expand="instanceView")
        assert vm.instance_view.statuses[-1].code == "PowerState/stopped"
        compute.close()
        # Every running node answers over SSH at its fleet address; the stopped one does not.
        ssh = endpoint["ssh"]
        assert isinstance(ssh, dict)
        pool = SshPool(
            SshConfig(
                username=ssh["username"],
                key=load_private_key(Path(ssh["key_file"]).read_text()),
                known_hosts=Path(ssh["known_hosts"]),
                port=ssh["port"],
                connect_timeout_s=5,
            ),
            ScaledClock(300),  # the stopped node's refused connects back off in sim seconds
        )
        try:
            for _, node in parse_fleet(yaml.safe_load(SMALL_FLEET.read_text())).iter_nodes():
                shell = pool.shell(node.name, str(node.address))
                if node.name == "eus01-oss0":
                    with pytest.raises(NodeUnreachableError):
                        shell.run(["lctl", "dl"])
                else:
                    assert " UP " in shell.run(["lctl", "dl"]).stdout
        finally:
            pool.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "stopped" in out


def test_serve_refuses_a_bad_fleet_file_naming_the_field(tmp_path: Path) -> None:
    data = yaml.safe_load(SMALL_FLEET.read_text())
    data["clusters"][0]["window"]["start_utc"] = "25:00"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "amlfs_sim.cli",
            "serve",
            "--fleet",
            str(bad),
            "--state-dir",
            str(tmp_path / "state"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "start_utc" in proc.stderr
    assert not (tmp_path / "state" / "endpoint.json").exists()


def test_gen_fleet_writes_a_valid_fleet(tmp_path: Path) -> None:
    out = tmp_path / "fleet.yaml"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "amlfs_sim.cli",
            "gen-fleet",
            "--clusters",
            "25",
            "--nodes-per-cluster",
            "8",
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    fleet = parse_fleet(yaml.safe_load(out.read_text()))
    assert len(fleet.clusters) == 25
    assert all(len(c.nodes) == 8 for c in fleet.clusters)
