"""Evaluate a view classifier the way it will be used: through the ONNX runtime.

Numbers from a random split of single-source classes measure the source as
much as the anatomy, so the report always carries the figures that can
embarrass the model too: how it does on images from other sources (real DICOM
through the decode stage) and which anatomy it calls "unknown".
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np

from nnrouter.training.train import Entry, is_validation, load_gray, read_manifest

UNKNOWN = "unknown"


# What the issue asks of the model on sources it never saw (leave-one-source-out sensitivity).
TARGETS = {"chest_pa_ap": 0.95, "panoramic_radiograph": 0.95, "chest_lateral": 0.8, "abdomen_ap": 0.8}


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
    leave_one_source_out: dict
    external: list[dict] = field(default_factory=list)
    probes: dict[str, dict[str, int]] = field(default_factory=dict)  # unclaimed classes: what they were called
    ablation: dict | None = None  # leave-one-source-out without the augmented views
    cams: list[str] = field(default_factory=list)
    unknown: int = 0  # images called "unknown" (unknown_rate is unknown / images)

    def text(self) -> str:
        from nnrouter.training.loso import table_text

        lines = [
            (
                f"{self.images} images; accuracy {self.accuracy:.3f}; expected calibration error {self.ece:.3f}; "
                f"reported unknown {self.unknown_rate:.1%}"
            ),
            f"{'class':<24}{'n':>5}{'sensitivity':>13}{'precision':>11}",
        ]
        for label, m in self.per_class.items():
            sens = "-" if m["sensitivity"] is None else f"{m['sensitivity']:.3f}"
            prec = "-" if m["precision"] is None else f"{m['precision']:.3f}"
            lines.append(f"{label:<24}{m['n']:>5}{sens:>13}{prec:>11}")
        lines.append(table_text(self.leave_one_source_out))
        for label, per in target_check(self.leave_one_source_out).items():
            lines += [
                f"  target {label} >= {TARGETS[label]:.2f}: {source} {'met' if ok else 'MISSED'}"
                for source, ok in per.items()
            ]
        if self.ablation:
            lines.append("augmentation ablation (leave-one-source-out mean sensitivity per class, with -> without):")
            for label, (on, off) in self.ablation["mean_sensitivity"].items():
                lines.append(f"  {label:<22} {on:.3f} -> {off:.3f}")
        if self.probes:
            lines.append("classes too small to claim (never trained on), and what the model called them:")
            for label, called in self.probes.items():
                lines.append(f"  {label:<22} " + ", ".join(f"{k} {v}" for k, v in called.items()))
        if self.external:
            lines.append("external images (other sources, through the decode stage):")
            for e in self.external:
                lines.append(
                    f"  {Path(e['file']).name:<36} -> {e['label']:<22} score {e['score']:.2f}  ood {e['ood']:.1f}"
                    + (f"  (top class {e['top']})" if e["label"] == UNKNOWN else "")
                )
        if self.cams:
            lines.append(f"class activation maps: {', '.join(self.cams)}")
        return "\n".join(lines)


def target_check(loso: dict) -> dict[str, dict[str, bool]]:
    """Per target class and held-out source: was the sensitivity target met?"""
    out: dict[str, dict[str, bool]] = {}
    for label, per in (loso.get("table") or {}).items():
        if label in TARGETS:
            out[label] = {s: m["sensitivity"] >= TARGETS[label] for s, m in per.items() if m["sensitivity"] is not None}
    return out


def mean_sensitivity(loso: dict) -> dict[str, float]:
    return {
        label: round(float(np.mean([m["sensitivity"] for m in per.values() if m["sensitivity"] is not None])), 4)
        for label, per in (loso.get("table") or {}).items()
        if any(m["sensitivity"] is not None for m in per.values())
    }


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
    for lo, hi in itertools.pairwise(edges):
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
            cv2.putText(
                img,
                str(int(confusion[i, j])),
                (x + 6, y + 28),
                cv2.FONT_HERSHEY_SIMPLEX,
                0.45,
                (0, 0, 0) if rows[i, j] < 0.6 else (255, 255, 255),
                1,
            )
    for j in range(k):
        # Column labels written sideways: draw horizontally, then rotate.
        label = np.full((cell, 190, 3), 255, np.uint8)
        cv2.putText(label, labels[j][:22], (2, 28), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1)
        x = left + cell * j
        img[top - 194 : top - 4, x : x + cell] = cv2.rotate(label, cv2.ROTATE_90_COUNTERCLOCKWISE)
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
    return {
        g: {
            "images": v["images"],
            "classes": sorted(v["classes"]),
            "licences": sorted(v["licences"]) or ["not recorded"],
        }
        for g, v in sorted(out.items())
    }


LIMITATIONS = [
    (
        "Validation images come from the same sources as the training images: the validation figures measure how well "
        "the model knows those sources as much as the anatomy. metrics.leave_one_source_out is the figure for a source "
        "the model never saw, and exists only for classes with two or more sources."
    ),
    (
        "Classes listed in not_covered were never trained on (no images, or too few to claim): the model never predicts "
        "them, and a router must not read 'not predicted' as 'not present' for them."
    ),
    (
        "Unseen anatomy is caught only as far as the out-of-distribution distance separates it: metrics.external lists "
        "real DICOM from other sources, with the cases it gets wrong. One run's external results are not a rate."
    ),
    (
        "Training data licences include non-commercial (CC BY-NC-SA, CC BY-NC-ND) and unstated terms: research use "
        "only until the data is replaced."
    ),
]


def measured_limitations(report: Report, card_metrics: dict) -> list[str]:
    """What this evaluation showed the model cannot do, in words, from the figures themselves."""
    lines = []
    loso = report.leave_one_source_out
    missed = []
    for label, per in target_check(loso).items():
        for source, ok in per.items():
            if not ok:
                m = loso["table"][label][source]
                how = ", ".join(f"{k} {v}" for k, v in m["missed_as"].items())
                missed.append(f"{label} on {source}: sensitivity {m['sensitivity']:.3f} of {m['n']} (missed as {how})")
    if missed:
        lines.append(
            f"Leave-one-source-out targets missed ({', '.join(f'{k} >= {v}' for k, v in TARGETS.items())}): "
            + "; ".join(missed)
            + "."
        )
    elif loso.get("measurable"):
        lines.append("Every leave-one-source-out sensitivity target was met on every held-out source.")
    single = sorted(set(report.labels) - set(loso.get("classes") or {}))
    if single:
        lines.append(
            f"Single-source classes ({', '.join(single)}): no held-out-source figure exists; what they are "
            "called on films from elsewhere is in metrics.external and the class activation maps."
        )
    for label, why in (card_metrics.get("training", {}).get("not_trained") or {}).items():
        called = report.probes.get(label)
        seen = f"; its images were called {', '.join(f'{k} {v}' for k, v in called.items())}" if called else ""
        lines.append(f"{label} is not claimed: {why}{seen}.")
    return lines


def update_card(model_dir: Path, report: Report, manifest: Path, split: str) -> None:
    """Write what was measured, and what it cannot show, into the model card."""
    from nnrouter.pixels.modelcard import load_card, write_card

    card = load_card(model_dir)
    metrics = dict(card.metrics)
    metrics["evaluation"] = {
        "split": split,
        "images": report.images,
        "accuracy": report.accuracy,
        "per_class": report.per_class,
        "expected_calibration_error": report.ece,
        "reported_unknown": report.unknown_rate,
    }
    loso = report.leave_one_source_out
    if loso.get("measurable") or "leave_one_source_out" not in metrics:
        metrics["leave_one_source_out"] = {key: v for key, v in loso.items() if key != "predictions"}
        if loso.get("measurable"):
            metrics["leave_one_source_out"]["targets"] = {
                label: {s: "met" if ok else "missed" for s, ok in per.items()}
                for label, per in target_check(loso).items()
            }
    if loso.get("measurable") and not report.ablation:
        metrics.pop("augmentation_ablation", None)  # measured against other leave-one-source-out figures
    if report.ablation:
        metrics["augmentation_ablation"] = {
            "mean_sensitivity_with_and_without": report.ablation["mean_sensitivity"],
            "without_augmentation": report.ablation["without_augmentation"]["table"],
        }
    if report.probes:
        metrics["unclaimed_classes_called"] = report.probes
    if report.external:
        metrics["external"] = {
            Path(e["file"]).name: {k: e[k] for k in ("label", "score", "ood", "top")} for e in report.external
        }
    metrics["data"] = data_sources(manifest)
    limitations = LIMITATIONS + measured_limitations(report, metrics)
    write_card(card.model_copy(update={"metrics": metrics, "limitations": limitations}), model_dir)


def evaluate(
    model_dir: Path,
    manifest: Path,
    *,
    split: str = "val",
    external: list[Path] | None = None,
    out: Path | None = None,
    batch: int = 32,
    loso: bool = False,
    ablate: bool = False,
    cache_dir: Path | None = None,
    cams: int = 0,
    max_epochs: int = 0,
    log=print,
) -> Report:
    from nnrouter.pixels.runtime import Model

    model = Model.load(model_dir)
    card = model.card
    cfg = card.metrics.get("training", {}).get("config", {})
    percent, seed = int(cfg.get("val_percent", 15)), int(cfg.get("seed", 0))
    everything = read_manifest(manifest)
    entries = [e for e in everything if e.label in card.labels]
    if split == "val":
        entries = [e for e in entries if is_validation(e, percent, seed)]
    index = {label: i for i, label in enumerate(card.labels)}
    k = len(card.labels)
    confusion = np.zeros((k, k), dtype=int)
    confidence, correct, unknown = [], [], 0
    groups: dict[str, dict[str, int]] = {}
    for s in range(0, len(entries), batch):
        chunk: list[Entry] = entries[s : s + batch]
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
    # Images of classes the model does not claim: it must not call them something confidently.
    probes: dict[str, dict[str, int]] = {}
    unclaimed = [e for e in everything if e.label not in card.labels]
    for s in range(0, len(unclaimed), batch):
        chunk = unclaimed[s : s + batch]
        for e, r in zip(chunk, model.classify([load_gray(e) for e in chunk])):
            called = probes.setdefault(e.label, {})
            called[r.label] = called.get(r.label, 0) + 1
    probes = {label: dict(sorted(c.items(), key=lambda kv: -kv[1])) for label, c in sorted(probes.items())}
    loso_result: dict = {"measurable": False, "reason": "not run (nnrouter evaluate --loso)"}
    ablation = None
    if loso or ablate:
        from dataclasses import fields

        from nnrouter.training.loso import leave_one_source_out
        from nnrouter.training.train import TrainConfig

        known = {f.name for f in fields(TrainConfig)}
        tcfg = TrainConfig(**{key: v for key, v in cfg.items() if key in known})
        if max_epochs:
            tcfg = replace(tcfg, epochs=min(tcfg.epochs, max_epochs))
        measured = card.metrics.get("leave_one_source_out") or {}
        same = {key: getattr(tcfg, key) for key in ("augment", "seed", "epochs", "min_images")} == measured.get(
            "config"
        )
        if not loso and measured.get("measurable") and same:
            loso_result = measured  # this model's own figures, from an earlier --loso: only the ablation runs
        else:
            loso_result = leave_one_source_out(manifest, tcfg, cache_dir=cache_dir, log=log)
        if ablate and loso_result.get("measurable"):
            without = leave_one_source_out(manifest, replace(tcfg, augment=False), cache_dir=cache_dir, log=log)
            on, off = mean_sensitivity(loso_result), mean_sensitivity(without)
            ablation = {
                "mean_sensitivity": {label: (on[label], off.get(label, 0.0)) for label in on},
                "without_augmentation": {key: without[key] for key in ("table", "folds")},
            }
    report = Report(
        labels=card.labels,
        confusion=confusion.tolist(),
        accuracy=round(accuracy, 4),
        per_class=per_class,
        ece=round(expected_calibration_error(np.array(confidence), np.array(correct, dtype=float)), 4),
        unknown_rate=round(unknown / max(1, len(entries)), 4),
        images=len(entries),
        groups={g: {"n": v["n"], "accuracy": round(v["correct"] / v["n"], 4)} for g, v in groups.items()},
        leave_one_source_out=loso_result,
        unknown=unknown,
        probes=probes,
        ablation=ablation,
    )
    decoded = []
    for f in external or []:
        from nnrouter.pixels.decode import DecodeError, decode_file

        try:
            img = decode_file(f, max_side=1024).image
        except DecodeError as exc:
            report.external.append(
                {"file": str(f), "label": "undecodable", "score": 0.0, "ood": 0.0, "top": exc.reason}
            )
            continue
        (r,) = model.classify([img])
        decoded.append((Path(f).name, img, r))
        report.external.append(
            {
                "file": str(f),
                "label": r.label,
                "score": round(r.score, 4),
                "ood": round(r.ood or 0.0, 2),
                "top": r.top[0][0],
            }
        )
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        confusion_png(confusion, card.labels, out / "confusion.png")
        if cams:
            report.cams = write_cams(model, entries, everything, decoded, cams, out / "cams")
        (out / "report.json").write_text(json.dumps(report.__dict__, indent=2, default=list))
    return report


def write_cams(
    model, validation: list[Entry], everything: list[Entry], external: list, per_class: int, folder: Path
) -> list[str]:
    """Contact sheets of class activation maps: what the model attends to, class by class.

    One sheet per single-source class (validation images, where a shortcut
    would show: an implant, a crop border, a watermark), and one for the real
    DICOM films from other sources.
    """
    sources: dict[str, set[str]] = {}
    for e in everything:
        sources.setdefault(e.label, set()).add(e.group)
    written = []
    for label in model.card.labels:
        if len(sources.get(label, ())) != 1:
            continue
        chosen = [e for e in validation if e.label == label][:per_class]
        if not chosen:
            continue
        imgs = [load_gray(e) for e in chosen]
        tiles = [_tile(img, r, Path(e.file).name) for e, img, r in zip(chosen, imgs, model.classify(imgs))]
        written.append(_sheet(tiles, folder / f"{label}.png"))
    if external:
        written.append(_sheet([_tile(img, r, name) for name, img, r in external], folder / "external.png"))
    return written


def _tile(img: np.ndarray, r, name: str, side: int = 200) -> np.ndarray:
    from nnrouter.pixels.classify import cam_overlay

    tile = np.zeros((side + 30, side, 3), np.uint8)
    o = cam_overlay(img, r.cam if r.cam is not None else np.zeros((7, 7), np.float32), side)
    tile[: o.shape[0], : o.shape[1]] = o
    cv2.putText(tile, name[:30], (2, side + 11), cv2.FONT_HERSHEY_SIMPLEX, 0.33, (255, 255, 255), 1)
    cv2.putText(
        tile,
        f"{r.label} {r.score:.2f} ood {r.ood or 0:.0f}",
        (2, side + 25),
        cv2.FONT_HERSHEY_SIMPLEX,
        0.36,
        (0, 255, 255),
        1,
    )
    return tile


def _sheet(tiles: list[np.ndarray], path: Path, per_row: int = 6) -> str:
    blank = np.zeros_like(tiles[0])
    rows = [
        np.hstack(tiles[i : i + per_row] + [blank] * (per_row - len(tiles[i : i + per_row])))
        for i in range(0, len(tiles), per_row)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.vstack(rows))
    return str(path)
