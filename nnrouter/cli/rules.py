"""Routing rule files: check one, print their JSON Schema, try them on studies (nothing is sent)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from nnrouter.cli import common
from nnrouter.cli.common import CONFIG, FAILED, OK, add, group


def cmd_rules_check(args: argparse.Namespace) -> int:
    detector = common.detector_regions(common.settings(args))
    problems: list[dict[str, Any]] = []
    rs = common.load_rules(args.file, verdict=True, detector=detector, problems=problems)
    what = f"detector {detector.model}" if detector.model else "no detector configured"
    if args.json:
        common.print_json(
            {
                "file": str(args.file),
                "ok": rs is not None,
                "problems": problems,
                "rules": None if rs is None else len(rs.rules),
                "destinations": None if rs is None else len(rs.destinations),
                "detector": detector.model,
            }
        )
    elif rs is not None:
        print(
            f"{args.file}: OK ({len(rs.rules)} rules, {len(rs.destinations)} destinations; regions checked against {what})"
        )
    return FAILED if rs is None else OK


def cmd_rules_schema(args: argparse.Namespace) -> int:
    from nnrouter.routing import rules

    common.print_json(rules.json_schema())
    return OK


def cmd_rules_test(args: argparse.Namespace) -> int:
    """Dry run: what the rules would do with these studies; nothing is sent."""
    import datetime as dt

    from nnrouter.routing import dryrun, rules

    settings = common.settings(args)
    ruleset = common.load_rules(args.rules, detector=common.detector_regions(settings))
    if ruleset is None:
        return common.err(f"nnrouter: {args.rules} cannot be used", CONFIG)
    now = dt.datetime.now(dt.UTC)
    studies: dict[str, rules.StudyFacts] = {}
    flags: dict[str, list[dict[str, Any]]] = {}
    if len(args.input) == 1 and not Path(args.input[0]).exists():
        # A Study Instance UID in the store, with what the workers found.
        found = dryrun.from_store(settings, common.store(settings), args.input[0], now)
        if found is None:
            return common.err(f"no study {args.input[0]} in the store")
        facts, findings = found
        studies[facts.study_uid] = facts
        flags[facts.study_uid] = [{"severity": f.severity, "kind": f.kind, "reason": f.reason} for f in findings]
    else:
        studies, problems = dryrun.from_files(args.input, args.calling_ae or [], now)
        for line in problems:
            print(line, file=sys.stderr)
    out = []
    for uid, facts in studies.items():
        decision = rules.decide(ruleset, facts)
        if args.json:
            out.append(
                {
                    "study_uid": uid,
                    "instances": len(facts.instances),
                    "flags": flags.get(uid, []),
                    **dryrun.decision_dict(decision),
                }
            )
            continue
        for f in flags.get(uid, []):
            print(f"flag {f['severity']} {f['kind']}: {f['reason']}")
        print(f"study {uid} ({len(facts.instances)} instances)")
        print(decision.text())
        print()
    if args.json:
        common.print_json(out)
    return OK


def register(sub: Any) -> None:
    rl = group(sub, "rules", "routing rules")
    rc = add(
        rl,
        "check",
        cmd_rules_check,
        "validate a rule file; every problem with file, line, column, field "
        "(region conditions against the detector of --config)",
        json=True,
    )
    rc.add_argument("file", type=Path)
    add(
        rl,
        "schema",
        cmd_rules_schema,
        "print the JSON Schema of rule files, for editors (always JSON)",
        config="none",
        json=True,
    )
    rtest = add(
        rl,
        "test",
        cmd_rules_test,
        "show what the rules would do with DICOM files or a stored study; sends nothing",
        json=True,
    )
    rtest.add_argument("--rules", type=Path, required=True)
    rtest.add_argument("--calling-ae", nargs="*", help="calling AE titles to assume for files")
    rtest.add_argument("input", nargs="+", help="DICOM files or folders, or a Study Instance UID in the store")
