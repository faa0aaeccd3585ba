"""The project's exception tree.

    AmlfsError
    ├── InventoryError          a fleet file, release or parameter is invalid (nothing changed)
    ├── NodeOutputError         a node answered something a parser cannot read
    ├── DataDiskGuardError      a VM update would change dataDisks: refused before sending
    ├── AzureError              an ARM call failed (mapped from azure-core at the boundary)
    │   ├── RetryableAzureError     throttling, 5xx, timeouts: try again with backoff
    │   └── PermanentAzureError     4xx, failed operation, bad image: do not retry
    ├── NodeError               SSH to a node failed
    │   ├── NodeUnreachableError    cannot connect, or the session dropped: try again later
    │   ├── NodeAccessDeniedError   authentication or host key refused: do not retry
    │   └── CommandFailedError      a command exited non-zero
    ├── HealthCheckError        a node or cluster did not reach the healthy state in time
    ├── DeadlineError           the downtime budget or window cannot hold the next step
    └── StateStoreError         the durable state store cannot be read or written

Errors of dependencies (pydantic, azure-core, paramiko) are mapped to these at the boundary,
so callers catch one tree. Messages never carry secrets.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AmlfsError",
    "AzureError",
    "CommandFailedError",
    "DataDiskGuardError",
    "DeadlineError",
    "HealthCheckError",
    "InventoryError",
    "NodeAccessDeniedError",
    "NodeError",
    "NodeOutputError",
    "NodeUnreachableError",
    "PermanentAzureError",
    "RetryableAzureError",
    "StateStoreError",
    "validation_problem",
    "validation_problems",
]


class AmlfsError(Exception):
    """Base of every error this project raises on purpose."""


class InventoryError(AmlfsError):
    """The fleet inventory, a release or a parameter is invalid; the message names the field."""


class NodeOutputError(AmlfsError):
    """A command's output does not have the expected format; names the command and line."""


class DataDiskGuardError(AmlfsError):
    """A VM body would change ``storageProfile.dataDisks``; it was not sent."""


class AzureError(AmlfsError):
    """An ARM request or long-running operation failed."""

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None):
        super().__init__(message)
        self.code = code
        self.status = status


class RetryableAzureError(AzureError):
    """Transient: throttling (429), server errors, timeouts, a hung operation."""


class PermanentAzureError(AzureError):
    """Not worth retrying: bad request, not found, conflict, a failed operation."""


class NodeError(AmlfsError):
    """Talking to a node over SSH failed."""

    def __init__(self, message: str, *, node: str):
        super().__init__(message)
        self.node = node


class NodeUnreachableError(NodeError):
    """Transient: the node refused or timed out the connection, or the session dropped."""


class NodeAccessDeniedError(NodeError):
    """The node cannot be trusted or will not let us in: authentication failed, or its host
    key is unknown or differs from known_hosts. Not a NodeUnreachableError: retrying cannot
    help, and a changed host key may be a man in the middle."""


class CommandFailedError(NodeError):
    """A command exited non-zero; carries its exit status and output."""

    def __init__(self, message: str, *, node: str, command: str, status: int, output: str):
        super().__init__(message, node=node)
        self.command = command
        self.status = status
        self.output = output


class HealthCheckError(AmlfsError):
    """A node or the cluster did not become healthy in time; the message says what failed."""


class DeadlineError(AmlfsError):
    """The next step would not fit the downtime budget or the window (with a rollback)."""


class StateStoreError(AmlfsError):
    """The durable state store cannot be read or written."""


def validation_problem(problem: Any) -> str:
    """One pydantic error's message as the operator reads it (without pydantic's prefix)."""
    return str(problem["msg"]).removeprefix("Value error, ")


def validation_problems(err: Any, *, located: bool = True) -> list[str]:
    """A pydantic ``ValidationError`` as ``field.path: message`` lines (or messages alone),
    never quoting the refused input (it may be a secret)."""
    return [
        (f"{'.'.join(str(part) for part in problem['loc']) or '(top level)'}: " if located else "")
        + validation_problem(problem)
        for problem in err.errors(include_url=False, include_input=False)
    ]
