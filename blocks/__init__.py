"""Prefect Blocks: where the fleet lives (AzureTarget) and how to reach its nodes (SshAccess).

Save them once per Prefect workspace (``amlfs blocks register`` or the UI); flows load them
by name. Secrets are ``SecretStr``: the UI masks them and they never reach logs.
"""

from blocks.azure_target import AzureTarget
from blocks.ssh_access import SshAccess

__all__ = ["AzureTarget", "SshAccess"]
