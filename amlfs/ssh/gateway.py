"""Run commands on nodes: paramiko with ``known_hosts`` + ``RejectPolicy``, one connection per
node reused across commands, timeouts on connect and on each command.

Commands are given as argument lists and sent ``shlex.join``-quoted: nothing a caller passes
is ever interpreted by the remote shell. ``run_batch`` sends several read-only commands in one
exec, each followed by a marker line carrying its exit status (one channel instead of many:
at fleet scale the per-channel cost on both ends dominated the SSH work). paramiko's and the
socket layer's errors become ``NodeUnreachableError`` (transient), ``NodeAccessDeniedError``
(authentication or host key refused) or ``CommandFailedError`` (the command said no).

Transient failures are retried here, with exponential backoff on the injected clock, for a
bounded number of attempts and sim seconds (``SshConfig``): a refused, reset or timed-out
connect, a transport found closed, a session that dropped (a channel closed without an exit
status: paramiko's ``recv_exit_status()`` then answers -1), a batch answered short. A session
that dropped after the command went out may have run it: ``run(..., idempotent=False)`` does
not send such a command again, the caller checks the node and decides. Never retried:
authentication and host-key failures, a command that exited non-zero, a command that timed out.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import io
import re
import secrets
import shlex
import socket
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko
from paramiko.pkey import UnknownKeyType
from tenacity import RetryCallState, Retrying, retry_if_exception, wait_exponential

from amlfs.clock import Clock, ScaledClock
from amlfs.errors import (
    CommandFailedError,
    InventoryError,
    NodeAccessDeniedError,
    NodeUnreachableError,
)

__all__ = [
    "CommandResult",
    "KnownHosts",
    "KnownHostsError",
    "NodeShell",
    "QuietTransport",
    "SshConfig",
    "SshPool",
    "batch_command",
    "load_private_key",
    "split_batch",
]


@dataclass(frozen=True)
class CommandResult:
    status: int
    stdout: str
    stderr: str


@dataclass(frozen=True)
class SshConfig:
    """How to reach nodes. ``key`` is a loaded key object: never printed (no key in repr).

    Timeouts are real seconds (they bound socket waits); the retry settings are sim seconds
    on the shell's clock. A command is tried at most ``attempts`` times, the n-th retry after
    ``retry_wait_s * 2**(n-1)`` (at most ``retry_wait_max_s``), and no retry starts more than
    ``retry_budget_s`` after the first try.
    """

    username: str
    key: paramiko.PKey
    known_hosts: Path
    port: int = 22
    connect_timeout_s: float = 10.0
    command_timeout_s: float = 60.0
    attempts: int = 5
    retry_wait_s: float = 0.5
    # Small on purpose: waiting for a booting node is a poll loop of single commands, and the
    # last backoff before the node answers is polling lag, counted as customer downtime.
    retry_wait_max_s: float = 2.0
    retry_budget_s: float = 30.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {self.attempts}")

    def __repr__(self) -> str:
        return (
            f"SshConfig(username={self.username!r}, key=<{self.key.get_name()}>, "
            f"known_hosts={str(self.known_hosts)!r}, port={self.port})"
        )


def load_private_key(text: str) -> paramiko.PKey:
    """An OpenSSH/PEM private key (Ed25519, ECDSA or RSA) from its text."""
    for kind in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
        try:
            return kind.from_private_key(io.StringIO(text))
        except (paramiko.SSHException, ValueError, IndexError):
            continue
    raise InventoryError("ssh key: not an unencrypted Ed25519, ECDSA or RSA private key")


class QuietTransport(paramiko.Transport):
    """A paramiko transport that is cheap to keep open and whose close is seen at once.

    Used on both ends: by the node shells here and by the emulator's SSH server.
    """

    # paramiko's transport thread wakes every 0.1 s (default) only to see whether *we* closed
    # the transport. Each wake-up costs CPU on every open session (measured: 2,000 open
    # sessions ~5 s CPU/s at 0.1 s; at 0.5 s still 0.15 ms per session-s here and 0.23 ms in
    # the emulator, more than the commands at fleet scale). With close() below shutting the
    # socket down, a close is seen at once on both ends whatever this interval is.
    _active_check_timeout = 5.0

    def close(self) -> None:
        # close() alone leaves the transport thread blocked in recv() on the socket until its
        # next check: the kernel keeps the connection (no FIN) until then, so the peer sees
        # nothing for up to the check interval. shutdown() ends the recv and the connection now.
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        super().close()


def _transport_factory(sock: Any, **kwargs: Any) -> paramiko.Transport:
    return QuietTransport(sock, **kwargs)


class _UnknownHostKey(paramiko.SSHException):
    pass


class _RejectUnknownHost(paramiko.MissingHostKeyPolicy):
    """paramiko's RejectPolicy, with an exception of its own: its plain ``SSHException`` looks
    like any other handshake failure, and this one must not be retried. Says why when it can:
    the key offered is revoked, or known_hosts relies on a certificate authority."""

    def __init__(self, known: KnownHosts) -> None:
        self.known = known

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> None:
        revoked = self.known.revoked_line(key)
        if revoked is not None:
            raise _UnknownHostKey(
                f"its {key.get_name()} host key is revoked (@revoked, known_hosts line {revoked})"
            )
        authorities = self.known.cert_authority_lines()
        raise _UnknownHostKey(
            f"Server {hostname!r} not found in known_hosts"
            + (
                f" (@cert-authority on line {', '.join(map(str, authorities))} is not "
                "supported: list the node's host key)"
                if authorities
                else ""
            )
        )


class _SessionFailed(NodeUnreachableError):
    """A transient failure of one attempt. ``sent``: the command may have reached the node."""

    def __init__(self, message: str, *, node: str, sent: bool) -> None:
        super().__init__(message, node=node)
        self.sent = sent


# Key types OpenSSH writes that paramiko cannot verify. A line of one of these is well-formed
# and not used: a node offering only such a key is refused as unknown.
_UNUSABLE_KEY_TYPES = frozenset(
    {"ssh-dss", "sk-ecdsa-sha2-nistp256@openssh.com", "sk-ssh-ed25519@openssh.com"}
)
_MARKERS = ("@revoked", "@cert-authority")


class KnownHostsError(Exception):
    """known_hosts cannot be used as it is: names the file and the line."""


@dataclass
class _HostKeyIndex:
    # name -> (line, key) in file order: a later line of the same key type wins, as before.
    plain: dict[str, list[tuple[int, paramiko.PKey]]]
    hashed: list[tuple[bytes, bytes, int, paramiko.PKey]]  # salt, HMAC-SHA1(salt, name), ...
    revoked: dict[bytes, int]  # key blob -> line of its @revoked entry
    cert_authority_lines: list[int]


class KnownHosts:
    """A known_hosts file read once and indexed by host name (``[addr]:port``, or ``addr``
    for port 22, as OpenSSH writes them).

    paramiko's ``load_host_keys`` parses the whole file on every connect, and its lookup scans
    every entry: with thousands of nodes that is most of a connection's cost. Plain names are
    a dict lookup; hashed names (``HashKnownHosts yes``: ``|1|salt|HMAC-SHA1(salt, name)``)
    are compared once per name and the answer kept.

    A line that cannot be read (too few fields, a hashed name or key that does not decode, an
    unknown key type or marker, a key whose bytes are not of its type) makes the whole file
    refused (``KnownHostsError`` naming file and line, so every connection is
    ``NodeAccessDeniedError``): a typo may hide the very key the operator meant to trust, and
    skipping it would connect to nothing, or trust what the rest of the file says, without
    saying why. Comments and blank lines are fine. ``@revoked`` keys are never trusted, for
    any host (the host field is not checked: a revoked key stays revoked). ``@cert-authority``
    lines are read but not used (host certificates are not supported); a refusal of an unknown
    host says so. Host patterns (``*``, ``?``, ``!``) are not expanded: such an entry matches
    only a host of that literal name, so a node is refused rather than trusted by a pattern.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._index: _HostKeyIndex | None = None
        self._found: dict[str, dict[str, paramiko.PKey]] = {}
        self._lock = threading.Lock()

    def _load(self) -> _HostKeyIndex:
        with self._lock:
            if self._index is None:
                self._index = _read_known_hosts(self.path)
            return self._index

    def keys_for(self, address: str, port: int) -> tuple[str, dict[str, paramiko.PKey]]:
        """The name paramiko checks and the keys trusted for it, by key type. Raises
        ``OSError`` (unreadable) or ``KnownHostsError`` (a line that cannot be read)."""
        name = address if port == 22 else f"[{address}]:{port}"
        index = self._load()
        with self._lock:
            found = self._found.get(name)
        if found is None:
            entries = list(index.plain.get(name, ()))
            if index.hashed:
                raw = name.encode()
                entries += [
                    (line, key)
                    for salt, digest, line, key in index.hashed
                    if hmac.compare_digest(hmac.new(salt, raw, hashlib.sha1).digest(), digest)
                ]
            found = {}
            for _, key in sorted(entries, key=lambda entry: entry[0]):
                if key.asbytes() not in index.revoked:
                    found[key.get_name()] = key
            with self._lock:
                self._found[name] = found
        return name, found

    def revoked_line(self, key: paramiko.PKey) -> int | None:
        """The line that revokes ``key``, if one does."""
        return self._load().revoked.get(key.asbytes())

    def cert_authority_lines(self) -> list[int]:
        return self._load().cert_authority_lines


def _read_known_hosts(path: Path) -> _HostKeyIndex:
    raw = path.read_bytes()
    try:
        text = raw.decode()
    except UnicodeDecodeError as err:
        bad_line = raw[: err.start].count(b"\n") + 1
        raise KnownHostsError(f"known_hosts {path} line {bad_line}: not UTF-8 text") from None
    index = _HostKeyIndex(plain={}, hashed=[], revoked={}, cert_authority_lines=[])
    for number, line in enumerate(text.split("\n"), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        try:
            _index_line(index, number, fields)
        except ValueError as err:
            raise KnownHostsError(f"known_hosts {path} line {number}: {err}") from None
    return index


def _index_line(index: _HostKeyIndex, number: int, fields: list[str]) -> None:
    marker = fields.pop(0) if fields[0].startswith("@") else None
    if marker is not None and marker not in _MARKERS:
        raise ValueError(f"unknown marker {_cut(marker)!r} (known: {', '.join(_MARKERS)})")
    if len(fields) < 3:
        raise ValueError("expected host names, a key type and a base64 key")
    hosts, key_type, encoded = fields[:3]
    names = hosts.split(",")
    if not all(names):
        raise ValueError("empty host name")
    hashed = [_hashed_name(name) for name in names if name.startswith("|")]
    try:
        blob = base64.b64decode(encoded, validate=True)
    except binascii.Error:
        raise ValueError(f"the {_cut(key_type)} key is not base64") from None
    try:
        key = paramiko.PKey.from_type_string(key_type, blob)
    except UnknownKeyType:
        if key_type in _UNUSABLE_KEY_TYPES:
            return  # well-formed, of a type paramiko cannot check: trusted for nothing
        raise ValueError(f"unknown key type {_cut(key_type)!r}") from None
    except Exception:  # whatever paramiko raises on bytes that are not such a key
        raise ValueError(f"not a valid {_cut(key_type)} key") from None
    if marker == "@revoked":
        index.revoked[key.asbytes()] = number
    elif marker == "@cert-authority":
        index.cert_authority_lines.append(number)
    else:
        for salt, digest in hashed:
            index.hashed.append((salt, digest, number, key))
        for name in names:
            if not name.startswith("|"):
                index.plain.setdefault(name, []).append((number, key))


def _hashed_name(name: str) -> tuple[bytes, bytes]:
    """Salt and digest of a ``|1|salt|hash`` host name (both base64 of 20 bytes)."""
    parts = name.split("|")
    try:
        if len(parts) != 4 or parts[0] or parts[1] != "1":
            raise binascii.Error
        salt, digest = (base64.b64decode(part, validate=True) for part in parts[2:])
    except binascii.Error:
        raise ValueError("hashed host name is not |1|salt|hash") from None
    if len(salt) != 20 or len(digest) != 20:
        raise ValueError("hashed host name is not |1|salt|hash (20-byte salt and hash)")
    return salt, digest


def _cut(value: str, limit: int = 40) -> str:
    return value if len(value) <= limit else value[:limit] + "..."


class NodeShell:
    """One node's SSH connection, opened on first use and reopened after a drop."""

    def __init__(
        self,
        name: str,
        address: str,
        config: SshConfig,
        known: KnownHosts | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.name = name
        self.address = address
        self.config = config
        self.known = known or KnownHosts(config.known_hosts)
        self.clock: Clock = clock or ScaledClock()
        self._client: paramiko.SSHClient | None = None
        self._lock = threading.Lock()

    def _connect(self) -> paramiko.SSHClient:
        client = paramiko.SSHClient()
        try:
            hostname, keys = self.known.keys_for(self.address, self.config.port)
        except OSError as err:
            # No host key can be verified: as final as an unknown one.
            raise NodeAccessDeniedError(
                f"{self.name}: cannot read known_hosts {self.config.known_hosts}: {err.strerror}",
                node=self.name,
            ) from err
        except KnownHostsError as err:
            # Refused, not skipped: the line may be the key this node was meant to have.
            raise NodeAccessDeniedError(
                f"{self.name}: {err}: refusing to connect", node=self.name
            ) from err
        for key_type, key in keys.items():
            client.get_host_keys().add(hostname, key_type, key)
        # Only the keys from known_hosts are trusted; anything else is refused.
        client.set_missing_host_key_policy(_RejectUnknownHost(self.known))
        try:
            sock = socket.create_connection(
                (self.address, self.config.port), timeout=self.config.connect_timeout_s
            )
            # Without it every command waits ~40 ms for Nagle + delayed ACK.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as err:  # refused, reset, timed out, no route
            raise _SessionFailed(
                f"{self.name} ({self.address}:{self.config.port}) unreachable: "
                f"{err.strerror or err}",
                node=self.name,
                sent=False,
            ) from err
        try:
            client.connect(
                self.address,
                port=self.config.port,
                username=self.config.username,
                pkey=self.config.key,
                sock=sock,
                timeout=self.config.connect_timeout_s,
                banner_timeout=self.config.connect_timeout_s,
                auth_timeout=self.config.connect_timeout_s,
                look_for_keys=False,
                allow_agent=False,
                transport_factory=_transport_factory,
            )
        except paramiko.BadHostKeyException as err:
            sock.close()
            revoked = self.known.revoked_line(err.key)
            raise NodeAccessDeniedError(
                f"{self.name}: host key does not match known_hosts"
                + (f" and is revoked (@revoked, line {revoked})" if revoked is not None else "")
                + ": refusing to connect",
                node=self.name,
            ) from err
        except _UnknownHostKey as err:
            sock.close()
            raise NodeAccessDeniedError(f"{self.name}: SSH refused: {err}", node=self.name) from err
        except paramiko.AuthenticationException as err:
            sock.close()
            raise NodeAccessDeniedError(
                f"{self.name}: authentication as {self.config.username!r} failed", node=self.name
            ) from err
        except (paramiko.SSHException, OSError, EOFError) as err:
            sock.close()  # closed during the handshake (banner, key exchange): transient
            raise _SessionFailed(
                f"{self.name}: SSH failed: {err or type(err).__name__}", node=self.name, sent=False
            ) from err
        return client

    def run(
        self,
        argv: Sequence[str],
        *,
        stdin: bytes | None = None,
        check: bool = True,
        timeout_s: float | None = None,
        idempotent: bool = True,
    ) -> CommandResult:
        """Run ``argv`` (quoted with ``shlex.join``); raise on non-zero exit if ``check``.

        Transient failures are retried (see the module docstring). ``idempotent=False``: a
        command whose second run would differ from its first (``iptables -I``, ``zpool
        import``) is not sent again once it may have reached the node; the session drop is
        raised as ``NodeUnreachableError`` and the caller checks what happened.
        """
        command = shlex.join(argv)
        timeout = timeout_s or self.config.command_timeout_s

        def attempt() -> CommandResult:
            return self._run_once(command, stdin, timeout)

        result = self._retrying(idempotent)(attempt)
        if check:
            self.check(argv, result)
        return result

    def check(self, argv: Sequence[str], result: CommandResult) -> CommandResult:
        """``result`` of ``argv``, or ``CommandFailedError`` if it exited non-zero."""
        if result.status != 0:
            command = shlex.join(argv)
            detail = (result.stderr or result.stdout).strip().splitlines()
            raise CommandFailedError(
                f"{self.name}: `{command}` exited {result.status}: "
                f"{detail[0] if detail else '(no output)'}",
                node=self.name,
                command=command,
                status=result.status,
                output=result.stdout + result.stderr,
            )
        return result

    def run_batch(
        self, argvs: Sequence[Sequence[str]], *, timeout_s: float | None = None
    ) -> list[CommandResult]:
        """Run read-only commands in one exec, in order; one result each (never raises on a
        non-zero exit: see ``check``).

        Each command is followed by ``printf '\\n<marker> %d\\n' "$?"`` on stdout and the
        same marker on stderr, with a random marker per batch, so the outputs split back
        exactly (the leading newline is the marker's, not the command's). Only for commands
        that change nothing: a dropped session is retried as a whole.
        """
        if not argvs:
            return []
        command, marker = batch_command(argvs)
        timeout = timeout_s or self.config.command_timeout_s
        what = f"a batch of {len(argvs)} commands"

        def attempt() -> list[CommandResult]:
            raw = self._run_once(command, None, timeout, what)
            results = split_batch(raw, marker, len(argvs))
            if results is None:
                raise _SessionFailed(
                    f"{self.name}: {what} was answered short (exit {raw.status}): output cut "
                    "off, or the login shell is not POSIX",
                    node=self.name,
                    sent=True,
                )
            return results

        return self._retrying(idempotent=True)(attempt)

    def _retrying(self, idempotent: bool) -> Retrying:
        """Attempts of one command: backoff on the clock, bounded in number and sim time."""
        config = self.config
        started = self.clock.now()

        def transient(err: BaseException) -> bool:
            return isinstance(err, _SessionFailed) and (idempotent or not err.sent)

        def give_up(state: RetryCallState) -> bool:
            late = self.clock.now() + (state.upcoming_sleep or 0.0) - started
            return state.attempt_number >= config.attempts or late > config.retry_budget_s

        def exhausted(state: RetryCallState) -> Any:
            err = state.outcome.exception() if state.outcome else None
            raise NodeUnreachableError(
                f"{err} (gave up after {state.attempt_number} attempts, "
                f"{self.clock.now() - started:.1f} s)",
                node=self.name,
            ) from err

        return Retrying(
            sleep=self.clock.sleep,
            wait=wait_exponential(
                multiplier=config.retry_wait_s, min=config.retry_wait_s, max=config.retry_wait_max_s
            ),
            stop=give_up,
            retry=retry_if_exception(transient),
            retry_error_callback=exhausted,
        )

    def _run_once(
        self, command: str, stdin: bytes | None, timeout_s: float, what: str | None = None
    ) -> CommandResult:
        """One attempt, on the open connection if it is still alive, else on a new one.
        ``what``: the command as error messages name it (default: the command itself)."""
        what = what or f"`{command}`"
        with self._lock:
            if self._client is not None and not _alive(self._client):
                self._drop()  # closed since the last command (the node rebooted): reconnect
            if self._client is None:
                self._client = self._connect()
            transport = self._client.get_transport()
            try:
                if transport is None:  # never after a connect: keeps the types honest
                    raise paramiko.SSHException("no transport")
                channel = transport.open_session(timeout=timeout_s)
                channel.settimeout(timeout_s)
            except (paramiko.SSHException, OSError, EOFError) as err:
                self._drop()
                raise _SessionFailed(
                    f"{self.name}: cannot open a session: {err or type(err).__name__}",
                    node=self.name,
                    sent=False,
                ) from err
            # From here on the node may have run the command.
            try:
                channel.exec_command(command)
                if stdin is not None:
                    channel.sendall(stdin)
                channel.shutdown_write()
                stdout = _read_all(channel, stderr=False)
                stderr = _read_all(channel, stderr=True)
                status = channel.recv_exit_status()
                channel.close()
            except TimeoutError as err:
                self._drop()
                # Not retried (a plain NodeUnreachableError): a hung command may still be
                # running on the node, so a second one could run beside it; and each try
                # costs a whole command timeout of real time, which no sim-seconds budget
                # bounds. The caller's own loop (a poll, a saga step) decides what comes next.
                raise NodeUnreachableError(
                    f"{self.name}: {what} timed out after {timeout_s:.0f} s", node=self.name
                ) from err
            except (paramiko.SSHException, OSError, EOFError) as err:
                # The same drop as a channel closed without a status (below), seen a moment
                # earlier (while reading): one message for both, whichever paramiko saw.
                self._drop()
                raise _SessionFailed(
                    f"{self.name}: session dropped running {what} "
                    f"(no exit status: {err or type(err).__name__})",
                    node=self.name,
                    sent=True,
                ) from err
            if status == -1:
                # The channel closed without an exit status (paramiko's -1): the session
                # dropped mid-command. Whether the command ran is unknown; it is no result.
                # (OpenSSH also sends no status for a command killed by a signal.)
                self._drop()
                raise _SessionFailed(
                    f"{self.name}: session dropped running {what} (no exit status)",
                    node=self.name,
                    sent=True,
                )
            return CommandResult(status, stdout, stderr)

    def _drop(self) -> None:
        if self._client is not None:
            self._client.close()
        self._client = None

    def close(self) -> None:
        with self._lock:
            self._drop()


def batch_command(argvs: Sequence[Sequence[str]]) -> tuple[str, str]:
    """One POSIX shell command line running ``argvs`` in order, and its marker."""
    marker = f"@@amlfs-{secrets.token_hex(8)}"
    parts = []
    for argv in argvs:
        parts.append(shlex.join(argv))
        parts.append(f"printf '\\n{marker} %d\\n' \"$?\"")
        parts.append(f"printf '\\n{marker}\\n' >&2")
    return "; ".join(parts), marker


def split_batch(raw: CommandResult, marker: str, count: int) -> list[CommandResult] | None:
    """The ``count`` results of a ``batch_command``, or None if the output is not whole."""
    outs = re.split(rf"\n{re.escape(marker)} (\d+)\n", raw.stdout)
    errs = raw.stderr.split(f"\n{marker}\n")
    if len(outs) != 2 * count + 1 or len(errs) != count + 1 or outs[-1] or errs[-1]:
        return None
    return [CommandResult(int(outs[2 * i + 1]), outs[2 * i], errs[i]) for i in range(count)]


def _alive(client: paramiko.SSHClient) -> bool:
    transport = client.get_transport()
    return transport is not None and transport.is_active()


def _read_all(channel: paramiko.Channel, *, stderr: bool) -> str:
    chunks = []
    while True:
        data = channel.recv_stderr(65536) if stderr else channel.recv(65536)
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks).decode(errors="replace")


class SshPool:
    """Shells by node name; ``close()`` ends them all. ``clock``: what retries wait on (the
    orchestrator's; a real-time clock if none is given)."""

    def __init__(self, config: SshConfig, clock: Clock | None = None) -> None:
        self.config = config
        self.clock: Clock = clock or ScaledClock()
        self._shells: dict[str, NodeShell] = {}
        self._lock = threading.Lock()
        self.known = KnownHosts(config.known_hosts)

    def shell(self, name: str, address: str) -> NodeShell:
        with self._lock:
            shell = self._shells.get(name)
            if shell is None or shell.address != address:
                shell = NodeShell(name, address, self.config, self.known, self.clock)
                self._shells[name] = shell
            return shell

    def release(self, names: Iterable[str]) -> None:
        """Close and forget the shells of ``names`` (a cluster that is done: a fleet run would
        otherwise hold a session, and a thread on each end, to every node it ever touched)."""
        with self._lock:
            shells = [self._shells.pop(name) for name in names if name in self._shells]
        for shell in shells:
            shell.close()

    def close(self) -> None:
        with self._lock:
            shells, self._shells = list(self._shells.values()), {}
        for shell in shells:
            shell.close()
