"""Block fields declared from the settings models, so a Block cannot drift from what it builds.

A Block lists its fields explicitly (the Prefect UI builds its form from them), but each one
takes its default, bounds and description from the ``amlfs.runtime`` settings model field of
the same name, and ``to_settings`` passes every field of that model through.
"""

from __future__ import annotations

import copy
from typing import Any, TypeVar

from pydantic import BaseModel

__all__ = ["like", "to_settings"]

M = TypeVar("M", bound=BaseModel)
_UNSET: Any = object()


def like(model: type[BaseModel], name: str, *, default: Any = _UNSET) -> Any:
    """The field ``name`` of ``model`` (a copy), optionally with another default."""
    field = copy.copy(model.model_fields[name])
    if default is not _UNSET:
        field.default = default
    return field


def to_settings(block: BaseModel, model: type[M]) -> M:
    """``model`` built from the block's fields of the same names."""
    return model(**{name: getattr(block, name) for name in model.model_fields})
