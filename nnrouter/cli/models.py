"""Model folders: list and verify their cards, run one on files, import NNCPR, promote a retrained classifier."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from nnrouter.cli import common
from nnrouter.cli.common import CONFIG, FAILED, OK, USAGE, add, group


def cmd_models_list(args: argparse.Namespace) -> int:
    from nnrouter.core.config import shipped_path
    from nnrouter.pixels.catalog import list_models

    rows = list_models(args.dir or shipped_path(Path("models")))
    if args.json:
        common.print_json(rows)
    else:
        for r in rows:
            print(
                f"{r['path']}: "
                + (
                    r["error"]
                    if "error" in r
                    else f"{r['name']} {r['version']} ({r['task']}, {r['labels']} labels, sha256 {r['sha256']}…)"
                )
            )
    return OK if all("error" not in r for r in rows) else FAILED


def cmd_models_verify(args: argparse.Namespace) -> int:
    from nnrouter.core.config import shipped_path
    from nnrouter.pixels.catalog import model_dirs, verify_models

    rows = verify_models(args.models or model_dirs(shipped_path(Path("models"))))
    for r in rows:
        if not r["ok"]:
            print(f"{r['path']}: {r['error']}", file=sys.stderr)
        elif not args.json:
            print(f"{r['path']}: OK sha256 {r['sha256']}")
    if args.json:
        common.print_json(rows)
    return OK if all(r["ok"] for r in rows) else FAILED


def cmd_models_run(args: argparse.Namespace) -> int:
    from nnrouter.pixels.catalog import run_model
    from nnrouter.pixels.modelcard import ModelCardError
    from nnrouter.pixels.runtime import Model

    try:
        model = Model.load(args.model, providers=args.providers)
    except ModelCardError as exc:
        return common.err(f"nnrouter: {args.model}: {exc}", CONFIG)
    rows = run_model(model, args.files)
    for r in rows:
        if "error" in r:
            print(f"{r['file']}: {r['error']}", file=sys.stderr)
        elif args.json:
            continue
        elif "label" in r:
            top = "  ".join(f"{label} {score:.3f}" for label, score in r["top"])
            print(f"{r['file']}: {r['label']} ({r['score']:.3f})  top-5: {top}  [{r['provider']}]")
        else:
            print(f"{r['file']}: {len(r['regions'])} regions [{r['provider']}]")
            for d in r["regions"]:
                print(f"  {d['label']:<8} {d['score']:.3f}  box {[round(v, 1) for v in d['box']]}")
    if args.json:
        common.print_json(rows)
    return FAILED if any("error" in r for r in rows) else OK


def _figures(f: Any) -> dict[str, Any]:
    return {
        "path": str(f.path),
        "name": f.name,
        "version": f.version,
        "sha256": f.sha256,
        "labels": list(f.labels),
        "images": f.images,
        "accuracy": f.accuracy,
        "unknown_rate": f.unknown_rate,
        "sensitivity": {label: f.sensitivity(label) for label in sorted(f.counts)},
    }


def cmd_models_promote(args: argparse.Namespace) -> int:
    """0: promoted (or rolled back, or the dry run would promote); 1: refused; 2: cannot compare or switch these;
    3: the config names no classifier."""
    from nnrouter.training import promote
    from nnrouter.training.dataset import split_groups
    from nnrouter.training.train import read_manifest

    if args.current is not None:
        target = args.current
    else:
        target = common.settings(args).models.classifier
        if target is None:
            return common.err(
                "nnrouter: models.classifier is null in the config: nothing to replace (give --current DIR)", CONFIG
            )
    try:
        if args.rollback:
            with common.chatter_to_stderr(args.json):
                sha = promote.rollback(target)
            previous = promote.previous_dir(target)
            if args.json:
                common.print_json(
                    {"rolled_back": True, "target": str(target), "sha256": sha, "previous": str(previous)}
                )
            else:
                print(
                    f"rolled back: {target} is the previous model again (sha256 {sha}); {previous} holds the one it replaced"
                )
            return OK
        if args.candidate is None or args.dataset is None:
            return common.err("nnrouter: --candidate and --dataset are needed (or --rollback)", USAGE)
        groups = None
        if args.holdout_groups:
            groups = split_groups(args.holdout_groups, {e.group for e in read_manifest(args.dataset)})
        with common.chatter_to_stderr(args.json):
            comparison = promote.promote(
                args.candidate,
                target,
                args.dataset,
                groups=groups,
                trained_on=args.trained_on,
                tolerance=args.tolerance,
                dry_run=args.dry_run,
            )
    except (ValueError, OSError) as exc:  # PromotionError, ModelCardError, an unreadable manifest
        return common.err(f"nnrouter: {exc}", USAGE)
    if args.json:
        common.print_json(
            {
                "target": str(target),
                "dry_run": args.dry_run,
                "accepted": comparison.accepted,
                "promoted": comparison.accepted and not args.dry_run,
                "reasons": comparison.reasons,
                "tolerance": comparison.tolerance,
                "held_out": {
                    "how": comparison.held.how,
                    "images": comparison.candidate.images,
                    "not_compared": comparison.held.not_compared,
                    "notes": list(comparison.held.notes),
                },
                "candidate": _figures(comparison.candidate),
                "current": _figures(comparison.current),
            }
        )
    if not comparison.accepted:
        return common.err(f"nnrouter: not promoted: {'; '.join(comparison.reasons)}")
    if args.dry_run and not args.json:
        print(f"dry run: {target} left as it is")
    return OK


def cmd_models_import_nncpr(args: argparse.Namespace) -> int:
    from nnrouter.training.nncpr import import_nncpr

    try:
        with common.chatter_to_stderr(args.json):
            out = import_nncpr(args.pb, args.out, name=args.name, version=args.version)
    except (ImportError, ValueError) as exc:
        return common.err(f"nnrouter: {exc}")
    if args.json:
        common.print_json({"model": str(out / "model.onnx"), "card": str(out / "model.yaml")})
    else:
        print(f"wrote {out / 'model.onnx'} and {out / 'model.yaml'}")
    return OK


def register(sub: Any) -> None:
    models = group(sub, "models", "model cards and ONNX models")
    ml = add(models, "list", cmd_models_list, "list the models in a folder with their cards", config="none", json=True)
    ml.add_argument("--dir", type=Path, default=None, help="default: ./models, else the models shipped with nnrouter")
    mv = add(
        models, "verify", cmd_models_verify, "check each model's sha256 against its card", config="none", json=True
    )
    mv.add_argument("models", nargs="*", type=Path, metavar="MODEL_DIR")
    mr = add(models, "run", cmd_models_run, "run a model on DICOM, PNG or JPEG files", config="none", json=True)
    mr.add_argument("model", type=Path, metavar="MODEL_DIR")
    mr.add_argument("files", nargs="+", type=Path, metavar="FILE")
    mr.add_argument("--providers", nargs="+", default=None, help="onnxruntime providers, in order")
    mi = add(
        models,
        "import-nncpr",
        cmd_models_import_nncpr,
        "convert the published NNCPR frozen graph to ONNX with its card",
        config="none",
        json=True,
    )
    mi.add_argument("pb", type=Path, metavar="network.pb")
    mi.add_argument("--out", type=Path, default=Path("models/nncpr"))
    mi.add_argument("--name", default="nncpr")
    mi.add_argument("--version", default="1.0")
    mp = add(
        models,
        "promote",
        cmd_models_promote,
        "replace the configured classifier with a retrained one only if it is at least as good on held-out images",
        json=True,
    )
    mp.add_argument("--candidate", type=Path, metavar="DIR", help="the retrained model folder")
    mp.add_argument("--dataset", type=Path, metavar="CSV", help="manifest (nnrouter dataset build) to compare on")
    mp.add_argument(
        "--current",
        type=Path,
        metavar="DIR",
        help="the model folder to compare and replace (default: models.classifier of --config)",
    )
    mp.add_argument(
        "--holdout-groups",
        action="append",
        metavar="G1,G2",
        help="compare on these source groups (default: the validation split both cards record)",
    )
    mp.add_argument(
        "--trained-on",
        type=Path,
        metavar="CSV",
        help="the candidate's training manifest: shows it was kept off --holdout-groups",
    )
    mp.add_argument(
        "--tolerance",
        type=float,
        default=0.0,
        help="sensitivity a class of the current model may lose (0..1, default 0)",
    )
    mp.add_argument("--dry-run", action="store_true", help="compare and print; replace nothing")
    mp.add_argument("--rollback", action="store_true", help="swap NAME.previous back in")
