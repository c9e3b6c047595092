"""Synthetic DX images for benchmarks and tests, built to pass dciodvfy.

Benchmarks need many large, valid, distinct files, and tests need files with
known header values; real radiographs are few and must not be copied into the
repository. The pixels are a smooth ramp with noise: nothing to diagnose,
but the right size, depth and attributes of a real digital radiograph.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid

from nnrouter.core.codes import Code

DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"

# Body Part Examined -> SNOMED CT anatomy for the Anatomic Region Sequence.
_ANATOMY = {
    "CHEST": ("51185008", "Thorax"),
    "KNEE": ("72696002", "Knee"),
    "HAND": ("85562004", "Hand"),
    "PELVIS": ("816092008", "Pelvis"),
    "ABDOMEN": ("818981001", "Abdomen"),
}

# View Position -> SNOMED CT view code (CID 4010), as in classes.csv.
_VIEW = {
    "PA": ("272479007", "SCT", "postero-anterior"),
    "AP": ("399348003", "SCT", "antero-posterior"),
    "LL": ("399173006", "SCT", "left lateral"),
}


@dataclass(frozen=True)
class DXSpec:
    """What a synthetic DX instance should say about itself."""

    rows: int = 512
    columns: int = 512
    bits_stored: int = 14
    body_part: str = "CHEST"
    view_position: str = "PA"
    laterality: str = "U"
    patient_name: str = "SYNTHETIC^PATIENT"
    patient_id: str = "SYN0001"
    patient_birth_date: str = "19700101"
    accession_number: str = "ACC0001"
    study_description: str = "XR CHEST PA"
    study_uid: str = field(default_factory=generate_uid)
    series_uid: str = field(default_factory=generate_uid)
    sop_instance_uid: str = field(default_factory=generate_uid)
    instance_number: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.body_part not in _ANATOMY:
            raise ValueError(f"body_part must be one of {sorted(_ANATOMY)}")
        if not 8 < self.bits_stored <= 16:
            raise ValueError("bits_stored must be 9..16 for a 16-bit DX")
        if self.laterality not in ("R", "L", "U", "B"):
            raise ValueError("laterality is R, L, U or B")


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    return Code(value, scheme, meaning).item()


def pixels(spec: DXSpec) -> np.ndarray:
    rng = np.random.default_rng(spec.seed)
    top = (1 << spec.bits_stored) - 1
    y = np.linspace(0.1, 0.9, spec.rows, dtype=np.float32)[:, None]
    x = np.linspace(0.2, 0.8, spec.columns, dtype=np.float32)[None, :]
    img = (y * x * top) + rng.normal(0, top * 0.01, (spec.rows, spec.columns)).astype(np.float32)
    return np.clip(img, 0, top).astype(np.uint16)


def dx_dataset(spec: DXSpec) -> Dataset:
    """A DX For Presentation instance (PS3.3 A.26) with every Type 1 and 2 attribute."""
    now = dt.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(DX_FOR_PRESENTATION)
    meta.MediaStorageSOPInstanceUID = UID(spec.sop_instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = DX_FOR_PRESENTATION
    ds.SOPInstanceUID = spec.sop_instance_uid
    # Patient / General Study
    ds.PatientName = spec.patient_name
    ds.PatientID = spec.patient_id
    ds.PatientBirthDate = spec.patient_birth_date
    ds.PatientSex = "O"
    ds.StudyInstanceUID = spec.study_uid
    ds.StudyDate, ds.StudyTime = date, time
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = spec.accession_number
    ds.StudyDescription = spec.study_description
    # DX Series / General Equipment
    ds.Modality = "DX"
    ds.SeriesInstanceUID = spec.series_uid
    ds.SeriesNumber = 1
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Manufacturer = "nnrouter synthetic"
    # General Image / DX Anatomy Imaged / DX Positioning
    ds.InstanceNumber = spec.instance_number
    ds.PatientOrientation = ["L", "F"] if spec.view_position == "PA" else ["R", "F"]
    ds.ContentDate, ds.ContentTime = date, time
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.BurnedInAnnotation = "NO"
    ds.ImageLaterality = spec.laterality
    ds.BodyPartExamined = spec.body_part
    ds.AnatomicRegionSequence = Sequence([_code(*_ANATOMY[spec.body_part][:1], "SCT", _ANATOMY[spec.body_part][1])])
    ds.ViewPosition = spec.view_position
    if spec.view_position in _VIEW:
        ds.ViewCodeSequence = Sequence([_code(*_VIEW[spec.view_position])])
    ds.PositionerType = ""
    # Image Pixel / DX Image
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = spec.rows, spec.columns
    ds.BitsAllocated = 16
    ds.BitsStored = spec.bits_stored
    ds.HighBit = spec.bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.PresentationLUTShape = "IDENTITY"
    ds.LossyImageCompression = "00"
    ds.WindowCenter = (1 << spec.bits_stored) // 2
    ds.WindowWidth = 1 << spec.bits_stored
    # DX Detector
    ds.DetectorType = "SCINTILLATOR"
    ds.ImagerPixelSpacing = [0.15, 0.15]
    # Acquisition Context
    ds.AcquisitionContextSequence = Sequence()
    ds.PixelData = pixels(spec).tobytes()
    return ds


def write_dx(path: Path, spec: DXSpec) -> Path:
    ds = dx_dataset(spec)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_series(
    folder: Path, count: int, *, rows: int = 512, columns: int = 512, study_uid: str | None = None
) -> list[Path]:
    """``count`` distinct DX files of one study, one series: what a modality sends."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    return [
        write_dx(
            folder / f"dx{i:05d}.dcm",
            DXSpec(
                rows=rows, columns=columns, study_uid=study_uid, series_uid=series_uid, instance_number=i + 1, seed=i
            ),
        )
        for i in range(count)
    ]


def fill_store(store: Any, studies: int, images: int = 2, seed: int = 0) -> None:
    """``studies`` made-up studies in the store, as the stages would have left them: series, instances,
    predictions, a flag on every tenth, a routing decision and deliveries; for the console's benchmarks.

    Rows only (no files): made-up names and IDs, never real ones.
    """
    import datetime as dt
    import random

    from sqlalchemy import insert

    from nnrouter.core.store import Flag, Instance, Outbox, Prediction, RoutingDecision, Series, Study

    rng = random.Random(seed)
    labels = ["chest_pa_ap", "chest_lateral", "knee_ap", "hand_ap", "panoramic_radiograph", "unknown"]
    now = dt.datetime.now(dt.UTC)
    base = "1.2.826.0.1.3680043.10.1"
    study_rows, series_rows, inst_rows, pred_rows, flag_rows, dec_rows, out_rows = [], [], [], [], [], [], []
    inst_id = 0
    for i in range(1, studies + 1):
        when = now - dt.timedelta(minutes=studies - i)
        study_rows.append(
            {
                "id": i,
                "study_uid": f"{base}.{i}",
                "accession_number": f"B{i:07d}",
                "patient_id": f"P{i % 997:05d}",
                "patient_name": f"Bench^Patient{i % 997}",
                "study_date": when.strftime("%Y%m%d"),
                "study_description": "XR CHEST",
                "created_at": when,
                "last_received_at": when,
            }
        )
        series_rows.append(
            {
                "id": i,
                "study_id": i,
                "series_uid": f"{base}.{i}.1",
                "modality": rng.choice(["DX", "CR"]),
                "created_at": when,
            }
        )
        for k in range(images):
            inst_id += 1
            inst_rows.append(
                {
                    "id": inst_id,
                    "series_id": i,
                    "sop_instance_uid": f"{base}.{i}.1.{k + 1}",
                    "version": 1,
                    "sop_class_uid": "1.2.840.10008.5.1.4.1.1.1.1",
                    "transfer_syntax_uid": "1.2.840.10008.1.2.1",
                    "path": f"/nonexistent/{inst_id}.dcm",
                    "size_bytes": 10_000_000,
                    "sha256": f"{inst_id:064x}",
                    "state": "classified",
                    "calling_ae": rng.choice(["CR_ROOM1", "DX_ED", "DX_WARD"]),
                    "called_ae": "NNROUTER",
                    "received_at": when,
                    "updated_at": when,
                    "attempts": 0,
                }
            )
            pred_rows.append(
                {
                    "instance_id": inst_id,
                    "model_name": "nnrouter-view",
                    "model_version": "1",
                    "provider": "CPUExecutionProvider",
                    "label": rng.choice(labels),
                    "score": rng.random(),
                    "top5": [],
                    "decode_ms": 100.0,
                    "preprocess_ms": 5.0,
                    "infer_ms": 40.0,
                    "created_at": when,
                }
            )
            out_rows.append(
                {
                    "instance_id": inst_id,
                    "destination": "PACS",
                    "rule": "everything",
                    "state": "sent",
                    "attempts": 1,
                    "next_attempt_at": when,
                    "created_at": when,
                    "sent_at": when,
                }
            )
        if i % 10 == 0:
            flag_rows.append(
                {
                    "study_id": i,
                    "kind": "missing_view",
                    "severity": "warning",
                    "reason": "ordered 1 x chest_lateral, found 0",
                    "evidence": {},
                    "created_at": when,
                }
            )
        dec_rows.append(
            {
                "study_id": i,
                "decided_at": when,
                "rules_digest": "0" * 64,
                "outcomes": [],
                "deliveries": [{"destination": "PACS", "rule": "everything"}],
                "hold": False,
                "discard": False,
            }
        )
    with store.write() as s:
        for model, rows in (
            (Study, study_rows),
            (Series, series_rows),
            (Instance, inst_rows),
            (Prediction, pred_rows),
            (Flag, flag_rows),
            (RoutingDecision, dec_rows),
            (Outbox, out_rows),
        ):
            for start in range(0, len(rows), 5000):
                s.execute(insert(model), rows[start : start + 5000])
