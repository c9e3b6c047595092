"""Training data, training and evaluation. Needs the [train] extra; nothing here is imported by the service."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from nnrouter.cli import common
from nnrouter.cli.common import CONFIG, OK, USAGE, add, group


def _command(default: str) -> str:
    """The command line as typed, for the model card; ``default`` when not run as ``nnrouter``."""
    typed = "nnrouter " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("nnrouter") else ""
    return typed or default


def cmd_dataset_build(args: argparse.Namespace) -> int:
    from nnrouter.core import yamlfile
    from nnrouter.core.config import shipped_path
    from nnrouter.training import dataset

    if args.store and args.config is None:
        return common.err("nnrouter: --store reads the database named in --config", USAGE)
    try:
        with common.chatter_to_stderr(args.json):
            summary = dataset.build(
                args.out,
                images=args.images,
                dicom=args.dicom,
                store_config=args.config if args.store else None,
                mapping=shipped_path(args.mapping),
                check_decode=args.check_decode,
                group_by=args.group_by,
                exclude_groups=args.exclude_groups or [],
            )
    except yamlfile.FileProblems as exc:
        return common.err(f"nnrouter: {exc}", CONFIG)
    except ValueError as exc:
        return common.err(f"nnrouter: {exc}")
    if args.json:
        common.print_json(summary.to_json())
    else:
        print(summary.text())
    return OK


def cmd_train_classifier(args: argparse.Namespace) -> int:
    from nnrouter.training.train import TrainConfig, train

    cfg = TrainConfig(
        epochs=args.epochs,
        per_class=args.per_class,
        seed=args.seed,
        size=args.size,
        batch_size=args.batch_size,
        threads=args.threads,
        min_images=args.min_images,
    )
    with common.chatter_to_stderr(args.json):
        result = train(
            args.dataset,
            args.out,
            cfg,
            name=args.name,
            version=args.version,
            cache_dir=args.cache,
            command=_command(f"nnrouter train classifier --dataset {args.dataset} --out {args.out} --seed {args.seed}"),
        )
    if args.json:
        common.print_json(
            {
                "out": str(result.out),
                "labels": list(result.labels),
                "val_accuracy": result.val_accuracy,
                "epochs_run": result.epochs_run,
            }
        )
    else:
        print(
            f"wrote {result.out}: {len(result.labels)} classes, validation accuracy {result.val_accuracy:.3f} "
            f"after {result.epochs_run} epochs"
        )
    return OK


def cmd_train_detector(args: argparse.Namespace) -> int:
    from nnrouter.training.train_detector import DetectorConfig, train_detector

    cfg = DetectorConfig(epochs=args.epochs, seed=args.seed, size=args.size, threads=args.threads)
    with common.chatter_to_stderr(args.json):
        card = train_detector(
            args.regions,
            args.out,
            cfg,
            negatives=args.negatives,
            name=args.name,
            version=args.version,
            cache_dir=args.cache,
            command=_command(f"nnrouter train detector --regions {args.regions} --out {args.out} --seed {args.seed}"),
        )
    t = card.metrics["thresholds"]
    map50 = card.metrics["validation"].get("best_epoch_map50")
    if args.json:
        common.print_json(
            {"out": str(args.out), "labels": list(card.labels), "thresholds": t, "validation_map50": map50}
        )
    else:
        print(
            f"wrote {args.out}: labels {', '.join(card.labels)}, conf {t['conf']}, iou {t['iou']}, "
            f"validation mAP@0.5 {map50}"
        )
    return OK


def _evaluate_detector(args: argparse.Namespace) -> int:
    from nnrouter.training.evaluate_detector import evaluate, update_card

    if not args.regions:
        return common.err("nnrouter: a detector is evaluated on boxes: give --regions CSV|COCO.json|YOLO_DIR", USAGE)
    with common.chatter_to_stderr(args.json):
        report = evaluate(
            args.model,
            args.regions,
            negatives=args.negatives,
            out=args.out,
            cache_dir=args.cache,
            max_epochs=args.max_epochs,
        )
        if not args.json:
            print(report.text())
        if args.update_card:
            update_card(args.model, report)
            print(f"updated {args.model / 'model.yaml'} with these figures")
        if args.out:
            print(f"wrote {args.out / 'report.json'}")
    if args.json:
        common.print_json(report.to_json())
    return OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    from nnrouter.dicom.send import expand
    from nnrouter.pixels.modelcard import ModelCardError, load_card

    try:
        task = load_card(args.model).task
    except ModelCardError as exc:
        return common.err(f"nnrouter: {args.model}: {exc}", CONFIG)
    if task == "detect":
        return _evaluate_detector(args)
    if not args.dataset:
        return common.err("nnrouter: a classifier is evaluated on a manifest: give --dataset M.csv", USAGE)
    from nnrouter.training.evaluate import evaluate

    with common.chatter_to_stderr(args.json):
        report = evaluate(
            args.model,
            args.dataset,
            split=args.split,
            external=expand(args.external) if args.external else None,
            out=args.out,
            loso=args.loso,
            ablate=args.ablate,
            cache_dir=args.cache,
            cams=args.cams,
            max_epochs=args.max_epochs,
        )
        if not args.json:
            print(report.text())
        if args.update_card:
            from nnrouter.training.evaluate import update_card

            update_card(args.model, report, args.dataset, args.split)
            print(f"updated {args.model / 'model.yaml'} with these figures")
        if args.out:
            print(f"wrote {args.out / 'report.json'} and {args.out / 'confusion.png'}")
    if args.json:
        common.print_json(report.__dict__)  # the shape of report.json
    return OK


def register(sub: Any) -> None:
    ds = group(sub, "dataset", "training and evaluation data")
    dsb = add(
        ds, "build", cmd_dataset_build, "write a dataset manifest (file,label,group,kind) and its summary", json=True
    )
    dsb.add_argument(
        "--out", type=Path, required=True, metavar="M.csv", help="manifest to write; M.csv.summary.json beside it"
    )
    dsb.add_argument(
        "--images", type=Path, metavar="DIR", help="folder of class folders (PNG/JPEG); MANIFEST.csv gives groups"
    )
    dsb.add_argument(
        "--dicom", type=Path, nargs="+", metavar="FILE_OR_DIR", help="DICOM files or folders, labelled from headers"
    )
    dsb.add_argument("--store", action="store_true", help="the instances in nnrouter's store (database from --config)")
    dsb.add_argument("--mapping", type=Path, default=Path("rules/labels.yaml"), help="header-to-class rules")
    dsb.add_argument(
        "--no-check-decode", dest="check_decode", action="store_false", help="skip the decode check (faster)"
    )
    dsb.add_argument(
        "--group-by",
        choices=["calling_ae", "institution", "station"],
        default="calling_ae",
        help="source group of stored instances: the sending AE title, or the header's Institution or "
        "Station Name (evaluation holds out whole groups)",
    )
    dsb.add_argument(
        "--exclude-groups",
        action="append",
        metavar="G1,G2",
        help="leave these source groups out (a training manifest that holds them out)",
    )

    tr = group(sub, "train", "train models (needs the [train] extra)")
    tc = add(
        tr,
        "classifier",
        cmd_train_classifier,
        "fine-tune the view classifier and export ONNX with its card",
        config="none",
        json=True,
    )
    tc.add_argument("--dataset", type=Path, required=True, help="manifest CSV from `nnrouter dataset build`")
    tc.add_argument("--out", type=Path, required=True, help="model folder to write")
    tc.add_argument("--epochs", type=int, default=12)
    tc.add_argument("--per-class", type=int, default=64, help="images drawn per class per epoch")
    tc.add_argument("--batch-size", type=int, default=32)
    tc.add_argument("--min-images", type=int, default=30, help="a class with fewer images is not claimed")
    tc.add_argument("--cache", type=Path, help="folder for the feature bank (reused by evaluate --loso)")
    tc.add_argument("--size", type=int, default=224)
    tc.add_argument("--seed", type=int, default=0)
    tc.add_argument("--threads", type=int, default=0)
    tc.add_argument("--name", default="nnrouter-view")
    tc.add_argument("--version", default="1")
    td = add(
        tr,
        "detector",
        cmd_train_detector,
        "train the region detector (head, spine) and export ONNX with its card",
        config="none",
        json=True,
    )
    td.add_argument("--regions", type=Path, required=True, metavar="CSV|COCO.json|YOLO_DIR", help="the boxes")
    td.add_argument("--out", type=Path, required=True, help="model folder to write")
    td.add_argument(
        "--negatives",
        type=Path,
        nargs="*",
        metavar="DIR",
        help="folders of films showing no region (default: ../radiographs/{knee,hand,wrist,shoulder}_ap)",
    )
    td.add_argument("--epochs", type=int, default=30)
    td.add_argument("--size", type=int, default=256)
    td.add_argument("--seed", type=int, default=0)
    td.add_argument("--threads", type=int, default=0)
    td.add_argument("--cache", type=Path, help="folder for the feature bank (reused by evaluate)")
    td.add_argument("--name", default="nnrouter-regions")
    td.add_argument("--version", default="1")

    ev = add(
        sub,
        "evaluate",
        cmd_evaluate,
        "accuracy, per-class figures, calibration, confusion matrix",
        config="none",
        json=True,
    )
    ev.add_argument("--model", type=Path, required=True)
    ev.add_argument("--dataset", type=Path, help="classifier: manifest CSV")
    ev.add_argument(
        "--regions",
        type=Path,
        metavar="CSV|COCO.json|YOLO_DIR",
        help="detector (card task detect): the boxes; held-out-source folds are retrained",
    )
    ev.add_argument("--negatives", type=Path, nargs="*", metavar="DIR", help="detector: films showing no region")
    ev.add_argument("--split", choices=["val", "all"], default="val", help="the model's validation images, or all")
    ev.add_argument("--external", nargs="*", type=Path, help="DICOM files or folders from other sources")
    ev.add_argument("--out", type=Path, help="folder for report.json and confusion.png")
    ev.add_argument("--update-card", action="store_true", help="write the figures into the model card")
    ev.add_argument(
        "--loso",
        action="store_true",
        help="leave-one-source-out: retrain without each source of a multi-source class, test on it",
    )
    ev.add_argument(
        "--ablate",
        action="store_true",
        help="also run leave-one-source-out without the augmented views "
        "(reuses the card's own leave-one-source-out figures when --loso is not given)",
    )
    ev.add_argument("--cache", type=Path, help="folder for the feature bank the folds share (reused between runs)")
    ev.add_argument(
        "--max-epochs",
        type=int,
        default=0,
        metavar="N",
        help="cap each leave-one-source-out fold at N epochs (default: the model's own recipe)",
    )
    ev.add_argument(
        "--cams",
        type=int,
        default=0,
        metavar="N",
        help="write class activation map sheets: N images per single-source class, and the external films",
    )
