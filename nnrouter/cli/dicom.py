"""Talking DICOM to another node by hand: C-ECHO and C-STORE."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from nnrouter.cli import common
from nnrouter.cli.common import FAILED, OK, add


def cmd_echo(args: argparse.Namespace) -> int:
    from nnrouter.dicom.send import SendError, echo

    where = {"host": args.host, "port": args.port, "calling_ae": args.aet, "called_ae": args.aec}
    try:
        status = echo(args.host, args.port, args.aet, args.aec)
    except SendError as exc:
        if args.json:
            common.print_json({**where, "ok": False, "status": None, "error": str(exc)})
        return common.err(f"echo failed: {exc}")
    ok = status == 0
    if args.json:
        common.print_json({**where, "ok": ok, "status": status, "error": None})
    else:
        print(f"C-ECHO {args.aec}@{args.host}:{args.port}: status 0x{status:04X}")
    return OK if ok else FAILED


def cmd_send(args: argparse.Namespace) -> int:
    from nnrouter.dicom.send import SendError, expand, send
    from nnrouter.dicom.statuses import stored

    files = expand(args.files)
    try:
        outcomes = send(args.host, args.port, files, args.aet, args.aec)
    except SendError as exc:
        if args.json:
            common.print_json({"sent": 0, "failed": len(files), "error": str(exc), "files": []})
        return common.err(f"send failed: {exc}")
    rows = []
    for o in outcomes:
        ok = o.status is not None and stored(o.status)  # success, or a warning: the peer kept it
        rows.append({"path": str(o.path), "ok": ok, "status": o.status, "comment": o.comment or None})
    failed = sum(not r["ok"] for r in rows)
    if args.json:
        common.print_json({"sent": len(rows) - failed, "failed": failed, "error": None, "files": rows})
    else:
        for r in rows:
            status = "not sent" if r["status"] is None else f"0x{r['status']:04X}"
            print(f"{status}\t{r['path']}" + (f"\t{r['comment']}" if r["comment"] else ""))
        print(f"{len(rows) - failed} sent, {failed} failed")
    return OK if failed == 0 else FAILED


def register(sub: Any) -> None:
    for name, func, help in (
        ("echo", cmd_echo, "C-ECHO a DICOM node"),
        ("send", cmd_send, "C-STORE files or folders to a DICOM node, on one association"),
    ):
        sp = add(sub, name, func, help, config="none", json=True)
        sp.add_argument("host")
        sp.add_argument("port", type=int)
        if name == "send":
            sp.add_argument("files", nargs="+", type=Path, metavar="FILES_OR_DIRS")
        sp.add_argument("--aet", default="NNROUTER_SCU", help="our (calling) AE title")
        sp.add_argument("--aec", default="ANY-SCP", help="the peer's (called) AE title")
