"""The ``nnrouter`` command: one entry point, one sub-command per job.

Each sub-command reads the config once and builds only what it needs, so
``nnrouter status`` on a busy node touches nothing but the database.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import Any, Callable

from nnrouter import config as config_mod
from nnrouter import logs, yamlfile


def _settings(args: argparse.Namespace) -> config_mod.Settings:
    try:
        return config_mod.load(args.config)
    except yamlfile.FileProblems as exc:
        sys.exit(f"nnrouter: configuration is not valid:\n{exc}")


def _store(settings: config_mod.Settings):  # type: ignore[no-untyped-def]
    from nnrouter.store import Store

    return Store(settings.database.url)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False, default=str))


# --- config ---


def cmd_config_example(args: argparse.Namespace) -> int:
    sys.stdout.write(config_mod.EXAMPLE)
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    try:
        config_mod.load(args.config)
    except yamlfile.FileProblems as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print(f"{args.config}: OK")
    return 0


# --- database ---


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    settings = _settings(args)
    logs.setup(settings.logging.level, settings.logging.format)
    store = _store(settings)
    head = store.upgrade()
    print(f"database at revision {head}")
    return 0


# --- serve ---


def cmd_serve(args: argparse.Namespace) -> int:
    from nnrouter import receive
    from nnrouter.spool import Spool
    from nnrouter.store import SchemaOutOfDate

    settings = _settings(args)
    logs.setup(settings.logging.level, settings.logging.format)
    store = _store(settings)
    try:
        store.require_current()
    except SchemaOutOfDate as exc:
        print(f"nnrouter: {exc}", file=sys.stderr)
        return 2
    spool = Spool(settings.storage.path)
    server = receive.serve(settings, store, spool, block=False)

    stop = {"now": False}

    def _stop(signum: int, _frame: Any) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        while not stop["now"]:
            signal.pause()
    finally:
        server.shutdown()
        store.dispose()
        logs.get("nnrouter").info("stopped")
    return 0


# --- network tools ---


def cmd_echo(args: argparse.Namespace) -> int:
    from nnrouter.send import SendError, echo

    try:
        status = echo(args.host, args.port, args.aet, args.aec)
    except SendError as exc:
        print(f"echo failed: {exc}", file=sys.stderr)
        return 1
    print(f"C-ECHO {args.aec}@{args.host}:{args.port}: status 0x{status:04X}")
    return 0 if status == 0 else 1


def cmd_send(args: argparse.Namespace) -> int:
    from nnrouter.send import SendError, expand, send

    files = expand(args.files)
    try:
        outcomes = send(args.host, args.port, files, args.aet, args.aec)
    except SendError as exc:
        print(f"send failed: {exc}", file=sys.stderr)
        return 1
    failed = 0
    for o in outcomes:
        status = "not sent" if o.status is None else f"0x{o.status:04X}"
        ok = o.status is not None and (o.status == 0 or o.status & 0xF000 == 0xB000)
        failed += not ok
        print(f"{status}\t{o.path}" + (f"\t{o.comment}" if o.comment else ""))
    print(f"{len(outcomes) - failed} sent, {failed} failed")
    return 0 if failed == 0 else 1


# --- looking at the store ---


def cmd_status(args: argparse.Namespace) -> int:
    settings = _settings(args)
    store = _store(settings)
    counts = store.state_counts()
    report = {
        "database": store.engine.url.render_as_string(hide_password=True),
        "schema": {"current": store.current_revision(), "head": store.head_revision()},
        "instances": {"total": sum(counts.values()), "by_state": counts},
    }
    if args.json:
        _print_json(report)
    else:
        print(f"database {report['database']} (schema {report['schema']['current']})")
        print(f"instances: {report['instances']['total']}")
        for state, n in sorted(counts.items()):
            print(f"  {state:<16}{n}")
    return 0


def study_report(store, study_uid: str) -> dict[str, Any] | None:  # type: ignore[no-untyped-def]
    """What the store knows about one study, as plain data (for JSON and tests)."""
    from sqlalchemy import select

    from nnrouter.store import Study

    with store.read() as s:
        study = s.execute(select(Study).where(Study.study_uid == study_uid)).scalar_one_or_none()
        if study is None:
            return None
        return {
            "study_uid": study.study_uid,
            "accession_number": study.accession_number,
            "study_date": study.study_date,
            "study_description": study.study_description,
            "last_received_at": study.last_received_at,
            "series": [
                {
                    "series_uid": se.series_uid,
                    "modality": se.modality,
                    "body_part_examined": se.body_part_examined,
                    "series_description": se.series_description,
                    "instances": [
                        {
                            "sop_instance_uid": i.sop_instance_uid,
                            "version": i.version,
                            "sop_class_uid": i.sop_class_uid,
                            "transfer_syntax_uid": i.transfer_syntax_uid,
                            "path": i.path,
                            "size_bytes": i.size_bytes,
                            "sha256": i.sha256,
                            "state": i.state,
                            "state_reason": i.state_reason,
                            "view_position": i.view_position,
                            "image_laterality": i.image_laterality,
                            "calling_ae": i.calling_ae,
                            "received_at": i.received_at,
                        }
                        for i in se.instances
                    ],
                }
                for se in study.series
            ],
        }


def cmd_study_show(args: argparse.Namespace) -> int:
    settings = _settings(args)
    report = study_report(_store(settings), args.study_uid)
    if report is None:
        print(f"no study {args.study_uid} in the store", file=sys.stderr)
        return 1
    if args.json:
        _print_json(report)
    else:
        print(f"study {report['study_uid']}  accession {report['accession_number'] or '-'}")
        for se in report["series"]:
            print(f"  series {se['series_uid']}  {se['modality'] or '-'}  {se['body_part_examined'] or '-'}")
            for i in se["instances"]:
                print(f"    {i['sop_instance_uid']}  v{i['version']}  {i['state']}  {i['path']}")
    return 0


def cmd_bench_ingest(args: argparse.Namespace) -> int:
    from nnrouter import bench

    return bench.ingest(
        count=args.count,
        rounds=args.rounds,
        rows=args.rows,
        columns=args.columns,
        workdir=args.workdir,
    )


# --- parser ---


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nnrouter", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def add(parent, name: str, func: Callable[[argparse.Namespace], int], help: str, config: str = "optional"):  # type: ignore[no-untyped-def]
        sp = parent.add_parser(name, help=help, description=help)
        sp.set_defaults(func=func)
        if config != "none":
            sp.add_argument(
                "--config", "-c", type=Path, required=config == "required",
                help="YAML config file" + (" (default: embedded defaults)" if config == "optional" else ""),
            )
        return sp

    cfg = sub.add_parser("config", help="print or check configuration").add_subparsers(dest="sub", required=True)
    add(cfg, "example", cmd_config_example, "print a complete, commented example config", config="none")
    add(cfg, "check", cmd_config_check, "validate a config file", config="required")

    db = sub.add_parser("db", help="database schema").add_subparsers(dest="sub", required=True)
    add(db, "upgrade", cmd_db_upgrade, "apply database migrations up to the newest")

    add(sub, "serve", cmd_serve, "run the DICOM node (C-STORE / C-ECHO SCP)")

    for name, func, help in (
        ("echo", cmd_echo, "C-ECHO a DICOM node"),
        ("send", cmd_send, "C-STORE files or folders to a DICOM node, on one association"),
    ):
        sp = add(sub, name, func, help, config="none")
        sp.add_argument("host")
        sp.add_argument("port", type=int)
        if name == "send":
            sp.add_argument("files", nargs="+", type=Path, metavar="FILES_OR_DIRS")
        sp.add_argument("--aet", default="NNROUTER_SCU", help="our (calling) AE title")
        sp.add_argument("--aec", default="ANY-SCP", help="the peer's (called) AE title")

    st = add(sub, "status", cmd_status, "counts of instances per state")
    st.add_argument("--json", action="store_true")

    study = sub.add_parser("study", help="look at one study").add_subparsers(dest="sub", required=True)
    show = add(study, "show", cmd_study_show, "series, instances, paths and states of a study")
    show.add_argument("study_uid")
    show.add_argument("--json", action="store_true")

    bench = sub.add_parser("bench", help="benchmarks that print figures").add_subparsers(dest="sub", required=True)
    ing = add(bench, "ingest", cmd_bench_ingest, "C-STORE throughput: nnrouter vs DCMTK storescp", config="none")
    ing.add_argument("--count", type=int, default=20, help="files per round")
    ing.add_argument("--rounds", type=int, default=3, help="alternating rounds per receiver")
    ing.add_argument("--rows", type=int, default=2500)
    ing.add_argument("--columns", type=int, default=2048)
    ing.add_argument("--workdir", type=Path, default=None, help="where to write files (default: a temp folder)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
