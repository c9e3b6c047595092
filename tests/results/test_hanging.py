"""Hanging protocols: study layouts, and protocol instances dciodvfy accepts and a PACS stores."""

from __future__ import annotations

import ast
import datetime as dt
import json
import subprocess
import sys

import pytest
from conftest import needs
from pydicom.dataset import Dataset

from nnrouter.core.codes import classes, family
from nnrouter.results import hanging
from nnrouter.results.hanging import (
    HANGING_PROTOCOL_STORAGE,
    UNKNOWN,
    ImageView,
    StudyViews,
    generic_protocols,
    layout,
    pick_prior,
    protocol_for,
    regions,
    write_protocols,
)
from nnrouter.testing import peers

CREATED = dt.datetime(2024, 5, 1, 12, 0, 0, tzinfo=dt.UTC)


def img(
    uid: str, label: str | None, side: str | None = None, n: int | None = None, score: float | None = None
) -> ImageView:
    return ImageView(
        sop_instance_uid=uid, series_uid="1.2.3", label=label, score=score, laterality=side, instance_number=n
    )


def study(uid: str, date: str, parts: set[str], *images: ImageView) -> StudyViews:
    return StudyViews(study_uid=uid, study_date=date, accession=f"A{uid}", body_parts=parts, images=list(images))


def cells(lay) -> list[tuple[str, str, str | None, tuple[int, int]]]:  # type: ignore[no-untyped-def]
    return [(d.study, d.label, d.laterality, d.viewport) for d in lay.display_sets]


# --- families and layouts ------------------------------------------------------


def test_families_come_from_the_table():
    fam = {name: family(name) for name in classes()}
    assert set(fam.values()) <= {"frontal", "lateral", "oblique", "other"}
    assert fam["chest_pa_ap"] == fam["foot_ap"] == fam["hand_ap"] == fam["cervical_spine_ap"] == "frontal"
    assert fam["chest_lateral"] == fam["ankle_lateral"] == fam["lumbar_spine_lateral"] == "lateral"
    assert fam["hand_oblique"] == fam["foot_oblique"] == fam["oblique_view_of_Lauenstein"] == "oblique"
    assert fam["patella_axial"] == fam["shoulder_outlet"] == fam["abdomen_left_lateral_decubitus"] == "other"
    assert fam["panoramic_radiograph"] == "other"
    # Every class is in exactly one region, in reading order there.
    seen = [n for names in regions().values() for n in names]
    assert sorted(seen) == sorted(classes())
    assert regions()["KNEE"] == ("knee_ap", "knee_lateral", "patella_axial")
    assert regions()["PELVIS"] == ("pelvis_ap", "oblique_view_of_Lauenstein")
    assert family(UNKNOWN) == UNKNOWN
    with pytest.raises(ValueError, match="not a view class"):
        family("no_such_view")


def test_wings_import_one_way():
    """Results build objects and answer nothing on the network; orders need the class table, not the layouts."""
    code = (
        "import sys, nnrouter.results.hanging, nnrouter.orders.order; "
        "print(sorted(m for m in sys.modules if m.startswith(('nnrouter.dicom', 'nnrouter.results'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120).stdout
    assert ast.literal_eval(out) == ["nnrouter.results", "nnrouter.results.hanging"]
    code = (
        "import sys, nnrouter.orders.order; print(sorted(m for m in sys.modules if m.startswith('nnrouter.results')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120).stdout
    assert ast.literal_eval(out) == []


def test_chest_two_view_pa_left_lateral_right():
    s = study("1", "20240501", {"CHEST"}, img("lat", "chest_lateral", n=1), img("pa", "chest_pa_ap", n=2))
    lay = layout(s)
    assert lay.protocol == "XR CHEST"
    assert lay.grid == (1, 2)
    assert cells(lay) == [("current", "chest_pa_ap", None, (0, 0)), ("current", "chest_lateral", None, (0, 1))]
    assert [d.images for d in lay.display_sets] == [("pa",), ("lat",)]
    d = lay.to_dict()
    json.dumps(d)  # JSON-able as it stands
    assert d["grid"] == {"rows": 1, "columns": 2}
    assert d["prior"] is None and d["current"]["screen"] == "full"
    assert d["display_sets"][0] == {
        "position": 0,
        "viewport": {"row": 0, "column": 0},
        "study": "current",
        "study_uid": "1",
        "label": "chest_pa_ap",
        "family": "frontal",
        "laterality": None,
        "images": ["pa"],
        "reason": d["display_sets"][0]["reason"],
    }
    assert "frontal" in d["display_sets"][0]["reason"] and "lateral" in d["display_sets"][1]["reason"]


def test_knee_with_prior_beside():
    cur = study("cur", "20240501", {"KNEE"}, img("c-lat", "knee_lateral", "R", 2), img("c-ap", "knee_ap", "R", 1))
    older = study("old", "20230101", {"KNEE"}, img("o-ap", "knee_ap", "R"))
    newest_earlier = study(
        "prev", "20230601", {"KNEE"}, img("p-lat", "knee_lateral", "R", 1), img("p-ap", "knee_ap", "R", 2)
    )
    chest_between = study("chest", "20240101", {"CHEST"}, img("x", "chest_pa_ap"))
    later = study("later", "20240801", {"KNEE"}, img("l-ap", "knee_ap", "R"))
    # Body part known only from the classified images (no header value) still counts.
    unlabelled_parts = study("nohdr", "20221212", set(), img("n-ap", "knee_ap", "R"))
    prior = pick_prior(cur, [older, chest_between, later, newest_earlier, unlabelled_parts, cur])
    assert prior is newest_earlier
    assert pick_prior(cur, [chest_between, later]) is None
    assert pick_prior(cur, [older, unlabelled_parts]) is older

    lay = layout(cur, prior)
    assert lay.protocol == "XR KNEE"
    assert lay.grid == (1, 4)
    assert cells(lay) == [
        ("current", "knee_ap", "R", (0, 0)),
        ("current", "knee_lateral", "R", (0, 1)),
        ("prior", "knee_ap", "R", (0, 2)),
        ("prior", "knee_lateral", "R", (0, 3)),
    ]
    d = lay.to_dict()
    assert d["current"]["screen"] == "left" and d["prior"]["screen"] == "right"
    assert d["prior"]["study_uid"] == "prev" and d["prior"]["study_date"] == "20230601"
    assert [x["position"] for x in d["display_sets"]] == [0, 1, 2, 3]
    assert "prior of 20230601" in d["display_sets"][2]["reason"]


def test_prior_is_aligned_like_with_like():
    cur = study("cur", "20240501", {"KNEE"}, img("a", "knee_ap"), img("b", "knee_lateral"), img("c", "patella_axial"))
    prior = study("pri", "20230501", {"KNEE"}, img("p", "patella_axial"), img("q", "knee_lateral"))
    lay = layout(cur, prior)
    assert lay.grid == (1, 6)
    assert cells(lay)[3:] == [("prior", "knee_lateral", None, (0, 4)), ("prior", "patella_axial", None, (0, 5))]


def test_bilateral_hands_right_on_viewers_left():
    s = study(
        "h",
        "20240501",
        {"HAND"},
        img("l-pa", "hand_ap", "L", 1),
        img("r-obl", "hand_oblique", "R", 4),
        img("r-pa", "hand_ap", "R", 3),
        img("l-obl", "hand_oblique", "L", 2),
    )
    lay = layout(s)
    assert lay.protocol == "XR HAND R+L"
    assert cells(lay) == [
        ("current", "hand_ap", "R", (0, 0)),
        ("current", "hand_ap", "L", (0, 1)),
        ("current", "hand_oblique", "R", (0, 2)),
        ("current", "hand_oblique", "L", (0, 3)),
    ]
    assert "patient's right on the viewer's left" in lay.display_sets[0].reason


def test_unknown_images_last_in_their_own_set():
    s = study(
        "u",
        "20240501",
        {"ANKLE"},
        img("u1", None, n=1),
        img("lat", "ankle_lateral", n=2),
        img("u2", UNKNOWN, n=3),
        img("doubt", "ankle_ap", score=0.2, n=4),
        img("ap", "ankle_ap", score=0.9, n=5),
    )
    lay = layout(s, min_score=0.5)
    assert [(d.label, d.images) for d in lay.display_sets] == [
        ("ankle_ap", ("ap",)),
        ("ankle_lateral", ("lat",)),
        (UNKNOWN, ("u1", "u2", "doubt")),
    ]
    assert lay.display_sets[-1].family == UNKNOWN
    assert layout(study("e", "20240501", set(), img("z", None))).protocol == "XR UNCLASSIFIED"


def test_spine_order_and_images_stacked_by_instance_number():
    s = study(
        "s",
        "20240501",
        {"LSPINE"},
        img("l2", "lumbar_spine_lateral", n=2),
        img("l1", "lumbar_spine_lateral", n=1),
        img("ap", "lumbar_spine_ap", n=3),
    )
    lay = layout(s)
    assert [(d.label, d.images) for d in lay.display_sets] == [
        ("lumbar_spine_ap", ("ap",)),
        ("lumbar_spine_lateral", ("l1", "l2")),
    ]


def test_inputs_validated():
    with pytest.raises(ValueError):
        img("x", "not_a_class")
    with pytest.raises(ValueError):
        img("x", "knee_ap", side="B")
    with pytest.raises(ValueError):
        StudyViews(study_uid="1", study_date="2024-05-01")


# --- Hanging Protocol Storage instances ------------------------------------------


def test_generic_set_covers_every_class():
    protocols = generic_protocols(version="1", created=CREATED)
    names = [str(p.HangingProtocolName) for p in protocols]
    assert len(names) == len(set(names))
    assert all(len(n) <= 16 for n in names)
    assert {"XR CHEST", "XR KNEE", "XR KNEE R+L", "XR PELVIS", "XR JAW", "XR ABDOMEN", "XR CSPINE"} <= set(names)
    assert "XR CHEST R+L" not in names
    assert all(p.SOPClassUID == HANGING_PROTOCOL_STORAGE and p.HangingProtocolLevel == "SITE" for p in protocols)
    # Deterministic UIDs: a rebuild replaces, a new version adds.
    again = generic_protocols(version="1")
    assert [p.SOPInstanceUID for p in again] == [p.SOPInstanceUID for p in protocols]
    assert generic_protocols(version="2")[0].SOPInstanceUID != protocols[0].SOPInstanceUID


def test_chest_protocol_structure():
    p = protocol_for("CHEST", ["chest_lateral", "chest_pa_ap"], created=CREATED)
    assert p.NumberOfPriorsReferenced == 1 and p.NumberOfScreens == 2
    (definition,) = p.HangingProtocolDefinitionSequence
    assert definition.AnatomicRegionSequence[0].CodeValue == "816094009"
    assert definition.AnatomicRegionSequence[0].CodeMeaning == "Chest"
    # Frontal image set first, by View Position AP or PA; lateral by LL or RL.
    frontal, lateral = p.ImageSetsSequence
    sel = {int(s.SelectorAttribute): s for s in frontal.ImageSetSelectorSequence}
    assert list(sel[0x00185101].SelectorCSValue) == ["AP", "PA"]
    assert list(sel[0x00080060].SelectorCSValue) == ["DX", "CR"]
    assert sel[0x00180015].SelectorCSValue == "CHEST"
    sel = {int(s.SelectorAttribute): s for s in lateral.ImageSetSelectorSequence}
    assert list(sel[0x00185101].SelectorCSValue) == ["LL", "RL"]
    # Current on the left screen (PA then lateral), prior on the right, like with like.
    boxes = [
        (d.DisplaySetLabel, list(d.ImageBoxesSequence[0].DisplayEnvironmentSpatialPosition))
        for d in p.DisplaySetsSequence
    ]
    assert boxes == [
        ("current chest_pa_ap", [0.0, 1.0, 0.25, 0.0]),
        ("current chest_lateral", [0.25, 1.0, 0.5, 0.0]),
        ("prior chest_pa_ap", [0.5, 1.0, 0.75, 0.0]),
        ("prior chest_lateral", [0.75, 1.0, 1.0, 0.0]),
    ]
    times = [t.ImageSetSelectorCategory for t in frontal.TimeBasedImageSetsSequence]
    assert times == ["RELATIVE_TIME", "ABSTRACT_PRIOR"]
    with pytest.raises(ValueError):
        protocol_for("CHEST", ["knee_ap"])
    with pytest.raises(ValueError):
        protocol_for("CHEST", bilateral=True)
    with pytest.raises(ValueError):
        protocol_for("NOWHERE")


def _selectors(item: Dataset) -> dict[int, Dataset]:
    return {int(s.SelectorAttribute): s for s in item.ImageSetSelectorSequence}


def test_views_without_a_view_position_are_selected_by_view_code():
    ap, lat, axial = (_selectors(i) for i in protocol_for("KNEE", created=CREATED).ImageSetsSequence)
    assert 0x00185101 in ap and 0x00540220 not in ap
    assert {c.CodeValue for c in lat[0x00540220].SelectorCodeSequenceValue} == {"399067008", "399173006", "399198007"}
    assert [c.CodeValue for c in axial[0x00540220].SelectorCodeSequenceValue] == ["399061009"]
    supine, decubitus = (_selectors(i) for i in protocol_for("ABDOMEN", created=CREATED).ImageSetsSequence)
    assert list(supine[0x00185101].SelectorCSValue) == ["AP", "PA"] and decubitus[0x00185101].SelectorCSValue == "LLD"
    (pano,) = (_selectors(i) for i in protocol_for("JAW", created=CREATED).ImageSetsSequence)
    assert sorted(pano) == [0x00080060, 0x00180015] and list(pano[0x00080060].SelectorCSValue) == ["PX", "DX"]


def test_bilateral_protocol_selects_laterality():
    p = protocol_for("PELVIS", bilateral=True, created=CREATED)
    labels = [d.DisplaySetLabel for d in p.DisplaySetsSequence if d.DisplaySetLabel.startswith("current")]
    # The pelvis AP shows both hips and is not split; the Lauenstein is, right first.
    assert labels == [
        "current pelvis_ap",
        "current oblique_view_of_Lauenstein R",
        "current oblique_view_of_Lauenstein L",
    ]
    side = [
        s.SelectorCSValue
        for item in p.ImageSetsSequence
        for s in item.ImageSetSelectorSequence
        if int(s.SelectorAttribute) == 0x00200062
    ]
    assert side == ["R", "L"]


@needs("dciodvfy")
def test_every_protocol_passes_dciodvfy(tmp_path):
    protocols = generic_protocols(version="1") + [
        protocol_for("CHEST", ["chest_pa_ap", "chest_lateral"], priors=0, version="1"),
        protocol_for("KNEE", ["knee_ap"], bilateral=True, version="1"),
    ]
    paths = write_protocols(tmp_path, protocols)
    assert len(paths) == len(protocols) == len({p.name for p in paths})
    errors = {p.name: peers.dciodvfy(p) for p in paths}
    assert errors == {p.name: [] for p in paths}
    assert len(write_protocols(tmp_path / "default")) == len(generic_protocols())


# --- from the store, through the CLI ------------------------------------------------


def _stored_study(s, uid: str, date: str, patient: str, views: list[tuple[str, str | None]]) -> None:  # type: ignore[no-untyped-def]
    from pydicom.uid import generate_uid

    from nnrouter.core.store import Instance, InstanceState, Prediction, Series, Study

    study = Study(study_uid=uid, study_date=date, patient_id=patient, accession_number=uid[-6:])
    series = Series(study=study, series_uid=generate_uid(), modality="DX")
    s.add_all([study, series])
    for n, (label, side) in enumerate(views, 1):
        inst = Instance(
            series=series,
            sop_instance_uid=generate_uid(),
            sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            path="/nonexistent",
            size_bytes=1,
            sha256=f"{n}",
            state=InstanceState.CLASSIFIED,
            instance_number=str(n),
            image_laterality=side,
        )
        s.add(inst)
        s.add(
            Prediction(
                instance=inst,
                model_name="test",
                model_version="1",
                provider="CPU",
                label=label,
                score=0.97,
                top5=[[label, 0.97]],
                decode_ms=1,
                preprocess_ms=1,
                infer_ms=1,
            )
        )


def test_hang_cli_picks_the_patients_own_prior(node_factory):
    import json

    from nnrouter.core.store import Store

    node = node_factory()
    node.write_config()
    node.cli("db", "upgrade")
    store = Store(node.db_url)
    with store.write() as s:
        _stored_study(s, "1.2.3.1", "20261127", "P1", [("knee_lateral", "L"), ("knee_ap", "L")])
        _stored_study(s, "1.2.3.2", "20250101", "P1", [("knee_ap", "L")])  # the prior
        _stored_study(s, "1.2.3.3", "20260601", "P1", [("chest_pa_ap", None)])  # newer, other body part
        _stored_study(s, "1.2.3.4", "20261001", "P2", [("knee_ap", "L")])  # newer knee, another patient
    store.dispose()
    out = json.loads(node.cli("hang", "1.2.3.1").stdout)
    assert out["prior"]["study_uid"] == "1.2.3.2"
    current = [d for d in out["display_sets"] if d["study"] == "current"]
    assert [d["label"] for d in current] == ["knee_ap", "knee_lateral"]  # frontal first
    assert [d["study"] for d in out["display_sets"]].count("prior") == 1
    assert node.cli("hang", "9.9.9", check=False).returncode == 1


def test_hang_protocols_are_written_and_stored_at_a_pacs(tmp_path, node_factory):
    """The generic protocols are stored to a configured destination (here another nnrouter: DCMTK's
    storescp and Orthanc 1.10 refuse the Hanging Protocol Storage SOP class)."""
    import subprocess
    import sys

    import yaml

    from nnrouter.core.store import Instance, Store

    pacs = node_factory("pacs", ae_title="PACS").start()
    pacs.aet = pacs.ae_title
    try:
        rules_file = tmp_path / "rules.yaml"
        rules_file.write_text(
            yaml.safe_dump(
                {
                    "destinations": [{"name": "pacs", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.port}],
                    "rules": [{"name": "all", "then": {"forward": ["pacs"]}}],
                }
            )
        )
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "nnrouter",
                "hang-protocols",
                "--out",
                str(tmp_path / "hp"),
                "--send",
                "pacs",
                "--rules",
                str(rules_file),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert res.returncode == 0, res.stderr
        written = sorted((tmp_path / "hp").glob("*.dcm"))
        assert len(written) == len(hanging.generic_protocols())
        assert f"stored {len(written)} of {len(written)}" in res.stdout
        store = Store(pacs.db_url)
        with store.read() as s:
            stored = [c for (c,) in s.query(Instance.sop_class_uid).all()]
        store.dispose()
        assert stored == [hanging.HANGING_PROTOCOL_STORAGE] * len(written)
    finally:
        pacs.stop()
