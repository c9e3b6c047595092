"""Turning raw YOLO-family outputs into boxes on the original image.

Pure numpy on purpose: decoding is where off-by-a-pad errors hide, and it is
easiest to test, and to reuse from any worker, without an inference runtime.
Two export layouts are understood, because the two detector families we see
in the wild disagree on it:

- Ultralytics (v8 and later): one tensor ``[B, 4+nc, N]``, rows cx, cy, w, h in
  network-input pixels, then per-class scores already passed through a sigmoid.
- darknet YOLOv4 as exported by Tianxiaomo/pytorch-YOLOv4: ``boxes [B, N, 1, 4]``
  holding x1, y1, x2, y2 as fractions of the network input, and
  ``confs [B, N, nc]`` holding per-class scores (objectness already folded in).

Both are reduced to one label per box (the best class), thresholded, passed
through class-wise NMS and un-mapped from the network input back to the pixels
of the image that was handed to preprocessing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Detection", "Letterbox", "decode_darknet", "decode_ultralytics", "nms"]


@dataclass(frozen=True)
class Letterbox:
    """How one original image was placed into the network input.

    network_x = original_x * scale_x + pad_x (likewise for y). A stretch resize
    is the case pad = 0 with unequal scales; a letterbox keeps the scales equal
    (up to rounding of the resized size) and pads the rest.
    """

    scale_x: float
    scale_y: float
    pad_x: float
    pad_y: float
    width: int  # original image width, for clipping
    height: int  # original image height

    def unmap(self, boxes: np.ndarray) -> np.ndarray:
        """Boxes [K, 4] x1y1x2y2 in network pixels -> original pixels, clipped to the image."""
        out = np.empty_like(boxes, dtype=np.float64)
        out[:, [0, 2]] = (boxes[:, [0, 2]] - self.pad_x) / self.scale_x
        out[:, [1, 3]] = (boxes[:, [1, 3]] - self.pad_y) / self.scale_y
        out[:, [0, 2]] = np.clip(out[:, [0, 2]], 0.0, float(self.width))
        out[:, [1, 3]] = np.clip(out[:, [1, 3]], 0.0, float(self.height))
        return out


@dataclass(frozen=True)
class Detection:
    label: str
    score: float
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in original image pixels


def decode_ultralytics(
    pred: np.ndarray,
    labels: Sequence[str],
    conf_threshold: float,
    iou_threshold: float,
    *,
    letterboxes: Sequence[Letterbox] | None = None,
    max_detections: int = 300,
) -> list[list[Detection]]:
    """Decode an Ultralytics ``[B, 4+nc, N]`` output; one list of detections per image."""
    pred = np.asarray(pred, dtype=np.float32)
    nc = len(labels)
    if pred.ndim != 3 or pred.shape[1] != 4 + nc:
        raise ValueError(f"Ultralytics output must be [B, 4+nc, N] with nc={nc} labels; got shape {list(pred.shape)}")
    rows = np.transpose(pred, (0, 2, 1))  # [B, N, 4+nc]
    results = []
    for i, r in enumerate(rows):
        cx, cy, w, h = r[:, 0], r[:, 1], r[:, 2], r[:, 3]
        boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
        results.append(
            _finish(boxes, r[:, 4:], labels, conf_threshold, iou_threshold, _lb(letterboxes, i), max_detections)
        )
    return results


def decode_darknet(
    boxes: np.ndarray,
    confs: np.ndarray,
    labels: Sequence[str],
    conf_threshold: float,
    iou_threshold: float,
    *,
    input_size: tuple[int, int],
    letterboxes: Sequence[Letterbox] | None = None,
    max_detections: int = 300,
) -> list[list[Detection]]:
    """Decode a YOLOv4 ``boxes [B, N, 1, 4]`` + ``confs [B, N, nc]`` pair.

    ``input_size`` is the network input (H, W): the boxes are fractions of it.
    """
    boxes = np.asarray(boxes, dtype=np.float32)
    confs = np.asarray(confs, dtype=np.float32)
    nc = len(labels)
    if boxes.ndim == 4 and boxes.shape[2] == 1:
        boxes = boxes[:, :, 0, :]
    if boxes.ndim != 3 or boxes.shape[2] != 4:
        raise ValueError(f"darknet boxes must be [B, N, 1, 4]; got shape {list(boxes.shape)}")
    if confs.ndim != 3 or confs.shape[2] != nc or confs.shape[:2] != boxes.shape[:2]:
        raise ValueError(
            f"darknet confs must be [B, N, nc] with N={boxes.shape[1]}, nc={nc}; got shape {list(confs.shape)}"
        )
    h, w = input_size
    scale = np.array([w, h, w, h], dtype=np.float32)
    results = []
    for i in range(boxes.shape[0]):
        results.append(
            _finish(
                boxes[i] * scale, confs[i], labels, conf_threshold, iou_threshold, _lb(letterboxes, i), max_detections
            )
        )
    return results


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy NMS on [K, 4] x1y1x2y2 boxes; indices kept, best score first.

    Ties keep the earlier box, so results do not depend on sort stability.
    """
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        iw = np.clip(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0, None)
        ih = np.clip(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0, None)
        inter = iw * ih
        union = areas[i] + areas[rest] - inter
        iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.intp)


def _lb(letterboxes: Sequence[Letterbox] | None, i: int) -> Letterbox | None:
    if letterboxes is None:
        return None
    if i >= len(letterboxes):
        raise ValueError(f"output has more images than letterboxes ({len(letterboxes)})")
    return letterboxes[i]


def _finish(
    boxes: np.ndarray,
    class_scores: np.ndarray,
    labels: Sequence[str],
    conf_threshold: float,
    iou_threshold: float,
    letterbox: Letterbox | None,
    max_detections: int,
) -> list[Detection]:
    # One label per box, as both reference post-processors do.
    cls = np.argmax(class_scores, axis=1)
    score = class_scores[np.arange(len(cls)), cls]
    sel = score > conf_threshold
    boxes, score, cls = boxes[sel].astype(np.float64), score[sel].astype(np.float64), cls[sel]
    if letterbox is not None:
        boxes = letterbox.unmap(boxes)
        # A box that lies wholly in the letterbox padding clips to nothing: it
        # found no part of the image (a narrow wrist film leaves wide bars).
        # Dropped before NMS, so it can neither suppress nor fill a real slot.
        inside = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, score, cls = boxes[inside], score[inside], cls[inside]
    if not len(score):
        return []
    # Class-wise: a head box must not suppress an overlapping spine box.
    keep = np.concatenate(
        [np.flatnonzero(cls == c)[nms(boxes[cls == c], score[cls == c], iou_threshold)] for c in np.unique(cls)]
    )
    keep = keep[np.argsort(-score[keep], kind="stable")][:max_detections]
    boxes, score, cls = boxes[keep], score[keep], cls[keep]
    return [
        Detection(label=labels[c], score=float(s), box=(float(b[0]), float(b[1]), float(b[2]), float(b[3])))
        for b, s, c in zip(boxes, score, cls)
    ]
