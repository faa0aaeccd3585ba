"""Bad input is refused before anything changes: full-match validators, no control characters,
release files only where config lives and within size, hostile YAML, loopback-only emulator,
private state directories."""

from __future__ import annotations

import copy
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from amlfs.errors import InventoryError
from amlfs.models import (
    FLEET_MAX_BYTES,
    RELEASE_FILE_MAX_BYTES,
    RELEASE_FILES_MAX_BYTES,
    RELEASE_MAX_BYTES,
    load_fleet,
    load_release,
    parse_fleet,
    parse_release,
)
from amlfs.store import StateStore, make_private_dir
from amlfs_sim.server import Emulator
from amlfs_sim.spec import SimWorld, build_world, load_world
from tests.conftest import RELEASE_FILE, REPO, SMALL_FLEET

RELEASE_ID = (
    "/subscriptions/4f6c1a52-7a3e-4d7e-9a55-2b1f0c9e8d01/resourceGroups/rg-amlfs-images/providers/"
    "Microsoft.Compute/galleries/amlfsgallery/images/amlfs-lustre/versions/2.15.6"
)


@pytest.fixture
def doc() -> dict[str, Any]:
    return yaml.safe_load(SMALL_FLEET.read_text())  # type: ignore[no-any-return]


def _set(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    data = copy.deepcopy(doc)
    *parents, last = path.split(".")
    node: Any = data
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    node[int(last) if last.isdigit() else last] = value
    return data


def fleet_refused(data: Any) -> str:
    with pytest.raises(InventoryError) as caught:
        parse_fleet(data, source="fleet.yaml")
    return str(caught.value)


def release(**fields: Any) -> dict[str, Any]:
    return {"image_id": RELEASE_ID, "version": "2.15.6", **fields}


def release_refused(data: Any) -> str:
    with pytest.raises(InventoryError) as caught:
        parse_release(data, source="release.yaml")
    return str(caught.value)


# ----------------------------------------------------------- 10: full matches, control chars


@pytest.mark.parametrize(
    ("path", "value"),
    [
        # Each passed the old `^...$` + match(): `$` also matches before a trailing newline.
        ("clusters.0.name", "lustre-eus-01\n"),
        ("clusters.0.nodes.0.name", "eus01-mds0\n"),
        ("clusters.0.subscription_id", "4f6c1a52-7a3e-4d7e-9a55-2b1f0c9e8d01\n"),
        ("clusters.0.resource_group", "rg-lustre-eus-01\n"),
        ("clusters.0.region", "eastus\n"),
        ("clusters.0.wave", "canary\n"),
        ("clusters.0.window.start_utc", "02:00\n"),
        ("clusters.0.window.day_of_week", "tuesday\n"),  # was stripped, then accepted
        ("clusters.0.tags", {"team": "storage\x1b[31m"}),
        ("clusters.0.tags", {"team\n": "storage"}),
        ("clusters.0.tags", {"owner": "a\u202eb"}),  # bidi override
    ],
)
def test_fleet_strings_with_control_characters_are_refused(
    doc: dict[str, Any], path: str, value: Any
) -> None:
    message = fleet_refused(_set(doc, path, value))
    assert message.startswith("invalid fleet file fleet.yaml: 1 problem(s)\n")
    assert f"> {path.rsplit('.', 1)[-1]}" in message
    assert len(message.splitlines()) == 2  # the header and one line: no raw newline leaks


def test_clean_fleet_strings_still_pass(doc: dict[str, Any]) -> None:
    fleet = parse_fleet(_set(doc, "clusters.0.tags", {"team": "storage é", "cost-centre": "42"}))
    assert fleet.clusters[0].tags["team"] == "storage é"


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"version": "2.15.6\n"}, "version"),
        ({"lustre_version": "2.15.6\n"}, "lustre_version"),
        ({"lustre_version": "2.15.6 --force"}, "lustre_version must be"),
        ({"tunables": {"at_max": "700\n"}}, "value '700\\n' must be"),
        ({"tunables": {"at_max\n": "700"}}, "is not a Lustre parameter name"),
        ({"tunables": {"1at_max": "700"}}, "is not a Lustre parameter name"),
        ({"tunables": {"-d": "700"}}, "is not a Lustre parameter name"),
        ({"tunables": {"*.*.x": "1"}}, "is not a Lustre parameter name"),
        ({"files": [{"path": "/etc/amlfs/a.conf\n", "content": ""}]}, "files[0] > path"),
        ({"files": [{"path": "/etc/amlfs/a.conf", "content": "x=1\r\n"}]}, "at line 1"),
        ({"files": [{"path": "/etc/amlfs/a.conf", "content": "a\n\x1b[2J"}]}, "at line 2"),
        ({"image_id": RELEASE_ID + "\n"}, "image_id"),
        ({"image_id": " " + RELEASE_ID}, "must not start or end with spaces"),
        # The old check parsed a stripped copy and kept the value as given.
        ({"image_id": RELEASE_ID.replace("amlfsgallery", "amlfs gallery")}, "malformed"),
        ({"image_id": RELEASE_ID.replace("amlfs-lustre", "amlfs;lustre")}, "malformed"),
        ({"image_id": RELEASE_ID.replace("2.15.6", "2.15.6\u0663")}, "MAJOR.MINOR.PATCH"),
    ],
)
def test_release_strings_are_checked_whole(fields: dict[str, Any], expected: str) -> None:
    message = release_refused(release(**fields))
    assert expected in message
    assert len(message.splitlines()) == 2


def test_release_file_content_may_have_newlines_and_tabs() -> None:
    content = "# tuned\n\toptions lnet networks=tcp0\n"
    parsed = parse_release(release(files=[{"path": "/etc/amlfs/a.conf", "content": content}]))
    assert parsed.files[0].content == content
    parsed = parse_release(release(tunables={"osc.*.max_dirty_mb": "512", "at_max": "700"}))
    assert parsed.tunables == {"osc.*.max_dirty_mb": "512", "at_max": "700"}


def test_a_trailing_newline_in_the_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "release.yaml"
    path.write_text(
        f'image_id: {RELEASE_ID}\nversion: "2.15.6\\n"\ntunables: {{at_max: "700\\n"}}\n'
    )
    with pytest.raises(InventoryError, match=r"2 problem\(s\)") as caught:
        load_release(path)
    assert "version" in str(caught.value)
    assert "tunables" in str(caught.value)


def test_values_in_errors_are_cut_short(doc: dict[str, Any]) -> None:
    secretish = "x" * 5000 + "\n"
    for message in (
        fleet_refused(_set(doc, "clusters.0.nodes.0.name", secretish)),
        fleet_refused(_set(doc, "clusters.0.tags", {secretish: "v"})),
        fleet_refused(_set(doc, "clusters.0.window.day_of_week", secretish)),
        release_refused(release(version=secretish)),
        release_refused(release(tunables={"at_max": secretish})),
    ):
        assert "xxxx" in message
        assert len(message) < 600, message


def test_file_content_is_never_quoted() -> None:
    content = "password=hunter2\x07\n"
    message = release_refused(release(files=[{"path": "/etc/lhsmd/agent", "content": content}]))
    assert "hunter2" not in message
    assert "'\\x07' at line 1" in message


# ------------------------------------------------------------ 11: where release files may go


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/etc/shadow", "a release may write only under"),
        ("/etc/sudoers.d/amlfs", "a release may write only under"),
        ("/etc/ssh/sshd_config.d/99-amlfs.conf", "a release may write only under"),
        ("/etc/modprobe.d/blacklist.conf", "a release may write only under"),
        ("/etc/cron.d/amlfs", "a release may write only under"),
        ("/etc/hostid", "a node's own identity"),
        ("/etc/ldev.conf", "a node's own identity"),
        ("/etc/lnet.conf", "a node's own identity"),
        ("/etc/modprobe.d/lustre.conf", "a node's own identity"),
        ("/etc/amlfs/../shadow", "'..'"),
        ("/etc/lustre/./x.conf", "'.'"),
        ("/etc/amlfs//x.conf", "'//'"),
        ("//etc/amlfs/x.conf", "'//'"),
        ("/etc/amlfs/", "'//' or end with '/'"),
        ("etc/amlfs/x.conf", "absolute"),
        ("/etc/amlfs/x y.conf", "between the slashes"),
        ("/etc/amlfs/" + "a" * 300, "at most 255"),
        ("/etc/modprobe.d/lustre/../../shadow.conf", "'..'"),
    ],
)
def test_release_files_go_only_where_config_lives(path: str, expected: str) -> None:
    message = release_refused(release(files=[{"path": path, "content": "x\n"}]))
    assert "files[0] > path" in message
    assert expected in message


@pytest.mark.parametrize(
    "path",
    [
        "/etc/lustre/tuning.conf",
        "/etc/amlfs/release.conf",
        "/etc/amlfs/hydrator.conf",
        "/etc/lhsmd/agent",
        "/etc/modprobe.d/lustre-tuning.conf",
        "/etc/modprobe.d/lustre_ko.conf",
    ],
)
def test_release_files_in_config_locations_pass(path: str) -> None:
    assert parse_release(release(files=[{"path": path, "content": "x\n"}])).files[0].path == path


def test_release_file_sizes_are_capped() -> None:
    at_limit = "a" * RELEASE_FILE_MAX_BYTES
    parse_release(release(files=[{"path": "/etc/amlfs/a.conf", "content": at_limit}]))
    over = "é" * (RELEASE_FILE_MAX_BYTES // 2) + "a"  # counted in bytes, not characters
    message = release_refused(release(files=[{"path": "/etc/amlfs/a.conf", "content": over}]))
    assert f"{RELEASE_FILE_MAX_BYTES + 1:,} bytes" in message
    assert "64 KiB (65,536 bytes)" in message
    count = RELEASE_FILES_MAX_BYTES // RELEASE_FILE_MAX_BYTES + 1
    files = [{"path": f"/etc/amlfs/{i}.conf", "content": at_limit} for i in range(count)]
    message = release_refused(release(files=files))
    assert "1 MiB (1,048,576 bytes)" in message
    assert "files: files total" in message


def test_a_path_given_twice_for_the_same_role_is_refused() -> None:
    files = [
        {"path": "/etc/amlfs/a.conf", "content": "1", "roles": ["mds", "oss"]},
        {"path": "/etc/amlfs/a.conf", "content": "2", "roles": ["agtpri"]},  # fine: other role
        {"path": "/etc/amlfs/a.conf", "content": "3", "roles": ["oss"]},
    ]
    assert "/etc/amlfs/a.conf is listed twice for role(s) oss" in release_refused(
        release(files=files)
    )


# ------------------------------------------------------------------------- 12: hostile YAML

LAUGHS = "\n".join(
    ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    + [f"{chr(98 + i)}: &{chr(98 + i)} [{','.join(['*' + chr(97 + i)] * 9)}]" for i in range(8)]
)


def _fleet_text_with(extra: str) -> str:
    return SMALL_FLEET.read_text() + extra


NEXT_LINE = len(SMALL_FLEET.read_text().splitlines()) + 1
# Billion laughs (3 KB, 9^9 strings) in the emulator section, which the orchestrator drops.
BOMB = "  lol:\n" + "".join(f"    {line}\n" for line in LAUGHS.splitlines())


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (BOMB, f"line {NEXT_LINE + 1}, column 8: anchors are not allowed (&a)"),
        ("x: &big [1]\n", f"line {NEXT_LINE}, column 4: anchors are not allowed (&big)"),
        (
            "blackout_dates: []\n",
            f"line {NEXT_LINE}, column 1: duplicate key 'blackout_dates' (first at line 4)",
        ),
        ("  deep: " + "[" * 25 + "]" * 25 + "\n", "nested deeper than 20 levels"),
        ("  deep: " + "[" * 100_000 + "]" * 100_000 + "\n", "nested deeper than 20 levels"),
        ("x: 2024-02-30\n", f"line {NEXT_LINE}, column 4: not a date: 2024-02-30 (day is out"),
        ("x: 2024-13-01T00:00:00Z\n", f"line {NEXT_LINE}, column 4: not a date: 2024-13-01T"),
        ('x: "\\U00110000"\n', f"line {NEXT_LINE}, column 7: chr() arg not in range"),
    ],
)
def test_hostile_yaml_is_one_clear_line(tmp_path: Path, extra: str, expected: str) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text(_fleet_text_with(extra))
    for load in (load_fleet, load_world):
        with pytest.raises(InventoryError) as caught:
            load(path)
        message = str(caught.value)
        assert message.startswith(f"fleet file {path} is not valid YAML at line ")
        assert expected in message
        assert "\n" not in message


def test_libyaml_and_the_pure_python_loader_read_the_same_documents() -> None:
    """The fast path (libyaml, checked events) gives what the pure-Python loader gives, on
    every example and a generated 200-cluster fleet; hostile documents above fall back to
    the pure-Python loader, whose messages they check."""
    from amlfs import models
    from amlfs_sim.genfleet import dump_fleet_yaml, generate_fleet

    assert models._CSafeLoader is not None, "PyYAML without libyaml: the fast path is untested"
    texts = [p.read_text() for p in sorted((REPO / "examples").glob("*.yaml"))]
    texts.append(dump_fleet_yaml(generate_fleet(200, 4, seed=2)))
    for text in texts:
        slow = models._InventoryLoader(text)
        try:
            expected = slow.get_single_data()
        finally:
            slow.dispose()
        assert models._load(text) == expected

    def verdict(load: Any, text: str) -> tuple[str, Any]:
        try:
            return "value", load(text)
        except yaml.YAMLError as err:
            return "refused", type(err).__name__

    def pure(text: str) -> Any:
        loader = models._InventoryLoader(text)
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()

    # Where libyaml alone would differ (it takes tabs PyYAML's scanner refuses), and edges.
    edges = [
        "a:\t1\n",
        "a: b\tc\n",
        "a: 1\t# c\n",
        "[1,\n\t2]\n",
        "\ufeffa: 1\n",
        'a: "\\t\\u00e9"\n',
        "a: 2026-12-01\n",
        "a: [1, 2\n",
        "a: 1\n---\nb: 2\n",
        "? [x]\n: 1\n",
        "a: !!python/object:os.system x\n",
    ]
    for text in edges:
        assert verdict(models._load, text) == verdict(pure, text), text


def test_duplicate_key_names_the_key_and_both_lines(tmp_path: Path) -> None:
    path = tmp_path / "release.yaml"
    path.write_text(f"image_id: {RELEASE_ID}\nversion: 2.15.6\ntunables:\n  at_max: '700'\n")
    path.write_text(path.read_text() + "  at_max: '40'\n")
    with pytest.raises(InventoryError) as caught:
        load_release(path)
    assert str(caught.value) == (
        f"release {path} is not valid YAML at line 5, column 3: duplicate key 'at_max' "
        "(first at line 4)"
    )


def test_merge_keys_and_aliases_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "release.yaml"
    path.write_text(f"image_id: {RELEASE_ID}\nversion: 2.15.6\ntunables: {{<<: {{at_max: '1'}}}}\n")
    with pytest.raises(InventoryError, match=r"line 3, column 12: merge keys \(<<\) are not"):
        load_release(path)
    path.write_text("x: *nowhere\n")
    with pytest.raises(InventoryError, match=r"aliases are not allowed \(\*nowhere\)"):
        load_release(path)


def test_invalid_utf8_is_refused_naming_the_line(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_bytes(SMALL_FLEET.read_bytes() + b"\n# caf\xe9\n")
    for load in (load_fleet, load_world):
        with pytest.raises(InventoryError) as caught:
            load(path)
        assert (
            str(caught.value)
            == f"fleet file {path} is not valid UTF-8 (byte 0xe9 at line {NEXT_LINE + 1})"
        )


def test_files_are_size_capped(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(_fleet_text_with("#" * (FLEET_MAX_BYTES + 1 - len(SMALL_FLEET.read_bytes()))))
    for load in (load_fleet, load_world):
        with pytest.raises(InventoryError, match=r"larger than the 8 MiB \(8,388,608 bytes\)"):
            load(fleet)
    rel = tmp_path / "release.yaml"
    rel.write_text(RELEASE_FILE.read_text() + "#" * RELEASE_MAX_BYTES)
    with pytest.raises(InventoryError, match=r"release .* is larger than the 2 MiB"):
        load_release(rel)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (BOMB, "anchors are not allowed"),
        ("clusters: []\n", "duplicate key 'clusters'"),
        ("  d: " + "[" * 50 + "]" * 50 + "\n", "nested deeper than 20 levels"),
    ],
)
# COLUMNS: Rich wraps the error at the console width (80 when stderr is not a terminal), which
# is amlfs_cli/main.py's to fix; these tests check the exit status and that the error is one line.
def test_amlfs_validate_exits_2_with_the_error(tmp_path: Path, content: str, expected: str) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(_fleet_text_with(content))
    done = subprocess.run(
        [sys.executable, "-m", "amlfs_cli", "validate", str(bad), "--release", str(RELEASE_FILE)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "COLUMNS": "400"},
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert expected in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_invalid_utf8_through_amlfs_validate(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"clusters: [\xff]\n")
    done = subprocess.run(
        [sys.executable, "-m", "amlfs_cli", "validate", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "COLUMNS": "400"},
    )
    assert done.returncode == 2, done.stderr
    assert "not valid UTF-8 (byte 0xff at line 1)" in done.stderr
    assert "Traceback" not in done.stderr


# ------------------------------------------------------- 14: loopback only, private directories


@pytest.mark.parametrize("address", ["10.0.0.4", "0.0.0.0", "192.168.1.7", "128.0.0.1"])
def test_the_emulator_refuses_addresses_beyond_loopback(doc: dict[str, Any], address: str) -> None:
    data = _set(doc, "clusters.1.nodes.2.address", address)
    parse_fleet(data)  # a real inventory: the orchestrator takes it
    with pytest.raises(InventoryError) as caught:
        build_world(data, "fleet.yaml")
    assert f"lustre-weu-01 > weu01-oss1 > address {address}" in str(caught.value)
    assert "only on loopback (127.0.0.0/8)" in str(caught.value)
    # A world built without build_world is refused before anything listens.
    world = SimWorld(fleet=parse_fleet(data), spec=load_world(SMALL_FLEET).spec)
    with pytest.raises(InventoryError, match=r"weu01-oss1 > address"):
        Emulator(world, Path("never-created"))
    assert not Path("never-created").exists()


@pytest.mark.parametrize("host", ["0.0.0.0", "10.0.0.4", "localhost.example"])
def test_the_emulator_serves_only_on_loopback(small_world: SimWorld, host: str) -> None:
    with pytest.raises(InventoryError, match=r"serves only on loopback"):
        Emulator(small_world, Path("never-created"), host=host)


def test_loopback_addresses_still_run(doc: dict[str, Any]) -> None:
    world = build_world(_set(doc, "clusters.1.nodes.2.address", "127.250.3.4"), "fleet.yaml")
    assert world.fleet.cluster("lustre-weu-01").nodes[2].address is not None


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)  # the usual umask: what mkdir(parents=True) gives the parents
    try:
        yield
    finally:
        os.umask(old)


def _modes(top: Path, leaf: Path) -> dict[str, str]:
    modes = {}
    path = leaf
    while path != top:
        modes[str(path.relative_to(top))] = oct(stat.S_IMODE(path.stat().st_mode))
        path = path.parent
    return modes


@pytest.mark.usefixtures("umask_022")
def test_private_dirs_are_0700_all_the_way_down(tmp_path: Path) -> None:
    make_private_dir(tmp_path / "a" / "b" / "c")
    assert set(_modes(tmp_path, tmp_path / "a" / "b" / "c").values()) == {"0o700"}
    (tmp_path / "file").write_text("")
    with pytest.raises(FileExistsError):
        make_private_dir(tmp_path / "file")


@pytest.mark.usefixtures("umask_022")
def test_state_store_directories_are_private(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "shared" / "state")
    store.put("runs", "lustre-eus-01", "config", value={"k": "v"})
    store.update("leases", "lustre-eus-01", change=lambda _: {"holder": "me"})
    for leaf in (tmp_path / "shared/state/runs/lustre-eus-01", tmp_path / "shared/state/leases"):
        modes = _modes(tmp_path, leaf)
        assert set(modes.values()) == {"0o700"}, modes


@pytest.mark.usefixtures("umask_022")
def test_emulator_state_dirs_are_private(small_world: SimWorld, tmp_path: Path) -> None:
    state_dir = tmp_path / "work" / "sim"
    with Emulator(small_world, state_dir):
        pass
    for leaf in (state_dir / "tls", state_dir / "ssh"):
        modes = _modes(tmp_path, leaf)
        assert modes == {
            "work": "0o700",
            "work/sim": "0o700",
            str(leaf.relative_to(tmp_path)): "0o700",
        }


def test_a_fleet_file_rewritten_in_place_is_read_afresh(tmp_path: Path) -> None:
    """load_fleet parses a file's bytes once per process (a tick reads its fleet three
    times), keyed by their content: the same bytes give the same fleet, a rewrite of the
    same size in the same instant is not served from the earlier parse."""
    path = tmp_path / "fleet.yaml"
    text = SMALL_FLEET.read_text()
    path.write_text(text)
    first = load_fleet(path)
    assert load_fleet(path) is first
    changed = text.replace("lustre-eus-01", "lustre-eus-09", 1)
    assert len(changed) == len(text)
    path.write_text(changed)
    assert load_fleet(path).clusters[0].name == "lustre-eus-09"
    path.write_text(text)
    assert load_fleet(path) == first
