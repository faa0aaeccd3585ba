"""409 is not always busy: only a conflict with another operation is retried; a permanent one
(PropertyChangeNotAllowed, a state no retry changes) fails at once, since each retry in the
customer's downtime costs the customer. The emulator counts what it was sent."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from azure.core.exceptions import HttpResponseError

from amlfs.azure.gateway import map_azure_error
from amlfs.errors import PermanentAzureError, RetryableAzureError
from amlfs.runtime import Connections
from amlfs.saga import Outcome
from tests.conftest import Sim
from tests.test_cluster_upgrade import assert_customer_safe, upgrade

TARGET = "eus01-oss1"

# Conflicts as Azure words them (amlfs/azure/gateway.py and amlfs_sim/arm/README.md cite where).
PERMANENT = {
    "generation": (
        "PropertyChangeNotAllowed",
        "Swapping OS Disk is not supported since HyperVisor property on the OSDisk and VM do "
        "not match. Please make sure the HyperVisor property on the OSDisk is HyperVisor "
        "Generation 'V2'",
    ),
    "property": ("PropertyChangeNotAllowed", "Changing property 'osDisk.name' is not allowed."),
    "vm-state": (
        "OperationNotAllowed",
        "The operation requires the VM to be running (or set to run).",
    ),
    "deleting": (
        "OperationNotAllowed",
        f"Operation 'Update VM' is not allowed on VM '{TARGET}' since the VM is marked for "
        "deletion. You can only retry the Delete operation (or wait for an ongoing one to "
        "complete).",
    ),
    "state": ("Conflict", "Disk resizing is allowed only when the VM is deallocated."),
}
BUSY = {
    "another-operation": (
        "AnotherOperationInProgress",
        "Another operation on this or dependent resource is in progress.",
    ),
    "preempted": (
        "OperationPreempted",
        "Operation execution has been preempted by a more recent operation.",
    ),
    "vm-busy": (
        "Conflict",
        f"Operation 'PUT' is not allowed on VM '{TARGET}' since the VM is busy with operation "
        "'vm.put'. Retry after it completes.",
    ),
}


def put_fault(sim: Sim, code: str, message: str, count: int) -> None:
    sim.fault(
        kind="vm.put",
        target=TARGET,
        mode="fail",
        phase="accept",
        status=409,
        code=code,
        message=message,
        count=count,
    )


def fired(sim: Sim) -> int:
    rules: list[dict[str, Any]] = sim.control.get("/faults").json()["value"]
    return sum(int(rule["fired"]) for rule in rules)


def refused_put(sim: Sim) -> HttpResponseError:
    """What the SDK raises for the PUT the fault refuses."""
    compute = sim.compute()
    rg = sim.cluster.resource_group
    vm = compute.virtual_machines.get(rg, TARGET)
    with pytest.raises(HttpResponseError) as caught:
        compute.virtual_machines.begin_create_or_update(rg, TARGET, vm)
    return caught.value


@pytest.mark.parametrize("name", [*PERMANENT, *BUSY])
def test_a_409_is_retryable_only_when_the_resource_is_busy(sim: Sim, name: str) -> None:
    code, message = PERMANENT.get(name) or BUSY[name]
    put_fault(sim, code, message, count=1)
    mapped = map_azure_error(refused_put(sim), f"update VM {TARGET}")
    assert mapped.status == 409
    assert mapped.code == code
    assert isinstance(mapped, RetryableAzureError if name in BUSY else PermanentAzureError)


@pytest.mark.parametrize("name", ["generation", "property"])
def test_a_permanent_409_on_the_swap_is_not_retried(
    sim: Sim, conns: Connections, tmp_path: Path, name: str
) -> None:
    code, message = PERMANENT[name]
    put_fault(sim, code, message, count=3)
    result = upgrade(sim, conns, tmp_path)
    assert result.outcome is Outcome.ROLLED_BACK, result.reason
    assert code in result.reason
    assert fired(sim) == 1  # one PUT refused, none sent again
    assert_customer_safe(sim, "2.15.5")


@pytest.mark.parametrize("name", list(BUSY))
def test_a_busy_409_on_the_swap_is_retried(
    sim: Sim, conns: Connections, tmp_path: Path, name: str
) -> None:
    code, message = BUSY[name]
    put_fault(sim, code, message, count=2)
    result = upgrade(sim, conns, tmp_path)
    assert result.outcome is Outcome.UPGRADED, result.reason
    assert fired(sim) == 2  # refused twice, then sent a third time and swapped
    assert_customer_safe(sim, "2.15.6")
