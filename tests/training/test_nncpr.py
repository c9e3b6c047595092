"""import_nncpr on frozen graphs shaped like the published NNCPR network.

The real ``network.pb`` cannot be downloaded here, so the tests build frozen
TensorFlow graphs with its interface the way retrain.py built it: a MobileNet v1
body (small width, seeded random weights) fed by a placeholder ``input``, an
average pool, a bottleneck PlaceholderWithDefault, ``final_retrain_ops``
MatMul + bias, and a softmax named ``final_result``, frozen with
convert_variables_to_constants. TensorFlow then serves as the reference the
converted ONNX model must reproduce on real radiographs.
"""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow", reason="the [convert] extra is not installed (make test installs it)")
pytest.importorskip("tf2onnx", reason="the [convert] extra is not installed (make test installs it)")

import onnxruntime as ort  # noqa: E402
from conftest import RADIOGRAPHS  # noqa: E402

from nnrouter.core import codes  # noqa: E402
from nnrouter.pixels import modelcard  # noqa: E402
from nnrouter.pixels.runtime import Model  # noqa: E402
from nnrouter.training.nncpr import import_nncpr  # noqa: E402

CPU = ["CPUExecutionProvider"]
N_CLASSES = 30
ALPHA = 0.25  # MobileNet width: small keeps building and converting to seconds
# MobileNet v1's 13 depthwise-separable blocks: (pointwise channels at width 1, stride).
BLOCKS = [
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (1024, 2),
    (1024, 1),
]


@dataclass(frozen=True)
class Frozen:
    path: Path
    features: str  # tensor fed to the global average pool
    logits: str  # tensor fed to the softmax
    weight: np.ndarray  # [C, 30]: the product of the head's linear layers
    bias: np.ndarray  # [30]: the head's bias, carried through its linear layers


def freeze(
    path: Path, *, body: str = "mobilenet", head: str = "retrain", batch: int | None = None, seed: int = 0
) -> Frozen:
    """Build, initialise and freeze a graph with NNCPR's interface; write it to ``path``.

    body: "mobilenet" (v1 at width ALPHA) or "tiny" (one strided conv to the same 7x7 grid).
    head: "retrain" (AvgPool, Squeeze, bottleneck PlaceholderWithDefault, MatMul + bias, as
    retrain.py on a feature vector), "imagenet" (retrain.py's older head on MobileNet's own
    1001 logits: 1x1 conv + bias, squeeze, reshape, then MatMul + bias), "mean" (Keras-style
    Mean over H, W, then MatMul + bias), or "hidden" (a ReLU layer in between: no CAM).
    """
    v1 = tf.compat.v1
    rng = np.random.default_rng(seed)
    graph = tf.Graph()
    # Batch-norm statistics and the head are fitted to these, so every layer sees unit-scale
    # activations: with made-up statistics a random net's output hardly depends on its input,
    # and agreement on near-constant outputs would prove little.
    calibration = smooth_images(rng, 6)
    to_fit: list[tuple] = []  # (tensor to standardise, its mean variable, its variance variable)

    def var(name: str, value: np.ndarray):  # type: ignore[no-untyped-def]
        # VariableV2 + read Identity, as TF 1.15 made them, so freezing leaves Const -> Identity.
        return v1.Variable(value.astype(np.float32), name=name, use_resource=False)

    def bn_relu6(h, c: int):  # type: ignore[no-untyped-def]
        with tf.name_scope("BatchNorm"):
            mean, variance = var("moving_mean", np.zeros(c)), var("moving_variance", np.ones(c))
            to_fit.append((h, mean, variance))
            h, _, _ = v1.nn.fused_batch_norm(
                h,
                var("gamma", 1 + 0.2 * rng.standard_normal(c)),
                var("beta", 0.5 + 0.2 * rng.standard_normal(c)),
                mean,
                variance,
                epsilon=1e-3,
                is_training=False,
            )
            return tf.nn.relu6(h)

    with graph.as_default():
        x = v1.placeholder(tf.float32, [batch, 224, 224, 3], name="input")
        c = int(32 * ALPHA)
        with tf.name_scope("MobilenetV1/Conv2d_0"):
            stride = 2 if body == "mobilenet" else 32
            h = tf.nn.conv2d(x, var("weights", rng.standard_normal((3, 3, 3, c)) * np.sqrt(2 / 27)), stride, "SAME")
            h = bn_relu6(h, c)
        for i, (width, stride) in enumerate(BLOCKS if body == "mobilenet" else [], 1):
            with tf.name_scope(f"MobilenetV1/Conv2d_{i}_depthwise"):
                k = var("depthwise_weights", rng.standard_normal((3, 3, c, 1)) * np.sqrt(2 / 9))
                h = bn_relu6(tf.nn.depthwise_conv2d(h, k, [1, stride, stride, 1], "SAME"), c)
            cout = int(width * ALPHA)
            with tf.name_scope(f"MobilenetV1/Conv2d_{i}_pointwise"):
                k = var("weights", rng.standard_normal((1, 1, c, cout)) * np.sqrt(2 / c))
                h = bn_relu6(tf.nn.conv2d(h, k, 1, "SAME"), cout)
            c = cout
        features = h
        assert features.shape.as_list()[1:3] == [7, 7]

        with tf.name_scope("MobilenetV1/Logits"):
            if head == "mean":
                pooled = tf.reduce_mean(features, axis=[1, 2], name="GlobalPool")
            else:
                pooled = tf.nn.avg_pool2d(features, ksize=7, strides=1, padding="VALID", name="AvgPool_1a")
            if head == "imagenet":
                pooled = tf.identity(pooled, name="Dropout_1b/Identity")
                with tf.name_scope("Conv2d_1c_1x1"):
                    k = var("weights", rng.standard_normal((1, 1, c, 1001)) / np.sqrt(c))
                    pooled = tf.nn.bias_add(
                        tf.nn.conv2d(pooled, k, 1, "SAME"), var("biases", 0.1 * rng.standard_normal(1001))
                    )
            if head != "mean":
                pooled = tf.squeeze(pooled, [1, 2], name="SpatialSqueeze")
        if head == "imagenet":
            pooled = tf.reshape(pooled, [-1, 1001], name="MobilenetV1/Predictions/Reshape")
        if head == "hidden":
            with tf.name_scope("hidden"):
                pooled = tf.nn.relu(tf.matmul(pooled, var("weights", rng.standard_normal((c, 64)) / np.sqrt(c))))
        width = pooled.shape.as_list()[-1]
        with tf.name_scope("input"):
            bottleneck = v1.placeholder_with_default(pooled, shape=[batch, width], name="BottleneckInputPlaceholder")
        with tf.name_scope("final_retrain_ops"):
            w = var("final_weights", np.zeros((width, N_CLASSES)))
            b = var("final_biases", np.zeros(N_CLASSES))
            with tf.name_scope("Wx_plus_b"):
                logits = tf.add(tf.matmul(bottleneck, w), b, name="add")
        tf.nn.softmax(logits, name="final_result")

        with v1.Session(graph=graph) as sess:
            sess.run(v1.global_variables_initializer())

            def values(t):  # type: ignore[no-untyped-def]
                return np.concatenate([sess.run(t, {x: calibration[i : i + 1]}) for i in range(len(calibration))])

            for t, mean, variance in to_fit:  # in network order, so each layer sees its fitted inputs
                v = values(t)
                mean.load(v.mean(axis=(0, 1, 2)), sess)
                spread = v.var(axis=(0, 1, 2))
                variance.load(
                    spread + 0.05 * spread.mean() + 1e-3, sess
                )  # near-constant channels would amplify rounding
            # Logits ~ N(0, 3^2) over the calibration images, so the softmax is far from flat.
            v = values(bottleneck).astype(np.float64)
            std = v.std(axis=0)
            scale = 1 / (std + 0.1 * std.mean())  # channels that hardly vary would amplify rounding
            r = rng.standard_normal((width, N_CLASSES)) * 3 / np.sqrt(width)
            w.load(scale[:, None] * r, sess)
            b.load(-(v.mean(axis=0) * scale) @ r + 0.5 * rng.standard_normal(N_CLASSES), sess)
            arrays = {g.op.name: sess.run(g) for g in v1.global_variables()}
            frozen = v1.graph_util.convert_variables_to_constants(sess, graph.as_graph_def(), ["final_result"])

    path.write_bytes(frozen.SerializeToString())
    weight, bias = arrays["final_retrain_ops/final_weights"], arrays["final_retrain_ops/final_biases"]
    if head == "imagenet":
        conv = arrays["MobilenetV1/Logits/Conv2d_1c_1x1/weights"][0, 0].astype(np.float64)
        bias = arrays["MobilenetV1/Logits/Conv2d_1c_1x1/biases"].astype(np.float64) @ weight + bias
        weight = conv @ weight
    return Frozen(path, features.name, logits.name, np.asarray(weight, np.float64), np.asarray(bias, np.float64))


def smooth_images(rng: np.random.Generator, n: int) -> np.ndarray:
    """Blurry random images on NNCPR's input scale, unrelated to the radiographs the tests compare on."""
    coarse = rng.uniform(-1, 1, (n, 6, 6, 1)).astype(np.float32)
    big = np.stack([cv2.resize(c, (224, 224), interpolation=cv2.INTER_CUBIC) for c in coarse])[..., None]
    return np.clip(np.repeat(big, 3, axis=3) + 0.05 * rng.standard_normal((n, 224, 224, 3)), -1, 1).astype(np.float32)


def run_tf(frozen: Frozen, x: np.ndarray, *fetch: str) -> list[np.ndarray]:
    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString(frozen.path.read_bytes())
    graph = tf.Graph()
    with graph.as_default():
        tf.import_graph_def(graph_def, name="")
    with tf.compat.v1.Session(graph=graph) as sess:
        return sess.run(list(fetch), {"input:0": x})


def run_onnx(model_dir: Path, x: np.ndarray, *names: str) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(model_dir / "model.onnx"), providers=CPU)
    return sess.run(list(names), {"input:0": x})


def top_class_maps(features: np.ndarray, weight: np.ndarray, top: np.ndarray) -> np.ndarray:
    return np.einsum("nhwc,nc->nhw", features.astype(np.float64), weight.T[top])


def radiographs() -> list[np.ndarray]:
    """One real radiograph per class folder of the shared data, and RG1 from pydicom-data, as 8-bit grey."""
    if not RADIOGRAPHS.is_dir():
        pytest.skip(f"{RADIOGRAPHS} is absent (it is present in CI, not on users' machines)")
    images = []
    for folder in sorted(p for p in RADIOGRAPHS.iterdir() if p.is_dir()):
        first = next(iter(sorted(folder.glob("*.png"))), None)
        if first is not None:
            img = cv2.imread(str(first), cv2.IMREAD_GRAYSCALE)
            assert img is not None, first
            images.append(img)
    import pydicom

    ds = pydicom.dcmread(str(importlib.resources.files("data_store") / "data" / "RG1_UNCI.dcm"))
    px = ds.pixel_array.astype(np.float64)
    images.append(np.round((px - px.min()) / max(px.max() - px.min(), 1) * 255).astype(np.uint8))
    assert len(images) >= 3
    return images


def nncpr_input(images: list[np.ndarray]) -> np.ndarray:
    """NNCPR's preprocessing, written out from the card's words: stretch to 224, grey to RGB, (x - 128) / 128."""
    out = []
    for img in images:
        shrink = img.shape[0] > 224 or img.shape[1] > 224
        small = cv2.resize(img, (224, 224), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        out.append(np.repeat(small.astype(np.float32)[..., None], 3, axis=2))
    return ((np.stack(out) - 128.0) / 128.0).astype(np.float32)


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Frozen, Path]:
    root = tmp_path_factory.mktemp("nncpr")
    frozen = freeze(root / "network.pb")
    return frozen, import_nncpr(frozen.path, root / "model")


def test_card_describes_the_converted_model(converted: tuple[Frozen, Path]) -> None:
    frozen, model_dir = converted
    card = modelcard.load_card(model_dir)
    assert modelcard.verify(model_dir) == card.sha256
    assert (card.name, card.version, card.task) == ("nncpr", "1.0", "classify")
    assert card.labels == codes.nncpr_labels()
    spec = card.input
    assert (spec.size, spec.channels, spec.layout, spec.resize) == ((224, 224), 3, "NHWC", "stretch")
    assert (spec.normalisation.mean, spec.normalisation.std) == ([128.0] * 3, [128.0] * 3)
    assert card.input_name == "input:0"
    assert card.outputs == {"scores": "final_result:0", "cam": "cam"}
    assert card.scores_are == "probabilities"
    assert modelcard.sha256_file(frozen.path) in card.provenance
    assert "network.pb" in card.provenance and "tf2onnx" in card.provenance and tf.__version__ in card.provenance
    assert "NNCPR authors" in card.licence
    text = " ".join(card.limitations)
    assert "90.3%" in text and "94.0%" in text and "unknown_threshold" in text
    assert card.unknown_threshold is None
    assert card.metrics["conversion_check"]["max_abs_score_diff"] <= 1e-4


def test_converted_graph_keeps_the_batch_dynamic_and_hides_the_feature_map(converted: tuple[Frozen, Path]) -> None:
    _, model_dir = converted
    sess = ort.InferenceSession(str(model_dir / "model.onnx"), providers=CPU)
    (inp,) = sess.get_inputs()
    assert inp.name == "input:0" and not isinstance(inp.shape[0], int) and inp.shape[1:] == [224, 224, 3]
    assert [o.name for o in sess.get_outputs()] == ["final_result:0", "cam"]
    for n in (1, 5):
        x = np.zeros((n, 224, 224, 3), np.float32)
        scores, cam = sess.run(None, {"input:0": x})
        assert scores.shape == (n, N_CLASSES) and cam.shape == (n, 7, 7)


def test_onnx_agrees_with_tensorflow_on_real_radiographs(converted: tuple[Frozen, Path]) -> None:
    frozen, model_dir = converted
    images = radiographs()
    x = nncpr_input(images)
    # What the runtime feeds is what the card describes, which is what was compared here.
    fed, _ = Model.load(model_dir, providers=CPU).preprocess(images)
    np.testing.assert_array_equal(fed, x)

    tf_probs, tf_logits, tf_features = run_tf(frozen, x, "final_result:0", frozen.logits, frozen.features)
    probs, cam = run_onnx(model_dir, x, "final_result:0", "cam")

    # The comparison means something only if the outputs are far from uniform.
    assert (tf_probs.max(axis=1) > 5 / N_CLASSES).all()
    assert (tf_logits.std(axis=1) > 1.0).all()
    assert np.abs(probs - tf_probs).max() < 1e-4
    # Logit-level: log-probabilities are the logits less one constant per image.
    log_tf = (
        tf_logits
        - np.log(np.exp(tf_logits - tf_logits.max(1, keepdims=True)).sum(1, keepdims=True))
        - tf_logits.max(1, keepdims=True)
    )
    log_onnx = np.log(np.clip(probs.astype(np.float64), 1e-30, None))
    keep = tf_probs > 1e-6
    assert np.abs(log_onnx - log_tf)[keep].max() < 1e-3

    top = probs.argmax(axis=1)
    assert (top == tf_probs.argmax(axis=1)).all()
    assert len(set(top)) > 1  # so each image's map must follow its own top class
    want = top_class_maps(tf_features, frozen.weight, top)
    assert (want.std(axis=(1, 2)) > 1e-3 * np.abs(want).max()).all()  # maps that vary, not constants
    np.testing.assert_allclose(cam, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    # CAM's defining property, against TensorFlow's own logits.
    rows = np.arange(len(top))
    np.testing.assert_allclose(cam.mean(axis=(1, 2)), tf_logits[rows, top] - frozen.bias[top], rtol=1e-4, atol=1e-4)


def test_runtime_classifies_with_the_converted_model(converted: tuple[Frozen, Path]) -> None:
    frozen, model_dir = converted
    images = radiographs()
    model = Model.load(model_dir, providers=CPU)
    assert model.provider == "CPUExecutionProvider"
    results = model.classify(images)
    (tf_probs,) = run_tf(frozen, nncpr_input(images), "final_result:0")
    labels = codes.nncpr_labels()
    for r, p in zip(results, tf_probs):
        assert r.label == labels[int(p.argmax())]
        assert abs(r.score - float(p.max())) < 1e-4
        assert r.cam is not None and r.cam.shape == (7, 7) and r.cam.min() == 0.0 and r.cam.max() == 1.0


@pytest.mark.parametrize(("head", "batch"), [("imagenet", 1), ("mean", None)])
def test_other_linear_heads_get_a_map_too(tmp_path: Path, head: str, batch: int | None) -> None:
    frozen = freeze(tmp_path / "network.pb", body="tiny", head=head, batch=batch, seed=1)
    model_dir = import_nncpr(frozen.path, tmp_path / "model", name="nncpr-test", version="2")
    card = modelcard.load_card(model_dir)
    assert card.outputs["cam"] == "cam" and (card.name, card.version) == ("nncpr-test", "2")

    # A source with a fixed batch of 1 still converts to a model that takes any batch.
    x = np.random.default_rng(2).uniform(-1, 1, (3, 224, 224, 3)).astype(np.float32)
    probs, cam = run_onnx(model_dir, x, "final_result:0", "cam")
    tf_out = [run_tf(frozen, x[i : i + 1], "final_result:0", frozen.features) for i in range(3)]
    tf_probs = np.concatenate([o[0] for o in tf_out])
    tf_features = np.concatenate([o[1] for o in tf_out])
    assert np.abs(probs - tf_probs).max() < 1e-4
    want = top_class_maps(tf_features, frozen.weight, probs.argmax(axis=1))
    np.testing.assert_allclose(cam, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_a_nonlinear_head_converts_without_a_map_and_says_why(tmp_path: Path) -> None:
    frozen = freeze(tmp_path / "network.pb", body="tiny", head="hidden")
    model_dir = import_nncpr(frozen.path, tmp_path / "model")
    card = modelcard.load_card(model_dir)
    assert card.outputs == {"scores": "final_result:0"}
    (why,) = [s for s in card.limitations if "No class activation map" in s]
    assert "Relu" in why
    x = nncpr_input(radiographs()[:2])
    (probs,) = run_onnx(model_dir, x, "final_result:0")
    (tf_probs,) = run_tf(frozen, x, "final_result:0")
    assert np.abs(probs - tf_probs).max() < 1e-4


def test_refuses_what_is_not_nncpr(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pb"
    junk.write_bytes(b"\xff\xfe not a graph")
    with pytest.raises(ValueError, match="not a frozen TensorFlow graph"):
        import_nncpr(junk, tmp_path / "a")

    def tiny_graph(path: Path, side: int, output: str) -> Path:
        graph = tf.Graph()
        with graph.as_default():
            x = tf.compat.v1.placeholder(tf.float32, [None, side, side, 3], name="input")
            tf.nn.softmax(tf.reduce_mean(x, axis=[1, 2]), name=output)
        path.write_bytes(graph.as_graph_def().SerializeToString())
        return path

    wrong_size = tiny_graph(tmp_path / "inception.pb", 299, "final_result")
    with pytest.raises(ValueError, match=r"shape \[None, 299, 299, 3\]"):
        import_nncpr(wrong_size, tmp_path / "b")

    renamed = tiny_graph(tmp_path / "renamed.pb", 224, "probabilities")
    with pytest.raises(ValueError, match="no node named 'final_result'"):
        import_nncpr(renamed, tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
