"""The audit trail: who did what, when, from where, and how it went, kept in the store.

Console and API changes, logins, and the DICOM events worth auditing
(associations accepted or refused, instances refused, queries) land here as
rows; instances received and forwarded are their own rows already
(``instance``, ``outbox``) and are shown beside them. No library for DICOM
PS3.15 audit messages (IHE ATNA over RFC 5424 syslog) is well kept in
Python today, so the records stay in the store (see the README).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import func, select

from nnrouter.core.store import Audit, Store, utcnow


def record(
    store: Store,
    *,
    source: str,
    actor: str,
    action: str,
    result: str = "ok",
    target: str | None = None,
    address: str | None = None,
    node: str | None = None,
    **detail: Any,
) -> None:
    """One audit row; ``detail`` holds UIDs, counts and reasons, never patient names or IDs."""
    with store.write() as s:
        s.add(
            Audit(
                source=source,
                actor=actor[:64],
                action=action,
                result=result,
                target=None if target is None else target[:256],
                address=address,
                node=node,
                detail=detail,
            )
        )


def as_dict(a: Audit) -> dict[str, Any]:
    return {
        "id": a.id,
        "at": a.at,
        "source": a.source,
        "actor": a.actor,
        "address": a.address,
        "action": a.action,
        "target": a.target,
        "result": a.result,
        "detail": a.detail,
        "node": a.node,
    }


def recent(
    store: Store, *, action: str | None = None, actor: str | None = None, limit: int = 200
) -> list[dict[str, Any]]:
    """The newest audit rows first, optionally of one action or actor."""
    query = select(Audit)
    if action:
        query = query.where(Audit.action == action)
    if actor:
        query = query.where(Audit.actor == actor)
    with store.read() as s:
        return [as_dict(a) for a in s.execute(query.order_by(Audit.id.desc()).limit(limit)).scalars()]


def count_since(store: Store, action: str, since: dt.datetime, *, result: str | None = None, **match: str) -> int:
    """How many rows of ``action`` (with ``result`` and column values ``match``) since ``since``."""
    query = select(func.count()).select_from(Audit).where(Audit.action == action, Audit.at >= since)
    if result is not None:
        query = query.where(Audit.result == result)
    for column, value in match.items():
        query = query.where(getattr(Audit, column) == value)
    with store.read() as s:
        return int(s.execute(query).scalar_one())


def since(seconds: float) -> dt.datetime:
    return utcnow() - dt.timedelta(seconds=seconds)
