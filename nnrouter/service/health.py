"""Is this node alive, and is it ready: the answers behind ``/healthz`` and ``/readyz``.

The supervisor writes each stage's liveness to the store (``stage_beat``)
every few seconds; whoever asks (the web stage, ``nnrouter status``, another
node) reads it there, since stages meet only in the store. A beat older than
``STALE_S`` means the supervisor itself has stopped looking after them.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, select

from nnrouter.core.config import Settings
from nnrouter.core.store import StageBeat, Store, as_utc, utcnow

STALE_S = 30.0  # six missed beats (supervisor.BEAT_S = 5 s)


def record_beats(store: Store, node: str, stages: dict[str, int | None]) -> None:
    """This node's stages, alive (with a pid) or not (None), as of now; stages no longer run are dropped."""
    now = utcnow()
    with store.write() as s:
        s.execute(delete(StageBeat).where(StageBeat.node == node, StageBeat.stage.not_in(list(stages))))
        for name, pid in stages.items():
            s.merge(StageBeat(node=node, stage=name, pid=pid, alive=pid is not None, beat_at=now))


def clear_beats(store: Store, node: str) -> None:
    """``serve`` has stopped on this node: no beats left behind to read as stages that died."""
    with store.write() as s:
        s.execute(delete(StageBeat).where(StageBeat.node == node))


def stage_liveness(store: Store, node: str, now: dt.datetime | None = None) -> dict[str, dict[str, Any]]:
    """Each stage of ``node`` the supervisor last reported: alive (and beat recently), pid, age of the beat."""
    now = now or utcnow()
    with store.read() as s:
        beats = s.execute(select(StageBeat).where(StageBeat.node == node).order_by(StageBeat.stage)).scalars().all()
    out = {}
    for b in beats:
        age = (now - as_utc(b.beat_at)).total_seconds()
        out[b.stage] = {"alive": bool(b.alive) and age <= STALE_S, "pid": b.pid, "beat_age_s": round(age, 1)}
    return out


@dataclass
class Readiness:
    """What /readyz answers: ready only when every check passed; each failed one says why."""

    checks: dict[str, bool] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return all(self.checks.values())

    def fail(self, check: str, reason: str) -> None:
        self.checks[check] = False
        self.reasons.append(reason)

    def as_dict(self) -> dict[str, Any]:
        return {"ready": self.ready, "checks": self.checks, "reasons": self.reasons, "stages": self.stages}


def readiness(settings: Settings, store: Store, *, expect_stages: bool = True) -> Readiness:
    """Database reachable, schema current, spool above ``storage.min_free_mb``, every stage alive.

    ``expect_stages`` False (``nnrouter web`` alone, no ``serve`` on this node)
    checks only the stages that a supervisor has reported.
    """
    from nnrouter.service.pressure import free_mb

    r = Readiness()
    free = free_mb(settings.storage.path)
    r.checks["spool"] = True
    if free is None:
        r.fail("spool", f"spool {settings.storage.path} cannot be read")
    elif free < settings.storage.min_free_mb:
        r.fail("spool", f"spool has {free:.0f} MB free, below storage.min_free_mb {settings.storage.min_free_mb} MB")
    try:
        current, head = store.current_revision(), store.head_revision()
    except Exception as exc:  # the database is down or refuses us: say which
        r.fail("database", f"database unreachable: {type(exc).__name__}")
        return r
    r.checks["database"] = True
    r.checks["schema"] = current == head
    if current != head:
        r.reasons.append(f"schema at {current or 'nothing'}, head is {head}: run `nnrouter db upgrade`")
        return r
    r.stages = stage_liveness(store, settings.node.name)
    r.checks["stages"] = True
    if not r.stages and expect_stages:
        r.fail("stages", f"no supervisor has reported stages of node {settings.node.name} (is `nnrouter serve` up?)")
    for name, st in r.stages.items():
        if not st["alive"]:
            why = "not running" if st["pid"] is None else f"no beat for {st['beat_age_s']:.0f} s"
            r.fail("stages", f"stage {name} is {why}")
    return r
