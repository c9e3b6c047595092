"""Retrieve: C-GET and C-MOVE SCP over the spool, so a PACS that found nnrouter's views can fetch them.

Patient Root and Study Root, at the STUDY, SERIES and IMAGE levels (and
PATIENT in Patient Root), by the unique keys of each level: PatientID,
StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID, each a single value
or a backslash list (PS3.4 C.4.2.2.1). Only the peers in ``dicom.query_aes``
may retrieve, as for C-FIND; C-MOVE sends only to the AE titles named in
``dicom.move_destinations`` (anything else: 0xA801, Move Destination
unknown).

The spool's files go out as they were received, in their own transfer
syntax: pynetdicom's retrieve handlers take data sets, not files, so each
file is read with its large values (pixel data) left on disk until they are
written out, and pydicom writes the elements it did not parse as the bytes
it read (pixels are never decoded). Where a C-GET requester did not accept
an instance's own transfer syntax, it gets the instance in Explicit VR
Little Endian, as the forwarder converts (``nnrouter.dicom.send.transcoded``).
For a C-MOVE, nnrouter proposes each instance's own syntax and Explicit VR
Little Endian; pynetdicom converts between the uncompressed syntaxes itself,
and a compressed instance the destination takes only uncompressed is a
failed sub-operation, counted as such (the handler cannot see what the
destination accepted).
A C-CANCEL ends the retrieval before the next instance (status 0xFE00,
with the counts so far).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from sqlalchemy import select
from sqlalchemy.orm import aliased

from nnrouter.core import logs
from nnrouter.core.config import Settings
from nnrouter.core.store import Instance, Series, Store, Study, held_here

log = logs.get("nnrouter.dicom.retrieve")

GET_MODELS = (str(PatientRootQueryRetrieveInformationModelGet), str(StudyRootQueryRetrieveInformationModelGet))
MOVE_MODELS = (str(PatientRootQueryRetrieveInformationModelMove), str(StudyRootQueryRetrieveInformationModelMove))
PATIENT_ROOT = (str(PatientRootQueryRetrieveInformationModelGet), str(PatientRootQueryRetrieveInformationModelMove))

VERIFICATION = "1.2.840.10008.1.1"
PENDING = 0xFF00
CANCELLED = 0xFE00
IDENTIFIER_DOES_NOT_MATCH = 0xA900
NOT_AUTHORIZED = 0x0124
UNABLE_TO_PROCESS = 0xC000

# The unique key of each level (PS3.4 C.6.1.1 / C.6.2.1), in hierarchy order.
LEVEL_KEYS = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}


class BadIdentifier(ValueError):
    """A retrieve identifier that names no level or lacks its unique key: 0xA900 with this comment."""


@dataclass(frozen=True)
class Found:
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: str


def _values(identifier: Dataset, keyword: str) -> list[str]:
    raw = identifier.get(keyword)
    if raw is None or raw == "":
        return []
    items = list(raw) if not isinstance(raw, str) else str(raw).split("\\")
    return [str(v).strip() for v in items if str(v).strip()]


def select_instances(store: Store, identifier: Dataset, model: str, node: str | None) -> list[Found]:
    """The instances a retrieve identifier names, newest version of each, whose file this node holds."""
    level = str(identifier.get("QueryRetrieveLevel", "")).strip().upper()
    if level not in LEVEL_KEYS or (level == "PATIENT" and model not in PATIENT_ROOT):
        raise BadIdentifier(f"QueryRetrieveLevel {level or '(none)'} is not one this model retrieves")
    key = LEVEL_KEYS[level]
    if not _values(identifier, key):
        raise BadIdentifier(f"a {level} retrieve needs {key}")
    newer = aliased(Instance)
    query = (
        select(Instance.sop_instance_uid, Instance.sop_class_uid, Instance.transfer_syntax_uid, Instance.path)
        .join(Series, Series.id == Instance.series_id)
        .join(Study, Study.id == Series.study_id)
        .where(
            held_here(node),
            ~select(newer.id)
            .where(newer.sop_instance_uid == Instance.sop_instance_uid, newer.version > Instance.version)
            .exists(),
        )
    )
    columns = {
        "PatientID": Study.patient_id,
        "StudyInstanceUID": Study.study_uid,
        "SeriesInstanceUID": Series.series_uid,
        "SOPInstanceUID": Instance.sop_instance_uid,
    }
    # The key of the level, and those above it where given (the hierarchy they name).
    for keyword in list(LEVEL_KEYS.values())[: list(LEVEL_KEYS).index(level) + 1]:
        wanted = _values(identifier, keyword)
        if wanted:
            query = query.where(columns[keyword].in_(wanted))
    with store.read() as s:
        rows = s.execute(query.order_by(Study.id, Series.id, Instance.id)).all()
    return [Found(*r) for r in rows]


def storage_contexts(found: list[Found]) -> list[Any]:
    """For a C-MOVE's association: each SOP class in the instances' own syntaxes and Explicit VR LE."""
    syntaxes: dict[str, list[str]] = {}
    for f in found:
        ts = syntaxes.setdefault(f.sop_class_uid, [])
        for uid in (f.transfer_syntax_uid, str(ExplicitVRLittleEndian)):
            if uid not in ts:
                ts.append(uid)
    contexts = []
    for sop_class, ts in syntaxes.items():
        for uid in ts:  # one context per syntax, so the peer can accept the instance's own one alone
            contexts.append(build_context(sop_class, [uid]))
    return contexts[:128]  # the most an association may propose (PS3.8: odd context IDs 1-255)


class Retrieve:
    """The C-GET and C-MOVE handlers of the one AE."""

    def __init__(self, settings: Settings, store: Store):
        self.settings = settings
        self.store = store

    def _found(self, event: Any, model: str) -> list[Found] | tuple[int, str]:
        try:
            return select_instances(self.store, event.identifier, model, self.settings.files_of)
        except BadIdentifier as exc:
            return IDENTIFIER_DOES_NOT_MATCH, str(exc)
        except Exception as exc:  # the store is down, the identifier will not decode
            log.error("retrieve_failed", error=type(exc).__name__)
            return UNABLE_TO_PROCESS, "cannot look up the instances now"

    def handle_get(self, event: Any, refused: str | None) -> Iterator[Any]:
        from nnrouter.dicom.send import transcoded
        from nnrouter.dicom.statuses import with_comment

        if refused is not None:
            yield 1
            yield with_comment(NOT_AUTHORIZED, refused), None
            return
        found = self._found(event, str(event.request.AffectedSOPClassUID))
        if isinstance(found, tuple):
            yield 1
            yield with_comment(*found), None
            return
        log.info("retrieve", service="C-GET", calling_ae=event.assoc.requestor.ae_title.strip(), instances=len(found))
        yield len(found)
        accepted = {
            (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
            for cx in event.assoc.accepted_contexts
            if cx.as_scu  # we send the C-STOREs on the requester's association
        }
        for f in found:
            if event.is_cancelled:
                yield CANCELLED, None
                return
            try:
                what, _ts = transcoded(
                    f.path, f.sop_class_uid, f.transfer_syntax_uid, lambda sop, ts: (sop, ts) in accepted
                )
                yield PENDING, what if isinstance(what, Dataset) else as_received(what)
            except Exception as exc:  # unreadable file, nothing accepted for it: this sub-operation fails
                log.warning("retrieve_instance_failed", sop_instance_uid=f.sop_instance_uid, error=type(exc).__name__)
                yield PENDING, _failed_placeholder(f)

    def handle_move(self, event: Any, refused: str | None) -> Iterator[Any]:
        from nnrouter.dicom.statuses import with_comment

        wanted = event.move_destination
        wanted = (wanted.decode(errors="replace") if isinstance(wanted, bytes) else str(wanted or "")).strip()
        dest = next((d for d in self.settings.dicom.move_destinations if d.ae_title == wanted), None)
        if refused is not None:
            yield None, None  # pynetdicom answers 0xA801; the log and the audit say why
            log.warning("move_refused", calling_ae=event.assoc.requestor.ae_title.strip(), reason=refused)
            return
        if dest is None:
            log.warning("move_destination_unknown", destination=wanted)
            yield None, None
            return
        found = self._found(event, str(event.request.AffectedSOPClassUID))
        if isinstance(found, tuple):
            # pynetdicom associates with the destination before it reads the status: give it one context.
            yield dest.host, dest.port, {"contexts": [build_context(VERIFICATION)], "ae_title": dest.ae_title}
            yield 1
            yield with_comment(*found), None
            return
        contexts = storage_contexts(found) if found else [build_context(VERIFICATION)]
        yield dest.host, dest.port, {"contexts": contexts, "ae_title": dest.ae_title}  # the called AE title
        log.info(
            "retrieve",
            service="C-MOVE",
            calling_ae=event.assoc.requestor.ae_title.strip(),
            destination=dest.ae_title,
            instances=len(found),
        )
        yield len(found)
        for f in found:
            if event.is_cancelled:
                yield CANCELLED, None
                return
            try:
                ds = as_received(f.path)
            except Exception as exc:  # the file is gone or unreadable: this sub-operation fails
                log.warning("retrieve_instance_failed", sop_instance_uid=f.sop_instance_uid, error=type(exc).__name__)
                ds = _failed_placeholder(f)
            yield PENDING, ds


def as_received(path: str) -> Dataset:
    """The file's data set, its values over 64 KB (pixel data) read only when pynetdicom writes them out."""
    return dcmread(path, defer_size="64 KB")


def _failed_placeholder(f: Found) -> Dataset:
    """A data set with no context on the association: pynetdicom counts its sub-operation as failed."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.9.9.9", f.sop_instance_uid
    return ds
