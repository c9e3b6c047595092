"""Class activation maps as an extra output of an ONNX classifier.

When a classifier ends in global-average-pool followed by linear layers, its
top-class logit is the spatial mean of one map, sum_c F[h, w, c] * W[c, top]
(Zhou et al. 2016, "Learning Deep Features for Discriminative Localization").
Computing that map inside the graph costs one small product on a feature map
the network has already made, needs no second pass and no framework at run
time, and so every consumer of the ONNX file gets the same explanation as the
scores it sits beside.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["add_cam_output"]


def add_cam_output(
    model: onnx.ModelProto,
    features: str,
    weight: str,
    scores: str,
    *,
    layout: Literal["NHWC", "NCHW"],
    output_name: str = "cam",
) -> onnx.ModelProto:
    """Return a copy of ``model`` with an output ``[N, H, W]``: the map of each sample's top class.

    ``features`` is the tensor fed to the global average pool, ``weight`` the
    ``[C, K]`` matrix that takes pooled features to logits (as in ``x @ W``;
    with several linear layers in a row, their product), ``scores`` the
    ``[N, K]`` output whose argmax picks the class. The bias is left out: it
    only shifts the map by a constant, which the runtime's scaling to [0, 1]
    removes anyway. The map is raw, at the feature map's resolution.
    """
    if layout not in ("NHWC", "NCHW"):
        raise ValueError(f"layout must be 'NHWC' or 'NCHW', got {layout!r}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    known = _tensor_names(g)
    for what, name in (("features", features), ("weight", weight), ("scores", scores)):
        if name not in known:
            raise ValueError(f"{what} tensor {name!r} is not in the graph")
    if output_name in known:
        raise ValueError(f"output name {output_name!r} is already used in the graph")

    opset = _default_opset(out)
    p = output_name  # prefix for every name added, so a second CAM output cannot clash
    channel_axis = 3 if layout == "NHWC" else 1
    # Per-sample weights [N, C] shaped so they broadcast over the feature map's H and W.
    per_sample_shape = [0, 1, 1, -1] if layout == "NHWC" else [0, -1, 1, 1]
    inits = [numpy_helper.from_array(_int64(per_sample_shape), f"{p}/weight_shape")]
    nodes = [
        # Scores may come as [N, 1, 1, K]; flatten so the argmax is over classes only.
        helper.make_node("Flatten", [scores], [f"{p}/scores_2d"], axis=1, name=f"{p}/flatten"),
        helper.make_node("ArgMax", [f"{p}/scores_2d"], [f"{p}/top"], axis=1, keepdims=0, name=f"{p}/argmax"),
        helper.make_node("Transpose", [weight], [f"{p}/weight_t"], perm=[1, 0], name=f"{p}/transpose"),
        helper.make_node("Gather", [f"{p}/weight_t", f"{p}/top"], [f"{p}/w_top"], axis=0, name=f"{p}/gather"),
        helper.make_node("Reshape", [f"{p}/w_top", f"{p}/weight_shape"], [f"{p}/w_bcast"], name=f"{p}/reshape"),
        # Mul + ReduceSum rather than Einsum: every execution provider has both.
        helper.make_node("Mul", [features, f"{p}/w_bcast"], [f"{p}/weighted"], name=f"{p}/mul"),
    ]
    if opset >= 13:
        inits.append(numpy_helper.from_array(_int64([channel_axis]), f"{p}/channel_axis"))
        nodes.append(
            helper.make_node(
                "ReduceSum", [f"{p}/weighted", f"{p}/channel_axis"], [output_name], keepdims=0, name=f"{p}/sum"
            )
        )
    else:
        nodes.append(
            helper.make_node(
                "ReduceSum", [f"{p}/weighted"], [output_name], axes=[channel_axis], keepdims=0, name=f"{p}/sum"
            )
        )
    g.initializer.extend(inits)
    g.node.extend(nodes)
    elem_type, dims = _describe(model, features)
    if dims is not None and len(dims) == 4:
        # [N, H, W] named after the feature map's own dims, for whoever reads the graph.
        shape = [dims[0], *(dims[1:3] if layout == "NHWC" else dims[2:4])]
    else:
        shape = ["N", "H", "W"]
    g.output.append(helper.make_tensor_value_info(output_name, elem_type, shape))
    onnx.checker.check_model(out)
    return out


def _tensor_names(g: onnx.GraphProto) -> set[str]:
    names = {i.name for i in g.input} | {i.name for i in g.initializer}
    for n in g.node:
        names.update(o for o in n.output if o)
    return names


def _default_opset(model: onnx.ModelProto) -> int:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            return op.version
    raise ValueError("model imports no default-domain opset")


def _int64(values: list[int]) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


def _describe(model: onnx.ModelProto, name: str) -> tuple[int, list[int | str | None] | None]:
    """Element type and dims of a tensor as shape inference sees them; float and unknown if it cannot say.

    The map takes the feature map's type, so a float16 export stays float16.
    """
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    for vi in [*g.value_info, *g.output, *g.input]:
        if vi.name != name:
            continue
        tt = vi.type.tensor_type
        dims = None
        if tt.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
        return (tt.elem_type or TensorProto.FLOAT), dims
    return TensorProto.FLOAT, None
