"""The worklist stage: ask the RIS for the order of each study that is waiting for one, and keep the answer.

A worklist C-FIND is a network call that may take its whole timeout; made
inside the routing tick, one slow RIS held up every decision and every
delivery. Here it runs in a process of its own, and meets the router only in
the store: the orders it finds are kept like HL7 ones (``orders.save``), and
``Study.worklist_asked_at`` says that the worklist has been asked (or found
down), which is what the router waits for before it checks a study against
its orders.

A study waits for an answer when it has an accession number, no HL7 or
worklist order is kept for it, and it is still to be decided (or an image
came after the last question). The timing is the router's of old: an empty
answer is asked again after ``WORKLIST_AGAIN_S`` (the RIS may enter the order
late), a failed query pauses the worklist for every study for
``WORKLIST_RETRY_S`` (a dead RIS must not cost a timeout per study per tick),
and studies that come meanwhile are marked asked so the router goes on
without the worklist's word, as it did.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import replace
from multiprocessing.process import BaseProcess
from typing import Any

from sqlalchemy import Select, and_, exists, or_, select, update
from sqlalchemy.orm import Session

from nnrouter.core import logs
from nnrouter.core.config import Settings
from nnrouter.core.store import OrderRequest, RoutingDecision, Store, Study, utcnow
from nnrouter.orders import order as orders

log = logs.get("nnrouter.orders.worklist_poll")

WORKLIST_RETRY_S = 60.0  # after a failed query
WORKLIST_AGAIN_S = 300.0  # after an empty answer: the RIS may enter the order late
# How long past its quiet period the router waits for a study's worklist answer when this stage has not given
# one (stopped, or far behind): then it checks the study on the orders it has, and says so.
WORKLIST_WAIT_S = 60.0


def waiting(now: dt.datetime, limit: int = 50) -> Select[Study]:
    """The studies to ask the worklist about now, oldest first (a SELECT)."""
    decided = select(RoutingDecision.id).where(RoutingDecision.study_id == Study.id)
    external = select(OrderRequest.id).where(
        OrderRequest.source != orders.OrderSource.IMAGE,
        or_(OrderRequest.accession_number == Study.accession_number, OrderRequest.study_uid == Study.study_uid),
    )
    return (
        select(Study)
        .where(
            Study.accession_number.is_not(None),
            Study.accession_number != "",
            or_(Study.worklist_asked_at.is_(None), Study.worklist_next_at <= now),
            or_(
                and_(~exists(decided), Study.checked_at.is_(None)), Study.last_received_at > Study.worklist_asked_at
            ),  # an image came after the last question
            ~exists(external),
        )
        .order_by(Study.last_received_at)
        .limit(limit)
    )


class WorklistPoll:
    """One tick: every study waiting for an order answer is asked about once (or marked while the RIS is down)."""

    def __init__(self, settings: Settings, store: Store, *, batch: int = 50):
        self.settings = settings
        self.store = store
        self.batch = batch
        self._down_until = 0.0  # monotonic; the worklist is not asked before

    def tick(self, stop: Any = None, now: dt.datetime | None = None) -> dict[str, int]:
        """Ask about each waiting study; ``stop`` (set by a signal) ends the tick between two questions."""
        counts = {"asked": 0, "orders": 0, "failed": 0, "skipped": 0}
        if self.settings.orders.worklist is None:
            return counts
        now = now or utcnow()
        with self.store.read() as s:
            studies = list(s.execute(waiting(now, self.batch)).scalars())
        for i, study in enumerate(studies):
            if stop is not None and stop.is_set():
                break
            if time.monotonic() < self._down_until:
                counts["skipped"] += self._mark_down(studies[i:], now)
                break
            found = self.ask(study, now)
            if found is None:
                counts["failed"] += 1
                counts["skipped"] += self._mark_down(studies[i + 1 :], now)
                break
            counts["asked"] += 1
            counts["orders"] += found
        return counts

    def ask(self, study: Study, now: dt.datetime | None = None) -> int | None:
        """Ask the worklist about one study and keep what it says; how many orders, None when it failed."""
        from nnrouter.dicom import worklist

        wl = self.settings.orders.worklist
        assert wl is not None
        try:
            found = worklist.query(
                wl.host,
                wl.port,
                calling_ae=wl.calling_ae or self.settings.dicom.ae_title,
                called_ae=wl.ae_title,
                accession_number=study.accession_number,
                timeout=wl.timeout_s,
            )
        except worklist.WorklistError as exc:
            # One failure pauses the worklist for every study: a dead RIS must not cost a timeout per study per tick.
            self._down_until = time.monotonic() + WORKLIST_RETRY_S
            log.warning("worklist_failed", study_uid=study.study_uid, error=str(exc), retry_s=WORKLIST_RETRY_S)
            self._stamp([study.id], now, WORKLIST_RETRY_S)
            return None
        with self.store.write() as s:
            for o in found:
                orders.save(s, o if o.study_uid else replace(o, study_uid=study.study_uid))
            self._stamp_in(s, [study.id], now, WORKLIST_AGAIN_S if not found else None)
        log.info("worklist_asked", study_uid=study.study_uid, orders=len(found))
        return len(found)

    def _mark_down(self, studies: list[Study], now: dt.datetime) -> int:
        """Studies not asked because the worklist is down: marked asked, so that the router does not wait for it."""
        if not studies:
            return 0
        left_s = max(0.0, self._down_until - time.monotonic())
        self._stamp([st.id for st in studies], now, left_s)
        log.info("worklist_paused", studies=len(studies), retry_s=round(left_s))
        return len(studies)

    def _stamp(self, ids: list[int], now: dt.datetime | None, again_s: float | None) -> None:
        with self.store.write() as s:
            self._stamp_in(s, ids, now, again_s)

    @staticmethod
    def _stamp_in(s: Session, ids: list[int], now: dt.datetime | None, again_s: float | None) -> None:
        """The study was asked about (or found the worklist down) at ``now``; ask again after ``again_s`` (None: never)."""
        now = now or utcnow()
        s.execute(
            update(Study)
            .where(Study.id.in_(ids))
            .values(
                worklist_asked_at=now, worklist_next_at=None if again_s is None else now + dt.timedelta(seconds=again_s)
            )
        )


def run_worklist_poll(settings: Settings, stop: Any = None, parent_pid: int | None = None) -> None:
    """The worklist stage's process: a tick every routing.tick_s (APScheduler), until stopped.

    Started by ``serve`` when ``orders.worklist`` is set (``parent_pid`` set),
    it stops on SIGTERM and when that parent is gone; a database outage is
    logged once and waited out, as in the other stages.
    """
    from nnrouter.service import lifecycle

    opened = lifecycle.open_stage(settings, "worklist", stop, parent_pid)
    if opened is None:
        return
    stop, store = opened
    try:
        wl = settings.orders.worklist
        if wl is None:
            log.warning("worklist_not_configured")
            return
        poll = WorklistPoll(settings, store)
        ticker = lifecycle.Ticker("worklist", [("worklist", lambda: poll.tick(stop))])
        log.info("worklist_started", peer=f"{wl.host}:{wl.port}", called_ae=wl.ae_title)
        lifecycle.tick_until_stopped(ticker, settings.routing.tick_s, stop)
    finally:
        store.dispose()


def spawn_worklist_poll(settings: Settings, name: str = "nnrouter-worklist") -> BaseProcess:
    """The worklist stage as a child process of ``serve``: it stops on SIGTERM and dies with its parent."""
    from nnrouter.service import lifecycle

    return lifecycle.spawn_stage("nnrouter.orders.worklist_poll:run_worklist_poll", name, settings=settings)
