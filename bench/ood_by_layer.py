"""How far real DICOM from other sources lies from the training data, layer by layer.

The measurement behind issue 4's open acceptance: can any feature-space
distance of a trained classifier pass an unusual chest and refuse a dog's
limb? For every block of the network (ImageNet-frozen and fine-tuned alike)
it fits class Gaussians with a tied covariance on the training split,
scores the validation split and the external files, and prints each
external file's distance divided by the 95th percentile of validation
distances. An image can only be told apart from another by a threshold on a
layer where its ratio is on the right side of the other's.

    .venv/bin/python bench/ood_by_layer.py --model models/nnrouter-view \\
        --dataset var/radiographs.csv --external ../shared/data/dicom/good

Needs onnx (the [test] extra), the shared data, and a model trained by `nnrouter train`.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from nnrouter.dicom.send import expand
from nnrouter.pixels.decode import DecodeError, decode_file
from nnrouter.pixels.runtime import Model
from nnrouter.training.train import fit_mahalanobis, is_validation, load_gray, mahalanobis, read_manifest


def _with_block_outputs(path: Path) -> tuple[bytes, list[str]]:
    """The model with the pooled output of every block (and the head) exposed."""
    m = onnx.load(str(path))
    last: dict[int, str] = {}
    for node in m.graph.node:
        hit = re.match(r"/_blocks\.(\d+)/", node.name)
        if hit:
            last[int(hit.group(1))] = node.output[0]
    names = []
    for block in sorted(last):
        pooled = f"pooled_block_{block}"
        m.graph.node.append(onnx.helper.make_node("GlobalAveragePool", [last[block]], [pooled]))
        m.graph.output.append(onnx.helper.make_tensor_value_info(pooled, onnx.TensorProto.FLOAT, None))
        names.append(pooled)
    head = next((n.output[0] for n in m.graph.node if n.op_type == "ReduceMean"), None)
    if head:
        m.graph.output.append(onnx.helper.make_tensor_value_info(head, onnx.TensorProto.FLOAT, None))
        names.append(head)
    return m.SerializeToString(), names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--dataset", type=Path, required=True)
    ap.add_argument("--external", nargs="+", type=Path, required=True)
    ap.add_argument("--val-percent", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    model = Model.load(args.model)
    blob, names = _with_block_outputs(args.model / "model.onnx")
    session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])

    def features(images: list[np.ndarray]) -> list[np.ndarray]:
        x, _ = model.preprocess(images)
        return [o.reshape(len(images), -1) for o in session.run(names, {model.card.input_name: x})]

    entries = read_manifest(args.dataset)
    labels = model.card.labels
    y = np.array([labels.index(e.label) for e in entries])
    val = np.array([is_validation(e, args.val_percent, args.seed) for e in entries])
    chunks = [features([load_gray(e) for e in entries[s : s + 64]]) for s in range(0, len(entries), 64)]
    train_f = [np.concatenate([c[j] for c in chunks]) for j in range(len(names))]

    files, ext = [], []
    for f in expand(args.external):
        try:
            img = decode_file(f, max_side=1024).image
        except DecodeError:
            continue
        files.append(Path(f).name)
        ext.append(features([img]))
    ext_f = [np.concatenate([e[j] for e in ext]) for j in range(len(names))]

    print(
        "distance / 95th percentile of validation distances (above 1: farther than 95 % of held-out training-source images)"
    )
    print(f"{'layer':<8} {'dim':>5}  " + "  ".join(f"{n[:14]:>14}" for n in files))
    for j, name in enumerate(names):
        f = train_f[j]
        means, whiten = fit_mahalanobis(f[~val], y[~val], len(labels))
        p95 = np.percentile(mahalanobis(f[val], means, whiten), 95)
        ratio = mahalanobis(ext_f[j], means, whiten) / p95
        layer = name.replace("pooled_block_", "block ") if name.startswith("pooled") else "head"
        print(f"{layer:<8} {f.shape[1]:>5}  " + "  ".join(f"{r:>14.2f}" for r in ratio))


if __name__ == "__main__":
    main()
