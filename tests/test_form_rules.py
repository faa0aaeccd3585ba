"""The fleet run's cross-field rules as the Prefect server applies them, without a server:
the parameter schema Prefect builds from the flow, checked with the functions the server
calls (prefect 3.9.1): a deployment's own defaults with every ``required`` removed
(``prefect._internal.schemas.validators.validate_values_conform_to_schema``, as
``DeploymentCreate`` does), a run of it with them (``schema_tools.validate``, as
``create_flow_run_from_deployment`` and the UI's ``/ui/schemas/validate`` do).

Each case is also given to ``FleetParams`` itself: the schema refuses exactly what the model
refuses, so the UI's form and the REST API refuse a run before it is scheduled instead of a
run that fails at its start.
"""

from __future__ import annotations

from typing import Any

import pytest
from prefect._internal.schemas.validators import validate_values_conform_to_schema
from prefect.utilities.callables import parameter_schema
from prefect.utilities.schema_tools.validation import validate
from pydantic import ValidationError

from flows.fleet_maintenance import FleetParams, fleet_maintenance

BASE = {"fleet_file": "fleet.yaml", "release_file": "release.yaml"}
NAMED = {"names": ["lustre-eus-01"]}
OVERRIDE = {"override_window": True, "reason": "CVE-2026-0001"}


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return parameter_schema(fleet_maintenance.fn).model_dump_for_openapi()


def run_errors(schema: dict[str, Any], params: dict[str, Any]) -> list[str]:
    errors = validate({"params": params}, schema, preprocess=True)
    return [f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors]


def model_refuses(params: dict[str, Any]) -> bool:
    try:
        FleetParams.model_validate(params)
    except ValidationError:
        return True
    return False


CASES = [
    # (params, refused, a word the refusal names)
    ({**BASE, "mode": "hotfix"}, True, "selector"),
    ({**BASE, "mode": "hotfix", "selector": {"names": []}}, True, "names"),
    ({**BASE, "mode": "hotfix", "selector": {"waves": ["canary"]}}, True, "names"),
    ({**BASE, "mode": "hotfix", "selector": NAMED}, False, ""),
    ({**BASE, "mode": "hotfix", "selector": NAMED, "policy": OVERRIDE}, False, ""),
    (
        {**BASE, "mode": "hotfix", "selector": NAMED, "policy": {"override_window": True}},
        True,
        "reason",
    ),
    (
        {
            **BASE,
            "mode": "hotfix",
            "selector": NAMED,
            "policy": {"override_window": True, "reason": "  "},
        },
        True,
        "reason",
    ),
    ({**BASE, "mode": "manual", "policy": OVERRIDE}, True, "hotfix"),
    ({**BASE, "policy": OVERRIDE}, True, "mode"),
    ({**BASE, "mode": "manual"}, False, ""),
    ({**BASE, "mode": "scheduled", "policy": {"override_window": False}}, False, ""),
    ({**BASE, "mode": "manual", "selector": {"names": []}}, False, ""),
]


@pytest.mark.parametrize(("params", "refused", "named"), CASES)
def test_the_schema_refuses_what_the_model_refuses(
    schema: dict[str, Any], params: dict[str, Any], refused: bool, named: str
) -> None:
    assert model_refuses(params) is refused  # the model is the reference
    errors = run_errors(schema, params)
    assert bool(errors) is refused, errors
    if refused:
        assert any(named in e for e in errors), errors


@pytest.mark.parametrize(
    "defaults",
    [
        {**BASE, "mode": "hotfix"},  # the hotfix deployment's defaults name no cluster
        {**BASE, "mode": "manual", "dry_run": True},
        {**BASE, "mode": "scheduled"},
        {**BASE, "mode": "manual", "policy": {"waves": ["canary"]}},
    ],
)
def test_a_deployments_defaults_pass_where_a_run_of_them_may_not(
    schema: dict[str, Any], defaults: dict[str, Any]
) -> None:
    # What DeploymentCreate checks: raises ValueError on a refusal.
    validate_values_conform_to_schema({"params": defaults}, schema, ignore_required=True)


def test_removing_required_does_not_turn_a_condition_on(schema: dict[str, Any]) -> None:
    """A deployment whose defaults carry a policy without ``override_window`` and a mode
    other than hotfix: the override rule must not fire once ``required`` is gone."""
    validate_values_conform_to_schema(
        {"params": {**BASE, "mode": "manual", "policy": {"max_parallel": 4}}},
        schema,
        ignore_required=True,
    )
    with pytest.raises(ValueError, match="names"):
        validate_values_conform_to_schema(
            {"params": {**BASE, "mode": "hotfix", "selector": {"names": []}}},
            schema,
            ignore_required=True,
        )
