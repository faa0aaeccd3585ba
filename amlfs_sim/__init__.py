"""amlfs_sim: a fleet of Azure VMs and Lustre nodes on one machine, for tests, demo and benchmarks.

The ARM side (``amlfs_sim.arm``) is an HTTPS subset of the Azure Compute API that the real
``azure-mgmt-compute`` client talks to. ``Emulator`` starts it in-process; ``amlfs-sim serve``
runs it as a process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from amlfs_sim.server import Emulator, EndpointInfo

__all__ = ["Emulator", "EndpointInfo"]


def __getattr__(name: str) -> Any:
    # Lazy: the server pulls in uvicorn and FastAPI, which `gen-fleet` and unit tests don't need.
    if name in __all__:
        from amlfs_sim import server

        return getattr(server, name)
    raise AttributeError(name)
