"""Routes of the emulated ARM surface (the coverage table is in amlfs_sim/arm/README.md).

Every route runs the same admission under the backend lock: advance sim time, check the
api-version, let ARM meter the request (per subscription and principal: reads, writes,
deletes), resolve its target, let Compute meter it (its policy for the request class), apply
accept-phase faults, then act. Handlers are ``async`` and do only in-memory work, so no thread
pool is involved.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response

from amlfs_sim.arm.backend import ArmBackend
from amlfs_sim.arm.exceptions import ArmError, bad_request
from amlfs_sim.arm.models import Operation, OpStatus
from amlfs_sim.arm.responses import (
    SimTime,
    disk_json,
    image_definition_json,
    image_json,
    instance_view_json,
    operation_json,
    vm_json,
)
from amlfs_sim.arm.throttling import ArmDecision, ArmOperation, RequestClass, ThrottleDecision

__all__ = ["create_arm_router"]

RG = "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Compute"
VMS = RG + "/virtualMachines"
DISKS = RG + "/disks"
IMAGE_DEFINITION = RG + "/galleries/{gallery}/images/{image}"
IMAGE = IMAGE_DEFINITION + "/versions/{version}"
OPERATION = "/subscriptions/{sub}/providers/Microsoft.Compute/locations/{region}/operations/{op_id}"
OLDEST_API_VERSION = "2023-01-01"


def json_response(status: int, body: Any = None, headers: dict[str, str] | None = None) -> Response:
    content = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
    out = {"x-ms-request-id": str(uuid.uuid4())}
    if headers:
        out.update(headers)
    media = "application/json; charset=utf-8" if body is not None else None
    return Response(content=content, status_code=status, headers=out, media_type=media)


def error_response(err: ArmError, headers: dict[str, str] | None = None) -> Response:
    return json_response(err.status, err.body(), headers)


def principal_of(token: str) -> str:
    """The principal ARM meters a bearer token under: a JWT's ``oid`` (or ``appid``) as Entra
    ID issues it, else a GUID derived from the token (the emulator takes any token; the token
    itself never appears in an answer)."""
    parts = token.split(".")
    if len(parts) == 3:
        try:
            payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
        except (ValueError, binascii.Error):
            payload = None
        if isinstance(payload, dict):
            for claim in ("oid", "appid", "sub"):
                if isinstance(payload.get(claim), str) and payload[claim]:
                    return str(payload[claim])
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "amlfs-sim-principal:" + token))


def create_arm_router(backend: ArmBackend, times: SimTime) -> APIRouter:
    router = APIRouter()
    scale = backend.clock.time_scale

    def retry_headers(sim_seconds: float) -> dict[str, str]:
        # Under a time scale Retry-After is left out: azure-core reads it before retry-after-ms,
        # and the generated clients parse it as an int, so it cannot carry a sub-second real
        # wait. retry-after-ms carries the scaled wait; x-ms-sim-retry-after the sim seconds.
        sim_seconds = max(sim_seconds, 0.0)
        if scale == 1:
            return {"Retry-After": str(math.ceil(sim_seconds))}
        real_ms = sim_seconds / scale * 1000
        return {
            "retry-after-ms": str(max(1, round(real_ms))),
            "x-ms-sim-retry-after": str(math.ceil(sim_seconds)),
        }

    def throttled(decision: ThrottleDecision) -> Response:
        """Compute's 429 ("Troubleshooting API throttling errors"): OperationNotAllowed, one
        TooManyRequests detail naming the policy, its window and counts as a JSON string."""
        headers = retry_headers(max(decision.retry_after_s, 1.0))
        if decision.remaining_header:
            headers["x-ms-ratelimit-remaining-resource"] = decision.remaining_header
        group = decision.policy.rsplit("/", 1)[-1]
        detail = {
            "operationGroup": group,
            "startTime": times.iso(decision.window[0]),
            "endTime": times.iso(decision.window[1]),
            "allowedRequestCount": decision.allowed_count,
            "measuredRequestCount": decision.measured_count,
        }
        body = {
            "error": {
                "code": "OperationNotAllowed",
                "message": "The server rejected the request because too many requests have "
                "been received for this subscription.",
                "details": [
                    {
                        "code": "TooManyRequests",
                        "target": group,
                        "message": json.dumps(detail, separators=(",", ":")),
                    }
                ],
            }
        }
        return json_response(429, body, headers)

    def arm_throttled(decision: ArmDecision, sub: str, principal: str) -> Response:
        """ARM's own 429, before the request reaches Compute: SubscriptionRequestsThrottled."""
        wait = max(decision.retry_after_s, 1.0)
        headers = {**retry_headers(wait), **decision.headers()}
        who = "" if decision.global_limit else f" actor '{principal}'"
        err = ArmError(
            429,
            "SubscriptionRequestsThrottled",
            f"Number of '{decision.operation.value}' requests for subscription '{sub}'{who} "
            f"exceeded. Please try again after '{math.ceil(wait)}' seconds after additional "
            "tokens are available. Refer to https://aka.ms/arm-throttling for additional "
            "information.",
        )
        return error_response(err, headers)

    def handle(
        request: Request,
        kind: str,
        request_class: RequestClass | Callable[[], RequestClass],
        sub: str,
        target: Callable[[], tuple[str, str, str]],
        act: Callable[[], Response],
    ) -> Response:
        """``target`` gives (region, resource id, name); raising ArmError answers with it.
        ``request_class`` may be known only once the target is (an operation's kind)."""
        auth = request.headers.get("authorization", "")
        token = auth[7:].strip()
        if not auth.lower().startswith("bearer ") or not token:
            return error_response(
                ArmError(
                    401,
                    "AuthenticationFailed",
                    "Authentication failed. The 'Authorization' header is missing or not Bearer.",
                )
            )
        with backend.lock:
            backend.advance()
            decision: ThrottleDecision | None = None
            arm: ArmDecision | None = None
            try:
                version = request.query_params.get("api-version")
                if not version:
                    raise bad_request(
                        "MissingApiVersionParameter",
                        "The api-version query parameter (?api-version=) is required for all "
                        "requests.",
                    )
                if version < OLDEST_API_VERSION:
                    raise bad_request(
                        "InvalidApiVersionParameter",
                        f"The api-version '{version}' is invalid; the emulator serves "
                        f"{OLDEST_API_VERSION} and later.",
                    )
                # ARM meters every request that reached it, found or not, before routing it.
                principal = principal_of(token)
                arm = backend.admit_arm(
                    kind, ArmOperation.of_method(request.method), sub, principal
                )
                if not arm.allowed:
                    return arm_throttled(arm, sub, principal)
                region, resource_id, name = target()
                metered = (
                    request_class if isinstance(request_class, RequestClass) else request_class()
                )
                decision = backend.admit(kind, metered, sub, region, resource_id, name)
                response = act() if decision.allowed else throttled(decision)
            except ArmError as err:
                response = error_response(err)
            if arm is not None:
                response.headers.update(arm.headers())
            if decision is not None and decision.remaining_header:
                response.headers["x-ms-ratelimit-remaining-resource"] = decision.remaining_header
            return response

    def lro(request: Request, op: Operation, status: int, body: Any, *, location: bool) -> Response:
        base = str(request.base_url).rstrip("/")
        version = request.query_params.get("api-version", "")
        status_url = (
            f"{base}/subscriptions/{op.subscription_id}/providers/Microsoft.Compute/locations/"
            f"{op.region}/operations/{op.id}?api-version={version}"
        )
        headers = {
            "Azure-AsyncOperation": status_url,
            **retry_headers(backend.world.spec.poll_interval_s),
        }
        if location:
            headers["Location"] = status_url + "&monitor=true"
        return json_response(status, body, headers)

    async def read_body(request: Request) -> Any:
        raw = await request.body()
        try:
            return json.loads(raw) if raw else {}
        except ValueError:
            return None

    def vm_target(sub: str, rg: str, name: str) -> Callable[[], tuple[str, str, str]]:
        def target() -> tuple[str, str, str]:
            vm = backend.vm(sub, rg, name)
            return vm.location, vm.id, vm.name

        return target

    def group_target(sub: str, rg: str, name: str = "*") -> Callable[[], tuple[str, str, str]]:
        def target() -> tuple[str, str, str]:
            return backend.region_of(sub, rg), f"/subscriptions/{sub}/resourceGroups/{rg}", name

        return target

    # ------------------------------------------------------------------ VMs

    @router.get(VMS)
    async def list_vms(request: Request, sub: str, rg: str) -> Response:
        return handle(
            request,
            "vm.list",
            RequestClass.VM_LIST,
            sub,
            group_target(sub, rg),
            lambda: json_response(
                200, {"value": [vm_json(backend, vm, times) for vm in backend.vms_in(sub, rg)]}
            ),
        )

    @router.get(VMS + "/{name}")
    async def get_vm(request: Request, sub: str, rg: str, name: str) -> Response:
        expand = request.query_params.get("$expand", "").lower() == "instanceview"
        return handle(
            request,
            "vm.get",
            RequestClass.VM_GET,
            sub,
            vm_target(sub, rg, name),
            lambda: json_response(
                200, vm_json(backend, backend.vm(sub, rg, name), times, instance_view=expand)
            ),
        )

    @router.get(VMS + "/{name}/instanceView")
    async def get_instance_view(request: Request, sub: str, rg: str, name: str) -> Response:
        return handle(
            request,
            "vm.instance_view",
            RequestClass.VM_GET,
            sub,
            vm_target(sub, rg, name),
            lambda: json_response(
                200, instance_view_json(backend, backend.vm(sub, rg, name), times)
            ),
        )

    async def _update_vm(request: Request, sub: str, rg: str, name: str, patch: bool) -> Response:
        body = await read_body(request)

        def act() -> Response:
            if body is None:
                raise bad_request("InvalidRequestContent", "The request content is not valid JSON.")
            if not isinstance(body, dict) or (not patch and not body.get("location")):
                raise bad_request("LocationRequired", "The location property is required.")
            vm = backend.vm(sub, rg, name)
            op = backend.update_vm(vm, body, patch=patch)
            return lro(request, op, 200, vm_json(backend, vm, times), location=False)

        kind = "vm.patch" if patch else "vm.put"
        return handle(request, kind, RequestClass.VM_WRITE, sub, vm_target(sub, rg, name), act)

    @router.put(VMS + "/{name}")
    async def put_vm(request: Request, sub: str, rg: str, name: str) -> Response:
        return await _update_vm(request, sub, rg, name, patch=False)

    @router.patch(VMS + "/{name}")
    async def patch_vm(request: Request, sub: str, rg: str, name: str) -> Response:
        return await _update_vm(request, sub, rg, name, patch=True)

    actions = {
        "powerOff": ("vm.power_off", backend.power_off),
        "start": ("vm.start", backend.start),
        "restart": ("vm.restart", backend.restart),
        "deallocate": ("vm.deallocate", backend.deallocate),
    }

    @router.post(VMS + "/{name}/{action}")
    async def vm_action(request: Request, sub: str, rg: str, name: str, action: str) -> Response:
        if action not in actions:
            return error_response(
                ArmError(
                    400,
                    "InvalidResourceType",
                    f"The VM action '{action}' is not supported by the "
                    f"emulator (supported: {', '.join(actions)}).",
                )
            )
        kind, method = actions[action]

        def act() -> Response:
            op = method(backend.vm(sub, rg, name))
            return lro(request, op, 202, None, location=True)

        # Compute meters deallocate as "Delete VM", the other actions as "Update VM".
        request_class = RequestClass.VM_DELETE if action == "deallocate" else RequestClass.VM_WRITE
        return handle(request, kind, request_class, sub, vm_target(sub, rg, name), act)

    # ------------------------------------------------------------------ disks

    @router.get(DISKS)
    async def list_disks(request: Request, sub: str, rg: str) -> Response:
        return handle(
            request,
            "disk.list",
            RequestClass.DISK_LIST,
            sub,
            group_target(sub, rg),
            lambda: json_response(
                200, {"value": [disk_json(d, times) for d in backend.disks_in(sub, rg)]}
            ),
        )

    @router.get(DISKS + "/{name}")
    async def get_disk(request: Request, sub: str, rg: str, name: str) -> Response:
        return handle(
            request,
            "disk.get",
            RequestClass.DISK_GET,
            sub,
            group_target(sub, rg, name),
            lambda: json_response(200, disk_json(backend.disk(sub, rg, name), times)),
        )

    async def _put_disk(request: Request, sub: str, rg: str, name: str, patch: bool) -> Response:
        body = await read_body(request)

        def act() -> Response:
            if body is None:
                raise bad_request("InvalidRequestContent", "The request content is not valid JSON.")
            disk, op, created = backend.put_disk(sub, rg, name, body, patch=patch)
            status = 202 if created or patch else 200
            return lro(request, op, status, disk_json(disk, times), location=True)

        kind = (
            "disk.update"
            if patch
            else (
                "disk.update"
                if backend.disks.get((sub.lower(), rg.lower(), name.lower()))
                else "disk.create"
            )
        )
        return handle(request, kind, RequestClass.DISK_WRITE, sub, group_target(sub, rg, name), act)

    @router.put(DISKS + "/{name}")
    async def put_disk(request: Request, sub: str, rg: str, name: str) -> Response:
        return await _put_disk(request, sub, rg, name, patch=False)

    @router.patch(DISKS + "/{name}")
    async def patch_disk(request: Request, sub: str, rg: str, name: str) -> Response:
        return await _put_disk(request, sub, rg, name, patch=True)

    @router.delete(DISKS + "/{name}")
    async def delete_disk(request: Request, sub: str, rg: str, name: str) -> Response:
        def act() -> Response:
            op = backend.delete_disk(sub, rg, name)
            if op is None:
                return json_response(204)
            return lro(request, op, 202, None, location=True)

        return handle(
            request, "disk.delete", RequestClass.DISK_DELETE, sub, group_target(sub, rg, name), act
        )

    # ------------------------------------------------------------------ gallery

    @router.get(IMAGE)
    async def get_image(
        request: Request, sub: str, rg: str, gallery: str, image: str, version: str
    ) -> Response:
        return handle(
            request,
            "image.get",
            RequestClass.GALLERY_GET,
            sub,
            group_target(sub, rg, f"{gallery}/{image}/{version}"),
            lambda: json_response(200, image_json(backend.image(sub, rg, gallery, image, version))),
        )

    @router.get(IMAGE_DEFINITION)
    async def get_image_definition(
        request: Request, sub: str, rg: str, gallery: str, image: str
    ) -> Response:
        return handle(
            request,
            "image.get",
            RequestClass.GALLERY_GET,
            sub,
            group_target(sub, rg, f"{gallery}/{image}"),
            lambda: json_response(
                200, image_definition_json(backend.image_definition(sub, rg, gallery, image))
            ),
        )

    # ------------------------------------------------------------------ operations

    @router.get(OPERATION)
    async def get_operation(request: Request, sub: str, region: str, op_id: str) -> Response:
        monitor = request.query_params.get("monitor", "").lower() == "true"

        def find() -> Operation:
            op = backend.operations.get(op_id)
            if op is None or op.subscription_id.lower() != sub.lower():
                raise ArmError(404, "NotFound", f"The operation '{op_id}' was not found.")
            return op

        def target() -> tuple[str, str, str]:
            op = find()
            return op.region, op.target_id, op.target

        def act() -> Response:
            op = find()
            backend.polls_by_operation[op.kind] += 1
            if op.status is OpStatus.IN_PROGRESS:
                headers = retry_headers(backend.world.spec.poll_interval_s)
                if monitor:
                    headers["Location"] = str(request.url)
                    return json_response(202, None, headers)
                return json_response(200, operation_json(op, times), headers)
            if monitor:
                if op.status is OpStatus.FAILED:
                    return error_response(
                        ArmError(
                            500,
                            op.error_code or "InternalServerError",
                            op.error_message or "Operation failed.",
                        )
                    )
                return json_response(200)
            return json_response(200, operation_json(op, times))

        def request_class() -> RequestClass:
            disk = find().kind.startswith("disk.")
            return RequestClass.DISK_OPERATION_POLL if disk else RequestClass.VM_OPERATION_POLL

        return handle(request, "operation.poll", request_class, sub, target, act)

    return router


def create_app(backend: ArmBackend, times: SimTime) -> FastAPI:
    from amlfs_sim.control import create_control_router

    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None, title="amlfs-sim")
    app.include_router(create_arm_router(backend, times))
    app.include_router(create_control_router(backend, times), prefix="/_sim")
    return app
