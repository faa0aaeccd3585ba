"""The Blocks operators save for real Azure: every setting reaches the gateways, secrets stay
masked. Saved to and loaded from a real ``prefect server``."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, SecretStr

from amlfs.runtime import AzureSettings, Connections, SshSettings
from blocks import AzureTarget, SshAccess
from flows.cluster_upgrade import ClusterUpgradeParams, resolve_settings
from tests.conftest import PrefectServer


@pytest.mark.parametrize(
    ("block", "settings"), [(AzureTarget, AzureSettings), (SshAccess, SshSettings)]
)
def test_a_block_has_every_setting_with_its_default(
    block: type[BaseModel], settings: type[BaseModel]
) -> None:
    # A setting added to AzureSettings/SshSettings but not to its Block could not be set by an
    # operator (the session-4 pacer rates were missing from the Blocks this way).
    missing = sorted(set(settings.model_fields) - set(block.model_fields))
    assert not missing, f"{block.__name__} lacks {missing}"
    for name, field in settings.model_fields.items():
        if name == "username":  # SshAccess defaults it to "amlfs"; the settings require it
            continue
        assert block.model_fields[name].default == field.default, name


@pytest.mark.integration
def test_saved_blocks_load_into_the_settings_the_flows_use(
    prefect_server: PrefectServer,
) -> None:
    from prefect.events.worker import EventsWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    secret = "client-secret-value-0123"
    with temporary_settings({PREFECT_API_URL: prefect_server.url}):
        AzureTarget(
            credential="client_secret",
            tenant_id="t",
            client_id="c",
            client_secret=SecretStr(secret),
            max_polls_per_s=7,
            max_background_polls_per_s=3,
        ).save("test-azure", overwrite=True)
        SshAccess(
            private_key=SecretStr("-----BEGIN OPENSSH PRIVATE KEY-----\nnot a key\n"),
            known_hosts="/etc/amlfs/known_hosts",
            max_checks_per_s=9,
            command_timeout_s=120,
        ).save("test-ssh", overwrite=True)
        params = ClusterUpgradeParams(
            fleet_file="f.yaml",
            cluster="c",
            release_file="r.yaml",
            azure_block="test-azure",
            ssh_block="test-ssh",
        )
        azure, ssh = resolve_settings(params)
        # Saving a Block emits events to this server; send them now, not at interpreter exit
        # when the session's server is gone.
        EventsWorker.drain_all(timeout=30)

    assert azure.client_secret is not None
    assert azure.client_secret.get_secret_value() == secret
    assert secret not in repr(azure)
    assert secret not in str(azure.model_dump())
    assert (azure.max_polls_per_s, azure.max_background_polls_per_s) == (7, 3)
    assert (ssh.max_checks_per_s, ssh.command_timeout_s, ssh.username) == (9, 120, "amlfs")
    connections = Connections(azure, ssh)
    assert connections.pacer("polls").interval == pytest.approx(1 / 7)
    assert connections.pacer("background_polls").interval == pytest.approx(1 / 3)
    assert connections.pacer("node_checks").interval == pytest.approx(1 / 9)
