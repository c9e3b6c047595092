"""Stages that do nothing but stop as told (or refuse to): for testing the supervisor apart from the real stages.

Never imported by the service.
"""

from __future__ import annotations

import signal
import time
from multiprocessing.process import BaseProcess
from typing import Any

from nnrouter.service import lifecycle


def run_idle(parent_pid: int | None = None, stop: Any = None) -> None:
    """A stage with nothing to do: it waits for SIGTERM, SIGINT or its parent's death, as a real one does."""
    stop = stop or lifecycle.child_of(parent_pid)
    stop.wait()


def run_stubborn(parent_pid: int | None = None) -> None:
    """A stage stuck where SIGTERM cannot reach it (a codec, a hung peer): only SIGKILL ends it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        time.sleep(1)


def spawn_idle(_settings: Any, name: str) -> BaseProcess:
    return lifecycle.spawn_stage("nnrouter.testing.stages:run_idle", name)


def spawn_stubborn(_settings: Any, name: str) -> BaseProcess:
    return lifecycle.spawn_stage("nnrouter.testing.stages:run_stubborn", name)
