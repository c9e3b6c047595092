"""The runtime against small ONNX graphs whose answers are known in closed form.

The test classifier is GlobalAveragePool -> MatMul -> Add (-> Softmax): for a
uniform grey image of value v its logits are pooled(v/255) @ W + b, which the
tests compute independently of the code under test.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import structlog
from onnx import TensorProto, helper, numpy_helper

from nnrouter.pixels.detect import Letterbox
from nnrouter.pixels.modelcard import ModelCard, ModelCardError, write_card
from nnrouter.pixels.runtime import Classification, Model

LABELS = ["chest_pa_ap", "chest_lateral", "pelvis_ap", "knee_ap", "hand_ap", "foot_ap", "skull"]
RNG = np.random.default_rng(7)
W = RNG.normal(size=(3, len(LABELS))).astype(np.float32) * 3
B = RNG.normal(size=(len(LABELS),)).astype(np.float32)
# Per-channel normalisation chosen so the three channels differ: u, u - 1, 2u with u = pixel / 255.
MEAN = [0.0, 255.0, 0.0]
STD = [255.0, 255.0, 127.5]
SIZE = (24, 32)  # H, W: not square, so a swapped axis shows
CPU = ["CPUExecutionProvider"]


def pooled(u: float, channels: int = 3) -> np.ndarray:
    return np.array([u, u - 1.0, 2.0 * u][:channels], dtype=np.float64)


def logits(u: float, channels: int = 3) -> np.ndarray:
    return pooled(u, channels) @ W[:channels].astype(np.float64) + B


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def classifier_graph(*, layout: str, channels: int, size, softmax_out: bool, cam: bool, batch) -> onnx.ModelProto:
    h, w = size
    shape = [batch, channels, h, w] if layout == "NCHW" else [batch, h, w, channels]
    nodes, inits = (
        [],
        [
            numpy_helper.from_array(W[:channels], "W"),
            numpy_helper.from_array(B, "B"),
        ],
    )
    x = "input"
    if layout == "NHWC":
        nodes.append(helper.make_node("Transpose", ["input"], ["nchw"], perm=[0, 3, 1, 2]))
        x = "nchw"
    nodes += [
        helper.make_node("GlobalAveragePool", [x], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "W"], ["mm"]),
        helper.make_node("Add", ["mm", "B"], ["logits"]),
    ]
    out_scores = "logits"
    if softmax_out:
        nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=1))
        out_scores = "probs"
    outputs = [helper.make_tensor_value_info(out_scores, TensorProto.FLOAT, [batch, len(LABELS)])]
    if cam:
        nodes.append(helper.make_node("ReduceMean", [x], ["cam"], axes=[1], keepdims=0))
        outputs.append(helper.make_tensor_value_info("cam", TensorProto.FLOAT, [batch, h, w]))
    graph = helper.make_graph(
        nodes, "classifier", [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)], outputs, inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def make_model(
    root: Path,
    *,
    layout="NCHW",
    channels=3,
    size=SIZE,
    graph_size=None,
    scores_are="logits",
    temperature=1.0,
    cam=False,
    batch="N",
    resize="stretch",
    pad_value=114,
    unknown_threshold=None,
    **card_over,
) -> Path:
    d = root / f"m{len(list(root.iterdir()))}"
    d.mkdir()
    graph = classifier_graph(
        layout=layout,
        channels=channels,
        size=graph_size or size,
        softmax_out=scores_are == "probabilities",
        cam=cam,
        batch=batch,
    )
    blob = graph.SerializeToString()
    (d / "model.onnx").write_bytes(blob)
    outputs = {"scores": "probs" if scores_are == "probabilities" else "logits"}
    if cam:
        outputs["cam"] = "cam"
    card = {
        "name": "toy",
        "task": "classify",
        "labels": LABELS,
        "input": {
            "size": list(size),
            "channels": channels,
            "layout": layout,
            "resize": resize,
            "pad_value": pad_value,
            "normalisation": {"mean": MEAN[:channels], "std": STD[:channels]},
        },
        "input_name": "input",
        "outputs": outputs,
        "scores_are": scores_are,
        "version": "0.0.1",
        "sha256": hashlib.sha256(blob).hexdigest(),
        "provenance": "built by the test",
        "licence": "CC0-1.0",
        "temperature": temperature,
        "unknown_threshold": unknown_threshold,
    }
    card.update(card_over)
    write_card(ModelCard.model_validate(card), d)
    return d


def grey(h: int, w: int, v: int) -> np.ndarray:
    return np.full((h, w), v, dtype=np.uint8)


def check(result: Classification, expected_probs: np.ndarray, threshold=None) -> None:
    order = np.argsort(-expected_probs, kind="stable")[:5]
    assert [lab for lab, _ in result.top] == [LABELS[i] for i in order]
    assert [s for _, s in result.top] == pytest.approx(expected_probs[order], abs=1e-5)
    assert result.score == pytest.approx(expected_probs[order[0]], abs=1e-5)
    assert result.label == LABELS[order[0]]


# --- preprocessing ---------------------------------------------------------------


def test_preprocess_stretch_nchw(tmp_path):
    m = Model.load(make_model(tmp_path), providers=CPU)
    x, boxes = m.preprocess([grey(30, 50, 51)])
    assert x.shape == (1, 3, 24, 32) and x.dtype == np.float32 and x.flags.c_contiguous
    np.testing.assert_allclose(x[0, 0], 0.2, atol=1e-6)
    np.testing.assert_allclose(x[0, 1], -0.8, atol=1e-6)
    np.testing.assert_allclose(x[0, 2], 0.4, atol=1e-6)
    assert boxes == [Letterbox(32 / 50, 24 / 30, 0.0, 0.0, 50, 30)]


def test_preprocess_nhwc_is_nchw_transposed(tmp_path):
    nchw = Model.load(make_model(tmp_path), providers=CPU)
    nhwc = Model.load(make_model(tmp_path, layout="NHWC"), providers=CPU)
    imgs = [RNG.integers(0, 256, size=(300, 200), dtype=np.uint8) for _ in range(2)]
    a, _ = nchw.preprocess(imgs)
    b, _ = nhwc.preprocess(imgs)
    assert b.shape == (2, 24, 32, 3)
    np.testing.assert_array_equal(np.transpose(b, (0, 3, 1, 2)), a)


def test_preprocess_one_channel(tmp_path):
    m = Model.load(make_model(tmp_path, channels=1), providers=CPU)
    x, _ = m.preprocess([grey(24, 32, 255)])
    assert x.shape == (1, 1, 24, 32)
    np.testing.assert_allclose(x, 1.0)


def test_preprocess_letterbox_wide_image(tmp_path):
    m = Model.load(make_model(tmp_path, resize="letterbox"), providers=CPU)
    x, boxes = m.preprocess([grey(20, 64, 255)])
    # scale 0.5 -> 32 x 10 content, (24 - 10) // 2 = 7 rows of padding on top, 7 below.
    assert boxes == [Letterbox(0.5, 0.5, 0.0, 7.0, 64, 20)]
    u = x[0, 0] * 255.0
    np.testing.assert_allclose(u[:7], 114, atol=1e-4)
    np.testing.assert_allclose(u[7:17], 255, atol=1e-4)
    np.testing.assert_allclose(u[17:], 114, atol=1e-4)


def test_preprocess_letterbox_tall_image_pad_zero(tmp_path):
    m = Model.load(make_model(tmp_path, resize="letterbox", pad_value=0), providers=CPU)
    x, boxes = m.preprocess([grey(60, 10, 200)])
    # scale 0.4 -> 4 x 24 content, (32 - 4) // 2 = 14 columns of padding left.
    assert boxes == [Letterbox(0.4, 0.4, 14.0, 0.0, 10, 60)]
    u = np.rint(x[0, 0] * 255.0)
    assert (u[:, :14] == 0).all() and (u[:, 14:18] == 200).all() and (u[:, 18:] == 0).all()


@pytest.mark.parametrize(
    "bad",
    [np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint16), np.zeros((0, 8), np.uint8)],
    ids=["rgb", "uint16", "empty"],
)
def test_preprocess_refuses_what_decode_does_not_produce(tmp_path, bad):
    m = Model.load(make_model(tmp_path), providers=CPU)
    with pytest.raises(ValueError, match="image 1: expected a non-empty 2-D uint8"):
        m.preprocess([grey(8, 8, 1), bad])


# --- classification --------------------------------------------------------------


@pytest.mark.parametrize(
    ("scores_are", "temperature"),
    [("logits", 1.0), ("logits", 2.5), ("probabilities", 1.0), ("probabilities", 2.5)],
)
def test_classify_top5_and_temperature(tmp_path, scores_are, temperature):
    m = Model.load(make_model(tmp_path, scores_are=scores_are, temperature=temperature), providers=CPU)
    (r,) = m.classify([grey(40, 40, 153)])
    assert len(r.top) == 5
    assert [s for _, s in r.top] == sorted((s for _, s in r.top), reverse=True)
    # Temperature divides logits whatever form the model emits its scores in.
    check(r, softmax(logits(153 / 255) / temperature))
    assert r.cam is None


def test_temperature_changes_scores_not_order(tmp_path):
    cold = Model.load(make_model(tmp_path), providers=CPU).classify([grey(8, 8, 90)])[0]
    warm = Model.load(make_model(tmp_path, temperature=3.0), providers=CPU).classify([grey(8, 8, 90)])[0]
    assert [lab for lab, _ in cold.top] == [lab for lab, _ in warm.top]
    assert warm.score < cold.score


def test_unknown_threshold(tmp_path):
    p = softmax(logits(100 / 255))
    best = float(p.max())
    above = Model.load(make_model(tmp_path, unknown_threshold=best + 0.01), providers=CPU)
    below = Model.load(make_model(tmp_path, unknown_threshold=best - 0.01), providers=CPU)
    (r,) = above.classify([grey(10, 10, 100)])
    assert r.label == "unknown"
    assert r.top[0][0] == LABELS[int(p.argmax())]  # the evidence is still there
    assert r.score == pytest.approx(best, abs=1e-5)
    assert below.classify([grey(10, 10, 100)])[0].label == LABELS[int(p.argmax())]


@pytest.mark.parametrize("n", [1, 16])
def test_dynamic_batch(tmp_path, n):
    m = Model.load(make_model(tmp_path), providers=CPU)
    values = [int(v) for v in np.linspace(0, 255, n)]
    imgs = [grey(20 + 3 * i, 50 - i, v) for i, v in enumerate(values)]
    results = m.classify(imgs)
    assert len(results) == n
    for r, v in zip(results, values):
        check(r, softmax(logits(v / 255)))
    assert m.timings is not None and m.timings.batch_size == n
    assert m.timings.preprocess_ms >= 0 and m.timings.infer_ms > 0 and m.timings.postprocess_ms >= 0


def test_fixed_batch_export_is_fed_in_chunks(tmp_path):
    m = Model.load(make_model(tmp_path, batch=2), providers=CPU)
    values = [10, 130, 250]
    results = m.classify([grey(16, 16, v) for v in values])
    for r, v in zip(results, values):
        check(r, softmax(logits(v / 255)))


def test_nhwc_model_gives_same_answer(tmp_path):
    img = RNG.integers(0, 256, size=(77, 41), dtype=np.uint8)
    a = Model.load(make_model(tmp_path), providers=CPU).classify([img])[0]
    b = Model.load(make_model(tmp_path, layout="NHWC"), providers=CPU).classify([img])[0]
    assert [lab for lab, _ in a.top] == [lab for lab, _ in b.top]
    assert [s for _, s in a.top] == pytest.approx([s for _, s in b.top], abs=1e-6)


def test_letterbox_classify_sees_the_padding(tmp_path):
    m = Model.load(make_model(tmp_path, resize="letterbox"), providers=CPU)
    (r,) = m.classify([grey(20, 64, 255)])
    u = (255 * 10 + 114 * 14) / 24 / 255  # 10 content rows of 255, 14 pad rows of 114
    check(r, softmax(logits(u)))


def test_one_channel_classify(tmp_path):
    m = Model.load(make_model(tmp_path, channels=1), providers=CPU)
    (r,) = m.classify([grey(24, 32, 200)])
    check(r, softmax(logits(200 / 255, channels=1)))


def test_cam_covers_the_image_not_the_padding(tmp_path):
    m = Model.load(make_model(tmp_path, cam=True, resize="letterbox"), providers=CPU)
    ramp = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (20, 1))  # 20 x 64, brighter to the right
    r, s = m.classify([ramp, grey(24, 32, 7)])
    assert r.cam.dtype == np.float32 and r.cam.shape == (10, 32)  # the 7-row borders are cropped
    assert r.cam.min() == 0.0 and r.cam.max() == 1.0
    assert (np.diff(r.cam.mean(axis=0)) > 0).all()
    assert s.cam.shape == (24, 32) and not s.cam.any()  # a flat map has no hot spot


def test_cam_stretch_keeps_full_map(tmp_path):
    m = Model.load(make_model(tmp_path, cam=True), providers=CPU)
    (r,) = m.classify([RNG.integers(0, 256, size=(50, 70), dtype=np.uint8)])
    assert r.cam.shape == SIZE
    assert r.cam.min() >= 0.0 and r.cam.max() <= 1.0


def test_empty_batch(tmp_path):
    assert Model.load(make_model(tmp_path), providers=CPU).classify([]) == []


def test_classify_model_refuses_detect(tmp_path):
    m = Model.load(make_model(tmp_path), providers=CPU)
    with pytest.raises(ValueError, match="classify model, not detect"):
        m.detect([grey(8, 8, 0)])


# --- loading ---------------------------------------------------------------------


def test_sha256_mismatch_is_refused(tmp_path):
    d = make_model(tmp_path)
    blob = classifier_graph(layout="NHWC", channels=3, size=SIZE, softmax_out=False, cam=False, batch="N")
    (d / "model.onnx").write_bytes(blob.SerializeToString())
    with pytest.raises(
        ModelCardError, match=r"model\.onnx sha256 is [0-9a-f]{64}, card says [0-9a-f]{64}: refusing to load"
    ):
        Model.load(d, providers=CPU)


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"graph_size": (32, 32)}, "input"),
        ({"input_name": "images"}, "input_name"),
        ({"outputs": {"scores": "output0"}}, "outputs.scores"),
    ],
)
def test_card_that_does_not_fit_the_graph_is_refused(tmp_path, over, field):
    d = make_model(tmp_path, **over)
    with pytest.raises(ModelCardError, match=rf"model\.yaml: {field}: "):
        Model.load(d, providers=CPU)


def test_bad_card_is_refused_before_the_weights(tmp_path):
    d = make_model(tmp_path)
    (d / "model.yaml").write_text((d / "model.yaml").read_text().replace("layout: NCHW", "layout: CHW"))
    with pytest.raises(ModelCardError, match=r"model\.yaml:\d+:\d+: input\.layout: "):
        Model.load(d)


def test_unavailable_provider_is_refused(tmp_path):
    with pytest.raises(ValueError, match="none of the providers"):
        Model.load(make_model(tmp_path), providers=["NoSuchExecutionProvider"])


def test_threads_option(tmp_path):
    m = Model.load(make_model(tmp_path), providers=CPU, intra_op_threads=1)
    check(m.classify([grey(4, 4, 0)])[0], softmax(logits(0.0)))


def _cuda_usable() -> bool:
    return shutil.which("nvidia-smi") is not None and "CUDAExecutionProvider" in ort.get_available_providers()


def test_provider_is_logged_as_actually_used(tmp_path):
    with structlog.testing.capture_logs() as logs:
        m = Model.load(make_model(tmp_path))
    (line,) = [e for e in logs if e["event"] == "model_loaded"]
    assert line["log_level"] == "info"
    assert line["provider"] == m.provider
    assert (line["model"], line["version"]) == ("toy", "0.0.1")
    assert line["sha256"] == m.card.sha256
    if shutil.which("nvidia-smi") is None:
        # CUDA may be listed by this wheel yet unusable here: the log must say CPU, not what was asked.
        assert m.provider == "CPUExecutionProvider"


def test_cpu_on_request(tmp_path):
    with structlog.testing.capture_logs() as logs:
        m = Model.load(make_model(tmp_path), providers=CPU)
    assert m.provider == "CPUExecutionProvider"
    assert [e["provider"] for e in logs if e["event"] == "model_loaded"] == ["CPUExecutionProvider"]


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_usable(), reason="needs nvidia-smi and onnxruntime's CUDAExecutionProvider")
def test_cuda_is_used_when_present(tmp_path):
    with structlog.testing.capture_logs() as logs:
        m = Model.load(make_model(tmp_path))
    assert m.provider == "CUDAExecutionProvider", "CUDA listed and a GPU present, yet the session fell back"
    assert [e["provider"] for e in logs if e["event"] == "model_loaded"] == ["CUDAExecutionProvider"]
    check(m.classify([grey(30, 30, 77)])[0], softmax(logits(77 / 255)))
