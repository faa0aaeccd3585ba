"""The order an operator's form shows a model's fields in.

A form built from a JSON schema (the Prefect UI's run form) lists an object's properties in
the order of their ``position``, which survives where the schema is stored in a store that
reorders keys (PostgreSQL JSONB): the declaration order alone does not.
"""

from __future__ import annotations

from typing import Any

__all__ = ["declared_order"]


def declared_order(schema: dict[str, Any]) -> None:
    """Each property's ``position`` in ``schema`` (a model's JSON schema, changed in place):
    the order the model declares its fields in, the operator's first."""
    for position, field in enumerate(schema.get("properties", {}).values()):
        field["position"] = position
