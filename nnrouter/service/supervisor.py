"""The supervisor: ``nnrouter serve`` runs the SCP in this process and each stage as a child.

It starts the stages, replaces one that died (a worker's claims are due for
retry at once), and on SIGTERM or SIGINT stops them all within a bounded
time. Stages die with it (``nnrouter.service.lifecycle``): no shared
multiprocessing state that a killed child could leave locked.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from nnrouter.core import config as config_mod
from nnrouter.core import logs
from nnrouter.core.store import Store


def serve(settings: config_mod.Settings) -> int:
    from nnrouter.core.spool import Spool
    from nnrouter.core.store import SchemaOutOfDate
    from nnrouter.dicom import receive
    from nnrouter.pixels import classify

    logs.setup(settings.logging.level, settings.logging.format)
    log = logs.get("nnrouter")
    store = Store(settings.database.url)
    try:
        store.require_current()
    except SchemaOutOfDate as exc:
        print(f"nnrouter: {exc}", file=sys.stderr)
        return 2
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
                return 2
    spool = Spool(settings.storage.path)
    server = receive.serve(settings, store, spool, block=False)
    # The stage processes, by name, each with how to start it again. They stop
    # on SIGTERM and die with this process (nnrouter.service.lifecycle): no shared
    # multiprocessing state that a killed child could leave locked.
    spawners: dict[str, Callable[[config_mod.Settings, str], Any]] = {
        f"nnrouter-worker-{i}": classify.spawn_worker for i in range(settings.workers.count)}
    if settings.routing.rules is not None or settings.orders.procedures is not None:
        from nnrouter.routing.router import spawn_router

        spawners["nnrouter-router"] = spawn_router
    if settings.retention.enabled:  # retention: the cleaner stage (nnrouter.service.clean)
        from nnrouter.service.clean import spawn_cleaner

        spawners["nnrouter-cleaner"] = spawn_cleaner
    workers = [spawn(settings, name) for name, spawn in spawners.items()]
    mllp = None
    if settings.orders.hl7 is not None:
        from nnrouter.orders import hl7
        from nnrouter.orders import order as orders

        def keep_order(order: orders.Order) -> None:
            with store.write() as s:
                orders.save(s, order)

        mllp = hl7.MLLPServer.from_config(settings.orders.hl7, keep_order).start()

    from nnrouter.service.lifecycle import Stop, stop_on_signals

    stop = stop_on_signals(Stop())
    try:
        while not stop.wait(1):
            # A worker that died (a codec crash, out of memory, kill -9) is
            # replaced; its claims are due for retry at once, each alone.
            for i, proc in enumerate(workers):
                if not proc.is_alive() and not stop.is_set():
                    log.error("worker_died", worker=proc.name, exitcode=proc.exitcode)
                    if proc.name.startswith("nnrouter-worker-") and proc.pid is not None:
                        _expire_claims(store, proc.pid, classify.exit_reason(proc.exitcode), log)
                    workers[i] = spawners[proc.name](settings, proc.name)
    finally:
        # SIGTERM to each child, then one deadline for all: stopped within
        # 15 s whether the signal came to us alone or to the whole group.
        for proc in workers:
            if proc.is_alive():
                proc.terminate()
        server.shutdown()
        if mllp is not None:
            mllp.stop()
        deadline = time.monotonic() + 10
        for proc in workers:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in workers:
            if proc.is_alive():
                log.warning("stage_killed", worker=proc.name)
                proc.kill()
                proc.join(2)
        store.dispose()
        log.info("stopped")
    return 0


def _expire_claims(store: Any, pid: int, reason: str, log: Any) -> None:
    """Retry a dead worker's claims now; the database may be down too, then their lease does it."""
    from nnrouter.core.store import unavailable
    from nnrouter.pixels.classify import expire_claims

    try:
        n = expire_claims(store, pid, reason)
    except Exception as exc:
        if unavailable(exc) is None:
            raise
        log.warning("claims_left_to_lease", pid=pid, reason=unavailable(exc))
        return
    if n:
        log.info("claims_due_for_retry", pid=pid, instances=n)
