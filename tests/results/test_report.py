"""The per-study Comprehensive SR: valid by dciodvfy, joined to the study, readable back.

Three studies cover the shapes a report takes: two chest views with boxes,
an unknown image and a panoramic one beside an undecodable image with
mismatch flags, and a study with flags only.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import pytest
from conftest import needs
from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid

from nnrouter.results.report import (
    PRIVATE_SCHEME,
    ImageFinding,
    MismatchFlag,
    Region,
    StudyFindings,
    build_sr,
    write_sr,
)
from nnrouter.testing import peers
from nnrouter.testing.synthetic import DXSpec, write_dx

NOW = dt.datetime(2024, 5, 6, 7, 8, 9)
ALGO, VERSION = "nnrouter-test", "9.8.7"


def _headers(folder: Path, specs: list[DXSpec]) -> list[Dataset]:
    folder.mkdir(parents=True, exist_ok=True)
    return [dcmread(write_dx(folder / f"dx{i}.dcm", s), stop_before_pixels=True) for i, s in enumerate(specs)]


def _chest(folder: Path) -> StudyFindings:
    study = generate_uid()
    pa, ll = _headers(
        folder,
        [
            DXSpec(study_uid=study, view_position="PA"),
            DXSpec(study_uid=study, view_position="LL", instance_number=2, seed=1, rows=600, columns=500),
        ],
    )
    return StudyFindings(
        instances=[pa, ll],
        images=[
            ImageFinding(
                pa.SOPInstanceUID,
                "chest_pa_ap",
                0.97,
                [
                    Region("chest", 0.93, (10.5, 20.25, 400.0, 500.0)),
                    Region("marker", 0.61, (0.0, 0.0, 32.0, 16.5)),
                ],
            ),
            ImageFinding(ll.SOPInstanceUID, "chest_lateral", 0.91, [Region("chest", 0.88, (50.0, 60.0, 500.0, 600.0))]),
        ],
        algorithm_name=ALGO,
        algorithm_version=VERSION,
    )


def _unknown_and_flags(folder: Path) -> StudyFindings:
    study = generate_uid()
    knee, jaw, broken = _headers(
        folder,
        [
            DXSpec(study_uid=study, body_part="KNEE", view_position="AP"),
            DXSpec(study_uid=study, body_part="KNEE", view_position="AP", instance_number=2, seed=1),
            DXSpec(study_uid=study, body_part="KNEE", view_position="AP", instance_number=3, seed=2),
        ],
    )
    return StudyFindings(
        instances=[knee, jaw, broken],  # the third could not be decoded: no finding
        images=[
            ImageFinding(knee.SOPInstanceUID, "unknown", 0.31),
            ImageFinding(jaw.SOPInstanceUID, "panoramic_radiograph", 0.88),
        ],
        flags=[
            MismatchFlag("laterality", "warning", "order says left knee; image says right", knee.SOPInstanceUID),
            MismatchFlag(
                "procedure", "error", "ordered XR KNEE 2 VIEWS; found a panoramic radiograph", jaw.SOPInstanceUID
            ),
            MismatchFlag("undecodable", "info", "1 of 3 images could not be decoded"),
        ],
        algorithm_name=ALGO,
        algorithm_version=VERSION,
    )


def _flags_only(folder: Path) -> StudyFindings:
    study = generate_uid()
    a, b = _headers(
        folder,
        [
            DXSpec(study_uid=study, body_part="HAND", view_position="PA"),
            DXSpec(study_uid=study, body_part="HAND", view_position="PA", instance_number=2, seed=1),
        ],
    )
    return StudyFindings(
        instances=[a, b],
        flags=[MismatchFlag("undecodable", "error", "no image of the study could be decoded")],
        algorithm_name=ALGO,
        algorithm_version=VERSION,
    )


CASES = {"chest_two_views": _chest, "unknown_and_flags": _unknown_and_flags, "flags_only": _flags_only}


@pytest.fixture(params=list(CASES))
def case(request, tmp_path):  # type: ignore[no-untyped-def]
    findings = CASES[request.param](tmp_path / "images")
    sr = build_sr(findings, now=NOW)
    path = write_sr(sr, tmp_path / "sr" / f"{request.param}.dcm")
    return request.param, findings, path


def _walk(items) -> Iterator[Dataset]:  # type: ignore[no-untyped-def]
    for item in items:
        yield item
        yield from _walk(item.get("ContentSequence", []))


def _code_value(code: Dataset) -> str:
    return code.get("CodeValue") or code.get("LongCodeValue")


def _named(ds: Dataset, meaning: str) -> list[Dataset]:
    return [i for i in _walk(ds.ContentSequence) if i.ConceptNameCodeSequence[0].CodeMeaning == meaning]


@needs("dciodvfy")
def test_sr_passes_dciodvfy(case):  # type: ignore[no-untyped-def]
    _, _, path = case
    assert peers.dciodvfy(path) == []


def test_sr_joins_the_study_in_a_series_of_its_own(case):  # type: ignore[no-untyped-def]
    _, findings, path = case
    sr = dcmread(path)
    first = findings.instances[0]
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    assert sr.Modality == "SR"
    assert sr.StudyInstanceUID == first.StudyInstanceUID
    assert sr.SeriesInstanceUID not in {ds.SeriesInstanceUID for ds in findings.instances}
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "AccessionNumber",
        "StudyDate",
        "StudyTime",
        "StudyID",
    ):
        assert sr[keyword].value == first[keyword].value, keyword
    assert sr.ContentDate == "20240506" and sr.ContentTime.startswith("070809")
    # Every evaluated instance is evidence, the undecodable one included.
    cited = {
        ref.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert cited == {ds.SOPInstanceUID for ds in findings.instances}
    schemes = {item.CodingSchemeDesignator for item in sr.CodingSchemeIdentificationSequence}
    assert PRIVATE_SCHEME in schemes


def test_views_scores_and_algorithm_are_in_the_content_tree(case):  # type: ignore[no-untyped-def]
    name, _findings, path = case
    sr = dcmread(path)
    views = [_code_value(i.ConceptCodeSequence[0]) for i in _named(sr, "Image View")]
    scores = [float(i.MeasuredValueSequence[0].NumericValue) for i in _named(sr, "Probability")]
    algo_names = {i.TextValue for i in _named(sr, "Algorithm Name")}
    algo_versions = {i.TextValue for i in _named(sr, "Algorithm Version")}
    groups = _named(sr, "Measurement Group")
    if name == "chest_two_views":
        assert views == ["272479007", "399173006"]  # postero-anterior, left lateral (classes.csv)
        assert scores == pytest.approx([0.97, 0.93, 0.61, 0.91, 0.88])
        assert len(groups) == 2 + 3
    elif name == "unknown_and_flags":
        assert views == ["261665006", "panoramic_radiograph"]  # SCT Unknown; no CID 4010 code -> private
        (pano,) = [
            i for i in _named(sr, "Image View") if i.ConceptCodeSequence[0].CodingSchemeDesignator == PRIVATE_SCHEME
        ]
        assert pano.ConceptCodeSequence[0].LongCodeValue == "panoramic_radiograph"
        assert scores == pytest.approx([0.31, 0.88])
    else:
        assert views == [] and scores == [] and groups == []
    assert algo_names == {ALGO} and algo_versions == {VERSION}
    # Each group, and the flags' container, names the algorithm.
    for container in groups + _named(sr, "Qualitative Evaluations"):
        names = [
            i.TextValue
            for i in container.ContentSequence
            if i.ConceptNameCodeSequence[0].CodeMeaning == "Algorithm Name"
        ]
        assert names == [ALGO]


def test_boxes_round_trip_as_closed_polylines_on_their_image(case):  # type: ignore[no-untyped-def]
    name, findings, path = case
    sr = dcmread(path)
    found = []
    for item in _walk(sr.ContentSequence):
        if item.ValueType == "SCOORD":
            assert item.GraphicType == "POLYLINE"
            pts = [float(v) for v in item.GraphicData]
            xs, ys = pts[0::2], pts[1::2]
            assert (xs[0], ys[0]) == (xs[-1], ys[-1]) and len(xs) == 5
            ref = item.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            found.append((ref, (min(xs), min(ys), max(xs), max(ys))))
    expected = [(f.sop_instance_uid, r.box_px) for f in findings.images for r in f.regions]
    assert found == expected
    assert (name == "chest_two_views") == bool(found)


def test_flags_are_text_evaluations_at_study_level(case):  # type: ignore[no-untyped-def]
    _name, findings, path = case
    sr = dcmread(path)
    containers = _named(sr, "Qualitative Evaluations")
    if not findings.flags:
        assert containers == []
        return
    (container,) = containers
    texts = [
        i
        for i in container.ContentSequence
        if i.ValueType == "TEXT" and i.ConceptNameCodeSequence[0].CodingSchemeDesignator == PRIVATE_SCHEME
    ]
    got = []
    for t in texts:
        severity = [_code_value(c.ConceptCodeSequence[0]) for c in t.ContentSequence if c.ValueType == "CODE"]
        image = [
            c.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for c in t.ContentSequence if c.ValueType == "IMAGE"
        ]
        got.append(
            MismatchFlag(
                _code_value(t.ConceptNameCodeSequence[0]), severity[0], t.TextValue, image[0] if image else None
            )
        )
    assert got == list(findings.flags)


def test_highdicom_reads_it_back(case):  # type: ignore[no-untyped-def]
    _name, findings, path = case
    sr = hd.sr.srread(path)
    assert isinstance(sr, hd.sr.ComprehensiveSR)
    report = sr.content
    assert isinstance(report, hd.sr.MeasurementReport)
    (_observer,) = report.get_observer_contexts(observer_type=hd.sr.CodedConcept("121007", "DCM", "Device"))
    image_groups = report.get_image_measurement_groups()
    assert [g.source_images[0].referenced_sop_instance_uid for g in image_groups] == [
        f.sop_instance_uid for f in findings.images
    ]
    for group, finding in zip(image_groups, findings.images):
        assert group.finding_type.value == finding.label and group.finding_type.scheme_designator == PRIVATE_SCHEME
        (evaluation,) = group.get_qualitative_evaluations(name=hd.sr.CodedConcept("111031", "DCM", "Image View"))
        (probability,) = group.get_measurements(name=hd.sr.CodedConcept("122157", "DCM", "Probability"))
        assert probability.value == pytest.approx(finding.score)
        assert probability.unit.value == "1"
        if finding.label == "chest_pa_ap":
            assert evaluation.value.value == "272479007" and evaluation.value.scheme_designator == "SCT"
            assert [s.value.value for s in group.finding_sites] == ["816094009"]
        if finding.label == "unknown":
            assert evaluation.value.value == "261665006" and group.finding_sites == []
        rois = report.get_planar_roi_measurement_groups(referenced_sop_instance_uid=finding.sop_instance_uid)
        assert [g.finding_type.value for g in rois] == [r.label for r in finding.regions]
        for roi, region in zip(rois, finding.regions):
            data = roi.roi.value
            assert (data[:, 0].min(), data[:, 1].min(), data[:, 0].max(), data[:, 1].max()) == region.box_px
            assert [m.value for m in roi.get_measurements()] == pytest.approx([region.score])
    flag_containers = hd.sr.utils.find_content_items(
        report[0], name=hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
    )
    assert len(flag_containers) == (1 if findings.flags else 0)
    if findings.flags:
        texts = hd.sr.utils.find_content_items(flag_containers[0], value_type=hd.sr.ValueTypeValues.TEXT)
        assert [t.value for t in texts if t.name.scheme_designator == PRIVATE_SCHEME] == [
            f.reason for f in findings.flags
        ]


def test_same_inputs_same_document(tmp_path):
    findings = _chest(tmp_path)
    kw = {"series_uid": generate_uid(), "instance_uid": generate_uid(), "now": NOW}
    one = write_sr(build_sr(findings, **kw), tmp_path / "one.dcm").read_bytes()
    two = write_sr(build_sr(findings, **kw), tmp_path / "two.dcm").read_bytes()
    assert one == two


def test_extra_evidence_from_another_study_is_pertinent_other_evidence(tmp_path):
    findings = _chest(tmp_path / "now")
    (prior,) = _headers(tmp_path / "prior", [DXSpec()])
    sr = build_sr(findings, evidence=[prior], now=NOW)
    assert sr.PertinentOtherEvidenceSequence[0].StudyInstanceUID == prior.StudyInstanceUID
    assert sr.StudyInstanceUID == findings.instances[0].StudyInstanceUID


def test_missing_type2_patient_attributes_still_give_a_valid_header(tmp_path):
    findings = _flags_only(tmp_path)
    for ds in findings.instances:
        del ds.PatientBirthDate
        del ds.ReferringPhysicianName
    sr = build_sr(findings, now=NOW)
    assert sr.PatientBirthDate == "" and sr.ReferringPhysicianName == ""


@pytest.mark.parametrize(
    "sex, birth, want", [("MALE", "1980", ("M", "")), ("f", "00000000", ("F", "")), ("X", "19700101", ("", "19700101"))]
)
def test_modality_spellings_of_sex_and_birth_date_do_not_stop_the_sr(tmp_path, sex, birth, want):
    """Real modalities write these; the SR carries the standard value or leaves the Type 2 attribute empty."""
    findings = _flags_only(tmp_path)
    for ds in findings.instances:
        ds.PatientSex, ds.PatientBirthDate = sex, birth
    sr = build_sr(findings, now=NOW)
    assert (sr.PatientSex, sr.PatientBirthDate) == want


def test_invalid_inputs_are_refused_on_creation(tmp_path):
    findings = _chest(tmp_path / "a")
    pa = findings.instances[0]
    with pytest.raises(ValueError, match="neither a class"):
        ImageFinding(pa.SOPInstanceUID, "chest_oblique", 0.5)
    with pytest.raises(ValueError, match="probability"):
        ImageFinding(pa.SOPInstanceUID, "chest_pa_ap", 1.5)
    with pytest.raises(ValueError, match="x0 < x1"):
        Region("chest", 0.5, (10, 10, 5, 20))
    with pytest.raises(ValueError, match="not among the evaluated"):
        StudyFindings(instances=[pa], images=[ImageFinding(generate_uid(), "chest_pa_ap", 0.5)])
    with pytest.raises(ValueError, match="not among the evaluated"):
        StudyFindings(instances=[pa], flags=[MismatchFlag("k", "s", "r", generate_uid())])
    other = _flags_only(tmp_path / "b").instances[0]
    with pytest.raises(ValueError, match="one study"):
        StudyFindings(instances=[pa, other])
    with pytest.raises(ValueError, match="at least one"):
        StudyFindings(instances=[])
    outside = StudyFindings(
        instances=[pa],
        images=[ImageFinding(pa.SOPInstanceUID, "chest_pa_ap", 0.9, [Region("chest", 0.5, (0, 0, 513, 10))])],
    )
    with pytest.raises(ValueError, match="outside"):
        build_sr(outside)
