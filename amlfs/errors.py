"""The project's exception tree.

    AmlfsError
    ├── InventoryError          a fleet file or release is invalid (nothing was changed)
    └── (later) AzureError, NodeError, ... raised by the gateways

Errors of dependencies (pydantic, azure-core, paramiko) are mapped to these at the boundary,
so callers catch one tree. Messages never carry secrets.
"""

from __future__ import annotations

__all__ = ["AmlfsError", "InventoryError"]


class AmlfsError(Exception):
    """Base of every error this project raises on purpose."""


class InventoryError(AmlfsError):
    """The fleet inventory or a release is invalid; the message names the field."""
