"""How a stage process stops: on a signal, or when the process that started it is gone.

``nnrouter serve`` starts its stages (workers, router, forwarder, ...) as child processes. Two things
must hold whatever happens to the parent:

- A child stops when its parent dies, even by ``kill -9``: otherwise it lives
  on with PPID 1, holding memory and polling the database. Linux sends it a
  signal of our choice when the parent exits (``prctl(PR_SET_PDEATHSIG)``);
  a thread that watches the parent's pid covers other systems and the moment
  before prctl took effect, and ends the process hard if stopping gently
  takes too long.
- Stopping never waits on state a dead process can hold. A
  ``multiprocessing.Event`` does: ``set()`` waits for every sleeping waiter to
  wake, and a child killed while waiting (SIGTERM to the whole process group
  reaches the children first) never wakes, so ``set()`` blocks forever. The
  parent therefore stops its children with SIGTERM, and each child turns its
  signals into a local, lock-free stop flag.

And a stage outlives a database outage: it waits with backoff, says so once
when the outage starts and once when it ends, and goes on without a restart
(a supervisor replacing a dying stage every second would only log a storm).
"""

from __future__ import annotations

import ctypes
import importlib
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING

from nnrouter.core import logs

if TYPE_CHECKING:
    from nnrouter.core.config import Settings
    from nnrouter.core.store import Store

log = logs.get("nnrouter.service.lifecycle")

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_TICK_S = 0.1


class Stop:
    """A stop flag that a signal handler may set (no lock to deadlock on).

    It answers ``is_set``, ``set`` and ``wait`` like ``threading.Event``; ``wait``
    polls the flag every 0.1 s, which costs nothing next to the stages' own
    polling and keeps the handler to one assignment.
    """

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._set:
            left = _TICK_S if deadline is None else min(_TICK_S, deadline - time.monotonic())
            if left <= 0:
                break
            time.sleep(left)
        return self._set


def stop_on_signals(stop: Stop) -> Stop:
    """SIGTERM and SIGINT set ``stop`` (call from the main thread)."""

    def handler(_signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent exits; False where it cannot.

    The kernel ties this to the parent *thread* that started us; the
    supervisor starts its children from its main thread, which lives as long
    as the process.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def watch_parent(parent_pid: int, stop: Stop, *, every_s: float = 1.0, grace_s: float = 10.0) -> threading.Thread:
    """Set ``stop`` once ``parent_pid`` is no longer our parent; exit hard ``grace_s`` later.

    A child that is mid-batch finishes it and exits by itself; one stuck in a
    codec or a network call is ended, since nothing it holds is lost (its
    claims come back when their lease runs out).
    """

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(every_s)
        log.warning("parent_gone", parent=parent_pid)
        stop.set()
        time.sleep(grace_s)
        log.error("parent_gone_exit", parent=parent_pid, grace_s=grace_s)
        os._exit(1)

    thread = threading.Thread(target=watch, name="nnrouter-parent-watch", daemon=True)
    thread.start()
    return thread


def spawn_stage(target: str, name: str, **kwargs: object) -> BaseProcess:
    """Start ``target`` ("module:function") as a child process that dies with this one.

    The child runs :func:`run_stage`, which asks for the parent-death signal
    before it imports the stage: those imports (OpenCV, pydicom, onnxruntime)
    take seconds on a busy machine, and a parent killed meanwhile must not
    leave the child to finish them. ``function`` gets ``parent_pid`` and
    ``kwargs``.
    """
    proc = multiprocessing.get_context("spawn").Process(
        target=run_stage, args=(target, os.getpid()), kwargs=kwargs, name=name, daemon=True
    )
    proc.start()
    return proc


def run_stage(target: str, parent_pid: int, **kwargs: object) -> object:
    """A stage process's first steps: die with the parent (SIGTERM's default: at once), then import and run."""
    die_with_parent(signal.SIGTERM)
    if os.getppid() != parent_pid:
        return None
    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)(parent_pid=parent_pid, **kwargs)


def child_of(parent_pid: int | None) -> Stop:
    """The stop flag of a stage process: set by SIGTERM/SIGINT and, with a parent, by its death."""
    stop = stop_on_signals(Stop())
    if parent_pid is not None:
        die_with_parent(signal.SIGTERM)
        watch_parent(parent_pid, stop)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            stop.set()
    return stop


class Outage:
    """A database outage as a stage sees it: logged once, waited out with backoff.

    ``failed`` returns how long to wait before the next try (0.5 s, doubling
    up to 5 s, so that recovery is noticed within 5 s of the database's
    return); ``over`` logs the end, once, with how long it lasted.
    """

    FIRST_S = 0.5
    MAX_S = 5.0

    def __init__(self, stage: str, **context: object) -> None:
        self.stage = stage
        self.context = context
        self.since: float | None = None
        self.delay = self.FIRST_S

    @property
    def down(self) -> bool:
        return self.since is not None

    def failed(self, reason: str) -> float:
        if self.since is None:
            self.since = time.monotonic()
            self.delay = self.FIRST_S
            log.warning("database_unavailable", stage=self.stage, reason=reason, **self.context)
        else:
            self.delay = min(self.delay * 2, self.MAX_S)
        return self.delay

    def over(self, **facts: object) -> None:
        if self.since is None:
            return
        log.info(
            "database_available",
            stage=self.stage,
            outage_s=round(time.monotonic() - self.since, 1),
            **self.context,
            **facts,
        )
        self.since = None


def wait_for_database(call: Callable[[], object], stop: Stop | None, stage: str) -> bool:
    """Run ``call`` until the database answers it; False if stopped first.

    Errors other than the database being unavailable (a schema out of date,
    a bug) are raised: waiting would not cure them.
    """
    from nnrouter.core.store import unavailable

    outage = Outage(stage)
    while stop is None or not stop.is_set():
        try:
            call()
        except Exception as exc:
            reason = unavailable(exc)
            if reason is None:
                raise
            delay = outage.failed(reason)
            if stop is None:
                time.sleep(delay)
            else:
                stop.wait(delay)
            continue
        outage.over()
        return True
    return False


class Ticker:
    """A stage's tick as its scheduler runs it: one or more parts, in order, that fail apart.

    A part that fails for a database outage ends the tick; the outage is
    logged once (``Outage``) and later ticks are skipped with its backoff
    until one gets through. Any other failure is logged by exception type only
    (messages from DICOM libraries quote patient data) as
    ``<part>_tick_failed``, and the next part and the next tick go on.
    """

    def __init__(self, stage: str, parts: list[tuple[str, Callable[[], object]]], **context: object) -> None:
        self.parts = parts
        self.outage = Outage(stage, **context)
        self._retry_at = 0.0

    def __call__(self) -> None:
        from nnrouter.core.store import unavailable

        if self.outage.down and time.monotonic() < self._retry_at:
            return
        for name, part in self.parts:
            try:
                part()
            except Exception as exc:
                down = unavailable(exc)
                if down is not None:
                    self._retry_at = time.monotonic() + self.outage.failed(down)
                    return
                log.error(f"{name}_tick_failed", error=type(exc).__name__)
                log.debug(f"{name}_tick_failed_detail", exc_info=True)
        self.outage.over()


def tick_until_stopped(tick: Callable[[], object], every_s: float, stop: Stop) -> None:
    """Run ``tick`` now and every ``every_s`` (APScheduler) until ``stop`` is set; a tick under way finishes first.

    Ticks never overlap: one that runs long delays the next, which then runs
    once (coalesced), not once per interval missed.
    """
    import datetime as dt

    from apscheduler.schedulers.background import BackgroundScheduler

    sched = BackgroundScheduler(timezone="UTC")
    sched.add_job(
        tick, "interval", seconds=every_s, max_instances=1, coalesce=True, next_run_time=dt.datetime.now(dt.UTC)
    )
    sched.start()
    try:
        stop.wait()
    finally:
        sched.shutdown(wait=True)


def open_stage(settings: Settings, stage: str, stop: Stop | None, parent_pid: int | None) -> tuple[Stop, Store] | None:
    """A looping stage's first steps: logs, its stop flag, its own store once the database answers.

    None when stopped before the database came: the stage has nothing to do.
    """
    from nnrouter.core.store import Store

    logs.setup(settings.logging.level, settings.logging.format)
    if stop is None:
        stop = child_of(parent_pid) if parent_pid is not None else stop_on_signals(Stop())
    store = Store(settings.database.url)
    if not wait_for_database(store.require_current, stop, stage):
        store.dispose()
        return None
    return stop, store
