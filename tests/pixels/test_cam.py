"""add_cam_output on a hand-built classifier whose maps numpy can compute on its own.

The classifier is 1x1 conv + ReLU -> global average pool -> MatMul + bias ->
Softmax, so features, logits and maps all have closed forms here.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from nnrouter.pixels.cam import add_cam_output

RNG = np.random.default_rng(11)
H, W_, CIN, C, K = 5, 7, 3, 8, 6  # H != W so a swapped axis shows
CONV_W = RNG.normal(size=(CIN, C)).astype(np.float32)
CONV_B = RNG.normal(size=(C,)).astype(np.float32) * 0.1
FC_W = RNG.normal(size=(C, K)) * 2
# ReLU features are all positive: centred rows stop one class from winning on every input.
FC_W = (FC_W - FC_W.mean(axis=1, keepdims=True)).astype(np.float32)
FC_B = RNG.normal(size=(K,)).astype(np.float32)
CPU = ["CPUExecutionProvider"]


def classifier(layout: str, opset: int = 17) -> onnx.ModelProto:
    """[N, ...] image -> softmax 'scores'; the map's source is 'features' in ``layout``."""
    inits = [
        numpy_helper.from_array(CONV_W.T[:, :, None, None].copy(), "conv_w"),  # [C, CIN, 1, 1]
        numpy_helper.from_array(CONV_B, "conv_b"),
        numpy_helper.from_array(FC_W, "fc_w"),
        numpy_helper.from_array(FC_B, "fc_b"),
    ]
    if layout == "NCHW":
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", CIN, H, W_])
        nodes = [
            helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["pre"]),
            helper.make_node("Relu", ["pre"], ["features"]),
            helper.make_node("GlobalAveragePool", ["features"], ["pooled"]),
        ]
    else:
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", H, W_, CIN])
        nodes = [
            helper.make_node("Transpose", ["x"], ["x_nchw"], perm=[0, 3, 1, 2]),
            helper.make_node("Conv", ["x_nchw", "conv_w", "conv_b"], ["pre"]),
            helper.make_node("Relu", ["pre"], ["f_nchw"]),
            helper.make_node("Transpose", ["f_nchw"], ["features"], perm=[0, 2, 3, 1]),
            helper.make_node("GlobalAveragePool", ["f_nchw"], ["pooled"]),
        ]
    nodes += [
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "fc_w"], ["mm"]),
        helper.make_node("Add", ["mm", "fc_b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["scores"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny", [x], [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", K])], inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def reference(x_nhwc: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(logits, top class, map of the top class) per sample, in float64."""
    f = np.maximum(x_nhwc.astype(np.float64) @ CONV_W + CONV_B, 0.0)  # [N, H, W, C]
    logits = f.mean(axis=(1, 2)) @ FC_W + FC_B
    top = logits.argmax(axis=1)
    maps = np.einsum("nhwc,nc->nhw", f, FC_W.T[top].astype(np.float64))
    return logits, top, maps


def images(n: int) -> np.ndarray:
    """``n`` samples whose top classes are not all the same, so a shared argmax would show."""
    rng = np.random.default_rng(3)
    for _ in range(100):
        # A per-sample colour plus noise: pooling averages the noise away, the colour decides the class.
        x = (rng.normal(size=(n, 1, 1, CIN)) * 3 + rng.normal(size=(n, H, W_, CIN))).astype(np.float32)
        if n == 1 or len(set(reference(x)[1])) > 1:
            return x
    raise AssertionError("no inputs with distinct top classes found")


def run(model: onnx.ModelProto, x_nhwc: np.ndarray, layout: str) -> tuple[np.ndarray, np.ndarray]:
    x = x_nhwc if layout == "NHWC" else np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))
    sess = ort.InferenceSession(model.SerializeToString(), providers=CPU)
    scores, cam = sess.run(["scores", "cam"], {"x": x})
    return scores, cam


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("n", [1, 3])
def test_map_of_each_samples_top_class(layout: str, n: int) -> None:
    model = add_cam_output(classifier(layout), "features", "fc_w", "scores", layout=layout)
    x = images(n)
    logits, top, want = reference(x)
    scores, cam = run(model, x, layout)

    assert cam.shape == (n, H, W_)
    assert list(scores.argmax(axis=1)) == list(top)
    np.testing.assert_allclose(cam, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    # The defining property: the map's mean is the top logit less its bias.
    np.testing.assert_allclose(cam.mean(axis=(1, 2)), logits[np.arange(n), top] - FC_B[top], rtol=1e-5, atol=1e-5)


def test_samples_with_different_top_classes_get_different_maps() -> None:
    model = add_cam_output(classifier("NHWC"), "features", "fc_w", "scores", layout="NHWC")
    x = images(3)
    _, top, _ = reference(x)
    _, cam = run(model, x, "NHWC")
    assert len(set(top)) > 1
    for i in range(3):
        # Each sample's map is its own top class's map, not another sample's class applied to all.
        f = np.maximum(x[i].astype(np.float64) @ CONV_W + CONV_B, 0.0)
        for k in set(top) - {top[i]}:
            assert not np.allclose(cam[i], f @ FC_W[:, k], rtol=1e-3, atol=1e-3)


def test_old_opsets_get_reduce_sum_axes_as_attribute() -> None:
    model = add_cam_output(classifier("NCHW", opset=11), "features", "fc_w", "scores", layout="NCHW")
    x = images(3)
    _, _, want = reference(x)
    _, cam = run(model, x, "NCHW")
    np.testing.assert_allclose(cam, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_output_declares_the_feature_maps_spatial_dims() -> None:
    model = add_cam_output(classifier("NCHW"), "features", "fc_w", "scores", layout="NCHW")
    (cam,) = [o for o in model.graph.output if o.name == "cam"]
    dims = cam.type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["N", H, W_]
    assert cam.type.tensor_type.elem_type == TensorProto.FLOAT


def test_input_model_is_left_alone() -> None:
    model = classifier("NHWC")
    before = model.SerializeToString()
    add_cam_output(model, "features", "fc_w", "scores", layout="NHWC", output_name="explain")
    assert model.SerializeToString() == before


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"features": "nope"}, "features tensor 'nope'"),
        ({"weight": "nope"}, "weight tensor 'nope'"),
        ({"scores": "nope"}, "scores tensor 'nope'"),
        ({"output_name": "logits"}, "already used"),
        ({"layout": "HWC"}, "layout"),
    ],
)
def test_refuses_what_it_cannot_wire(kwargs: dict, message: str) -> None:
    args = {"features": "features", "weight": "fc_w", "scores": "scores", "layout": "NHWC"} | kwargs
    with pytest.raises(ValueError, match=message):
        add_cam_output(classifier("NHWC"), **args)
