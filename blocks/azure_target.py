"""``AzureTarget``: ARM endpoint, CA bundle and credential for the Compute API."""

from __future__ import annotations

from typing import Literal

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from amlfs.runtime import AzureSettings


class AzureTarget(Block):
    """Where the fleet's VMs and disks live. Defaults: public Azure, DefaultAzureCredential
    (managed identity on a worker VM, az login on a laptop)."""

    _block_type_name = "AMLFS Azure Target"
    _description = "ARM endpoint and credential for AMLFS maintenance."

    arm_url: str | None = Field(default=None, description="None: https://management.azure.com")
    ca_file: str | None = Field(default=None, description="CA bundle (the emulator's own CA)")
    credential: Literal["default", "client_secret", "static_token"] = "default"
    tenant_id: str | None = None
    client_id: str | None = None
    client_secret: SecretStr | None = None
    token: SecretStr | None = Field(default=None, description="static_token only (emulator)")
    time_scale: float = Field(default=1.0, gt=0, description="Emulator sim seconds per second")
    poll_interval_s: float = Field(default=2.0, gt=0)

    def settings(self) -> AzureSettings:
        return AzureSettings(
            arm_url=self.arm_url,
            ca_file=self.ca_file,
            credential=self.credential,
            tenant_id=self.tenant_id,
            client_id=self.client_id,
            client_secret=self.client_secret,
            token=self.token,
            time_scale=self.time_scale,
            poll_interval_s=self.poll_interval_s,
        )
