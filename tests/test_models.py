"""Fleet inventory and release validation: every rule refuses with a message naming the field."""

from __future__ import annotations

import copy
import datetime as dt
from pathlib import Path
from typing import Any

import pytest
import yaml

from amlfs.errors import InventoryError
from amlfs.models import (
    DateRange,
    DayOfWeek,
    Role,
    is_blacked_out,
    load_fleet,
    load_release,
    parse_fleet,
    parse_release,
)
from tests.conftest import SMALL_FLEET

RELEASE_ID = (
    "/subscriptions/4f6c1a52-7a3e-4d7e-9a55-2b1f0c9e8d01/resourceGroups/rg-amlfs-images/providers/"
    "Microsoft.Compute/galleries/amlfsgallery/images/amlfs-lustre/versions/2.15.6"
)


@pytest.fixture
def doc() -> dict[str, Any]:
    return yaml.safe_load(SMALL_FLEET.read_text())  # type: ignore[no-any-return]


def refused(data: Any) -> str:
    with pytest.raises(InventoryError) as caught:
        parse_fleet(data, source="fleet.yaml")
    return str(caught.value)


def test_example_fleet_parses(doc: dict[str, Any]) -> None:
    fleet = parse_fleet(doc)
    assert [c.name for c in fleet.clusters] == ["lustre-eus-01", "lustre-weu-01", "lustre-scus-01"]
    eus = fleet.cluster("lustre-eus-01")
    assert eus.mds.name == "eus01-mds0"
    assert [n.role for n in eus.nodes] == [
        Role.MDS,
        Role.OSS,
        Role.OSS,
        Role.AGTPRI,
        Role.AGTSTD,
        Role.LCLIENT,
    ]
    assert eus.window.start_time == dt.time(2, 0)
    assert eus.window.duration_min == 30
    assert eus.vm_id(eus.mds).endswith("/virtualMachines/eus01-mds0")
    assert len(list(fleet.iter_nodes())) == 18


def test_emulator_section_is_ignored_by_the_orchestrator(doc: dict[str, Any]) -> None:
    doc["emulator"] = {"anything": ["the orchestrator never reads this"]}
    assert len(parse_fleet(doc).clusters) == 3


def _mutate(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    data = copy.deepcopy(doc)
    *parents, last = path.split(".")
    node: Any = data
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    if value is _DELETE:
        del node[int(last) if last.isdigit() else last]
    else:
        node[int(last) if last.isdigit() else last] = value
    return data


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("clusters.0.nodes.0.role", "oss", "must have exactly one mds node, found 0"),
        ("clusters.0.nodes.1.role", "mds", "must have exactly one mds node, found 2"),
        ("clusters.0.nodes.1.role", "agtstd", None),  # still one oss left: valid
        ("clusters.0.window.start_utc", "24:00", "start_utc must be HH:MM"),
        ("clusters.0.window.start_utc", "7:5", "start_utc must be HH:MM"),
        ("clusters.0.window.start_utc", "ab:cd", "start_utc must be HH:MM"),
        ("clusters.0.window.duration_min", 0, "duration_min"),
        ("clusters.0.window.day_of_week", "funday", "day_of_week must be one of"),
        ("clusters.0.window.day_of_week", 7, "day_of_week must be 0-6"),
        ("clusters.0.subscription_id", "not-a-guid", "subscription_id must be a GUID"),
        ("clusters.0.region", "East US", "region must be an Azure region name"),
        ("clusters.0.resource_group", "rg bad/name", "not a valid resource group name"),
        ("clusters.0.resource_group", "rg.", "not a valid resource group name"),
        ("clusters.0.name", "-starts-with-dash", "not a valid cluster name"),
        ("clusters.0.nodes.0.name", "bad name", "not a valid Azure VM name"),
        ("clusters.0.nodes.0.name", "ends-with-", "not a valid Azure VM name"),
        ("clusters.0.nodes.0.address", "300.1.1.1", "address"),
        ("clusters.0.wave", "wave 1", "wave must be"),
        ("clusters.0.colour", "blue", "colour: Extra inputs are not permitted"),
        ("clusters.0.nodes", [], "nodes: List should have at least 1 item"),
        (
            "clusters.0.blackout_dates",
            [{"start": "2026-02-02", "end": "2026-02-01"}],
            "end 2026-02-01 is before start 2026-02-02",
        ),
        ("clusters.0.blackout_dates", ["xmas"], "a blackout is a date"),
        ("clusters.0.window", _DELETE, "window: Field required"),
    ],
)
def test_each_rule_names_the_field(
    doc: dict[str, Any], path: str, value: Any, expected: str | None
) -> None:
    data = _mutate(doc, path, value)
    if expected is None:
        parse_fleet(data)
        return
    message = refused(data)
    assert expected in message
    assert "clusters[0] '" in message  # the cluster is named by index and by its name
    assert message.startswith("invalid fleet file fleet.yaml: 1 problem(s)")


def test_node_errors_name_the_node(doc: dict[str, Any]) -> None:
    message = refused(_mutate(doc, "clusters.1.nodes.2.role", "metadata"))
    assert "clusters[1] 'lustre-weu-01' > nodes[2] 'weu01-oss1' > role: Input should be" in message


def test_all_problems_are_reported_at_once(doc: dict[str, Any]) -> None:
    data = _mutate(doc, "clusters.0.window.start_utc", "25:00")
    data = _mutate(data, "clusters.2.region", "South Central US")
    message = refused(data)
    assert "2 problem(s)" in message
    assert "start_utc" in message
    assert "region" in message


def test_cluster_names_must_be_unique(doc: dict[str, Any]) -> None:
    data = _mutate(doc, "clusters.1.name", "lustre-eus-01")
    assert "cluster name 'lustre-eus-01' is used twice" in refused(data)


def test_vm_names_are_unique_per_resource_group_across_clusters(doc: dict[str, Any]) -> None:
    data = _mutate(doc, "clusters.1.resource_group", "RG-LUSTRE-EUS-01")  # ARM ignores case
    data = _mutate(data, "clusters.1.nodes.0.name", "EUS01-mds0")
    assert (
        "VM 'EUS01-mds0' of cluster 'lustre-weu-01' is also in cluster 'lustre-eus-01'"
        in refused(data)
    )


def test_addresses_are_unique(doc: dict[str, Any]) -> None:
    data = _mutate(doc, "clusters.2.nodes.3.address", "127.1.0.1")
    assert "address 127.1.0.1 of 'scus01-agtpri0' is also used by 'eus01-mds0'" in refused(data)


def test_node_names_unique_within_a_cluster(doc: dict[str, Any]) -> None:
    data = _mutate(doc, "clusters.0.nodes.2.name", "eus01-oss0")
    data = _mutate(data, "clusters.0.nodes.2.address", "127.9.9.9")
    assert "lists node 'eus01-oss0' twice" in refused(data)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("Mon", DayOfWeek.MONDAY),
        ("TUESDAY", DayOfWeek.TUESDAY),
        (6, DayOfWeek.SUNDAY),
        ("sat", DayOfWeek.SATURDAY),
        (0, DayOfWeek.MONDAY),
    ],
)
def test_day_of_week_spellings(doc: dict[str, Any], given: Any, expected: DayOfWeek) -> None:
    fleet = parse_fleet(_mutate(doc, "clusters.0.window.day_of_week", given))
    assert fleet.clusters[0].window.day_of_week is expected
    assert expected.weekday == list(DayOfWeek).index(expected)


def test_blackouts(doc: dict[str, Any]) -> None:
    fleet = parse_fleet(doc)
    assert is_blacked_out(dt.date(2026, 12, 25), fleet.blackout_dates)
    assert is_blacked_out(dt.date(2027, 1, 1), fleet.blackout_dates)
    assert not is_blacked_out(dt.date(2027, 1, 2), fleet.blackout_dates)
    assert DateRange(start=dt.date(2026, 1, 1), end=dt.date(2026, 1, 1)).contains(
        dt.date(2026, 1, 1)
    )


def test_top_level_must_be_a_mapping() -> None:
    assert "top level must be a mapping" in refused(["clusters"])


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(InventoryError, match=r"cannot read fleet file .*nope\.yaml"):
        load_fleet(tmp_path / "nope.yaml")


def test_broken_yaml_names_the_line(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("clusters:\n  - name: a\n   bad: [\n")
    with pytest.raises(InventoryError, match=r"broken\.yaml is not valid YAML at line \d+"):
        load_fleet(broken)


def test_release_parses_and_exposes_its_parts(tmp_path: Path) -> None:
    path = tmp_path / "release.yaml"
    path.write_text(yaml.safe_dump({"image_id": RELEASE_ID, "version": "2.15.6"}))
    release = load_release(path)
    assert (release.gallery, release.image_definition, release.image_version) == (
        "amlfsgallery",
        "amlfs-lustre",
        "2.15.6",
    )
    assert release.subscription_id == "4f6c1a52-7a3e-4d7e-9a55-2b1f0c9e8d01"
    assert release.resource_group == "rg-amlfs-images"


@pytest.mark.parametrize(
    ("image_id", "version", "expected"),
    [
        (
            RELEASE_ID.replace(
                "galleries/amlfsgallery/images/amlfs-lustre/versions/2.15.6", "disks/some-disk"
            ),
            "2.15.6",
            "must be a gallery image version id",
        ),
        (RELEASE_ID.replace("versions/2.15.6", "versions/1.2"), "1.2", "MAJOR.MINOR.PATCH"),
        ("not-an-id", "2.15.6", "not an Azure resource id"),
        (RELEASE_ID, "2.15.6 hotfix", "version must be 1-64 letters"),
    ],
)
def test_bad_release_is_refused(image_id: str, version: str, expected: str) -> None:
    with pytest.raises(InventoryError) as caught:
        parse_release({"image_id": image_id, "version": version}, source="release.yaml")
    assert expected in str(caught.value)
    assert "release.yaml" in str(caught.value)
