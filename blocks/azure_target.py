"""``AzureTarget``: ARM endpoint, CA bundle, credential and polling budget for the Compute API."""

from __future__ import annotations

from typing import Literal

from prefect.blocks.core import Block
from pydantic import SecretStr

from amlfs.runtime import AzureSettings
from blocks.fields import like, to_settings


class AzureTarget(Block):
    """Where the fleet's VMs and disks live. Defaults: public Azure, DefaultAzureCredential
    (managed identity on a worker VM, az login on a laptop). Every field is an
    ``AzureSettings`` field, with its default and description."""

    _block_type_name = "AMLFS Azure Target"
    _description = "ARM endpoint, credential and polling budget for AMLFS maintenance."

    arm_url: str | None = like(AzureSettings, "arm_url")
    ca_file: str | None = like(AzureSettings, "ca_file")
    credential: Literal["default", "client_secret", "static_token"] = like(
        AzureSettings, "credential"
    )
    tenant_id: str | None = like(AzureSettings, "tenant_id")
    client_id: str | None = like(AzureSettings, "client_id")
    client_secret: SecretStr | None = like(AzureSettings, "client_secret")
    token: SecretStr | None = like(AzureSettings, "token")
    time_scale: float = like(AzureSettings, "time_scale")
    poll_interval_s: float = like(AzureSettings, "poll_interval_s")
    max_polls_per_s: float = like(AzureSettings, "max_polls_per_s")
    max_background_polls_per_s: float = like(AzureSettings, "max_background_polls_per_s")
    max_arm_reads_per_s: float = like(AzureSettings, "max_arm_reads_per_s")
    max_arm_writes_per_s: float = like(AzureSettings, "max_arm_writes_per_s")
    max_arm_deletes_per_s: float = like(AzureSettings, "max_arm_deletes_per_s")
    max_disk_lists_per_s: float = like(AzureSettings, "max_disk_lists_per_s")

    def settings(self) -> AzureSettings:
        return to_settings(self, AzureSettings)
