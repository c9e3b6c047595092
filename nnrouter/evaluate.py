"""Evaluate a view classifier the way it will be used: through the ONNX runtime.

Numbers from a random split of single-source classes measure the source as
much as the anatomy, so the report always carries the figures that can
embarrass the model too: how it does on images from other sources (real DICOM
through the decode stage) and which anatomy it calls "unknown".
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from nnrouter.train import Entry, is_validation, load_gray, read_manifest

UNKNOWN = "unknown"


@dataclass
class Report:
    labels: list[str]
    confusion: list[list[int]]  # rows: truth, columns: prediction (argmax, before "unknown")
    accuracy: float
    per_class: dict[str, dict[str, float | int | None]]
    ece: float
    unknown_rate: float
    images: int
    groups: dict[str, dict[str, float | int]]
    leave_one_source_out: str
    external: list[dict] = field(default_factory=list)

    def text(self) -> str:
        lines = [f"{self.images} images; accuracy {self.accuracy:.3f}; expected calibration error {self.ece:.3f}; "
                 f"reported unknown {self.unknown_rate:.1%}", f"{'class':<24}{'n':>5}{'sensitivity':>13}{'precision':>11}"]
        for label, m in self.per_class.items():
            sens = "-" if m["sensitivity"] is None else f"{m['sensitivity']:.3f}"
            prec = "-" if m["precision"] is None else f"{m['precision']:.3f}"
            lines.append(f"{label:<24}{m['n']:>5}{sens:>13}{prec:>11}")
        lines.append(f"leave-one-source-out: {self.leave_one_source_out}")
        if self.external:
            lines.append("external images (other sources, through the decode stage):")
            for e in self.external:
                lines.append(f"  {Path(e['file']).name:<36} -> {e['label']:<22} score {e['score']:.2f}  ood {e['ood']:.1f}"
                             + (f"  (top class {e['top']})" if e["label"] == UNKNOWN else ""))
        return "\n".join(lines)


def metrics_from_confusion(confusion: np.ndarray, labels: list[str]) -> tuple[float, dict]:
    """Accuracy and per-class sensitivity/precision, from the confusion matrix alone."""
    total = confusion.sum()
    accuracy = float(np.trace(confusion) / total) if total else 0.0
    per_class = {}
    for k, label in enumerate(labels):
        n = int(confusion[k].sum())
        predicted = int(confusion[:, k].sum())
        per_class[label] = {
            "n": n,
            "sensitivity": round(float(confusion[k, k] / n), 4) if n else None,
            "precision": round(float(confusion[k, k] / predicted), 4) if predicted else None,
        }
    return accuracy, per_class


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = 10) -> float:
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (confidence > lo) & (confidence <= hi)
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - confidence[sel].mean())
    return float(ece)


def confusion_png(confusion: np.ndarray, labels: list[str], path: Path) -> None:
    cell, left, top = 44, 200, 200
    k = len(labels)
    img = np.full((top + cell * k + 10, left + cell * k + 10, 3), 255, np.uint8)
    rows = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    for i in range(k):
        cv2.putText(img, labels[i][:22], (5, top + cell * i + 28), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1)
        for j in range(k):
            shade = int(255 - 200 * rows[i, j])
            x, y = left + cell * j, top + cell * i
            cv2.rectangle(img, (x, y), (x + cell, y + cell), (255, shade, shade), -1)
            cv2.rectangle(img, (x, y), (x + cell, y + cell), (180, 180, 180), 1)
            cv2.putText(img, str(int(confusion[i, j])), (x + 6, y + 28), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                        (0, 0, 0) if rows[i, j] < 0.6 else (255, 255, 255), 1)
    for j in range(k):
        # Column labels written sideways: draw horizontally, then rotate.
        label = np.full((cell, 190, 3), 255, np.uint8)
        cv2.putText(label, labels[j][:22], (2, 28), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1)
        x = left + cell * j
        img[top - 194: top - 4, x: x + cell] = cv2.rotate(label, cv2.ROTATE_90_COUNTERCLOCKWISE)
    cv2.putText(img, "truth (rows) vs prediction (columns)", (5, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1)
    cv2.imwrite(str(path), img)


def data_sources(manifest: Path) -> dict[str, dict]:
    """Images and licences per source group, from the manifest and the data's own MANIFEST.csv."""
    import csv
    import os

    entries = read_manifest(manifest)
    out: dict[str, dict] = {}
    for e in entries:
        g = out.setdefault(e.group, {"images": 0, "classes": set(), "licences": set()})
        g["images"] += 1
        g["classes"].add(e.label)
    root = Path(os.path.commonpath([e.file for e in entries])) if entries else None
    source_manifest = root / "MANIFEST.csv" if root else None
    if source_manifest and source_manifest.is_file():
        with open(source_manifest, newline="") as f:
            for row in csv.DictReader(f):
                if row.get("repo") in out and row.get("license"):
                    out[row["repo"]]["licences"].add(row["license"])
    return {g: {"images": v["images"], "classes": sorted(v["classes"]), "licences": sorted(v["licences"]) or ["not recorded"]}
            for g, v in sorted(out.items())}


LIMITATIONS = [
    "Each class in the training data comes from one public source with its own look (crop, contrast processing, "
    "implants, age); validation images come from the same sources, so validation accuracy measures recognition of "
    "those sources as much as of anatomy. It is not an estimate of accuracy at a hospital.",
    "Leave-one-source-out accuracy cannot be measured: no class has a second source.",
    "Calibration cannot be measured either: with every validation image right, the fitted temperature runs to the "
    "bound of its search and the calibration error is trivially near zero.",
    "Classes listed in not_covered were never seen: the model can never predict them, and a router must not read "
    "'not predicted' as 'not present' for them.",
    "Unseen anatomy is caught only as far as the out-of-distribution distance separates it: see metrics.external for "
    "real DICOM from other sources, including the cases it gets wrong.",
    "Which of those files a training run gets wrong is partly chance: in six runs (seeds 0-2, with and without an "
    "augmentation mimicking linear-intensity detectors, tried and not kept) the lungs-bright DX chest came out unknown every time, the dog's limb was "
    "shoulder_ap in four, and the lower leg once shoulder_ap at 1.00. One run's external results are not a rate.",
    "Training data licences include non-commercial (CC BY-NC-SA, CC BY-NC-ND) and unstated terms: research use "
    "only until the data is replaced.",
]


def update_card(model_dir: Path, report: Report, manifest: Path, split: str) -> None:
    """Write what was measured, and what it cannot show, into the model card."""
    from nnrouter.modelcard import load_card, write_card

    card = load_card(model_dir)
    metrics = dict(card.metrics)
    metrics["evaluation"] = {
        "split": split, "images": report.images, "accuracy": report.accuracy,
        "per_class": report.per_class, "expected_calibration_error": report.ece,
        "reported_unknown": report.unknown_rate, "leave_one_source_out": report.leave_one_source_out,
    }
    if report.external:
        metrics["external"] = {Path(e["file"]).name: {k: e[k] for k in ("label", "score", "ood", "top")} for e in report.external}
    metrics["data"] = data_sources(manifest)
    write_card(card.model_copy(update={"metrics": metrics, "limitations": LIMITATIONS}), model_dir)


def evaluate(model_dir: Path, manifest: Path, *, split: str = "val", external: list[Path] | None = None,
             out: Path | None = None, batch: int = 32) -> Report:
    from nnrouter.runtime import Model

    model = Model.load(model_dir)
    card = model.card
    cfg = card.metrics.get("training", {}).get("config", {})
    percent, seed = int(cfg.get("val_percent", 15)), int(cfg.get("seed", 0))
    entries = [e for e in read_manifest(manifest) if e.label in card.labels]
    if split == "val":
        entries = [e for e in entries if is_validation(e, percent, seed)]
    index = {label: i for i, label in enumerate(card.labels)}
    k = len(card.labels)
    confusion = np.zeros((k, k), dtype=int)
    confidence, correct, unknown = [], [], 0
    groups: dict[str, dict[str, int]] = {}
    for s in range(0, len(entries), batch):
        chunk: list[Entry] = entries[s:s + batch]
        results = model.classify([load_gray(e) for e in chunk])
        for e, r in zip(chunk, results):
            pred = index[r.top[0][0]]
            truth = index[e.label]
            confusion[truth, pred] += 1
            confidence.append(r.score)
            correct.append(pred == truth)
            unknown += r.label == UNKNOWN
            g = groups.setdefault(e.group, {"n": 0, "correct": 0})
            g["n"] += 1
            g["correct"] += int(pred == truth)
    accuracy, per_class = metrics_from_confusion(confusion, card.labels)
    sources = {}
    for e in read_manifest(manifest):
        sources.setdefault(e.label, set()).add(e.group)
    multi = sorted(label for label, gs in sources.items() if len(gs) > 1)
    loso = (f"classes with several sources: {', '.join(multi)} (retrain without each source to measure)"
            if multi else "not measurable: every class in this dataset comes from a single source")
    report = Report(
        labels=card.labels,
        confusion=confusion.tolist(),
        accuracy=round(accuracy, 4),
        per_class=per_class,
        ece=round(expected_calibration_error(np.array(confidence), np.array(correct, dtype=float)), 4),
        unknown_rate=round(unknown / max(1, len(entries)), 4),
        images=len(entries),
        groups={g: {"n": v["n"], "accuracy": round(v["correct"] / v["n"], 4)} for g, v in groups.items()},
        leave_one_source_out=loso,
    )
    for f in external or []:
        from nnrouter.decode import DecodeError, decode_file

        try:
            img = decode_file(f, max_side=1024).image
        except DecodeError as exc:
            report.external.append({"file": str(f), "label": "undecodable", "score": 0.0, "ood": 0.0, "top": exc.reason})
            continue
        (r,) = model.classify([img])
        report.external.append({"file": str(f), "label": r.label, "score": round(r.score, 4),
                                "ood": round(r.ood or 0.0, 2), "top": r.top[0][0]})
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report.__dict__, indent=2))
        confusion_png(confusion, card.labels, out / "confusion.png")
    return report
