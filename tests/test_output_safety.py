"""Values from input are shown as what they are (issue 18 item 13): the CLI prints them as
text, not Rich markup, and its errors one line each, never wrapped, exit 2; artifacts escape
Markdown; known_hosts files with hashed names work, and a line that cannot be read, a revoked
key or a certificate authority is refused clearly, against the emulator's real SSH server."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import paramiko
import pytest
from markdown_it import MarkdownIt
from rich.console import Console
from typer.testing import CliRunner

from amlfs.errors import NodeAccessDeniedError
from amlfs.fleet import FleetPolicy, FleetSummary
from amlfs.saga import Outcome, StepTiming, UpgradeResult
from amlfs.ssh import SshPool
from amlfs.ssh.gateway import KnownHosts
from amlfs.store import StateStore
from amlfs_cli.main import _print_result, _progress, app
from flows.cluster_upgrade import _artifact
from flows.fleet_maintenance import FleetParams, _markdown, _table
from flows.markdown import markdown_text
from tests.conftest import RELEASE_FILE, REPO, SMALL_FLEET, Sim

MDS, MDS_ADDRESS = "eus01-mds0", "127.1.0.1"
OSS, OSS_ADDRESS = "eus01-oss0", "127.1.0.2"

# What a node, an Azure error or an operator may say: Rich markup, Markdown, HTML, a table row.
HOSTILE = "[/] said [bold]no[/] | `x` **y** _z_ [link](https://evil.example) <img src=x>\n| a |"


# ------------------------------------------------------------------ the CLI


def amlfs(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    """``amlfs ARGS`` in a child process, its output to pipes and no COLUMNS: Rich's width is
    then 80, as under cron, a CI job or ``| tee``."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    return subprocess.run(
        [sys.executable, "-m", "amlfs_cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env=env,
    )


def test_a_name_with_markup_in_the_fleet_file_is_quoted_in_one_line_per_problem(
    tmp_path: Path,
) -> None:
    bad = tmp_path / "fleet.yaml"
    bad.write_text(
        SMALL_FLEET.read_text().replace("name: eus01-mds0,", 'name: "eus01[/]mds0 [bold]x",')
    )
    done = amlfs("validate", str(bad))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 2, done.stderr  # the count, then the one problem: never wrapped
    assert lines[0] == f"error: invalid fleet file {bad}: 1 problem(s)"
    assert "> name: 'eus01[/]mds0 [bold]x' is not a valid Azure VM name" in lines[1]


def test_a_path_with_markup_is_printed_as_it_is(tmp_path: Path) -> None:
    folder = tmp_path / "[bold]night[/] [/]"
    folder.mkdir(parents=True)  # "[/]" is also a path separator: three folders
    fleet = folder / "fleet.yaml"
    fleet.write_text(SMALL_FLEET.read_text())
    done = amlfs("validate", str(fleet), "--release", str(RELEASE_FILE))
    assert done.returncode == 0, done.stderr
    assert f"{fleet}: 3 clusters" in done.stdout
    # The release line is one line, however long its image id.
    assert any(
        line.startswith("release 2.15.6: /subscriptions/") and line.endswith("/versions/2.15.6")
        for line in done.stdout.splitlines()
    ), done.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("plan", "--at", "[/]monday"), "error: Invalid isoformat string: '[/]monday'"),
        (
            ("run-fleet", "--error-budget", "[/]10%", "--admit-every", "-1"),
            "error: invalid FleetPolicy: admit_every_s: Input should be greater than or equal "
            "to 0; error_budget: error budget must be a count (int >= 0) or a percentage such "
            "as '10%', got '[/]10%'",
        ),
    ],
)
def test_option_values_quoted_in_errors_are_text_on_one_line(
    args: tuple[str, ...], expected: str
) -> None:
    done = amlfs(args[0], "--fleet", str(SMALL_FLEET), "--release", str(RELEASE_FILE), *args[1:])
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [expected]


def test_a_bad_control_action_is_quoted_as_text() -> None:
    done = amlfs("control", "[/]halt")
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == ["error: action must be run, halt or abort: '[/]halt'"]


def test_status_prints_clusters_and_reasons_as_text(tmp_path: Path) -> None:
    StateStore(tmp_path).put(
        "fleet-runs",
        "night",
        value={
            "results": {
                "lustre-[x]-01": {
                    "wave": "canary",
                    "outcome": "rolled_back",
                    "release_before": "2.15.5",
                    "release_after": "2.15.5",
                    "downtime_observed_s": 12,
                    "reason": "oss1: [/] modules [bold]missing[/]",
                }
            },
            "not_started": {"lustre-weu-01": "wave not opened: [red]budget[/]"},
            "stopped": "[/]operator halt",
            "counts": {"rolled_back": 1},
        },
    )
    shown = CliRunner().invoke(
        app, ["status", "night", "--state-dir", str(tmp_path)], env={"COLUMNS": "250"}
    )
    assert shown.exit_code == 0, shown.output
    for literal in (
        "lustre-[x]-01",
        "oss1: [/] modules [bold]missing[/]",
        "wave not opened: [red]budget[/]",
        "stopped admitting: [/]operator halt",
    ):
        assert literal in shown.output


def test_a_cluster_result_prints_node_output_as_text() -> None:
    console = Console(file=io.StringIO(), width=400, record=True)
    _print_result(
        console,
        {
            "cluster": "lustre-[b]-01",
            "outcome": "rolled_back",
            "release_before": "2.15.5",
            "release_after": "2.15.5",
            "reason": "BadReleaseError: oss1: [/] said [bold]no[/]",
            "steps": [{"name": "rollback: [swap]", "status": "ok", "started_s": 0, "ended_s": 2}],
            "downtime_observed_s": 30.0,
            "evictions": 0,
            "data_disk_changes": ["oss[/]0 LUN 1: [bold]d1 -> none"],
            "leaked_disks": ["os-[/]disk"],
            "unread": [],
        },
    )
    text = console.export_text()
    assert (
        "lustre-[b]-01: rolled_back 2.15.5 -> 2.15.5  reason: BadReleaseError: oss1: [/] said [bold]no[/]"
        in text
    )
    assert "rollback: [swap]" in text
    assert "evictions 0, data-disk changes 1, leaked disks 1" in text
    assert "oss[/]0 LUN 1: [bold]d1 -> none" in text
    assert "os-[/]disk" in text


def test_the_progress_bar_shows_the_run_name_and_last_result_as_text() -> None:
    console = Console(file=io.StringIO(), width=200)
    with _progress(console) as progress:
        task = progress.add_task("fleet run [/]night", total=3, last="")
        progress.update(task, completed=1, last="lustre-[bold]a[/]: upgraded")
    shown = console.file.getvalue()  # type: ignore[attr-defined]
    assert "fleet run [/]night" in shown
    assert "lustre-[bold]a[/]: upgraded" in shown


# ------------------------------------------------------------------ artifacts


class _Cells(HTMLParser):
    """Rows of table cells (their text) and every tag seen, from rendered HTML."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.tags: list[str] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def render(markdown: str) -> _Cells:
    """``markdown`` as a CommonMark + GFM tables renderer shows it, with inline HTML on."""
    parsed = _Cells()
    parsed.feed(MarkdownIt("commonmark", {"html": True}).enable("table").render(markdown))
    return parsed


def as_shown(value: str) -> str:
    return " ".join(value.replace("\n", " ").split(" "))


def test_markdown_text_renders_as_the_value_itself() -> None:
    cell = render(f"| a |\n|---|\n| {markdown_text(HOSTILE)} |\n")
    assert cell.rows == [["a"], [as_shown(HOSTILE)]]
    assert set(cell.tags) == {"table", "thead", "tr", "th", "tbody", "td"}


def hostile_summary() -> FleetSummary:
    summary = FleetSummary(run_name="night")
    summary.results["lustre-[x](y)-01"] = {
        "wave": "canary",
        "outcome": "rolled_back",
        "release_before": "2.15.5",
        "release_after": "2.15.5",
        "downtime_observed_s": 61.4,
        "reason": HOSTILE,
    }
    summary.not_started["lustre-weu-01"] = "wave not opened: <b>budget</b> | spent"
    summary.stopped = "halted by *operator* <script>x</script>"
    return summary


def test_the_fleet_summary_keeps_its_table_whatever_the_values() -> None:
    summary = hostile_summary()
    params = FleetParams(
        fleet_file="f.yaml",
        release_file="r.yaml",
        mode="hotfix",
        selector={"names": ["lustre-[x](y)-01"]},
        policy=FleetPolicy(override_window=True, reason="CVE <a href=x>fix</a> `now`"),
    )
    markdown = _markdown("run [a](b) #1", "2.15.6", params, summary, _table(summary))
    shown = render(markdown)
    header = ["cluster", "result", "downtime (s)", "reason", "wave", "before", "after"]
    assert shown.rows == [
        header,
        [
            "lustre-[x](y)-01",
            "rolled_back",
            "61",
            as_shown(HOSTILE),
            "canary",
            "2.15.5",
            "2.15.5",
        ],
        ["lustre-weu-01", "not started", "", "wave not opened: <b>budget</b> | spent", "", "", ""],
    ]
    # Only the summary's own formatting: a heading, its two bold words, paragraphs, the table.
    assert set(shown.tags) == {"h1", "p", "strong", "table", "thead", "tbody", "tr", "th", "td"}
    assert shown.tags.count("strong") == 2
    lines = markdown.splitlines()
    assert lines[0] == "# Fleet maintenance run \\[a\\]\\(b\\) \\#1"
    assert "window overridden: CVE \\<a href\\=x\\>fix\\<\\/a\\> \\`now\\`" in lines[2]
    assert lines[-1] == "Stopped admitting: halted by \\*operator\\* \\<script\\>x\\<\\/script\\>"


def test_table_artifact_cells_are_markdown_text_and_numbers_stay_numbers() -> None:
    rows = _table(hostile_summary())
    assert rows[0]["reason"] == markdown_text(HOSTILE)
    assert rows[0]["cluster"] == "lustre\\-\\[x\\]\\(y\\)\\-01"
    assert rows[0]["downtime (s)"] == 61


def test_the_cluster_artifact_description_and_steps_are_markdown_text() -> None:
    result = UpgradeResult(
        cluster="lustre-eus-01",
        run_id="r",
        outcome=Outcome.ROLLED_BACK,
        reason=HOSTILE,
        release_before="2.15.5",
        release_after="2.15.5",
        steps=[StepTiming(name="rollback: *swap*", started_s=0, ended_s=1.25, status="ok")],
        downtime_observed_s=42,
    )
    table, description = _artifact(result)
    assert table == [{"step": "rollback\\: \\*swap\\*", "status": "ok", "seconds": 1.2}]
    shown = render(description)
    assert set(shown.tags) == {"p"}
    text = MarkdownIt("commonmark", {"html": True}).render(description)
    assert "&lt;img src=x&gt;" in text
    assert "[link](https://evil.example)" in text


# ------------------------------------------------------------------ known_hosts


@pytest.fixture
def pools() -> Any:
    opened: list[SshPool] = []
    yield opened
    for pool in opened:
        pool.close()


def emulator_lines(sim: Sim) -> list[str]:
    """The emulator's known_hosts: ``[address]:port ssh-ed25519 KEY`` per node."""
    return Path(sim.endpoint.ssh["known_hosts"]).read_text().splitlines()


def key_of(lines: list[str], address: str) -> str:
    """``ssh-ed25519 KEY`` of ``address`` in the emulator's known_hosts."""
    return next(ln for ln in lines if ln.startswith(f"[{address}]")).split(" ", 1)[1]


def shell_with(sim: Sim, pools: list[SshPool], known_hosts: Path, node: str, address: str) -> Any:
    pool = SshPool(sim.ssh_config(known_hosts=known_hosts, attempts=3))
    pools.append(pool)
    return pool.shell(node, address)


def accepted(sim: Sim) -> int:
    return int(sim.state()["ssh"]["accepted"])


def test_hashed_known_hosts_entries_are_trusted(
    sim: Sim, pools: list[SshPool], tmp_path: Path
) -> None:
    # As `ssh-keygen -H` leaves the file (one hashed name per line), with the comments,
    # blank lines and a key type paramiko cannot check that real files carry.
    hashed = []
    for line in emulator_lines(sim):
        name, key = line.split(" ", 1)
        hashed.append(f"{paramiko.HostKeys.hash_host(name)} {key}")
    dss = base64.b64encode(b"\x00\x00\x00\x07ssh-dss" + b"\x00" * 16).decode()
    text = "# hashed by ssh-keygen -H\n\n" + "\n".join(hashed) + f"\n10.0.0.9 ssh-dss {dss}\n"
    (tmp_path / "known_hosts").write_text(text)
    for node, address in ((MDS, MDS_ADDRESS), (OSS, OSS_ADDRESS)):
        shell = shell_with(sim, pools, tmp_path / "known_hosts", node, address)
        assert shell.run(["hostid"]).status == 0


def test_hashed_names_match_as_openssh_writes_them(tmp_path: Path) -> None:
    key, other = paramiko.ECDSAKey.generate(), paramiko.ECDSAKey.generate()
    (tmp_path / "known_hosts").write_text(
        f"{paramiko.HostKeys.hash_host('10.0.0.4')} {key.get_name()} {key.get_base64()}\n"
        f"{paramiko.HostKeys.hash_host('[10.0.0.4]:2222')} {other.get_name()} "
        f"{other.get_base64()}\n"
        f"10.0.0.5 {key.get_name()} {key.get_base64()}\n"
    )
    known = KnownHosts(tmp_path / "known_hosts")
    assert known.keys_for("10.0.0.4", 22) == ("10.0.0.4", {key.get_name(): key})
    assert known.keys_for("10.0.0.4", 2222) == ("[10.0.0.4]:2222", {other.get_name(): other})
    assert known.keys_for("10.0.0.5", 22) == ("10.0.0.5", {key.get_name(): key})
    assert known.keys_for("10.0.0.5", 2222)[1] == {}  # bare names are port 22 only
    assert known.keys_for("10.0.0.6", 22)[1] == {}


def malformed(sim: Sim, kind: str) -> str:
    lines = emulator_lines(sim)
    port = sim.endpoint.ssh["port"]
    mds_key = key_of(lines, MDS_ADDRESS)
    blob = mds_key.split(" ")[1]
    return {
        "missing key": f"[{MDS_ADDRESS}]:{port} ssh-ed25519",
        "key type typo": f"[{MDS_ADDRESS}]:{port} ssh-ed2519 {blob}",
        "not base64": f"[{MDS_ADDRESS}]:{port} ssh-ed25519 AAAA!!!{blob}",
        "type mismatch": f"[{MDS_ADDRESS}]:{port} ecdsa-sha2-nistp256 {blob}",
        "bad hashed name": f"|1|c2FsdA==|aGFzaA== {mds_key}",
        "unknown marker": f"@revoke [{MDS_ADDRESS}]:{port} {mds_key}",
    }[kind]


@pytest.mark.parametrize(
    ("kind", "problem"),
    [
        ("missing key", "expected host names, a key type and a base64 key"),
        ("key type typo", "unknown key type 'ssh-ed2519'"),
        ("not base64", "the ssh-ed25519 key is not base64"),
        ("type mismatch", "not a valid ecdsa-sha2-nistp256 key"),
        ("bad hashed name", r"hashed host name is not \|1\|salt\|hash"),
        ("unknown marker", "unknown marker '@revoke'"),
    ],
)
def test_a_line_that_cannot_be_read_refuses_naming_file_and_line(
    sim: Sim, pools: list[SshPool], tmp_path: Path, kind: str, problem: str
) -> None:
    # The file is otherwise the emulator's own: skipping the line would connect.
    path = tmp_path / "known_hosts"
    path.write_text(
        "# nodes of lustre-eus-01\n\n"
        + malformed(sim, kind)
        + "\n"
        + "\n".join(emulator_lines(sim))
        + "\n"
    )
    before = accepted(sim)
    shell = shell_with(sim, pools, path, MDS, MDS_ADDRESS)
    with pytest.raises(
        NodeAccessDeniedError,
        match=rf"^{MDS}: known_hosts {path} line 3: {problem}.*: refusing to connect$",
    ):
        shell.run(["hostid"])
    assert accepted(sim) == before  # refused before any connection, and not retried


def test_a_revoked_key_is_never_trusted(sim: Sim, pools: list[SshPool], tmp_path: Path) -> None:
    lines = emulator_lines(sim)
    # The MDS's key listed for it, and revoked for every host: revoked wins.
    path = tmp_path / "known_hosts"
    path.write_text("\n".join([*lines, f"@revoked * {key_of(lines, MDS_ADDRESS)}"]) + "\n")
    before = accepted(sim)
    with pytest.raises(
        NodeAccessDeniedError, match=rf"revoked \(@revoked, known_hosts line {len(lines) + 1}\)"
    ):
        shell_with(sim, pools, path, MDS, MDS_ADDRESS).run(["hostid"])
    assert accepted(sim) == before + 1  # one handshake, no retry
    assert shell_with(sim, pools, path, OSS, OSS_ADDRESS).run(["hostid"]).status == 0


def test_a_cert_authority_line_is_reported_as_unsupported(
    sim: Sim, pools: list[SshPool], tmp_path: Path
) -> None:
    lines = emulator_lines(sim)
    others = [ln for ln in lines if not ln.startswith(f"[{MDS_ADDRESS}]")]
    ca = paramiko.ECDSAKey.generate()
    path = tmp_path / "known_hosts"
    path.write_text(
        "\n".join([f"@cert-authority *.lustre {ca.get_name()} {ca.get_base64()}", *others]) + "\n"
    )
    with pytest.raises(
        NodeAccessDeniedError,
        match=r"not found in known_hosts \(@cert-authority on line 1 is not supported",
    ):
        shell_with(sim, pools, path, MDS, MDS_ADDRESS).run(["hostid"])
    assert shell_with(sim, pools, path, OSS, OSS_ADDRESS).run(["hostid"]).status == 0
