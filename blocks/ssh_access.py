"""``SshAccess``: user, private key and known_hosts for the Lustre nodes."""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from amlfs.runtime import SshSettings


class SshAccess(Block):
    """How the orchestrator logs in to nodes. Host keys are verified against ``known_hosts``
    (unknown or changed keys are refused)."""

    _block_type_name = "AMLFS SSH Access"
    _description = "SSH user, key and known_hosts for AMLFS nodes."

    username: str = "amlfs"
    private_key: SecretStr = Field(description="OpenSSH private key (Ed25519, ECDSA or RSA)")
    known_hosts: str = Field(description="Path of the known_hosts file on the worker")
    port: int = Field(default=22, ge=1, le=65535)

    def settings(self) -> SshSettings:
        return SshSettings(
            username=self.username,
            private_key=self.private_key,
            known_hosts=self.known_hosts,
            port=self.port,
        )
