"""Fault injection: rules that make emulated operations fail, throttle, hang or slow down.

A rule matches an operation kind (``vm.put``, ``disk.create``...; ``*`` globs allowed) and a
target resource name (glob, case-insensitive). It fires for the next ``count`` matching
requests, or with ``probability`` on each, drawn from the emulator's seeded RNG.
"""

from __future__ import annotations

import fnmatch
import itertools
import random
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["OP_KINDS", "FaultBook", "FaultMode", "FaultSpec"]

OP_KINDS = (
    "vm.get",
    "vm.list",
    "vm.instance_view",
    "vm.put",
    "vm.patch",
    "vm.power_off",
    "vm.start",
    "vm.restart",
    "vm.deallocate",
    "disk.get",
    "disk.list",
    "disk.create",
    "disk.update",
    "disk.delete",
    "image.get",
    "operation.poll",
    # Node faults, matched on the VM name: a crash (fail) or a bad image (code BadImage) at
    # the next boot; SSH refused while the rule fires (phase accept, the default for
    # node.ssh), or a command run and its session dropped before the exit status (phase
    # complete); recovery that never completes.
    "node.boot",
    "node.ssh",
    "node.recovery",
)


class FaultMode(StrEnum):
    FAIL = "fail"  # the request (phase=accept) or the long-running operation (complete) fails
    THROTTLE = "throttle"  # 429 storm
    HANG = "hang"  # the operation stays InProgress until reset
    SLOW = "slow"  # the operation takes ``factor`` times longer


class FaultSpec(BaseModel):
    """Body of ``POST /faults``."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: str
    target: str = "*"
    mode: FaultMode = FaultMode.FAIL
    code: str = "InternalServerError"
    message: str = "Injected fault."
    status: int = Field(default=500, ge=400, le=599)
    # FAIL rules: ``accept`` refuses the request before it does anything, ``complete`` lets
    # it take effect and then fails it (an ARM operation fails; an SSH command runs and its
    # session drops before the exit status is sent). None: the kind's default, ``accept`` for
    # node.ssh (a refused connection or command) and ``complete`` for everything else.
    phase: str | None = Field(default=None, pattern="^(accept|complete)$")
    # node.ssh only: fire for commands whose line matches this glob (``iptables -I *``), not
    # for connections; None: any command or connection.
    command: str | None = None
    count: int | None = Field(default=None, ge=1)
    probability: float | None = Field(default=None, gt=0, le=1)
    retry_after_s: float = Field(default=10.0, ge=0)
    factor: float = Field(default=5.0, gt=0)
    # hang: None stays InProgress until reset; a number finishes the operation that many sim
    # seconds late (a stuck operation Azure eventually completes).
    hang_s: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _check(self) -> FaultSpec:
        if not any(fnmatch.fnmatchcase(k, self.kind) for k in OP_KINDS):
            raise ValueError(f"kind {self.kind!r} matches no operation kind; known: {OP_KINDS}")
        return self

    @property
    def uses(self) -> int | None:
        """How many times the rule fires: ``count``, unlimited with a probability, else once."""
        if self.count is not None:
            return self.count
        return None if self.probability is not None else 1


_DEFAULT_PHASE = {"node.ssh": "accept"}


@dataclass
class _Rule:
    id: int
    spec: FaultSpec
    remaining: int | None
    fired: int = 0


@dataclass
class FaultBook:
    rng: random.Random
    rules: list[_Rule] = field(default_factory=list)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def add(self, spec: FaultSpec) -> int:
        rule = _Rule(next(self._ids), spec, spec.uses)
        self.rules.append(rule)
        return rule.id

    def clear(self) -> None:
        self.rules.clear()

    def take(
        self,
        kind: str,
        target: str,
        modes: tuple[FaultMode, ...],
        *,
        phase: str = "complete",
        command: str | None = None,
    ) -> FaultSpec | None:
        """The first rule of one of ``modes`` that fires for this request, consuming one use.

        ``phase`` selects FAIL rules: ``accept`` ones refuse the request itself, ``complete``
        ones let it start and fail the long-running operation. ``command``: the command line
        of a node.ssh request (None for a connection), matched against a rule's ``command``.
        """
        for rule in self.rules:
            spec = rule.spec
            if spec.mode not in modes or rule.remaining == 0:
                continue
            if (
                spec.mode is FaultMode.FAIL
                and (spec.phase or _DEFAULT_PHASE.get(kind, "complete")) != phase
            ):
                continue
            if not fnmatch.fnmatchcase(kind, spec.kind):
                continue
            if not fnmatch.fnmatchcase(target.lower(), spec.target.lower()):
                continue
            if spec.command is not None and (
                command is None or not fnmatch.fnmatchcase(command, spec.command)
            ):
                continue
            if spec.probability is not None and self.rng.random() >= spec.probability:
                continue
            if rule.remaining is not None:
                rule.remaining -= 1
            rule.fired += 1
            return spec
        return None

    def describe(self) -> list[dict[str, Any]]:
        return [
            {
                "id": r.id,
                **r.spec.model_dump(mode="json"),
                "remaining": r.remaining,
                "fired": r.fired,
            }
            for r in self.rules
        ]
