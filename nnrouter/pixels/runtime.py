"""Running a model from ``models/<name>/`` with onnxruntime.

The card decides how pixels become a tensor and how outputs become answers,
so this module holds no per-model knowledge. It prefers CUDA and falls back
to the CPU, and because onnxruntime may list CUDA as available yet fail to
load its libraries, the provider reported is the one the session really got.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import structlog

from .detect import Detection, Letterbox, decode_darknet, decode_ultralytics
from .modelcard import MODEL_FILE, ModelCard, ModelCardError, _require_digest, load_card

__all__ = ["DEFAULT_PROVIDERS", "Classification", "Letterbox", "Model", "Timings"]

DEFAULT_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")
UNKNOWN = "unknown"
TOP_K = 5


@dataclass(frozen=True)
class Classification:
    top: list[tuple[str, float]]  # up to five (label, calibrated score), best first
    label: str  # top label, or "unknown" when its score is below the card's unknown_threshold
    score: float  # calibrated score of the top class, even when label is "unknown"
    cam: np.ndarray | None = None  # float32 [h, w] in [0, 1] over the whole original image
    ood: float | None = None  # distance from the training data, when the model reports one


@dataclass(frozen=True)
class Timings:
    """Wall-clock milliseconds of the last call, for per-instance accounting."""

    batch_size: int
    preprocess_ms: float
    infer_ms: float
    postprocess_ms: float


class Model:
    """One loaded model. Build with :meth:`Model.load`; not shared between threads."""

    def __init__(self, card: ModelCard, session: ort.InferenceSession, sha256: str) -> None:
        self._card = card
        self._session = session
        self.sha256 = sha256
        self.timings: Timings | None = None
        inp = next(i for i in session.get_inputs() if i.name == card.input_name)
        self._input_dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
        # Exports with a fixed batch dimension are fed in chunks of that size.
        self._fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) and inp.shape[0] > 0 else None

    @classmethod
    def load(
        cls,
        model_dir: str | os.PathLike[str],
        *,
        providers: Sequence[str] | None = None,
        intra_op_threads: int = 0,
    ) -> Model:
        """Verify, open and warm up the model in ``model_dir``.

        The weights are hashed from the same bytes that are handed to
        onnxruntime, so what runs is exactly what was verified.
        """
        model_dir = Path(model_dir)
        card = load_card(model_dir)
        onnx_path = model_dir / MODEL_FILE
        try:
            blob = onnx_path.read_bytes()
        except FileNotFoundError:
            raise ModelCardError(f"{onnx_path}: model file not found") from None
        digest = hashlib.sha256(blob).hexdigest()
        _require_digest(card, digest, onnx_path)

        requested = _pick_providers(providers)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads
        session = ort.InferenceSession(blob, sess_options=opts, providers=requested)
        _check_graph(card, session, onnx_path)

        model = cls(card, session, digest)
        t0 = time.perf_counter()
        model._warm_up()
        warmup_ms = (time.perf_counter() - t0) * 1000.0
        structlog.get_logger().info(
            "model_loaded",
            model=card.name,
            version=card.version,
            task=card.task,
            provider=model.provider,
            requested=list(requested),
            sha256=digest,
            warmup_ms=round(warmup_ms, 1),
        )
        return model

    @property
    def card(self) -> ModelCard:
        return self._card

    @property
    def provider(self) -> str:
        """The execution provider the session actually runs on first."""
        return self._session.get_providers()[0]

    def preprocess(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, list[Letterbox]]:
        """2-D uint8 grey images -> the batch tensor the card asks for, plus each image's placement.

        The placements are what detections need to find their way back to
        the original pixels.
        """
        spec = self._card.input
        net_h, net_w = spec.size
        n = len(images)
        plane = np.empty((n, net_h, net_w), dtype=np.uint8)
        boxes: list[Letterbox] = []
        for i, img in enumerate(images):
            img = np.asarray(img)
            if img.ndim != 2 or img.dtype != np.uint8 or img.size == 0:
                raise ValueError(
                    f"image {i}: expected a non-empty 2-D uint8 grey image, got shape {img.shape} dtype {img.dtype}"
                )
            plane[i], lb = _place(img, net_h, net_w, spec.resize, spec.pad_value)
            boxes.append(lb)
        x = plane.astype(np.float32)[..., None]  # [B, H, W, 1]
        if spec.channels == 3:
            x = np.repeat(x, 3, axis=3)
        mean = np.asarray(spec.normalisation.mean, dtype=np.float32)
        std = np.asarray(spec.normalisation.std, dtype=np.float32)
        x = (x - mean) / std
        if spec.layout == "NCHW":
            x = np.transpose(x, (0, 3, 1, 2))
        return np.ascontiguousarray(x, dtype=self._input_dtype), boxes

    def classify(self, images: Sequence[np.ndarray]) -> list[Classification]:
        """Top-5 calibrated scores (and CAM when the model has one) per image."""
        card = self._card
        if card.task != "classify":
            raise ValueError(f"model {card.name} is a {card.task} model, not classify")
        if not images:
            return []
        t0 = time.perf_counter()
        x, boxes = self.preprocess(images)
        t1 = time.perf_counter()
        roles = ["scores"] + [r for r in ("cam", "ood") if r in card.outputs]
        outs = dict(zip(roles, self._run(x, [card.outputs[r] for r in roles])))
        t2 = time.perf_counter()
        probs = self._calibrate(outs["scores"].reshape(len(images), -1))
        k = min(TOP_K, probs.shape[1])
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        results = []
        for i, idx in enumerate(order):
            top = [(card.labels[j], float(probs[i, j])) for j in idx]
            best_label, best = top[0]
            ood = float(outs["ood"].reshape(len(images))[i]) if "ood" in outs else None
            best_label = gate(best_label, best, ood, card.unknown_threshold, card.ood_threshold)
            cam = _cam(outs["cam"][i], int(idx[0]), boxes[i], card.input.size) if "cam" in outs else None
            results.append(Classification(top=top, label=best_label, score=best, cam=cam, ood=ood))
        t3 = time.perf_counter()
        self._time(len(images), t0, t1, t2, t3)
        return results

    def detect(self, images: Sequence[np.ndarray]) -> list[list[Detection]]:
        """Detections per image, boxes in that image's own pixels."""
        card = self._card
        if card.task != "detect":
            raise ValueError(f"model {card.name} is a {card.task} model, not detect")
        if not images:
            return []
        t0 = time.perf_counter()
        x, boxes = self.preprocess(images)
        t1 = time.perf_counter()
        if "predictions" in card.outputs:
            (pred,) = self._run(x, [card.outputs["predictions"]])
            t2 = time.perf_counter()
            dets = decode_ultralytics(pred, card.labels, card.conf_threshold, card.iou_threshold, letterboxes=boxes)
        else:
            b, c = self._run(x, [card.outputs["boxes"], card.outputs["confs"]])
            t2 = time.perf_counter()
            dets = decode_darknet(
                b,
                c,
                card.labels,
                card.conf_threshold,
                card.iou_threshold,
                input_size=card.input.size,
                letterboxes=boxes,
            )
        t3 = time.perf_counter()
        self._time(len(images), t0, t1, t2, t3)
        return dets

    def _calibrate(self, scores: np.ndarray) -> np.ndarray:
        card = self._card
        if scores.shape[1] != len(card.labels):
            raise ValueError(
                f"model {card.name}: scores output has {scores.shape[1]} classes, card lists {len(card.labels)} labels"
            )
        scores = scores.astype(np.float64)
        if card.scores_are == "logits":
            return _softmax(scores / card.temperature)
        if card.temperature != 1.0:
            # log-probabilities are logits up to a constant, so temperature still applies.
            return _softmax(np.log(np.clip(scores, 1e-12, None)) / card.temperature)
        return scores

    def _run(self, x: np.ndarray, names: list[str]) -> list[np.ndarray]:
        feed = self._card.input_name
        step = self._fixed_batch
        if step is None or x.shape[0] == step:
            return self._session.run(names, {feed: x})
        chunks = []
        for start in range(0, x.shape[0], step):
            part = x[start : start + step]
            short = step - part.shape[0]
            if short:  # pad the last chunk; the padding's outputs are dropped below
                part = np.concatenate([part, np.zeros((short, *part.shape[1:]), dtype=part.dtype)])
            outs = self._session.run(names, {feed: part})
            chunks.append([o[: step - short] for o in outs])
        return [np.concatenate([c[j] for c in chunks]) for j in range(len(names))]

    def _warm_up(self) -> None:
        # The first run allocates and (on CUDA) picks kernels; pay for it at load, not on a study.
        h, w = self._card.input.size
        c = self._card.input.channels
        n = self._fixed_batch or 1
        shape = (n, c, h, w) if self._card.input.layout == "NCHW" else (n, h, w, c)
        self._session.run(
            list(self._card.outputs.values()), {self._card.input_name: np.zeros(shape, self._input_dtype)}
        )

    def _time(self, n: int, t0: float, t1: float, t2: float, t3: float) -> None:
        self.timings = Timings(
            batch_size=n,
            preprocess_ms=(t1 - t0) * 1000.0,
            infer_ms=(t2 - t1) * 1000.0,
            postprocess_ms=(t3 - t2) * 1000.0,
        )


def gate(
    label: str, score: float, ood: float | None, unknown_threshold: float | None, ood_threshold: float | None
) -> str:
    """The top label, or "unknown" when its score is too low or its features too far from the training data.

    One function, so that leave-one-source-out folds decide exactly as the served model does.
    """
    if unknown_threshold is not None and score < unknown_threshold:
        return UNKNOWN
    if ood is not None and ood_threshold is not None and ood > ood_threshold:
        return UNKNOWN
    return label


def _nvidia_driver_loaded() -> bool:
    # onnxruntime-gpu lists CUDA as available on any machine, then prints an
    # alarming error when its libraries find no driver; asking only where a
    # driver is loaded keeps CPU-only logs clean.
    return Path("/proc/driver/nvidia/version").exists()


def _pick_providers(providers: Sequence[str] | None) -> list[str]:
    available = ort.get_available_providers()
    if providers is None:
        wanted = [p for p in DEFAULT_PROVIDERS if p != "CUDAExecutionProvider" or _nvidia_driver_loaded()]
    else:
        wanted = list(providers)
    chosen = [p for p in wanted if p in available]
    if not chosen:
        raise ValueError(f"none of the providers {wanted} is available; onnxruntime offers {available}")
    return chosen


def _check_graph(card: ModelCard, session: ort.InferenceSession, onnx_path: Path) -> None:
    """Refuse a card that does not describe this graph, before it produces nonsense."""
    where = f"{onnx_path.parent / 'model.yaml'}"
    inputs = {i.name: i for i in session.get_inputs()}
    if card.input_name not in inputs:
        raise ModelCardError(
            f"{where}: input_name: {card.input_name!r} is not an input of model.onnx ({sorted(inputs)})"
        )
    out_names = {o.name for o in session.get_outputs()}
    for role, name in card.outputs.items():
        if name not in out_names:
            raise ModelCardError(
                f"{where}: outputs.{role}: {name!r} is not an output of model.onnx ({sorted(out_names)})"
            )
    shape = inputs[card.input_name].shape
    if len(shape) != 4:
        raise ModelCardError(f"{where}: input_name: model.onnx input {card.input_name!r} has rank {len(shape)}, need 4")
    h, w = card.input.size
    c = card.input.channels
    expected = (None, c, h, w) if card.input.layout == "NCHW" else (None, h, w, c)
    for got, want in zip(shape[1:], expected[1:]):
        if isinstance(got, int) and got > 0 and got != want:
            raise ModelCardError(
                f"{where}: input: card says {card.input.layout} size {list(card.input.size)} channels {c}, "
                f"but model.onnx input {card.input_name!r} has shape {shape}"
            )


def _place(img: np.ndarray, net_h: int, net_w: int, resize: str, pad_value: int) -> tuple[np.ndarray, Letterbox]:
    h, w = img.shape
    if resize == "stretch":
        return _resize(img, net_w, net_h), Letterbox(net_w / w, net_h / h, 0.0, 0.0, w, h)
    r = min(net_h / h, net_w / w)
    new_w, new_h = max(1, min(net_w, round(w * r))), max(1, min(net_h, round(h * r)))
    left, top = (net_w - new_w) // 2, (net_h - new_h) // 2
    canvas = np.full((net_h, net_w), pad_value, dtype=np.uint8)
    canvas[top : top + new_h, left : left + new_w] = _resize(img, new_w, new_h)
    return canvas, Letterbox(new_w / w, new_h / h, float(left), float(top), w, h)


def _resize(img: np.ndarray, w: int, h: int) -> np.ndarray:
    if img.shape == (h, w):
        return img
    # Area averaging when shrinking avoids the aliasing of plain bilinear on
    # multi-megapixel radiographs; bilinear when enlarging.
    shrink = w < img.shape[1] or h < img.shape[0]
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _cam(raw: np.ndarray, top: int, lb: Letterbox, size: tuple[int, int]) -> np.ndarray:
    """Class map of the top class, cropped to the image (no letterbox border), scaled to [0, 1]."""
    m = np.asarray(raw, dtype=np.float32)
    if m.ndim == 3:  # [1, h, w] for the top class, or [nc, h, w] for every class
        m = m[0] if m.shape[0] == 1 else m[top]
    if m.ndim != 2:
        raise ValueError(
            f"cam output must be [B, h, w], [B, 1, h, w] or [B, nc, h, w]; got per-image shape {raw.shape}"
        )
    net_h, net_w = size
    sy, sx = m.shape[0] / net_h, m.shape[1] / net_w
    x0, y0 = round(lb.pad_x * sx), round(lb.pad_y * sy)
    x1 = max(x0 + 1, round((lb.pad_x + lb.width * lb.scale_x) * sx))
    y1 = max(y0 + 1, round((lb.pad_y + lb.height * lb.scale_y) * sy))
    m = m[y0:y1, x0:x1]
    lo, hi = float(m.min()), float(m.max())
    if hi > lo:
        return ((m - lo) / (hi - lo)).astype(np.float32)
    return np.zeros_like(m, dtype=np.float32)
