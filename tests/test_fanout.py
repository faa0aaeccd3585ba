"""amlfs.fanout.run_all: every call runs to its end, then the first error in order raises."""

from __future__ import annotations

import threading
import time

import pytest

from amlfs.fanout import run_all


def test_results_come_back_in_the_items_order_whatever_order_they_end_in() -> None:
    def slow_first(n: int) -> int:
        time.sleep(0.05 * (3 - n))
        return n * 10

    assert run_all([0, 1, 2], slow_first, workers=3) == [0, 10, 20]


def test_a_failure_waits_for_every_other_call_then_the_first_in_order_raises() -> None:
    finished: list[int] = []

    def work(n: int) -> int:
        if n == 1:
            time.sleep(0.1)  # fails last in time, but is first in order
            raise ValueError("one")
        if n == 3:
            raise KeyError("three")
        time.sleep(0.2)
        finished.append(n)
        return n

    with pytest.raises(ValueError, match="one"):
        run_all([0, 1, 2, 3], work, workers=4)
    assert sorted(finished) == [0, 2]  # the neighbours of the failures still ran to the end


def test_no_more_than_workers_calls_run_at_once() -> None:
    lock = threading.Lock()
    running = 0
    most = 0

    def work(n: int) -> None:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.02)
        with lock:
            running -= 1

    run_all(list(range(12)), work, workers=3)
    assert most == 3


def test_one_item_runs_in_the_calling_thread_and_none_runs_nothing() -> None:
    assert run_all([7], lambda _: threading.current_thread(), workers=4) == [
        threading.current_thread()
    ]
    assert run_all([], lambda n: n, workers=4) == []
