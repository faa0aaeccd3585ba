"""SSH gateway to Lustre nodes over paramiko: verified host keys, reused connections."""

from amlfs.ssh.gateway import CommandResult, NodeShell, SshConfig, SshPool, load_private_key

__all__ = ["CommandResult", "NodeShell", "SshConfig", "SshPool", "load_private_key"]
