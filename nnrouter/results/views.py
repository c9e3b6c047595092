"""What the store knows about a study, as plain data for people and tools.

``nnrouter study show``, ``nnrouter mismatches`` and ``nnrouter study hang``
print these; tests and scripts read the same dictionaries as JSON. They read
only: nothing here writes to the store. Patient names, IDs and birth dates are
not part of any view (an operator's screen and a ticket are not the place).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from nnrouter.core.store import Flag, Instance, Outbox, RoutingDecision, Store, Study


class StudyNotFound(LookupError):
    """No study with this Study Instance UID in the store."""

    def __init__(self, study_uid: str):
        self.study_uid = study_uid
        super().__init__(f"no study {study_uid} in the store")


def find_study(s: Any, study_uid: str) -> Study | None:
    """The stored study with this Study Instance UID, or None."""
    from sqlalchemy import select

    return s.execute(select(Study).where(Study.study_uid == study_uid)).scalar_one_or_none()


def flag_dict(f: Flag, review: Any = None) -> dict[str, Any]:
    """A flag as plain data, with the person's review of it (orders.reviews) or None."""
    from nnrouter.orders.reviews import review_dict

    return {
        "kind": f.kind,
        "severity": f.severity,
        "reason": f.reason,
        "sop_instance_uid": f.sop_instance_uid,
        "evidence": f.evidence,
        "at": f.created_at,
        "review": None if review is None else review_dict(review),
    }


def study_report(store: Store, study_uid: str, detector: Any = None) -> dict[str, Any] | None:
    """Series, instances, predictions, regions, orders, flags and deliveries of one study; None if unknown.

    ``detector`` (rules.DetectorRegions) is the configured detector: what it
    can find and what it does not cover, so that a missing chest box is not
    read as a missing chest.
    """
    from sqlalchemy import select

    from nnrouter.orders import order as orders
    from nnrouter.orders import reviews

    with store.read() as s:
        study = find_study(s, study_uid)
        if study is None:
            return None
        reviewed = reviews.of_study(s, study.id)
        flags = [
            flag_dict(f, reviews.applies(reviewed.get((f.kind, f.sop_instance_uid or "")), f))
            for f in s.execute(select(Flag).where(Flag.study_id == study.id).order_by(Flag.id)).scalars()
        ]
        found = [
            {
                "source": o.source,
                "accession_number": o.accession_number,
                "requested_procedure_id": o.requested_procedure_id,
                "codes": [[c.value, c.scheme, c.meaning] for c in o.codes],
                "description": o.description,
                "laterality": o.laterality,
                "control": o.control,
            }
            for o in orders.stored_for(s, study.accession_number, study.study_uid)
        ]
        decision = s.execute(select(RoutingDecision).where(RoutingDecision.study_id == study.id)).scalar_one_or_none()
        outbox: dict[int, list[dict[str, Any]]] = {}
        for o in s.execute(
            select(Outbox)
            .join(Outbox.instance)
            .where(Outbox.instance_id.in_([i.id for se in study.series for i in se.instances]))
        ).scalars():
            outbox.setdefault(o.instance_id, []).append(
                {
                    "destination": o.destination,
                    "state": o.state,
                    "attempts": o.attempts,
                    "rule": o.rule,
                    "sent_at": o.sent_at,
                    "last_error": o.last_error,
                }
            )
        return {
            "study_uid": study.study_uid,
            "accession_number": study.accession_number,
            "study_date": study.study_date,
            "study_description": study.study_description,
            "last_received_at": study.last_received_at,
            "checked_at": study.checked_at,
            "detector": None
            if detector is None or detector.model is None
            else {"model": detector.model, "labels": list(detector.labels), "not_covered": list(detector.not_covered)},
            "orders": found,
            "flags": flags,
            "routing": None
            if decision is None
            else {
                "decided_at": decision.decided_at,
                "rules_digest": decision.rules_digest,
                "rules": decision.outcomes,
                "deliveries": decision.deliveries,
                "hold": decision.hold,
                "discard": decision.discard,
            },
            "series": [
                {
                    "series_uid": se.series_uid,
                    "modality": se.modality,
                    "body_part_examined": se.body_part_examined,
                    "series_description": se.series_description,
                    "instances": [_instance(i, outbox.get(i.id, [])) for i in se.instances],
                }
                for se in study.series
            ],
        }


def _instance(i: Instance, deliveries: list[dict[str, Any]]) -> dict[str, Any]:
    """One instance in study_report: its row, predictions, detections and deliveries."""
    return {
        "sop_instance_uid": i.sop_instance_uid,
        "version": i.version,
        "sop_class_uid": i.sop_class_uid,
        "transfer_syntax_uid": i.transfer_syntax_uid,
        "path": i.path,
        "size_bytes": i.size_bytes,
        "sha256": i.sha256,
        "state": i.state,
        "state_reason": i.state_reason,
        "view_position": i.view_position,
        "image_laterality": i.image_laterality,
        "calling_ae": i.calling_ae,
        "received_at": i.received_at,
        "predictions": [
            {
                "model": f"{p.model_name} {p.model_version}",
                "label": p.label,
                "score": round(p.score, 4),
                "top5": p.top5,
                "ood": p.ood,
                "provider": p.provider,
                "ms": {"decode": p.decode_ms, "preprocess": p.preprocess_ms, "infer": p.infer_ms},
                "cam_path": p.cam_path,
            }
            for p in i.predictions
        ],
        "detections": [
            {
                "model": f"{d.model_name} {d.model_version}",
                "label": d.label,
                "score": round(d.score, 4),
                "box_px": d.box_px,
                "box_mm": d.box_mm,
                "corners_patient": d.corners_patient,
            }
            for d in i.detections
        ],
        "deliveries": deliveries,
    }


def flagged(
    store: Store,
    *,
    kinds: Iterable[str] | None = None,
    every: bool = False,
    study_uid: str | None = None,
    limit: int = 200,
    unresolved: bool = False,
) -> list[dict[str, Any]]:
    """Flagged studies, newest check first: what a QA technologist works through.

    Without ``kinds`` only the mismatches (not uncertain or unmapped) unless
    ``every``; ``unresolved`` leaves out the flags someone resolved.
    """
    from sqlalchemy import and_, func, select

    from nnrouter.core.store import FlagReview

    query = (
        select(Flag, Study.study_uid, Study.accession_number, FlagReview)
        .join(Study, Study.id == Flag.study_id)
        .outerjoin(
            FlagReview,
            and_(
                FlagReview.study_id == Flag.study_id,
                FlagReview.kind == Flag.kind,
                FlagReview.sop_instance_uid == func.coalesce(Flag.sop_instance_uid, ""),
            ),
        )
    )
    # ``unresolved``: filtered below, since a review counts only for the finding it reviewed.
    wanted = list(kinds or [])
    if wanted:
        query = query.where(Flag.kind.in_(wanted))
    elif not every:
        from nnrouter.orders.order import FlagKind

        query = query.where(Flag.kind.in_(FlagKind.MISMATCHES))
    if study_uid:
        query = query.where(Study.study_uid == study_uid)
    with store.read() as s:
        rows = s.execute(query.order_by(Flag.created_at.desc(), Flag.id).limit(limit)).all()
    from nnrouter.orders.reviews import applies

    out = [{"study_uid": uid, "accession_number": acc, **flag_dict(f, applies(r, f))} for f, uid, acc, r in rows]
    return [r for r in out if not (unresolved and r["review"] and r["review"]["state"] == "resolved")]


def study_views(s: Any, study: Study) -> Any:
    """A stored study as the hanging-protocol layout takes it (hanging.StudyViews); None without a usable Study Date."""
    from nnrouter.core.codes import classes
    from nnrouter.core.store import current_instances, latest_predictions
    from nnrouter.results import hanging

    date = study.study_date or ""
    if not re.fullmatch(r"\d{8}", date):
        return None
    known = classes()
    images, parts = [], set()
    rows = current_instances(s, study.id)
    predictions = latest_predictions(s, (i.id for i in rows))
    for inst in rows:
        series = inst.series
        if series.body_part_examined:
            parts.add(series.body_part_examined)
        pred = predictions.get(inst.id)
        side = (inst.image_laterality or "").upper()
        raw = (inst.instance_number or "").strip()
        number = int(raw) if raw.lstrip("-").isdigit() else None
        images.append(
            hanging.ImageView(
                sop_instance_uid=inst.sop_instance_uid,
                series_uid=series.series_uid,
                label=(pred.label if pred.label in known else hanging.UNKNOWN) if pred else None,
                score=min(max(pred.score, 0.0), 1.0) if pred else None,
                laterality=side if side in ("L", "R") else None,
                instance_number=number,
                regions=tuple((d.label, d.score) for d in inst.detections),
            )
        )
    return hanging.StudyViews(study.study_uid, date, study.accession_number or "", frozenset(parts), tuple(images))


def study_layout(store: Store, study_uid: str) -> dict[str, Any]:
    """The hanging layout of one study, with the newest earlier study of the same patient and body part beside it.

    Raises StudyNotFound, or ValueError when the study has no Study Date to order it among priors.
    """
    from sqlalchemy import select

    from nnrouter.results import hanging

    with store.read() as s:
        study = find_study(s, study_uid)
        if study is None:
            raise StudyNotFound(study_uid)
        current = study_views(s, study)
        if current is None:
            raise ValueError(f"study {study_uid} has no Study Date: cannot order it among priors")
        prior = None
        if study.patient_id:
            others = s.execute(
                select(Study).where(Study.patient_id == study.patient_id, Study.id != study.id)
            ).scalars()
            prior = hanging.pick_prior(current, [v for v in (study_views(s, o) for o in others) if v is not None])
    return hanging.layout(current, prior).to_dict()
