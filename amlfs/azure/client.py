"""Build a ``ComputeManagementClient`` for an ARM endpoint, credential and CA bundle."""

from __future__ import annotations

import time
from typing import Any

from pydantic import SecretStr

from azure.core.credentials import AccessToken, TokenCredential
from azure.mgmt.compute import ComputeManagementClient

__all__ = ["StaticTokenCredential", "compute_client"]

ARM_SCOPE = "https://management.azure.com/.default"


class StaticTokenCredential:
    """A fixed bearer token (the emulator accepts any); the token never appears in a repr."""

    def __init__(self, token: SecretStr | str, lifetime_s: int = 3600) -> None:
        self._token = token if isinstance(token, SecretStr) else SecretStr(token)
        self._lifetime_s = lifetime_s

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        return AccessToken(self._token.get_secret_value(), int(time.time()) + self._lifetime_s)

    def __repr__(self) -> str:
        return "StaticTokenCredential(token=**********)"


def compute_client(
    subscription_id: str,
    credential: TokenCredential,
    *,
    arm_url: str | None = None,
    ca_file: str | None = None,
    polling_interval: float | None = None,
    pool_size: int | None = None,
    **kwargs: Any,
) -> ComputeManagementClient:
    """A Compute client; ``arm_url``/``ca_file`` point it at the emulator or a sovereign cloud.

    ``pool_size``: HTTPS connections per host, at most. The default (10, and not blocking)
    makes a fleet run with many VMs in flight open and drop a TLS connection per request; a
    request beyond ``pool_size`` waits for a free connection instead (measured: with 800 VMs
    polled at once and a non-blocking pool of 64, the orchestrator spent its time in TLS
    handshakes, 500 at once, and starved everything else).
    """
    options: dict[str, Any] = dict(kwargs)
    if pool_size is not None:
        import requests
        from requests.adapters import HTTPAdapter

        from azure.core.pipeline.transport import RequestsTransport

        session = requests.Session()
        # requests re-reads the proxy variables from the environment on every request (~10%
        # of the orchestrator's CPU in the fleet profile): resolve them once, here.
        session.proxies.update(
            requests.utils.get_environ_proxies(arm_url or "https://management.azure.com")
        )
        session.trust_env = False
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=pool_size, pool_block=True)
        session.mount("https://", adapter)
        session.mount("http://", adapter)
        transport_options: dict[str, Any] = {}
        if ca_file is not None:  # a transport of our own does not see connection_verify
            transport_options["connection_verify"] = ca_file
        options["transport"] = RequestsTransport(
            session=session, session_owner=True, **transport_options
        )
    if arm_url is not None:
        options["base_url"] = arm_url
        options["credential_scopes"] = [ARM_SCOPE]
    if ca_file is not None:
        options["connection_verify"] = ca_file
    if polling_interval is not None:
        options["polling_interval"] = polling_interval
    return ComputeManagementClient(credential, subscription_id, **options)
