"""Chaos harness: seeded fault mixes, SIGKILL + resume, outside interference and a second
orchestrator against ``amlfs-sim serve``, each cluster judged from the emulator's ground truth.

Not a test: prints a table per scenario and a final ``key=value`` line, and exits 1 when any
invariant is violated. The orchestrator runs as an operator runs it, ``amlfs run-fleet`` (or
``amlfs upgrade-cluster``) in its own process against a Prefect server; what it *claims* is
read from its fleet record (``STATE_DIR/fleet-runs/RUN.json``) or its output. What is *true*
is read only from the emulator: ``GET /_sim/state`` (VMs, OS disks and images, data disks,
leaked disks, customer view, evictions) and ``GET /_sim/nodes`` (each node's firewall rules,
tunables, services, HSM coordinator), compared with a baseline recorded before the run.

Scenarios (each case seeded; the same seed makes the same faults, moments and kills):

* ``mix``: a random mix of ARM faults (fail, throttle, slow, hang that Azure ends late),
  SSH refusals and dropped sessions, boot crashes, bad images and stuck recovery, some posted
  before the run and some at seeded moments during it; in some seeds also an OS disk swap
  (a VM update) that Azure never finishes (that cluster must end ``failed_needs_attention``,
  saying why).
* ``kill``: ``amlfs run-fleet`` SIGKILLed a seeded delay after a moment of the timeline (odd
  seeds: an OS disk swapped back during a rollback that a bad image forces), in half of the
  seeds the resumed run too, then the same command again until it exits.
* ``interfere``: someone else powers a VM off through ARM, or deletes a fresh unattached OS
  disk, while its cluster is being upgraded.
* ``concurrent``: two orchestrators on one cluster, a seeded moment apart: two ``run-fleet``
  sharing a state directory, two with their own, ``run-fleet`` + ``upgrade-cluster``.

Invariants per cluster (``judge``): every VM running and its node up; every node on one
release (OS disk image and Lustre version agree); serving; not suspended (no server drops
TCP 988, ``timeout``, ``at_max`` and the recovery windows as before the run or as the release
sets them, HSM coordinator enabled, every service active); the release's files only on an
upgraded node; 0 evictions; 0 data-disk changes; 0 leaked disks; and the outcome claimed is
the truth: ``upgraded``/``already_current`` only on the release and healthy, ``rolled_back``
and "not started" only on the old release and healthy, ``failed_needs_attention`` with a
reason, and honest only where the harness injected a fault the world cannot recover from and
the cluster indeed is not working (what is left wrong is then counted apart, not as a
violation); elsewhere it is ``gave_up`` (left broken) or ``false_alarm`` (working). A cluster
claimed fine but broken is also counted as ``broken_reported_ok``, the worst case.

    .venv/bin/python bench/chaos.py [--scenario mix --scenario kill ...] [--seeds 5]
        [--clusters 12] [--time-scale 30] [--keep WORKDIR]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fnmatch
import functools
import json
import os
import random
import re
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
RELEASE_FILE = REPO / "examples" / "release-2.15.6.yaml"
SMALL_FLEET = REPO / "examples" / "fleet-small.yaml"
OK_OUTCOMES = ("upgraded", "already_current", "rolled_back")
NOT_STARTED = "not_started"
REFUSED = "refused"  # no record, the output says another orchestrator holds the cluster
# Outcomes that say "not mine to touch now" (another orchestrator holds it): about the
# orchestrator, not the cluster.
REFUSALS = (REFUSED, "busy")
SERVER_ROLES = ("mds", "oss")

__all__ = [
    "Baseline",
    "CaseResult",
    "Claim",
    "Control",
    "Harness",
    "Verdict",
    "Violation",
    "claims_from_output",
    "claims_from_record",
    "judge",
    "record_baseline",
]


# ---------------------------------------------------------------------------- the world


class Control:
    """The emulator's control API (no ARM auth): ground truth, timeline, faults, reset."""

    def __init__(self, control_url: str, ca_file: str, *, timeout_s: float = 30.0) -> None:
        self.http = httpx.Client(
            base_url=control_url,
            verify=ssl.create_default_context(cafile=ca_file),
            timeout=timeout_s,
        )

    @classmethod
    def from_endpoint(cls, endpoint_file: Path) -> Control:
        info = json.loads(endpoint_file.read_text())
        return cls(str(info["control_url"]), str(info["ca_file"]))

    def _get(self, path: str, **params: Any) -> dict[str, Any]:
        response = self.http.get(path, params=params)
        response.raise_for_status()
        data = response.json()
        assert isinstance(data, dict)
        return data

    def state(self) -> dict[str, Any]:
        return self._get("/state")

    def nodes(self) -> dict[str, Any]:
        return self._get("/nodes")

    def events(self, since: int = 0) -> list[dict[str, Any]]:
        events = self._get("/timeline", since=since, operations="false")["events"]
        assert isinstance(events, list)
        return events

    def fault(self, spec: Mapping[str, Any]) -> None:
        self.http.post("/faults", json=dict(spec)).raise_for_status()

    def clear_faults(self) -> None:
        self.http.delete("/faults").raise_for_status()

    def reset(self) -> None:
        self.http.post("/reset").raise_for_status()

    def close(self) -> None:
        self.http.close()


@dataclass
class World:
    """An ``amlfs-sim serve`` process and what the harness needs to drive and judge it."""

    proc: subprocess.Popen[bytes]
    endpoint_file: Path
    endpoint: dict[str, Any]
    control: Control
    fleet_file: Path
    fleet: dict[str, Any]
    time_scale: float

    @property
    def clusters(self) -> list[str]:
        return [str(c["name"]) for c in self.fleet["clusters"]]

    def cluster(self, name: str) -> dict[str, Any]:
        return next(c for c in self.fleet["clusters"] if c["name"] == name)

    def vms(self, cluster: str) -> list[str]:
        return [str(n["name"]) for n in self.cluster(cluster)["nodes"]]

    def role(self, vm: str) -> str | None:
        for cluster in self.fleet["clusters"]:
            for node in cluster["nodes"]:
                if node["name"] == vm:
                    return str(node["role"])
        return None

    def owns(self, cluster: str, event: Mapping[str, Any]) -> bool:
        """Whether an event is about ``cluster``: named, or a VM or OS disk of it (disks are
        named after their VM)."""
        if event.get("cluster") == cluster:
            return True
        subject = str(event.get("vm") or event.get("disk") or event.get("target") or "")
        return any(subject == vm or subject.startswith(f"{vm}-") for vm in self.vms(cluster))

    def real(self, sim_s: float) -> float:
        return sim_s / self.time_scale

    def stop(self) -> None:
        self.control.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment of every child: this checkout first on the path (a snapshot of the product
    is judged as it is), wide rich output (claims are parsed from it), quiet Prefect."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.update(
        {
            "COLUMNS": "400",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOGGING_LEVEL": "WARNING",
        }
    )
    env.update(extra or {})
    return env


def start_world(
    fleet_file: Path, workdir: Path, *, time_scale: float, seed: int, timeout_s: float = 120
) -> World:
    sim_dir = workdir / "sim"
    endpoint_file = sim_dir / "endpoint.json"
    log_path = workdir / "sim.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "amlfs_sim.cli",
                "serve",
                "--fleet",
                str(fleet_file),
                "--state-dir",
                str(sim_dir),
                "--time-scale",
                str(time_scale),
                "--seed",
                str(seed),
            ],
            cwd=REPO,
            env=child_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout_s
    while not endpoint_file.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"amlfs-sim serve exited {proc.returncode}: {_tail(log_path)}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            raise RuntimeError(
                f"amlfs-sim serve wrote no {endpoint_file} in {timeout_s:.0f} s: {_tail(log_path)}"
            )
        time.sleep(0.1)
    endpoint = json.loads(endpoint_file.read_text())
    fleet = yaml.safe_load(fleet_file.read_text())
    return World(
        proc,
        endpoint_file,
        endpoint,
        Control(str(endpoint["control_url"]), str(endpoint["ca_file"])),
        fleet_file,
        fleet,
        time_scale,
    )


def generated_fleet(path: Path, clusters: int, release_image: str) -> Path:
    """``clusters`` x 6 VMs (mds, 2 oss, 2 HSM agents, a client), all in one wave so that every
    cluster is admitted at once whatever happens to the first ones."""
    from amlfs_sim.genfleet import dump_fleet_yaml, generate_fleet

    data = generate_fleet(clusters, 6, waves=("wave1",))
    base = release_image.rsplit("/", 1)[0]
    data["emulator"] = {
        "initial_image": f"{base}/2.15.5",
        "images": [
            {"id": f"{base}/2.15.5", "lustre_version": "2.15.5"},
            {"id": release_image, "lustre_version": "2.15.6"},
        ],
    }
    path.write_text(dump_fleet_yaml(data))
    return path


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ---------------------------------------------------------------------------- orchestrators


@dataclass
class Orchestrator:
    """One ``amlfs`` command in its own session (SIGKILL takes its whole process group)."""

    label: str
    argv: list[str]
    log_path: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    kills: int = 0
    started_at: float = 0.0

    def start(self) -> Orchestrator:
        with self.log_path.open("ab") as log:
            log.write(f"\n=== {self.label}: {' '.join(self.argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "amlfs_cli", *self.argv],
                cwd=REPO,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.started_at = time.monotonic()
        return self

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.kills += 1

    def wait(self, timeout_s: float) -> int | None:
        """The exit code, or None after killing it when it ran longer than ``timeout_s``."""
        assert self.proc is not None
        try:
            return self.proc.wait(
                timeout=max(0.0, timeout_s - (time.monotonic() - self.started_at))
            )
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


def fleet_argv(world: World, clusters: Sequence[str], run_name: str, state_dir: Path) -> list[str]:
    picked = [arg for name in clusters for arg in ("--cluster", name)]
    n = str(max(1, len(clusters)))
    return [
        "run-fleet",
        "--fleet",
        str(world.fleet_file),
        "--release",
        str(RELEASE_FILE),
        "--endpoint",
        str(world.endpoint_file),
        *picked,
        "--hotfix-reason",
        "chaos",
        "--run-name",
        run_name,
        "--state-dir",
        str(state_dir),
        "--max-parallel",
        n,
        "--max-per-subscription",
        n,
        "--max-per-region",
        n,
    ]


def cluster_argv(world: World, cluster: str, state_dir: Path) -> list[str]:
    return [
        "upgrade-cluster",
        "--fleet",
        str(world.fleet_file),
        "--cluster",
        cluster,
        "--release",
        str(RELEASE_FILE),
        "--endpoint",
        str(world.endpoint_file),
        "--state-dir",
        str(state_dir),
    ]


# ---------------------------------------------------------------------------- claims


@dataclass(frozen=True)
class Claim:
    """What one orchestrator said about one cluster (None outcome: it said nothing)."""

    cluster: str
    outcome: str | None
    reason: str
    source: str


def claims_from_record(
    state_dir: Path,
    run_name: str,
    clusters: Sequence[str],
    source: str | None = None,
    output: str = "",
) -> dict[str, Claim]:
    """Per selected cluster, what the fleet record says: an outcome, not started, or nothing
    (or, from the run's ``output``, that it refused)."""
    path = state_dir / "fleet-runs" / f"{run_name}.json"
    label = source or f"run {run_name}"
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        record = {}
    results = record.get("results") or {}
    not_started = record.get("not_started") or {}
    out = {}
    for name in clusters:
        if name in results:
            result = results[name]
            out[name] = Claim(
                name, str(result.get("outcome")), str(result.get("reason") or ""), label
            )
        elif name in not_started:
            out[name] = Claim(name, NOT_STARTED, str(not_started[name]), label)
        else:
            out[name] = refusal(output, name, label)
    return out


_RESULT_LINE = re.compile(r"^(\S+): (\w+) \S* -> \S*(?:\s+reason: (.*))?$")
_REFUSAL = re.compile(r"\blease\b|\bheld by\b|another orchestrator", re.IGNORECASE)


def claims_from_output(output: str, cluster: str, source: str) -> Claim:
    """``amlfs upgrade-cluster`` prints ``CLUSTER: OUTCOME BEFORE -> AFTER  reason: ...``."""
    for line in reversed(output.splitlines()):
        match = _RESULT_LINE.match(line.strip())
        if match and match.group(1) == cluster:
            return Claim(cluster, match.group(2), (match.group(3) or "").strip(), source)
    return refusal(output, cluster, source)


def refusal(output: str, cluster: str, source: str) -> Claim:
    """An orchestrator that recorded nothing may have refused (another one holds the
    cluster): that is a claim about itself, not about the cluster. Else it said nothing."""
    for line in output.splitlines():
        if _REFUSAL.search(line) and not line.startswith("=== "):  # not the harness's header
            return Claim(cluster, REFUSED, line.strip(" │\t")[:200], source)
    return Claim(cluster, None, "", source)


# ---------------------------------------------------------------------------- judging


@dataclass(frozen=True)
class Violation:
    cluster: str
    invariant: str
    detail: str

    def __str__(self) -> str:
        return f"{self.invariant}: {self.detail}"

    def short(self, width: int = 90) -> str:
        detail = self.detail if len(self.detail) <= width else self.detail[: width - 1] + "…"
        return f"{self.invariant}: {detail}"


@dataclass(frozen=True)
class Baseline:
    """The world before a run: what every cluster must be back to (or be upgraded from)."""

    images: dict[str, str]  # VM -> OS image id
    versions: dict[str, str]  # cluster -> Lustre version
    nodes: dict[str, dict[str, Any]]  # cluster -> node -> its truth (params, services, rules)
    release_image: str
    release_version: str
    release_tunables: dict[str, str]
    release_files: dict[str, list[str]]  # role -> paths the release brings


def _load_release(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict)
    return data


def record_baseline(control: Control, release_file: Path = RELEASE_FILE) -> Baseline:
    """Read before the run: tunables, services and rules as they are, the OS image of every VM."""
    state, nodes = control.state(), control.nodes()["clusters"]
    release = _load_release(release_file)
    versions = {}
    for name, view in state["clusters"].items():
        found = set(view["lustre_versions"])
        if len(found) != 1:
            raise RuntimeError(f"{name} is not on one release before the run: {sorted(found)}")
        versions[name] = found.pop()
    roles = ("mds", "oss", "agtpri", "agtstd", "lclient")
    return Baseline(
        images={vm["name"]: vm["os_image"] for vm in state["vms"]},
        versions=versions,
        nodes={name: view["nodes"] for name, view in nodes.items()},
        release_image=str(release["image_id"]),
        release_version=str(release.get("lustre_version") or release["version"]),
        release_tunables={str(k): str(v) for k, v in (release.get("tunables") or {}).items()},
        release_files={
            role: [
                str(f["path"]) for f in release.get("files") or [] if role in f.get("roles", roles)
            ]
            for role in roles
        },
    )


@dataclass
class Verdict:
    """One cluster after a case: the claims, the truth, and what is wrong."""

    cluster: str
    claims: list[Claim]
    release: str  # "old", "new" or "mixed"
    version: str  # what the nodes run, e.g. "2.15.6" or "2.15.5+2.15.6"
    problems: list[Violation]  # what is wrong in the world, whoever says what
    violations: list[Violation]
    honest: bool  # reported failed_needs_attention with a reason, and the world is broken
    broken_reported_ok: bool
    evictions: int
    leaked: int
    data_disk_changes: int
    notes: list[str] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return not self.problems

    def truth(self) -> str:
        return f"{self.version} {'healthy' if self.healthy else 'BROKEN'}"


def judge(
    control: Control,
    claims: Mapping[str, Sequence[Claim]],
    baseline: Baseline,
    unrecoverable: Collection[str] = (),
) -> list[Verdict]:
    """Judge every cluster in ``claims`` from the emulator alone; the claims only get checked.

    ``unrecoverable``: clusters given a fault the world cannot recover from (the harness
    knows what it injected), where ``failed_needs_attention`` with a reason is the honest end.
    """
    state, nodes = control.state(), control.nodes()["clusters"]
    groups = {
        (vm["id"].split("/")[2].lower(), vm["id"].split("/")[4].lower()): vm["cluster"]
        for vm in state["vms"]
    }
    leaked_by_cluster: Counter[str] = Counter()
    leaked_names: dict[str, list[str]] = {}
    leaked = set(state["leaked_disks"])
    for disk in state["disks"]:
        if disk["name"] in leaked:
            parts = disk["id"].split("/")
            owner = groups.get((parts[2].lower(), parts[4].lower()), "?")
            leaked_by_cluster[owner] += 1
            leaked_names.setdefault(owner, []).append(disk["name"])
    verdicts = []
    for cluster, said in claims.items():
        vms = [vm for vm in state["vms"] if vm["cluster"] == cluster]
        view = state["clusters"][cluster]
        truth_nodes = nodes[cluster]
        changes = [c for c in state["data_disk_changes"] if c.get("cluster") == cluster]
        truth = _cluster_truth(
            cluster, vms, view, truth_nodes, baseline, leaked_names.get(cluster, []), changes
        )
        verdicts.append(
            _verdict(
                cluster,
                list(said),
                truth,
                cluster in unrecoverable,
                view,
                changes,
                leaked_by_cluster,
            )
        )
    return verdicts


def _cluster_truth(
    cluster: str,
    vms: list[dict[str, Any]],
    view: dict[str, Any],
    truth: dict[str, Any],
    baseline: Baseline,
    leaked: list[str],
    changes: list[dict[str, Any]],
) -> tuple[str, str, list[Violation]]:
    problems: list[Violation] = []

    def bad(invariant: str, detail: str) -> None:
        problems.append(Violation(cluster, invariant, detail))

    old_version = baseline.versions[cluster]
    for vm in vms:
        if vm["power_state"] != "running" or vm["busy"]:
            bad(
                "vm_not_running",
                f"{vm['name']} is {vm['power_state']}" + (" (busy)" if vm["busy"] else ""),
            )
    node_state = truth["nodes"]
    for name, node in node_state.items():
        if not node["up"] or node["crashed"]:
            bad("node_down", f"{name} {'crashed' if node['crashed'] else 'not booted'}")
            continue
        if not node["modules_loaded"]:
            bad("node_down", f"{name}: Lustre modules not loaded")
        before = baseline.nodes[cluster][name]
        down = [
            s for s, st in node["services"].items() if st != before["services"].get(s, "active")
        ]
        if down:
            states = ", ".join(f"{s} {node['services'][s]}" for s in down)
            bad("service_down", f"{name}: {states}")
    images = {vm["name"]: vm["os_image"] for vm in vms}
    versions = {n["lustre_version"] for n in node_state.values() if n["up"]}
    if all(i.lower() == baseline.release_image.lower() for i in images.values()) and versions <= {
        baseline.release_version
    }:
        release, version = "new", baseline.release_version
    elif all(images[vm] == baseline.images[vm] for vm in images) and versions <= {old_version}:
        release, version = "old", old_version
    else:
        release = "mixed"
        version = "+".join(sorted(versions)) or "?"
        on_new = sorted(
            vm for vm, i in images.items() if i.lower() == baseline.release_image.lower()
        )
        bad(
            "mixed_release",
            f"Lustre {sorted(versions)}; on the release image: {on_new or 'none'} of {len(images)} VMs",
        )
    if not view["serving"]:
        pending = [
            f"{t['target']} {t['recovery'] if t['mounted'] else 'unmounted'}"
            for t in view["targets"]
            if t["recovery"] != "COMPLETE" or not t["mounted"]
        ]
        bad(
            "not_serving",
            f"{view['clients_blocked']} clients blocked; "
            + (", ".join(pending) or "targets unreachable"),
        )
    for name, node in node_state.items():
        before = baseline.nodes[cluster][name]
        if node["role"] in SERVER_ROLES and node["drops_client_traffic"]:
            bad("firewall_left", f"{name} drops client TCP 988: {node['iptables']}")
        elif node["up"] and node["iptables"] != before["iptables"]:
            bad(
                "firewall_left",
                f"{name} iptables {node['iptables']} (before: {before['iptables']})",
            )
        if not node["up"]:
            continue
        for param, value in node["params"].items():
            if param.endswith(".hsm_control"):
                continue
            expected = before["params"].get(param)
            from_release = False
            if release == "new":
                for pattern, setting in baseline.release_tunables.items():
                    if fnmatch.fnmatchcase(param, pattern):
                        expected, from_release = setting, True
            if value != expected:
                code = (
                    "release_tunable"
                    if from_release or _release_sets(baseline, param)
                    else "tunable_left"
                )
                bad(code, f"{name} {param}={value} (expected {expected})")
        files = set(node["config_files"])
        wanted = set(baseline.release_files.get(node["role"], []))
        if release == "new" and wanted - files:
            bad("release_files", f"{name} lacks {sorted(wanted - files)}")
        if release == "old" and wanted & files:
            bad("release_files", f"{name} still has the release's {sorted(wanted & files)}")
    hsm = truth["hsm_control"]
    if hsm != "enabled":
        bad("hsm_disabled", f"HSM coordinator {hsm or 'unknown (MDS down)'}")
    if float(truth["timeout"]) != float(baseline.nodes[cluster][_mds(truth)]["params"]["timeout"]):
        bad("tunable_left", f"clients run with timeout {truth['timeout']:g}")
    if view["evictions"]:
        bad("eviction", f"{view['evictions']} evicted: {view['eviction_log'][:2]}")
    if leaked:
        bad("leaked_disk", f"{len(leaked)} unattached, not kept: {leaked[:3]}")
    if changes:
        bad("data_disk_change", f"{len(changes)}: {changes[:2]}")
    return release, version, _one_per_invariant(problems)


def _one_per_invariant(problems: list[Violation]) -> list[Violation]:
    """A cluster breaks an invariant once, however many nodes or parameters show it."""
    details: dict[str, list[str]] = {}
    for problem in problems:
        details.setdefault(problem.invariant, []).append(problem.detail)
    return [
        Violation(problems[0].cluster, invariant, "; ".join(found))
        for invariant, found in details.items()
    ]


def _mds(truth: dict[str, Any]) -> str:
    return next(str(name) for name, node in truth["nodes"].items() if node["role"] == "mds")


def _release_sets(baseline: Baseline, param: str) -> bool:
    return any(fnmatch.fnmatchcase(param, p) for p in baseline.release_tunables)


def _verdict(
    cluster: str,
    claims: list[Claim],
    truth: tuple[str, str, list[Violation]],
    unrecoverable: bool,
    view: dict[str, Any],
    changes: list[dict[str, Any]],
    leaked: Counter[str],
) -> Verdict:
    """Check each claim against the truth. ``failed_needs_attention`` with a reason is honest
    only where the world could not be recovered (``unrecoverable``: the harness injected such a
    fault) and the cluster is indeed not working; with the cluster left broken elsewhere, the
    product gave up on a world it could have brought back; with the cluster working, the
    claim is a false alarm. A refusal because another orchestrator holds the cluster is no
    claim about the cluster."""
    release, version, problems = truth
    violations: list[Violation] = []
    healthy = not problems
    state = f"{version} {'healthy' if healthy else 'broken'}"
    broken_ok = honest = False
    for claim in claims:
        outcome = claim.outcome
        said = f"{claim.source} says {outcome}"
        expected = {"upgraded": "new", "already_current": "new", "rolled_back": "old"}
        expected[NOT_STARTED] = "old"
        if outcome is None:
            violations.append(Violation(cluster, "unreported", f"{claim.source} recorded nothing"))
        elif outcome in REFUSALS:
            pass  # about the orchestrator itself: the world is judged all the same
        elif outcome in expected:
            if release != expected[outcome] or not healthy:
                violations.append(Violation(cluster, "claim_mismatch", f"{said}; truth {state}"))
                broken_ok = broken_ok or not healthy
        elif not claim.reason.strip():
            violations.append(Violation(cluster, "no_reason", f"{said} without a reason"))
        elif _REFUSAL.search(claim.reason):
            pass  # it refused because another orchestrator holds the cluster
        elif healthy:
            violations.append(Violation(cluster, "false_alarm", f"{said}; truth {state}"))
        elif unrecoverable:
            honest = True
        else:
            violations.append(
                Violation(cluster, "gave_up", f"{said} on a recoverable world; truth {state}")
            )
    # A cluster honestly reported as needing attention is not a silent breakage: what is left
    # wrong is the report's content. Customer data is never excused.
    excused = honest and not broken_ok
    for problem in problems:
        if problem.invariant == "data_disk_change" or not excused:
            violations.append(problem)
    return Verdict(
        cluster,
        claims,
        release,
        version,
        problems,
        violations,
        honest=excused,
        broken_reported_ok=broken_ok,
        evictions=int(view["evictions"]),
        leaked=leaked.get(cluster, 0),
        data_disk_changes=len(changes),
    )


# ---------------------------------------------------------------------------- cases


@dataclass
class CaseResult:
    scenario: str
    seed: int
    label: str
    verdicts: list[Verdict]
    run_violations: list[Violation]  # about the orchestrator processes, not one cluster
    wall_s: float
    actions: list[str]

    @property
    def violations(self) -> list[Violation]:
        return self.run_violations + [v for verdict in self.verdicts for v in verdict.violations]


class Harness:
    """Runs cases against one world, each from a reset and a fresh baseline."""

    def __init__(
        self,
        world: World,
        workdir: Path,
        prefect_env: Mapping[str, str],
        *,
        run_timeout_s: float = 600.0,
        settle_sim_s: float = 200.0,
    ) -> None:
        self.world = world
        self.workdir = workdir
        self.env = child_env(prefect_env)
        self.run_timeout_s = run_timeout_s
        self.settle_sim_s = settle_sim_s

    # -------------------------------------------------------------- plumbing

    def _begin(self, label: str) -> tuple[Path, Baseline, int]:
        control = self.world.control
        control.reset()
        control.clear_faults()
        case_dir = self.workdir / label
        case_dir.mkdir(parents=True, exist_ok=True)
        baseline = record_baseline(control)
        events = control.events()
        return case_dir, baseline, max((e["seq"] for e in events), default=0)

    def orchestrator(self, case_dir: Path, label: str, argv: list[str]) -> Orchestrator:
        return Orchestrator(label, argv, case_dir / f"{label}.log", self.env)

    def wait_event(
        self,
        match: Callable[[dict[str, Any]], bool],
        since: int,
        alive: Callable[[], bool],
        timeout_s: float,
    ) -> dict[str, Any] | None:
        """The first event after ``since`` that matches; None when ``alive()`` turns false or
        ``timeout_s`` (real) passes first."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for event in self.world.control.events(since):
                if match(event):
                    return event
                since = max(since, int(event["seq"]))
            if not alive():
                return None
            time.sleep(0.1)
        return None

    def _finish(
        self,
        scenario: str,
        seed: int,
        label: str,
        started: float,
        baseline: Baseline,
        claims: Mapping[str, Sequence[Claim]],
        runs: Sequence[tuple[Orchestrator, int | None]],
        actions: list[str],
        unrecoverable: Collection[str] = (),
    ) -> CaseResult:
        control = self.world.control
        control.clear_faults()
        # Let sim time run on: a server left firewalled evicts its clients 1.5 x timeout later.
        time.sleep(self.world.real(self.settle_sim_s))
        verdicts = judge(control, claims, baseline, unrecoverable)
        for verdict in verdicts:
            if verdict.cluster in unrecoverable:
                verdict.notes.append("given a fault it cannot recover from")
        run_violations = []
        for orch, code in runs:
            if code is None:
                run_violations.append(
                    Violation(
                        "-",
                        "orchestrator_hung",
                        f"{orch.label} still running after {self.run_timeout_s:.0f} s: killed",
                    )
                )
        return CaseResult(
            scenario, seed, label, verdicts, run_violations, time.monotonic() - started, actions
        )

    # -------------------------------------------------------------- scenarios

    def mix(self, seed: int, clusters: Sequence[str] | None = None) -> CaseResult:
        started = time.monotonic()
        label = f"mix-{seed}"
        case_dir, baseline, since = self._begin(label)
        names = list(clusters or self.world.clusters)
        rng = random.Random(f"mix:{seed}")
        before, during, unrecoverable = fault_mix(rng, self.world, names)
        actions = [f"before: {_describe(f)}" for f in before]
        for spec in before:
            self.world.control.fault(spec)
        orch = self.orchestrator(
            case_dir, "run-fleet", fleet_argv(self.world, names, label, case_dir / "state")
        )
        orch.start()
        poster = threading.Thread(
            target=self._post_during, args=(during, since, orch, actions), daemon=True
        )
        poster.start()
        code = orch.wait(self.run_timeout_s)
        poster.join(timeout=30)
        claims = claims_from_record(case_dir / "state", label, names, output=orch.output())
        return self._finish(
            "mix",
            seed,
            label,
            started,
            baseline,
            {n: [claims[n]] for n in names},
            [(orch, code)],
            actions,
            unrecoverable,
        )

    def _post_during(
        self,
        during: list[tuple[float, dict[str, Any]]],
        since: int,
        orch: Orchestrator,
        actions: list[str],
    ) -> None:
        """Post each fault its seeded sim time after the run's first ARM operation."""
        if not during:
            return
        first = self.wait_event(
            lambda e: e["type"] == "operation.started",
            since,
            orch.is_running,
            self.run_timeout_s,
        )
        if first is None:
            return
        t0 = time.monotonic()
        for offset, spec in sorted(during, key=lambda item: item[0]):
            delay = self.world.real(offset) - (time.monotonic() - t0)
            if delay > 0:
                time.sleep(delay)
            if not orch.is_running():
                actions.append(f"not posted, the run had ended: {_describe(spec)}")
                continue
            self.world.control.fault(spec)
            actions.append(f"at +{offset:.0f} s: {_describe(spec)}")

    def kill(
        self,
        seed: int,
        moments: Sequence[str] | None = None,
        clusters: Sequence[str] | None = None,
    ) -> CaseResult:
        """SIGKILL run-fleet at each of ``moments`` in turn (a seeded delay after the first
        such event of that run, see ``KILL_MOMENTS``), each time starting the same command
        again, then let the last one finish. By default odd seeds kill during a rollback (a
        bad image on one server forces it), even seeds at a random moment, and half of them
        kill the resumed run too."""
        started = time.monotonic()
        label = f"kill-{seed}"
        case_dir, baseline, since = self._begin(label)
        names = list(clusters or self.world.clusters)
        rng = random.Random(f"kill:{seed}")
        forward = [m for m in KILL_MOMENTS if m != "swap-back"]
        if moments is None:
            first = "swap-back" if seed % 2 else rng.choice(forward)
            moments = [first] + ([rng.choice(list(KILL_MOMENTS))] if rng.random() < 0.5 else [])
        actions: list[str] = []
        if moments and moments[0] == "swap-back":
            victim = rng.choice(names)
            servers = [v for v in self.world.vms(victim) if "-oss" in v or "-mds" in v]
            spec = _fault("node.boot", rng.choice(servers), "fail", code="BadImage", count=1)
            self.world.control.fault(spec)
            actions.append(f"before: {_describe(spec)} (forces a rollback of {victim})")
        argv = fleet_argv(self.world, names, label, case_dir / "state")
        runs: list[tuple[Orchestrator, int | None]] = []
        for attempt in range(len(moments) + 1):
            mark = max((e["seq"] for e in self.world.control.events(since)), default=since)
            orch = self.orchestrator(case_dir, f"run-fleet-{attempt}", argv).start()
            if attempt == len(moments):
                code = orch.wait(self.run_timeout_s)
                runs.append((orch, code))
                actions.append(f"run {attempt}: exited {code}")
                break
            description, match = KILL_MOMENTS[moments[attempt]]
            delay = rng.uniform(0, 45)
            event = self.wait_event(
                functools.partial(match, self.world, baseline),
                mark,
                orch.is_running,
                self.run_timeout_s,
            )
            if event is not None:
                time.sleep(self.world.real(delay))
            if not orch.is_running():
                actions.append(f"run {attempt} ended before {description}")
                runs.append((orch, orch.wait(self.run_timeout_s)))
                break
            orch.kill()
            actions.append(f"run {attempt}: SIGKILL {delay:.0f} s after {description}")
            runs.append((orch, 0))
        claims = claims_from_record(case_dir / "state", label, names, output=orch.output())
        return self._finish(
            "kill", seed, label, started, baseline, {n: [claims[n]] for n in names}, runs, actions
        )

    def interfere(self, seed: int, clusters: Sequence[str] | None = None) -> CaseResult:
        """Someone else powers a VM off (ARM powerOff) or deletes a fresh unattached OS disk
        while its cluster is being upgraded."""
        started = time.monotonic()
        label = f"interfere-{seed}"
        case_dir, baseline, since = self._begin(label)
        names = list(clusters or self.world.clusters)
        rng = random.Random(f"interfere:{seed}")
        orch = self.orchestrator(
            case_dir, "run-fleet", fleet_argv(self.world, names, label, case_dir / "state")
        )
        actions: list[str] = []
        plans = []
        for victim in rng.sample(names, k=min(len(names), 2)):
            kind = rng.choice(["power_off", "delete_disk"])
            vm = rng.choice(self.world.vms(victim))
            plans.append(
                (
                    victim,
                    vm,
                    kind,
                    rng.choice(["disk.created", "lustre.downtime_started", "vm.os_disk_swapped"]),
                    rng.uniform(0, 20),
                )
            )
        orch.start()
        workers = [
            threading.Thread(
                target=self._interfere_one, args=(plan, since, orch, actions), daemon=True
            )
            for plan in plans
        ]
        for worker in workers:
            worker.start()
        code = orch.wait(self.run_timeout_s)
        for worker in workers:
            worker.join(timeout=60)
        claims = claims_from_record(case_dir / "state", label, names, output=orch.output())
        return self._finish(
            "interfere",
            seed,
            label,
            started,
            baseline,
            {n: [claims[n]] for n in names},
            [(orch, code)],
            actions,
        )

    def _interfere_one(
        self,
        plan: tuple[str, str, str, str, float],
        since: int,
        orch: Orchestrator,
        actions: list[str],
    ) -> None:
        cluster, vm, kind, anchor, delay = plan
        spec = self.world.cluster(cluster)
        if kind == "delete_disk":
            event = self.wait_event(
                lambda e: e["type"] == "disk.created" and self.world.owns(cluster, e),
                since,
                orch.is_running,
                self.run_timeout_s,
            )
            if event is None:
                actions.append(f"{cluster}: no new disk to delete")
                return
            outcome = arm_delete_disk(self.world, spec, str(event["disk"]))
            actions.append(f"{cluster}: deleted new disk {event['disk']} ({outcome})")
            return
        event = self.wait_event(
            lambda e: e["type"] == anchor and self.world.owns(cluster, e),
            since,
            orch.is_running,
            self.run_timeout_s,
        )
        if event is None:
            actions.append(f"{cluster}: no {anchor} seen, nothing powered off")
            return
        time.sleep(self.world.real(delay))
        if not orch.is_running():
            return
        outcome = arm_power_off(self.world, spec, vm)
        actions.append(f"{cluster}: powered {vm} off {delay:.0f} s after {anchor} ({outcome})")

    def concurrent(self, seed: int, mode: str, cluster: str | None = None) -> CaseResult:
        """Two orchestrators on one cluster, the second started a seeded moment after the
        first: ``same-dir`` and ``two-dirs`` (two ``run-fleet``, sharing a state directory or
        each with its own), ``fleet-and-cluster`` (``run-fleet`` + ``upgrade-cluster``)."""
        started = time.monotonic()
        label = f"concurrent-{mode}-{seed}"
        case_dir, baseline, _ = self._begin(label)
        rng = random.Random(f"concurrent:{mode}:{seed}")
        name = cluster or rng.choice(self.world.clusters)
        first_dir = case_dir / "state-a"
        second_dir = (
            first_dir if mode in ("same-dir", "fleet-and-cluster") else case_dir / "state-b"
        )
        first = self.orchestrator(
            case_dir, "a", fleet_argv(self.world, [name], f"{label}-a", first_dir)
        )
        if mode == "fleet-and-cluster":
            second = self.orchestrator(case_dir, "b", cluster_argv(self.world, name, second_dir))
        else:
            second = self.orchestrator(
                case_dir, "b", fleet_argv(self.world, [name], f"{label}-b", second_dir)
            )
        # Both plan while the cluster is still untouched (an orchestrator takes ~5 real s to
        # start): the second must not find it "already on the release" and leave it alone.
        delay = rng.uniform(0, 150)
        first.start()
        time.sleep(self.world.real(delay))
        second.start()
        actions = [f"b ({mode}) started {delay:.0f} sim s after a, on {name}"]
        codes = [first.wait(self.run_timeout_s), second.wait(self.run_timeout_s)]
        claims = [
            claims_from_record(first_dir, f"{label}-a", [name], "a (run-fleet)", first.output())[
                name
            ],
            (
                claims_from_output(second.output(), name, "b (upgrade-cluster)")
                if mode == "fleet-and-cluster"
                else claims_from_record(
                    second_dir, f"{label}-b", [name], "b (run-fleet)", second.output()
                )[name]
            ),
        ]
        return self._finish(
            "concurrent",
            seed,
            label,
            started,
            baseline,
            {name: claims},
            list(zip([first, second], codes, strict=True)),
            actions,
        )


EventMatch = Callable[["World", "Baseline", Mapping[str, Any]], bool]


def _swap(to_release: bool, role: str | None = None) -> EventMatch:
    def match(world: World, baseline: Baseline, event: Mapping[str, Any]) -> bool:
        if event["type"] != "vm.os_disk_swapped":
            return False
        image = str(event.get("image", "")).lower()
        if (image == baseline.release_image.lower()) != to_release:
            return False
        return role is None or world.role(str(event.get("vm"))) == role

    return match


def _first(kind: str) -> EventMatch:
    return lambda world, baseline, event: event["type"] == kind


#: Where ``Harness.kill`` SIGKILLs a run: what the moment is, and the event that marks it.
KILL_MOMENTS: dict[str, tuple[str, EventMatch]] = {
    "arm": ("its first ARM operation", _first("operation.started")),
    "swap": ("the first OS disk swapped to the release", _swap(True)),
    "mds-swap": ("an MDS's OS disk swapped to the release", _swap(True, "mds")),
    "downtime": ("the first downtime started", _first("lustre.downtime_started")),
    "boot": ("the first node booted", _first("node.booted")),
    "swap-back": ("an OS disk swapped back to the old release", _swap(False)),
}


# ---------------------------------------------------------------------------- faults


def fault_mix(
    rng: random.Random, world: World, clusters: Sequence[str]
) -> tuple[list[dict[str, Any]], list[tuple[float, dict[str, Any]]], set[str]]:
    """A seeded mix: faults posted before the run, faults posted at a sim time into it, and
    the clusters given a fault the world cannot recover from (a VM update that never ends)."""
    before: list[dict[str, Any]] = []
    during: list[tuple[float, dict[str, Any]]] = []
    unrecoverable: set[str] = set()
    for _ in range(rng.randint(max(3, len(clusters) // 2), max(4, len(clusters)))):
        cluster = rng.choice(clusters)
        vm = rng.choice(world.vms(cluster))
        spec = _one_fault(rng, cluster, vm)
        if rng.random() < 0.35:
            during.append((rng.uniform(0, 400), spec))
        else:
            before.append(spec)
    if len(clusters) > 2 and rng.random() < 0.4:
        # The OS disk swap (one PUT on the running VM) that Azure never finishes: the VM stays
        # busy, so neither forward nor back is possible. (A start that never ends would do,
        # but the swap path starts no VM, only a rollback or a restart does.)
        cluster = rng.choice(clusters)
        vm = rng.choice([v for v in world.vms(cluster) if "-oss" in v])
        before.append(_fault("vm.put", vm, "hang", count=1))
        unrecoverable.add(cluster)
    return before, during, unrecoverable


def _fault(kind: str, target: str, mode: str, **options: Any) -> dict[str, Any]:
    return {"kind": kind, "target": target, "mode": mode, **options}


def _one_fault(rng: random.Random, cluster: str, vm: str) -> dict[str, Any]:
    # VMs are named after their cluster (generated fleets) or a short form of it (eus01-mds0).
    prefix = cluster if vm.startswith(f"{cluster}-") else vm.split("-")[0]
    every = f"{prefix}-*"
    vms = rng.choice([vm, every, f"{prefix}-oss*"])
    disks = rng.choice([f"{vm}-osdisk-*", every])
    n = rng.randint(1, 3)
    menu = [
        _fault("vm.put", vms, "fail", count=n),
        _fault("vm.put", vms, "throttle", retry_after_s=round(rng.uniform(5, 30)), count=n + 1),
        _fault("vm.start", vms, "fail", count=1),
        _fault("vm.start", vms, "slow", factor=round(rng.uniform(2, 4), 1), count=n),
        _fault("vm.start", vm, "hang", hang_s=round(rng.uniform(120, 600)), count=1),
        _fault("vm.power_off", vms, "fail", count=1),
        _fault("vm.power_off", vm, "hang", hang_s=round(rng.uniform(60, 400)), count=1),
        _fault("disk.create", disks, "fail", count=n),
        _fault("disk.create", disks, "slow", factor=round(rng.uniform(2, 5), 1), count=n),
        _fault("disk.delete", disks, "fail", count=n),
        _fault("operation.poll", vms, "fail", phase="accept", probability=rng.uniform(0.05, 0.2)),
        _fault("operation.poll", vms, "throttle", retry_after_s=rng.randint(2, 10), count=n + 2),
        _fault("node.ssh", every, "fail", probability=round(rng.uniform(0.02, 0.12), 3)),
        _fault("node.ssh", vm, "fail", count=rng.randint(1, 4)),
        _fault("node.ssh", every, "fail", phase="complete", probability=rng.uniform(0.02, 0.08)),
        _fault("node.boot", vm, "fail", count=1),
        _fault("node.boot", vm, "fail", code="BadImage", count=1),
        _fault("node.recovery", vm, "hang", count=1),
    ]
    return rng.choice(menu)


def _describe(spec: Mapping[str, Any]) -> str:
    keys = ("mode", "code", "count", "probability", "hang_s", "factor", "retry_after_s", "phase")
    extra = ", ".join(
        f"{k}={spec[k]:.2f}" if isinstance(spec[k], float) else f"{k}={spec[k]}"
        for k in keys
        if k in spec
    )
    return f"{spec['kind']} {spec['target']} ({extra})"


# ---------------------------------------------------------------------------- outside ARM calls


def _compute(world: World, subscription_id: str) -> Any:
    from azure.core.credentials import AccessToken
    from azure.mgmt.compute import ComputeManagementClient

    class _Token:
        def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
            return AccessToken("someone-else", int(time.time()) + 3600)

    return ComputeManagementClient(
        _Token(),
        subscription_id,
        base_url=str(world.endpoint["arm_url"]),
        connection_verify=str(world.endpoint["ca_file"]),
        credential_scopes=["https://management.azure.com/.default"],
        polling_interval=0,
    )


def arm_power_off(world: World, cluster: Mapping[str, Any], vm: str) -> str:
    """``powerOff`` through the real SDK, as another operator would; not waited for."""
    client = _compute(world, str(cluster["subscription_id"]))
    try:
        client.virtual_machines.begin_power_off(str(cluster["resource_group"]), vm)
        return "accepted"
    except Exception as err:  # a busy VM answers 409: still interference that was tried
        return f"refused: {type(err).__name__}"
    finally:
        client.close()


def arm_delete_disk(world: World, cluster: Mapping[str, Any], disk: str) -> str:
    client = _compute(world, str(cluster["subscription_id"]))
    try:
        client.disks.begin_delete(str(cluster["resource_group"]), disk)
        return "accepted"
    except Exception as err:
        return f"refused: {type(err).__name__}"
    finally:
        client.close()


# ---------------------------------------------------------------------------- Prefect


@contextlib.contextmanager
def prefect_server(workdir: Path, timeout_s: float = 120) -> Iterator[dict[str, str]]:
    """A ``prefect server`` (SQLite under ``workdir``) every orchestrator of the run talks to:
    one server instead of an ephemeral one per process (10-20 s each, orphaned by SIGKILL)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    home = workdir / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    env = child_env(
        {
            "PREFECT_HOME": str(home),
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
            "PREFECT_UI_ENABLED": "false",
        }
    )
    env.pop("PREFECT_API_URL", None)
    log_path = workdir / "prefect-server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "prefect",
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"prefect server did not answer in {timeout_s:.0f} s: {_tail(log_path)}"
                )
            time.sleep(0.5)
        yield {"PREFECT_API_URL": url, "PREFECT_HOME": str(home)}
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


# ---------------------------------------------------------------------------- report


def figures(results: Sequence[CaseResult]) -> dict[str, Any]:
    verdicts = [v for r in results for v in r.verdicts]
    violations = [v for r in results for v in r.violations]
    return {
        "scenarios": len({r.scenario for r in results}),
        "cases": len(results),
        "clusters": len(verdicts),
        "violations": len(violations),
        "clusters_violating": sum(1 for v in verdicts if v.violations),
        "clusters_broken": sum(1 for v in verdicts if not v.healthy),
        "broken_reported_ok": sum(1 for v in verdicts if v.broken_reported_ok),
        "unreported": sum(1 for v in violations if v.invariant == "unreported"),
        "evictions": sum(v.evictions for v in verdicts),
        "leaked": sum(v.leaked for v in verdicts),
        "data_disk_changes": sum(v.data_disk_changes for v in verdicts),
        "honest_failures": sum(1 for v in verdicts if v.honest),
        "refusals": sum(1 for v in verdicts for c in v.claims if c.outcome in REFUSALS),
        "hung_orchestrators": sum(1 for v in violations if v.invariant == "orchestrator_hung"),
        "by_invariant": dict(Counter(v.invariant for v in violations).most_common()),
    }


def print_scenario(console: Console, scenario: str, results: Sequence[CaseResult]) -> None:
    table = Table(title=f"chaos: {scenario}", show_lines=False)
    for column in ("case", "cluster", "claimed", "truth", "violations / notes"):
        table.add_column(column, overflow="fold")
    for result in results:
        for verdict in result.verdicts:
            claimed = "; ".join(
                f"{c.source}: {c.outcome or '(nothing)'}"
                if len(verdict.claims) > 1
                else (c.outcome or "(nothing)")
                for c in verdict.claims
            )
            if verdict.honest:
                notes = "honest: " + escape("; ".join(p.short() for p in verdict.problems))
            elif verdict.violations:
                notes = "[red]" + escape("; ".join(v.short() for v in verdict.violations)) + "[/]"
            else:
                notes = ""
            reason = next((c.reason for c in verdict.claims if c.reason), "")
            if reason:
                notes += f" [dim](reason: {escape(reason[:120])})[/]"
            notes += "".join(f" [dim]({escape(n)})[/]" for n in verdict.notes)
            table.add_row(result.label, verdict.cluster, claimed, verdict.truth(), notes)
        for violation in result.run_violations:
            table.add_row(result.label, "-", "", "", f"[red]{escape(str(violation))}[/]")
    console.print(table)
    for result in results:
        console.print(
            f"[dim]{result.label} ({result.wall_s:.0f} s): "
            + escape("; ".join(result.actions))
            + "[/]",
            highlight=False,
        )


def key_values(values: Mapping[str, Any]) -> str:
    flat = {k: v for k, v in values.items() if not isinstance(v, dict)}
    flat.update({f"v_{k}": v for k, v in values.get("by_invariant", {}).items()})
    return " ".join(f"{k}={v:.0f}" if isinstance(v, float) else f"{k}={v}" for k, v in flat.items())


# ---------------------------------------------------------------------------- main


SCENARIOS = ("mix", "kill", "interfere", "concurrent")
CONCURRENT_MODES = ("same-dir", "two-dirs", "fleet-and-cluster")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", action="append", choices=SCENARIOS, help="default: all")
    parser.add_argument("--seeds", type=int, default=5, help="seeds of mix and kill (default 5)")
    parser.add_argument("--first-seed", type=int, default=1)
    parser.add_argument("--interfere-seeds", type=int, default=2)
    parser.add_argument("--concurrent-seeds", type=int, default=1, help="per concurrent mode")
    parser.add_argument("--clusters", type=int, default=12, help="generated fleet (0: fleet-small)")
    parser.add_argument("--time-scale", type=float, default=30.0)
    parser.add_argument("--run-timeout", type=float, default=900.0, help="real s per orchestrator")
    parser.add_argument(
        "--settle", type=float, default=200.0, help="sim s run after the orchestrators"
    )
    parser.add_argument("--keep", type=Path, help="keep logs and state dirs here")
    parser.add_argument("--rev", help="what is judged, for the header (default: git HEAD)")
    args = parser.parse_args()
    scenarios = args.scenario or list(SCENARIOS)
    console = Console(width=None if sys.stdout.isatty() else 200)
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    started = time.monotonic()
    rev = (
        args.rev
        or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    )
    with contextlib.ExitStack() as stack:
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            workdir = args.keep
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="chaos-")))
        prefect_env = stack.enter_context(prefect_server(workdir))
        release_image = str(_load_release(RELEASE_FILE)["image_id"])
        fleet_file = (
            generated_fleet(workdir / "fleet.yaml", args.clusters, release_image)
            if args.clusters
            else SMALL_FLEET
        )
        world = start_world(fleet_file, workdir, time_scale=args.time_scale, seed=args.first_seed)
        stack.callback(world.stop)
        harness = Harness(
            world,
            workdir,
            prefect_env,
            run_timeout_s=args.run_timeout,
            settle_sim_s=args.settle,
        )
        console.print(
            f"chaos: {len(world.clusters)} clusters x 6 VMs, time scale {args.time_scale:g}, "
            f"rev {rev or '?'}, {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, work dir {workdir}",
            highlight=False,
        )
        plans: list[Callable[[], CaseResult]] = []
        if "mix" in scenarios:
            plans += [functools.partial(harness.mix, s) for s in seeds]
        if "kill" in scenarios:
            plans += [functools.partial(harness.kill, s) for s in seeds]
        if "interfere" in scenarios:
            extra = range(args.first_seed, args.first_seed + args.interfere_seeds)
            plans += [functools.partial(harness.interfere, s) for s in extra]
        if "concurrent" in scenarios:
            extra = range(args.first_seed, args.first_seed + args.concurrent_seeds)
            plans += [
                functools.partial(harness.concurrent, s, m) for m in CONCURRENT_MODES for s in extra
            ]
        results: list[CaseResult] = []
        for plan in plans:
            result = plan()
            results.append(result)
            count = len(result.violations)
            console.print(
                f"{result.label}: {len(result.verdicts)} clusters, {count} violations, "
                f"{result.wall_s:.0f} s",
                style="red" if count else None,
                highlight=False,
            )
        for scenario in scenarios:
            print_scenario(console, scenario, [r for r in results if r.scenario == scenario])
    values = figures(results)
    values["wall_s"] = time.monotonic() - started
    print(key_values(values))
    sys.exit(1 if values["violations"] else 0)


if __name__ == "__main__":
    main()
