"""Helpers for tests that compare DICOM files and send hand-made data sets."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import tempfile

from pydicom import dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian
from pynetdicom import AE, _config


def dataset_bytes(path: Path) -> bytes:
    """The encoded data set of a Part 10 file, without preamble and file meta."""
    with open(path, "rb") as fp:
        preamble = read_preamble(fp, force=True)
        if preamble is None:
            fp.seek(0)
            return fp.read()
        _read_file_meta_info(fp)
        return fp.read()


def by_sop_uid(folder: Path) -> dict[str, Path]:
    out = {}
    for f in folder.rglob("*"):
        if f.is_file() and not f.name.endswith(".part"):
            try:
                ds = dcmread(f, stop_before_pixels=True, force=True)
                out[str(ds.SOPInstanceUID)] = f
            except Exception:
                continue
    return out


def raw_store(
    port: int,
    items: list[tuple[str, str, bytes]],
    *,
    transfer_syntax: str = ExplicitVRLittleEndian,
    aec: str = "NNROUTER",
) -> list[tuple[int | None, str]]:
    """Send pre-encoded data sets on one association, as a broken modality would.

    Each item is (SOP Class UID, Affected SOP Instance UID, encoded bytes). The
    bytes go on the wire as given (pynetdicom's chunked send streams a file's
    data set without decoding it), so the receiver sees exactly the damage.
    Returns (status, error comment) per item; status None if no response came.
    """
    ae = AE(ae_title="RAWSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for sop_class in {sop for sop, _, _ in items}:
        ae.add_requested_context(sop_class, [transfer_syntax])
    results: list[tuple[int | None, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, (sop_class, sop_uid, raw) in enumerate(items):
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = sop_class
            meta.MediaStorageSOPInstanceUID = sop_uid
            meta.TransferSyntaxUID = transfer_syntax
            meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
            buf = BytesIO()
            buf.write(b"\x00" * 128 + b"DICM")
            write_file_meta_info(buf, meta)
            path = Path(tmp) / f"{i}.dcm"
            path.write_bytes(buf.getvalue() + raw)
            paths.append(path)
        before = _config.STORE_SEND_CHUNKED_DATASET
        _config.STORE_SEND_CHUNKED_DATASET = True
        try:
            assoc = ae.associate("127.0.0.1", port, ae_title=aec)
            assert assoc.is_established, "association with nnrouter failed"
            try:
                for i, path in enumerate(paths, start=1):
                    rsp = assoc.send_c_store(path, msg_id=i)
                    if "Status" not in rsp:
                        results.append((None, "no response"))
                    else:
                        results.append((int(rsp.Status), str(rsp.get("ErrorComment", ""))))
            finally:
                assoc.release()
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = before
    return results


def send_as_is(port: int, files: list[Path], aec: str = "NNROUTER") -> list[tuple[int | None, str]]:
    """Send each file's data set bytes under the syntax its meta claims, even when that is a lie.

    DCMTK's storescu refuses to send some broken files at all; a broken
    modality would send them anyway.
    """
    results = []
    for f in files:
        ds = dcmread(f, force=True, stop_before_pixels=True)
        results += raw_store(
            port,
            [(str(ds.SOPClassUID), str(ds.SOPInstanceUID).strip(), dataset_bytes(f))],
            transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
            aec=aec,
        )
    return results
