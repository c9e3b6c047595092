"""The supervisor: ``nnrouter serve`` runs the SCP in this process and each stage as a child.

``Supervisor`` is the whole of the process keeping: it starts the stages,
replaces one that died (a worker's claims are due for retry at once), and
stops them all within ``STOP_S`` + ``KILL_S``: SIGTERM to each, one deadline
for all, SIGKILL for whatever is left. It does so whether the signal came to
this process alone or to the whole process group (where the stages have it
too), and for SIGINT as for SIGTERM. Meanwhile the SCP stops accepting and
ends each open association between two requests, so the instance a modality
is sending is stored and acknowledged first (``nnrouter.dicom.drain``).

Stages die with this process, even by ``kill -9`` (``nnrouter.service.lifecycle``):
no shared multiprocessing state that a killed child could leave locked.
Stages meet only in the store, so each is started, replaced and stopped
alone; which ones run depends on the settings (``stages``).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from typing import Any

from nnrouter.core import config as config_mod
from nnrouter.core import logs
from nnrouter.core.store import Store
from nnrouter.service.lifecycle import Stop, stop_on_signals

log = logs.get("nnrouter")

STOP_S = 10.0  # from SIGTERM to each stage until the last one must be gone, open associations included
KILL_S = 2.0  # after SIGKILL to a stage that outlived STOP_S
BEAT_S = 5.0  # how often the stages' liveness is written to the store (``stage_beat``), for /readyz and /metrics

Spawn = Callable[[config_mod.Settings, str], BaseProcess]


def stages(settings: config_mod.Settings) -> dict[str, Spawn]:
    """The stage processes ``serve`` runs with these settings, by process name, each with how to start it.

    Workers (``workers.count``); the router when there are rules or a
    procedures book to check orders against; the forwarder when there are
    rules (they name the destinations); the worklist stage when a worklist
    is configured; the cleaner when retention is on.
    """
    from nnrouter.pixels import classify

    out: dict[str, Spawn] = {f"nnrouter-worker-{i}": classify.spawn_worker for i in range(settings.workers.count)}
    if settings.routing.rules is not None or settings.orders.procedures is not None:
        from nnrouter.routing.router import spawn_router

        out["nnrouter-router"] = spawn_router
    if settings.routing.rules is not None:
        from nnrouter.routing.forward import spawn_forwarder

        out["nnrouter-forwarder"] = spawn_forwarder
    if settings.orders.worklist is not None:
        from nnrouter.orders.worklist_poll import spawn_worklist_poll

        out["nnrouter-worklist"] = spawn_worklist_poll
    if settings.retention.enabled:
        from nnrouter.service.clean import spawn_cleaner

        out["nnrouter-cleaner"] = spawn_cleaner
    if settings.http.enabled:
        from nnrouter.web.stage import spawn_web

        out["nnrouter-web"] = spawn_web
    return out


class Supervisor:
    """The stage processes of one ``serve``: started, replaced when one dies, stopped together.

    Every start happens on the thread that calls ``start``, ``run`` or
    ``replace_dead`` (the main thread in ``serve``): Linux ties a child's
    parent-death signal to the thread that started it, so a start from a
    thread that later ends would stop the child with it.
    """

    def __init__(
        self,
        settings: config_mod.Settings,
        spawners: dict[str, Spawn],
        *,
        on_death: Callable[[BaseProcess], None] | None = None,
        stop_s: float = STOP_S,
        kill_s: float = KILL_S,
    ) -> None:
        self.settings = settings
        self.spawners = dict(spawners)
        self.on_death = on_death
        self.stop_s = stop_s
        self.kill_s = kill_s
        self.procs: dict[str, BaseProcess] = {}

    def start(self, stop: Stop | None = None) -> None:
        """Start every stage not running yet; none after ``stop`` is set."""
        for name in self.spawners:
            if stop is not None and stop.is_set():
                return
            if name not in self.procs:
                self._spawn(name)

    def _spawn(self, name: str) -> None:
        try:
            proc = self.procs[name] = self.spawners[name](self.settings, name)
        except OSError as exc:  # out of processes or memory: tried again on the next look
            log.error("stage_not_started", stage=name, error=f"{type(exc).__name__}: {exc}")
            return
        log.info("stage_started", stage=name, pid=proc.pid)

    def replace_dead(self, stop: Stop | None = None) -> list[str]:
        """Start again each stage that died (a crash, out of memory, kill -9); the names replaced.

        Not once ``stop`` is set: a stage that a signal to the whole group
        has stopped is not dying, it is doing as told.
        """
        replaced = []
        for name in self.spawners:
            if stop is not None and stop.is_set():
                break
            proc = self.procs.get(name)
            if proc is not None and proc.is_alive():
                continue
            if proc is not None:
                proc.join(0)  # reap it
                log.error("worker_died", worker=name, exitcode=proc.exitcode)
                if self.on_death is not None:
                    try:
                        self.on_death(proc)
                    except Exception as exc:  # the replacement matters more than the bookkeeping
                        log.error("stage_death_not_handled", stage=name, error=type(exc).__name__)
                        log.debug("stage_death_not_handled_detail", stage=name, exc_info=True)
            self._spawn(name)
            if name in self.procs and self.procs[name] is not proc:
                replaced.append(name)
        return replaced

    def run(
        self, stop: Stop, every_s: float = 1.0, beat: Callable[[dict[str, int | None]], None] | None = None
    ) -> None:
        """Look after the stages until ``stop`` is set (by SIGTERM or SIGINT: see ``stop_on_signals``).

        ``beat`` is told, every ``BEAT_S``, each stage with its pid (None: not running).
        """
        next_beat = 0.0
        while not stop.wait(every_s):
            self.replace_dead(stop)
            if beat is not None and time.monotonic() >= next_beat:
                next_beat = time.monotonic() + BEAT_S
                alive = self.alive()
                beat({name: alive.get(name) for name in self.spawners})

    def terminate(self) -> None:
        """SIGTERM to each stage still running; does not wait."""
        for proc in self.procs.values():
            if proc.is_alive():
                proc.terminate()

    def join(self, deadline: float) -> list[str]:
        """Wait for every stage until ``deadline`` (monotonic), then SIGKILL the rest; the names killed."""
        for proc in self.procs.values():
            proc.join(max(0.0, deadline - time.monotonic()))
        killed = [name for name, proc in self.procs.items() if proc.is_alive()]
        for name in killed:
            log.warning("stage_killed", worker=name, after_s=self.stop_s)
            self.procs[name].kill()
        end = time.monotonic() + self.kill_s
        for name in killed:
            self.procs[name].join(max(0.0, end - time.monotonic()))
        return killed

    def stop(self) -> list[str]:
        """Stop every stage within ``stop_s`` (+ ``kill_s`` for one that would not); the names killed."""
        deadline = time.monotonic() + self.stop_s
        self.terminate()
        return self.join(deadline)

    def alive(self) -> dict[str, int]:
        """The running stages, by name, with their pids."""
        return {name: proc.pid for name, proc in self.procs.items() if proc.is_alive() and proc.pid is not None}


def serve(settings: config_mod.Settings) -> int:
    from nnrouter.core.spool import Spool
    from nnrouter.core.store import SchemaOutOfDate
    from nnrouter.dicom import scp
    from nnrouter.dicom.drain import Drain

    logs.setup(settings.logging.level, settings.logging.format)
    store = Store(settings.database.url)
    try:
        store.require_current()
    except SchemaOutOfDate as exc:
        print(f"nnrouter: {exc}", file=sys.stderr)
        return 3
    if settings.workers.count:
        # A missing or tampered model would kill every worker at start, over
        # and over: refuse here, once, with the reason.
        from nnrouter.pixels.modelcard import ModelCardError, verify

        for role, path in (("classifier", settings.models.classifier), ("detector", settings.models.detector)):
            if path is None:
                continue
            try:
                verify(path)
            except ModelCardError as exc:
                print(f"nnrouter: models.{role} cannot be used: {exc}", file=sys.stderr)
                return 3
    # Before anything starts: a signal that comes while the stages start stops what has started.
    stop = stop_on_signals(Stop())
    spool = Spool(settings.storage.path)
    server = scp.serve(settings, store, spool, block=False)
    drain = Drain(server)
    supervisor = Supervisor(
        settings, stages(settings), on_death=lambda proc: _expire_claims(store, settings.node.name, proc)
    )
    mllp = None
    try:
        supervisor.start(stop)
        if settings.orders.hl7 is not None and not stop.is_set():
            mllp = _start_mllp(settings, store)
        log.info("stages_started", stages=sorted(supervisor.procs))
        supervisor.run(stop, beat=lambda stages: _beat(store, settings.node.name, stages))
    finally:
        # SIGTERM to each stage, then one deadline for all, the SCP's open associations included.
        deadline = time.monotonic() + supervisor.stop_s
        supervisor.terminate()
        drain.stop(deadline)
        mllp_stopping = None
        if mllp is not None:
            mllp_stopping = threading.Thread(target=mllp.stop, name="nnrouter-mllp-stop", daemon=True)
            mllp_stopping.start()
        killed = supervisor.join(deadline)
        if mllp_stopping is not None:
            mllp_stopping.join(max(0.0, deadline - time.monotonic()))
        _clear_beats(store, settings.node.name)
        store.dispose()
        log.info("stopped", killed=killed)
    return 0


def _start_mllp(settings: config_mod.Settings, store: Store) -> Any:
    from nnrouter.orders import hl7
    from nnrouter.orders import order as orders

    def keep_order(order: orders.Order) -> None:
        with store.write() as s:
            orders.save(s, order)

    assert settings.orders.hl7 is not None
    return hl7.MLLPServer.from_config(settings.orders.hl7, keep_order).start()


def _beat(store: Store, node: str, stages: dict[str, int | None]) -> None:
    """Write each stage's liveness (and the SCP's, this process) to the store; a database outage skips a beat."""
    import os

    from nnrouter.core.store import unavailable
    from nnrouter.service.health import record_beats

    try:
        record_beats(store, node, {"nnrouter-scp": os.getpid(), **stages})
    except Exception as exc:  # a beat is bookkeeping: the stages matter more; /readyz will say the beats are old
        log.warning("beat_skipped", reason=unavailable(exc) or type(exc).__name__)


def _clear_beats(store: Store, node: str) -> None:
    """Nothing runs here now: no stale beats for a later `nnrouter web` to read as dead stages."""
    from nnrouter.service.health import clear_beats

    try:
        clear_beats(store, node)
    except Exception as exc:  # the database is down: the beats grow old and say so themselves
        log.warning("beats_not_cleared", error=type(exc).__name__)


def _expire_claims(store: Any, node: str, proc: BaseProcess) -> None:
    """Retry a dead worker's claims now; the database may be down too, then their lease does it."""
    from nnrouter.core.store import unavailable
    from nnrouter.pixels.classify import exit_reason, expire_claims

    if not proc.name.startswith("nnrouter-worker-") or proc.pid is None:
        return
    try:
        n = expire_claims(store, node, proc.pid, exit_reason(proc.exitcode))
    except Exception as exc:
        if unavailable(exc) is None:
            raise
        log.warning("claims_left_to_lease", pid=proc.pid, reason=unavailable(exc))
        return
    if n:
        log.info("claims_due_for_retry", pid=proc.pid, instances=n)
