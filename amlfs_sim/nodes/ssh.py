"""SSH for every emulated node: its own loopback address, one port, one accept loop.

A node listens only while its VM runs and its OS booted: when it goes down its listening
socket closes (connections are refused) and its sessions drop. Each node has a deterministic
Ed25519 host key; ``known_hosts`` (``[address]:port`` entries) and the client key are written
to ``STATE_DIR/ssh`` so clients verify host keys with ``RejectPolicy``. Listening sockets cost
no thread; a live connection costs paramiko's transport thread, a command one short worker.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import io
import os
import queue
import selectors
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paramiko.common import (
    AUTH_FAILED,
    AUTH_SUCCESSFUL,
    OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED,
    OPEN_SUCCEEDED,
)

from amlfs.ssh.gateway import QuietTransport
from amlfs_sim.faults import FaultMode
from amlfs_sim.nodes.fleet import NodeFleet
from amlfs_sim.nodes.interpreter import needs_stdin, run_command
from amlfs_sim.nodes.lustre import LustreNode, file_bytes

__all__ = ["SshInfo", "SshServer"]

STDIN_LIMIT = 1 << 20  # bytes a command may read (config files are small)
STDIN_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class SshInfo:
    port: int
    username: str
    key_file: str
    known_hosts: str


def _ed25519(seed: bytes) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(seed).digest())


def _openssh_private(key: Ed25519PrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ).decode()


def _openssh_public(key: Ed25519PrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )


class _Transport(QuietTransport):
    """A transport that tells an exec worker when the request's reply has gone out.

    paramiko answers a channel request after ``check_channel_exec_request`` returns; a worker
    that wrote output and closed the channel before that would make the client see "Channel
    closed" instead of a success. Workers wait for this signal before writing. The wake-up
    interval and the prompt close are the orchestrator's (``QuietTransport``).
    """

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        self.replied: dict[int, threading.Event] = {}

    def _send_user_message(self, data: Any) -> None:
        super()._send_user_message(data)  # type: ignore[misc]
        raw = data.asbytes() if hasattr(data, "asbytes") else bytes(data)
        if raw[:1] in (b"\x63", b"\x64"):  # SSH_MSG_CHANNEL_SUCCESS / FAILURE
            event = self.replied.pop(int.from_bytes(raw[1:5], "big"), None)
            if event is not None:
                event.set()


class _NodeServer(paramiko.ServerInterface):
    def __init__(self, ssh: SshServer, node: LustreNode, transport: _Transport) -> None:
        self.ssh = ssh
        self.node = node
        self.transport = transport

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        if username == self.ssh.username and key.asbytes() == self.ssh.client_public_blob:
            return AUTH_SUCCESSFUL
        return AUTH_FAILED

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind == "session":
            return OPEN_SUCCEEDED
        return OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        replied = threading.Event()
        self.transport.replied[channel.remote_chanid] = replied
        worker = threading.Thread(
            target=self.ssh.execute,
            args=(self.node, self.transport, channel, command.decode(errors="replace"), replied),
            name=f"amlfs-sim-exec-{self.node.name}",
            daemon=True,
        )
        worker.start()
        return True


class SshServer:
    """Serves every node of ``fleet`` on ``port`` at the node's loopback address."""

    def __init__(
        self,
        fleet: NodeFleet,
        state_dir: Path,
        *,
        seed: int = 0,
        username: str = "amlfs",
        port: int = 0,
    ) -> None:
        self.fleet = fleet
        self.lock = fleet.backend.lock
        self.dir = Path(state_dir) / "ssh"
        self.seed = seed
        self.username = username
        self.port = port
        self._selector = selectors.DefaultSelector()
        self._listening: dict[str, socket.socket] = {}
        self._sessions: dict[str, set[paramiko.Transport]] = {}
        self._next_prune = 0.0
        self._host_keys: dict[str, paramiko.PKey] = {}
        self._doomed: queue.SimpleQueue[set[paramiko.Transport]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_w.setblocking(False)
        self._stopping = threading.Event()
        self._sockets_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        client = _ed25519(f"amlfs-sim-client:{seed}".encode())
        self._client_private = _openssh_private(client)
        self._client_public = _openssh_public(client)
        self.client_public_blob = paramiko.Ed25519Key(
            file_obj=io.StringIO(self._client_private)
        ).asbytes()
        self.info: SshInfo | None = None
        self.accepted = 0
        self.commands = 0
        self.dropped = 0  # sessions dropped by a complete-phase node.ssh fault
        self.commands_by_head: collections.Counter[str] = collections.Counter()

    # ------------------------------------------------------------------ keys

    def _host_seed(self, name: str) -> bytes:
        return f"amlfs-sim-host:{self.seed}:{name}".encode()

    def host_key(self, name: str) -> paramiko.PKey:
        key = self._host_keys.get(name)
        if key is None:
            pem = _openssh_private(_ed25519(self._host_seed(name)))
            key = paramiko.Ed25519Key(file_obj=io.StringIO(pem))
            self._host_keys[name] = key
        return key

    def _write_files(self) -> SshInfo:
        self.dir.mkdir(parents=True, exist_ok=True)
        key_file = self.dir / "id_ed25519"
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(self._client_private)
        (self.dir / "id_ed25519.pub").write_text(self._client_public + " amlfs-sim\n")
        lines = []
        for name, node in self.fleet.nodes.items():
            public = _openssh_public(_ed25519(self._host_seed(name)))
            lines.append(f"[{node.address}]:{self.port} {public}\n")
        known_hosts = self.dir / "known_hosts"
        tmp = known_hosts.with_suffix(".tmp")
        tmp.write_text("".join(lines))
        tmp.replace(known_hosts)
        return SshInfo(self.port, self.username, str(key_file), str(known_hosts))

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> SshInfo:
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        with self.lock:
            up = [name for name, node in self.fleet.nodes.items() if node.up]
            self._bind_all(up)
            self.fleet.listeners.append(self._on_node_state)
        self.info = self._write_files()
        self._thread = threading.Thread(target=self._loop, name="amlfs-sim-ssh", daemon=True)
        self._thread.start()
        return self.info

    def _bind_all(self, names: list[str]) -> None:
        """Bind every running node on one port, picking a port free on all addresses."""
        requested = self.port
        for attempt in range(20):
            try:
                for name in names:
                    self._listen(name)
                return
            except OSError as err:
                if err.errno != errno.EADDRINUSE or requested != 0 or attempt == 19:
                    raise
                for sock in self._listening.values():
                    self._selector.unregister(sock)
                    sock.close()
                self._listening.clear()
                self.port = 0  # try another port
        return

    def _listen(self, name: str) -> None:
        if name in self._listening:
            return
        address = self.fleet.nodes[name].address
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.bind((address, self.port))
        except OSError:
            sock.close()
            raise
        if self.port == 0:
            self.port = sock.getsockname()[1]
        sock.listen(64)
        sock.setblocking(False)
        self._listening[name] = sock
        self._selector.register(sock, selectors.EVENT_READ, name)

    def _unlisten(self, name: str) -> None:
        sock = self._listening.pop(name, None)
        if sock is not None:
            self._selector.unregister(sock)
            sock.close()
        for transport in self._sessions.pop(name, set()):
            transport.close()

    def stop(self) -> None:
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._on_node_state in self.fleet.listeners:
            self.fleet.listeners.remove(self._on_node_state)
        with self._sockets_lock:
            for name in list(self._listening):
                self._unlisten(name)
        for sessions in self._sessions.values():
            for transport in sessions:
                transport.close()
        self._sessions.clear()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    # ------------------------------------------------------------------ loop

    def _on_node_state(self, name: str, reachable: bool) -> None:
        """Called with the backend lock held, the moment a node boots or goes down.

        The listening socket opens or closes right here, so a client that saw the VM start
        can connect at once; dropping live sessions (which joins their threads) is left to
        the loop thread.
        """
        if self._stopping.is_set():
            return
        with self._sockets_lock:
            if reachable:
                # If the address is taken by something else, the node stays unreachable.
                with contextlib.suppress(OSError):
                    self._listen(name)
            else:
                sock = self._listening.pop(name, None)
                if sock is not None:
                    self._selector.unregister(sock)
                    sock.close()
                self._doomed.put(self._sessions.pop(name, set()))
        # Never blocks (the write end is non-blocking): this runs with the backend lock held
        # after every command that changed the node, and the loop thread may be waiting for
        # that lock in an accept. A full buffer means a wake-up is already pending. (Blocking
        # here deadlocked the 1,000-cluster bench.)
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def _loop(self) -> None:
        while not self._stopping.is_set():
            for key, _ in self._selector.select(timeout=1.0):
                if key.data is None:
                    with contextlib.suppress(BlockingIOError):
                        self._wake_r.recv(4096)
                    continue
                self._accept(key.data, key.fileobj)  # type: ignore[arg-type]
            self._drop_sessions()
            self._prune()

    def _drop_sessions(self) -> None:
        while True:
            try:
                sessions = self._doomed.get_nowait()
            except queue.Empty:
                return
            if sessions:  # close() joins each transport thread: not in the accept loop
                threading.Thread(
                    target=lambda doomed=sessions: [t.close() for t in doomed],
                    name="amlfs-sim-ssh-drop",
                    daemon=True,
                ).start()

    # Forgetting ended sessions is housekeeping: once every few seconds, not after every accept.
    # Done per wake-up it walked every node's sessions (8,000 nodes) ~10 times a second: 17%
    # of the emulator's GIL samples in the 1,000-cluster bench.
    PRUNE_EVERY_S = 5.0

    def _prune(self) -> None:
        now = time.monotonic()
        if now < self._next_prune:
            return
        self._next_prune = now + self.PRUNE_EVERY_S
        with self._sockets_lock:
            for sessions in self._sessions.values():
                for transport in [t for t in sessions if not t.is_active()]:
                    sessions.discard(transport)

    def _accept(self, name: str, listener: socket.socket) -> None:
        try:
            conn, _ = listener.accept()
        except (BlockingIOError, OSError):
            return
        conn.setblocking(True)
        node = self.fleet.nodes[name]
        with self.lock:
            refused = not node.up or self._ssh_fault(name, "accept")
        if refused:
            conn.close()
            return
        self.accepted += 1
        transport = _Transport(conn)
        transport.add_server_key(self.host_key(name))
        transport.set_keepalive(0)
        with self._sockets_lock:
            self._sessions.setdefault(name, set()).add(transport)
        try:
            transport.start_server(
                event=threading.Event(), server=_NodeServer(self, node, transport)
            )
        except (paramiko.SSHException, OSError):
            transport.close()

    def _ssh_fault(self, name: str, phase: str, command: str | None = None) -> bool:
        """A ``node.ssh`` rule fires: ``accept`` refuse the connection (``command`` None) or
        the command (a hang is a refusal too); ``complete`` drop the session of a command
        that just ran."""
        faults = self.fleet.backend.faults
        modes = (FaultMode.FAIL, FaultMode.HANG) if phase == "accept" else (FaultMode.FAIL,)
        return faults.take("node.ssh", name, modes, phase=phase, command=command) is not None

    # ------------------------------------------------------------------ commands

    def execute(
        self,
        node: LustreNode,
        transport: _Transport,
        channel: paramiko.Channel,
        command: str,
        replied: threading.Event,
    ) -> None:
        transport.accept(timeout=0)  # drop the queued channel: we serve it right here
        try:
            replied.wait(STDIN_TIMEOUT_S)
            stdin = self._read_stdin(channel) if needs_stdin(command) else b""
            with self.lock:
                self.fleet.backend.advance()
                if not node.up or self._ssh_fault(node.name, "accept", command):
                    transport.close()
                    return
                self.commands += 1
                self.commands_by_head[" ".join(command.split()[:2])] += 1
                result = run_command(self.fleet, node, command, stdin)
                dropped = self._ssh_fault(node.name, "complete", command)
                self.dropped += dropped
            if dropped:
                # The command took effect, the client never hears how it ended: no output,
                # no exit status, the connection gone (a session dropped mid-command).
                transport.close()
                return
            if result.stdout:
                channel.sendall(file_bytes(result.stdout))  # a file's bytes as they are
            if result.stderr:
                channel.sendall_stderr(result.stderr.encode())
            channel.send_exit_status(result.status)
            channel.shutdown_write()
            channel.close()
        except (OSError, EOFError, paramiko.SSHException):
            channel.close()

    def _read_stdin(self, channel: paramiko.Channel) -> bytes:
        channel.settimeout(STDIN_TIMEOUT_S)
        chunks: list[bytes] = []
        size = 0
        while size <= STDIN_LIMIT:
            data = channel.recv(65536)
            if not data:
                break
            chunks.append(data)
            size += len(data)
        return b"".join(chunks)

    def describe(self) -> dict[str, Any]:
        return {
            "listening": len(self._listening),
            "accepted": self.accepted,
            "commands": self.commands,
            "dropped": self.dropped,
            "commands_by_head": dict(self.commands_by_head.most_common()),
        }
