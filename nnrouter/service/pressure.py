"""Back-pressure: whether to take new work, and if not, why.

A modality whose association is refused with A-ASSOCIATE-RJ (rejected-transient,
service-provider presentation, "local limit exceeded") keeps its copy and
tries again later. That is better than accepting images onto a disk that is
about to run out, or into a queue that no worker is draining. So before a
disk or a queue is exhausted, associations that would store are refused;
C-ECHO and C-FIND associations are still served (they write nothing).

What is measured: free space in the spool (against
``limits.refuse_below_free_mb``, above ``storage.min_free_mb`` where single
C-STOREs get 0xA700), instances waiting for the classifier
(``limits.max_unclassified``), deliveries not yet made
(``limits.max_outbox_pending``) and the age of the oldest of them per
destination (``limits.outbox_alert_age_s``: an alert, never a refusal: a
destination that is down must not stop the modalities). A store that cannot
be read is reported (not ready) but does not refuse associations: each
C-STORE then gets its own answer.

The receive path asks on every association, so the measure is cached for
``limits.check_every_s`` (one second by default); at most one thread
refreshes it while the others use the previous answer.
"""

from __future__ import annotations

import datetime as dt
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from nnrouter.core import logs
from nnrouter.core.config import Settings
from nnrouter.core.store import (
    Instance,
    InstanceState,
    Outbox,
    OutboxState,
    Store,
    utcnow,
)

log = logs.get("nnrouter.service.pressure")

# A-ASSOCIATE-RJ: rejected-transient, service-provider (presentation), local limit exceeded.
REJECT_BUSY = (0x02, 0x03, 0x02)

WAITING_FOR_CLASSIFIER = (InstanceState.RECEIVED, InstanceState.CLASSIFYING)
NOT_YET_DELIVERED = (OutboxState.PENDING, OutboxState.SENDING, OutboxState.FAILED)


def refuse_below_free_mb(settings: Settings) -> int:
    """The free-space floor for new associations: set, or 256 MB above the C-STORE floor."""
    value = settings.limits.refuse_below_free_mb
    return settings.storage.min_free_mb + 256 if value is None else value


def free_mb(path: Path) -> float | None:
    """Free space where ``path`` (or its nearest existing parent) lives; None if nothing exists."""
    probe = Path(path).resolve()
    while not probe.exists():
        if probe.parent == probe:
            return None
        probe = probe.parent
    return shutil.disk_usage(probe).free / (1024 * 1024)


def _utc(ts: dt.datetime) -> dt.datetime:
    return ts if ts.tzinfo else ts.replace(tzinfo=dt.UTC)


@dataclass(frozen=True)
class Backlog:
    """Deliveries to one destination not yet made, and how long the oldest has waited."""

    destination: str
    waiting: int
    oldest_age_s: float
    held: int = 0
    dead: int = 0


@dataclass(frozen=True)
class Health:
    """One measure of the node: what would make it refuse work, and what needs a person."""

    spool_free_mb: float | None
    unclassified: int | None
    outbox: tuple[Backlog, ...]
    refuse: tuple[str, ...]  # reasons to refuse new associations that store
    alerts: tuple[str, ...]  # worth a person's look; work is still taken
    store_error: str | None = None
    by_state: dict[str, int] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return not self.refuse and self.store_error is None

    def reasons(self) -> list[str]:
        """Why the node is not ready (empty when it is)."""
        return list(self.refuse) + ([f"store unreachable: {self.store_error}"] if self.store_error else [])

    def as_dict(self) -> dict[str, Any]:
        return {
            "ready": self.ready,
            "reasons": self.reasons(),
            "alerts": list(self.alerts),
            "spool_free_mb": None if self.spool_free_mb is None else round(self.spool_free_mb, 1),
            "unclassified": self.unclassified,
            "outbox": {
                b.destination: {
                    "waiting": b.waiting,
                    "oldest_age_s": round(b.oldest_age_s, 1),
                    "held": b.held,
                    "dead": b.dead,
                }
                for b in self.outbox
            },
        }


def measure(settings: Settings, store: Store, now: dt.datetime | None = None) -> Health:
    """Free space and queue depths, against the limits; never raises for a store that is down."""
    lim = settings.limits
    now = now or utcnow()
    refuse: list[str] = []
    alerts: list[str] = []
    free = free_mb(settings.storage.path)
    floor = refuse_below_free_mb(settings)
    if free is not None and free < floor:
        refuse.append(f"spool has {free:.0f} MB free, below {floor} MB (limits.refuse_below_free_mb)")
    unclassified: int | None = None
    backlog: list[Backlog] = []
    by_state: dict[str, int] = {}
    error = None
    try:
        with store.read() as s:
            by_state = dict(s.execute(select(Instance.state, func.count()).group_by(Instance.state)).all())
            rows = s.execute(
                select(Outbox.destination, Outbox.state, func.count(), func.min(Outbox.created_at))
                .where(Outbox.state.in_((*NOT_YET_DELIVERED, OutboxState.HELD, OutboxState.DEAD)))
                .group_by(Outbox.destination, Outbox.state)
            ).all()
    except Exception as exc:  # a database restart: say so, and refuse nothing for it
        error = type(exc).__name__
    else:
        unclassified = sum(by_state.get(st, 0) for st in WAITING_FOR_CLASSIFIER)
        per: dict[str, dict[str, Any]] = {}
        for dest, state, n, oldest in rows:
            d = per.setdefault(dest, {"waiting": 0, "oldest": None, "held": 0, "dead": 0})
            if state in NOT_YET_DELIVERED:
                d["waiting"] += n
                age = (now - _utc(oldest)).total_seconds()
                d["oldest"] = age if d["oldest"] is None else max(d["oldest"], age)
            else:
                d[state] += n
        backlog = [
            Backlog(dest, d["waiting"], d["oldest"] or 0.0, d["held"], d["dead"]) for dest, d in sorted(per.items())
        ]
        if lim.max_unclassified is not None and unclassified > lim.max_unclassified:
            refuse.append(
                f"{unclassified} instances wait for the classifier, more than {lim.max_unclassified} "
                "(limits.max_unclassified)"
            )
        waiting = sum(b.waiting for b in backlog)
        if lim.max_outbox_pending is not None and waiting > lim.max_outbox_pending:
            refuse.append(f"{waiting} deliveries wait, more than {lim.max_outbox_pending} (limits.max_outbox_pending)")
        if lim.outbox_alert_age_s is not None:
            for b in backlog:
                if b.waiting and b.oldest_age_s > lim.outbox_alert_age_s:
                    alerts.append(
                        f"oldest delivery to {b.destination} has waited {b.oldest_age_s:.0f} s, more than "
                        f"{lim.outbox_alert_age_s:.0f} s (limits.outbox_alert_age_s)"
                    )
    return Health(free, unclassified, tuple(backlog), tuple(refuse), tuple(alerts), error, by_state)


def stores(proposed_abstract_syntaxes: list[str]) -> bool:
    """Whether an association proposing these contexts may write into the spool (anything not echo or query)."""
    from pynetdicom import (
        service_class,  # here: the cleaner and `status` need no DICOM stack
    )
    from pynetdicom.sop_class import uid_to_service_class

    read_only = (
        service_class.VerificationServiceClass,
        service_class.QueryRetrieveServiceClass,
        service_class.HangingProtocolQueryRetrieveServiceClass,
    )
    return any(not issubclass(uid_to_service_class(uid), read_only) for uid in proposed_abstract_syntaxes)


class Pressure:
    """The cached answer to "may we take new work?", for the receive path."""

    def __init__(self, settings: Settings, store: Store, clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self.store = store
        self.clock = clock
        self._health: Health | None = None
        self._at = float("-inf")
        self._refreshing = threading.Lock()
        self.refreshes = 0

    def health(self) -> Health:
        """The last measure, refreshed when older than ``limits.check_every_s``."""
        stale = self.clock() - self._at >= self.settings.limits.check_every_s
        # One thread measures; the others go on with the previous answer.
        if (stale or self._health is None) and self._refreshing.acquire(blocking=self._health is None):
            try:
                self._health = measure(self.settings, self.store)
                self._at = self.clock()
                self.refreshes += 1
            finally:
                self._refreshing.release()
        assert self._health is not None
        return self._health

    def refusal(self, event: Any) -> str | None:
        """Why the association of this EVT_REQUESTED event must be refused now; None to go on."""
        primitive = event.assoc.requestor.primitive
        contexts = [str(cx.abstract_syntax) for cx in (primitive.presentation_context_definition_list or [])]
        if not stores(contexts):
            return None
        refuse = self.health().refuse
        return "; ".join(refuse) if refuse else None
