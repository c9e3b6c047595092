"""Deliveries as an operator handles them: listed, queued again, purged, a destination paused.

The forwarder works the outbox on its own; these are the hands-on jobs
(``nnrouter outbox list|retry|purge``) for a destination that was down, a
rule that held studies, or sent rows that are no longer worth keeping.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Select, delete, select, update

from nnrouter.core.store import (
    DestinationPause,
    Instance,
    Outbox,
    OutboxState,
    Series,
    Store,
    Study,
    utcnow,
)

RETRYABLE = (OutboxState.DEAD, OutboxState.FAILED, OutboxState.HELD)
PURGEABLE = (OutboxState.SENT,)


def select_deliveries(
    states: Sequence[str] | None = None,
    destinations: Sequence[str] | None = None,
    study_uid: str | None = None,
    ids: Sequence[int] | None = None,
) -> Select[Outbox, str, str]:
    """Outbox rows with their SOP Instance and Study Instance UIDs, oldest first; no filter means all."""
    q = (
        select(Outbox, Instance.sop_instance_uid, Study.study_uid)
        .join(Instance, Instance.id == Outbox.instance_id)
        .join(Series, Series.id == Instance.series_id)
        .join(Study, Study.id == Series.study_id)
    )
    if states:
        q = q.where(Outbox.state.in_(list(states)))
    if destinations:
        q = q.where(Outbox.destination.in_(list(destinations)))
    if study_uid:
        q = q.where(Study.study_uid == study_uid)
    if ids:
        q = q.where(Outbox.id.in_(list(ids)))
    return q.order_by(Outbox.id)


def list_deliveries(
    store: Store,
    states: Sequence[str] | None = None,
    destinations: Sequence[str] | None = None,
    study_uid: str | None = None,
    limit: int = 1000,
) -> list[dict[str, Any]]:
    with store.read() as s:
        return [
            {
                "id": o.id,
                "destination": o.destination,
                "state": o.state,
                "attempts": o.attempts,
                "next_attempt_at": o.next_attempt_at,
                "last_error": o.last_error,
                "rule": o.rule,
                "sop_instance_uid": sop,
                "study_uid": study,
                "sent_at": o.sent_at,
            }
            for o, sop, study in s.execute(select_deliveries(states, destinations, study_uid).limit(limit)).all()
        ]


def retry(
    store: Store,
    states: Sequence[str] | None = None,
    destinations: Sequence[str] | None = None,
    study_uid: str | None = None,
    ids: Sequence[int] | None = None,
) -> list[int]:
    """Queue the selected deliveries again, due now with their attempts reset (default: dead, failed, held ones)."""
    with store.write() as s:
        ids = [
            o.id for o, _, _ in s.execute(select_deliveries(states or RETRYABLE, destinations, study_uid, ids)).all()
        ]
        if ids:
            s.execute(
                update(Outbox)
                .where(Outbox.id.in_(ids))
                .values(
                    state=OutboxState.PENDING, attempts=0, next_attempt_at=utcnow(), claimed_by=None, lease_until=None
                )
            )
    return ids


def purge(
    store: Store,
    states: Sequence[str] | None = None,
    destinations: Sequence[str] | None = None,
    study_uid: str | None = None,
    ids: Sequence[int] | None = None,
) -> list[int]:
    """Remove the selected outbox rows (default: sent ones)."""
    with store.write() as s:
        ids = [
            o.id for o, _, _ in s.execute(select_deliveries(states or PURGEABLE, destinations, study_uid, ids)).all()
        ]
        if ids:
            s.execute(delete(Outbox).where(Outbox.id.in_(ids)))
    return ids


def pause(store: Store, destination: str, by: str) -> bool:
    """Stop the forwarder sending to ``destination`` until resumed; False if it was paused already."""
    with store.write() as s:
        if s.get(DestinationPause, destination) is not None:
            return False
        s.add(DestinationPause(destination=destination, by=by))
    return True


def resume(store: Store, destination: str) -> bool:
    """Let the forwarder send to ``destination`` again; False if it was not paused."""
    with store.write() as s:
        row = s.get(DestinationPause, destination)
        if row is None:
            return False
        s.delete(row)
    return True


def paused(store: Store) -> dict[str, dict[str, Any]]:
    """The paused destinations, with who paused each and when."""
    with store.read() as s:
        return {p.destination: {"by": p.by, "at": p.at} for p in s.execute(select(DestinationPause)).scalars()}
