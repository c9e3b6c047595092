"""Routing rules: validation an admin can act on, and decisions that say why."""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
from datetime import datetime

import pytest
import yaml
from conftest import REPO, needs
from pydantic import ValidationError
from pydicom import Dataset

from nnrouter.core.yamlfile import FileProblems
from nnrouter.routing import rules
from nnrouter.routing.rules import (
    Coerce,
    Destination,
    InstanceFacts,
    RetryPolicy,
    RuleSet,
    StudyFacts,
    TimeWindow,
)

SEED = REPO / "rules" / "examples" / "seed.yaml"
WED_10 = datetime(2024, 5, 15, 10, 0)  # a Wednesday morning, naive = local time
_uids = itertools.count(1)


def inst(
    label: str | None = None,
    score: float | None = None,
    modality: str | None = "CR",
    regions: tuple[tuple[str, float], ...] = (),
    **header,
) -> InstanceFacts:  # type: ignore[no-untyped-def]
    return InstanceFacts(
        sop_instance_uid=f"1.2.3.{next(_uids)}",
        header=header,
        modality=modality,
        label=label,
        score=score,
        regions=regions,
    )


def study(*instances: InstanceFacts, calling=(), called=(), mismatches=(), now=WED_10) -> StudyFacts:  # type: ignore[no-untyped-def]
    return StudyFacts(
        study_uid="1.2.3",
        instances=instances,
        calling_aes=frozenset(calling),
        called_aes=frozenset(called),
        mismatches=frozenset(mismatches),
        now=now,
    )


def ruleset(*rule_list: dict, dests=("a", "b", "c")) -> RuleSet:  # type: ignore[no-untyped-def]
    return RuleSet.model_validate(
        {
            "destinations": [{"name": d, "ae_title": d.upper(), "host": "127.0.0.1", "port": 104} for d in dests],
            "rules": list(rule_list),
        }
    )


def sent(decision: rules.Decision) -> list[str]:
    return [d.destination for d in decision.deliveries]


def matched(decision: rules.Decision) -> list[str]:
    return [o.rule for o in decision.outcomes if o.matched]


# --- validation ------------------------------------------------------------


def test_seed_example_loads():
    rs = rules.load_rules(SEED)
    assert {d.name: d.ae_title for d in rs.destinations} == {
        "pacs": "ORTHANC",
        "lines_tubes_ai": "LINES_AI",
        "bone_health_ai": "BONE_AI",
        "qa": "QA_WS",
    }
    assert (rs.destination("pacs").host, rs.destination("pacs").port) == ("127.0.0.1", 4242)
    assert sum(r.fallback for r in rs.rules) == 1
    with pytest.raises(KeyError):
        rs.destination("nowhere")


BAD = """\
destinations:
  - name: pacs
    ae_title: ORTHANC
    host: 127.0.0.1
    port: 70000
    retyr: {max_retries: 3}
rules:
  - name: chest
    when:
      tag: {keyword: BodyPartExamine, equals: CHEST}
    then:
      forward: [pacs, lines_ai]
  - name: regex
    when:
      tag: {keyword: StudyDescription, regex: "([a-z"}
    then: {forward: [pacs]}
  - name: klass
    when:
      predicted: {class: chest_pa}
    then: {forward: [pacs]}
  - name: last
    fallback: true
    then: {forward: [pacs]}
  - name: last2
    fallback: true
    then: {foward: [pacs]}
  - name: two
    when: {modality: CR, calling_ae: X}
    then: {forward: pacs, coerce: {set: {BodyPart: CHEST}}}
  - name: chest
    then: {forward: [pacs]}
"""


def test_every_problem_is_located(tmp_path):
    path = tmp_path / "routes.yaml"
    path.write_text(BAD)
    with pytest.raises(FileProblems) as info:
        rules.load_rules(path)
    got = [(p.line, p.column, p.field) for p in info.value.problems]
    assert got == [
        (5, 5, "destinations[0].port"),
        (6, 5, "destinations[0].retyr"),
        (10, 13, "rules[0].when.tag.keyword"),
        (12, 23, "rules[0].then.forward[1]"),
        (15, 40, "rules[1].when.tag.regex"),
        (19, 19, "rules[2].when.predicted.class"),
        (25, 5, "rules[4].fallback"),
        (26, 12, "rules[4].then.foward"),
        (28, 5, "rules[5].when"),
        (29, 42, "rules[5].then.coerce.set.BodyPart"),
        (30, 5, "rules[6].name"),
    ]
    text = str(info.value)
    assert f"{path}:5:5: destinations[0].port: " in text and "65535" in text
    assert "unknown field" in text and "retyr" in text
    assert "did you mean BodyPartExamined" in text
    assert "unknown destination 'lines_ai'" in text
    assert "not a valid regular expression" in text
    assert "unknown class 'chest_pa' (did you mean chest_pa_ap?)" in text
    assert "second fallback" in text and "duplicate rule name 'chest'" in text
    assert "exactly one condition" in text


def test_yaml_syntax_error_is_located(tmp_path):
    path = tmp_path / "routes.yaml"
    path.write_text("destinations: []\nrules:\n  - name: x\n    then: {forward: [a]\n")
    with pytest.raises(FileProblems) as info:
        rules.load_rules(path)
    (p,) = info.value.problems
    assert p.line == 5 and "not valid YAML" in p.reason


@pytest.mark.parametrize(
    "snippet, field, reason",
    [
        ("when: {tag: {keyword: Rows, equals: 1, gt: 2}}", "rules[0].when.tag", "give one test"),
        ("when: {tag: {keyword: PixelData, exists: true}}", "rules[0].when.tag.keyword", "OB or OW attribute"),
        ("when: {tag: {keyword: PatientSex, equals: NO}}", "rules[0].when.tag.equals", "quotes"),
        ("when: {predicted: {class: unknown}}", "rules[0].when.predicted.class", "use the `unknown` condition"),
        ("when: {all: []}", "rules[0].when.all", "at least 1"),
        ("when: {mismatch: []}", "rules[0].when.mismatch", '"any" or a list'),
        ("when: {time: {start: '8:00'}}", "rules[0].when.time.start", "pattern"),
        ("when: {time: {start: '08:00', end: '08:00'}}", "rules[0].when.time", "equal"),
        ("then: {forward: [a], discard: true}", "rules[0].then", "discard cannot go with"),
        ("then: {coerce: {fill_from_prediction: true}, hold: true}", "rules[0].then", "give forward too"),
        ("then: {}", "rules[0].then", "does nothing"),
        ("then: {forward: [a], coerce: {set: {Rows: abc}}}", "rules[0].then.coerce.set", "not one"),
        ("fallback: true\n    when: {modality: CR}", "rules[0].when", "no `when`"),
    ],
)
def test_rule_problems(tmp_path, snippet, field, reason):
    then = "" if "then:" in snippet else "\n    then: {forward: [a]}"
    path = tmp_path / "r.yaml"
    path.write_text(
        f"destinations:\n  - {{name: a, ae_title: A, host: h, port: 104}}\nrules:\n  - name: r\n    {snippet}{then}\n"
    )
    with pytest.raises(FileProblems) as info:
        rules.load_rules(path)
    assert [(p.field, reason in p.reason) for p in info.value.problems] == [(field, True)], str(info.value)
    assert all(p.line is not None for p in info.value.problems)


@pytest.mark.parametrize(
    "dest, field, reason",
    [
        ({"tls": {"enabled": True}}, "destinations[0].tls", "needs `ca`"),
        ({"tls": {"enabled": True, "ca": "/ca.pem", "cert": "/c.pem"}}, "destinations[0].tls", "together"),
        ({"ae_title": "A_TITLE_THAT_IS_TOO_LONG"}, "destinations[0].ae_title", "1 to 16"),
        ({"name": "has space"}, "destinations[0].name", "pattern"),
        ({"transfer_syntaxes": ["1.2.840.10008.1.2.1", "explicit"]}, "destinations[0].transfer_syntaxes", "not a UID"),
        ({"max_associations": 0}, "destinations[0].max_associations", "greater than or equal to 1"),
        ({"windows": [{"days": ["mon", "fry"]}]}, "destinations[0].windows[0].days[1]", "'mon'"),
    ],
)
def test_destination_problems(tmp_path, dest, field, reason):
    path = tmp_path / "r.yaml"
    data = {
        "destinations": [{"name": "a", "ae_title": "A", "host": "h", "port": 104, **dest}],
        "rules": [{"name": "r", "then": {"forward": [dest.get("name", "a")]}}],
    }
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(FileProblems) as info:
        rules.load_rules(path)
    assert [(p.field, reason in p.reason) for p in info.value.problems] == [(field, True)], str(info.value)


def test_cross_checks_also_hold_without_a_file():
    with pytest.raises(ValidationError, match="unknown destination 'nowhere'"):
        ruleset({"name": "r", "then": {"forward": ["nowhere"]}})
    with pytest.raises(ValidationError, match="duplicate destination name"):
        ruleset({"name": "r", "then": {"forward": ["a"]}}, dests=("a", "a"))


def test_unquoted_times_and_capital_days_are_read_as_meant(tmp_path):
    # YAML 1.1 reads an unquoted 22:00 as the number 1320.
    path = tmp_path / "r.yaml"
    path.write_text(
        "destinations:\n  - name: a\n    ae_title: A\n    host: h\n    port: 104\n"
        "    windows: [{days: [Fri], start: 22:00, end: 06:00}]\nrules: []\n"
    )
    (w,) = rules.load_rules(path).destinations[0].windows
    assert (w.days, w.start, w.end) == (["fri"], "22:00", "06:00")


def test_json_schema_for_editors():
    schema = rules.json_schema()
    json.dumps(schema)
    assert {"destinations", "rules", "settings"} <= set(schema["properties"])
    cond = schema["$defs"]["Condition"]
    assert {"all", "any", "not", "tag", "predicted", "unknown", "region", "mismatch", "time"} <= set(cond["properties"])
    assert cond["additionalProperties"] is False
    assert "continue" in schema["$defs"]["Rule"]["properties"]
    assert "class" in schema["$defs"]["Predicted"]["properties"]


def test_digest_is_sha256_of_the_bytes():
    assert rules.digest(SEED) == hashlib.sha256(SEED.read_bytes()).hexdigest()


# --- the seed flows ---------------------------------------------------------


@pytest.fixture(scope="module")
def seed() -> RuleSet:
    return rules.load_rules(SEED)


def test_seed_chest_goes_to_lines_tubes_ai_and_pacs(seed):
    d = rules.decide(seed, study(inst("chest_pa_ap", 0.9), inst("chest_lateral", 0.8)))
    assert sent(d) == ["lines_tubes_ai", "pacs"]
    assert not d.hold and not d.discard
    pacs = d.deliveries[1]
    assert pacs.rule == "everything_to_pacs" and pacs.coerce is not None and pacs.coerce.fill_from_prediction
    assert d.deliveries[0].coerce is None
    assert matched(d) == ["chest_to_lines_tubes_ai", "everything_to_pacs"]


def test_seed_panoramic_by_prediction_or_modality(seed):
    assert sent(rules.decide(seed, study(inst("panoramic_radiograph", 0.95, modality="PX")))) == [
        "bone_health_ai",
        "pacs",
    ]
    # A dental unit's PX image reaches the bone-health AI even if the classifier is unsure.
    assert sent(rules.decide(seed, study(inst("other", 0.4, modality="PX")))) == ["bone_health_ai", "pacs"]


def test_seed_knee_goes_to_pacs_only(seed):
    d = rules.decide(seed, study(inst("knee_ap", 0.9)))
    assert sent(d) == ["pacs"]
    assert [o.rule for o in d.outcomes][-1] == "nothing_else_matched" and not d.outcomes[-1].matched


def test_seed_low_score_chest_is_not_sent_to_the_ai(seed):
    assert sent(rules.decide(seed, study(inst("chest_pa_ap", 0.3)))) == ["pacs"]


def test_seed_one_unknown_image_also_goes_to_qa(seed):
    d = rules.decide(seed, study(inst("chest_pa_ap", 0.9), inst("unknown", 0.2)))
    assert sent(d) == ["lines_tubes_ai", "qa", "pacs"]


def test_seed_mismatch_flag_goes_to_qa(seed):
    d = rules.decide(seed, study(inst("knee_ap", 0.9), mismatches={"wrong_body_part"}))
    assert sent(d) == ["qa", "pacs"]
    assert "body_part" in next(o.why for o in d.outcomes if o.rule == "unknown_or_flagged_to_qa")


def test_fallback_catches_what_nothing_matched(seed):
    data = seed.model_dump(by_alias=True)
    data["rules"] = [r for r in data["rules"] if r["name"] != "everything_to_pacs"]
    no_catch_all = RuleSet.model_validate(data)
    d = rules.decide(no_catch_all, study(inst("knee_ap", 0.9)))
    assert sent(d) == ["pacs"] and d.deliveries[0].rule == "nothing_else_matched"
    assert matched(d) == ["nothing_else_matched"]
    assert d.outcomes[-1].why == "fallback: no other rule matched"


def test_text_reports_each_rule_and_why(seed):
    d = rules.decide(seed, study(inst("chest_pa_ap", 0.9), inst("knee_ap", 0.7), inst("knee_ap", 0.8)))
    text = d.text()
    for rule in seed.rules:
        assert rule.name in text
    assert "predicted chest_pa_ap/chest_lateral >= 0.50 on 1 of 3 images (any): yes" in text
    assert "-> lines_tubes_ai (rule chest_to_lines_tubes_ai)" in text
    assert "-> pacs (rule everything_to_pacs; coerce: fill view attributes from the prediction)" in text
    assert "hold: no" in text


# --- semantics ---------------------------------------------------------------


def test_priority_then_file_order_and_stop():
    rs = ruleset(
        {"name": "late", "priority": 50, "then": {"forward": ["b"]}},
        {"name": "early", "priority": 10, "then": {"forward": ["a"]}, "continue": True},
        {"name": "same_priority_second", "priority": 50, "then": {"forward": ["c"]}},
    )
    d = rules.decide(rs, study(inst()))
    assert [o.rule for o in d.outcomes] == ["early", "late", "same_priority_second"]
    assert sent(d) == ["a", "b"]
    assert d.outcomes[2] == rules.RuleOutcome("same_priority_second", False, "not evaluated: stopped by late")
    assert "stopped by late" in d.text()


def test_first_rule_wins_a_destination():
    rs = ruleset(
        {"name": "one", "then": {"forward": ["a"], "coerce": {"set": {"InstitutionName": "X"}}}, "continue": True},
        {"name": "two", "then": {"forward": ["b", "a"], "coerce": {"fill_from_prediction": True}}},
    )
    d = rules.decide(rs, study(inst()))
    assert [(x.destination, x.rule) for x in d.deliveries] == [("a", "one"), ("b", "two")]
    assert d.deliveries[0].coerce == Coerce(set={"InstitutionName": "X"})


def test_hold_and_discard():
    rs = ruleset(
        {"name": "qa_hold", "when": {"modality": "CT"}, "then": {"forward": ["a"], "hold": True}, "continue": True},
        {
            "name": "drop_tests",
            "when": {"tag": {"keyword": "PatientID", "regex": "^TEST"}},
            "then": {"discard": True},
            "continue": True,
        },
        {"name": "all", "then": {"forward": ["b"]}},
    )
    held = rules.decide(rs, study(inst(modality="CT", PatientID="123")))
    assert (held.hold, held.hold_rules, held.discard, sent(held)) == (True, ("qa_hold",), False, ["a", "b"])
    assert "hold: yes (rule qa_hold)" in held.text()
    dropped = rules.decide(rs, study(inst(modality="CT", PatientID="TEST-1")))
    assert dropped.discard and dropped.deliveries == () and not dropped.hold
    assert "discard wins" in dropped.text() and "drop_tests" in dropped.text()


def test_predicted_of_all_and_none():
    def run(of: str, *labels: str) -> bool:
        rs = ruleset(
            {
                "name": "r",
                "when": {"predicted": {"class": "chest_pa_ap", "of": of, "min_score": 0.5}},
                "then": {"forward": ["a"]},
            }
        )
        return bool(rules.decide(rs, study(*[inst(lab, 0.9) for lab in labels])).deliveries)

    assert run("all", "chest_pa_ap", "chest_pa_ap") and not run("all", "chest_pa_ap", "knee_ap")
    assert run("none", "knee_ap") and not run("none", "knee_ap", "chest_pa_ap")
    assert run("any", "knee_ap", "chest_pa_ap") and not run("any")
    assert not run("all")  # an empty study is not "all chest"


def test_unknown_region_and_not():
    rs = ruleset(
        {"name": "all_unknown", "when": {"unknown": {"of": "all"}}, "then": {"forward": ["a"]}, "continue": True},
        {
            "name": "no_chest_region",
            "when": {"region": {"label": "chest", "min_score": 0.5, "present": False}},
            "then": {"forward": ["b"]},
            "continue": True,
        },
        {"name": "not_cr", "when": {"not": {"modality": ["CR", "DX"]}}, "then": {"forward": ["c"]}},
    )
    d = rules.decide(rs, study(inst("unknown", 0.1, regions=(("CHEST", 0.4),)), inst("unknown", 0.2, modality="MG")))
    assert sent(d) == ["a", "b"]
    d = rules.decide(rs, study(inst("knee_ap", 0.9, regions=(("CHEST", 0.6),), modality="MG")))
    assert sent(d) == ["c"]


def test_tag_conditions():
    def match(cond: dict, *instances: InstanceFacts) -> rules.RuleOutcome:
        rs = ruleset({"name": "r", "when": {"tag": cond}, "then": {"forward": ["a"]}})
        return rules.decide(rs, study(*instances)).outcomes[0]

    big, small = inst(Rows=3000, StudyDescription="CT THORAX"), inst(Rows="1024", StudyDescription="Chest")
    assert match({"keyword": "Rows", "ge": 2000}, big, small).matched
    assert not match({"keyword": "Rows", "ge": 2000, "of": "all"}, big, small).matched
    assert match({"keyword": "Rows", "gt": 1000, "lt": 2000}, small).matched  # a range
    age = match({"keyword": "PatientAge", "lt": 18}, inst(PatientAge="045Y"))
    assert not age.matched and "not a number on 1 image" in age.why and "045Y" not in age.why
    assert match({"keyword": "StudyDescription", "regex": "(?i)thorax|chest", "of": "all"}, big, small).matched
    assert not match({"keyword": "StudyDescription", "regex": "^chest$"}, big, small).matched
    assert match({"keyword": "Rows", "equals": 1024}, small).matched  # "1024" and 1024 are the same number
    assert match({"keyword": "StudyDescription", "equals": " Chest "}, small).matched
    assert match({"keyword": "StudyDescription", "in": ["Knee", "Chest"]}, small).matched
    assert match({"keyword": "BodyPartExamined", "exists": False}, inst(BodyPartExamined=" ")).matched
    assert not match({"keyword": "BodyPartExamined", "exists": True}, inst()).matched
    image_type = inst(ImageType=["ORIGINAL", "PRIMARY"])
    assert match({"keyword": "ImageType", "equals": "PRIMARY"}, image_type).matched
    assert match({"keyword": "ImageType", "equals": "ORIGINAL\\PRIMARY"}, image_type).matched
    why = match({"keyword": "Rows", "ge": 2000}, big, small).why
    assert why == "tag Rows >= 2000 on 1 of 2 images (any): yes"


def test_all_any_and_ae_titles():
    rs = ruleset(
        {
            "name": "r",
            "when": {
                "all": [
                    {"calling_ae": ["CR_ROOM1", "DX_ED"]},
                    {"any": [{"called_ae": "NNROUTER"}, {"mismatch": ["laterality_conflict"]}]},
                ]
            },
            "then": {"forward": ["a"]},
        }
    )
    assert rules.decide(rs, study(inst(), calling={"DX_ED"}, called={"NNROUTER"})).deliveries
    assert rules.decide(
        rs, study(inst(), calling={"DX_ED"}, called={"OTHER"}, mismatches={"laterality_conflict"})
    ).deliveries
    d = rules.decide(rs, study(inst(), calling={"CT_1"}, called={"NNROUTER"}))
    assert not d.deliveries
    assert "calling AE in CR_ROOM1, DX_ED (study: CT_1): no" in d.outcomes[0].why


def test_time_condition_wrapping_midnight():
    rs = ruleset(
        {
            "name": "fri_night",
            "when": {"time": {"days": ["fri"], "start": "22:00", "end": "06:00"}},
            "then": {"forward": ["a"]},
        }
    )

    def at(*when: int) -> bool:
        return bool(rules.decide(rs, study(inst(), now=datetime(*when))).deliveries)

    assert at(2024, 5, 17, 23, 0)  # Friday 23:00
    assert at(2024, 5, 18, 5, 59)  # Saturday 05:59: still Friday night
    assert not at(2024, 5, 18, 6, 0)
    assert not at(2024, 5, 18, 23, 0)  # Saturday night
    assert not at(2024, 5, 17, 5, 0)  # Friday early morning belongs to Thursday night
    assert not at(2024, 5, 17, 21, 59)


def test_time_window_and_destination_open_at():
    day = TimeWindow(days=["mon", "tue", "wed", "thu", "fri"], start="08:00", end="18:00")
    assert day.contains(WED_10) and not day.contains(datetime(2024, 5, 15, 18, 0))
    assert not day.contains(datetime(2024, 5, 18, 10, 0))  # Saturday
    assert TimeWindow(start="20:00").contains(datetime(2024, 5, 15, 23, 59))  # end defaults to 24:00
    dest = Destination(
        name="ai",
        ae_title="AI",
        host="h",
        port=104,
        windows=[TimeWindow(days=["sat", "sun"]), TimeWindow(start="20:00", end="07:00")],
    )
    assert not dest.open_at(WED_10)
    assert dest.open_at(datetime(2024, 5, 15, 21, 0)) and dest.open_at(datetime(2024, 5, 16, 6, 30))
    assert dest.open_at(datetime(2024, 5, 19, 12, 0))  # Sunday
    assert Destination(name="pacs", ae_title="P", host="h", port=104).open_at(WED_10)  # no windows: always


def test_retry_delay_grows_and_is_capped():
    r = RetryPolicy(first_delay_s=10, multiplier=2, max_delay_s=600)
    assert [r.delay(n) for n in (1, 2, 3, 4)] == [10, 20, 40, 80]
    assert r.delay(7) == 600 and r.delay(10_000) == 600
    assert RetryPolicy(first_delay_s=5, multiplier=1).delay(50) == 5


# --- coercion ------------------------------------------------------------------


def _header(**kw) -> Dataset:  # type: ignore[no-untyped-def]
    ds = Dataset()
    ds.SOPInstanceUID = "1.2.3.4"
    for k, v in kw.items():
        setattr(ds, k, v)
    return ds


def test_fill_from_prediction_fills_only_empty_attributes():
    ds = _header(BodyPartExamined="")
    assert rules.coerce(ds, Coerce(fill_from_prediction=True), "chest_pa_ap") == [
        "BodyPartExamined",
        "ViewPosition",
        "ViewCodeSequence",
    ]
    assert (ds.BodyPartExamined, ds.ViewPosition) == ("CHEST", "PA")
    (code,) = ds.ViewCodeSequence
    assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == ("272479007", "SCT", "postero-anterior")

    kept = _header(BodyPartExamined="THORAX", ViewPosition="AP")
    before = copy.deepcopy(kept)
    assert rules.coerce(kept, Coerce(fill_from_prediction=True), "chest_pa_ap") == ["ViewCodeSequence"]
    assert (kept.BodyPartExamined, kept.ViewPosition) == (before.BodyPartExamined, before.ViewPosition)


def test_fill_skips_what_a_class_lacks_and_what_is_not_a_class():
    pano = _header()
    assert rules.coerce(pano, Coerce(fill_from_prediction=True), "panoramic_radiograph") == ["BodyPartExamined"]
    assert pano.BodyPartExamined == "JAW" and "ViewPosition" not in pano and "ViewCodeSequence" not in pano
    for label in (None, "unknown", "other"):
        ds = _header()
        assert rules.coerce(ds, Coerce(fill_from_prediction=True), label) == []
        assert ds == _header()
    assert rules.coerce(_header(), Coerce(), "chest_pa_ap") == []  # not asked to fill


def test_set_converts_for_the_vr():
    ds = _header(InstitutionName="Old")
    spec = Coerce.model_validate(
        {
            "set": {
                "InstitutionName": "General Hospital",
                "Rows": 512,
                "ImageType": "DERIVED\\SECONDARY",
                "SOPInstanceUID": "1.2.3.4",
            }
        }
    )
    assert rules.coerce(ds, spec, None) == ["InstitutionName", "Rows", "ImageType"]
    assert (
        ds.InstitutionName == "General Hospital" and ds.Rows == 512 and list(ds.ImageType) == ["DERIVED", "SECONDARY"]
    )
    assert ds["Rows"].VR == "US"
    # The owner round-trips the spec through the outbox as JSON.
    assert Coerce(**json.loads(json.dumps(spec.model_dump()))) == spec


@needs("dciodvfy")
@pytest.mark.parametrize("label", ["chest_lateral", "knee_ap", "panoramic_radiograph", "hand_oblique"])
def test_coerced_copies_pass_dciodvfy(tmp_path, label):
    """A forwarded copy with view attributes filled from the prediction is still a valid DX object."""
    from nnrouter.testing import peers
    from nnrouter.testing.synthetic import DXSpec, dx_dataset

    ds = dx_dataset(DXSpec(rows=64, columns=64))
    ds.BodyPartExamined = ""
    ds.ViewPosition = ""
    del ds.ViewCodeSequence
    changed = rules.coerce(ds, rules.Coerce(fill_from_prediction=True), label)
    assert "BodyPartExamined" in changed
    out = tmp_path / "coerced.dcm"
    ds.save_as(out, enforce_file_format=True)
    assert peers.dciodvfy(out) == []


def test_rules_test_cli_on_files_sends_nothing(tmp_path):
    """The dry run groups files by study and prints each rule's verdict and the deliveries."""
    import subprocess
    import sys

    from nnrouter.testing.synthetic import write_series

    write_series(tmp_path / "in", 2, rows=32, columns=32)
    res = subprocess.run(
        [sys.executable, "-m", "nnrouter", "rules", "test", "--rules", str(SEED), str(tmp_path / "in")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("study ") == 1 and "(2 instances)" in res.stdout
    # Not classified: no chest prediction, so the chest rule does not match; the PACS still gets it.
    assert "-> pacs (rule everything_to_pacs" in res.stdout
    assert "-     chest_to_lines_tubes_ai: predicted chest_pa_ap/chest_lateral >= 0.50 on 0 of 2 images" in res.stdout
