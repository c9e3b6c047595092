"""The region detector's findings where people and rules use them: `study show`, the SR, rules, the hanging layout.

Two detectors: a toy with the shipped detector's label layout (head, spine;
chest, abdomen and pelvis not covered) that finds one spine box on any film,
for the plumbing; and the shipped ``models/nnrouter-regions``, for what a
fresh node really finds on real films. Tests of the shipped one skip, naming
it, while it is not there.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import RADIOGRAPHS, REPO, SHARED, needs, needs_shared
from dicomfiles import first_png, node_rows, png_study, wait_for
from onnx import TensorProto, helper, numpy_helper
from pixels.test_detect import _batch_zero
from pixels.test_runtime import make_model
from pydicom import dcmread

from nnrouter.core import yamlfile
from nnrouter.core.store import Outbox, OutboxState, RoutingDecision
from nnrouter.pixels.modelcard import ModelCard, load_card, write_card
from nnrouter.results import hanging
from nnrouter.results.report import PRIVATE_SCHEME
from nnrouter.routing import rules
from nnrouter.testing import peers

SHIPPED_REGIONS = REPO / "models" / "nnrouter-regions"
needs_shipped = pytest.mark.skipif(
    not (SHIPPED_REGIONS / "model.yaml").is_file(),
    reason=f"the shipped region detector {SHIPPED_REGIONS.relative_to(REPO)} (model.yaml) is not there yet",
)
REGIONS_DATA = SHARED / "data" / "regions"
NET = (320, 320)
TOY_LABELS = ["head", "spine"]
NOT_COVERED = ["chest", "abdomen", "pelvis"]
TOY_SPINE = ((160.0, 160.0, 40.0, 200.0), 0.9)  # cx, cy, w, h in network pixels; score


def toy_regions(root: Path) -> Path:
    """A detector with the shipped card's labels that finds one spine box (and no head) on whatever it is given."""
    (cx, cy, w, h), score = TOY_SPINE
    pred = np.zeros((1, 4 + len(TOY_LABELS), 2), np.float32)
    pred[0, :4, 0] = (cx, cy, w, h)
    pred[0, 4 + TOY_LABELS.index("spine"), 0] = score
    pred[0, :4, 1] = (60, 60, 20, 20)
    pred[0, 4 + TOY_LABELS.index("head"), 1] = 0.05  # below any threshold: no head
    nodes: list = []
    zero = _batch_zero(nodes, 0)
    inits = [
        numpy_helper.from_array(np.zeros((), np.float32), "zero"),
        numpy_helper.from_array(np.array([1, 2], np.int64), "axes0"),
        numpy_helper.from_array(pred, "pred"),
    ]
    nodes.append(helper.make_node("Add", ["pred", zero], ["output0"]))
    graph = helper.make_graph(
        nodes,
        "regions_toy",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, *NET])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["N", 4 + len(TOY_LABELS), 2])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    blob = model.SerializeToString()
    d = root / "regions-toy"
    d.mkdir(parents=True)
    (d / "model.onnx").write_bytes(blob)
    write_card(
        ModelCard.model_validate(
            {
                "name": "regions-toy",
                "task": "detect",
                "labels": TOY_LABELS,
                "not_covered": NOT_COVERED,
                "input": {
                    "size": list(NET),
                    "channels": 3,
                    "layout": "NCHW",
                    "resize": "letterbox",
                    "normalisation": {"mean": [0, 0, 0], "std": [255, 255, 255]},
                },
                "input_name": "images",
                "outputs": {"predictions": "output0"},
                "version": "0.1",
                "sha256": hashlib.sha256(blob).hexdigest(),
                "provenance": "one constant spine box, built by the test",
                "licence": "CC0-1.0",
            }
        ),
        d,
    )
    return d


# --- rules: a region the detector cannot answer is refused when the rules load ----


RULES = """\
destinations:
  - {name: spine_ws, ae_title: SPINE, host: 127.0.0.1, port: 11112}
rules:
  - name: spine_found
    when: {region: {label: SPINE, min_score: 0.5}}
    then: {forward: spine_ws}
  - name: no_chest
    when:
      all:
        - {modality: [DX]}
        - not: {region: {label: Chest}}
    then: {forward: spine_ws}
  - name: typo
    when: {region: {label: spin}}
    then: {forward: spine_ws}
"""


def _lines(text: str, needle: str) -> int:
    return next(i for i, t in enumerate(text.splitlines(), 1) if needle in t)


def test_region_conditions_are_checked_against_the_detector(tmp_path):
    path = tmp_path / "routes.yaml"
    path.write_text(RULES)
    assert len(rules.load_rules(path).rules) == 3  # without a detector nothing is said about regions

    detector = rules.detector_regions(toy_regions(tmp_path))
    assert detector == rules.DetectorRegions("regions-toy 0.1", tuple(TOY_LABELS), tuple(NOT_COVERED))
    with pytest.raises(yamlfile.FileProblems) as exc:
        rules.load_rules(path, detector=detector)
    problems = {p.field: p for p in exc.value.problems}
    assert set(problems) == {"rules[1].when.all[1].not.region.label", "rules[2].when.region.label"}
    chest, typo = problems["rules[1].when.all[1].not.region.label"], problems["rules[2].when.region.label"]
    assert chest.line == _lines(RULES, "label: Chest") and typo.line == _lines(RULES, "label: spin")
    assert "not_covered" in chest.reason and "can never match" in chest.reason and "regions-toy 0.1" in chest.reason
    assert "did you mean spine?" in typo.reason and "head, spine" in typo.reason

    # No detector configured: every region condition is said to be unanswerable, and a `present: false` always true.
    path.write_text(RULES.replace("label: Chest", "label: Chest, present: false"))
    with pytest.raises(yamlfile.FileProblems) as exc:
        rules.load_rules(path, detector=rules.DetectorRegions(None))
    assert len(exc.value.problems) == 3
    assert all("no detector is configured" in p.reason for p in exc.value.problems)
    assert "always matches" in next(p.reason for p in exc.value.problems if "Chest" in p.reason)


def test_region_condition_matches_the_detectors_lowercase_labels_in_any_case(tmp_path):
    rs = rules.RuleSet.model_validate(
        {
            "destinations": [{"name": "a", "ae_title": "A", "host": "h", "port": 1}],
            "rules": [
                {"name": "spine", "when": {"region": {"label": "SPINE", "min_score": 0.5}}, "then": {"forward": "a"}}
            ],
        }
    )

    def routed(*found: tuple[str, float]) -> bool:
        inst = rules.InstanceFacts("1.2", {}, "DX", "unknown", 0.1, regions=found)
        facts = rules.StudyFacts("1", (inst,), frozenset(), frozenset(), frozenset(), now=dt.datetime.now())
        return bool(rules.decide(rs, facts).deliveries)

    assert routed(("spine", 0.7)) and routed(("Spine", 0.5))
    assert not routed(("spine", 0.49)) and not routed(("head", 0.9)) and not routed()


def test_rules_check_and_the_router_refuse_an_unanswerable_region(tmp_path):
    from sqlalchemy import select

    from nnrouter.core.config import load
    from nnrouter.core.store import RulesLoad, Store
    from nnrouter.routing.router import Router

    path = tmp_path / "routes.yaml"
    path.write_text(RULES)
    cfg = tmp_path / "nnrouter.yaml"
    db = f"sqlite:///{tmp_path / 'nnrouter.db'}"
    cfg.write_text(
        yaml.safe_dump(
            {
                "models": {"classifier": None, "detector": str(toy_regions(tmp_path))},
                "database": {"url": db},
                "routing": {"rules": str(path)},
            }
        )
    )

    def check() -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "nnrouter", "rules", "check", str(path), "--config", str(cfg)],
            check=False,
            capture_output=True,
            text=True,
            timeout=120,
        )

    res = check()
    assert res.returncode == 1, res.stdout
    assert f"routes.yaml:{_lines(RULES, 'label: Chest')}:" in res.stderr and "does not cover chest" in res.stderr
    assert "2 problem(s)" in res.stderr

    # The load path: the router keeps no rules rather than rules that can never fire, and says why.
    settings = load(cfg)
    store = Store(db)
    try:
        store.upgrade()
        router = Router(settings, store)
        assert not router.reload() and router.loaded is None
        with store.read() as s:
            (row,) = s.execute(select(RulesLoad)).scalars().all()
        assert not row.ok and "does not cover chest" in row.errors and "did you mean spine?" in row.errors
        fixed = RULES.replace("label: Chest", "label: head").replace("label: spin}", "label: Spine}")
        path.write_text(fixed)
        assert router.reload() and len(router.loaded.ruleset.rules) == 3
    finally:
        store.dispose()
    res = check()
    assert res.returncode == 0 and "regions checked against detector regions-toy 0.1" in res.stdout, res.stderr


# --- the hanging layout: said of the unclassified set, never used to move an image ----


def test_unclassified_set_says_what_the_detector_found_and_keeps_its_images():
    s = hanging.StudyViews(
        "1",
        "20240501",
        images=(
            hanging.ImageView("pa", label="chest_pa_ap", score=0.9, regions=(("spine", 0.8),)),
            hanging.ImageView("u1", label=hanging.UNKNOWN, score=0.2, regions=(("spine", 0.91), ("spine", 0.4))),
            hanging.ImageView("u2", label=hanging.UNKNOWN, score=0.3),
        ),
    )
    lay = hanging.layout(s)
    assert lay.protocol == "XR CHEST"
    chest, unknown = lay.display_sets
    assert chest.images == ("pa",) and "detector" not in chest.reason
    assert unknown.label == hanging.UNKNOWN and unknown.images == ("u1", "u2")
    assert unknown.reason.endswith("; the region detector found spine on 1 of 2 (best 0.91)")
    plain = hanging.layout(hanging.StudyViews("1", "20240501", images=(hanging.ImageView("u", label=hanging.UNKNOWN),)))
    assert "detector" not in plain.display_sets[0].reason


# --- end to end: a real film through a node --------------------------------------


def _files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file()) if folder.exists() else []


def _region_groups(sr) -> list:  # type: ignore[no-untyped-def]
    """(finding type code, referenced SOP Instance UID, polyline points) of each TID 1410 group in an SR."""
    out = []
    for item in sr.ContentSequence:
        if item.ConceptNameCodeSequence[0].CodeMeaning != "Imaging Measurements":
            continue
        for group in item.ContentSequence:
            finding = scoord = None
            for c in group.ContentSequence:
                name = c.ConceptNameCodeSequence[0].CodeMeaning
                if name == "Finding" and c.ValueType == "CODE":
                    finding = c.ConceptCodeSequence[0]
                if c.ValueType == "SCOORD":
                    scoord = c
            if scoord is not None:
                ref = scoord.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                out.append((finding, str(ref), np.asarray(scoord.GraphicData, float).reshape(-1, 2)))
    return out


def _films(tmp_path: Path, names: list[str]) -> dict[str, Path]:
    """Real films as a modality would send them, each its own study, body part left empty as many do."""
    pngs = {
        "spine": first_png("whole_spine_ap"),
        "knee": first_png("knee_ap"),
        "head": REGIONS_DATA / "images" / "vpouramin__hamedan_001.png",
    }
    return {n: png_study(pngs[n], tmp_path / f"{n}.dcm", modality="DX", description=f"XR {n}") for n in names}


@needs("storescu", "storescp", "dciodvfy")
@needs_shared
@pytest.mark.parametrize("which", ["toy", pytest.param("shipped", marks=needs_shipped)])
def test_a_film_routed_by_a_region_rule_with_the_region_in_its_sr(node_factory, tmp_path, which):
    if not RADIOGRAPHS.is_dir():
        pytest.skip(f"{RADIOGRAPHS} is absent (present in CI)")
    models = tmp_path / "models"
    models.mkdir()
    # A classifier that knows none of these films: the detector is what routes them.
    classifier = make_model(models, unknown_threshold=1.0, scores_are="logits")
    scps = {n: peers.StoreSCP(tmp_path / n, aet=n.upper()).start() for n in ("spine_ws", "head_ws", "other")}
    try:
        detector = toy_regions(models) if which == "toy" else SHIPPED_REGIONS
        # The detector's own operating point (chosen on its validation split), as an admin would start.
        at = load_card(detector).conf_threshold
        rules_file = tmp_path / "routes.yaml"
        rules_file.write_text(
            yaml.safe_dump(
                {
                    "settings": {"quiet_s": 1},
                    "destinations": [
                        {"name": n, "ae_title": s.aet, "host": "127.0.0.1", "port": s.port} for n, s in scps.items()
                    ],
                    "rules": [
                        {
                            "name": "spine",
                            "when": {"region": {"label": "SPINE", "min_score": at}},
                            "then": {"forward": ["spine_ws"], "report": True},
                            "continue": True,
                        },
                        {
                            "name": "head",
                            "when": {"region": {"label": "HEAD", "min_score": at}},
                            "then": {"forward": ["head_ws"]},
                        },
                        {"name": "rest", "fallback": True, "then": {"forward": ["other"]}},
                    ],
                }
            )
        )
        # (test_shipped_detector_is_the_default checks that the shipped one is what a fresh config runs.)
        model_settings = {"classifier": str(classifier), "detector": str(detector)}
        node = node_factory(
            settings={
                "models": model_settings,
                "workers": {"count": 1, "max_wait_ms": 0, "poll_ms": 100},
                "routing": {"rules": str(rules_file), "tick_s": 0.3},
            }
        ).start()
        films = _films(tmp_path, ["spine"] if which == "toy" else ["spine", "knee", "head"])
        expected = {"spine": "spine_ws", "knee": "other", "head": "head_ws"}
        res = peers.storescu(node.port, list(films.values()))
        assert res.stderr.count("Received Store Response (Success)") == len(films), res.stderr[-2000:]
        uid = {n: str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for n, f in films.items()}

        def arrived() -> dict[str, set[str]]:
            out: dict[str, set[str]] = {}
            for name, scp in scps.items():
                for f in _files(scp.folder):
                    ds = dcmread(f, stop_before_pixels=True)
                    out.setdefault(name, set()).add(str(ds.SOPInstanceUID) if ds.Modality != "SR" else "SR")
            return out

        want = {d: {uid[n] for n in films if expected[n] == d} for d in {expected[n] for n in films}}
        want["spine_ws"] = want.get("spine_ws", set()) | {"SR"}

        def delivered() -> bool | list:
            sent = node_rows(node, Outbox)
            done = len(node_rows(node, RoutingDecision)) == len(films) and all(
                o.state == OutboxState.SENT for o in sent
            )
            return (done and bool(sent)) or [(o.destination, o.state, o.last_error) for o in sent]

        wait_for(delivered, timeout=180)
        time.sleep(1.0)
        assert arrived() == want

        # The SR that went with the spine film carries its spine box as a TID 1410 group, and is valid.
        (sr_file,) = [
            f for f in _files(scps["spine_ws"].folder) if dcmread(f, stop_before_pixels=True).Modality == "SR"
        ]
        assert peers.dciodvfy(sr_file) == []
        sr = dcmread(sr_file)
        film = dcmread(films["spine"], stop_before_pixels=True)
        groups = [(f, ref, pts) for f, ref, pts in _region_groups(sr) if ref == uid["spine"]]
        assert [(f.CodeValue.casefold(), f.CodingSchemeDesignator) for f, _, _ in groups] == [("spine", PRIVATE_SCHEME)]
        ((_, _, pts),) = groups
        assert len(pts) == 5 and (pts[0] == pts[-1]).all()
        assert (
            0 <= pts[:, 0].min() < pts[:, 0].max() <= film.Columns
            and 0 <= pts[:, 1].min() < pts[:, 1].max() <= film.Rows
        )

        # study show: the boxes in pixels, and what the detector does not cover.
        show = json.loads(node.cli("study", "show", str(film.StudyInstanceUID), "--json").stdout)
        assert sorted(s.casefold() for s in show["detector"]["not_covered"]) == sorted(NOT_COVERED)
        assert sorted(s.casefold() for s in show["detector"]["labels"]) == TOY_LABELS
        (inst,) = [i for se in show["series"] for i in se["instances"] if i["sop_instance_uid"] == uid["spine"]]
        (det,) = [d for d in inst["detections"] if d["label"].casefold() == "spine"]
        assert np.allclose(
            det["box_px"], [pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max(), pts[:, 1].max()], atol=0.01
        )
        text = node.cli("study", "show", str(film.StudyInstanceUID)).stdout
        box = ", ".join(f"{v:.0f}" for v in det["box_px"])
        assert f"region {det['label']} {det['score']:.2f} box [{box}] px" in text
        missing = ", ".join(show["detector"]["not_covered"])
        assert f"does not cover {missing}: no box there says nothing about them" in text

        # The hanging layout keeps the unclassified film apart and says the detector found a spine on it.
        lay = json.loads(node.cli("hang", str(film.StudyInstanceUID)).stdout)
        (only,) = lay["display_sets"]
        assert only["label"] == "unknown" and "the region detector found spine on 1 of 1" in only["reason"]
        if which == "shipped":
            knee = dcmread(films["knee"], stop_before_pixels=True)
            knee_show = json.loads(node.cli("study", "show", str(knee.StudyInstanceUID), "--json").stdout)
            assert [d for se in knee_show["series"] for i in se["instances"] for d in i["detections"]] == []
            assert "regions: none found by" in node.cli("study", "show", str(knee.StudyInstanceUID)).stdout
    finally:
        for s in scps.values():
            s.stop()


# --- the shipped detector on real films --------------------------------------------


@needs_shipped
def test_shipped_detector_is_the_default():
    from nnrouter.core.config import load

    assert load(None).models.detector.resolve() == SHIPPED_REGIONS.resolve()  # what a fresh `make serve` runs with


def _decoded(png: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    """A PNG as the worker sees it: wrapped as the modality would send it, then decoded by nnrouter."""
    from nnrouter.pixels.decode import decode_file

    return decode_file(str(png_study(png, tmp_path / f"{png.stem}.dcm", modality="DX")), max_side=1024)


def _annotated(label: str) -> dict[str, list[float]]:
    with open(REGIONS_DATA / "regions.csv", newline="") as f:
        return {
            str((REGIONS_DATA / r["file"]).resolve()): [float(r[k]) for k in ("x0", "y0", "x1", "y1")]
            for r in csv.DictReader(f)
            if r["label"] == label
        }


def _iou(a: list[float], b: list[float]) -> float:
    iw, ih = max(0.0, min(a[2], b[2]) - max(a[0], b[0])), max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@needs_shared
@needs_shipped
@pytest.mark.parametrize(
    "label, films, found",
    [
        ("spine", lambda: sorted((RADIOGRAPHS / "whole_spine_ap").glob("*.png"))[-3:], "spine"),
        ("head", lambda: sorted((REGIONS_DATA / "images").glob("vpouramin__*.png"))[-3:], "head"),
        ("knee", lambda: sorted((RADIOGRAPHS / "knee_ap").glob("*.png"))[:3], None),
    ],
)
def test_shipped_detector_on_real_films(tmp_path, label, films, found):
    from nnrouter.pixels.runtime import Model

    model = Model.load(SHIPPED_REGIONS, providers=["CPUExecutionProvider"])
    assert sorted(s.casefold() for s in model.card.labels) == TOY_LABELS
    assert sorted(s.casefold() for s in model.card.not_covered) == sorted(NOT_COVERED)
    boxes = _annotated(found) if found else {}
    for png in films():
        d = _decoded(png, tmp_path)
        (dets,) = model.detect([d.image])
        labels = [x.label.casefold() for x in dets]
        if found is None:
            assert labels == [], (png.name, dets)
            continue
        assert found in labels and all(x.score >= model.card.conf_threshold for x in dets), (png.name, dets)
        best = max((x for x in dets if x.label.casefold() == found), key=lambda x: x.score)
        truth = boxes.get(str(png.resolve()))
        if truth is not None:  # the annotated box, in the decoded image's pixels
            h, w = d.image.shape
            sx, sy = w / d.columns, h / d.rows
            assert _iou(list(best.box), [truth[0] * sx, truth[1] * sy, truth[2] * sx, truth[3] * sy]) > 0.5, png.name
