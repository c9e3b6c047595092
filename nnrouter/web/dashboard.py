"""The dashboard's figures: states, the last hours minute by minute, queues, refusals, model, disk, files in force.

One dictionary for the page and for ``GET /api/dashboard``; it reads only
counts and timestamps, never a patient field.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import select

from nnrouter.core import audit
from nnrouter.core.config import Settings
from nnrouter.core.store import Instance, InstanceState, Outbox, Prediction, Store, as_utc, utcnow
from nnrouter.routing import deliveries
from nnrouter.service import health, pressure


def activity(store: Store, hours: float = 3.0, now: dt.datetime | None = None) -> dict[str, Any]:
    """Instances received, classified and delivered in each minute of the last ``hours``."""
    now = (now or utcnow()).replace(second=0, microsecond=0) + dt.timedelta(minutes=1)
    minutes = int(hours * 60)
    start = now - dt.timedelta(minutes=minutes)
    with store.read() as s:
        received = s.execute(
            select(Instance.received_at).where(Instance.received_at >= start, Instance.state != InstanceState.CREATED)
        ).scalars()
        series = {"received": _per_minute(received, start, minutes)}
        classified = s.execute(select(Prediction.created_at).where(Prediction.created_at >= start)).scalars()
        series["classified"] = _per_minute(classified, start, minutes)
        delivered = s.execute(select(Outbox.sent_at).where(Outbox.sent_at >= start)).scalars()
        series["delivered"] = _per_minute(delivered, start, minutes)
    return {"start": start, "minutes": minutes, "per_minute": series}


def _per_minute(stamps: Any, start: dt.datetime, minutes: int) -> list[int]:
    counts = [0] * minutes
    for ts in stamps:
        i = int((as_utc(ts) - start).total_seconds() // 60)
        if 0 <= i < minutes:
            counts[i] += 1
    return counts


def _model(settings: Settings, store: Store) -> dict[str, Any]:
    """The configured classifier's card and the execution provider its last prediction ran on."""
    from nnrouter.pixels.modelcard import ModelCardError, load_card

    out: dict[str, Any] = {"classifier": None, "detector": None, "provider": None}
    for role in ("classifier", "detector"):
        path = getattr(settings.models, role)
        if path is None:
            continue
        try:
            card = load_card(path)
        except ModelCardError as exc:
            out[role] = {"path": str(path), "error": str(exc)}
        else:
            out[role] = {"path": str(path), "name": card.name, "version": card.version}
    with store.read() as s:
        last = s.execute(
            select(Prediction.provider, Prediction.model_name, Prediction.created_at)
            .order_by(Prediction.id.desc())
            .limit(1)
        ).first()
    if last is not None:
        out["provider"] = {"provider": last[0], "model": last[1], "at": last[2]}
    return out


def dashboard(settings: Settings, store: Store, hours: float = 3.0, *, expect_stages: bool = True) -> dict[str, Any]:
    measured = pressure.measure(settings, store)  # states, backlog and spool in one look at the store
    health_now = measured.as_dict()
    by_state = measured.by_state
    day = audit.since(24 * 3600)
    return {
        "node": settings.node.name,
        "instances": {"total": sum(by_state.values()), "by_state": by_state},
        "activity": activity(store, hours),
        "outbox": health_now["outbox"],
        "outbox_by_state": store.outbox_counts(),
        "paused": deliveries.paused(store),
        "associations_refused_24h": audit.count_since(store, "association", day, result="refused"),
        "associations_accepted_24h": audit.count_since(store, "association", day, result="ok"),
        "instances_refused_24h": audit.count_since(store, "instance_refused", day),
        "models": _model(settings, store),
        "spool": {"path": str(settings.storage.path), "free_mb": health_now["spool_free_mb"]},
        "rules": store.rules_status("rules"),
        "procedures": store.rules_status("procedures"),
        "alerts": list(measured.alerts),
        "ready": health.readiness(settings, store, expect_stages=expect_stages).as_dict(),
    }


def chart_svg(series: dict[str, list[int]], width: int = 720, height: int = 160) -> str:
    """The per-minute series as one SVG line chart (no JavaScript, no chart library)."""
    colours = {"received": "#2b6cb0", "classified": "#2f855a", "delivered": "#c05621"}
    n = max((len(v) for v in series.values()), default=0)
    top = max([1, *(max(v, default=0) for v in series.values())])
    pad = 24
    lines = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" class="chart" role="img" '
        f'aria-label="instances per minute">',
        f'<line x1="{pad}" y1="{height - pad}" x2="{width}" y2="{height - pad}" stroke="#999"/>',
        f'<text x="0" y="12" font-size="10">{top}/min</text>',
        f'<text x="0" y="{height - pad}" font-size="10">0</text>',
    ]
    for name, values in series.items():
        if n < 2:
            break
        pts = " ".join(
            f"{pad + i * (width - pad) / (n - 1):.1f},{height - pad - v * (height - 2 * pad) / top:.1f}"
            for i, v in enumerate(values)
        )
        lines.append(f'<polyline fill="none" stroke="{colours.get(name, "#333")}" stroke-width="1.5" points="{pts}"/>')
    x = pad
    for name in series:
        lines.append(f'<text x="{x}" y="{height - 6}" font-size="11" fill="{colours.get(name, "#333")}">{name}</text>')
        x += 90
    lines.append("</svg>")
    return "".join(lines)
