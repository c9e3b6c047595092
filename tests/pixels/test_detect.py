"""Detection decoding: pure numpy checks, then end to end through Model.detect.

The end-to-end graphs ignore their pixels and emit constant tensors of known
boxes, so every expected box below is worked out by hand from the letterbox.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from nnrouter.pixels.detect import (
    Detection,
    Letterbox,
    decode_darknet,
    decode_ultralytics,
    nms,
)
from nnrouter.pixels.modelcard import ModelCard, write_card
from nnrouter.pixels.runtime import Model

REGIONS = ["HEAD", "SPINE", "CHEST", "ABDOMEN", "PELVIS"]
HEAD, SPINE, CHEST, ABDOMEN, PELVIS = range(5)
NET = (320, 320)

# Boxes in network-input pixels: (cx, cy, w, h), class, score.
BOXES = [
    ((100, 160, 40, 80), CHEST, 0.9),  # A: kept
    ((104, 160, 40, 80), CHEST, 0.8),  # B: IoU 0.82 with A, same class -> suppressed
    ((100, 160, 40, 80), SPINE, 0.7),  # C: same place as A, other class -> kept
    ((200, 200, 30, 30), HEAD, 0.2),  # D: below conf 0.25 -> dropped
    ((250, 90, 40, 40), CHEST, 0.6),  # E: reaches into the top border -> clipped
    ((116, 160, 40, 80), CHEST, 0.5),  # F: IoU 0.43 with A -> kept
    ((300, 300, 10, 10), ABDOMEN, 0.25),  # G: exactly at the threshold -> dropped
]


def class_scores() -> np.ndarray:
    s = np.full((len(BOXES), len(REGIONS)), 0.01, dtype=np.float32)
    for i, (_, c, p) in enumerate(BOXES):
        s[i, c] = p
    return s


def ultralytics_pred() -> np.ndarray:
    xywh = np.array([b for b, _, _ in BOXES], dtype=np.float32)
    return np.concatenate([xywh, class_scores()], axis=1).T[None]  # [1, 4+nc, N]


def darknet_pair() -> tuple[np.ndarray, np.ndarray]:
    xywh = np.array([b for b, _, _ in BOXES], dtype=np.float32)
    xyxy = np.concatenate([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], axis=1)
    xyxy /= np.array([NET[1], NET[0], NET[1], NET[0]], dtype=np.float32)
    return xyxy[None, :, None, :], class_scores()[None]


# A 200 x 400 (H x W) image letterboxed into 320 x 320: scale 0.8, 80 rows of padding on top.
WIDE = Letterbox(0.8, 0.8, 0.0, 80.0, 400, 200)
WIDE_EXPECTED = [
    ("CHEST", 0.9, (100.0, 50.0, 150.0, 150.0)),
    ("SPINE", 0.7, (100.0, 50.0, 150.0, 150.0)),
    ("CHEST", 0.6, (287.5, 0.0, 337.5, 37.5)),
    ("CHEST", 0.5, (120.0, 50.0, 170.0, 150.0)),
]
# A 400 x 200 image: scale 0.8, 80 columns of padding on the left.
TALL = Letterbox(0.8, 0.8, 80.0, 0.0, 200, 400)
TALL_EXPECTED = [
    ("CHEST", 0.9, (0.0, 150.0, 50.0, 250.0)),
    ("SPINE", 0.7, (0.0, 150.0, 50.0, 250.0)),
    ("CHEST", 0.6, (187.5, 87.5, 200.0, 137.5)),  # x2 clipped to the width
    ("CHEST", 0.5, (20.0, 150.0, 70.0, 250.0)),
]


def assert_dets(got: list[Detection], expected) -> None:
    assert [(d.label, round(d.score, 5)) for d in got] == [(lab, s) for lab, s, _ in expected]
    for d, (_, _, box) in zip(got, expected):
        assert d.box == pytest.approx(box, abs=1e-3)


# --- pure decoding ---------------------------------------------------------------


def test_ultralytics_threshold_nms_and_unmap():
    (dets,) = decode_ultralytics(ultralytics_pred(), REGIONS, 0.25, 0.45, letterboxes=[WIDE])
    assert_dets(dets, WIDE_EXPECTED)
    assert all(isinstance(v, float) for d in dets for v in (d.score, *d.box))


def test_darknet_threshold_nms_and_unmap():
    boxes, confs = darknet_pair()
    (dets,) = decode_darknet(boxes, confs, REGIONS, 0.25, 0.45, input_size=NET, letterboxes=[TALL])
    assert_dets(dets, TALL_EXPECTED)


def test_without_letterbox_boxes_stay_in_network_pixels():
    (dets,) = decode_ultralytics(ultralytics_pred(), REGIONS, 0.25, 0.45)
    assert dets[0].box == pytest.approx((80.0, 120.0, 120.0, 200.0))
    assert dets[2].box == pytest.approx((230.0, 70.0, 270.0, 110.0))  # not clipped


def test_darknet_fractions_scale_by_width_and_height():
    boxes = np.array([[[[0.5, 0.25, 0.75, 0.5]]]], dtype=np.float32)
    confs = np.array([[[0.0, 0.0, 0.9, 0.0, 0.0]]], dtype=np.float32)
    (dets,) = decode_darknet(boxes, confs, REGIONS, 0.25, 0.45, input_size=(100, 200))
    assert dets == [Detection("CHEST", pytest.approx(0.9), (100.0, 25.0, 150.0, 50.0))]


def test_both_layouts_agree():
    boxes, confs = darknet_pair()
    a = decode_ultralytics(ultralytics_pred(), REGIONS, 0.1, 0.5, letterboxes=[WIDE])
    b = decode_darknet(boxes, confs, REGIONS, 0.1, 0.5, input_size=NET, letterboxes=[WIDE])
    assert [(d.label, d.score) for d in a[0]] == [(d.label, d.score) for d in b[0]]
    for x, y in zip(a[0], b[0]):
        assert x.box == pytest.approx(y.box, abs=1e-3)


def test_thresholds_come_from_the_caller():
    # Lower conf keeps D and G; a loose IoU keeps B too.
    (dets,) = decode_ultralytics(ultralytics_pred(), REGIONS, 0.1, 0.9)
    assert sorted(d.score for d in dets) == pytest.approx([0.2, 0.25, 0.5, 0.6, 0.7, 0.8, 0.9])
    (dets,) = decode_ultralytics(ultralytics_pred(), REGIONS, 0.95, 0.45)
    assert dets == []


def test_max_detections():
    (dets,) = decode_ultralytics(ultralytics_pred(), REGIONS, 0.1, 0.9, max_detections=2)
    assert [d.score for d in dets] == pytest.approx([0.9, 0.8])


def test_boxes_wholly_in_the_padding_are_dropped():
    # TALL has 80 columns of padding on the left: a box in them is no part of the image,
    # and it must not take a max_detections slot from a real one.
    pred = np.zeros((1, 4 + len(REGIONS), 2), dtype=np.float32)
    pred[0, :4, 0] = (40, 160, 40, 80)  # x 20..60 in network pixels: all padding
    pred[0, :4, 1] = (160, 160, 40, 80)  # in the image
    pred[0, 4 + CHEST] = (0.9, 0.8)
    (dets,) = decode_ultralytics(pred, REGIONS, 0.25, 0.45, letterboxes=[TALL], max_detections=1)
    assert [(d.label, round(d.score, 5)) for d in dets] == [("CHEST", 0.8)]
    assert dets[0].box == pytest.approx((75.0, 150.0, 125.0, 250.0))  # (140 - 80) / 0.8 .. (180 - 80) / 0.8


def test_stretch_unmap_uses_both_scales():
    lb = Letterbox(0.5, 2.0, 0.0, 0.0, 1000, 1000)
    out = lb.unmap(np.array([[10.0, 10.0, 20.0, 40.0]]))
    np.testing.assert_allclose(out, [[20.0, 5.0, 40.0, 20.0]])


def test_nms_keeps_best_of_a_cluster():
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [50, 50, 60, 60]], dtype=np.float64)
    keep = nms(boxes, np.array([0.5, 0.9, 0.7]), 0.5)
    assert keep.tolist() == [1, 2]


@pytest.mark.parametrize(
    "call",
    [
        lambda: decode_ultralytics(np.zeros((1, 8, 3)), REGIONS, 0.25, 0.45),
        lambda: decode_darknet(np.zeros((1, 3, 1, 4)), np.zeros((1, 3, 4)), REGIONS, 0.25, 0.45, input_size=NET),
        lambda: decode_darknet(np.zeros((1, 3, 2, 4)), np.zeros((1, 3, 5)), REGIONS, 0.25, 0.45, input_size=NET),
    ],
    ids=["ultralytics-nc", "darknet-nc", "darknet-boxes"],
)
def test_wrong_shapes_are_refused(call):
    with pytest.raises(ValueError, match="must be"):
        call()


# --- end to end through onnxruntime ----------------------------------------------


def _batch_zero(nodes: list, rank: int) -> str:
    """A [N, 1, ...] zero tensor tied to the input's batch size, so constant outputs follow the batch."""
    nodes += [
        helper.make_node("ReduceMean", ["images"], ["m"], axes=[1, 2, 3], keepdims=0),  # [N]
        helper.make_node("Mul", ["m", "zero"], ["z"]),
        helper.make_node("Unsqueeze", ["z", f"axes{rank}"], ["zN"]),
    ]
    return "zN"


def detector(root: Path, layout: str) -> Path:
    nodes: list = []
    inits = [numpy_helper.from_array(np.zeros((), np.float32), "zero")]
    zero = _batch_zero(nodes, 0)
    if layout == "ultralytics":
        inits += [
            numpy_helper.from_array(np.array([1, 2], np.int64), "axes0"),
            numpy_helper.from_array(ultralytics_pred(), "pred"),
        ]
        nodes.append(helper.make_node("Add", ["pred", zero], ["output0"]))
        outs = [helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["N", 4 + len(REGIONS), len(BOXES)])]
        card_outputs = {"predictions": "output0"}
    else:
        boxes, confs = darknet_pair()
        inits += [
            numpy_helper.from_array(np.array([1, 2], np.int64), "axes0"),
            numpy_helper.from_array(np.array([1], np.int64), "axes1"),
            numpy_helper.from_array(boxes, "b"),
            numpy_helper.from_array(confs, "c"),
        ]
        nodes += [
            helper.make_node("Unsqueeze", [zero, "axes1"], ["zN4"]),
            helper.make_node("Add", ["b", "zN4"], ["boxes"]),
            helper.make_node("Add", ["c", zero], ["confs"]),
        ]
        outs = [
            helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["N", len(BOXES), 1, 4]),
            helper.make_tensor_value_info("confs", TensorProto.FLOAT, ["N", len(BOXES), len(REGIONS)]),
        ]
        card_outputs = {"boxes": "boxes", "confs": "confs"}
    graph = helper.make_graph(
        nodes, "detector", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, *NET])], outs, inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    blob = model.SerializeToString()
    d = root / layout
    d.mkdir()
    (d / "model.onnx").write_bytes(blob)
    card = ModelCard.model_validate(
        {
            "name": "regions",
            "task": "detect",
            "labels": REGIONS,
            "input": {
                "size": list(NET),
                "channels": 3,
                "layout": "NCHW",
                "resize": "letterbox",
                "normalisation": {"mean": [0, 0, 0], "std": [255, 255, 255]},
            },
            "input_name": "images",
            "outputs": card_outputs,
            "version": "0.1",
            "sha256": hashlib.sha256(blob).hexdigest(),
            "provenance": "constant boxes, built by the test",
            "licence": "CC0-1.0",
        }
    )
    write_card(card, d)
    return d


@pytest.mark.parametrize("layout", ["ultralytics", "darknet"])
def test_model_detect_unmaps_letterbox_per_image(tmp_path, layout):
    m = Model.load(detector(tmp_path, layout), providers=["CPUExecutionProvider"])
    wide = np.full((200, 400), 90, np.uint8)
    tall = np.full((400, 200), 90, np.uint8)
    wide_dets, tall_dets = m.detect([wide, tall])
    assert_dets(wide_dets, WIDE_EXPECTED)
    assert_dets(tall_dets, TALL_EXPECTED)
    assert m.timings.batch_size == 2
    with pytest.raises(ValueError, match="detect model, not classify"):
        m.classify([wide])
