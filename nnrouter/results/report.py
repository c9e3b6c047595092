"""What nnrouter found in a study, as one DICOM Comprehensive SR next to the images.

A PACS keeps DICOM objects, not nnrouter's database, so the findings travel as
a structured report that joins the study it describes (same Study Instance
UID, its own series, Modality SR). The content follows TID 1500 "Measurement
Report", built with highdicom's template classes so every item is checked as
it is made:

- one TID 1501 group per classified image: the view as a coded qualitative
  evaluation ("Image View"), the class's anatomy as finding site, the
  nnrouter class as finding type and the calibrated score as a "Probability";
- one TID 1410 group per detected region: the box as a closed SCOORD POLYLINE
  (five points) on the source image, the region label as finding type and its
  score as a "Probability". SR SCOORD has no RECT graphic type (that one
  belongs to presentation states), hence the polyline;
- the study's mismatch flags as TEXT items in the report's "Qualitative
  Evaluations" container (TID 1500 rows 12 to 14), each with its severity and,
  when it concerns one image, a reference to that image.

Every group, and the flags' container, carries the algorithm's name and
version (TID 4019); the report's observer is the nnrouter device (TID 1004).

Codes come from ``classes.csv`` (see :mod:`nnrouter.core.codes`). Where the table
has no standard code (the panoramic view has no CID 4010 term) and for
vocabularies that are nnrouter's own (class names as finding types, detector
region labels, flag kinds and severities), the codes use the private coding
scheme ``99NNROUTER`` with the name itself as code value. The scheme is
declared in the SR's Coding Scheme Identification Sequence. Names longer than
16 characters go in Long Code Value (Code Sequence Macro, PS3.3 Table 8.8-1).
"""

from __future__ import annotations

import copy
import datetime as dt
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.uid import generate_uid

from nnrouter import __version__
from nnrouter.core.codes import classes, sct_meaning

__all__ = [
    "PRIVATE_SCHEME",
    "UNKNOWN",
    "ImageFinding",
    "MismatchFlag",
    "Region",
    "StudyFindings",
    "build_sr",
    "write_sr",
]

PRIVATE_SCHEME = "99NNROUTER"
UNKNOWN = "unknown"  # the classifier's label below its calibrated threshold

# The SR's own series: a high number sorts it after the images in viewers.
SERIES_NUMBER = 9901

_IMAGE_VIEW = hd.sr.CodedConcept("111031", "DCM", "Image View")
_PROBABILITY = hd.sr.CodedConcept("122157", "DCM", "Probability")
_NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")
_UNKNOWN_VIEW = hd.sr.CodedConcept("261665006", "SCT", "Unknown")
_SEVERITY = hd.sr.CodedConcept("246112005", "SCT", "Severity")
_SOURCE = hd.sr.CodedConcept("260753009", "SCT", "Source")
_QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
_RADIOGRAPHY = hd.sr.CodedConcept("363680008", "SCT", "Radiographic imaging procedure")
_ENGLISH = hd.sr.CodedConcept("en-US", "RFC5646", "English (United States)")

# Patient and study attributes of Type 2 in their modules: a header that lacks
# one gets it empty, so the SR is valid even when the modality left it out.
_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyID",
)
_REQUIRED = ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID")


def _finite(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _score(value: float) -> float:
    value = _finite("score", value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"score is a calibrated probability in [0, 1], got {value}")
    return value


@dataclass(frozen=True)
class Region:
    """One detected region: a label, its score and its box on the original image.

    ``box_px`` is (x0, y0, x1, y1) in pixels of the image as stored (column,
    row), with (0, 0) the top left corner of the top left pixel: the
    convention of SR spatial coordinates and of ``detect.Letterbox.unmap``.
    """

    label: str
    score: float
    box_px: tuple[float, float, float, float]

    def __post_init__(self) -> None:
        if not self.label:
            raise ValueError("a region needs a label")
        object.__setattr__(self, "score", _score(self.score))
        if len(self.box_px) != 4:
            raise ValueError(f"box_px is (x0, y0, x1, y1), got {self.box_px!r}")
        box = tuple(_finite("box_px", v) for v in self.box_px)
        x0, y0, x1, y1 = box
        if not (0 <= x0 < x1 and 0 <= y0 < y1):
            raise ValueError(f"box_px needs 0 <= x0 < x1 and 0 <= y0 < y1, got {box}")
        object.__setattr__(self, "box_px", box)


@dataclass(frozen=True)
class ImageFinding:
    """What the classifier (and detector) said about one evaluated image.

    ``label`` is a class of ``classes.csv`` or ``"unknown"``; its codes come
    from the table, so they cannot disagree with what routing used.
    """

    sop_instance_uid: str
    label: str
    score: float
    regions: tuple[Region, ...] = ()

    def __post_init__(self) -> None:
        if self.label != UNKNOWN and self.label not in classes():
            raise ValueError(f"label {self.label!r} is neither a class of classes.csv nor {UNKNOWN!r}")
        object.__setattr__(self, "score", _score(self.score))
        object.__setattr__(self, "regions", tuple(self.regions))


@dataclass(frozen=True)
class MismatchFlag:
    """A disagreement nnrouter found (order against image, header against pixels...).

    ``sop_instance_uid`` names the image it concerns; None for the study as a whole.
    """

    kind: str
    severity: str
    reason: str
    sop_instance_uid: str | None = None

    def __post_init__(self) -> None:
        if not (self.kind and self.severity and self.reason):
            raise ValueError("a mismatch flag needs a kind, a severity and a reason")


@dataclass(frozen=True)
class StudyFindings:
    """Everything one SR reports on one study.

    ``instances`` are the headers of every instance nnrouter evaluated,
    including those it could not decode (they have no finding but are part of
    the evidence). Pixel data is not needed: ``dcmread(path,
    stop_before_pixels=True)`` is enough. Each needs Study/Series/SOP Instance
    UID and SOP Class UID; the first one's patient and study attributes are
    copied into the SR. Images with regions need Rows and Columns.
    """

    instances: tuple[Dataset, ...]
    images: tuple[ImageFinding, ...] = ()
    flags: tuple[MismatchFlag, ...] = ()
    algorithm_name: str = "nnrouter"
    algorithm_version: str = __version__
    manufacturer: str = "nnrouter"
    # The Device Observer UID of TID 1004; None derives a stable one from
    # manufacturer and algorithm name, so one installation keeps one UID.
    device_uid: str | None = None

    def __post_init__(self) -> None:
        for name in ("instances", "images", "flags"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if not self.instances:
            raise ValueError("an SR needs at least one evaluated instance: it takes patient and study from it")
        for ds in self.instances:
            missing = [k for k in _REQUIRED if not ds.get(k)]
            if missing:
                raise ValueError(f"instance header lacks {', '.join(missing)}")
        studies = {str(ds.StudyInstanceUID) for ds in self.instances}
        if len(studies) != 1:
            raise ValueError(f"one SR reports on one study; instances belong to {len(studies)}")
        known = {str(ds.SOPInstanceUID) for ds in self.instances}
        seen: set[str] = set()
        for f in self.images:
            if f.sop_instance_uid not in known:
                raise ValueError(f"finding for {f.sop_instance_uid}, which is not among the evaluated instances")
            if f.sop_instance_uid in seen:
                raise ValueError(f"two findings for {f.sop_instance_uid}")
            seen.add(f.sop_instance_uid)
        for flag in self.flags:
            if flag.sop_instance_uid is not None and flag.sop_instance_uid not in known:
                raise ValueError(
                    f"flag {flag.kind!r} names {flag.sop_instance_uid}, which is not among the evaluated instances"
                )
        if not (self.algorithm_name and self.algorithm_version and self.manufacturer):
            raise ValueError("algorithm name, version and manufacturer must not be empty")


def build_sr(
    findings: StudyFindings,
    evidence: Sequence[Dataset] | None = None,
    *,
    series_uid: str | None = None,
    instance_uid: str | None = None,
    now: dt.datetime | None = None,
) -> hd.sr.ComprehensiveSR:
    """One Comprehensive SR with everything nnrouter found in the study.

    ``evidence`` adds instances to cite beyond the evaluated ones (instances
    of another study land in the Pertinent Other Evidence Sequence). The
    UIDs default to new ones; passing them makes the output reproducible,
    as do ``now`` and an explicit ``device_uid``: the tracking UIDs inside
    are derived from the SR's instance UID.
    """
    now = now or dt.datetime.now()
    instance_uid = instance_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    headers = [_header(ds) for ds in findings.instances]
    by_uid = {str(h.SOPInstanceUID): h for h in headers}
    algorithm = hd.sr.AlgorithmIdentification(name=findings.algorithm_name, version=findings.algorithm_version)

    groups: list = []
    for n, finding in enumerate(findings.images, 1):
        image = by_uid[finding.sop_instance_uid]
        groups.append(_image_group(finding, image, algorithm, instance_uid, n))
        for m, region in enumerate(finding.regions, 1):
            groups.append(_region_group(region, image, algorithm, instance_uid, n, m))

    device_uid = findings.device_uid or generate_uid(entropy_srcs=[findings.manufacturer, findings.algorithm_name])
    observation = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=dcm_codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=device_uid,
                name=findings.algorithm_name,
                manufacturer_name=findings.manufacturer,
                model_name=findings.algorithm_name,
            ),
        )
    )
    library = [by_uid[f.sop_instance_uid] for f in findings.images if _describable(by_uid[f.sop_instance_uid])]
    root = _root(observation, groups, library)
    if findings.flags:
        root.ContentSequence.append(_flags_container(findings.flags, by_uid, algorithm))

    cited = list(headers)
    for ds in evidence or ():
        if str(ds.SOPInstanceUID) not in by_uid:
            cited.append(ds)
            by_uid[str(ds.SOPInstanceUID)] = ds
    sr = hd.sr.ComprehensiveSR(
        evidence=cited,
        content=root,
        series_instance_uid=series_uid,
        series_number=SERIES_NUMBER,
        sop_instance_uid=instance_uid,
        instance_number=1,
        manufacturer=findings.manufacturer,
        # Everything nnrouter evaluated is in it; no person has attested it,
        # and an automated result is not the definitive report of the study.
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description="nnrouter findings",
        manufacturer_model_name=findings.algorithm_name,
        software_versions=findings.algorithm_version,
        content_date=now.date(),
        content_time=now.time().replace(microsecond=0),
        series_date=now.date(),
        series_time=now.time().replace(microsecond=0),
        coding_schemes=[
            CodingSchemeIdentificationItem(
                designator=PRIVATE_SCHEME,
                name="nnrouter view classes, region labels and mismatch flags",
                responsible_organization=findings.manufacturer,
            )
        ],
    )
    # highdicom stamps these with the clock; ``now`` stands for the moment of
    # creation everywhere, so the same inputs give the same bytes.
    sr.InstanceCreationDate = sr.ContentDate
    sr.InstanceCreationTime = sr.ContentTime
    for item in sr.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = now.strftime("%Y%m%d%H%M%S")
    return sr


def write_sr(ds: Dataset, path: Path | str) -> Path:
    """Write the SR as a DICOM file (Part 10, with its file meta information)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


# --- content ------------------------------------------------------------------


def _private(name: str) -> hd.sr.CodedConcept:
    if "\\" in name:  # the value separator of every DICOM string VR
        raise ValueError(f"a code value cannot hold a backslash: {name!r}")
    return hd.sr.CodedConcept(value=name, scheme_designator=PRIVATE_SCHEME, meaning=name[:64])


def _tracking(sr_uid: str, key: str, text: str) -> hd.sr.TrackingIdentifier:
    # Derived, not random: the same SR UID and findings give the same document.
    return hd.sr.TrackingIdentifier(uid=generate_uid(entropy_srcs=[sr_uid, key]), identifier=text)


def _probability(score: float) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=_PROBABILITY, value=score, unit=_NO_UNITS)


def _image_group(
    finding: ImageFinding, image: Dataset, algorithm: hd.sr.AlgorithmIdentification, sr_uid: str, n: int
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    view_class = classes().get(finding.label)
    if view_class is None:  # "unknown"
        view, sites = _UNKNOWN_VIEW, None
    else:
        code = view_class.view_code
        view = hd.sr.CodedConcept(code.value, code.scheme, code.meaning) if code else _private(finding.label)
        anatomy = view_class.anatomy_code
        sites = [
            hd.sr.FindingSite(
                anatomic_location=hd.sr.CodedConcept(
                    anatomy.value, anatomy.scheme, _sct_meaning(anatomy.value, view_class.body_part_examined)
                )
            )
        ]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(sr_uid, f"view:{finding.sop_instance_uid}", f"view of image {n}"),
        finding_type=_private(finding.label),
        algorithm_id=algorithm,
        finding_sites=sites,
        measurements=[_probability(finding.score)],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=_IMAGE_VIEW, value=view)],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(image)],
    )


def _region_group(
    region: Region, image: Dataset, algorithm: hd.sr.AlgorithmIdentification, sr_uid: str, n: int, m: int
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    x0, y0, x1, y1 = region.box_px
    rows, columns = image.get("Rows"), image.get("Columns")
    if rows is None or columns is None:
        raise ValueError(f"image {image.SOPInstanceUID} has regions but its header lacks Rows/Columns")
    if x1 > columns or y1 > rows:
        raise ValueError(f"box {region.box_px} lies outside image {image.SOPInstanceUID} ({columns} x {rows})")
    outline = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float64)
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(sr_uid, f"region:{image.SOPInstanceUID}:{m}", f"region {m} of image {n}"),
        referenced_region=hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=outline,
            source_image=hd.sr.SourceImageForRegion.from_source_image(image),
        ),
        finding_type=_private(region.label),
        algorithm_id=algorithm,
        measurements=[_probability(region.score)],
    )


def _flags_container(
    flags: Sequence[MismatchFlag], by_uid: dict[str, Dataset], algorithm: hd.sr.AlgorithmIdentification
) -> hd.sr.ContainerContentItem:
    """TID 1500 row 12: "Qualitative Evaluations", with TID 4019 (row 12b) and TEXT items (row 14)."""
    container = hd.sr.ContainerContentItem(
        name=_QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    # The template is itself a ContentSequence: its items are copied, as list() did.
    items = hd.sr.ContentSequence(algorithm)
    for flag in flags:
        item = hd.sr.TextContentItem(
            name=_private(flag.kind),
            value=flag.reason,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
        children: list[hd.sr.ContentItem] = [
            hd.sr.CodeContentItem(
                name=_SEVERITY,
                value=_private(flag.severity),
                relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD,
            )
        ]
        if flag.sop_instance_uid is not None:
            image = by_uid[flag.sop_instance_uid]
            children.append(
                hd.sr.ImageContentItem(
                    name=_SOURCE,
                    referenced_sop_class_uid=image.SOPClassUID,
                    referenced_sop_instance_uid=image.SOPInstanceUID,
                    relationship_type=hd.sr.RelationshipTypeValues.INFERRED_FROM,
                )
            )
        item.ContentSequence = hd.sr.ContentSequence(children)
        items.append(item)
    container.ContentSequence = items
    return container


def _root(observation: hd.sr.ObservationContext, groups: list, library: list[Dataset]) -> hd.sr.ContainerContentItem:
    """The TID 1500 root container.

    highdicom's MeasurementReport insists on at least one measurement group,
    but TID 1500 needs "Imaging Measurements" only when there are no
    "Qualitative Evaluations": a study with flags and no decodable image gets
    the same root, assembled from the same template classes.
    """
    if groups:
        report = hd.sr.MeasurementReport(
            observation_context=observation,
            procedure_reported=_RADIOGRAPHY,
            imaging_measurements=groups,
            referenced_images=library or None,
        )
        container = report[0]
        assert isinstance(container, hd.sr.ContainerContentItem)  # the template holds its root container alone
        return container
    root = hd.sr.ContainerContentItem(name=dcm_codes.cid7021.ImagingMeasurementReport, template_id="1500")
    content = hd.sr.ContentSequence()
    content.extend(hd.sr.LanguageOfContentItemAndDescendants(_ENGLISH))
    content.extend(observation)
    content.append(
        hd.sr.CodeContentItem(
            name=dcm_codes.DCM.ProcedureReported,
            value=_RADIOGRAPHY,
            relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD,
        )
    )
    root.ContentSequence = content
    return root


# --- headers --------------------------------------------------------------------


def _header(ds: Dataset) -> Dataset:
    """The instance's attributes without pixels, Type 2 patient/study ones present."""
    out = Dataset()
    for elem in ds:
        if elem.tag.group < 0x7FE0:
            out.add(copy.deepcopy(elem))
    for keyword in _TYPE2:
        if keyword not in out:
            setattr(out, keyword, "")
    # Modalities write "MALE", "m" or "1980"; the SR takes only the standard's values, else empty (Type 2).
    sex = str(out.get("PatientSex", "") or "").strip().upper()[:1]
    out.PatientSex = sex if sex in ("M", "F", "O") else ""
    if (
        not re.fullmatch(r"\d{8}", str(out.get("PatientBirthDate", "") or ""))
        or str(out.PatientBirthDate) == "00000000"
    ):
        out.PatientBirthDate = ""
    return out


def _describable(ds: Dataset) -> bool:
    """Whether highdicom can write the TID 1602 descriptors of this image.

    The Image Library is optional (TID 1500 row 5); an image whose header
    lacks what its descriptors need (a CR without Imager Pixel Spacing, a
    non-image object) is left out of it rather than failing the report.
    """
    try:
        hd.sr.ImageLibraryEntryDescriptors(ds)
    except (AttributeError, KeyError, IndexError, TypeError, ValueError):
        return False
    return True


def _sct_meaning(code: str, fallback: str) -> str:
    return sct_meaning(code) or fallback.title()
