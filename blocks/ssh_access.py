"""``SshAccess``: user, private key, known_hosts, timeouts, retries, check budget for the nodes."""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import SecretStr

from amlfs.runtime import SshSettings
from blocks.fields import like, to_settings


class SshAccess(Block):
    """How the orchestrator logs in to nodes. Host keys are verified against ``known_hosts``
    (unknown or changed keys are refused). Every field is an ``SshSettings`` field, with its
    default and description."""

    _block_type_name = "AMLFS SSH Access"
    _description = "SSH user, key, known_hosts and check budget for AMLFS nodes."

    username: str = like(SshSettings, "username", default="amlfs")
    private_key: SecretStr = like(SshSettings, "private_key")
    known_hosts: str = like(SshSettings, "known_hosts")
    port: int = like(SshSettings, "port")
    connect_timeout_s: float = like(SshSettings, "connect_timeout_s")
    command_timeout_s: float = like(SshSettings, "command_timeout_s")
    attempts: int = like(SshSettings, "attempts")
    retry_wait_s: float = like(SshSettings, "retry_wait_s")
    retry_wait_max_s: float = like(SshSettings, "retry_wait_max_s")
    retry_budget_s: float = like(SshSettings, "retry_budget_s")
    max_checks_per_s: float = like(SshSettings, "max_checks_per_s")

    def settings(self) -> SshSettings:
        return to_settings(self, SshSettings)
