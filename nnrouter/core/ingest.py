"""Ingest: how an instance comes to be kept, whoever made it.

Every instance nnrouter holds, received over C-STORE or made by nnrouter
itself (the study's SR, a coerced copy, a hanging protocol object), is kept
the same one way: its bytes written to the spool under a temporary name,
fsync'd and renamed into place, then its study, series and instance rows
committed. Only after that may a sender be told "success", and only then
does a later stage see the instance. A second copy of the same bytes is the
same instance (a duplicate); different bytes under the same SOP Instance UID
are a new version beside the old one.

The C-STORE receiver (``nnrouter.dicom.receive``) calls :func:`keep_encoded`
with the bytes as they came off the wire; nnrouter's own objects go through
:func:`keep`, which encodes the data set first. Both read the header with
:func:`parse_header`, so a made object lands in the same rows, with the same
checks, as a received one.
"""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom import Dataset
from pydicom.dataelem import RawDataElement
from pydicom.filewriter import dcmwrite
from pydicom.uid import generate_uid
from pydicom.valuerep import VR
from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from nnrouter.core import headers, logs
from nnrouter.core.spool import Spool
from nnrouter.core.store import Instance, InstanceState, Series, Store, Study, utcnow

__all__ = ["Header", "Inconsistent", "Kept", "NotKept", "Unreadable", "keep", "keep_encoded", "parse_header"]

log = logs.get("nnrouter.core.ingest")


class NotKept(ValueError):
    """An instance the store will not keep.

    ``reason`` says what is wrong in DICOM's terms (a sender gets it as the
    Error Comment); ``detail`` (a library's message) is for the log only.
    """

    def __init__(self, reason: str, detail: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


class Unreadable(NotKept):
    """Bytes that cannot be read as DICOM: cut off, an unknown VR, a value that is not its VR."""


class Inconsistent(NotKept):
    """A header that cannot key the store: a missing or malformed UID, or one that contradicts the request."""


@dataclass
class Header:
    """The attributes of an instance that the store records."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    study: dict[str, Any]
    series: dict[str, Any]
    instance: dict[str, Any]
    # What is off in the header but harmless here (a UID with leading zeros): logged, kept.
    warnings: list[str] = field(default_factory=list)
    # The data set without its pixels, as nnrouter.core.headers keeps it in the instance row.
    encoded: bytes | None = None


@dataclass
class Kept:
    instance_id: int
    version: int
    duplicate: bool


# --- the header ---------------------------------------------------------------


def _value(ds: Dataset, keyword: str) -> Any:
    """An attribute's value, or a refusal naming it when its bytes cannot be read as its VR."""
    try:
        return ds.get(keyword)
    except Exception as exc:
        raise Unreadable(f"cannot read {keyword}", detail=str(exc)[:300]) from exc


def _text(ds: Dataset, keyword: str, limit: int) -> str | None:
    value = _value(ds, keyword)
    if value is None or value == "":
        return None
    # NUL is padding to some writers and not text to PostgreSQL: drop it.
    return str(value).replace("\x00", "").strip()[:limit] or None


_UID_CHARS = re.compile(r"[0-9.]+")


def _uid(ds: Dataset, keyword: str, warnings: list[str]) -> str | None:
    """A UID attribute, whole (never cut to 64), checked against PS3.5 9.1; None when absent.

    UIDs name the spool's folders and files and key the rows, so a value that
    is no UID (other characters such as '/' or NUL, empty components as in
    '..', more than 64 characters) is refused: it could not be told from a
    path, or from another instance cut to the same prefix. Components with
    leading zeros break the rule too, but modalities in service send them and
    they harm nothing here: kept, with a warning.
    """
    value = _value(ds, keyword)
    if value is None:
        return None
    uid = str(value).strip(" \x00")
    if not uid:
        return None
    problem = None
    if len(uid) > 64:
        problem = "more than 64 characters"
    elif not _UID_CHARS.fullmatch(uid):
        problem = "not only digits and dots"
    elif "" in uid.split("."):
        problem = "empty component"
    if problem:
        raise Inconsistent(f"{keyword} is not a valid UID: {problem}")
    if any(len(c) > 1 and c[0] == "0" for c in uid.split(".")):
        warnings.append(f"{keyword} has a component with a leading zero")
    return uid


def _int(ds: Dataset, keyword: str) -> int | None:
    """A number for the index (Rows, Columns); one that cannot be read is simply not known."""
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else None
    except Exception:
        return None


_KNOWN_VRS = frozenset(v.value for v in VR)


def _tag(elem: Any) -> str:
    return f"({elem.tag.group:04X},{elem.tag.element:04X})"


def _check_complete(ds: Dataset) -> None:
    """Refuse a data set whose elements were cut off in transit or cannot be read at all.

    pydicom reads a short stream without complaint; a value shorter than its
    declared length means the sender (or the network) lost bytes. A VR that
    the standard does not define leaves the reader guessing how long the
    value is, so nothing after it can be trusted. Items of sequences pydicom
    has already read (undefined length) are looked at too, without recursion,
    however deep they nest.
    """
    pending = [ds]
    while pending:
        for elem in pending.pop()._dict.values():  # raw elements: values not yet converted
            if isinstance(elem, RawDataElement):
                if elem.VR is not None and elem.VR not in _KNOWN_VRS:
                    shown = "".join(c if c.isascii() and c.isalnum() else "?" for c in str(elem.VR))
                    raise Unreadable(f"unknown VR '{shown}' at {_tag(elem)}")
                if elem.length != 0xFFFFFFFF:  # undefined length: an item sequence, read on its own
                    got = len(elem.value or b"")
                    if got != elem.length:
                        raise Unreadable(f"data set truncated at {_tag(elem)}: {got} of {elem.length} bytes")
            elif elem.VR == VR.SQ and isinstance(elem.value, list):
                pending.extend(item for item in elem.value if isinstance(item, Dataset))


def parse_header(
    ds: Dataset,
    affected_sop_instance_uid: str = "",
    affected_sop_class_uid: str = "",
    *,
    data: bytes | memoryview | None = None,
    transfer_syntax: str | None = None,
) -> Header:
    """Pull the identifying attributes out of a data set, or refuse it (:class:`NotKept`).

    The affected UIDs are a C-STORE request's; the data set must agree with
    them. ``transfer_syntax`` is the instance's, in whose encoding the header
    is kept; ``data``, the bytes ``ds`` was read from: the header is then cut
    from them, not written again (:func:`nnrouter.core.headers.encode`).
    """
    _check_complete(ds)
    warnings: list[str] = []
    sop_uid = _uid(ds, "SOPInstanceUID", warnings)
    if not sop_uid:
        raise Inconsistent("missing SOPInstanceUID")
    if affected_sop_instance_uid and sop_uid != affected_sop_instance_uid.strip():
        raise Inconsistent("SOP Instance UID differs from the request's")
    sop_class = _uid(ds, "SOPClassUID", warnings) or affected_sop_class_uid
    if affected_sop_class_uid and sop_class != affected_sop_class_uid.strip():
        raise Inconsistent("SOP Class UID differs from the request's")
    # Study and Series UIDs are Type 1, yet real files lack them. The instance
    # is still worth keeping: group it under UIDs derived from its own, so a
    # re-send lands in the same place, and say so.
    notes = []
    uids: dict[str, str] = {}
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
        found = _uid(ds, keyword, warnings)
        if not found:
            found = generate_uid(entropy_srcs=[sop_uid, keyword])
            notes.append(keyword)
        uids[keyword] = found
    return Header(
        study_uid=uids["StudyInstanceUID"],
        series_uid=uids["SeriesInstanceUID"],
        sop_instance_uid=sop_uid,
        sop_class_uid=sop_class,
        study={
            "patient_id": _text(ds, "PatientID", 64),
            "patient_name": _text(ds, "PatientName", 324),
            "patient_birth_date": _text(ds, "PatientBirthDate", 8),
            "patient_sex": _text(ds, "PatientSex", 16),
            "accession_number": _text(ds, "AccessionNumber", 16),
            "study_date": _text(ds, "StudyDate", 8),
            "study_time": _text(ds, "StudyTime", 16),
            "study_description": _text(ds, "StudyDescription", 64),
            "referring_physician": _text(ds, "ReferringPhysicianName", 324),
        },
        series={
            "modality": _text(ds, "Modality", 16),
            "body_part_examined": _text(ds, "BodyPartExamined", 64),
            "series_description": _text(ds, "SeriesDescription", 64),
            "series_number": _text(ds, "SeriesNumber", 12),
        },
        instance={
            "instance_number": _text(ds, "InstanceNumber", 12),
            "view_position": _text(ds, "ViewPosition", 16),
            "image_laterality": _text(ds, "ImageLaterality", 16) or _text(ds, "Laterality", 16),
            "rows": _int(ds, "Rows"),
            "columns": _int(ds, "Columns"),
            "state_reason": f"header lacks {', '.join(notes)}: grouped under derived UIDs" if notes else None,
        },
        warnings=warnings,
        encoded=headers.encode(ds, transfer_syntax, data),
    )


# --- the durable keep -----------------------------------------------------------

# One SOP Instance UID at a time in this process, so two senders of the same
# UID cannot race for the same file name; another process (another node) that
# wins the race is caught by the unique index instead.
_STRIPES = [threading.Lock() for _ in range(64)]


def keep_encoded(
    store: Store,
    spool: Spool,
    header: Header,
    meta: bytes,
    data: memoryview,
    origin: dict[str, Any],
    *,
    shared: bool = False,
) -> Kept:
    """Write and record one instance (file meta and data set as encoded); after this returns it may be acknowledged.

    ``origin`` holds the instance row's columns that say where it came from
    (transfer syntax, calling AE, peer, node, a state other than received).
    ``shared``: every node sees this spool, so a duplicate of another node's
    instance may put back its missing file; otherwise only this node's files.
    """
    digest = hashlib.sha256(data).hexdigest()
    with _STRIPES[hash(header.sop_instance_uid) % len(_STRIPES)]:
        with store.read() as s:
            rows = s.execute(
                select(Instance.id, Instance.version, Instance.sha256, Instance.path, Instance.node).where(
                    Instance.sop_instance_uid == header.sop_instance_uid
                )
            ).all()
        for row in rows:
            if row.sha256 == digest:
                # Another node's file is in its own spool: the same path here would be a stray copy no cleaner owns.
                if shared or row.node in (None, origin.get("node")):
                    _restore_if_missing(spool, row.path, meta, data)
                return Kept(row.id, row.version, duplicate=True)
        version = max((r.version for r in rows), default=0) + 1
        if rows:
            log.warning(
                "instance_changed_content", sop_instance_uid=header.sop_instance_uid, kept_versions=len(rows) + 1
            )
        dest = spool.path_for(header.study_uid, header.series_uid, header.sop_instance_uid, version)
        size = spool.keep([meta, data], dest)  # type: ignore[list-item]  # a memoryview writes like bytes
        try:
            instance_id = _record(store, header, dest, size, digest, version, origin)
        except IntegrityError:
            # Another node recorded the same content first; ours is the same bytes.
            spool.discard(dest)
            with store.read() as s:
                first = s.execute(
                    select(Instance.id, Instance.version).where(
                        Instance.sop_instance_uid == header.sop_instance_uid, Instance.sha256 == digest
                    )
                ).one()
            return Kept(first.id, first.version, duplicate=True)
        except BaseException:
            spool.discard(dest)
            raise
    return Kept(instance_id, version, duplicate=False)


def keep(store: Store, spool: Spool, ds: Dataset, ae_title: str, *, node: str | None, created: bool = True) -> Kept:
    """Keep a data set nnrouter made (an SR, a coerced copy, a hanging protocol) like a received one.

    It is encoded as a Part 10 file in the transfer syntax its file meta
    names, then kept by :func:`keep_encoded`, so it can be forwarded and
    queried like anything received. ``ae_title`` is recorded as the calling
    AE (ours), ``node`` as the node whose spool holds it. ``created`` marks
    it as nnrouter's own: never classified, and its arrival does not restart
    the study's quiet period; with False it is worked on like a received
    instance. A data set that cannot be keyed raises :class:`NotKept`.
    """
    buf = BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    raw = buf.getvalue()
    # Preamble and DICM (132 bytes), then the group length element (12 bytes) whose value is the rest of the meta.
    meta_len = 132 + 12 + int.from_bytes(raw[140:144], "little")
    # Written again, not cut from ``raw``: a data set read from a file and changed
    # (a coerced copy) still carries that file's offsets.
    header = parse_header(ds, transfer_syntax=str(ds.file_meta.TransferSyntaxUID))
    origin: dict[str, Any] = {
        "transfer_syntax_uid": str(ds.file_meta.TransferSyntaxUID),
        "calling_ae": ae_title,
        "called_ae": None,
        "peer_host": None,
        "node": node,
    }
    if created:
        origin["state"] = InstanceState.CREATED
    return keep_encoded(store, spool, header, raw[:meta_len], memoryview(raw)[meta_len:], origin)


def _restore_if_missing(spool: Spool, path: str, meta: bytes, data: memoryview) -> None:
    """Put a recorded instance's file back when the same bytes come again and it is gone.

    A commit can succeed on the server while the client sees the
    connection drop (PostgreSQL stopped mid-commit): the file was
    discarded, the row stayed, and the sender, told to retry, would be
    acknowledged for a file that is not there.
    """
    dest = Path(path)
    if dest.exists() or not dest.is_relative_to(spool.root):
        return
    log.warning("spool_file_restored", path=str(dest))
    spool.keep([meta, data], dest)  # type: ignore[list-item]


def _insert_ignore(session: Session, model: Any, values: dict[str, Any], key: str) -> int:
    """Insert a row unless one with the same key exists; return its id either way."""
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    session.execute(insert(model).values(**values).on_conflict_do_nothing(index_elements=[key]))
    return session.execute(select(model.id).where(getattr(model, key) == values[key])).scalar_one()


def _record(
    store: Store, header: Header, dest: Path, size: int, digest: str, version: int, origin: dict[str, Any]
) -> int:
    now = utcnow()
    with store.write() as s:
        study_id = _insert_ignore(
            s,
            Study,
            {"study_uid": header.study_uid, **header.study, "created_at": now, "last_received_at": now},
            "study_uid",
        )
        if origin.get("state") != InstanceState.CREATED:  # our own objects do not restart the quiet period
            s.query(Study).filter(Study.id == study_id).update({"last_received_at": now})
        series_id = _insert_ignore(
            s,
            Series,
            {"series_uid": header.series_uid, "study_id": study_id, **header.series, "created_at": now},
            "series_uid",
        )
        inst = Instance(
            series_id=series_id,
            sop_instance_uid=header.sop_instance_uid,
            version=version,
            sop_class_uid=header.sop_class_uid,
            path=str(dest),
            size_bytes=size,
            sha256=digest,
            received_at=now,
            updated_at=now,
            header=header.encoded,
            **header.instance,
            **origin,
        )
        s.add(inst)
        s.flush()
        return inst.id
