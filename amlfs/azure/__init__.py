"""The Azure Resource Manager side: credentials and the azure-mgmt-compute client.

Later steps add the disk/VM gateway here; today it holds what every caller needs to build a
``ComputeManagementClient`` against real Azure or the emulator (same code, other endpoint).
"""

from amlfs.azure.client import StaticTokenCredential, compute_client

__all__ = ["StaticTokenCredential", "compute_client"]
