"""Running and looking after a node: serve and its stages one by one, clean, status, db, config."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from nnrouter.cli import common
from nnrouter.cli.common import CONFIG, FAILED, OK, add, group


def cmd_config_example(args: argparse.Namespace) -> int:
    from nnrouter.core import config as config_mod

    sys.stdout.write(config_mod.EXAMPLE)
    return OK


def cmd_config_check(args: argparse.Namespace) -> int:
    from nnrouter.core import config as config_mod

    problems: list[dict[str, Any]] = []
    ok = common.loaded(config_mod.load, args.config, problems=problems) is not None
    if args.json:
        common.print_json({"file": str(args.config), "ok": ok, "problems": problems})
    elif ok:
        print(f"{args.config}: OK")
    return OK if ok else FAILED


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from nnrouter.core import logs

    settings = common.settings(args)
    logs.setup(settings.logging.level, settings.logging.format)
    head = common.store(settings).upgrade()
    if args.json:
        common.print_json({"revision": head})
    else:
        print(f"database at revision {head}")
    return OK


def cmd_serve(args: argparse.Namespace) -> int:
    from nnrouter.service.supervisor import serve

    return serve(common.settings(args))


def cmd_worker(args: argparse.Namespace) -> int:
    from nnrouter.pixels.classify import run_worker
    from nnrouter.service.lifecycle import Stop, stop_on_signals

    settings = common.settings(args)
    totals = run_worker(settings, stop_on_signals(Stop()), until_empty=args.until_empty)
    if args.until_empty:
        print(json.dumps(totals))  # always JSON: what scripts and tests have read since the first release
    return OK


def cmd_route(args: argparse.Namespace) -> int:
    from nnrouter.routing.router import run_router

    settings = common.settings(args)
    if settings.routing.rules is None:
        return common.err("nnrouter: routing.rules is not set: nothing to route", CONFIG)
    run_router(settings)  # it stops on SIGTERM and SIGINT
    return OK


def cmd_forward(args: argparse.Namespace) -> int:
    from nnrouter.routing.forward import run_forwarder
    from nnrouter.service.lifecycle import Stop, stop_on_signals

    settings = common.settings(args)
    if settings.routing.rules is None:
        return common.err("nnrouter: routing.rules is not set: no destinations to forward to", CONFIG)
    run_forwarder(settings, stop_on_signals(Stop()))
    return OK


def cmd_clean(args: argparse.Namespace) -> int:
    """One cleaning pass (or the cleaner's loop): expired studies, early ones when short of space, orphans."""
    from nnrouter.core import logs
    from nnrouter.service.clean import Cleaner, run_cleaner

    settings = common.settings(args)
    logs.setup(settings.logging.level if args.loop else "warning", settings.logging.format)
    store = common.store(settings)
    common.require_current_schema(store)
    if args.loop:
        store.dispose()
        run_cleaner(settings)  # stops on SIGTERM / SIGINT
        return OK
    done = Cleaner(settings, store).run(dry_run=args.dry_run)
    store.dispose()
    if args.json:
        common.print_json(done.as_dict())
    else:
        print(done.text())
    return OK


def cmd_status(args: argparse.Namespace) -> int:
    from nnrouter.service.status import node_status, status_text

    settings = common.settings(args)
    report = node_status(settings, common.store(settings))
    if args.json:
        common.print_json(report)
    else:
        print(status_text(report))
    return OK


def register(sub: Any) -> None:
    add(sub, "serve", cmd_serve, "run the DICOM node (C-STORE / C-ECHO SCP) and its workers")
    wk = add(sub, "worker", cmd_worker, "decode and classify received instances (one worker process)", json=True)
    wk.add_argument("--until-empty", action="store_true", help="exit when no work is left; print counts (JSON)")
    add(
        sub,
        "route",
        cmd_route,
        "run the router alone: decide complete studies, queue their deliveries "
        "(serve runs one when routing.rules is set; `nnrouter forward` delivers)",
    )
    add(
        sub,
        "forward",
        cmd_forward,
        "run the forwarder alone: deliver the outbox to the destinations of the rule version "
        "this node's router loaded (serve runs one when routing.rules is set)",
    )
    add(sub, "status", cmd_status, "counts of instances per state", json=True)
    cl = add(
        sub, "clean", cmd_clean, "delete delivered studies kept long enough, and orphan files (retention)", json=True
    )
    cl.add_argument("--dry-run", action="store_true", help="show what would go and why; delete nothing")
    cl.add_argument("--loop", action="store_true", help="run the cleaner stage until stopped (serve runs one itself)")

    cfg = group(sub, "config", "print or check configuration")
    add(cfg, "example", cmd_config_example, "print a complete, commented example config", config="none")
    add(cfg, "check", cmd_config_check, "validate a config file", config="required", json=True)

    db = group(sub, "db", "database schema")
    add(db, "upgrade", cmd_db_upgrade, "apply database migrations up to the newest", json=True)
