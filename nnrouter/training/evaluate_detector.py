"""How well the region detector finds regions, on a source it has never seen.

Every source of boxes has its own look (CADMA's films are cropped and
contrast-equalised by their provider, the AASCE films are whole-spine
surveys), so a random split of one source mostly measures recognition of that
source. The figure that matters for a hospital's own films is held-out-source:
the detector's own recipe (its card's training config) is retrained with one
spine source left out, then tested on that source. Head has a single source,
so it is tested on a fixed hash split of its images that the folds never train
on or choose thresholds on.

Figures, per label: AP at IoU 0.5 (VOC, all-points interpolation, over every
detection down to a score of 0.001), and the mean IoU of each ground-truth
box with its best detection above the model's conf threshold (0 when there is
none), which is what a router acting on the boxes gets. Detections on images
that lack the label (a spine claimed on a knee) count as false positives.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from nnrouter.pixels.detect import Detection

__all__ = [
    "DetectorReport",
    "LabelFigures",
    "average_precision",
    "evaluate",
    "f1_at",
    "figures",
    "fold_split",
    "iou",
    "update_card",
]

Truth = list[list[tuple[str, tuple[float, ...]]]]  # per image: (label, (x0, y0, x1, y1))
AP_FLOOR = 0.001  # detections kept for the precision-recall curve


@dataclass(frozen=True)
class LabelFigures:
    ap50: float  # nan when there is no ground-truth box of the label
    mean_iou: float
    boxes: int  # ground-truth boxes
    images: int  # images looked at (with and without the label)
    recall: float  # at IoU 0.5, detections above conf
    precision: float


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def average_precision(scores: Sequence[float], tp: Sequence[bool], n_gt: int) -> float:
    """VOC AP with all-points interpolation: area under the precision envelope over recall."""
    if n_gt == 0:
        return float("nan")
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    hits = np.asarray(tp, dtype=np.float64)[order]
    ctp, cfp = np.cumsum(hits), np.cumsum(1 - hits)
    recall = np.concatenate([[0.0], ctp / n_gt, [1.0]])
    precision = np.concatenate([[0.0], ctp / np.maximum(ctp + cfp, 1e-12), [0.0]])
    for i in range(len(precision) - 2, -1, -1):
        precision[i] = max(precision[i], precision[i + 1])
    step = np.flatnonzero(recall[1:] != recall[:-1])
    return float(np.sum((recall[step + 1] - recall[step]) * precision[step + 1]))


def _match(
    dets: list[list[Detection]], gts: Truth, label: str, conf: float, thr: float = 0.5
) -> tuple[list[float], list[bool], int]:
    """VOC matching per image: best score first, to the ground truth it overlaps most; a taken one is a miss."""
    scores, tp, n_gt = [], [], 0
    for found, truth in zip(dets, gts):
        boxes = [b for lab, b in truth if lab == label]
        n_gt += len(boxes)
        taken = [False] * len(boxes)
        for d in sorted((d for d in found if d.label == label and d.score > conf), key=lambda d: -d.score):
            overlaps = [iou(d.box, b) for b in boxes]
            j = int(np.argmax(overlaps)) if overlaps else -1
            hit = j >= 0 and overlaps[j] >= thr and not taken[j]
            if hit:
                taken[j] = True
            scores.append(d.score)
            tp.append(hit)
    return scores, tp, n_gt


def f1_at(dets: list[list[Detection]], gts: Truth, label: str, conf: float) -> float:
    """F1 of the detections above ``conf`` at IoU 0.5: what choosing the threshold trades."""
    _, tp, n_gt = _match(dets, gts, label, conf)
    hits = sum(tp)
    denom = 2 * hits + (len(tp) - hits) + (n_gt - hits)
    return 2 * hits / denom if denom else 1.0


def figures(dets: list[list[Detection]], gts: Truth, labels: Sequence[str], conf: float) -> dict[str, LabelFigures]:
    """AP@0.5 over all detections given, mean best IoU and recall/precision above ``conf``, per label."""
    out = {}
    for label in labels:
        scores, tp, n_gt = _match(dets, gts, label, 0.0)
        ap = average_precision(scores, tp, n_gt)
        _, tp_c, _ = _match(dets, gts, label, conf)
        ious = []
        for found, truth in zip(dets, gts):
            mine = [d.box for d in found if d.label == label and d.score > conf]
            for lab, b in truth:
                if lab == label:
                    ious.append(max((iou(b, m) for m in mine), default=0.0))
        out[label] = LabelFigures(
            ap50=round(ap, 4) if n_gt else float("nan"),
            mean_iou=round(float(np.mean(ious)), 4) if ious else float("nan"),
            boxes=n_gt,
            images=len(gts),
            recall=round(sum(tp_c) / n_gt, 4) if n_gt else float("nan"),
            precision=round(sum(tp_c) / len(tp_c), 4) if tp_c else float("nan"),
        )
    return out


@dataclass
class SplitResult:
    name: str  # what was held out and how
    model: str  # which network answered
    conf_threshold: float
    iou_threshold: float
    per_label: dict[str, LabelFigures]


@dataclass
class DetectorReport:
    model: str
    version: str
    results: list[SplitResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    fold_epochs: int = 0  # the most epochs a held-out-source fold trained

    def text(self) -> str:
        lines = [
            (
                f"detector {self.model} v{self.version}: AP@0.5 (VOC all-points) and mean IoU of each "
                "ground-truth box with its best detection above conf (0 if none)"
            )
        ]
        lines.append(
            f"{'split':<58} {'label':<6} {'images':>6} {'boxes':>5} {'AP@0.5':>7} {'meanIoU':>7} "
            f"{'recall':>6} {'prec':>6}"
        )
        for r in self.results:
            for label, f in r.per_label.items():
                if not f.boxes:
                    continue
                lines.append(
                    f"{r.name[:58]:<58} {label:<6} {f.images:>6} {f.boxes:>5} {f.ap50:>7.3f} "
                    f"{f.mean_iou:>7.3f} {f.recall:>6.3f} {f.precision:>6.3f}"
                )
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_json(self) -> dict:
        """Plain data; an undefined figure (nan: no box of the label) is null."""
        out = _no_nan(
            {
                "model": self.model,
                "version": self.version,
                "notes": self.notes,
                "results": [asdict(r) for r in self.results],
            }
        )
        assert isinstance(out, dict)  # _no_nan turns a dict into a dict
        return out


def _onnx_detections(model_dir: Path, images: list[np.ndarray]) -> tuple[list[list[Detection]], float, float]:
    """The shipped ONNX, preprocessed by the runtime, decoded down to AP_FLOOR (Model.detect stops at conf)."""
    import onnxruntime as ort

    from nnrouter.pixels.detect import decode_ultralytics
    from nnrouter.pixels.runtime import Model

    model = Model.load(model_dir, providers=["CPUExecutionProvider"])
    card = model.card
    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    out: list[list[Detection]] = []
    for s in range(0, len(images), 32):
        x, placed = model.preprocess(images[s : s + 32])
        (pred,) = session.run([card.outputs["predictions"]], {card.input_name: x})
        out += decode_ultralytics(pred, card.labels, AP_FLOOR, card.iou_threshold, letterboxes=placed)
    return out, card.conf_threshold, card.iou_threshold


def evaluate(
    model_dir: Path,
    regions: Path,
    *,
    negatives: Sequence[Path] | None = None,
    out: Path | None = None,
    cache_dir: Path | None = None,
    max_epochs: int = 0,
    log: Callable[[str], None] = print,
) -> DetectorReport:
    """The shipped model on its validation split, then the recipe retrained with each spine source held out."""
    from nnrouter.pixels.modelcard import load_card
    from nnrouter.training.train_detector import (
        DetectorConfig,
        _load,
        bucket,
        build_bank,
        data_digest,
        default_negatives,
        fit,
        load_samples,
        predict,
        truth,
    )

    model_dir = Path(model_dir)
    card = load_card(model_dir)
    if card.task != "detect":
        raise ValueError(f"{model_dir}: a {card.task} model; this evaluation is for detectors")
    training = card.metrics.get("training", {})
    cfg = DetectorConfig(**training.get("config", {}))
    if max_epochs:  # cap the folds (the shipped model's own recipe otherwise); the report says so
        cfg = replace(cfg, epochs=min(cfg.epochs, max_epochs))
    if negatives is None:
        listed = [Path(p) for p in training.get("negatives", [])]
        negatives = listed if listed and all(p.is_dir() for p in listed) else default_negatives(regions)
    samples, _ = load_samples(regions, negatives, cfg)
    labels = list(card.labels)
    report = DetectorReport(card.name, card.version, fold_epochs=cfg.epochs)
    trained_digest = card.metrics.get("reproduce", {}).get("annotations_digest")
    if trained_digest and trained_digest != data_digest(samples):
        report.notes.append(
            "the annotations differ from those the model was trained on (digest): "
            "its validation split may include images it was trained on"
        )
    split = [bucket(s.file, cfg) for s in samples]
    bank = build_bank(
        samples, labels, [i for i, b in enumerate(split) if b != "val"], cfg, cache_dir=cache_dir, log=log
    )

    val_idx = [i for i, b in enumerate(split) if b == "val"]
    images = [_load(samples[i], cfg)[0] for i in val_idx]
    dets, conf, nms_iou = _onnx_detections(model_dir, images)
    report.results.append(
        SplitResult(
            f"validation: random {cfg.val_percent}% hash split, all sources",
            "shipped ONNX",
            conf,
            nms_iou,
            figures(dets, truth(samples, bank, val_idx), labels, conf),
        )
    )

    spine_groups = sorted({s.group for s in samples if any(b[0] == "SPINE" for b in s.boxes)})
    if len(spine_groups) < 2:
        report.notes.append(f"one spine source only ({', '.join(spine_groups)}): no held-out-source figure for spine")
    for held in spine_groups if len(spine_groups) > 1 else []:
        others = [g for g in spine_groups if g != held]
        train_idx, fold_val, test = fold_split(samples, split, held)
        log(
            f"fold: spine source {held} held out; training on {len(train_idx)} images "
            f"({', '.join(others)} spine, head, negatives), {len(fold_val)} for thresholds, testing on {len(test)}"
        )
        fitted = fit(bank, samples, labels, train_idx, fold_val, cfg, log=log)
        found = predict(fitted.det, bank, test, labels, AP_FLOOR, fitted.iou_threshold)
        gts = truth(samples, bank, test)
        tag = f"fold without {held} (retrained, conf/iou on its own val)"

        in_source = {i for i in test if samples[i].group in others and any(b[0] == "SPINE" for b in samples[i].boxes)}
        d, g = _subset(found, gts, [i not in in_source for i in test])
        spine_out = figures(d, g, ["SPINE"], fitted.conf_threshold)
        d, g = _subset(found, gts, [samples[i].group != held for i in test])
        spine_in = figures(d, g, ["SPINE"], fitted.conf_threshold)
        head = figures(found, gts, [lab for lab in labels if lab != "SPINE"], fitted.conf_threshold)
        for name, figs in (
            (f"SPINE held out: {held} (trained on {', '.join(others)})", spine_out),
            (f"SPINE in-source: {', '.join(others)} test split", spine_in),
            (f"other labels: {cfg.test_percent}% hash test split", head),
        ):
            report.results.append(SplitResult(name, tag, fitted.conf_threshold, fitted.iou_threshold, figs))
    report.notes.append(
        "spine held-out rows: trained on one spine source, tested on every image of the other "
        "(plus the fold's test-split head and negative films, where any spine claimed is a false "
        "positive); head has one source: a fixed hash split, never trained on or used for thresholds"
    )
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report.to_json(), indent=2))
    return report


def fold_split(samples: Sequence, split: Sequence[str], held: str) -> tuple[list[int], list[int], list[int]]:
    """Train, threshold and test samples of the fold that holds out source ``held``.

    The held source is all test; every other source (head, the other spine
    source, the negatives) trains on its 'train' bucket, picks thresholds on
    'val' and is tested on 'test', so no fold has seen a test image.
    """
    train = [i for i, s in enumerate(samples) if s.group != held and split[i] == "train"]
    val = [i for i, s in enumerate(samples) if s.group != held and split[i] == "val"]
    test = [i for i, s in enumerate(samples) if s.group == held or split[i] == "test"]
    return train, val, test


def _subset(found: list[list[Detection]], gts: Truth, keep: list[bool]) -> tuple[list[list[Detection]], Truth]:
    return [f for f, k in zip(found, keep) if k], [g for g, k in zip(gts, keep) if k]


def _no_nan(o: object) -> object:
    if isinstance(o, float) and o != o:
        return None
    if isinstance(o, dict):
        return {k: _no_nan(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_no_nan(v) for v in o]
    return o


def update_card(model_dir: Path, report: DetectorReport) -> None:
    """Write the figures into the card; the weights and their sha256 stay as they are."""
    from nnrouter.pixels.modelcard import load_card, write_card

    card = load_card(model_dir)
    data = report.to_json()
    metrics = dict(card.metrics)
    metrics["held_out_source"] = {
        "how": report.notes,
        "fold_epochs": report.fold_epochs,
        "results": [r for r in data["results"] if r["model"] != "shipped ONNX"],
    }
    metrics["validation_onnx"] = next((r for r in data["results"] if r["model"] == "shipped ONNX"), None)
    write_card(card.model_copy(update={"metrics": metrics}), model_dir)
