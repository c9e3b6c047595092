"""Receive: the C-STORE / C-ECHO SCP that keeps every instance it acknowledges.

The association (pynetdicom) and the application are apart: pynetdicom calls
small handlers with a typed event, and this module decides what a received
instance means. The handler stays thin because pynetdicom runs one thread per
association under Python's GIL: it parses the header (never the pixels),
writes the encoded bytes as they came (no decode, no re-encode), fsyncs, commits
the rows and only then answers success. Pixels are a worker's job.
The same AE answers C-FIND over the store (``nnrouter.dicom.query``).
"""

from __future__ import annotations

import errno
import hashlib
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom import Dataset
from pydicom.dataelem import RawDataElement
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, generate_uid
from pydicom.valuerep import VR
from pynetdicom import AE, evt
from pynetdicom.dsutils import decode
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification
from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError

from nnrouter.core import logs
from nnrouter.core.config import AllowedPeer, Settings
from nnrouter.core.spool import Spool
from nnrouter.core.store import (
    Instance,
    InstanceState,
    Series,
    Store,
    Study,
    unavailable,
    utcnow,
)
from nnrouter.dicom import netguard
from nnrouter.dicom import status as dimse
from nnrouter.dicom.query import TRANSFER_SYNTAXES as QUERY_TRANSFER_SYNTAXES
from nnrouter.dicom.query import Query
from nnrouter.results import hanging
from nnrouter.service import pressure

log = logs.get("nnrouter.dicom.receive")

# Transfer syntaxes we accept for storage: uncompressed, deflated, RLE, JPEG
# (baseline, extended, lossless), JPEG-LS and JPEG 2000. Modalities propose
# their native syntax first; accepting it lets us keep the bytes as sent.
ACCEPTED_TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent)
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (Process 2 & 4)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless (Process 14)
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
]

# C-STORE statuses (PS3.4 Annex B.2.3).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0x0110

# A-ASSOCIATE-RJ: rejected-permanent, service-user, calling AE not recognised.
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
# A general DIMSE failure (PS3.7 C.5.4): the peer may not use this service.
NOT_AUTHORIZED = 0x0124


def peer_allowed(peers: list[AllowedPeer], calling_ae: str, host: str) -> bool:
    """Whether a calling AE title (from this host) is one of the declared peers."""
    return any(p.ae_title == calling_ae and (p.host is None or p.host == host) for p in peers)

_STRIPES = 64


class Refused(Exception):
    """An instance we will not keep, with the DICOM status to answer.

    ``reason`` goes to the sender as the Error Comment, so it says what is
    wrong in DICOM's terms; ``detail`` (a library's message) only to the log.
    """

    def __init__(self, status: int, reason: str, detail: str | None = None):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.detail = detail


@dataclass
class Header:
    """The attributes of a received instance that the store records."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    study: dict[str, Any]
    series: dict[str, Any]
    instance: dict[str, Any]
    # What is off in the header but harmless here (a UID with leading zeros): logged, kept.
    warnings: list[str] = field(default_factory=list)


def _value(ds: Dataset, keyword: str) -> Any:
    """An attribute's value, or a refusal naming it when its bytes cannot be read as its VR."""
    try:
        return ds.get(keyword)
    except Exception as exc:  # pydicom converts lazily; a damaged value fails here
        raise Refused(CANNOT_UNDERSTAND, f"cannot read {keyword}", detail=str(exc)[:300]) from exc


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
    '..', more than 64 characters) is refused with 0xA900: it could not be
    told from a path, or from another instance cut to the same prefix.
    Components with leading zeros break the rule too, but modalities in
    service send them and they harm nothing here: kept, with a warning.
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
        raise Refused(DATASET_DOES_NOT_MATCH, f"{keyword} is not a valid UID: {problem}")
    if any(len(c) > 1 and c[0] == "0" for c in uid.split(".")):
        warnings.append(f"{keyword} has a component with a leading zero")
    return uid


def _int(ds: Dataset, keyword: str) -> int | None:
    """A number for the index (Rows, Columns); one that cannot be read is simply not known."""
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else None
    except Exception:  # noqa: BLE001 - a damaged value (wrong length, several values, not a number) is no number
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
                    raise Refused(CANNOT_UNDERSTAND, f"unknown VR '{shown}' at {_tag(elem)}")
                if elem.length != 0xFFFFFFFF:
                    got = len(elem.value or b"")
                    if got != elem.length:
                        raise Refused(
                            CANNOT_UNDERSTAND,
                            f"data set truncated at {_tag(elem)}: {got} of {elem.length} bytes",
                        )
            elif elem.VR == VR.SQ and isinstance(elem.value, list):
                pending.extend(item for item in elem.value if isinstance(item, Dataset))


def _check_encoding(ds: Dataset, ts: UID) -> None:
    """Refuse a data set encoded otherwise than the negotiated transfer syntax says.

    pydicom quietly reads implicit VR sent as explicit; kept as is, the file's
    meta would lie about its content and every later reader would trip on it.
    """
    implicit, little = ds.original_encoding
    if implicit is not None and implicit != ts.is_implicit_VR:
        found = "implicit" if implicit else "explicit"
        raise Refused(CANNOT_UNDERSTAND, f"data set is {found} VR, transfer syntax {ts} is not")
    if little is not None and little != ts.is_little_endian:
        raise Refused(CANNOT_UNDERSTAND, f"byte order of data set does not match transfer syntax {ts}")


def parse_header(ds: Dataset, affected_sop_instance_uid: str, affected_sop_class_uid: str) -> Header:
    """Pull the identifying attributes out of a received data set, or refuse it."""
    _check_complete(ds)
    warnings: list[str] = []
    sop_uid = _uid(ds, "SOPInstanceUID", warnings)
    if not sop_uid:
        raise Refused(DATASET_DOES_NOT_MATCH, "missing SOPInstanceUID")
    if affected_sop_instance_uid and sop_uid != affected_sop_instance_uid.strip():
        raise Refused(DATASET_DOES_NOT_MATCH, "SOP Instance UID differs from the request's")
    sop_class = _uid(ds, "SOPClassUID", warnings) or affected_sop_class_uid
    if affected_sop_class_uid and sop_class != affected_sop_class_uid.strip():
        raise Refused(DATASET_DOES_NOT_MATCH, "SOP Class UID differs from the request's")
    # Study and Series UIDs are Type 1, yet real files lack them. The instance
    # is still worth keeping: group it under UIDs derived from its own, so a
    # re-send lands in the same place, and say so.
    notes = []
    uids = {}
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
        uids[keyword] = _uid(ds, keyword, warnings)
        if not uids[keyword]:
            uids[keyword] = generate_uid(entropy_srcs=[sop_uid, keyword])
            notes.append(keyword)
    return Header(
        study_uid=uids["StudyInstanceUID"],
        series_uid=uids["SeriesInstanceUID"],
        sop_instance_uid=sop_uid,
        sop_class_uid=sop_class,
        study=dict(
            patient_id=_text(ds, "PatientID", 64),
            patient_name=_text(ds, "PatientName", 324),
            patient_birth_date=_text(ds, "PatientBirthDate", 8),
            patient_sex=_text(ds, "PatientSex", 16),
            accession_number=_text(ds, "AccessionNumber", 16),
            study_date=_text(ds, "StudyDate", 8),
            study_time=_text(ds, "StudyTime", 16),
            study_description=_text(ds, "StudyDescription", 64),
            referring_physician=_text(ds, "ReferringPhysicianName", 324),
        ),
        series=dict(
            modality=_text(ds, "Modality", 16),
            body_part_examined=_text(ds, "BodyPartExamined", 64),
            series_description=_text(ds, "SeriesDescription", 64),
            series_number=_text(ds, "SeriesNumber", 12),
        ),
        instance=dict(
            instance_number=_text(ds, "InstanceNumber", 12),
            view_position=_text(ds, "ViewPosition", 16),
            image_laterality=_text(ds, "ImageLaterality", 16) or _text(ds, "Laterality", 16),
            rows=_int(ds, "Rows"),
            columns=_int(ds, "Columns"),
            state_reason=f"header lacks {', '.join(notes)}: grouped under derived UIDs" if notes else None,
        ),
        warnings=warnings,
    )


def _insert_ignore(session, model, values: dict[str, Any], key: str) -> int:  # type: ignore[no-untyped-def]
    """Insert a row unless one with the same key exists; return its id either way."""
    dialect = session.bind.dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    session.execute(insert(model).values(**values).on_conflict_do_nothing(index_elements=[key]))
    return session.execute(select(model.id).where(getattr(model, key) == values[key])).scalar_one()


def _ref() -> str:
    """A short reference that ties an Error Comment to its log line."""
    return uuid.uuid4().hex[:8]


def _brief(exc: BaseException) -> str:
    """The driver's own message for the log (statement parameters are hidden by the engine)."""
    orig = getattr(exc, "orig", None) or exc
    return f"{type(orig).__name__}: {str(orig).strip()[:300]}"


@dataclass
class Kept:
    instance_id: int
    version: int
    duplicate: bool


@dataclass
class _AssocStats:
    calling_ae: str
    called_ae: str
    peer: str
    started: float = field(default_factory=time.monotonic)
    instances: int = 0
    bytes: int = 0
    statuses: dict[str, int] = field(default_factory=dict)


class Receiver:
    """The application behind the SCP: owns the spool, the store and the counters."""

    def __init__(self, settings: Settings, store: Store, spool: Spool):
        self.settings = settings
        self.store = store
        self.spool = spool
        self._stripes = [threading.Lock() for _ in range(_STRIPES)]
        self._assocs: dict[int, _AssocStats] = {}
        self._assocs_lock = threading.Lock()
        self.query = Query(store)
        self._protocols: list[Dataset] | None = None
        self.pressure = pressure.Pressure(settings, store)  # back-pressure, checked in on_requested

    # --- the durable keep ---

    def keep(self, header: Header, meta: bytes, data: memoryview, origin: dict[str, Any]) -> Kept:
        """Write and record one instance; after this returns it may be acknowledged."""
        digest = hashlib.sha256(data).hexdigest()
        # One SOP Instance UID at a time, so two senders of the same UID cannot
        # race for the same file name.
        lock = self._stripes[hash(header.sop_instance_uid) % _STRIPES]
        with lock:
            with self.store.read() as s:
                rows = s.execute(
                    select(Instance.id, Instance.version, Instance.sha256, Instance.path).where(
                        Instance.sop_instance_uid == header.sop_instance_uid
                    )
                ).all()
            for row in rows:
                if row.sha256 == digest:
                    self._restore_if_missing(row.path, meta, data)
                    return Kept(row.id, row.version, duplicate=True)
            version = max((r.version for r in rows), default=0) + 1
            if rows:
                log.warning(
                    "instance_changed_content",
                    sop_instance_uid=header.sop_instance_uid,
                    kept_versions=len(rows) + 1,
                )
            dest = self.spool.path_for(header.study_uid, header.series_uid, header.sop_instance_uid, version)
            size = self.spool.keep([meta, data], dest)
            try:
                instance_id = self._record(header, dest, size, digest, version, origin)
            except IntegrityError:
                # Another node recorded the same content first; ours is the same bytes.
                self.spool.discard(dest)
                with self.store.read() as s:
                    row = s.execute(
                        select(Instance.id, Instance.version).where(
                            Instance.sop_instance_uid == header.sop_instance_uid, Instance.sha256 == digest
                        )
                    ).one()
                return Kept(row.id, row.version, duplicate=True)
            except BaseException:
                self.spool.discard(dest)
                raise
        return Kept(instance_id, version, duplicate=False)

    def _restore_if_missing(self, path: str, meta: bytes, data: memoryview) -> None:
        """Put a recorded instance's file back when the same bytes come again and it is gone.

        A commit can succeed on the server while the client sees the
        connection drop (PostgreSQL stopped mid-commit): the file was
        discarded, the row stayed, and the sender, told to retry, would be
        acknowledged for a file that is not there.
        """
        dest = Path(path)
        if dest.exists() or not dest.is_relative_to(self.spool.root):
            return
        log.warning("spool_file_restored", path=str(dest))
        self.spool.keep([meta, data], dest)

    def keep_created(self, ds: Dataset, calling_ae: str) -> Kept:
        """Keep an object nnrouter made (an SR) like a received one, so it can be forwarded and queried."""
        from pydicom.filewriter import dcmwrite

        buf = BytesIO()
        dcmwrite(buf, ds, enforce_file_format=True)
        raw = buf.getvalue()
        meta_len = 132 + 12 + int.from_bytes(raw[140:144], "little")  # preamble, DICM, group length element
        header = parse_header(ds, "", "")
        return self.keep(header, raw[:meta_len], memoryview(raw)[meta_len:], origin=dict(
            transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID), calling_ae=calling_ae, called_ae=None,
            peer_host=None, state=InstanceState.CREATED))

    def _record(
        self, header: Header, dest, size: int, digest: str, version: int, origin: dict[str, Any]
    ) -> int:  # type: ignore[no-untyped-def]
        now = utcnow()
        with self.store.write() as s:
            study_id = _insert_ignore(
                s, Study, {"study_uid": header.study_uid, **header.study, "created_at": now, "last_received_at": now}, "study_uid"
            )
            if origin.get("state") != InstanceState.CREATED:  # our own SR does not restart the quiet period
                s.query(Study).filter(Study.id == study_id).update({"last_received_at": now})
            series_id = _insert_ignore(
                s, Series, {"series_uid": header.series_uid, "study_id": study_id, **header.series, "created_at": now}, "series_uid"
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
                **header.instance,
                **origin,
            )
            s.add(inst)
            s.flush()
            return inst.id

    # --- pynetdicom event handlers ---

    def on_requested(self, event: evt.Event) -> None:
        """Check the calling AE (and its host) before negotiation starts."""
        # Back-pressure (nnrouter.service.pressure): a spool or queue near its limit refuses new work, transiently.
        busy = self.pressure.refusal(event)
        if busy is not None:
            log.warning("association_refused_busy", calling_ae=(event.assoc.requestor.primitive.calling_ae_title or "").strip(),
                        peer=event.assoc.requestor.address, reason=busy)
            event.assoc.acse.send_reject(*pressure.REJECT_BUSY)
            event.assoc.kill()
            return
        allowed = self.settings.dicom.allowed_calling_aes
        if not allowed:
            return
        requestor = event.assoc.requestor
        calling = (requestor.primitive.calling_ae_title or "").strip()
        host = requestor.address
        if peer_allowed(allowed, calling, host):
            return
        log.warning("association_rejected", calling_ae=calling, peer=host, reason="calling AE title not allowed")
        event.assoc.acse.send_reject(*REJECT_CALLING_AE)
        # Wait until the A-ASSOCIATE-RJ has gone out and the peer hung up
        # (as pynetdicom's own rejections do); otherwise the socket may close
        # first and the peer sees an abort instead of the reason.
        event.assoc.kill()

    def on_accepted(self, event: evt.Event) -> None:
        a = event.assoc
        with self._assocs_lock:
            self._assocs[id(a)] = _AssocStats(
                calling_ae=a.requestor.ae_title.strip(),
                called_ae=a.acceptor.ae_title.strip(),
                peer=f"{a.requestor.address}:{a.requestor.port}",
            )

    def on_rejected(self, event: evt.Event) -> None:
        a = event.assoc
        log.warning(
            "association_rejected",
            calling_ae=(a.requestor.primitive.calling_ae_title or "").strip() if a.requestor.primitive else None,
            called_ae=(a.requestor.primitive.called_ae_title or "").strip() if a.requestor.primitive else None,
            peer=a.requestor.address,
        )

    def on_released(self, event: evt.Event) -> None:
        self._log_association(event, "released")

    def on_aborted(self, event: evt.Event) -> None:
        # pynetdicom signals an abort after the connection has closed, and
        # turns network failures and timeouts into aborts too, so released
        # and aborted between them see every accepted association end.
        self._log_association(event, "aborted")

    def _log_association(self, event: evt.Event, ended: str) -> None:
        with self._assocs_lock:
            stats = self._assocs.pop(id(event.assoc), None)
        if stats is None:
            return
        log.info(
            "association",
            calling_ae=stats.calling_ae,
            called_ae=stats.called_ae,
            peer=stats.peer,
            instances=stats.instances,
            bytes=stats.bytes,
            duration_s=round(time.monotonic() - stats.started, 3),
            statuses=stats.statuses,
            ended=ended,
        )

    def on_find(self, event: evt.Event):  # type: ignore[no-untyped-def]
        """Hanging Protocol queries get the generic protocols; the Q/R models query the store.

        Only from the peers in ``dicom.query_aes``: anyone else is answered
        0x0124 (refused: not authorized), whatever they asked.
        """
        refused = self._query_refused(event)
        if refused is not None:
            return iter([(dimse.status(NOT_AUTHORIZED, refused), None)])
        if str(event.request.AffectedSOPClassUID) == hanging.HANGING_PROTOCOL_FIND:
            if self._protocols is None:
                self._protocols = hanging.generic_protocols()
            return hanging.handle_find(event, self._protocols)
        return self.query.handle_find(event)

    def _query_refused(self, event: evt.Event) -> str | None:
        """Why this peer may not query (the Error Comment), or None when it is declared in query_aes."""
        requestor = event.assoc.requestor
        calling = requestor.ae_title.strip()
        if peer_allowed(self.settings.dicom.query_aes, calling, requestor.address):
            return None
        log.warning(
            "query_refused",
            calling_ae=calling,
            peer=requestor.address,
            status=f"0x{NOT_AUTHORIZED:04X}",
            reason="calling AE not in dicom.query_aes",
        )
        return f"calling AE {calling} is not allowed to query"

    def on_echo(self, event: evt.Event) -> int:
        return SUCCESS

    def on_store(self, event: evt.Event) -> int | Dataset:
        stats = self._assocs.get(id(event.assoc))
        status, reason = self._store(event)
        if stats is not None:
            key = f"0x{status:04X}"
            stats.statuses[key] = stats.statuses.get(key, 0) + 1
            if status == SUCCESS:
                stats.instances += 1
                stats.bytes += len(event.request.DataSet.getbuffer())
        return SUCCESS if status == SUCCESS else dimse.status(status, reason)

    def _store(self, event: evt.Event) -> tuple[int, str]:
        """Keep one instance; returns the status and Error Comment to answer.

        The comment says what is wrong in the sender's terms. What went wrong
        inside (exception text, paths, SQL) goes only to the log, under a
        reference the comment carries. A full disk or a database that is down
        is the site's trouble, not the instance's: 0xA700, try again later.
        """
        req = event.request
        affected_uid = str(req.AffectedSOPInstanceUID or "")
        ts = str(event.context.transfer_syntax)
        try:
            free = self.spool.free_mb()
            if free < self.settings.storage.min_free_mb:
                log.error(
                    "store_refused_disk_full",
                    sop_instance_uid=affected_uid,
                    free_mb=round(free),
                    min_free_mb=self.settings.storage.min_free_mb,
                )
                return OUT_OF_RESOURCES, f"spool below {self.settings.storage.min_free_mb} MB free"
            syntax = event.context.transfer_syntax
            try:
                # Our own decode, not event.dataset: pynetdicom stamps the
                # negotiated encoding on the result, hiding what pydicom found.
                req.DataSet.seek(0)
                ds = decode(req.DataSet, syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated)
            except RecursionError as exc:
                raise Refused(CANNOT_UNDERSTAND, "sequences nested too deep to read") from exc
            except Exception as exc:  # pydicom raises many types on garbage
                raise Refused(CANNOT_UNDERSTAND, f"cannot parse data set as {ts}", detail=str(exc)[:300]) from exc
            _check_encoding(ds, syntax)
            header = parse_header(ds, affected_uid, str(req.AffectedSOPClassUID or ""))
            if header.instance["state_reason"]:
                log.warning("header_incomplete", sop_instance_uid=affected_uid, reason=header.instance["state_reason"])
            for warning in header.warnings:
                log.warning("header_not_conformant", sop_instance_uid=affected_uid, reason=warning)
            meta = event.file_meta
            meta.SourceApplicationEntityTitle = event.assoc.requestor.ae_title.strip()
            buf = BytesIO()
            buf.write(b"\x00" * 128 + b"DICM")
            write_file_meta_info(buf, meta, enforce_standard=True)
            a = event.assoc
            kept = self.keep(
                header,
                buf.getvalue(),
                req.DataSet.getbuffer(),
                origin=dict(
                    transfer_syntax_uid=ts,
                    calling_ae=a.requestor.ae_title.strip(),
                    called_ae=a.acceptor.ae_title.strip(),
                    peer_host=a.requestor.address,
                ),
            )
        except Refused as exc:
            extra = {"detail": exc.detail} if exc.detail else {}
            log.warning(
                "store_refused", sop_instance_uid=affected_uid, status=f"0x{exc.status:04X}", reason=exc.reason, **extra
            )
            return exc.status, exc.reason
        except OSError as exc:
            ref = _ref()
            log.error("store_failed_io", sop_instance_uid=affected_uid, ref=ref, errno=exc.errno, error=exc.strerror)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                return OUT_OF_RESOURCES, f"spool disk full (ref {ref})"
            return OUT_OF_RESOURCES, f"cannot write spool (ref {ref})"
        except Exception as exc:
            ref = _ref()
            problem = unavailable(exc)
            if problem:
                log.error("store_failed_database", sop_instance_uid=affected_uid, ref=ref, reason=problem,
                          error=_brief(exc))
                return OUT_OF_RESOURCES, f"{problem} (ref {ref})"
            log.exception("store_failed", sop_instance_uid=affected_uid, ref=ref)
            return PROCESSING_FAILURE, f"internal error (ref {ref})"
        log.debug(
            "stored",
            sop_instance_uid=header.sop_instance_uid,
            study_uid=header.study_uid,
            version=kept.version,
            duplicate=kept.duplicate,
        )
        return SUCCESS, ""

    # --- the server ---

    def handlers(self) -> list[tuple[Any, Any]]:
        return [
            (evt.EVT_REQUESTED, self.on_requested),
            (evt.EVT_ACCEPTED, self.on_accepted),
            (evt.EVT_REJECTED, self.on_rejected),
            (evt.EVT_RELEASED, self.on_released),
            (evt.EVT_ABORTED, self.on_aborted),
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_C_STORE, self.on_store),
            (evt.EVT_C_FIND, self.on_find),
        ]


def make_ae(settings: Settings) -> AE:
    """An AE that accepts every storage SOP class in the syntaxes we keep, and the FIND models."""
    d = settings.dicom
    ae = AE(ae_title=d.ae_title)
    ae.require_called_aet = True
    ae.maximum_associations = d.max_associations
    ae.maximum_pdu_size = d.max_pdu
    ae.acse_timeout = d.acse_timeout_s
    ae.dimse_timeout = d.dimse_timeout_s
    ae.network_timeout = d.network_timeout_s
    ae.add_supported_context(Verification, ACCEPTED_TRANSFER_SYNTAXES)
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES)
    for uid in (*Query.contexts(), hanging.HANGING_PROTOCOL_FIND):
        ae.add_supported_context(uid, QUERY_TRANSFER_SYNTAXES)
    # Hanging protocols are stored to us like images (a viewer's own, or ours sent back).
    ae.add_supported_context(hanging.HANGING_PROTOCOL_STORAGE, ACCEPTED_TRANSFER_SYNTAXES)
    return ae


def serve(settings: Settings, store: Store, spool: Spool, *, block: bool = True):  # type: ignore[no-untyped-def]
    """Start the SCP; returns the pynetdicom server when ``block`` is False."""
    receiver = Receiver(settings, store, spool)
    swept = spool.sweep_incoming()
    ae = make_ae(settings)
    d = settings.dicom
    log.info(
        "listening",
        ae_title=d.ae_title,
        bind=d.bind,
        port=d.port,
        spool=str(spool.root),
        database=store.engine.url.render_as_string(hide_password=True),
        swept_partial_files=swept,
    )
    tls = netguard.tls_context(d.tls) if d.tls is not None else None
    server = netguard.make_server(
        ae, (d.bind, d.port), netguard.Limits.from_settings(d), receiver.handlers(), tls=tls
    )
    if d.tls is not None:
        log.info("tls", cert=str(d.tls.cert), ca=str(d.tls.ca) if d.tls.ca else None,
                 require_client_cert=d.tls.require_client_cert)
    if not block:
        return netguard.run_in_thread(server)
    try:
        server.serve_forever()
    finally:
        server.shutdown()
    return None
