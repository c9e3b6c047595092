"""Helpers for tests that compare DICOM files and send hand-made data sets."""

from __future__ import annotations

import hashlib
import re
import subprocess
import tempfile
import time
from io import BytesIO
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from conftest import RADIOGRAPHS
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, StoragePresentationContexts, _config, evt

from nnrouter.testing import peers
from nnrouter.testing.synthetic import DXSpec, dx_dataset

# Association-level back-pressure (limits.refuse_below_free_mb) off, so that a
# node's C-STORE answers are what a test sees.
NO_ASSOCIATION_FLOOR = {"limits": {"refuse_below_free_mb": 0}}


def dataset_bytes(path: Path) -> bytes:
    """The encoded data set of a Part 10 file, without preamble and file meta."""
    with open(path, "rb") as fp:
        preamble = read_preamble(fp, force=True)
        if preamble is None:
            fp.seek(0)
            return fp.read()
        _read_file_meta_info(fp)
        return fp.read()


def dataset_sha256(path: Path) -> str:
    """The digest nnrouter keeps for an instance: SHA-256 of the data set as received."""
    return hashlib.sha256(dataset_bytes(path)).hexdigest()


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


def write_part10(path: Path, sop_class: str, sop_uid: str, transfer_syntax: str, raw: bytes) -> Path:
    """A Part 10 file around pre-encoded data set bytes, which stay exactly as given."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    buf = BytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, meta)
    path.write_bytes(buf.getvalue() + raw)
    return path


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
        paths = [
            write_part10(Path(tmp) / f"{i}.dcm", sop_class, sop_uid, transfer_syntax, raw)
            for i, (sop_class, sop_uid, raw) in enumerate(items)
        ]
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


def storescu_statuses(port: int, files: list[Path], timeout: float = 300) -> list[tuple[Path, int | None, str]]:
    """storescu, one association, not stopping at a failure: (file, status or None, Error Comment) per file."""
    res = peers.storescu(port, files, extra=["-d", "--no-halt"], timeout=timeout)
    out: list[list] = []
    for line in res.stderr.splitlines():
        if "Sending file: " in line:
            out.append([Path(line.split("Sending file: ", 1)[1].strip()), None, ""])
        elif out and (m := re.search(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})", line)):
            out[-1][1] = int(m.group(1), 16)
        elif out and (m := re.search(r"\(0000,0902\) LO \[(.*)\]\s+#", line)):
            out[-1][2] = m.group(1)
    seen = {r[0] for r in out}
    out += [[f, None, "not sent"] for f in files if f not in seen]
    return [(f, s, c) for f, s, c in out]


def storescu_stream(node, files: list[Path], at_ack: int, action, timeout: float = 60) -> list[Path]:  # type: ignore[no-untyped-def]
    """Send ``files`` with storescu; call ``action()`` when the ``at_ack``-th success comes; the acknowledged files.

    The crash tests kill nnrouter from ``action`` while the stream goes on.
    """
    proc = subprocess.Popen(
        ["storescu", "-v", "-aec", node.ae_title, "127.0.0.1", str(node.port), *map(str, files)],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        bufsize=1,
    )
    acked: list[Path] = []
    current: Path | None = None
    deadline = time.monotonic() + timeout
    assert proc.stderr is not None
    for line in proc.stderr:
        if "Sending file:" in line:
            current = Path(line.split("Sending file:", 1)[1].strip())
        elif "Received Store Response (Success)" in line and current is not None:
            acked.append(current)
            if len(acked) == at_ack:
                action()
        if time.monotonic() > deadline:
            proc.kill()
            break
    proc.wait(30)
    return acked


def echo(port: int, aec: str = "NNROUTER") -> bool:
    """Whether DCMTK echoscu gets a C-ECHO answered."""
    res = subprocess.run(["echoscu", "-aec", aec, "127.0.0.1", str(port)], check=False, capture_output=True, timeout=30)
    return res.returncode == 0


class StatusSCP:
    """A pynetdicom Storage SCP answering every C-STORE with ``status``; it notes when each request came."""

    def __init__(self, status: int = 0x0000, contexts=None, pause_s: float = 0.0):  # type: ignore[no-untyped-def]
        self.status = status
        self.pause_s = pause_s
        self.stores: list[tuple[float, str]] = []
        self.associations = 0
        self.port = peers.free_port()
        ae = AE(ae_title="PEER")
        ae.supported_contexts = contexts if contexts is not None else StoragePresentationContexts
        self.server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._store), (evt.EVT_CONN_OPEN, self._open)],
        )

    def _open(self, event) -> None:  # type: ignore[no-untyped-def]
        self.associations += 1

    def _store(self, event):  # type: ignore[no-untyped-def]
        self.stores.append((time.monotonic(), str(event.request.AffectedSOPInstanceUID)))
        if self.pause_s:
            time.sleep(self.pause_s)
        return self.status

    def stop(self) -> None:
        self.server.shutdown()


# --- real radiographs as a modality would send them ------------------------------


def png_study(
    png: Path,
    out: Path,
    *,
    modality: str,
    body_part: str = "",
    description: str = "",
    study_uid: str | None = None,
    series_uid: str | None = None,
    **attrs,
) -> Path:  # type: ignore[no-untyped-def]
    """A real radiograph from the shared PNGs wrapped as a DX instance, as a modality would send it.

    ``attrs`` are set on the data set by keyword (AccessionNumber, RequestAttributesSequence, ...).
    """
    img = cv2.imread(str(png), cv2.IMREAD_GRAYSCALE)
    h, w = img.shape
    spec = DXSpec(
        rows=h,
        columns=w,
        bits_stored=12,
        study_uid=study_uid or generate_uid(),
        study_description=description,
        series_uid=series_uid or generate_uid(),
    )
    ds = dx_dataset(spec)
    ds.PixelData = (img.astype(np.uint16) * 16).tobytes()
    ds.Modality = modality
    ds.BodyPartExamined = body_part
    ds.ViewPosition = ""
    del ds.ViewCodeSequence
    del ds.AnatomicRegionSequence
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    ds.save_as(out, enforce_file_format=True)
    return out


def first_png(label: str, n: int = 0) -> Path:
    return sorted((RADIOGRAPHS / label).glob("*.png"))[n]


def wait_for(check, timeout: float = 120, every: float = 0.5):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last is True:
            return
        time.sleep(every)
    pytest.fail(f"timed out; last state: {last}")


# --- worklist entries as DCMTK wlmscpfs reads them ---------------------------------


def code_item(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def worklist_entry(
    path: Path,
    *,
    accession: str,
    study_uid: str,
    code: Dataset,
    description: str,
    modality: str,
    sps_description: str,
    patient_name: str,
    patient_id: str,
    station: list[str],
) -> None:
    """One worklist entry as wlmscpfs reads it: a DICOM file with every type 1 return key."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.AccessionNumber = accession
    ds.ReferringPhysicianName = ""
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.RequestedProcedureID = "RP-" + accession
    if description:
        ds.RequestedProcedureDescription = description
    ds.RequestedProcedureCodeSequence = [code]
    ds.RequestedProcedurePriority = "ROUTINE"
    ds.PlacerOrderNumberImagingServiceRequest = "PL-" + accession
    ds.FillerOrderNumberImagingServiceRequest = "FL-" + accession
    sps = Dataset()
    sps.Modality = modality
    sps.ScheduledStationAETitle = station
    sps.ScheduledProcedureStepStartDate = "20240502"
    sps.ScheduledProcedureStepStartTime = "091500"
    sps.ScheduledPerformingPhysicianName = ""
    sps.ScheduledProcedureStepDescription = sps_description
    sps.ScheduledProcedureStepID = "SPS-" + accession
    sps.ScheduledProtocolCodeSequence = [code_item("P1", "99LOCAL", sps_description)]
    ds.ScheduledProcedureStepSequence = [sps]
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.31"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(path, enforce_file_format=True)


def node_rows(node, model) -> list:  # type: ignore[no-untyped-def]
    """Every row of one table in a node's store, oldest first."""
    from sqlalchemy import select

    from nnrouter.core.store import Store

    store = Store(node.db_url)
    try:
        with store.read() as s:
            return list(s.execute(select(model).order_by(model.id)).scalars())
    finally:
        store.dispose()


def prediction(instance_id: int, label: str, version: str = "1", score: float = 0.9, model: str = "test") -> Any:
    """A classifier's row as a worker writes it, for tests that set what was found instead of running a model."""
    from nnrouter.core.store import Prediction

    return Prediction(
        instance_id=instance_id,
        model_name=model,
        model_version=version,
        provider="CPU",
        label=label,
        score=score,
        top5=[[label, score]],
        decode_ms=1.0,
        preprocess_ms=1.0,
        infer_ms=1.0,
    )


def predict_all(store: Any, labels: dict[str, str], default: str, score: float = 0.9) -> None:
    """A prediction for every stored instance: ``labels[SOP Instance UID]``, else ``default``."""
    from sqlalchemy import select

    from nnrouter.core.store import Instance

    with store.write() as s:
        for inst in s.execute(select(Instance)).scalars():
            s.add(prediction(inst.id, labels.get(inst.sop_instance_uid, default), score=score))
