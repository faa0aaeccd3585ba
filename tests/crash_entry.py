"""Test-only entry point: the ``amlfs`` CLI with a step runner that SIGKILLs this process at
``AMLFS_TEST_CRASH_AT`` (``STEP:before`` or ``STEP:after``, e.g. ``swap:after``).

The crash points live here, not in the product: the flows take their step runner from
``tasks.run_step`` when they start, and this module wraps it before handing over to the CLI.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any

CRASH_ENV = "AMLFS_TEST_CRASH_AT"


def main() -> None:
    import tasks
    from amlfs_cli.main import app

    point = os.environ.get(CRASH_ENV, "")
    real = tasks.run_step

    def crashing(name: str, fn: Callable[[], Any]) -> Any:
        if point == f"{name}:before":
            os.kill(os.getpid(), signal.SIGKILL)
        result = real(name, fn)
        if point == f"{name}:after":
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    tasks.run_step = crashing
    app()


if __name__ == "__main__":
    main()
