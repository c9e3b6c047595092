"""Receive: the C-STORE service, which keeps every instance it acknowledges.

The association (pynetdicom, bound in ``nnrouter.dicom.scp``) and the
application are apart: the SCP calls :meth:`Receiver.store` with the typed
event, and this module decides what a received instance means. It stays thin
because pynetdicom runs one thread per association under Python's GIL: it
parses the header (never the pixels), checks the bytes are what the
negotiated transfer syntax says, and hands them as they came (no decode, no
re-encode) to the store-level ingest (``nnrouter.core.ingest``), which
fsyncs the file and commits the rows; only then is success answered. Pixels
are a worker's job.
"""

from __future__ import annotations

import datetime as dt
import errno
import uuid
from io import BytesIO
from typing import Any

from pydicom import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import decode

from nnrouter.core import ingest, logs
from nnrouter.core.config import Settings
from nnrouter.core.ingest import (
    Header,
    Inconsistent,
    Kept,
    NotKept,
    Unreadable,
    parse_header,
)
from nnrouter.core.spool import Spool
from nnrouter.core.store import Store, unavailable
from nnrouter.dicom.statuses import (
    CANNOT_UNDERSTAND,
    DATASET_DOES_NOT_MATCH,
    OUT_OF_RESOURCES,
    PROCESSING_FAILURE,
    SUCCESS,
)

__all__ = ["ACCEPTED_TRANSFER_SYNTAXES", "Header", "Kept", "Receiver", "parse_header"]

log = logs.get("nnrouter.dicom.receive")

# Transfer syntaxes we accept for storage: uncompressed, deflated, RLE, JPEG
# (baseline, extended, lossless), JPEG-LS and JPEG 2000. Modalities propose
# their native syntax first; accepting it lets us keep the bytes as sent.
ACCEPTED_TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,  # retired, still sent
    RLELossless,
    JPEGBaseline8Bit,  # Process 1
    JPEGExtended12Bit,  # Process 2 & 4
    JPEGLossless,  # Process 14
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
]


def store_request(event: evt.Event) -> tuple[C_STORE, BytesIO]:
    """An EVT_C_STORE's request and its encoded data set, typed: pynetdicom types event.request as any DIMSE message."""
    req = event.request
    assert isinstance(req, C_STORE)  # only EVT_C_STORE handlers call this
    data = req.DataSet
    assert isinstance(data, BytesIO)  # a C-STORE request always carries its data set
    return req, data


def _status_of(exc: NotKept) -> int:
    """The C-STORE failure for an instance the ingest will not keep (PS3.4 B.2.3)."""
    return DATASET_DOES_NOT_MATCH if isinstance(exc, Inconsistent) else CANNOT_UNDERSTAND


def _check_encoding(ds: Dataset, ts: UID) -> None:
    """Refuse a data set encoded otherwise than the negotiated transfer syntax says.

    pydicom quietly reads implicit VR sent as explicit; kept as is, the file's
    meta would lie about its content and every later reader would trip on it.
    """
    implicit, little = ds.original_encoding
    if implicit is not None and implicit != ts.is_implicit_VR:
        found = "implicit" if implicit else "explicit"
        raise Unreadable(f"data set is {found} VR, transfer syntax {ts} is not")
    if little is not None and little != ts.is_little_endian:
        raise Unreadable(f"byte order of data set does not match transfer syntax {ts}")


def _request_at(event: evt.Event) -> dt.datetime | None:
    """The event's time (pynetdicom stamps it local and naive) in UTC."""
    ts = getattr(event, "timestamp", None)
    return ts.astimezone(dt.UTC) if isinstance(ts, dt.datetime) else None


def _ref() -> str:
    """A short reference that ties an Error Comment to its log line."""
    return uuid.uuid4().hex[:8]


def _brief(exc: BaseException) -> str:
    """The driver's own message for the log (statement parameters are hidden by the engine)."""
    orig = getattr(exc, "orig", None) or exc
    return f"{type(orig).__name__}: {str(orig).strip()[:300]}"


class Receiver:
    """The C-STORE application: owns the spool and the store it keeps instances in."""

    def __init__(self, settings: Settings, store: Store, spool: Spool):
        self.settings = settings
        self.store = store
        self.spool = spool

    def keep(self, header: Header, meta: bytes, data: memoryview, origin: dict[str, Any]) -> Kept:
        """Write and record one instance on this node; after this returns it may be acknowledged."""
        # The node whose spool holds the file: only that node can read it.
        return ingest.keep_encoded(
            self.store,
            self.spool,
            header,
            meta,
            data,
            {"node": self.settings.node.name, **origin},
            shared=self.settings.storage.shared,
        )

    def store_instance(self, event: evt.Event) -> tuple[int, str]:
        """Keep one instance of a C-STORE request; returns the status and Error Comment to answer.

        The comment says what is wrong in the sender's terms. What went wrong
        inside (exception text, paths, SQL) goes only to the log, under a
        reference the comment carries. A full disk or a database that is down
        is the site's trouble, not the instance's: Out of Resources, try
        again later.
        """
        req, data = store_request(event)
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
                data.seek(0)
                ds = decode(data, syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated)
            except RecursionError as exc:
                raise Unreadable("sequences nested too deep to read") from exc
            except Exception as exc:
                raise Unreadable(f"cannot parse data set as {ts}", detail=str(exc)[:300]) from exc
            _check_encoding(ds, syntax)
            header = parse_header(
                ds, affected_uid, str(req.AffectedSOPClassUID or ""), data=data.getbuffer(), transfer_syntax=ts
            )
            if header.instance["state_reason"]:
                log.warning("header_incomplete", sop_instance_uid=affected_uid, reason=header.instance["state_reason"])
            for warning in header.warnings:
                log.warning("header_not_conformant", sop_instance_uid=affected_uid, reason=warning)
            meta = event.file_meta
            meta.SourceApplicationEntityTitle = event.assoc.requestor.ae_title.strip()
            buf = DicomBytesIO()
            buf.write(b"\x00" * 128 + b"DICM")
            write_file_meta_info(buf, meta, enforce_standard=True)
            a = event.assoc
            kept = self.keep(
                header,
                buf.getvalue(),
                data.getbuffer(),
                origin={
                    "transfer_syntax_uid": ts,
                    "calling_ae": a.requestor.ae_title.strip(),
                    "called_ae": a.acceptor.ae_title.strip(),
                    "peer_host": a.requestor.address,
                    # When the request had arrived in full: received_at - request_at is the receive
                    # latency (parse, write, fsync) that /metrics shows.
                    "request_at": _request_at(event),
                },
            )
        except NotKept as exc:
            status = _status_of(exc)
            extra = {"detail": exc.detail} if exc.detail else {}
            log.warning(
                "store_refused", sop_instance_uid=affected_uid, status=f"0x{status:04X}", reason=exc.reason, **extra
            )
            return status, exc.reason
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
                log.error(
                    "store_failed_database", sop_instance_uid=affected_uid, ref=ref, reason=problem, error=_brief(exc)
                )
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
