"""Send: C-ECHO and C-STORE as an SCU, for people testing a link and for bench runs.

``nnrouter send`` puts every file on one association, the way a modality sends
a study, and proposes each file's own transfer syntax first so the bytes go
out as they are on disk.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, Association
from pynetdicom.sop_class import Verification

MAX_CONTEXTS = 128


class SendError(Exception):
    pass


@dataclass
class Outcome:
    path: Path
    sop_instance_uid: str | None
    status: int | None  # None: not sent (unreadable file, or association lost)
    comment: str


def expand(paths: Iterable[Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file()))
        else:
            files.append(p)
    return files


def _destination_timeout() -> float:
    """A rule file destination's default ``timeout_s``: a link tested by hand waits as the forwarder would.

    Read from the rules model, its one home, rather than written here again;
    imported late because the routing wing builds on this module (MAX_CONTEXTS).
    """
    from nnrouter.routing.rules import Destination

    return float(Destination.model_fields["timeout_s"].default)


def echo(host: str, port: int, aet: str, aec: str, timeout: float | None = None) -> int:
    """C-ECHO; returns the status (0 = the peer is there and talks DICOM). ``timeout`` None: a destination's default."""
    timeout = _destination_timeout() if timeout is None else timeout
    ae = AE(ae_title=aet)
    ae.acse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(Verification)
    assoc = ae.associate(host, port, ae_title=aec)
    if not assoc.is_established:
        raise SendError(_why_not(assoc))
    try:
        rsp = assoc.send_c_echo()
        if "Status" not in rsp:
            raise SendError("no response to C-ECHO (timeout or abort)")
        return int(rsp.Status)
    finally:
        assoc.release()


def _why_not(assoc: Association) -> str:
    rj = assoc.acceptor.primitive
    if assoc.is_rejected and rj is not None:
        return f"association rejected: {rj.result_str}, {rj.source_str}, {rj.reason_str}"
    if assoc.is_aborted:
        return "association aborted by the peer"
    return "no association (peer unreachable or timed out)"


def _read_header(path: Path) -> tuple[str, str | None]:
    ds = dcmread(path, stop_before_pixels=True, force=True)
    sop_class = ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID")
    if not sop_class:
        raise InvalidDicomError("no SOP Class UID")
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    return str(sop_class), (str(ts) if ts else None)


def send(host: str, port: int, files: list[Path], aet: str, aec: str, timeout: float | None = None) -> list[Outcome]:
    """Store every file on one association; returns one outcome per file. ``timeout`` None: a destination's default."""
    timeout = _destination_timeout() if timeout is None else timeout
    outcomes: list[Outcome] = []
    readable: list[tuple[Path, str, str | None]] = []
    for f in files:
        try:
            sop_class, ts = _read_header(f)
            readable.append((f, sop_class, ts))
        except Exception as exc:
            outcomes.append(Outcome(f, None, None, f"not a DICOM file: {exc}"))
    contexts: dict[str, list[str]] = {}
    for _, sop_class, ts in readable:
        tss = contexts.setdefault(sop_class, [])
        if ts and ts not in tss:
            tss.append(ts)
    ae = AE(ae_title=aet)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = timeout
    n = 0
    for sop_class, tss in contexts.items():
        for ts in tss:
            ae.add_requested_context(sop_class, [ts])
            n += 1
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        n += 1
    if n > MAX_CONTEXTS:
        raise SendError(f"these files need {n} presentation contexts; DICOM allows {MAX_CONTEXTS}: send fewer at once")
    if not readable:
        return outcomes
    assoc = ae.associate(host, port, ae_title=aec, max_pdu=0)
    if not assoc.is_established:
        raise SendError(_why_not(assoc))
    try:
        for f, _, ts in readable:
            if not assoc.is_established:
                outcomes.append(Outcome(f, None, None, "association lost before sending"))
                continue
            ds = dcmread(f, force=True)
            if ts is None:
                # A file without meta was written implicit VR little endian.
                from pydicom.dataset import FileMetaDataset

                ds.file_meta = getattr(ds, "file_meta", None) or FileMetaDataset()
                ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
            uid = str(ds.get("SOPInstanceUID", ""))
            try:
                rsp = assoc.send_c_store(ds)
            except (ValueError, RuntimeError) as exc:
                outcomes.append(Outcome(f, uid, None, str(exc)))
                continue
            status = int(rsp.Status) if "Status" in rsp else None
            comment = str(rsp.get("ErrorComment", "")) if status is not None else "no response"
            outcomes.append(Outcome(f, uid, status, comment))
    finally:
        if assoc.is_established:
            assoc.release()
    return outcomes


class NotAccepted(ValueError):
    """The peer takes this SOP class neither in the instance's syntax nor in Explicit VR Little Endian."""


def transcoded(
    path: str,
    sop_class_uid: str,
    transfer_syntax_uid: str,
    accepted: Callable[[str, str], bool],
    ds: Dataset | None = None,
) -> tuple[Dataset | str, str]:
    """What to send the peer and in which syntax: the file itself where the peer takes its syntax, else a copy
    in Explicit VR Little Endian (decompressed, same UIDs: transcoding is not a new instance).

    ``ds``: the data set already read (and coerced) by the caller; then it is what is sent either way.
    """
    if accepted(sop_class_uid, transfer_syntax_uid):
        return (path if ds is None else ds), transfer_syntax_uid
    if not accepted(sop_class_uid, ExplicitVRLittleEndian):
        raise NotAccepted(
            f"destination accepts neither {transfer_syntax_uid} nor Explicit VR Little Endian for {sop_class_uid}"
        )
    ds = dcmread(path) if ds is None else ds
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress(generate_instance_uid=False)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds, ExplicitVRLittleEndian
