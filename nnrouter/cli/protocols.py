"""The generic DICOM Hanging Protocol instances: written to a folder, or stored at a destination of the rules."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

from nnrouter.cli import common
from nnrouter.cli.common import CONFIG, FAILED, OK, USAGE, add, group


def _write(out: Path, args: argparse.Namespace) -> list[Path]:
    from nnrouter.results import hanging

    return hanging.write_protocols(out, creator=args.creator, version=args.version)


def cmd_protocols_write(args: argparse.Namespace) -> int:
    paths = _write(args.out, args)
    if args.json:
        common.print_json({"out": str(args.out), "written": [str(p) for p in paths]})
    else:
        print(f"wrote {len(paths)} Hanging Protocol instances to {args.out}")
    return OK


def cmd_protocols_send(args: argparse.Namespace) -> int:
    """Store them at a destination of the rule file (written to --out first, or to a folder removed afterwards)."""
    from nnrouter.dicom.send import SendError, send
    from nnrouter.dicom.statuses import stored

    # A destination without calling_ae is called as dicom.ae_title, as the forwarder calls it.
    ruleset = common.load_rules(args.rules, calling_ae=common.settings(args).dicom.ae_title)
    if ruleset is None:
        return common.err(f"nnrouter: {args.rules} cannot be used", CONFIG)
    try:
        dest = ruleset.destination(args.destination)
    except KeyError:
        return common.err(f"no destination {args.destination!r} in {args.rules}", CONFIG)
    with tempfile.TemporaryDirectory(prefix="nnrouter-protocols-") as tmp:
        out = args.out or Path(tmp)
        paths = _write(out, args)
        if not args.json and args.out:
            print(f"wrote {len(paths)} Hanging Protocol instances to {out}")
        try:
            outcomes = send(dest.host, dest.port, paths, dest.calling_ae, dest.ae_title, timeout=dest.timeout_s)
        except SendError as exc:
            return common.err(f"nnrouter: {exc}")
    bad = [o for o in outcomes if o.status is None or not stored(o.status)]
    if args.json:
        common.print_json(
            {
                "out": None if args.out is None else str(args.out),
                "written": [str(p) for p in paths] if args.out else [],
                "destination": {
                    "name": args.destination,
                    "ae_title": dest.ae_title,
                    "host": dest.host,
                    "port": dest.port,
                },
                "stored": len(outcomes) - len(bad),
                "of": len(outcomes),
                "failed": [{"path": str(o.path), "status": o.status, "comment": o.comment or None} for o in bad],
            }
        )
    else:
        print(f"stored {len(outcomes) - len(bad)} of {len(outcomes)} at {dest.ae_title}@{dest.host}:{dest.port}")
    for o in bad:
        print(f"  {o.path}: {o.comment or o.status}", file=sys.stderr)
    return FAILED if bad else OK


def cmd_hang_protocols(args: argparse.Namespace) -> int:
    """The old ``hang-protocols``: ``--send`` made it ``protocols send``, without it ``protocols write``."""
    if args.send and not args.rules:
        return common.err("--send names a destination of a rule file: give --rules FILE too", USAGE)
    if args.send:
        args.destination = args.send
        return cmd_protocols_send(args)
    return cmd_protocols_write(args)


def _protocol_args(p: argparse.ArgumentParser, *, out_required: bool) -> None:
    p.add_argument(
        "--out",
        type=Path,
        required=out_required,
        help="folder for the .dcm files"
        + ("" if out_required else " (default: a temporary folder, removed afterwards)"),
    )
    p.add_argument("--creator", default="NNROUTER")
    p.add_argument("--version", default="1")


def register(sub: Any) -> None:
    pr = group(sub, "protocols", "the generic DICOM Hanging Protocol instances")
    _protocol_args(
        add(pr, "write", cmd_protocols_write, "write them to a folder", config="none", json=True), out_required=True
    )
    ps = add(pr, "send", cmd_protocols_send, "store them to a destination of a rule file", config="optional", json=True)
    ps.add_argument("destination", metavar="DESTINATION", help="a destination of the rule file")
    ps.add_argument("--rules", type=Path, required=True, help="the rule file that names the destination")
    _protocol_args(ps, out_required=False)

    old = add(
        sub, "hang-protocols", cmd_hang_protocols, "", config="optional", json=True, replaced_by="protocols write|send"
    )
    _protocol_args(old, out_required=True)
    old.add_argument("--send", metavar="DESTINATION", help="also store them to this destination of the rule file")
    old.add_argument("--rules", type=Path, help="the rule file that names the destination")
