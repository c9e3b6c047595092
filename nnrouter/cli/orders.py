"""Orders and what the images said about them: the procedures file, the flagged studies."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from nnrouter.cli import common
from nnrouter.cli.common import FAILED, OK, add, group


def cmd_procedures_check(args: argparse.Namespace) -> int:
    from nnrouter.orders.procedures import load_procedures

    problems: list[dict[str, Any]] = []
    book = common.loaded(load_procedures, args.file, problems=problems)
    if args.json:
        common.print_json(
            {
                "file": str(args.file),
                "ok": book is not None,
                "problems": problems,
                "procedures": None if book is None else len(book.spec.procedures),
                "class_codes": None if book is None else bool(book.spec.class_codes),
            }
        )
    elif book is not None:
        print(
            f"{args.file}: OK, {len(book.spec.procedures)} procedures"
            + (" plus the single-view codes of classes.csv" if book.spec.class_codes else "")
        )
    return FAILED if book is None else OK


def cmd_mismatches(args: argparse.Namespace) -> int:
    """Flagged studies, newest check first: what a QA technologist works through."""
    from nnrouter.results.views import flagged

    out = flagged(
        common.store(common.settings(args)),
        kinds=args.kind,
        every=args.all,
        study_uid=args.study,
        limit=args.limit,
        unresolved=args.unresolved,
    )
    if args.json:
        common.print_json(out)
    else:
        for r in out:
            review = f"  [{r['review']['state']} by {r['review']['by']}]" if r.get("review") else ""
            print(
                f"{r['study_uid']}  {r['accession_number'] or '-':<12} {r['severity']:<7} {r['kind']:<20} {r['reason']}"
                + review
            )
        if not out:
            print("no flagged studies")
    return OK


def register(sub: Any) -> None:
    mm = add(sub, "mismatches", cmd_mismatches, "studies whose images are not what was ordered", json=True)
    mm.add_argument("--kind", nargs="+", help="only these flags (default: the mismatches, not uncertain/unmapped)")
    mm.add_argument("--all", action="store_true", help="every flag, uncertain and unmapped included")
    mm.add_argument("--study", help="one study")
    mm.add_argument("--limit", type=int, default=200)
    mm.add_argument("--unresolved", action="store_true", help="leave out the flags someone resolved (the console)")
    proc = group(sub, "procedures", "what each ordered procedure should produce")
    pc = add(proc, "check", cmd_procedures_check, "validate a procedures file", config="none", json=True)
    pc.add_argument("file", type=Path)
