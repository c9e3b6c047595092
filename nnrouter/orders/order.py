"""Orders: what was asked for, from wherever the hospital keeps it.

An order reaches nnrouter three ways: written into the images themselves
(Requested Procedure Code Sequence and friends), from a Modality Worklist
SCP queried by accession number, or as an HL7 v2 ORM^O01 / OMI^O23 message
over MLLP. All three end as the same ``Order`` value, stored and linked to
studies by accession number and Study Instance UID, so the mismatch check
does not care where an order came from.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from sqlalchemy import String, and_, or_, select
from sqlalchemy.orm import Session

from nnrouter.core.codes import Code, family
from nnrouter.core.codes import classes as view_classes
from nnrouter.core.store import OrderRequest
from nnrouter.orders.laterality import laterality_from_text

if TYPE_CHECKING:
    from nnrouter.orders.procedures import ProcedureBook


class OrderSource:
    IMAGE = "image"  # the instances' own request attributes
    WORKLIST = "worklist"  # Modality Worklist C-FIND
    HL7 = "hl7"  # HL7 v2 over MLLP


@dataclass(frozen=True)
class Order:
    """One requested procedure. Patient fields are kept for linking, never logged."""

    source: str
    accession_number: str | None
    study_uid: str | None = None
    requested_procedure_id: str | None = None
    placer_order_number: str | None = None
    filler_order_number: str | None = None
    # Procedure codes as ordered: LOINC (scheme "LN") where the hospital uses
    # them, local codes otherwise (scheme as sent, e.g. "L" or "99LOCAL").
    codes: tuple[Code, ...] = ()
    description: str | None = None
    # "L", "R", "B" (both) or None when the order does not say.
    laterality: str | None = None
    modality: str | None = None
    # HL7 ORC-1 order control ("NW" new, "CA" cancel, "XO" change, ...); "NW" for other sources.
    control: str = "NW"
    scheduled_at: str | None = None  # DICOM DT or HL7 TS, as sent
    patient_id: str | None = None
    patient_name: str | None = None
    extra: dict = field(default_factory=dict, compare=False, hash=False)


# --- orders written into the images ------------------------------------------


def text_of(ds: Dataset, keyword: str) -> str:
    """An attribute as plain text ("" when absent); several values joined with a backslash."""
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, MultiValue):  # e.g. several scheduled station AE titles
        return "\\".join(str(v).strip() for v in value)
    return str(value).strip()


def codes_of(items: Iterable[Dataset] | None) -> tuple[Code, ...]:
    """The codes of a code sequence (Requested Procedure Code Sequence and the like)."""
    out = []
    for item in items or ():
        value = text_of(item, "CodeValue") or text_of(item, "LongCodeValue") or text_of(item, "URNCodeValue")
        if value:
            out.append(Code(value, text_of(item, "CodingSchemeDesignator"), text_of(item, "CodeMeaning")))
    return tuple(out)


def _text(ds: Dataset, keyword: str) -> str | None:
    return text_of(ds, keyword) or None


def from_header(ds: Dataset) -> list[Order]:
    """The orders an instance carries: each Request Attributes item, else the study-level request.

    Modalities fed by a worklist copy the request into Request Attributes
    Sequence (one item per requested procedure); others leave only the
    Requested Procedure Code Sequence, the Procedure Code Sequence or a
    Study Description. Nothing requested at all gives no order.
    """
    accession = _text(ds, "AccessionNumber")
    study_uid = _text(ds, "StudyInstanceUID")
    orders = []
    for item in ds.get("RequestAttributesSequence", None) or ():
        codes = codes_of(item.get("RequestedProcedureCodeSequence")) or codes_of(
            ds.get("RequestedProcedureCodeSequence")
        )
        desc = (
            _text(item, "RequestedProcedureDescription")
            or _text(item, "ScheduledProcedureStepDescription")
            or _text(ds, "RequestedProcedureDescription")
        )
        orders.append(
            Order(
                source=OrderSource.IMAGE,
                accession_number=_text(item, "AccessionNumber") or accession,
                study_uid=study_uid,
                requested_procedure_id=_text(item, "RequestedProcedureID"),
                codes=codes,
                description=desc,
                laterality=laterality_from_text(desc),
                modality=_text(ds, "Modality"),
                patient_id=_text(ds, "PatientID"),
                patient_name=_text(ds, "PatientName"),
            )
        )
    if orders:
        return orders
    codes = (
        codes_of(ds.get("RequestedProcedureCodeSequence"))
        or codes_of(ds.get("ProcedureCodeSequence"))
        or codes_of(ds.get("PerformedProtocolCodeSequence"))
    )
    desc = (
        _text(ds, "RequestedProcedureDescription")
        or _text(ds, "StudyDescription")
        or _text(ds, "PerformedProcedureStepDescription")
    )
    if not codes and not desc:
        return []
    return [
        Order(
            source=OrderSource.IMAGE,
            accession_number=accession,
            study_uid=study_uid,
            codes=codes,
            description=desc,
            laterality=laterality_from_text(desc),
            modality=_text(ds, "Modality"),
            patient_id=_text(ds, "PatientID"),
            patient_name=_text(ds, "PatientName"),
        )
    ]


def key(order: Order) -> str:
    """What makes a re-sent order the same order: an update, not a second one."""
    if order.source == OrderSource.HL7 and (order.placer_order_number or order.filler_order_number):
        # A placer's order number names its order for life: a cancel or change may carry nothing else.
        return f"hl7:order:{order.placer_order_number or ''}:{order.filler_order_number or ''}"[:200]
    ident = (
        order.requested_procedure_id
        or order.placer_order_number
        or order.filler_order_number
        or "|".join(f"{c.scheme}:{c.value}" for c in order.codes)
        or (order.description or "")
    )
    # Orders read from images belong to their study: modalities reuse accession numbers.
    link = order.study_uid if order.source == OrderSource.IMAGE else (order.accession_number or order.study_uid)
    return f"{order.source}:{link or ''}:{ident}"[:200]


# --- ordered vs performed ------------------------------------------------------


class FlagKind:
    """What the ordered-vs-performed check can say about a study (usable in rules: `when: mismatch`)."""

    WRONG_BODY_PART = "wrong_body_part"
    MISSING_VIEW = "missing_view"
    EXTRA_VIEW = "extra_view"
    HEADER_CONFLICT = "header_conflict"  # Body Part Examined / View Position vs the pixels
    LATERALITY_CONFLICT = "laterality_conflict"
    UNCERTAIN = "uncertain"  # the model is not sure enough to call a mismatch
    UNMAPPED_PROCEDURE = "unmapped_procedure"  # the order's procedure is not in procedures.yaml

    ALL = (
        WRONG_BODY_PART,
        MISSING_VIEW,
        EXTRA_VIEW,
        HEADER_CONFLICT,
        LATERALITY_CONFLICT,
        UNCERTAIN,
        UNMAPPED_PROCEDURE,
    )
    # Kinds that say the study is not what was ordered (rules' `mismatch: any` means these).
    MISMATCHES = (WRONG_BODY_PART, MISSING_VIEW, EXTRA_VIEW, HEADER_CONFLICT, LATERALITY_CONFLICT)


@dataclass(frozen=True)
class Seen:
    """One instance as the check sees it: what the model said and what the header says."""

    sop_instance_uid: str
    label: str | None  # a class, "unknown", or None when it was never classified (undecodable)
    score: float | None
    confident: bool  # the model's score cleared its calibrated threshold
    body_part_examined: str | None = None
    view_position: str | None = None
    laterality: str | None = None  # Image Laterality / Laterality: L, R, B, U


@dataclass(frozen=True)
class Finding:
    kind: str
    severity: str  # info | warning | error
    reason: str
    sop_instance_uid: str | None = None
    evidence: dict = field(default_factory=dict)


# Header spellings modalities use for the same body part as classes.csv.
_BODY_PART_SYNONYMS = {
    "THORAX": "CHEST",
    "CSPINE": "CSPINE",
    "CERVICALSPINE": "CSPINE",
    "TSPINE": "TSPINE",
    "THORACICSPINE": "TSPINE",
    "LSPINE": "LSPINE",
    "LUMBARSPINE": "LSPINE",
    "ABDOMEN": "ABDOMEN",
    "ABD": "ABDOMEN",
    "PELVIS": "PELVIS",
    "HIP": "HIP",
    "JAW": "JAW",
    "MANDIBLE": "JAW",
    "TEETH": "JAW",
    "DENTAL": "JAW",
}
_FRONTAL = {"AP", "PA", "FRONTAL"}
_LATERAL = {"LL", "RL", "LAT", "LATERAL", "LLD", "RLD"}


# Header body parts that contain a class's part: a finger on a HAND film is no conflict.
_CONTAINS = {
    "FINGER": {"HAND"},
    "HIP": {"PELVIS"},
    "JAW": {"HEAD", "SKULL"},
    "CSPINE": {"SPINE", "NECK"},
    "TSPINE": {"SPINE"},
    "LSPINE": {"SPINE"},
    "KNEE": {"LEG", "LOWERLIMB"},
    "ANKLE": {"LEG", "FOOT"},
    "WRIST": {"HAND", "ARM"},
    "ELBOW": {"ARM", "UPPERLIMB"},
    "SHOULDER": {"ARM", "UPPERLIMB"},
    "CHEST": {"THORAX"},
}


def _same_part(header: str, class_part: str | None) -> bool:
    return header == class_part or (class_part is not None and header in _CONTAINS.get(class_part, set()))


def _body_part(value: str | None) -> str | None:
    if not value:
        return None
    v = "".join(ch for ch in value.upper() if ch.isalnum())
    return _BODY_PART_SYNONYMS.get(v, v)


def _header_family(view_position: str | None) -> str | None:
    """frontal / lateral for a header View Position; None when it says neither (or nothing)."""
    vp = (view_position or "").upper().strip()
    return "frontal" if vp in _FRONTAL else "lateral" if vp in _LATERAL else None


def _class_family(class_name: str) -> str | None:
    """frontal / lateral for a view class, as the hanging protocols order them; None for the others."""
    f = family(class_name)
    return f if f in ("frontal", "lateral") else None


# HL7 ORC-1 codes after which an order no longer stands: cancel / discontinue requests and their confirmations.
ENDED = ("CA", "CR", "OC", "DC", "DR", "OD")


def _active(orders: list[Order]) -> list[Order]:
    """Orders still standing."""
    return [o for o in orders if o.control not in ENDED]


def check(
    orders: list[Order], seen: list[Seen], book: ProcedureBook | None, covered: set[str] | None = None
) -> list[Finding]:
    """Ordered vs performed for one study.

    ``book`` may be None only when ``orders`` is empty (no procedures.yaml).
    ``covered`` is the set of classes the model can predict (None: all).
    Only confident predictions count as evidence of a mismatch; the others
    raise `uncertain`. An expected class the model cannot recognise is never
    called missing: it is uncertain too.
    """
    classes = view_classes()
    active = _active(orders)
    sure = [s for s in seen if s.confident and s.label in classes]
    uncertain = [s for s in seen if not (s.confident and s.label in classes)]
    findings = [*_header_conflicts(sure), *map(_uncertain, uncertain), *_laterality_conflicts(active, seen)]
    if not active:
        return findings
    assert book is not None  # callers without a book pass no orders
    expected, unmapped = _expected(active, book)
    findings += unmapped
    if len(unmapped) == len(active):  # no order says which views to expect
        return findings
    got, performed = _performed(sure, expected)
    return findings + performed + _missing(expected, got, len(uncertain), covered)


def _header_conflicts(sure: list[Seen]) -> list[Finding]:
    """Header vs pixels, with or without an order: Body Part Examined and View Position against the class."""
    classes = view_classes()
    findings = []
    for s in sure:
        assert s.label is not None  # sure: its label is a class
        vc = classes[s.label]
        hb = _body_part(s.body_part_examined)
        if hb and not _same_part(hb, _body_part(vc.body_part_examined)):
            findings.append(
                Finding(
                    FlagKind.HEADER_CONFLICT,
                    "warning",
                    f"header says Body Part Examined {s.body_part_examined!r}, the image looks like {s.label} ({s.score:.2f})",
                    s.sop_instance_uid,
                    {"header": {"BodyPartExamined": s.body_part_examined}, "predicted": s.label, "score": s.score},
                )
            )
        hf, cf = _header_family(s.view_position), _class_family(s.label)
        if hf and cf and hf != cf:
            findings.append(
                Finding(
                    FlagKind.HEADER_CONFLICT,
                    "warning",
                    f"header says View Position {s.view_position!r} ({hf}), the image looks {cf}: {s.label} ({s.score:.2f})",
                    s.sop_instance_uid,
                    {"header": {"ViewPosition": s.view_position}, "predicted": s.label, "score": s.score},
                )
            )
    return findings


def _uncertain(s: Seen) -> Finding:
    why = (
        "never classified (undecodable or failed)"
        if s.label is None
        else f"the model is not sure: {s.label} ({s.score:.2f})"
        if s.score is not None
        else f"the model said {s.label}"
    )
    return Finding(FlagKind.UNCERTAIN, "info", why, s.sop_instance_uid, {"predicted": s.label, "score": s.score})


def _laterality_conflicts(active: list[Order], seen: list[Seen]) -> list[Finding]:
    """The orders' one side vs each image's Image Laterality (nothing to say when they name both or none)."""
    sides = {o.laterality for o in active if o.laterality in ("L", "R")}
    if len(sides) != 1:
        return []
    side = sides.pop()
    return [
        Finding(
            FlagKind.LATERALITY_CONFLICT,
            "error",
            f"ordered {'left' if side == 'L' else 'right'}, Image Laterality is {s.laterality}",
            s.sop_instance_uid,
            {"ordered": side, "image": s.laterality},
        )
        for s in seen
        if s.laterality in ("L", "R") and s.laterality != side
    ]


def _expected(active: list[Order], book: ProcedureBook) -> tuple[Counter[str], list[Finding]]:
    """The views the mapped orders expect, and an unmapped_procedure finding per order the book cannot map."""
    expected: Counter[str] = Counter()
    unmapped = []
    for o in active:
        e = book.expect(o)
        if e.procedure is None:
            unmapped.append(
                Finding(
                    FlagKind.UNMAPPED_PROCEDURE,
                    "info",
                    e.matched_by,
                    None,
                    {
                        "codes": [[c.value, c.scheme, c.meaning] for c in o.codes],
                        "description": o.description,
                        "source": o.source,
                    },
                )
            )
            continue
        expected += e.views
    return expected, unmapped


def _performed(sure: list[Seen], expected: Counter[str]) -> tuple[Counter[str], list[Finding]]:
    """The expected views the confident images show, and the images of another body part or one view too many."""
    classes = view_classes()
    expected_parts = {_body_part(classes[c].body_part_examined) for c in expected}
    got: Counter[str] = Counter()
    findings = []
    for s in sure:
        assert s.label is not None  # sure: its label is a class
        part = _body_part(classes[s.label].body_part_examined)
        evidence = {"predicted": s.label, "score": s.score, "expected": sorted(expected)}
        if part not in expected_parts:
            findings.append(
                Finding(
                    FlagKind.WRONG_BODY_PART,
                    "error",
                    f"ordered {', '.join(sorted(p for p in expected_parts if p))}, the image looks like {s.label} ({s.score:.2f})",
                    s.sop_instance_uid,
                    evidence,
                )
            )
            continue
        got[s.label] += 1
        if got[s.label] > expected.get(s.label, 0):
            findings.append(
                Finding(
                    FlagKind.EXTRA_VIEW,
                    "warning",
                    f"{s.label} ({s.score:.2f}) was not ordered"
                    if s.label not in expected
                    else f"more {s.label} images than ordered ({got[s.label]} > {expected[s.label]})",
                    s.sop_instance_uid,
                    evidence,
                )
            )
    return got, findings


def _missing(expected: Counter[str], got: Counter[str], unsure: int, covered: set[str] | None) -> list[Finding]:
    """The ordered views not found: missing, or uncertain when the model cannot see them or was unsure of enough images."""
    findings = []
    for cls, n in sorted(expected.items()):
        short = n - got.get(cls, 0)
        if short <= 0:
            continue
        if covered is not None and cls not in covered:
            findings.append(
                Finding(
                    FlagKind.UNCERTAIN,
                    "info",
                    f"ordered {cls}, which the model cannot recognise: cannot say whether it is present",
                    None,
                    {"expected": cls},
                )
            )
            continue
        if unsure >= short:
            unsure -= short  # an image the model was unsure of may be this view
            continue
        findings.append(
            Finding(
                FlagKind.MISSING_VIEW,
                "warning",
                f"ordered {n} x {cls}, found {got.get(cls, 0)}",
                None,
                {"expected": cls, "count": n, "found": got.get(cls, 0)},
            )
        )
    return findings


def complete(orders: list[Order], seen: list[Seen], book: ProcedureBook) -> bool:
    """Every view the mapped orders expect has arrived (confidently recognised)."""
    active = _active(orders)
    expectations = [book.expect(o) for o in active]
    if not expectations or any(e.procedure is None for e in expectations):
        return False
    expected: Counter[str] = Counter()
    for e in expectations:
        expected += e.views
    got = Counter(s.label for s in seen if s.confident and s.label)
    return all(got.get(c, 0) >= n for c, n in expected.items())


# --- kept in the store -----------------------------------------------------------


def save(session: Session, order: Order) -> int:
    """Insert, or update the order with the same key; a cancel keeps the row and marks it.

    An update changes what it says and keeps what it leaves out: an HL7
    status change often carries no procedure code, and must not erase it.
    Values are cut to their columns' widths (PostgreSQL refuses longer ones).
    """
    k = key(order)
    row = session.execute(select(OrderRequest).where(OrderRequest.key == k)).scalar_one_or_none()
    if row is None:
        row = OrderRequest(key=k, source=order.source, codes=[])
        session.add(row)
    values = {
        "accession_number": order.accession_number,
        "study_uid": order.study_uid,
        "requested_procedure_id": order.requested_procedure_id,
        "placer_order_number": order.placer_order_number,
        "filler_order_number": order.filler_order_number,
        "description": order.description,
        "laterality": order.laterality,
        "modality": order.modality,
        "scheduled_at": order.scheduled_at,
        "patient_id": order.patient_id,
        "patient_name": order.patient_name,
    }
    # What was asked for changes as one: a new description without a side means no side.
    procedure = ("description", "laterality")
    replaces_procedure = bool(order.codes or order.description)
    for name, value in values.items():
        if value or (replaces_procedure and name in procedure):
            width = OrderRequest.__table__.c[name].type
            assert isinstance(width, String)  # these columns are all String(n)
            setattr(row, name, str(value)[: width.length] if value else None)
    if replaces_procedure:
        row.codes = [[c.value, c.scheme, c.meaning] for c in order.codes]
    # An ended order stays ended, unless a new order or a change brings it back.
    if row.control not in ENDED or order.control in ("NW", "XO"):
        row.control = order.control[:4]
    session.flush()
    return row.id


def from_row(row: OrderRequest) -> Order:
    return Order(
        source=row.source,
        accession_number=row.accession_number,
        study_uid=row.study_uid,
        requested_procedure_id=row.requested_procedure_id,
        placer_order_number=row.placer_order_number,
        filler_order_number=row.filler_order_number,
        codes=tuple(Code(v, sch, m) for v, sch, m in row.codes),
        description=row.description,
        laterality=row.laterality,
        modality=row.modality,
        control=row.control,
        scheduled_at=row.scheduled_at,
        patient_id=row.patient_id,
        patient_name=row.patient_name,
    )


def stored_for(session: Session, accession_number: str | None, study_uid: str | None) -> list[Order]:
    """The orders kept for a study, linked by accession number or Study Instance UID."""
    links = []
    if accession_number:  # an order read from another study's images is that study's
        links.append(and_(OrderRequest.accession_number == accession_number, OrderRequest.source != OrderSource.IMAGE))
    if study_uid:
        links.append(OrderRequest.study_uid == study_uid)
    if not links:
        return []
    rows = session.execute(select(OrderRequest).where(or_(*links)).order_by(OrderRequest.id)).scalars()
    return [from_row(r) for r in rows]
