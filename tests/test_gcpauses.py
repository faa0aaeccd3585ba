"""amlfs.gcpauses: full collections are timed; settle_heap freezes start-up objects."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator

import pytest

from amlfs.gcpauses import GcPauses, settle_heap
from tests.conftest import Sim


@pytest.fixture
def unfrozen() -> Iterator[None]:
    yield
    gc.unfreeze()  # the rest of the test session keeps its normal collector


def test_full_collections_are_counted_and_timed_and_young_ones_are_not() -> None:
    pauses = GcPauses(keep=2).install()
    try:
        gc.collect(0)
        gc.collect(1)
        assert pauses.describe()["full_collections"] == 0
        for _ in range(3):
            gc.collect()
    finally:
        pauses.uninstall()
    gc.collect()  # after uninstall: not counted
    seen = pauses.describe()
    assert seen["full_collections"] == 3
    assert len(seen["longest"]) == 2
    assert seen["max_ms"] == seen["longest"][0]["ms"] >= seen["longest"][1]["ms"] > 0
    assert seen["total_s"] * 1000 >= seen["max_ms"]


def test_settling_the_heap_takes_what_exists_out_of_later_full_collections(
    unfrozen: None,
) -> None:
    # Judged on the objects, not on gc.get_freeze_count() alone: other threads of this
    # process (an emulator, Prefect's) free frozen objects of their own at any moment, and
    # that count drops with each of them.
    keep = [[i] for i in range(50_000)]  # start-up state: lives for the whole run
    frozen = settle_heap()
    # Every object kept alive here was frozen and counted (they cannot be freed meanwhile).
    assert frozen >= len(keep) + 1
    assert gc.get_freeze_count() >= len(keep) + 1
    later = [[0]]  # made after the freeze: the collector still walks it
    walked = {id(o) for o in gc.get_objects()}  # generations 0-2: not the frozen ones
    assert all(gc.is_tracked(o) for o in keep)  # still container objects the GC knows...
    assert not any(id(o) in walked for o in keep)  # ...but no collection walks them
    assert id(keep) not in walked
    assert id(later) in walked
    assert id(later[0]) in walked


def test_the_emulator_reports_its_own_full_collections(sim: Sim) -> None:
    gc.collect()
    state = sim.state()
    assert state["gc"]["full_collections"] >= 1
    assert state["gc"]["max_ms"] > 0


def test_a_full_collection_inside_describe_does_not_hang_it() -> None:
    # The callback runs inside whatever allocation set the collection off: describe() too.
    # (A lock taken in both once deadlocked the emulator's /_sim/state.)
    pauses = GcPauses().install()
    thresholds = gc.get_threshold()
    done = threading.Event()

    keep: list[object] = []

    def ask() -> None:
        for _ in range(3000):
            keep.append([[] for _ in range(50)])  # survivors: full collections come often
            pauses.describe()
        done.set()

    gc.set_threshold(1, 1, 1)  # a full collection every few allocations
    try:
        asker = threading.Thread(target=ask, daemon=True)
        asker.start()
        asker.join(timeout=20)
    finally:
        gc.set_threshold(*thresholds)
        pauses.uninstall()
    assert done.is_set(), "describe() hung in a collection"
    assert pauses.describe()["full_collections"] > 0
