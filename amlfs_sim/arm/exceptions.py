"""ARM-shaped errors: an HTTP status and ``{"error": {"code", "message"}}``."""

from __future__ import annotations

__all__ = ["ArmError", "bad_request", "conflict", "not_found"]


class ArmError(Exception):
    """An error the emulator answers with, as Azure Resource Manager shapes it."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message

    def body(self) -> dict[str, object]:
        return {"error": {"code": self.code, "message": self.message}}


def not_found(resource_type: str, name: str, resource_group: str) -> ArmError:
    return ArmError(
        404,
        "ResourceNotFound",
        f"The Resource '{resource_type}/{name}' under resource group '{resource_group}' "
        "was not found. For more details please go to https://aka.ms/ARMResourceNotFoundFix",
    )


def conflict(code: str, message: str) -> ArmError:
    return ArmError(409, code, message)


def bad_request(code: str, message: str) -> ArmError:
    return ArmError(400, code, message)
