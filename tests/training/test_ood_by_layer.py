"""bench/ood_by_layer.py: the graph surgery behind issue 4's layer-by-layer distances."""

from __future__ import annotations

import importlib.util

import numpy as np
import onnxruntime as ort
import pytest
from conftest import REPO

pytest.importorskip("onnx", reason="the [test] extra is not installed")

SHIPPED = REPO / "models" / "nnrouter-view"


def _script():
    spec = importlib.util.spec_from_file_location("ood_by_layer", REPO / "bench" / "ood_by_layer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_block_and_the_head_are_exposed_and_the_head_is_what_the_classifier_reads():
    from nnrouter.pixels.runtime import Model

    blob, names = _script()._with_block_outputs(SHIPPED / "model.onnx")
    model = Model.load(SHIPPED)
    session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    img = (np.indices((300, 260)).sum(0) % 256).astype(np.uint8)  # any non-flat picture
    x, _ = model.preprocess([img])
    outs = session.run(names + ["logits"], {model.card.input_name: x})
    dims = [o.reshape(1, -1).shape[1] for o in outs[:-1]]
    # EfficientNet-Lite0: 16 blocks in 7 stages, then a 1280-wide head.
    assert dims == [16, 24, 24, 40, 40, 80, 80, 80, 112, 112, 112, 192, 192, 192, 192, 320, 1280]
    # The head features are the ones the classifier's last layer turns into its scores.
    import onnx
    from onnx import numpy_helper

    weights = {i.name: numpy_helper.to_array(i) for i in onnx.load_from_string(blob).graph.initializer}
    head = outs[-2].reshape(1, -1)
    np.testing.assert_allclose(
        head @ weights["net._fc.weight"].T + weights["net._fc.bias"], outs[-1], rtol=1e-4, atol=1e-4
    )
