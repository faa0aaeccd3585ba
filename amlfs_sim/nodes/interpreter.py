"""The commands an emulated node answers, from its state, in the output formats of the tools.

An exec is parsed with ``shlex``: simple commands separated by ``;`` (run in order, the exit
status is the last one's), ``"$?"`` as a whole word (the previous command's exit status) and a
trailing ``>&2`` (stdout to stderr). That is all of the shell the orchestrator's batches use
(``amlfs.ssh.gateway.batch_command``); no pipes, no other redirections, no other expansion, and
a quoted lone ``;`` is taken as a separator. ``sudo`` is accepted and ignored. Anything not
listed here exits 127 the way a shell says "command not found".
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import shlex
from collections.abc import Callable
from dataclasses import dataclass

from amlfs_sim.nodes.fleet import NodeFleet
from amlfs_sim.nodes.formats import (
    Device,
    format_devices,
    format_net_show,
    format_params,
    format_recovery_status,
)
from amlfs_sim.nodes.lustre import (
    FSNAME,
    HOSTID_FILE,
    RECOVERY_WINDOW_PARAMS,
    LustreNode,
    Target,
    _parse_rule,
    file_bytes,
    file_text,
)

__all__ = ["Result", "needs_stdin", "run_command"]

EPOCH = 1_764_547_200  # sim time 0 as a Unix time (2025-12-01), for recovery_start
NUMERIC_SUFFIXES = ("timeout", "at_max", "recovery_time_soft", "recovery_time_hard")
HSM_CONTROL_VALUES = ("enabled", "disabled", "shutdown", "purge")
MISSING = "{tool}: {path}: No such file or directory\n"


@dataclass(frozen=True)
class Result:
    status: int
    stdout: str = ""
    stderr: str = ""


def needs_stdin(command: str) -> bool:
    """Whether the command reads its standard input (the server then waits for EOF)."""
    try:
        argv = _strip_sudo(shlex.split(command))
    except ValueError:
        return False
    return bool(argv) and argv[0] == "tee"


def _strip_sudo(argv: list[str]) -> list[str]:
    while argv and argv[0] == "sudo":
        argv = [a for a in argv[1:] if a not in ("-n", "-E")] if len(argv) > 1 else []
    return argv


def run_command(fleet: NodeFleet, node: LustreNode, command: str, stdin: bytes = b"") -> Result:
    """Run ``command`` on ``node`` (caller holds the backend lock, time advanced)."""
    try:
        lexer = shlex.shlex(command, posix=True, punctuation_chars=";&>")
        lexer.whitespace_split = True
        tokens = list(lexer)
    except ValueError as err:
        return Result(2, stderr=f"bash: syntax error: {err}\n")
    simple: list[list[str]] = [[]]
    for word in tokens:
        if word == ";":
            simple.append([])
        else:
            simple[-1].append(word)
    now = fleet.backend.clock.now()
    node.cluster.advance(now)
    status = 0
    stdout: list[str] = []
    stderr: list[str] = []
    for argv in simple:
        if not argv:
            continue
        to_stderr = argv[-2:] == [">&", "2"]
        words = [str(status) if a == "$?" else a for a in (argv[:-2] if to_stderr else argv)]
        result = _run_simple(Context(fleet, node, now, stdin), _strip_sudo(words))
        status = result.status
        (stderr if to_stderr else stdout).append(result.stdout)
        stderr.append(result.stderr)
    return Result(status, "".join(stdout), "".join(stderr))


def _run_simple(ctx: Context, argv: list[str]) -> Result:
    if not argv:
        return Result(0)
    if any(a in (">&", ">", "&", "&&", ">>") for a in argv):
        return Result(2, stderr=f"bash: emulated shell: unsupported operator in {argv}\n")
    handler = COMMANDS.get(argv[0])
    if handler is None:
        return Result(127, stderr=f"bash: {argv[0]}: command not found\n")
    return handler(ctx, argv[1:])


@dataclass
class Context:
    fleet: NodeFleet
    node: LustreNode
    now: float
    stdin: bytes

    def changed(self) -> None:
        self.fleet.touched(self.node)


# ---------------------------------------------------------------------- lctl


def _lctl(ctx: Context, args: list[str]) -> Result:
    if not args:
        return Result(1, stderr="lctl: missing command\n")
    sub, rest = args[0], args[1:]
    node = ctx.node
    if sub in ("dl", "device_list"):
        if not node.modules_loaded:
            return Result(
                2,
                stderr="error: dl: open(/sys/kernel/debug/lustre/devices): No such file or directory\n",
            )
        return Result(0, format_devices(_devices(node)))
    if sub == "list_nids":
        if not node.nids:
            return Result(100, stderr="IOC_LIBCFS_GET_NI error 100: Network is down\n")
        return Result(0, "".join(n + "\n" for n in node.nids))
    if sub == "get_param":
        return _get_param(ctx, rest)
    if sub == "set_param":
        return _set_param(ctx, rest)
    return Result(1, stderr=f"lctl: unknown command '{sub}'\n")


def _devices(node: LustreNode) -> list[Device]:
    rows: list[tuple[str, str, str]] = []
    mgs = f"MGC{node.cluster.mds.nid}"
    mounted = [t for t in node.targets if t.mounted]
    if any(t.kind == "mgs" for t in mounted):
        rows += [("osd-zfs", "MGS-osd", "MGS-osd_UUID"), ("mgs", "MGS", "MGS")]
    if mounted or node.client_mounted:
        rows.append(("mgc", mgs, f"{node.name}-mgc_UUID"))
    for target in mounted:
        if target.kind == "mdt":
            rows += [
                ("osd-zfs", f"{target.name}-osd", f"{target.name}-osd_UUID"),
                ("mds", "MDS", "MDS_uuid"),
                ("lod", f"{FSNAME}-MDT0000-mdtlov", f"{FSNAME}-MDT0000-mdtlov_UUID"),
                ("mdt", target.name, f"{target.name}_UUID"),
                ("mdd", f"{FSNAME}-MDD0000", f"{FSNAME}-MDD0000_UUID"),
                ("qmt", f"{FSNAME}-QMT0000", f"{FSNAME}-QMT0000_UUID"),
            ]
            for _, ost in node.cluster.server_targets:
                if ost.kind == "ost":
                    rows.append(("osp", f"{ost.name}-osc-MDT0000", f"{FSNAME}-MDT0000-mdtlov_UUID"))
        elif target.kind == "ost":
            rows += [
                ("osd-zfs", f"{target.name}-osd", f"{target.name}-osd_UUID"),
                ("ost", "OSS", "OSS_uuid"),
                ("obdfilter", target.name, f"{target.name}_UUID"),
                (
                    "lwp",
                    f"{FSNAME}-MDT0000-lwp-{target.name[-7:]}",
                    f"{FSNAME}-MDT0000-lwp-{target.name[-7:]}_UUID",
                ),
            ]
    if node.client_mounted:
        instance = "ffff" + _digest(node.name)[:12]
        rows += [
            ("lov", f"{FSNAME}-clilov-{instance}", f"{node.name}-clilov_UUID"),
            ("lmv", f"{FSNAME}-clilmv-{instance}", f"{node.name}-clilmv_UUID"),
            ("mdc", f"{FSNAME}-MDT0000-mdc-{instance}", f"{node.name}-mdc_UUID"),
        ]
        for _, ost in node.cluster.server_targets:
            if ost.kind == "ost":
                rows.append(("osc", f"{ost.name}-osc-{instance}", f"{node.name}-osc_UUID"))
    return [
        Device(i, "UP", kind, name, uuid, 4 + (i % 3)) for i, (kind, name, uuid) in enumerate(rows)
    ]


def _target_of(node: LustreNode, name: str) -> Target | None:
    for target in node.targets:
        if name.startswith(f"{target.param_prefix}.{target.name}."):
            return target
    return None


def _param_value(ctx: Context, name: str) -> str:
    node = ctx.node
    cluster = node.cluster
    if name == "version":
        return node.lustre_version
    if name == "health_check":
        return "healthy" if node.healthy() else "NOT HEALTHY"
    target = _target_of(node, name)
    if target is not None and name.endswith(".recovery_status"):
        rec = target.recovery
        total = len(cluster.clients)
        reachable = sum(1 for c in cluster.clients if cluster.reachable(node, target, c.address))
        end = rec.end if rec.end is not None else ctx.now
        # time_remaining counts down from the timer armed at the first connection
        # (lprocfs_recovery_status_seq_show: obd_recovery_start + obd_recovery_timeout - now).
        until = rec.timer_end if rec.timer_end is not None else ctx.now
        return format_recovery_status(
            rec.status,
            start=int(EPOCH + rec.start),
            duration=int(end - rec.start),
            time_remaining=max(0, int(until - ctx.now)) if until != float("inf") else 0,
            total_clients=total,
            connected=reachable,
            completed=total - rec.evicted if rec.status == "COMPLETE" else 0,
            evicted=rec.evicted,
        )
    if name.endswith(".hsm.active_requests"):
        # mdt_hsm_active_requests_proc_show (lustre/mdt/mdt_hsm_cdt_requests.c, v2_15_5);
        # the kernel's %#llx prints 0 as 0x0 (tests/data/lustre-2.15/hsm_active_requests_busy.txt).
        by_name = {n.name: n for n in cluster.nodes}
        return "".join(
            f"fid={r.fid} dfid={r.fid} compound/cookie=0x0/0x{0x5F000000 + r.serial:x} "
            f"action={r.action} archive#=1 flags=0x0 extent=0x0-0xffffffffffffffff gid=0x0 "
            f"data=[] canceled=0 uuid={_agent_uuid(by_name[r.agent])} done={r.done}\n"
            for r in cluster.hsm_requests(ctx.now)
        )
    if name.endswith(".hsm.agents"):
        return "".join(
            f"uuid={_agent_uuid(agent)} archive_id=1 requests=[current:0 ok:0 errors:0]\n"
            for agent in cluster.nodes
            if agent.up and agent.services.get("lhsmd") == "active"
        )
    value = node.param(name)
    return "" if value is None else value


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _agent_uuid(agent: LustreNode) -> str:
    digest = _digest("agent:" + agent.name)[:32]
    return f"{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:]}"


def _get_param(ctx: Context, args: list[str]) -> Result:
    value_only = "-n" in args
    names_only = "-N" in args
    patterns = [a for a in args if not a.startswith("-")]
    if not patterns:
        return Result(1, stderr="get_param: missing parameter name\n")
    available = ctx.node.param_names()
    values: list[tuple[str, str]] = []
    errors = []
    for pattern in patterns:
        matched = [n for n in available if fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            errors.append(f"error: get_param: param_path '{pattern}': No such file or directory\n")
        values += [(n, "" if names_only else _param_value(ctx, n)) for n in matched]
    if names_only:
        out = "".join(n + "\n" for n, _ in values)
    else:
        out = format_params(values, value_only=value_only)
    return Result(2 if errors else 0, out, "".join(errors))


def _set_param(ctx: Context, args: list[str]) -> Result:
    persistent = "-P" in args
    delete = "-d" in args
    items = [a for a in args if not a.startswith("-")]
    node, cluster = ctx.node, ctx.node.cluster
    if not items:
        return Result(1, stderr="set_param: missing parameter\n")
    if not node.modules_loaded:
        return Result(2, stderr="error: set_param: Lustre modules are not loaded\n")
    if persistent and not node.is_mgs:
        return Result(
            1, stderr="error: executing set_param: Operation not permitted (-P needs the MGS)\n"
        )
    errors = []
    out = []
    for item in items:
        if delete:
            pattern, value = item.split("=", 1)[0], None
        elif "=" not in item:
            errors.append(f"error: set_param: setting {item}: Invalid argument\n")
            continue
        else:
            pattern, value = item.split("=", 1)
        leaf = pattern.rsplit(".", 1)[-1]
        if value is not None and leaf in NUMERIC_SUFFIXES and not value.isdigit():
            errors.append(f"error: set_param: setting {pattern}={value}: Invalid argument\n")
            continue
        if value is not None and leaf == "hsm_control" and value not in HSM_CONTROL_VALUES:
            errors.append(f"error: set_param: setting {pattern}={value}: Invalid argument\n")
            continue
        if leaf == "hsm_control" and value == "purge":
            # A command, not a state: every action is cancelled (hsm_cancel_all_actions).
            cluster.hsm_purge(ctx.now)
            continue
        if persistent:
            if value is None:
                cluster.persistent.pop(pattern, None)
                for member in cluster.nodes:
                    member.settings = [(p, v) for p, v in member.settings if p != pattern]
            else:
                cluster.persistent.pop(pattern, None)
                cluster.persistent[pattern] = value
                for member in cluster.nodes:
                    if member.up:
                        member.settings.append((pattern, value))
                        _set_windows(member, pattern, leaf, value)
        else:
            matched = [n for n in node.param_names() if fnmatch.fnmatchcase(n, pattern)]
            if not matched or value is None:
                errors.append(
                    f"error: set_param: param_path '{pattern}': No such file or directory\n"
                )
                continue
            node.settings.append((pattern, value))
            _set_windows(node, pattern, leaf, value)
            out += [f"{n}={value}\n" for n in matched]
    ctx.changed()
    return Result(2 if errors else 0, "".join(out), "".join(errors))


def _set_windows(node: LustreNode, pattern: str, leaf: str, value: str) -> None:
    """recovery_time_soft/hard_store: the live value of each mounted target it matches. A
    running recovery timer is not re-armed by it (only extend_recovery_timer does that)."""
    if leaf not in RECOVERY_WINDOW_PARAMS:
        return
    for target in node.targets:
        if target.mounted and fnmatch.fnmatchcase(target.param_name(leaf), pattern):
            if leaf == "recovery_time_soft":
                target.soft = float(value)
            else:
                target.hard = float(value)


# ---------------------------------------------------------------------- LNet, mounts


def _lnetctl(ctx: Context, args: list[str]) -> Result:
    if args[:2] != ["net", "show"]:
        return Result(1, stderr=f"lnetctl: emulated subcommands: net show (got {' '.join(args)})\n")
    node = ctx.node
    if node.services.get("lnet") != "active":
        return Result(
            255,
            stderr="show:\n    - net:\n          errno: -100\n"
            '          descr: "cannot get networks: Network is down"\n',
        )
    return Result(0, format_net_show(node.nids))


#: A 2.15 client's default flags, as ``ll_show_options`` prints them.
CLIENT_MOUNT_OPTIONS = (
    "rw,checksum,flock,nouser_xattr,lruresize,lazystatfs,nouser_fid2path,verbose,encrypt"
)


def _mount(ctx: Context, args: list[str]) -> Result:
    if args != ["-t", "lustre"]:
        return Result(1, stderr="mount: the emulator lists mounts only: mount -t lustre\n")
    node = ctx.node
    # As Lustre 2.15's server_show_options / ll_show_options print them (tests/data/lustre-2.15):
    # a target formatted as the MGS shows ``mgs``, every other target ``mgsnode=``.
    mgs_nid = node.cluster.mds.nid
    lines = []
    for target in node.targets:
        if target.mounted:
            where = "mgs" if target.kind == "mgs" else f"mgsnode={mgs_nid}"
            lines.append(
                f"{target.pool}/{target.dataset} on {target.mountpoint} type lustre "
                f"(ro,svname={target.name},{where},osd=osd-zfs)\n"
            )
    if node.client_mounted:
        lines.append(
            f"{mgs_nid}:/{FSNAME} on /lustre/{FSNAME} type lustre ({CLIENT_MOUNT_OPTIONS})\n"
        )
    return Result(0, "".join(lines))


# ---------------------------------------------------------------------- services


def _systemctl(ctx: Context, args: list[str]) -> Result:
    if len(args) < 2:
        return Result(1, stderr="systemctl: usage: systemctl start|stop|restart|is-active UNIT\n")
    verb, units = args[0], [u.removesuffix(".service") for u in args[1:] if not u.startswith("-")]
    node = ctx.node
    if verb == "is-active":
        states = [node.services.get(u, "inactive") for u in units]
        return Result(
            0 if all(s == "active" for s in states) else 3, "".join(s + "\n" for s in states)
        )
    if verb not in ("start", "stop", "restart"):
        return Result(
            1, stderr=f"systemctl: emulated verbs: start, stop, restart, is-active (got {verb})\n"
        )
    status, err = 0, ""
    for unit in units:
        if verb in ("stop", "restart"):
            code, msg = node.stop_service(unit, ctx.now)
            status, err = max(status, code), err + msg
        if verb in ("start", "restart"):
            if node.services.get(unit) == "active":
                continue
            code, msg = node.start_service(unit, ctx.now)
            status, err = max(status, code), err + msg
            if code == 0:
                node.cluster.emit(ctx.now, "node.service_started", vm=node.name, unit=unit)
    ctx.changed()
    return Result(status, stderr=err)


def _modprobe(ctx: Context, args: list[str]) -> Result:
    modules = [a for a in args if not a.startswith("-")]
    if not ctx.node.modules_loaded and ctx.node.disk is not None and ctx.node.disk.bad_image:
        name = modules[0] if modules else "lustre"
        return Result(
            1,
            stderr=f"modprobe: ERROR: could not insert '{name}': Unknown symbol in module, or unknown parameter (see dmesg)\n",
        )
    return Result(0)


# ---------------------------------------------------------------------- firewall


def _normalize_rule(words: list[str]) -> str | None:
    spec = _parse_rule(shlex.join(words))
    if spec is None or "chain" not in spec or "jump" not in spec:
        return None
    parts = ["-A", spec["chain"]]
    for key, flag in (("source", "-s"), ("dest", "-d")):
        if key in spec:
            address = spec[key]
            parts += [flag, address if "/" in address else f"{address}/32"]
    if "proto" in spec:
        parts += ["-p", spec["proto"], "-m", spec["proto"]]
    if "sport" in spec:
        parts += ["--sport", spec["sport"]]
    if "dport" in spec:
        parts += ["--dport", spec["dport"]]
    parts += ["-j", spec["jump"]]
    return " ".join(parts)


def _iptables(ctx: Context, args: list[str]) -> Result:
    node = ctx.node
    if not args:
        return Result(2, stderr="iptables v1.8.7 (nf_tables): no command specified\n")
    op = args[0]
    if op == "-S":
        lines = ["-P INPUT ACCEPT", "-P FORWARD ACCEPT", "-P OUTPUT ACCEPT", *node.iptables]
        chain = args[1] if len(args) > 1 else None
        if chain:
            lines = [ln for ln in lines if ln.split()[1] == chain]
        return Result(0, "".join(ln + "\n" for ln in lines))
    if op not in ("-A", "-I", "-D", "-C") or len(args) < 2:
        return Result(2, stderr=f"iptables: emulated: -S, -A, -I, -D, -C (got {op})\n")
    words = ["-A", *args[1:]]
    if op == "-I" and len(args) > 2 and args[2].isdigit():
        words = ["-A", args[1], *args[3:]]
    rule = _normalize_rule(words)
    if rule is None:
        return Result(2, stderr="iptables v1.8.7 (nf_tables): unknown rule (need a chain and -j)\n")
    if op == "-C":
        if rule in node.iptables:
            return Result(0)
        return Result(1, stderr="iptables: Bad rule (does a matching rule exist in that chain?).\n")
    if op == "-D":
        if rule not in node.iptables:
            return Result(
                1, stderr="iptables: Bad rule (does a matching rule exist in that chain?).\n"
            )
        node.iptables.remove(rule)
    elif op == "-I":
        node.iptables.insert(0, rule)
    else:
        node.iptables.append(rule)
    ctx.changed()
    return Result(0)


# ---------------------------------------------------------------------- ZFS, host


def _zpool(ctx: Context, args: list[str]) -> Result:
    node = ctx.node
    if not args:
        return Result(2, stderr="usage: zpool command args ...\n")
    sub, rest = args[0], args[1:]
    pools = sorted({t.pool for t in node.targets})
    if sub == "import":
        names = [a for a in rest if not a.startswith("-")]
        if not names:
            free = [p for p in pools if p not in node.pools]
            if not free:
                return Result(1, stderr="no pools available to import\n")
            return Result(
                0,
                "".join(
                    f"   pool: {p}\n     id: {int(_digest(p)[:15], 16)}\n  state: ONLINE\n action: The pool can be imported using its name or numeric identifier.\n"
                    for p in free
                ),
            )
        status, err = 0, ""
        for name in names:
            code, msg = node.import_pool(name, force="-f" in rest)
            status, err = max(status, code), err + msg
        ctx.changed()
        return Result(status, stderr=err)
    if sub == "status":
        names = [a for a in rest if not a.startswith("-")] or sorted(node.pools)
        if not node.pools and not [a for a in rest if not a.startswith("-")]:
            return Result(0, "no pools available\n")
        out, err = "", ""
        for name in names:
            if name not in node.pools:
                err += f"cannot open '{name}': no such pool\n"
                continue
            out += (
                f"  pool: {name}\n state: ONLINE\n  scan: none requested\nconfig:\n\n"
                f"\tNAME        STATE     READ WRITE CKSUM\n\t{name}  ONLINE       0     0     0\n"
                f"\t  sdc       ONLINE       0     0     0\n\nerrors: No known data errors\n"
            )
        return Result(1 if err else 0, out, err)
    if sub == "list":
        return Result(0, "".join(p + "\n" for p in sorted(node.pools)))
    if sub == "export":
        for name in [a for a in rest if not a.startswith("-")]:
            node.pools.discard(name)
        ctx.changed()
        return Result(0)
    return Result(2, stderr=f"zpool: emulated: import, status, list, export (got {sub})\n")


def _hostid(ctx: Context, args: list[str]) -> Result:
    return Result(0, ctx.node.hostid + "\n")


def _files(ctx: Context) -> dict[str, str]:
    assert ctx.node.disk is not None
    return ctx.node.disk.files


def _lustre_path(path: str) -> bool:
    return path.startswith(f"/lustre/{FSNAME}/")


def _lustre_io(ctx: Context) -> None:
    """I/O through this node's Lustre client: its requests conflict with the locks of the
    customers' clients, and any of those cut off now gets a blocking AST it cannot answer."""
    ctx.node.cluster.client_io(ctx.node, ctx.now)
    ctx.changed()


def _cat(ctx: Context, args: list[str]) -> Result:
    out, err = "", ""
    node = ctx.node
    for path in args:
        if path == BOOT_ID:
            out += node.boot_id + "\n"
        elif path == "/etc/os-release":
            assert node.disk is not None
            out += f'NAME="Ubuntu"\nVERSION_ID="22.04"\nAMLFS_IMAGE="{node.disk.os_version}"\n'
        elif _lustre_path(path):
            if not (node.client_mounted and node.cluster.usable_from(node.address)):
                err += f"cat: {path}: Input/output error\n"
            elif path in node.cluster.lustre_files:
                out += node.cluster.lustre_files[path]
                _lustre_io(ctx)
            else:
                err += MISSING.format(tool="cat", path=path)
        elif path in _files(ctx):
            out += _files(ctx)[path]
        else:
            err += MISSING.format(tool="cat", path=path)
    return Result(1 if err else 0, out, err)


def _tee(ctx: Context, args: list[str]) -> Result:
    append = "-a" in args
    paths = [a for a in args if not a.startswith("-")]
    data = file_text(ctx.stdin)  # byte for byte
    node = ctx.node
    for path in paths:
        if _lustre_path(path):
            if not (node.client_mounted and node.cluster.usable_from(node.address)):
                return Result(1, data, f"tee: {path}: Input/output error\n")
            files = node.cluster.lustre_files
        else:
            files = _files(ctx)
        files[path] = (files.get(path, "") if append else "") + data
    if any(_lustre_path(p) for p in paths):
        _lustre_io(ctx)
    if any(p == HOSTID_FILE for p in paths):
        ctx.changed()
    return Result(0, data)


def _base64(ctx: Context, args: list[str]) -> Result:
    """``base64 [-w 0] FILE``: the file's bytes, encoded (coreutils: no line breaks with
    ``-w 0``, and then no final newline)."""
    words = list(args)
    wrap = 76
    if words[:1] == ["-w"] and len(words) >= 2:
        try:
            wrap = int(words[1])
        except ValueError:
            return Result(1, stderr=f"base64: invalid wrap size: '{words[1]}'\n")
        words = words[2:]
    if len(words) != 1 or words[0].startswith("-"):
        return Result(1, stderr="base64: emulated: base64 [-w COLS] FILE\n")
    path = words[0]
    if path not in _files(ctx):
        return Result(1, stderr=f"base64: {path}: No such file or directory\n")
    encoded = base64.b64encode(file_bytes(_files(ctx)[path])).decode()
    if wrap == 0:
        return Result(0, encoded)
    lines = [encoded[i : i + wrap] for i in range(0, len(encoded), wrap)]
    return Result(0, "".join(line + "\n" for line in lines))


def _sha256sum(ctx: Context, args: list[str]) -> Result:
    """``sha256sum FILE...``: ``<hex>  FILE`` per file, as coreutils prints it."""
    out, err = "", ""
    for path in args:
        if path in _files(ctx):
            digest = hashlib.sha256(file_bytes(_files(ctx)[path])).hexdigest()
            out += f"{digest}  {path}\n"
        else:
            err += f"sha256sum: {path}: No such file or directory\n"
    return Result(1 if err else 0, out, err)


def _rm(ctx: Context, args: list[str]) -> Result:
    force = any(a.startswith("-") and "f" in a for a in args)
    err = ""
    node = ctx.node
    for path in [a for a in args if not a.startswith("-")]:
        if _lustre_path(path):
            if not (node.client_mounted and node.cluster.usable_from(node.address)):
                err += f"rm: cannot remove '{path}': Input/output error\n"
                continue
            _lustre_io(ctx)
        files = node.cluster.lustre_files if _lustre_path(path) else _files(ctx)
        if files.pop(path, None) is None and not force:
            err += f"rm: cannot remove '{path}': No such file or directory\n"
    return Result(1 if err else 0, stderr=err)


FID_DIR = f"/lustre/{FSNAME}/.lustre/fid/"


def _stat(ctx: Context, args: list[str]) -> Result:
    """``stat -c %s PATH...``: sizes, in the file system through this node's client; a file
    is also reachable by FID under ``.lustre/fid/`` (the FIDs ``hsm.active_requests`` names)."""
    if args[:2] != ["-c", "%s"] or len(args) < 3:
        return Result(1, stderr="stat: emulated: stat -c %s PATH...\n")
    node, cluster = ctx.node, ctx.node.cluster
    out, err = "", ""
    for path in args[2:]:
        size: int | None = None
        if _lustre_path(path):
            if not (node.client_mounted and cluster.usable_from(node.address)):
                err += f"stat: cannot statx '{path}': Input/output error\n"
                continue
            if path.startswith(FID_DIR):
                size = cluster.hsm_file_size(path.removeprefix(FID_DIR))
            elif path in cluster.lustre_files:
                size = len(file_bytes(cluster.lustre_files[path]))
        elif path in _files(ctx):
            size = len(file_bytes(_files(ctx)[path]))
        if size is None:
            err += f"stat: cannot statx '{path}': No such file or directory\n"
        else:
            out += f"{size}\n"
    return Result(1 if err else 0, out, err)


def _test(ctx: Context, args: list[str]) -> Result:
    if len(args) == 2 and args[0] in ("-e", "-f"):
        return Result(0 if args[1] in _files(ctx) else 1)
    return Result(2, stderr="test: emulated: test -e|-f PATH\n")


BOOT_ID = "/proc/sys/kernel/random/boot_id"  # a new random UUID at every boot (random(4))


def _dmesg(ctx: Context, args: list[str]) -> Result:
    """The kernel ring buffer of this boot, as util-linux ``dmesg`` prints it by default:
    ``[seconds.micro] message``, seconds since the boot (``-l``/``--level`` filters are
    accepted and ignored: every console message here is a warning or an error)."""
    node = ctx.node
    booted = node.booted_at or 0.0
    lines = [f"[{max(0.0, at - booted):12.6f}] {text}\n" for at, text, _ in node.kernel_log]
    node.log_read = len(lines)
    return Result(0, "".join(lines))


def _uname(ctx: Context, args: list[str]) -> Result:
    return Result(0, "5.15.0-1075-azure\n")


def _true(ctx: Context, args: list[str]) -> Result:
    return Result(0)


def _printf(ctx: Context, args: list[str]) -> Result:
    """``printf FORMAT [ARG]...`` with ``%s``, ``%d``, ``%%`` and the ``\\n``, ``\\t``, ``\\\\`` escapes."""
    if not args:
        return Result(2, stderr="printf: usage: printf format [arguments]\n")
    fmt, values = args[0], iter(args[1:])
    out: list[str] = []
    i = 0
    while i < len(fmt):
        c = fmt[i]
        nxt = fmt[i + 1] if i + 1 < len(fmt) else ""
        if c == "\\" and nxt in ("n", "t", "\\"):
            out.append({"n": "\n", "t": "\t", "\\": "\\"}[nxt])
            i += 2
        elif c == "%" and nxt == "%":
            out.append("%")
            i += 2
        elif c == "%" and nxt in ("s", "d"):
            value = next(values, "")
            if nxt == "d":
                try:
                    value = str(int(value or "0"))
                except ValueError:
                    return Result(1, "".join(out), f"printf: {value}: invalid number\n")
            out.append(value)
            i += 2
        else:
            out.append(c)
            i += 1
    return Result(0, "".join(out))


def _echo(ctx: Context, args: list[str]) -> Result:
    return Result(0, " ".join(args) + "\n")


def _mkdir(ctx: Context, args: list[str]) -> Result:
    return Result(0)


Handler = Callable[[Context, list[str]], Result]
COMMANDS: dict[str, Handler] = {
    "lctl": _lctl,
    "lnetctl": _lnetctl,
    "mount": _mount,
    "systemctl": _systemctl,
    "modprobe": _modprobe,
    "iptables": _iptables,
    "zpool": _zpool,
    "hostid": _hostid,
    "cat": _cat,
    "tee": _tee,
    "base64": _base64,
    "sha256sum": _sha256sum,
    "rm": _rm,
    "stat": _stat,
    "test": _test,
    "uname": _uname,
    "dmesg": _dmesg,
    "true": _true,
    "echo": _echo,
    "printf": _printf,
    "mkdir": _mkdir,
}
