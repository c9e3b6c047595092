"""One study: what the store knows (show), its hanging layout (hang), its Comprehensive SR (report)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from nnrouter.cli import common
from nnrouter.cli.common import OK, add, group


def _show_text(report: dict[str, Any]) -> None:
    print(f"study {report['study_uid']}  accession {report['accession_number'] or '-'}")
    det = report["detector"]
    if det is not None:
        missing = ", ".join(det["not_covered"])
        print(
            f"  detector {det['model']} looks for {', '.join(det['labels'])}"
            + (f"; does not cover {missing}: no box there says nothing about them" if missing else "")
        )
    for f in report["flags"]:
        review = f["review"]
        said = f" [{review['state']} by {review['by']}: {review['comment'] or ''}]" if review else ""
        print(f"  flag {f['severity']:<7} {f['kind']}: {f['reason']}{said}")
    for se in report["series"]:
        print(f"  series {se['series_uid']}  {se['modality'] or '-'}  {se['body_part_examined'] or '-'}")
        for i in se["instances"]:
            print(f"    {i['sop_instance_uid']}  v{i['version']}  {i['state']}  {i['path']}")
            for p in i["predictions"]:
                print(f"      view {p['label']} {p['score']:.2f} ({p['model']})")
            for d in i["detections"]:
                box = ", ".join(f"{v:.0f}" for v in d["box_px"])
                print(f"      region {d['label']} {d['score']:.2f} box [{box}] px ({d['model']})")
            if not i["detections"] and det is not None and i["state"] == "classified":
                print(f"      regions: none found by {det['model']}")


def cmd_study_show(args: argparse.Namespace) -> int:
    from nnrouter.pixels.modelcard import ModelCardError
    from nnrouter.results.views import study_report
    from nnrouter.routing import rules

    settings = common.settings(args)
    try:
        detector = rules.detector_regions(settings.models.detector)
    except ModelCardError as exc:  # the study is still worth showing
        print(f"nnrouter: models.detector: {exc}", file=sys.stderr)
        detector = None
    report = study_report(common.store(settings), args.study_uid, detector)
    if report is None:
        return common.err(f"no study {args.study_uid} in the store")
    if args.json:
        common.print_json(report)
    else:
        _show_text(report)
    return OK


def cmd_study_hang(args: argparse.Namespace) -> int:
    """The layout for one study, with the newest earlier study of the same patient and body part beside it."""
    from nnrouter.results.views import StudyNotFound, study_layout

    try:
        layout = study_layout(common.store(common.settings(args)), args.study_uid)
    except (StudyNotFound, ValueError) as exc:
        return common.err(str(exc))
    common.print_json(layout)
    return OK


def cmd_study_report(args: argparse.Namespace) -> int:
    """The study's Comprehensive SR, written to a file (the router makes the same one when a rule asks)."""
    from nnrouter.results import report
    from nnrouter.results.views import find_study
    from nnrouter.routing.router import study_findings

    with common.store(common.settings(args)).read() as s:
        study = find_study(s, args.study_uid)
        findings = study_findings(s, study.id) if study else None
    if findings is None:
        return common.err(f"no study {args.study_uid} with readable instances in the store")
    out = report.write_sr(report.build_sr(findings), args.out)
    if args.json:
        common.print_json({"path": str(out), "images": len(findings.images), "flags": len(findings.flags)})
    else:
        print(f"wrote {out}: {len(findings.images)} images, {len(findings.flags)} flags")
    return OK


def _hang_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("study_uid")


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("study_uid")
    p.add_argument("--out", type=Path, required=True, help="the SR file to write")


def register(sub: Any) -> None:
    study = group(sub, "study", "look at one study")
    show = add(study, "show", cmd_study_show, "series, instances, paths and states of a study", json=True)
    show.add_argument("study_uid")
    _hang_args(
        add(
            study, "hang", cmd_study_hang, "hanging-protocol layout of a study, with its prior (always JSON)", json=True
        )
    )
    _report_args(
        add(study, "report", cmd_study_report, "write a study's Comprehensive SR (what nnrouter found)", json=True)
    )
    # The names before `study` gathered them, kept for one release.
    _hang_args(add(sub, "hang", cmd_study_hang, "", json=True, replaced_by="study hang"))
    _report_args(add(sub, "report", cmd_study_report, "", json=True, replaced_by="study report"))
