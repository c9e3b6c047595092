"""Dataset manifests: class folders, DICOM headers through rules/labels.yaml, and the decode check.

Labels from headers must never be guessed, so each header case (a code, a
body part with a view, a description, nothing, a body part alone, headers
that disagree) is written as a real DICOM file and read back from disk, the
way `nnrouter dataset build` reads a modality's files.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import RADIOGRAPHS, REPO, needs_shared, pydicom_data, shared_files
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from sqlalchemy import select

from nnrouter.core.store import Instance, InstanceState, Series, Store, Study
from nnrouter.core.yamlfile import FileProblems
from nnrouter.testing.synthetic import DXSpec, dx_dataset
from nnrouter.training import dataset

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

RULES = REPO / "rules" / "labels.yaml"


@pytest.fixture(scope="module")
def rules() -> dataset.Rules:
    return dataset.load_rules(RULES)


def _rows(manifest: Path) -> list[dict[str, str]]:
    with open(manifest, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _summary(manifest: Path) -> dict:
    return json.loads(dataset.summary_path(manifest).read_text(encoding="utf-8"))


def _png(path: Path, value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.full((32, 24), value, np.uint8)
    img[8:24, 6:18] = 255 - value
    assert cv2.imwrite(str(path), img)
    return path


# --- class folders -------------------------------------------------------------


def test_class_folders_with_manifest(tmp_path):
    root = tmp_path / "images"
    _png(root / "knee_ap" / "k1.png")
    _png(root / "knee_ap" / "k2.png", 60)
    _png(root / "chest_pa_ap" / "c1.png")
    _png(root / "chest_pa_ap" / "c2.jpg")  # a JPEG
    cv2.imwrite(str(root / "chest_pa_ap" / "c3.jpeg"), np.zeros((8, 8), np.uint8))  # not in MANIFEST.csv
    _png(root / "other" / "o1.png")
    _png(root / "kneee_ap" / "typo.png")  # not a class: reported, left out
    (root / "knee_ap" / "broken.png").write_bytes(b"\x89PNG not really")  # cannot be read
    (root / "chest_pa_ap" / "notes.txt").write_text("not an image")
    _png(root / "other" / "wrong.png")  # MANIFEST.csv says knee_ap
    with open(root / "MANIFEST.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "class", "repo", "path", "license", "label_source"])
        for name, cls, repo in [
            ("knee_ap/k1.png", "knee_ap", "site/knees"),
            ("knee_ap/k2.png", "knee_ap", "site/knees"),
            ("knee_ap/k2.png", "knee_ap", "site/knees"),  # listed twice, counted once
            ("knee_ap/broken.png", "knee_ap", "site/knees"),
            ("chest_pa_ap/c1.png", "chest_pa_ap", "site/chests"),
            ("chest_pa_ap/c2.jpg", "chest_pa_ap", "site/chests"),
            ("other/o1.png", "other", "site/misc"),
            ("other/wrong.png", "knee_ap", "site/misc"),
        ]:
            w.writerow([name, cls, repo, "x", "CC0", "test"])

    out = tmp_path / "out" / "m.csv"
    summary = dataset.build(out, images=root, dicom=None, store_config=None, mapping=RULES, check_decode=True)

    rows = _rows(out)
    assert list(rows[0]) == ["file", "label", "group", "kind"]
    got = {Path(r["file"]).relative_to(root).as_posix(): (r["label"], r["group"], r["kind"]) for r in rows}
    assert got == {
        "knee_ap/k1.png": ("knee_ap", "site/knees", "image"),
        "knee_ap/k2.png": ("knee_ap", "site/knees", "image"),
        "chest_pa_ap/c1.png": ("chest_pa_ap", "site/chests", "image"),
        "chest_pa_ap/c2.jpg": ("chest_pa_ap", "site/chests", "image"),
        "chest_pa_ap/c3.jpeg": ("chest_pa_ap", "chest_pa_ap", "image"),  # not listed: group = folder
        "other/o1.png": ("other", "site/misc", "image"),
    }
    assert all(Path(r["file"]).is_absolute() for r in rows)

    outcomes = {Path(r.file).name: r.outcome for r in summary.rejected}
    assert outcomes == {
        "kneee_ap": "unmapped",
        "broken.png": "undecodable",
        "notes.txt": "unreadable",
        "wrong.png": "conflicting",
    }
    assert summary.labels == {"chest_pa_ap": 3, "knee_ap": 2, "other": 1}
    assert summary.sources["chest_pa_ap"] == {"chest_pa_ap": 1, "site/chests": 2}

    side = _summary(out)
    assert side["manifest_sha256"] == hashlib.sha256(out.read_bytes()).hexdigest() == summary.sha256
    assert side["labels"] == summary.labels
    assert side["groups"] == {"site/knees": 2, "site/chests": 2, "chest_pa_ap": 1, "site/misc": 1}
    assert [u["file"] for u in side["unmapped"]] == [str(root / "kneee_ap")]
    assert "not one of the classes" in side["unmapped"][0]["reason"]
    assert "MANIFEST.csv says class 'knee_ap'" in side["conflicting"][0]["reason"]
    assert any("repeat a file" in n for n in side["notes"])
    assert any("not in MANIFEST.csv" in n for n in side["notes"])
    text = summary.text()
    assert "knee_ap" in text and "unmapped: 1" in text and "kneee_ap" in text


def test_class_folders_without_manifest_group_by_folder(tmp_path):
    root = tmp_path / "images"
    _png(root / "pelvis_ap" / "p.png")
    _png(root / "shoulder_ap" / "s.png")
    found = dataset.from_class_folders(root, check_decode=False)
    assert {(e.label, e.group) for e in found.entries} == {("pelvis_ap", "pelvis_ap"), ("shoulder_ap", "shoulder_ap")}
    assert any("one source" in n for n in found.notes)


@pytest.mark.skipif(not (RADIOGRAPHS / "MANIFEST.csv").is_file(), reason=f"{RADIOGRAPHS} is absent (present in CI)")
def test_shared_radiographs(tmp_path):
    out = tmp_path / "radiographs.csv"
    summary = dataset.build(out, images=RADIOGRAPHS, dicom=None, store_config=None, mapping=RULES, check_decode=True)
    # The README's table says 607 shoulder_ap: MANIFEST.csv lists 10 of those
    # files twice (an upstream test and training copy), so 597 files are there.
    assert summary.labels == {
        "shoulder_ap": 597,
        "chest_pa_ap": 559,
        "knee_ap": 450,
        "panoramic_radiograph": 350,
        "hand_ap": 64,
        "chest_lateral": 44,
        "wrist_ap": 39,
        "abdomen_ap": 37,
        "hand_oblique": 21,
        "pelvis_ap": 10,
        "other": 9,
        "whole_spine_ap": 250,  # nnrouter's own class beside the 30 (nnrouter/data/classes_own.csv)
    }
    assert summary.rejected == []
    with open(RADIOGRAPHS / "MANIFEST.csv", newline="") as f:
        repo = {RADIOGRAPHS / r["file"]: r["repo"] for r in csv.DictReader(f)}
    rows = _rows(out)
    assert all(r["group"] == repo[Path(r["file"])] for r in rows)
    # The source group is what leave-one-source-out holds out: count them per class.
    assert {lbl: len(g) for lbl, g in summary.sources.items()} == {
        "chest_pa_ap": 4,
        "chest_lateral": 2,
        "panoramic_radiograph": 2,
        "abdomen_ap": 2,
        **dict.fromkeys(
            ("shoulder_ap", "knee_ap", "hand_ap", "wrist_ap", "hand_oblique", "pelvis_ap", "other", "whole_spine_ap"), 1
        ),
    }
    assert summary.sources["abdomen_ap"] == {"serafb/RadiologyMC-dataset": 20, "dlab-berkeley/R-Deep-Learning": 17}
    assert any("10 rows repeat" in n for n in summary.notes)


# --- DICOM headers -----------------------------------------------------------------


def _code(value: str, scheme: str = "LN", meaning: str = "") -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _dx(
    path: Path,
    *,
    body_part: str | None = "CHEST",
    view: str | None = "PA",
    description: str | None = "",
    codes: list[Dataset] | None = None,
    pixels_ok: bool = True,
    **extra,
) -> Path:  # type: ignore[no-untyped-def]
    """A small DX file: None deletes an attribute, extra sets more."""
    ds = dx_dataset(DXSpec(rows=64, columns=64))
    for keyword, value in (("BodyPartExamined", body_part), ("ViewPosition", view), ("StudyDescription", description)):
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    if view is None and "ViewCodeSequence" in ds:
        del ds.ViewCodeSequence
    if codes:
        ds.RequestedProcedureCodeSequence = Sequence(codes)
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    if not pixels_ok:
        ds.PixelData = ds.PixelData[:100]  # header says 64x64x16 bit
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_dicom_headers_mapped_unmapped_conflicting(tmp_path, rules):
    d = tmp_path / "dicom"
    files = {
        "loinc.dcm": _dx(d / "loinc.dcm", body_part=None, view=None, codes=[_code("36584-1")]),
        "pair.dcm": _dx(d / "pair.dcm", body_part="KNEE", view="AP", InstitutionName="Site A", StationName="DR1"),
        "description.dcm": _dx(
            d / "description.dcm", body_part=None, view=None, description=None, SeriesDescription="Thorax_lat"
        ),
        "nothing.dcm": _dx(d / "nothing.dcm", body_part=None, view=None),
        "chest_no_view.dcm": _dx(d / "chest_no_view.dcm", view=None),
        "conflict.dcm": _dx(d / "conflict.dcm", body_part="KNEE", description="XR CHEST PA"),
        # A two-view procedure code allows both views: the View Position picks one ...
        "wrist_pa.dcm": _dx(d / "wrist_pa.dcm", body_part="WRIST", view="PA", codes=[_code("30793-4")]),
        # ... and without one it is not guessed.
        "wrist_code_only.dcm": _dx(d / "wrist_code_only.dcm", body_part=None, view=None, codes=[_code("30793-4")]),
        # A study description naming both views: the image's own View Position decides.
        "chest_two_views.dcm": _dx(d / "chest_two_views.dcm", view="LL", description="XR CHEST PA AND LATERAL"),
        # HIP + AP is not taken for Lauenstein; "frog leg" is.
        "hip_ap.dcm": _dx(d / "hip_ap.dcm", body_part="HIP", view="AP", description="HIP AP"),
        "frog.dcm": _dx(d / "frog.dcm", body_part="HIP", view="AP", description="XR HIP FROG LEG"),
    }
    found = dataset.from_dicom([d], rules, check_decode=True)
    mapped = {Path(e.file).name: e for e in found.entries}
    rejected = {Path(r.file).name: r for r in found.rejected}
    assert {k: e.label for k, e in mapped.items()} == {
        "loinc.dcm": "knee_ap",
        "pair.dcm": "knee_ap",
        "description.dcm": "chest_lateral",
        "wrist_pa.dcm": "wrist_ap",
        "chest_two_views.dcm": "chest_lateral",
        "frog.dcm": "oblique_view_of_Lauenstein",
    }
    assert {k: r.outcome for k, r in rejected.items()} == {
        "nothing.dcm": "unmapped",
        "chest_no_view.dcm": "unmapped",
        "conflict.dcm": "conflicting",
        "wrist_code_only.dcm": "unmapped",
        "hip_ap.dcm": "unmapped",
    }
    assert set(mapped) | set(rejected) == set(files)

    assert any(ev.startswith("RequestedProcedureCodeSequence '36584-1'") for ev in mapped["loinc.dcm"].evidence)
    assert "BodyPartExamined+ViewPosition 'KNEE/AP' -> knee_ap" in mapped["pair.dcm"].evidence
    assert "SeriesDescription 'Thorax_lat' -> chest_lateral" in mapped["description.dcm"].evidence
    assert mapped["pair.dcm"].group == "Site A | nnrouter synthetic | DR1"
    assert mapped["loinc.dcm"].group == "nnrouter synthetic"

    assert "no procedure code" in rejected["nothing.dcm"].reason
    assert "CHEST without a View Position" in rejected["chest_no_view.dcm"].reason
    assert "BodyPartExamined=CHEST" in rejected["chest_no_view.dcm"].details
    conflict = rejected["conflict.dcm"]
    assert "headers disagree" in conflict.reason
    assert any("KNEE" in ev and "knee_ap" in ev for ev in conflict.details)
    assert any("XR CHEST PA" in ev and "chest_pa_ap" in ev for ev in conflict.details)
    assert "wrist_ap, wrist_lateral" in rejected["wrist_code_only.dcm"].reason

    out = tmp_path / "m.csv"
    summary = dataset.build(out, images=None, dicom=[d], store_config=None, mapping=RULES, check_decode=True)
    text = dataset.summary_path(out).read_text()
    # Reports name what was seen, never the patient.
    for phi in ("SYNTHETIC", "SYN0001", "19700101", "ACC0001"):
        assert phi not in text and phi not in summary.text() and phi not in out.read_text()
    side = json.loads(text)
    assert side["left_out"] == {"unmapped": 4, "conflicting": 1}
    assert side["mapping"] == str(RULES) and len(side["mapping_sha256"]) == 64
    assert {r["kind"] for r in _rows(out)} == {"dicom"}


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"BodyPartExamined": "CHEST", "ViewPosition": "AP"}, "chest_pa_ap"),
        ({"BodyPartExamined": "THORAX", "ViewPosition": "LL"}, "chest_lateral"),  # alias
        ({"BodyPartExamined": "PATELLA", "ProtocolName": "Patella axial"}, "patella_axial"),
        ({"StudyDescription": "OPG"}, "panoramic_radiograph"),
        ({"StudyDescription": "XR ABDOMEN LEFT LAT DECUBITUS"}, "abdomen_left_lateral_decubitus"),
        ({"StudyDescription": "XR CHEST LAT DECUBITUS"}, None),  # not a lateral chest
        ({"StudyDescription": "BILATERAL KNEES AP"}, "knee_ap"),
        ({"StudyDescription": "C-SPINE 2 VIEWS"}, None),
        ({"BodyPartExamined": "ABDOMEN", "StudyDescription": "XR CHEST PA"}, "conflicting"),
        ({"BodyPartExamined": "BREAST", "ViewPosition": "MLO"}, None),
        # A description's anatomy narrows like Body Part Examined: against HAND it is a conflict,
        # with or without a view that would pick a hand class.
        ({"BodyPartExamined": "HAND", "ViewPosition": "PA", "StudyDescription": "XR Wrist Lt"}, "conflicting"),
        ({"BodyPartExamined": "HAND", "ViewPosition": "LL", "StudyDescription": "XR Wrist Lt"}, "conflicting"),
        ({"BodyPartExamined": "WRIST", "ViewPosition": "PA", "StudyDescription": "XR Wrist Lt"}, "wrist_ap"),
        ({"BodyPartExamined": "HAND", "ViewPosition": "PA", "StudyDescription": "XR Hand and Wrist"}, "hand_ap"),
        ({"StudyDescription": "XR Wrist Lt"}, None),  # names the anatomy, not the view
    ],
)
def test_decide_examples(rules, headers, expected):
    ds = Dataset()
    ds.Modality = "DX"
    for k, v in headers.items():
        setattr(ds, k, v)
    d = dataset.decide(ds, rules)
    if expected == "conflicting":
        assert d.outcome == "conflicting"
    elif expected is None:
        assert (d.outcome, d.label) == ("unmapped", None)
    else:
        assert (d.outcome, d.label) == ("mapped", expected), d.reason


def test_local_codes_and_duplicates_and_undecodable(tmp_path):
    mapping = tmp_path / "labels.yaml"
    mapping.write_text(
        "codes:\n"
        "  - {code: XR77, scheme: 99LOCAL, class: shoulder_outlet}\n"
        "views:\n"
        "  - {body_part: BREAST, view_positions: [CC, MLO], class: other}\n"
    )
    rules = dataset.load_rules(mapping)
    d = tmp_path / "dicom"
    _dx(d / "local.dcm", body_part=None, view=None, codes=[_code("XR77", "99LOCAL", "Shoulder special")])
    _dx(d / "other_scheme.dcm", body_part=None, view=None, codes=[_code("XR77", "99OTHER")])
    mammo = _dx(d / "mammo.dcm", body_part="BREAST", view="MLO")
    (d / "copy.dcm").write_bytes(mammo.read_bytes())  # same SOP Instance UID
    _dx(d / "truncated.dcm", body_part="KNEE", view="AP", pixels_ok=False)
    (d / "README.txt").write_text("not DICOM")

    found = dataset.from_dicom([d], rules, check_decode=True)
    assert {Path(e.file).name: e.label for e in found.entries} == {"local.dcm": "shoulder_outlet", "copy.dcm": "other"}
    assert {Path(r.file).name: r.outcome for r in found.rejected} == {
        "other_scheme.dcm": "unmapped",
        "mammo.dcm": "duplicate",
        "truncated.dcm": "undecodable",
        "README.txt": "unreadable",
    }
    # Without the decode check the truncated file goes in: the summary says the check was skipped.
    out = tmp_path / "m.csv"
    summary = dataset.build(
        out, images=None, dicom=[d / "truncated.dcm"], store_config=None, mapping=mapping, check_decode=False
    )
    assert summary.labels == {"knee_ap": 1}
    assert any("decode check skipped" in n for n in summary.notes)


def test_pydicom_data_rg1_maps_to_chest(rules):
    # Runs anywhere: a real CR chest PA from the test extras.
    found = dataset.from_dicom([pydicom_data("RG1_UNCI.dcm")], rules, check_decode=True)
    assert [(e.label, e.group) for e in found.entries] == [
        ("chest_pa_ap", "Philips Medical Systems Hamburg | Philips Medical Systems | THORAVISION")
    ]


# What the headers of ../shared/data/dicom say: the NEMA RG2 hip has no View
# Position (and HIP + a view would not say Lauenstein anyway), RG3 is an
# EXTREMITY, MG1 a mammogram, and the DX and veterinary files carry no body
# part or description at all. Only the chest PAs map.
SHARED_GOOD = {
    "cr_chest_mono1_no_meta.dcm": "chest_pa_ap",
    # Body Part Examined HAND, the study "XR Wrist Lt": reported, not resolved.
    "cr_wrist_lateral_philips.dcm": "conflicting",
    "cr_wrist_pa_philips.dcm": "conflicting",
    "dx_chest_j2k_no_bodypart.dcm": "unmapped",
    "nema_MG1_J2KI.dcm": "unmapped",
    "nema_RG1_J2KI.dcm": "chest_pa_ap",
    "nema_RG1_JLSN.dcm": "chest_pa_ap",
    "nema_RG2_J2KR.dcm": "unmapped",
    "nema_RG2_JLSL.dcm": "unmapped",
    "nema_RG2_JPLL.dcm": "unmapped",
    "nema_RG2_JPLY.dcm": "unmapped",
    "nema_RG2_JPLY_fixed.dcm": "unmapped",
    "nema_RG2_RLE.dcm": "unmapped",
    "nema_RG3_J2KR.dcm": "unmapped",
    "nema_RG3_JPLL.dcm": "unmapped",
    "nema_RG3_RLE.dcm": "unmapped",
    "vet_dx_jpeg_baseline_ybr.dcm": "unmapped",
}
SHARED_BAD = {
    "dx_chest_j2k_corrupt_codestream.dcm": "undecodable",  # CHEST + PA maps; the pixels do not decode
    "implicit_file_meta.dcm": "unmapped",  # a CT: CHEST without a view
    "jpeg_lossless_bad.dcm": "unmapped",
    "wrong_transfer_syntax.dcm": "unmapped",
}


def _outcomes(found: dataset.Found) -> dict[str, str]:
    out = {Path(e.file).name: e.label for e in found.entries}
    out.update({Path(r.file).name: r.outcome for r in found.rejected})
    return out


@needs_shared
def test_shared_dicom(tmp_path, rules):
    good = dataset.from_dicom(shared_files("good"), rules, check_decode=True)
    assert _outcomes(good) == SHARED_GOOD
    reasons = {Path(r.file).name: r.reason for r in good.rejected}
    assert "HIP without a View Position" in reasons["nema_RG2_RLE.dcm"]
    wrist = reasons["cr_wrist_pa_philips.dcm"]
    assert (
        "BodyPartExamined 'HAND'" in wrist
        and "StudyDescription anatomy 'XR Wrist Lt' -> wrist_ap|wrist_lateral" in wrist
    )

    bad = dataset.from_dicom(shared_files("bad"), rules, check_decode=True)
    assert _outcomes(bad) == SHARED_BAD
    corrupt = next(r for r in bad.rejected if r.outcome == "undecodable")
    assert "JPEG 2000" in corrupt.reason

    unchecked = dataset.from_dicom(shared_files("bad"), rules, check_decode=False)
    assert [Path(e.file).name for e in unchecked.entries] == ["dx_chest_j2k_corrupt_codestream.dcm"]


# --- the store -------------------------------------------------------------------


def test_from_store(tmp_path):
    db = tmp_path / "nnrouter.db"
    store = Store(f"sqlite:///{db}")
    store.upgrade()
    d = tmp_path / "spool"
    knee = _dx(d / "knee.dcm", body_part="KNEE", view="AP")
    old = _dx(d / "knee_v1.dcm", body_part="KNEE", view="LL")
    chest = _dx(d / "chest.dcm", view=None)
    with store.write() as s:
        study = Study(study_uid="1.2.3")
        series = Series(study=study, series_uid="1.2.3.4")
        s.add_all([study, series])
        rows = [
            ("1.1", 1, old, InstanceState.CLASSIFIED, None),
            ("1.1", 2, knee, InstanceState.CLASSIFIED, None),
            ("1.2", 1, chest, InstanceState.DECODED, None),
            ("1.3", 1, d / "gone.dcm", InstanceState.RECEIVED, None),
            ("1.4", 1, d / "damaged.dcm", InstanceState.UNDECODABLE, "JPEG stream is damaged"),
        ]
        for uid, version, path, state, reason in rows:
            s.add(
                Instance(
                    series=series,
                    sop_instance_uid=uid,
                    version=version,
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                    path=str(path),
                    size_bytes=1,
                    sha256=f"{uid}.{version}".ljust(64, "0"),
                    state=state,
                    state_reason=reason,
                )
            )
    with store.read() as s:
        assert len(s.execute(select(Instance)).all()) == 5
    store.dispose()
    cfg = tmp_path / "nnrouter.yaml"
    cfg.write_text(f"database:\n  url: sqlite:///{db}\n")

    out = tmp_path / "m.csv"
    summary = dataset.build(out, images=None, dicom=None, store_config=cfg, mapping=RULES, check_decode=True)
    assert [(Path(r["file"]).name, r["label"]) for r in _rows(out)] == [("knee.dcm", "knee_ap")]
    assert {Path(r.file).name: r.outcome for r in summary.rejected} == {
        "chest.dcm": "unmapped",
        "gone.dcm": "unreadable",
        "damaged.dcm": "undecodable",
    }
    assert next(r for r in summary.rejected if r.outcome == "undecodable").reason == "JPEG stream is damaged"
    assert any("older versions" in n for n in summary.notes)

    cfg.write_text(f"database:\n  url: sqlite:///{tmp_path / 'missing.db'}\n")
    with pytest.raises(FileProblems, match="no database file"):
        dataset.build(out, images=None, dicom=None, store_config=cfg, mapping=RULES, check_decode=False)
    assert not (tmp_path / "missing.db").exists()


# --- the mapping file ------------------------------------------------------------


def test_shipped_rules_cover_every_class(rules):
    from nnrouter.core.codes import classes

    named = {label for _, label in rules.descriptions}
    assert named == set(classes())


@pytest.mark.parametrize(
    ("text", "where"),
    [
        (
            "descriptions:\n  - {pattern: 'knee', class: knee_ap}\n  - {pattern: 'chest', class: chest_pa}\n",
            ":3:24: descriptions[1].class: 'chest_pa' is not one of the 31 classes or 'other'",
        ),
        (
            "descriptions:\n  - pattern: '(unclosed'\n    class: knee_ap\n",
            ":2:5: descriptions[0].pattern: not a valid regular expression",
        ),
        (
            "views:\n  - {body_part: CHEST, view_positions: [AP], class: knee_ap}\n",
            ":2:6: views[0].body_part: CHEST is not the body part of knee_ap (KNEE)",
        ),
        (
            "views:\n  - {body_part: CHEST, view_positions: [PA], class: chest_lateral}\n",
            ":2:24: views[0].view_positions: CHEST + PA already maps to chest_pa_ap (classes.csv)",
        ),
        ("body_part_aliases:\n  TORSO: TRUNK\n", ":2:3: body_part_aliases.TORSO: TRUNK is not a Body Part Examined"),
        ("descriptions: []\npatterns: []\n", ":2:1: patterns: unknown field"),
        ("codes:\n  - {code: X1, class: knee_ap\n", ":3:1: (top level): not valid YAML"),
    ],
)
def test_broken_mapping_names_file_and_line(tmp_path, text, where):
    path = tmp_path / "labels.yaml"
    path.write_text(text)
    with pytest.raises(FileProblems) as exc:
        dataset.load_rules(path)
    assert f"{path}{where}" in str(exc.value)
    # build reads the mapping before it writes anything
    with pytest.raises(FileProblems):
        dataset.build(
            tmp_path / "m.csv", images=None, dicom=[tmp_path], store_config=None, mapping=path, check_decode=False
        )
    assert not (tmp_path / "m.csv").exists()


def test_build_needs_an_input(tmp_path):
    with pytest.raises(ValueError, match="nothing to build from"):
        dataset.build(tmp_path / "m.csv", images=None, dicom=None, store_config=None, mapping=RULES, check_decode=True)
