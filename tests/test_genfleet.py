"""Generated fleets are valid inventories, deterministic, with unique loopback addresses."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amlfs.models import Role, parse_fleet
from amlfs_sim.genfleet import generate_fleet, loopback_address, roles_for


@pytest.mark.parametrize(("clusters", "nodes"), [(3, 6), (50, 8), (1, 2)])
def test_generated_fleet_round_trips(clusters: int, nodes: int) -> None:
    fleet = parse_fleet(generate_fleet(clusters, nodes))
    assert len(fleet.clusters) == clusters
    for cluster in fleet.clusters:
        assert len(cluster.nodes) == nodes
        assert len(cluster.nodes_with_role(Role.MDS)) == 1
        assert cluster.nodes_with_role(Role.OSS)


def test_roles_follow_the_deck_then_add_oss() -> None:
    assert roles_for(6) == ["mds", "oss", "oss", "agtpri", "agtstd", "lclient"]
    assert roles_for(8) == ["mds", "oss", "oss", "agtpri", "agtstd", "lclient", "oss", "oss"]
    assert roles_for(2) == ["mds", "oss"]


def test_generation_is_deterministic_and_seeded() -> None:
    assert generate_fleet(20, 6, seed=1) == generate_fleet(20, 6, seed=1)
    assert generate_fleet(20, 6, seed=1) != generate_fleet(20, 6, seed=2)


def test_waves_start_with_a_canary() -> None:
    waves = [c["wave"] for c in generate_fleet(200, 2)["clusters"]]
    assert waves[:4] == ["canary"] * 4  # 2% of 200
    assert set(waves[4:]) == {"wave1", "wave2"}


def test_subscriptions_are_spread() -> None:
    fleet = parse_fleet(generate_fleet(10, 2, subscriptions=3))
    assert len({c.subscription_id for c in fleet.clusters}) == 3


def test_addresses_for_an_8000_node_fleet_are_unique_loopback() -> None:
    addresses = [IPv4Address(loopback_address(i)) for i in range(64_000)]
    assert len(set(addresses)) == len(addresses)
    assert all(a.is_loopback for a in addresses)
    assert IPv4Address("127.0.0.1") not in addresses
    assert not any(str(a).endswith((".0", ".255")) for a in addresses)


@pytest.mark.parametrize(
    ("args", "message"),
    [((0, 6), "clusters must be >= 1"), ((3, 1), "nodes_per_cluster must be >= 2")],
)
def test_bad_arguments_name_themselves(args: tuple[int, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate_fleet(*args)


@settings(max_examples=40, deadline=None)
@given(
    clusters=st.integers(1, 30),
    nodes=st.integers(2, 12),
    subs=st.integers(1, 4),
    seed=st.integers(0, 10_000),
)
def test_any_generated_fleet_is_accepted(clusters: int, nodes: int, subs: int, seed: int) -> None:
    fleet = parse_fleet(generate_fleet(clusters, nodes, subscriptions=subs, seed=seed))
    assert sum(len(c.nodes) for c in fleet.clusters) == clusters * nodes
