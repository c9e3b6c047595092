"""The region detector: it learns, its ONNX says what torch says, the shipped one finds what it claims,
and the held-out-source evaluation computes what it says it does."""

from __future__ import annotations

import random
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import RADIOGRAPHS, REPO, SHARED

from nnrouter.pixels.detect import Detection, decode_ultralytics
from nnrouter.pixels.modelcard import (
    InputSpec,
    ModelCard,
    Normalisation,
    sha256_file,
    write_card,
)
from nnrouter.pixels.runtime import Model
from nnrouter.training.evaluate_detector import (
    average_precision,
    figures,
    fold_split,
    iou,
)
from nnrouter.training.train import MEAN, STD
from nnrouter.training.train_detector import (
    DetectorConfig,
    Sample,
    _load,
    bucket,
    build_bank,
    export_onnx,
    fit,
    load_samples,
    make_view,
    predict,
    torch_predictions,
    truth,
)

REGIONS_CSV = SHARED / "data" / "regions" / "regions.csv"
SHIPPED = REPO / "models" / "nnrouter-regions"
needs_regions = pytest.mark.skipif(not REGIONS_CSV.is_file(), reason=f"{REGIONS_CSV} is absent")
LABELS = ["HEAD", "SPINE"]


def few_samples(per_group: int = 3) -> list[Sample]:
    """Real boxes of each source plus a few knee films with none."""
    cfg = DetectorConfig(negatives_per_class=per_group)
    samples, _ = load_samples(REGIONS_CSV, [RADIOGRAPHS / "knee_ap"], cfg)
    picked: dict[str, list[Sample]] = {}
    for s in samples:
        if len(picked.setdefault(s.draw_group, [])) < per_group:
            picked[s.draw_group].append(s)
    return [s for group in picked.values() for s in group]


@pytest.fixture(scope="module")
def tiny():  # type: ignore[no-untyped-def]
    """A small detector trained for a few steps on real boxes at 128 px."""
    pytest.importorskip("torch", reason="the [train] extra is not installed (make test installs it)")
    cfg = DetectorConfig(size=128, epochs=8, draws_per_group=16, batch_size=16, views=2, lr=3e-3)
    samples = few_samples()
    idx = list(range(len(samples)))
    bank = build_bank(samples, LABELS, idx, cfg, log=lambda _: None)
    fitted = fit(bank, samples, LABELS, idx, [], cfg, log=lambda _: None)
    return cfg, samples, bank, fitted


@pytest.mark.slow  # shares the tiny detector's training (about 20-35 s on two busy cores)
@needs_regions
def test_training_lowers_the_loss(tiny):
    _, _, _, fitted = tiny
    total = [h["heatmap_loss"] + 5 * h["box_loss"] for h in fitted.history]
    assert total[-1] < 0.6 * total[0], total
    assert fitted.history[-1]["box_loss"] < fitted.history[0]["box_loss"]


def test_views_move_boxes_with_the_pixels():
    # The image is the box itself (white on black), so wherever the view puts the pixels, its box must be.
    # The random draws do not depend on pixel values, so this exercises the same crops, zooms and shifts.
    cfg = DetectorConfig()
    img = np.zeros((400, 170), np.uint8)
    box = np.array([[40.0, 90.0, 130.0, 360.0]])
    img[90:360, 40:130] = 255
    _, pbox, lb = make_view(img, box, cfg, None)
    assert pbox[0] == pytest.approx(box[0] * ([lb.scale_x, lb.scale_y] * 2) + [lb.pad_x, lb.pad_y] * 2)
    moved = 0
    for seed in range(30):
        canvas, b, _ = make_view(img, box, cfg, random.Random(seed))
        ys, xs = np.nonzero(canvas > 100)
        assert np.abs(np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]) - b[0]).max() <= 3, seed
        moved += bool(np.abs(b[0] - pbox[0]).max() > 3)
    assert moved >= 10  # the augmentation does move things


@pytest.mark.slow  # shares the tiny detector's training (about 20-35 s on two busy cores)
@needs_regions
def test_onnx_detections_match_torch_within_a_pixel(tiny, tmp_path):
    cfg, samples, bank, fitted = tiny
    out = tmp_path / "det"
    out.mkdir()
    export_onnx(fitted.det, out / "model.onnx", cfg.size)
    card = ModelCard(
        name="tiny",
        task="detect",
        labels=LABELS,
        input=InputSpec(
            size=(cfg.size, cfg.size),
            channels=3,
            layout="NCHW",
            resize="letterbox",
            normalisation=Normalisation(mean=[MEAN] * 3, std=[STD] * 3),
            pad_value=cfg.pad_value,
        ),
        input_name="images",
        outputs={"predictions": "predictions"},
        version="t",
        sha256=sha256_file(out / "model.onnx"),
        provenance="test",
        licence="test",
        conf_threshold=0.05,
        iou_threshold=0.45,
    )
    write_card(card, out)
    model = Model.load(out, providers=["CPUExecutionProvider"])
    # Films of every shape: tall whole-spine, narrow CADMA, near-square cephalogram, square knee.
    images = [_load(s, cfg)[0] for s in samples[::2]]
    got = model.detect(images)
    x, placed = model.preprocess(images)
    want = decode_ultralytics(torch_predictions(fitted.det, x), LABELS, 0.05, 0.45, letterboxes=placed)
    assert sum(len(d) for d in want) >= len(images)  # something to compare, on most films
    for g, w in zip(got, want):
        assert [d.label for d in g] == [d.label for d in w]
        for a, b in zip(g, w):
            assert a.score == pytest.approx(b.score, abs=1e-3)
            assert np.abs(np.array(a.box) - np.array(b.box)).max() <= 1.0
    # The bank path (frozen half cached in float16), which training and the folds use, agrees with the graph.
    (one,) = predict(fitted.det, bank, [0], LABELS, 0.05, 0.45)
    (full,) = model.detect([_load(samples[0], cfg)[0]])
    best = max(one, key=lambda d: d.score)
    match = max(full, key=lambda d: d.score)
    assert best.label == match.label and np.abs(np.array(best.box) - np.array(match.box)).max() <= 2.0


# --- the shipped detector -----------------------------------------------------------


def shipped_val_files(group: str, n: int = 2) -> list[Path]:
    """Files of ``group`` in the shipped model's validation bucket: it never trained on them."""
    cfg = DetectorConfig()
    samples, _ = load_samples(REGIONS_CSV, [], cfg)
    return [Path(s.file) for s in samples if s.group == group and bucket(s.file, cfg) == "val"][:n]


def gt_box(file: Path) -> tuple[float, ...]:
    samples, _ = load_samples(REGIONS_CSV, [], DetectorConfig())
    s = next(s for s in samples if s.file == str(file))
    return tuple(s.boxes[0][1:])


def untrained_negatives(folder: str, n: int = 3) -> list[Path]:
    """Films of a negative class that the shipped model did not see (beyond the ones it drew)."""
    cfg = DetectorConfig()
    samples, _ = load_samples(REGIONS_CSV, [RADIOGRAPHS / folder], cfg)
    seen = {s.file for s in samples if not s.boxes}
    return [p for p in sorted((RADIOGRAPHS / folder).glob("*.png")) if str(p.resolve()) not in seen][:n]


@pytest.fixture(scope="module")
def shipped() -> Model:
    if not (SHIPPED / "model.onnx").is_file():
        pytest.skip(f"{SHIPPED} is not built (make model)")
    return Model.load(SHIPPED, providers=["CPUExecutionProvider"])


def gray(p: Path) -> np.ndarray:
    return cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)


@needs_regions
@pytest.mark.parametrize("group", ["zlinzju", "Znarfran"])  # whole-spine AP (AASCE) and CADMA
def test_shipped_detector_finds_the_spine(shipped, group):
    files = shipped_val_files(group)
    assert files
    for f, dets in zip(files, shipped.detect([gray(f) for f in files])):
        spines = [d for d in dets if d.label == "SPINE"]
        assert spines, f"no spine on {f.name}"
        assert iou(spines[0].box, gt_box(f)) >= 0.5, (f.name, spines[0], gt_box(f))
        assert not [d for d in dets if d.label == "HEAD"], f"a head claimed on {f.name}"


@needs_regions
def test_shipped_detector_finds_the_head_on_a_cephalogram(shipped):
    files = shipped_val_files("vpouramin")
    for f, dets in zip(files, shipped.detect([gray(f) for f in files])):
        heads = [d for d in dets if d.label == "HEAD"]
        assert heads and iou(heads[0].box, gt_box(f)) >= 0.5, (f.name, dets)


@needs_regions
@pytest.mark.parametrize("folder", ["knee_ap", "hand_ap"])
def test_shipped_detector_finds_nothing_on_a_knee_or_a_hand(shipped, folder):
    files = untrained_negatives(folder)
    assert files
    for f, dets in zip(files, shipped.detect([gray(f) for f in files])):
        assert dets == [], f"{f.name}: {dets}"


@needs_regions
def test_shipped_card_says_what_it_does_not_cover(shipped):
    card = shipped.card
    assert card.task == "detect" and sorted(card.labels) == ["HEAD", "SPINE"]
    assert set(card.not_covered) == {"CHEST", "ABDOMEN", "PELVIS"}
    assert (SHIPPED / "model.onnx").stat().st_size <= 25 * 2**20
    assert card.metrics["reproduce"]["annotations_digest"] in card.provenance


# --- the evaluation, recomputed by hand -------------------------------------------------


def D(label: str, score: float, box: tuple[float, float, float, float]) -> Detection:
    return Detection(label, score, box)


def test_ap_and_mean_iou_by_hand():
    # Three images, one spine box each, all 10 x 10 at the origin.
    gt = (0.0, 0.0, 10.0, 10.0)
    truth_ = [[("SPINE", gt)], [("SPINE", gt)], [("SPINE", gt)], []]
    dets = [
        [D("SPINE", 0.9, (0, 0, 10, 5))],  # IoU 50/100 = 0.5: a hit (>= 0.5)
        [
            D("SPINE", 0.8, (5, 0, 15, 10)),  # IoU 50/150 = 1/3: a miss
            D("SPINE", 0.3, (0, 0, 10, 10)),
        ],  # IoU 1, but below conf 0.5: counts for AP, not for mean IoU
        [D("HEAD", 0.95, (0, 0, 10, 10))],  # another label: no spine found here
        [D("SPINE", 0.6, (0, 0, 10, 10))],  # an image without a spine: a false positive
    ]
    # Ranked: 0.9 TP, 0.8 FP, 0.6 FP, 0.3 TP -> precision 1, 1/2, 1/3, 1/2 at recall 1/3, 1/3, 1/3, 2/3.
    # Envelope: 1 up to recall 1/3, then 1/2 up to 2/3, then 0: AP = 1/3 * 1 + 1/3 * 1/2 = 0.5.
    f = figures(dets, truth_, ["SPINE", "HEAD"], conf=0.5)
    assert f["SPINE"].ap50 == pytest.approx(0.5, abs=1e-4)
    # Best IoU above conf per ground-truth box: 0.5, max(1/3) (the 0.3 box is below conf), 0 (none).
    assert f["SPINE"].mean_iou == pytest.approx((0.5 + 1 / 3 + 0) / 3, abs=1e-4)
    assert f["SPINE"].recall == pytest.approx(1 / 3, abs=1e-4)
    assert f["SPINE"].precision == pytest.approx(1 / 3, abs=1e-4)  # 3 above conf: 0.9 hit, 0.8 and 0.6 not
    assert f["SPINE"].boxes == 3
    assert f["HEAD"].boxes == 0  # no head truth: AP undefined, not zero
    assert f["HEAD"].ap50 != f["HEAD"].ap50
    # A duplicate of a matched box is a false positive (VOC), and the direct AP agrees.
    assert average_precision([0.9, 0.8], [True, False], 1) == pytest.approx(1.0)
    assert average_precision([0.9, 0.8], [False, True], 1) == pytest.approx(0.5)


def test_fold_holds_the_whole_source_out():
    cfg = DetectorConfig()
    samples = (
        [Sample(f"/d/a__{i}.png", "a", (("SPINE", 0, 0, 1, 1),)) for i in range(40)]
        + [Sample(f"/d/b__{i}.png", "b", (("SPINE", 0, 0, 1, 1),)) for i in range(40)]
        + [Sample(f"/d/h__{i}.png", "h", (("HEAD", 0, 0, 1, 1),)) for i in range(40)]
        + [Sample(f"/d/k__{i}.png", "k", ()) for i in range(40)]
    )
    split = [bucket(s.file, cfg) for s in samples]
    train, val, test = fold_split(samples, split, "a")
    assert not set(train) & set(test) and not set(val) & set(test) and not set(train) & set(val)
    assert {i for i, s in enumerate(samples) if s.group == "a"} <= set(test)
    assert all(samples[i].group != "a" for i in train + val)
    heads_test = [i for i in test if samples[i].group == "h"]
    assert heads_test and all(split[i] == "test" for i in heads_test)
    assert {samples[i].group for i in train} == {"b", "h", "k"}


@pytest.mark.slow  # shares the tiny detector's training (about 20-35 s on two busy cores)
@needs_regions
def test_truth_is_in_the_frame_predictions_are_in(tiny):
    cfg, samples, bank, _ = tiny
    (gts,) = truth(samples, bank, [0])
    img, scale = _load(samples[0], cfg)
    assert gts[0][1] == pytest.approx(tuple(v * scale for v in samples[0].boxes[0][1:]))
    assert bank.placement[0].width == img.shape[1] and bank.placement[0].height == img.shape[0]
