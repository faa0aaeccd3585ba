"""Build a ``ComputeManagementClient`` for an ARM endpoint, credential and CA bundle."""

from __future__ import annotations

import os
import time
from typing import Any

from pydantic import SecretStr
from requests.adapters import HTTPAdapter
from requests.utils import DEFAULT_CA_BUNDLE_PATH

from azure.core.credentials import AccessToken, TokenCredential
from azure.mgmt.compute import ComputeManagementClient

__all__ = ["CaCheckedOnceAdapter", "StaticTokenCredential", "compute_client"]

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


class CaCheckedOnceAdapter(HTTPAdapter):
    """An ``HTTPAdapter`` that looks at the CA bundle's path once, not on every request.

    requests asks the file system up to three times per request whether ``verify`` exists and
    is a directory. Each is a system call that lets go of the GIL and takes it back: with
    thousands of threads in a fleet run, every such hand-off is a wait (8% of the
    orchestrator's GIL samples in the 1,000-cluster profile). The bundle's path does not change
    while the process runs; a missing bundle is still refused, at the first request.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._is_dir: dict[str, bool] = {}

    def _ca_is_dir(self, location: str) -> bool:
        known = self._is_dir.get(location)
        if known is None:
            if not os.path.exists(location):
                raise OSError(f"no TLS CA certificate bundle at {location}")
            known = self._is_dir[location] = os.path.isdir(location)
        return known

    def build_connection_pool_key_attributes(
        self, request: Any, verify: Any, cert: Any = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        if isinstance(verify, str) and not self._ca_is_dir(verify):
            # What requests does for a bundle file, without its isdir() on the way.
            host, pool = super().build_connection_pool_key_attributes(request, True, cert)
            pool["ca_certs"] = verify
            return host, pool
        return super().build_connection_pool_key_attributes(request, verify, cert)

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        if cert or not verify or not url.lower().startswith("https"):
            super().cert_verify(conn, url, verify, cert)
            return
        location = verify if isinstance(verify, str) else DEFAULT_CA_BUNDLE_PATH
        conn.cert_reqs = "CERT_REQUIRED"
        if self._ca_is_dir(location):
            conn.ca_cert_dir = location
        else:
            conn.ca_certs = location


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

        from azure.core.pipeline.transport import RequestsTransport

        session = requests.Session()
        # requests re-reads the proxy variables from the environment on every request (~10%
        # of the orchestrator's CPU in the fleet profile): resolve them once, here.
        session.proxies.update(
            requests.utils.get_environ_proxies(arm_url or "https://management.azure.com")
        )
        session.trust_env = False
        adapter = CaCheckedOnceAdapter(pool_connections=4, pool_maxsize=pool_size, pool_block=True)
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
