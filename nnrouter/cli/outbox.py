"""Deliveries to destinations, by hand: list them, queue failed ones again, purge old rows."""

from __future__ import annotations

import argparse
from typing import Any

from nnrouter.cli import common
from nnrouter.cli.common import OK, add, group


def _selection(args: argparse.Namespace) -> dict[str, Any]:
    return {"states": args.state, "destinations": args.destination, "study_uid": args.study}


def cmd_outbox_list(args: argparse.Namespace) -> int:
    from nnrouter.routing.deliveries import list_deliveries

    rows = list_deliveries(common.store(common.settings(args)), **_selection(args), limit=args.limit)
    if args.json:
        common.print_json(rows)
    else:
        for r in rows:
            print(
                f"{r['id']:>6} {r['state']:<8} {r['destination']:<16} tries {r['attempts']:<3} {r['sop_instance_uid']}"
                + (f"  {r['last_error']}" if r["last_error"] else "")
            )
        print(f"{len(rows)} row(s)")
    return OK


def cmd_outbox_retry(args: argparse.Namespace) -> int:
    from nnrouter.routing.deliveries import RETRYABLE, retry

    states = args.state or list(RETRYABLE)
    ids = retry(common.store(common.settings(args)), **{**_selection(args), "states": states})
    if args.json:
        common.print_json({"queued": len(ids), "states": states, "ids": ids})
    else:
        print(f"{len(ids)} deliveries queued again")
    return OK


def cmd_outbox_purge(args: argparse.Namespace) -> int:
    from nnrouter.routing.deliveries import PURGEABLE, purge

    states = args.state or list(PURGEABLE)
    ids = purge(common.store(common.settings(args)), **{**_selection(args), "states": states})
    if args.json:
        common.print_json({"removed": len(ids), "states": states, "ids": ids})
    else:
        print(f"{len(ids)} outbox rows removed (states: {', '.join(states)})")
    return OK


def register(sub: Any) -> None:
    ob = group(sub, "outbox", "deliveries to destinations")
    for name, func, help in (
        ("list", cmd_outbox_list, "list deliveries"),
        ("retry", cmd_outbox_retry, "queue failed, dead or held deliveries again"),
        ("purge", cmd_outbox_purge, "remove delivery rows (default: sent ones)"),
    ):
        o = add(ob, name, func, help, json=True)
        o.add_argument("--state", nargs="+", help="pending sending sent failed dead held")
        o.add_argument("--destination", nargs="+")
        o.add_argument("--study", help="Study Instance UID")
        if name == "list":
            o.add_argument("--limit", type=int, default=1000)
