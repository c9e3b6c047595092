"""Bringing the published NNCPR network into nnrouter.

NNCPR is distributed as a TensorFlow 1.15 frozen graph (``network.pb``: a
MobileNet v1 retrained with TensorFlow's retrain.py). nnrouter runs ONNX only,
so the graph is converted once, here, with tf2onnx, and given a model card;
after that no TensorFlow is needed anywhere. TensorFlow and tf2onnx are
imported only inside :func:`import_nncpr`, because they are an optional extra
(``nnrouter[convert]``) far heavier than everything else nnrouter needs.

The conversion is checked before anything is written: TensorFlow and
onnxruntime run the same inputs and must agree, so a file that converts into
something else is refused rather than installed.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nnrouter.core import codes
from nnrouter.pixels.modelcard import (
    MODEL_FILE,
    InputSpec,
    ModelCard,
    Normalisation,
    sha256_file,
    write_atomically,
    write_card,
)

__all__ = ["import_nncpr"]

INPUT = "input"
OUTPUT = "final_result"
SIZE = (224, 224)
CAM_OUTPUT = "cam"
LICENCE = "as published by the NNCPR authors (check before clinical use)"

# Refuse a conversion whose outputs differ from TensorFlow's by more than this.
# float32 MobileNet conversions agree to about 1e-6; this only catches real breakage.
_MAX_SCORE_DIFF = 1e-3
_MAX_CAM_REL_DIFF = 1e-3

# Ops that move a pooled [N, 1, 1, C] vector around without changing its values.
_PASS_THROUGH = {"Identity", "StopGradient", "Squeeze", "Reshape", "PlaceholderWithDefault"}


def import_nncpr(
    pb_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    name: str = "nncpr",
    version: str = "1.0",
    opset: int = 17,
) -> Path:
    """Convert NNCPR's frozen ``network.pb`` into ``out_dir/model.onnx`` plus its card; return ``out_dir``.

    Existing files in ``out_dir`` are replaced. The ONNX model takes a batch of
    any size. When the graph's head is global-average-pool followed by linear
    layers (as retrain.py builds it), the model also outputs the class
    activation map of each image's top class; otherwise the card says why not.

    Raises ImportError without the ``[convert]`` extra and ValueError for a
    graph that is not shaped like NNCPR's or does not convert faithfully.
    """
    try:
        import tensorflow as tf
        import tf2onnx
    except ImportError as e:
        raise ImportError(
            f"converting NNCPR needs TensorFlow and tf2onnx ({e}); install them with: pip install 'nnrouter[convert]'"
        ) from e

    pb_path, out_dir = Path(pb_path), Path(out_dir)
    labels = codes.nncpr_labels()
    graph_def = _read_graph_def(tf, pb_path)
    graph = _import(tf, graph_def)
    _check_interface(graph, pb_path, len(labels))
    head = _linear_head(tf, graph_def, graph)

    source_sha = sha256_file(pb_path)
    provenance = (
        f"{pb_path.name} (sha256 {source_sha}), converted by nnrouter models import-nncpr "
        f"with tf2onnx {tf2onnx.__version__}, TF {tf.__version__}, ONNX opset {opset}"
    )
    model = _convert(tf2onnx, graph_def, head, opset, pb_path.name)
    model.metadata_props.extend(
        _props({"source": pb_path.name, "source_sha256": source_sha, "converted_by": provenance})
    )
    blob = model.SerializeToString()
    check = _compare_with_tensorflow(tf, graph, blob, head)

    # The card is built, and so validated, before anything is written.
    card = _card(name, version, labels, head, hashlib.sha256(blob).hexdigest(), provenance, check)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / MODEL_FILE
    write_atomically(onnx_path, blob)
    if sha256_file(onnx_path) != card.sha256:
        raise OSError(f"{onnx_path}: the file on disk is not what was written")
    write_card(card, out_dir)
    return out_dir


@dataclass(frozen=True)
class _Head:
    """Where the class activation map comes from: pooled features -> logits is ``pooled @ weight + bias``."""

    features: str  # TF tensor name of the map fed to the global average pool, NHWC
    weight: np.ndarray  # [C, K], the product of every linear layer between pool and softmax
    grid: tuple[int, int]  # H, W of the feature map


def _convert(tf2onnx: Any, graph_def: Any, head: _Head | str, opset: int, name: str) -> Any:
    """tf2onnx's ONNX model of the graph, with the activation map output where the head allows one."""
    from onnx import numpy_helper

    from nnrouter.pixels.cam import add_cam_output  # needs onnx, which tf2onnx brings

    model, _ = tf2onnx.convert.from_graph_def(
        _for_conversion(graph_def),
        name=name,
        input_names=[f"{INPUT}:0"],
        output_names=[f"{OUTPUT}:0"] + ([head.features] if isinstance(head, _Head) else []),
        opset=opset,
    )
    if not isinstance(head, _Head):
        return model
    # The feature map was an output only so that tf2onnx kept it by name and in NHWC.
    kept = [o for o in model.graph.output if o.name != head.features]
    del model.graph.output[:]
    model.graph.output.extend(kept)
    weight = f"{CAM_OUTPUT}_weights"
    model.graph.initializer.append(numpy_helper.from_array(head.weight.astype(np.float32), weight))
    return add_cam_output(model, head.features, weight, f"{OUTPUT}:0", layout="NHWC", output_name=CAM_OUTPUT)


def _props(values: dict[str, str]) -> list[Any]:
    from onnx import StringStringEntryProto

    return [StringStringEntryProto(key=k, value=v) for k, v in values.items()]


def _card(
    name: str, version: str, labels: list[str], head: _Head | str, sha256: str, provenance: str, check: dict[str, Any]
) -> ModelCard:
    outputs = {"scores": f"{OUTPUT}:0"}
    limitations = [
        "Trained by the NNCPR authors on radiographs from their own institution; how it does on another site's "
        "images has not been measured by nnrouter.",
        "Accuracy reported by the authors: 90.3% on their internal and 94.0% on their external test set; "
        "nnrouter has not measured either.",
        "No unknown_threshold is calibrated: every image gets one of the 30 labels, including images that show "
        "none of them.",
    ]
    if isinstance(head, _Head):
        outputs["cam"] = CAM_OUTPUT
        limitations.append(
            f"The class activation map has the last feature map's resolution ({head.grid[0]}x{head.grid[1]} for a "
            f"{SIZE[0]}x{SIZE[1]} input): it points at a region, not at structures."
        )
    else:
        limitations.append(f"No class activation map: {head}.")
    return ModelCard(
        name=name,
        task="classify",
        labels=labels,
        input=InputSpec(
            size=SIZE,
            channels=3,
            layout="NHWC",
            resize="stretch",
            normalisation=Normalisation(mean=[128.0] * 3, std=[128.0] * 3),
        ),
        input_name=f"{INPUT}:0",
        outputs=outputs,
        scores_are="probabilities",
        version=version,
        sha256=sha256,
        provenance=provenance,
        licence=LICENCE,
        metrics={"conversion_check": check},
        limitations=limitations,
        unknown_threshold=None,
    )


def _read_graph_def(tf: Any, pb_path: Path) -> Any:
    graph_def = tf.compat.v1.GraphDef()
    try:
        graph_def.ParseFromString(pb_path.read_bytes())
    except Exception as e:  # protobuf raises its own DecodeError, not a ValueError
        raise ValueError(f"{pb_path}: not a frozen TensorFlow graph (GraphDef): {e}") from None
    if not graph_def.node:
        raise ValueError(f"{pb_path}: not a frozen TensorFlow graph (GraphDef): no nodes")
    return graph_def


def _import(tf: Any, graph_def: Any) -> Any:
    graph = tf.Graph()
    with graph.as_default():
        tf.import_graph_def(graph_def, name="")
    return graph


def _check_interface(graph: Any, pb_path: Path, n_labels: int) -> None:
    """Refuse, by name, a graph whose interface is not NNCPR's: its card would describe another model."""
    ops = {op.name: op for op in graph.get_operations()}
    for node in (INPUT, OUTPUT):
        if node not in ops:
            raise ValueError(
                f"{pb_path}: no node named {node!r}; NNCPR's graph has input {INPUT!r} and output {OUTPUT!r}"
            )
    if ops[INPUT].type not in ("Placeholder", "PlaceholderWithDefault"):
        raise ValueError(f"{pb_path}: {INPUT!r} is a {ops[INPUT].type}, not a Placeholder")
    x = ops[INPUT].outputs[0]
    if x.dtype.name != "float32":
        raise ValueError(f"{pb_path}: {INPUT!r} is {x.dtype.name}, NNCPR takes float32")
    want = [None, *SIZE, 3]
    got = x.shape.as_list() if x.shape.rank is not None else None
    if got is not None and (len(got) != 4 or any(g is not None and g != w for g, w in zip(got[1:], want[1:]))):
        raise ValueError(f"{pb_path}: {INPUT!r} has shape {got}, NNCPR takes [batch, {SIZE[0]}, {SIZE[1]}, 3]")
    y = ops[OUTPUT].outputs[0].shape
    if y.rank is not None and y.as_list()[-1] not in (None, n_labels):
        raise ValueError(f"{pb_path}: {OUTPUT!r} has {y.as_list()[-1]} classes, NNCPR has {n_labels}")


def _linear_head(tf: Any, graph_def: Any, graph: Any) -> _Head | str:
    """Find the global average pool and the linear layers between it and the softmax, or say what is in the way.

    Walks back from ``final_result`` through bias adds, matrix products, 1x1
    convolutions of the pooled vector and reshapes, multiplying the weights up,
    so retrain.py's heads on a 1024-wide bottleneck and on the 1001-wide
    ImageNet logits both qualify.
    """
    nodes = {n.name: n for n in graph_def.node}

    def shape(ref: str) -> list[int | None] | None:
        s = graph.get_tensor_by_name(_tensor(ref)).shape
        return s.as_list() if s.rank is not None else None

    def const(ref: str) -> np.ndarray | None:
        n = nodes.get(_op(ref))
        while n is not None and n.op == "Identity":
            n = nodes.get(_op(n.input[0]))
        if n is None or n.op != "Const":
            return None
        return tf.make_ndarray(n.attr["value"].tensor)

    top = nodes[OUTPUT]
    if top.op != "Softmax":
        return f"{OUTPUT!r} is a {top.op}, not a Softmax"
    weight: np.ndarray | None = None
    ref = top.input[0]
    while True:
        n = nodes[_op(ref)]
        data_inputs = [i for i in n.input if not i.startswith("^")]
        if n.op in _PASS_THROUGH:
            if n.op in ("Squeeze", "Reshape") and not _same_vector(shape(data_inputs[0]), shape(ref)):
                return f"{n.op} {n.name!r} between the pool and {OUTPUT!r} reorders values"
            ref = data_inputs[0]
        elif n.op in ("Add", "AddV2", "BiasAdd"):
            varying = [i for i in data_inputs if const(i) is None]
            if len(varying) != 1:
                return f"{n.op} {n.name!r} adds two computed tensors, not a bias"
            ref = varying[0]
        elif n.op == "MatMul":
            w = const(data_inputs[1])
            if w is None or n.attr["transpose_a"].b:
                return f"MatMul {n.name!r} is not activations times constant weights"
            w = w.T if n.attr["transpose_b"].b else w
            weight = w if weight is None else w @ weight
            ref = data_inputs[0]
        elif n.op == "Conv2D":
            w = const(data_inputs[1])
            s = shape(data_inputs[0])
            if w is None or w.shape[:2] != (1, 1) or s is None or s[1:3] != [1, 1] or _fmt(n) != "NHWC":
                return f"Conv2D {n.name!r} is not a 1x1 convolution of the pooled vector"
            weight = w[0, 0] if weight is None else w[0, 0] @ weight
            ref = data_inputs[0]
        elif n.op in ("AvgPool", "Mean"):
            features = _tensor(data_inputs[0])
            s = shape(features)
            if s is None or len(s) != 4 or None in s[1:]:
                return f"the feature map {features!r} has no known static shape"
            if n.op == "AvgPool":
                k = list(n.attr["ksize"].list.i)
                if _fmt(n) != "NHWC" or k != [1, s[1], s[2], 1] or n.attr["padding"].s != b"VALID":
                    return f"AvgPool {n.name!r} does not average the whole feature map"
            else:
                axes = const(data_inputs[1])
                if axes is None or sorted(int(a) % 4 for a in np.ravel(axes)) != [1, 2]:
                    return f"Mean {n.name!r} does not average over height and width"
            if weight is None:
                return f"no linear layer between the pool and {OUTPUT!r}"
            if weight.shape[0] != s[3]:
                return f"the head's weights take {weight.shape[0]} features, the map has {s[3]} channels"
            grid_h, grid_w = s[1], s[2]
            assert grid_h is not None and grid_w is not None  # no None in s[1:], checked above
            return _Head(features=features, weight=weight.astype(np.float64), grid=(grid_h, grid_w))
        else:
            return (
                f"the head between {OUTPUT!r} and the last feature map contains {n.op} {n.name!r}, which is not linear"
            )


def _same_vector(before: list[int | None] | None, after: list[int | None] | None) -> bool:
    """A reshape of the pooled vector is harmless when it only adds or drops size-1 axes."""
    if before is None or after is None:
        return False
    strip = lambda s: [d for d in s[1:] if d != 1]  # noqa: E731
    return None not in strip(before) and strip(before) == strip(after)


def _fmt(node: Any) -> str:
    f = node.attr["data_format"].s
    return f.decode() if f else "NHWC"


def _op(ref: str) -> str:
    return ref.lstrip("^").split(":")[0]


def _tensor(ref: str) -> str:
    return ref if ":" in ref else f"{ref}:0"


def _for_conversion(graph_def: Any) -> Any:
    """The graph as inference sees it, with a free batch dimension.

    retrain.py routes the bottleneck through a PlaceholderWithDefault so that
    training could feed cached values; at inference the default is what flows,
    and tf2onnx refuses the op unless told which way to read it, so each one
    other than the input becomes an Identity of its default. A batch fixed in
    the input placeholder would be folded into constants during conversion,
    so it is freed here, where it is still only a declared shape.
    """
    out = type(graph_def)()
    out.CopyFrom(graph_def)
    for n in out.node:
        if n.name == INPUT:
            shape = n.attr["shape"].shape
            if not shape.unknown_rank and shape.dim:
                shape.dim[0].size = -1
        elif n.op == "PlaceholderWithDefault":
            n.op = "Identity"
            n.attr["T"].CopyFrom(n.attr["dtype"])
            del n.attr["dtype"]
            del n.attr["shape"]
    return out


def _check_inputs() -> np.ndarray:
    """Two images on NNCPR's input scale: a ramp and rings, different enough to take different paths."""
    y, x = np.mgrid[0 : SIZE[0], 0 : SIZE[1]].astype(np.float32)
    ramp = (x + 0.5 * y) / (1.5 * SIZE[1]) * 2 - 1
    rings = np.cos(np.hypot(x - 90, y - 130) / 9.0)
    imgs = np.stack([ramp, rings])[..., None]
    shift = np.array([0.0, 0.1, -0.1], dtype=np.float32)  # unequal channels: a swapped axis shows
    return np.clip(imgs + shift, -1, 1).astype(np.float32)


def _compare_with_tensorflow(tf: Any, graph: Any, blob: bytes, head: _Head | str) -> dict[str, Any]:
    """Run TensorFlow and the converted model on the same images; refuse a disagreement, report the agreement.

    onnxruntime gets both images as one batch, which also proves the batch dimension is free.
    """
    import onnxruntime as ort

    x = _check_inputs()
    fetch = [f"{OUTPUT}:0"] + ([head.features] if isinstance(head, _Head) else [])
    with tf.compat.v1.Session(graph=graph) as sess:
        # One image at a time: the source may fix its batch at 1 even though the conversion does not.
        runs = [sess.run(fetch, {f"{INPUT}:0": x[i : i + 1]}) for i in range(len(x))]
    tf_out = [np.concatenate([r[j] for r in runs]) for j in range(len(fetch))]
    session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    names = [f"{OUTPUT}:0"] + ([CAM_OUTPUT] if isinstance(head, _Head) else [])
    try:
        ort_out = session.run(names, {f"{INPUT}:0": x})
    except Exception as e:  # onnxruntime's errors have no common base class worth naming
        raise ValueError(
            f"converted model does not run on a batch of {len(x)} (a batch size fixed inside the graph?): {e}"
        ) from None

    score_diff = float(np.abs(tf_out[0] - ort_out[0]).max())
    if not score_diff <= _MAX_SCORE_DIFF:  # also catches NaN
        raise ValueError(f"converted model disagrees with TensorFlow: scores differ by up to {score_diff:.3g}")
    check: dict[str, Any] = {
        "inputs": "2 synthetic images (ramp, rings)",
        "max_abs_score_diff": float(f"{score_diff:.3g}"),
    }
    if isinstance(head, _Head):
        top = ort_out[0].argmax(axis=1)
        want = np.einsum("nhwc,nc->nhw", tf_out[1].astype(np.float64), head.weight.T[top])
        rel = float(np.abs(ort_out[1] - want).max() / max(np.abs(want).max(), 1e-12))
        if not rel <= _MAX_CAM_REL_DIFF:
            raise ValueError(f"converted model's activation map disagrees with TensorFlow's by {rel:.3g} (relative)")
        check["max_rel_cam_diff"] = float(f"{rel:.3g}")
    return check
