"""The class table is package data; these checks catch a broken copy or a bad edit."""

from __future__ import annotations

import dataclasses
import re

import pytest

from nnrouter.core.codes import Code, ViewClass, classes, nncpr_labels, sct_meaning


def test_thirty_classes_and_our_own():
    cs = classes()
    assert sum(c.nncpr for c in cs.values()) == 30
    assert [n for n, c in cs.items() if not c.nncpr] == ["whole_spine_ap"]
    assert all(isinstance(c, ViewClass) and c.name == name for name, c in cs.items())


def test_whole_spine_survey_codes():
    c = classes()["whole_spine_ap"]
    assert (c.body_part_examined, c.view_position) == ("SPINE", "AP")
    assert c.view_code == Code("399348003", "SCT", "antero-posterior")
    assert c.anatomy_code == Code("421060004", "SCT")
    assert sct_meaning(c.anatomy_code.value) == "Spine"  # the CID 4031 entry for SPINE
    assert c.order_codes == ()  # no LOINC code verified; the note says so


def test_chest_lateral():
    c = classes()["chest_lateral"]
    assert c.body_part_examined == "CHEST"
    assert c.view_position == "LL"
    assert c.view_code == Code("399173006", "SCT", "left lateral")
    assert c.anatomy_code == Code("816094009", "SCT")
    assert c.order_codes == (Code("30737-1", "LN"),)


def test_space_separated_loinc_lists():
    assert [o.value for o in classes()["chest_pa_ap"].order_codes] == ["24648-8", "36572-6", "36643-5"]


def test_panoramic_has_no_view_code():
    c = classes()["panoramic_radiograph"]
    assert c.view_code is None and c.view_position == ""
    assert c.body_part_examined == "JAW"


def test_meaning_keeps_asides_apart():
    lld = classes()["abdomen_left_lateral_decubitus"]
    assert lld.view_code.meaning == "antero-posterior"
    assert lld.view_remark == "patient position 102536004 left lateral decubitus"
    patella = classes()["patella_axial"]
    assert patella.view_code.meaning == "axial"
    assert "399284007" in patella.view_remark
    assert classes()["shoulder_outlet"].view_code.meaning == "Neer (outlet)"


def test_codes_are_well_formed():
    for c in classes().values():
        assert c.body_part_examined and c.body_part_examined.isupper()
        assert c.view_position in {"", "AP", "PA", "LL", "RL", "LLD"}
        assert re.fullmatch(r"\d{6,18}", c.anatomy_code.value), c.name
        if c.view_code is not None:
            assert re.fullmatch(r"\d{6,18}", c.view_code.value) and c.view_code.meaning, c.name
        assert (c.order_codes or not c.nncpr) and all(re.fullmatch(r"\d{4,5}-\d", o.value) for o in c.order_codes), (
            c.name
        )


def test_nncpr_order():
    labels = nncpr_labels()
    assert len(labels) == 30 == len(set(labels))
    assert set(labels) <= set(classes())
    assert labels[:3] == ["abdomen_ap", "abdomen_left_lateral_decubitus", "pelvis_ap"]
    assert labels[-1] == "chest_pa_ap"


def test_callers_cannot_change_the_table():
    cs = classes()
    cs.pop("chest_lateral")
    nncpr_labels().clear()
    assert "chest_lateral" in classes() and len(nncpr_labels()) == 30
    with pytest.raises(dataclasses.FrozenInstanceError):
        classes()["knee_ap"].body_part_examined = "ELBOW"  # type: ignore[misc]
