"""The order an operator's form shows a model's fields in.

A form built from a JSON schema (the Prefect UI's run form) lists an object's properties in
the order of their ``position``, which survives where the schema is stored in a store that
reorders keys (PostgreSQL JSONB): the declaration order alone does not.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, Field

from amlfs.store import StoreLocation

__all__ = [
    "STATE_DIR",
    "AzureBlockName",
    "EmulatorEndpoint",
    "SshBlockName",
    "StateDir",
    "declared_order",
]

# Where a run finds the world, the same in every form that starts one (cluster upgrade,
# fleet run, rollout start and tick): declared once here.

#: The embedded store's directory, the default of every form.
STATE_DIR = ".amlfs-state"

StateDir = Annotated[
    StoreLocation,
    Field(description="State store: a directory, or postgresql://USER@HOST/DB (no password)"),
]
AzureBlockName = Annotated[str, Field(description="Saved AzureTarget Block (Azure, or emulator)")]
SshBlockName = Annotated[str, Field(description="Saved SshAccess Block (the nodes' SSH)")]

#: The emulator's endpoint file, or "" for the saved Blocks. A plain string, not
#: ``str | None``: the Prefect UI draws an optional string as a type picker ("Property is type
#: None"); a null from an older caller or deployment still means "none".
EmulatorEndpoint = Annotated[
    str,
    BeforeValidator(lambda value: "" if value is None else value),
    Field(description="amlfs-sim endpoint.json (tests, demo); empty: the Blocks below"),
]


def declared_order(schema: dict[str, Any]) -> None:
    """Each property's ``position`` in ``schema`` (a model's JSON schema, changed in place):
    the order the model declares its fields in, the operator's first."""
    for position, field in enumerate(schema.get("properties", {}).values()):
        field["position"] = position
