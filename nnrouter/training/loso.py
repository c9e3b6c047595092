"""Leave one source out: how the view classifier does on a source it never saw.

A random split of the shared data puts images of the same source on both
sides, so it measures how well the model knows a source's look as much as the
anatomy. The figure to set beside a published external accuracy is this one:
for every source S of a class that has two or more sources, the recipe that
made the shipped model is run again without any image of S (of any class),
and S's images are then classified as the exported model would classify them,
"unknown" included.

The folds share one feature bank (see nnrouter.training.train.Bank): the frozen half of
the network is ImageNet's and never saw any source, so sharing it leaks
nothing of S into its fold. Each fold sets its own temperature and unknown
thresholds on its own validation images.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from nnrouter.training.train import (
    Entry,
    TrainConfig,
    build_bank,
    claimed_labels,
    fit,
    read_manifest,
    training_subset,
)

__all__ = ["Prediction", "leave_one_source_out", "multi_source_classes", "summarise"]


@dataclass(frozen=True)
class Prediction:
    """One held-out image: its truth, and what the fold trained without its source said."""

    file: str
    source: str
    truth: str
    label: str  # the decision, "unknown" included
    top: str  # the top class before the unknown thresholds
    score: float
    ood: float


def multi_source_classes(entries: list[Entry], labels: list[str]) -> dict[str, list[str]]:
    """Claimed classes with two or more source groups, and those groups."""
    groups: dict[str, set[str]] = {}
    for e in entries:
        if e.label in labels:
            groups.setdefault(e.label, set()).add(e.group)
    return {label: sorted(gs) for label, gs in sorted(groups.items()) if len(gs) > 1}


def summarise(predictions: list[Prediction], classes: dict[str, list[str]]) -> dict[str, dict[str, dict]]:
    """Per class and held-out source: n, sensitivity, precision and what the misses were called.

    Sensitivity counts "unknown" as a miss; top_class_sensitivity does not
    (it is the share whose top class was right, whatever the gates said).

    Precision is taken over the held-out source's own images: of those the
    fold called class c, the share that are c.
    """
    table: dict[str, dict[str, dict]] = {}
    tested = {p.source for p in predictions}
    for label, sources in classes.items():
        for source in sources:
            if source not in tested:
                continue  # a fold not run (sources= named a subset)
            mine = [p for p in predictions if p.source == source]
            truth = [p for p in mine if p.truth == label]
            called = [p for p in mine if p.label == label]
            hits = sum(p.label == label for p in truth)
            table.setdefault(label, {})[source] = {
                "n": len(truth),
                "sensitivity": round(hits / len(truth), 4) if truth else None,
                # The top class alone, before the unknown gates: tells a wrong call from a refusal.
                "top_class_sensitivity": round(sum(p.top == label for p in truth) / len(truth), 4) if truth else None,
                # Over the held-out source's own images; None where it has no other class to confuse.
                "precision": (
                    round(sum(p.truth == label for p in called) / len(called), 4)
                    if called and any(p.truth != label for p in mine)
                    else None
                ),
                "missed_as": dict(Counter(p.label for p in truth if p.label != label).most_common()),
            }
    return table


def fold_subset(entries: list[Entry], labels: list[str], keep: list[int], source: str, cfg: TrainConfig) -> list[int]:
    """What the recipe trains on once ``source`` is gone: the same per-class cap, refilled from the other sources.

    The shipped model's cap picks ``max_per_class`` images of a class; with one
    source removed, the class is topped up to the cap from the other sources'
    images in the same hash order, as training on the data without that source
    would. Images beyond the shipped cap have only their plain view in the
    bank, so the refill is trained without augmented views.
    """
    others = [i for i, e in enumerate(entries) if e.group != source]
    recipe = training_subset([entries[i] for i in others], labels, cfg.max_per_class, cfg.seed)
    return sorted(others[j] for j in recipe)


def leave_one_source_out(
    manifest: Path, cfg: TrainConfig, *, cache_dir: Path | None = None, sources: list[str] | None = None, log=print
) -> dict:
    """Run one fold per source of every multi-source class; the figures and every held-out prediction."""
    entries = read_manifest(manifest)
    labels, _ = claimed_labels(entries, cfg.min_images)
    classes = multi_source_classes(entries, labels)
    if not classes:
        return {"measurable": False, "reason": "every claimed class comes from a single source"}
    held = sources or sorted({s for ss in classes.values() for s in ss})
    keep = training_subset(entries, labels, cfg.max_per_class, cfg.seed)
    bank = build_bank(entries, keep, cfg, cache_dir=cache_dir, log=log)
    predictions: list[Prediction] = []
    folds = []
    for source in held:
        t0 = time.time()
        train_idx = fold_subset(entries, labels, keep, source, cfg)
        trained = Counter(entries[i].label for i in train_idx)
        missing = [label for label in labels if not trained[label]]
        fold_labels = [label for label in labels if trained[label]]
        log(
            f"fold without {source}: {len(train_idx)} training images"
            + (f"; no training image left for {', '.join(missing)}" if missing else "")
        )
        fitted = fit(bank, entries, fold_labels, train_idx, cfg, log=lambda m: log(f"  {m}"))
        test_idx = [i for i, e in enumerate(entries) if e.group == source]
        for i, d in zip(test_idx, fitted.decide(bank, test_idx, cfg)):
            e = entries[i]
            predictions.append(
                Prediction(Path(e.file).name, source, e.label, d["label"], d["top"], d["score"], d["ood"])
            )
        folds.append(
            {
                "held_out": source,
                "trained_images": dict(sorted(trained.items())),
                "untrained": missing,
                "test_images": len(test_idx),
                "val_accuracy": round(fitted.val_accuracy, 4),
                "epochs": len(fitted.history),
                "seconds": round(time.time() - t0, 1),
                "thresholds": {
                    "temperature": round(fitted.temperature, 4),
                    "unknown": round(fitted.unknown_threshold, 4),
                    "ood": fitted.ood["threshold"],
                },
            }
        )
    return {
        "measurable": True,
        "classes": classes,
        "table": summarise(predictions, classes),
        "folds": folds,
        "config": {"augment": cfg.augment, "seed": cfg.seed, "epochs": cfg.epochs, "min_images": cfg.min_images},
        "predictions": [p.__dict__ for p in predictions],
    }


def table_text(result: dict) -> str:
    """The leave-one-source-out table as a reader wants it: one row per class and held-out source."""
    if not result.get("measurable"):
        return f"leave-one-source-out: not measurable ({result.get('reason')})"
    lines = [
        "leave-one-source-out (trained without the source, tested on all of its images):",
        f"  {'class':<22}{'held-out source':<46}{'n':>5}{'sens':>7}{'prec':>7}{'top':>7}  missed as",
    ]
    for label, per in result["table"].items():
        for source, m in per.items():
            sens = "-" if m["sensitivity"] is None else f"{m['sensitivity']:.3f}"
            prec = "-" if m["precision"] is None else f"{m['precision']:.3f}"
            missed = ", ".join(f"{k} {v}" for k, v in m["missed_as"].items()) or "-"
            top = "-" if m.get("top_class_sensitivity") is None else f"{m['top_class_sensitivity']:.3f}"
            lines.append(f"  {label:<22}{source:<46}{m['n']:>5}{sens:>7}{prec:>7}{top:>7}  {missed}")
    lines.append(
        "  (sens: the decision, unknown counted as a miss; top: the top class alone, before the unknown gates)"
    )
    return "\n".join(lines)
