"""The ``nnrouter`` command: one entry point, one sub-command per job.

Each sub-command reads the config once and builds only what it needs, so
``nnrouter status`` on a busy node touches nothing but the database.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

from nnrouter.core import config as config_mod
from nnrouter.core import logs, yamlfile


def _settings(args: argparse.Namespace) -> config_mod.Settings:
    try:
        return config_mod.load(args.config)
    except yamlfile.FileProblems as exc:
        sys.exit(f"nnrouter: configuration is not valid:\n{exc}")


def _store(settings: config_mod.Settings):  # type: ignore[no-untyped-def]
    from nnrouter.core.store import Store

    return Store(settings.database.url)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False, default=str))


# --- config ---


def _study(s: Any, study_uid: str) -> Any:
    """The stored study with this Study Instance UID, or None."""
    from sqlalchemy import select

    from nnrouter.core.store import Study

    return s.execute(select(Study).where(Study.study_uid == study_uid)).scalar_one_or_none()


def cmd_config_example(args: argparse.Namespace) -> int:
    sys.stdout.write(config_mod.EXAMPLE)
    return 0


def _loaded(load: Callable[[Path], Any], path: Path, *, verdict: bool = False) -> Any:
    """What ``load`` makes of a YAML file, or None after printing every problem with file, line and field."""
    try:
        return load(path)
    except yamlfile.FileProblems as exc:
        print(str(exc), file=sys.stderr)
        if verdict:
            print(f"{len(exc.problems)} problem(s); the file was not used", file=sys.stderr)
        return None


def cmd_config_check(args: argparse.Namespace) -> int:
    if _loaded(config_mod.load, args.config) is None:
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
    from nnrouter.service.supervisor import serve

    return serve(_settings(args))


def cmd_worker(args: argparse.Namespace) -> int:
    from nnrouter.pixels.classify import run_worker
    from nnrouter.service.lifecycle import Stop, stop_on_signals

    settings = _settings(args)
    totals = run_worker(settings, stop_on_signals(Stop()), until_empty=args.until_empty)
    if args.until_empty:
        print(json.dumps(totals))
    return 0


def cmd_route(args: argparse.Namespace) -> int:
    from nnrouter.routing.router import run_router

    settings = _settings(args)
    if settings.routing.rules is None:
        print("nnrouter: routing.rules is not set: nothing to route", file=sys.stderr)
        return 2
    run_router(settings)  # it stops on SIGTERM and SIGINT
    return 0


# --- rules ---


def _load_rules(path: Path, *, verdict: bool = False, detector: Any = None):  # type: ignore[no-untyped-def]
    """The rule file, or None after printing every problem with file, line and field.

    ``detector`` (rules.DetectorRegions): region conditions are checked against what it can find.
    """
    from functools import partial

    from nnrouter.routing import rules

    return _loaded(partial(rules.load_rules, detector=detector), path, verdict=verdict)


def _detector_regions(settings: config_mod.Settings):  # type: ignore[no-untyped-def]
    """What the configured detector can find (rules.DetectorRegions); exits if its card is unusable."""
    from nnrouter.pixels.modelcard import ModelCardError
    from nnrouter.routing import rules

    try:
        return rules.detector_regions(settings.models.detector)
    except ModelCardError as exc:
        sys.exit(f"nnrouter: models.detector: {exc}")


def cmd_rules_check(args: argparse.Namespace) -> int:
    detector = _detector_regions(_settings(args))
    rs = _load_rules(args.file, verdict=True, detector=detector)
    if rs is None:
        return 1
    what = f"detector {detector.model}" if detector.model else "no detector configured"
    print(f"{args.file}: OK ({len(rs.rules)} rules, {len(rs.destinations)} destinations; regions checked against {what})")
    return 0


def cmd_rules_schema(args: argparse.Namespace) -> int:
    from nnrouter.routing import rules

    _print_json(rules.json_schema())
    return 0


def cmd_rules_test(args: argparse.Namespace) -> int:
    """Dry run: what the rules would do with these studies; nothing is sent."""
    import datetime as dt
    from dataclasses import replace

    from nnrouter.dicom.send import expand
    from nnrouter.routing import rules
    from nnrouter.routing.router import Router, header_facts

    ruleset = _load_rules(args.rules, detector=_detector_regions(_settings(args)))
    if ruleset is None:
        return 1
    now = dt.datetime.now(dt.timezone.utc)
    studies: dict[str, rules.StudyFacts] = {}
    if len(args.input) == 1 and not Path(args.input[0]).exists():
        # A Study Instance UID in the store, with what the workers found.
        settings = _settings(args)
        store = _store(settings)
        router = Router(settings, store)
        with store.read() as s:
            study = _study(s, args.input[0])
            if study is None:
                print(f"no study {args.input[0]} in the store", file=sys.stderr)
                return 1
            # The order check as the router would run it now, on the orders kept so far (nothing is written).
            from nnrouter.orders.mismatch import OrderCheck

            check = OrderCheck(settings, store, record=False)
            check.reload()
            _, findings = check.findings(s, study)
            for f in findings:
                print(f"flag {f.severity} {f.kind}: {f.reason}")
            studies[study.study_uid] = replace(router.facts(s, study, now), mismatches=frozenset(f.kind for f in findings))
    else:
        grouped: dict[str, list] = {}
        for f in expand([Path(p) for p in args.input]):
            try:
                h = header_facts(str(f))
            except Exception as exc:
                print(f"{f}: not DICOM ({exc})", file=sys.stderr)
                continue
            inst = rules.InstanceFacts(sop_instance_uid=str(h.get("SOPInstanceUID", f.name)), header=h,
                                       modality=h.get("Modality"), label=None, score=None)
            grouped.setdefault(str(h.get("StudyInstanceUID", "?")), []).append(inst)
        for uid, insts in grouped.items():
            studies[uid] = rules.StudyFacts(study_uid=uid, instances=tuple(insts), calling_aes=frozenset(args.calling_ae or []),
                                            called_aes=frozenset(), mismatches=frozenset(), now=now)
    for uid, facts in studies.items():
        print(f"study {uid} ({len(facts.instances)} instances)")
        print(rules.decide(ruleset, facts).text())
        print()
    return 0


# --- outbox ---


def _outbox_query(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from sqlalchemy import select

    from nnrouter.core.store import Instance, Outbox, Series, Study

    q = select(Outbox, Instance.sop_instance_uid, Study.study_uid).join(Instance, Instance.id == Outbox.instance_id) \
        .join(Series, Series.id == Instance.series_id).join(Study, Study.id == Series.study_id)
    if args.state:
        q = q.where(Outbox.state.in_(args.state))
    if args.destination:
        q = q.where(Outbox.destination.in_(args.destination))
    if args.study:
        q = q.where(Study.study_uid == args.study)
    return q.order_by(Outbox.id)


def cmd_outbox_list(args: argparse.Namespace) -> int:
    store = _store(_settings(args))
    with store.read() as s:
        rows = [
            {"id": o.id, "destination": o.destination, "state": o.state, "attempts": o.attempts,
             "next_attempt_at": o.next_attempt_at, "last_error": o.last_error, "rule": o.rule,
             "sop_instance_uid": sop, "study_uid": study, "sent_at": o.sent_at}
            for o, sop, study in s.execute(_outbox_query(args).limit(args.limit)).all()
        ]
    if args.json:
        _print_json(rows)
    else:
        for r in rows:
            print(f"{r['id']:>6} {r['state']:<8} {r['destination']:<16} tries {r['attempts']:<3} {r['sop_instance_uid']}"
                  + (f"  {r['last_error']}" if r["last_error"] else ""))
        print(f"{len(rows)} row(s)")
    return 0


@contextlib.contextmanager
def _outbox_ids(args: argparse.Namespace, default_states: list[str]) -> Iterator[tuple[Any, list[int]]]:
    """A write session and the ids of the outbox rows the options select (``default_states`` when none given)."""
    if not args.state:
        args.state = default_states
    with _store(_settings(args)).write() as s:
        yield s, [o.id for o, _, _ in s.execute(_outbox_query(args)).all()]


def cmd_outbox_retry(args: argparse.Namespace) -> int:
    from sqlalchemy import update

    from nnrouter.core.store import Outbox, OutboxState, utcnow

    with _outbox_ids(args, [OutboxState.DEAD, OutboxState.FAILED, OutboxState.HELD]) as (s, ids):
        if ids:
            s.execute(update(Outbox).where(Outbox.id.in_(ids)).values(
                state=OutboxState.PENDING, attempts=0, next_attempt_at=utcnow(), claimed_by=None, lease_until=None))
    print(f"{len(ids)} deliveries queued again")
    return 0


def cmd_outbox_purge(args: argparse.Namespace) -> int:
    from sqlalchemy import delete

    from nnrouter.core.store import Outbox, OutboxState

    with _outbox_ids(args, [OutboxState.SENT]) as (s, ids):
        if ids:
            s.execute(delete(Outbox).where(Outbox.id.in_(ids)))
    print(f"{len(ids)} outbox rows removed (states: {', '.join(args.state)})")
    return 0


# --- network tools ---


def cmd_echo(args: argparse.Namespace) -> int:
    from nnrouter.dicom.send import SendError, echo

    try:
        status = echo(args.host, args.port, args.aet, args.aec)
    except SendError as exc:
        print(f"echo failed: {exc}", file=sys.stderr)
        return 1
    print(f"C-ECHO {args.aec}@{args.host}:{args.port}: status 0x{status:04X}")
    return 0 if status == 0 else 1


def cmd_send(args: argparse.Namespace) -> int:
    from nnrouter.dicom.send import SendError, expand, send

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


# --- retention ---


def cmd_clean(args: argparse.Namespace) -> int:
    """One cleaning pass (or the cleaner's loop): expired studies, early ones when short of space, orphans."""
    from nnrouter.core.store import SchemaOutOfDate
    from nnrouter.service.clean import Cleaner, run_cleaner

    settings = _settings(args)
    logs.setup(settings.logging.level if args.loop else "warning", settings.logging.format)
    store = _store(settings)
    try:
        store.require_current()
    except SchemaOutOfDate as exc:
        print(f"nnrouter: {exc}", file=sys.stderr)
        return 2
    if args.loop:
        store.dispose()
        run_cleaner(settings)  # stops on SIGTERM / SIGINT
        return 0
    done = Cleaner(settings, store).run(dry_run=args.dry_run)
    store.dispose()
    if args.json:
        _print_json(done.as_dict())
    else:
        print(done.text())
    return 0


# --- looking at the store ---


def cmd_status(args: argparse.Namespace) -> int:
    settings = _settings(args)
    store = _store(settings)
    counts = store.state_counts()
    report = {
        "database": store.engine.url.render_as_string(hide_password=True),
        "schema": {"current": store.current_revision(), "head": store.head_revision()},
        "instances": {"total": sum(counts.values()), "by_state": counts},
        "outbox": store.outbox_counts(),
        "rules": store.rules_status("rules"),
        "procedures": store.rules_status("procedures"),
    }
    from nnrouter.service import pressure

    health = pressure.measure(settings, store).as_dict()
    report.update(ready=health.pop("ready"), not_ready_because=health.pop("reasons"), health=health)
    if args.json:
        _print_json(report)
    else:
        print(f"ready: {'yes' if report['ready'] else 'NO: ' + '; '.join(report['not_ready_because'])}"
              + "".join(f"\nALERT: {a}" for a in health["alerts"]))
        print(f"database {report['database']} (schema {report['schema']['current']})")
        print(f"instances: {report['instances']['total']}")
        for state, n in sorted(counts.items()):
            print(f"  {state:<16}{n}")
        if report["outbox"]:
            print("outbox: " + ", ".join(f"{d}: " + " ".join(f"{s} {n}" for s, n in sorted(v.items())) for d, v in sorted(report["outbox"].items())))
        for what in ("rules", "procedures"):
            r = report[what]
            if r.get("running"):
                print(f"{what}: running {r['running']['path']} ({r['running']['digest'][:12]}, loaded {r['running']['at']})")
            if r.get("rejected"):
                print(f"{what}: REJECTED {r['rejected']['path']} at {r['rejected']['at']}:\n{r['rejected']['errors']}")
    return 0


def flag_dict(f) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    return {"kind": f.kind, "severity": f.severity, "reason": f.reason, "sop_instance_uid": f.sop_instance_uid,
            "evidence": f.evidence, "at": f.created_at}


def study_report(store, study_uid: str, detector: Any = None) -> dict[str, Any] | None:  # type: ignore[no-untyped-def]
    """What the store knows about one study, as plain data (for JSON and tests).

    ``detector`` (rules.DetectorRegions) is the configured detector: what it
    can find and what it does not cover, so that a missing chest box is not
    read as a missing chest.
    """
    from sqlalchemy import select

    from nnrouter.core.store import Flag, Outbox, RoutingDecision
    from nnrouter.orders import order as orders

    with store.read() as s:
        study = _study(s, study_uid)
        if study is None:
            return None
        flags = [flag_dict(f) for f in s.execute(select(Flag).where(Flag.study_id == study.id).order_by(Flag.id)).scalars()]
        found = [
            {"source": o.source, "accession_number": o.accession_number, "requested_procedure_id": o.requested_procedure_id,
             "codes": [[c.value, c.scheme, c.meaning] for c in o.codes], "description": o.description,
             "laterality": o.laterality, "control": o.control}
            for o in orders.stored_for(s, study.accession_number, study.study_uid)
        ]
        decision = s.execute(select(RoutingDecision).where(RoutingDecision.study_id == study.id)).scalar_one_or_none()
        outbox: dict[int, list] = {}
        for o in s.execute(select(Outbox).join(Outbox.instance).where(Outbox.instance_id.in_(
                [i.id for se in study.series for i in se.instances]))).scalars():
            outbox.setdefault(o.instance_id, []).append(
                {"destination": o.destination, "state": o.state, "attempts": o.attempts, "rule": o.rule,
                 "sent_at": o.sent_at, "last_error": o.last_error})
        return {
            "study_uid": study.study_uid,
            "accession_number": study.accession_number,
            "study_date": study.study_date,
            "study_description": study.study_description,
            "last_received_at": study.last_received_at,
            "checked_at": study.checked_at,
            "detector": None if detector is None or detector.model is None else {
                "model": detector.model, "labels": list(detector.labels), "not_covered": list(detector.not_covered)},
            "orders": found,
            "flags": flags,
            "routing": None if decision is None else {
                "decided_at": decision.decided_at, "rules_digest": decision.rules_digest,
                "rules": decision.outcomes, "deliveries": decision.deliveries,
                "hold": decision.hold, "discard": decision.discard,
            },
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
                            "predictions": [
                                {
                                    "model": f"{p.model_name} {p.model_version}",
                                    "label": p.label,
                                    "score": round(p.score, 4),
                                    "top5": p.top5,
                                    "ood": p.ood,
                                    "provider": p.provider,
                                    "ms": {"decode": p.decode_ms, "preprocess": p.preprocess_ms, "infer": p.infer_ms},
                                    "cam_path": p.cam_path,
                                }
                                for p in i.predictions
                            ],
                            "detections": [
                                {
                                    "model": f"{d.model_name} {d.model_version}",
                                    "label": d.label,
                                    "score": round(d.score, 4),
                                    "box_px": d.box_px,
                                    "box_mm": d.box_mm,
                                    "corners_patient": d.corners_patient,
                                }
                                for d in i.detections
                            ],
                            "deliveries": outbox.get(i.id, []),
                        }
                        for i in se.instances
                    ],
                }
                for se in study.series
            ],
        }


def cmd_study_show(args: argparse.Namespace) -> int:
    from nnrouter.pixels.modelcard import ModelCardError
    from nnrouter.routing import rules

    settings = _settings(args)
    try:
        detector = rules.detector_regions(settings.models.detector)
    except ModelCardError as exc:  # the study is still worth showing
        print(f"nnrouter: models.detector: {exc}", file=sys.stderr)
        detector = None
    report = study_report(_store(settings), args.study_uid, detector)
    if report is None:
        print(f"no study {args.study_uid} in the store", file=sys.stderr)
        return 1
    if args.json:
        _print_json(report)
        return 0
    print(f"study {report['study_uid']}  accession {report['accession_number'] or '-'}")
    det = report["detector"]
    if det is not None:
        missing = ", ".join(det["not_covered"])
        print(f"  detector {det['model']} looks for {', '.join(det['labels'])}"
              + (f"; does not cover {missing}: no box there says nothing about them" if missing else ""))
    for f in report["flags"]:
        print(f"  flag {f['severity']:<7} {f['kind']}: {f['reason']}")
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
    return 0


def cmd_mismatches(args: argparse.Namespace) -> int:
    """Flagged studies, newest check first: what a QA technologist works through."""
    from sqlalchemy import select

    from nnrouter.core.store import Flag, Study

    settings = _settings(args)
    store = _store(settings)
    query = select(Flag, Study.study_uid, Study.accession_number).join(Study, Study.id == Flag.study_id)
    kinds = args.kind or None
    if kinds:
        query = query.where(Flag.kind.in_(kinds))
    elif not args.all:
        from nnrouter.orders.order import FlagKind

        query = query.where(Flag.kind.in_(FlagKind.MISMATCHES))
    if args.study:
        query = query.where(Study.study_uid == args.study)
    with store.read() as s:
        rows = s.execute(query.order_by(Flag.created_at.desc(), Flag.id).limit(args.limit)).all()
    out = [{"study_uid": uid, "accession_number": acc, **flag_dict(f)} for f, uid, acc in rows]
    if args.json:
        _print_json(out)
    else:
        for r in out:
            print(f"{r['study_uid']}  {r['accession_number'] or '-':<12} {r['severity']:<7} {r['kind']:<20} {r['reason']}")
        if not out:
            print("no flagged studies")
    return 0


def study_views(s, study):  # type: ignore[no-untyped-def]
    """A stored study as the hanging-protocol layout takes it; None without a usable Study Date."""
    import re

    from nnrouter.core.codes import classes
    from nnrouter.core.store import current_instances, latest_predictions
    from nnrouter.results import hanging

    if not re.fullmatch(r"\d{8}", study.study_date or ""):
        return None
    known = classes()
    images, parts = [], set()
    rows = current_instances(s, study.id)
    predictions = latest_predictions(s, (i.id for i in rows))
    for inst in rows:
        series = inst.series
        if series.body_part_examined:
            parts.add(series.body_part_examined)
        pred = predictions.get(inst.id)
        side = (inst.image_laterality or "").upper()
        number = int(inst.instance_number) if (inst.instance_number or "").strip().lstrip("-").isdigit() else None
        images.append(hanging.ImageView(
            sop_instance_uid=inst.sop_instance_uid, series_uid=series.series_uid,
            label=(pred.label if pred.label in known else hanging.UNKNOWN) if pred else None,
            score=min(max(pred.score, 0.0), 1.0) if pred else None,
            laterality=side if side in ("L", "R") else None, instance_number=number,
            regions=tuple((d.label, d.score) for d in inst.detections),
        ))
    return hanging.StudyViews(study.study_uid, study.study_date, study.accession_number or "", frozenset(parts), tuple(images))


def cmd_hang(args: argparse.Namespace) -> int:
    """The layout for one study, with the newest earlier study of the same patient and body part beside it."""
    from sqlalchemy import select

    from nnrouter.core.store import Study
    from nnrouter.results import hanging

    settings = _settings(args)
    with _store(settings).read() as s:
        study = _study(s, args.study_uid)
        if study is None:
            print(f"no study {args.study_uid} in the store", file=sys.stderr)
            return 1
        current = study_views(s, study)
        if current is None:
            print(f"study {args.study_uid} has no Study Date: cannot order it among priors", file=sys.stderr)
            return 1
        prior = None
        if study.patient_id:
            others = s.execute(select(Study).where(Study.patient_id == study.patient_id, Study.id != study.id)).scalars()
            prior = hanging.pick_prior(current, [v for v in (study_views(s, o) for o in others) if v is not None])
    _print_json(hanging.layout(current, prior).to_dict())
    return 0


def cmd_hang_protocols(args: argparse.Namespace) -> int:
    """Write the generic Hanging Protocol instances, and store them to a destination if asked."""
    from nnrouter.results import hanging

    if args.send and not args.rules:
        print("--send names a destination of a rule file: give --rules FILE too", file=sys.stderr)
        return 2
    paths = hanging.write_protocols(args.out, creator=args.creator, version=args.version)
    print(f"wrote {len(paths)} Hanging Protocol instances to {args.out}")
    if args.send:
        from nnrouter.dicom.send import SendError, send

        ruleset = _load_rules(args.rules)
        if ruleset is None:
            return 1
        try:
            dest = ruleset.destination(args.send)
        except KeyError:
            print(f"no destination {args.send!r} in {args.rules}", file=sys.stderr)
            return 1
        try:
            outcomes = send(dest.host, dest.port, paths, dest.calling_ae, dest.ae_title)
        except SendError as exc:
            print(f"nnrouter: {exc}", file=sys.stderr)
            return 1
        bad = [o for o in outcomes if o.status != 0]
        print(f"stored {len(outcomes) - len(bad)} of {len(outcomes)} at {dest.ae_title}@{dest.host}:{dest.port}")
        for o in bad:
            print(f"  {o.path}: {o.comment or o.status}", file=sys.stderr)
        return 1 if bad else 0
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """The study's Comprehensive SR, written to a file (the router makes the same one when a rule asks)."""
    from nnrouter.results import report
    from nnrouter.routing.router import study_findings

    settings = _settings(args)
    with _store(settings).read() as s:
        study = _study(s, args.study_uid)
        findings = study_findings(s, study.id) if study else None
    if findings is None:
        print(f"no study {args.study_uid} with readable instances in the store", file=sys.stderr)
        return 1
    out = report.write_sr(report.build_sr(findings), args.out)
    print(f"wrote {out}: {len(findings.images)} images, {len(findings.flags)} flags")
    return 0


def cmd_procedures_check(args: argparse.Namespace) -> int:
    from nnrouter.orders.procedures import load_procedures

    book = _loaded(load_procedures, args.file)
    if book is None:
        return 1
    print(f"{args.file}: OK, {len(book.spec.procedures)} procedures"
          + (" plus the single-view codes of classes.csv" if book.spec.class_codes else ""))
    return 0


# --- models ---


def _model_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.glob("*/model.yaml"))


def cmd_models_list(args: argparse.Namespace) -> int:
    from nnrouter.pixels.modelcard import ModelCardError, load_card

    rows = []
    for d in _model_dirs(args.dir):
        try:
            card = load_card(d)
            rows.append({"path": str(d), "name": card.name, "version": card.version, "task": card.task,
                         "labels": len(card.labels), "sha256": card.sha256[:12]})
        except ModelCardError as exc:
            rows.append({"path": str(d), "error": str(exc)})
    if args.json:
        _print_json(rows)
    else:
        for r in rows:
            print(f"{r['path']}: " + (r["error"] if "error" in r else f"{r['name']} {r['version']} ({r['task']}, {r['labels']} labels, sha256 {r['sha256']}…)"))
    return 0 if all("error" not in r for r in rows) else 1


def cmd_models_verify(args: argparse.Namespace) -> int:
    from nnrouter.pixels.modelcard import ModelCardError, verify

    dirs = args.models or _model_dirs(Path("models"))
    bad = 0
    for d in dirs:
        try:
            print(f"{d}: OK sha256 {verify(d)}")
        except ModelCardError as exc:
            bad += 1
            print(f"{d}: {exc}", file=sys.stderr)
    return 1 if bad else 0


def read_image(path: Path, max_side: int):  # type: ignore[no-untyped-def]
    """A DICOM file through the serving decode path, or a PNG/JPEG as 8-bit gray."""
    import cv2

    from nnrouter.pixels.decode import decode_file

    if path.suffix.lower() in (".png", ".jpg", ".jpeg"):
        img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if img is None:
            raise ValueError(f"{path}: not a readable image")
        return img
    return decode_file(path, max_side=max_side).image


def cmd_models_run(args: argparse.Namespace) -> int:
    from nnrouter.pixels.decode import DecodeError
    from nnrouter.pixels.runtime import Model

    model = Model.load(args.model, providers=args.providers)
    status = 0
    for f in args.files:
        try:
            img = read_image(f, 1024)
        except (DecodeError, ValueError) as exc:
            print(f"{f}: {exc}", file=sys.stderr)
            status = 1
            continue
        if model.card.task == "classify":
            c = model.classify([img])[0]
            top = "  ".join(f"{label} {score:.3f}" for label, score in c.top)
            print(f"{f}: {c.label} ({c.score:.3f})  top-5: {top}  [{model.provider}]")
        else:
            found = model.detect([img])[0]
            print(f"{f}: {len(found)} regions [{model.provider}]")
            for d in found:
                print(f"  {d.label:<8} {d.score:.3f}  box {[round(v, 1) for v in d.box]}")
    return status


def cmd_models_promote(args: argparse.Namespace) -> int:
    """0: promoted (or rolled back, or the dry run would promote); 1: refused; 2: cannot compare or switch."""
    from nnrouter.training import promote
    from nnrouter.training.dataset import split_groups
    from nnrouter.training.train import read_manifest

    if args.current is not None:
        target = args.current
    else:
        target = _settings(args).models.classifier
        if target is None:
            print("nnrouter: models.classifier is null in the config: nothing to replace (give --current DIR)",
                  file=sys.stderr)
            return 2
    try:
        if args.rollback:
            sha = promote.rollback(target)
            print(f"rolled back: {target} is the previous model again (sha256 {sha}); "
                  f"{promote.previous_dir(target)} holds the one it replaced")
            return 0
        if args.candidate is None or args.dataset is None:
            print("nnrouter: --candidate and --dataset are needed (or --rollback)", file=sys.stderr)
            return 2
        groups = None
        if args.holdout_groups:
            groups = split_groups(args.holdout_groups, {e.group for e in read_manifest(args.dataset)})
        comparison = promote.promote(args.candidate, target, args.dataset, groups=groups, trained_on=args.trained_on,
                                     tolerance=args.tolerance, dry_run=args.dry_run)
    except (ValueError, OSError) as exc:  # PromotionError, ModelCardError, an unreadable manifest
        print(f"nnrouter: {exc}", file=sys.stderr)
        return 2
    if not comparison.accepted:
        print(f"nnrouter: not promoted: {'; '.join(comparison.reasons)}", file=sys.stderr)
        return 1
    if args.dry_run:
        print(f"dry run: {target} left as it is")
    return 0


def cmd_models_import_nncpr(args: argparse.Namespace) -> int:
    from nnrouter.training.nncpr import import_nncpr

    try:
        out = import_nncpr(args.pb, args.out, name=args.name, version=args.version)
    except (ImportError, ValueError) as exc:
        print(f"nnrouter: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out / 'model.onnx'} and {out / 'model.yaml'}")
    return 0


def cmd_bench_ingest(args: argparse.Namespace) -> int:
    from nnrouter.testing import bench

    return bench.ingest(
        count=args.count,
        rounds=args.rounds,
        rows=args.rows,
        columns=args.columns,
        workdir=args.workdir,
    )


def cmd_bench_infer(args: argparse.Namespace) -> int:
    import importlib.resources

    from nnrouter.dicom.send import expand
    from nnrouter.testing import bench

    settings = _settings(args)
    model = args.model or settings.models.classifier
    if model is None:
        print("no model: pass --model DIR or set models.classifier", file=sys.stderr)
        return 2
    files = expand(args.files) if args.files else []
    if not files:
        data = importlib.resources.files("data_store") / "data"
        files = [Path(str(data / n)) for n in ("RG1_UNCI.dcm", "RG1_J2KR.dcm", "RG3_UNCR.dcm", "RG3_J2KI.dcm")]
        shared = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dicom" / "good"
        files += sorted(shared.glob("*.dcm"))
    return bench.infer(model, files, args.batch, args.images, args.providers, settings.models.decode_max_side)


def cmd_bench_route(args: argparse.Namespace) -> int:
    from nnrouter.testing import bench

    settings = _settings(args)
    model = None if args.no_model else (args.model or settings.models.classifier)
    return bench.route(args.studies, args.images, args.rows, args.columns, args.workers, args.quiet_s, model,
                       args.max_associations, args.workdir)


def cmd_bench_soak(args: argparse.Namespace) -> int:
    from nnrouter.testing import bench

    seconds = args.seconds if args.seconds is not None else args.minutes * 60
    interval = args.interval_s or (60.0 if seconds >= 300 else max(2.0, seconds / 6))
    warmup = args.warmup_s if args.warmup_s is not None else min(300.0, max(interval, seconds * 0.2))
    return bench.soak(seconds, senders=args.senders, per_association=args.per_association, rows=args.rows,
                      columns=args.columns, workers=args.workers, model=args.model, interval_s=interval,
                      warmup_s=warmup, workdir=args.workdir)


def cmd_dataset_build(args: argparse.Namespace) -> int:
    from nnrouter.training import dataset

    if args.store and args.config is None:
        sys.exit("nnrouter: --store reads the database named in --config")
    try:
        summary = dataset.build(args.out, images=args.images, dicom=args.dicom,
                                store_config=args.config if args.store else None,
                                mapping=args.mapping, check_decode=args.check_decode, group_by=args.group_by,
                                exclude_groups=args.exclude_groups or [])
    except (yamlfile.FileProblems, ValueError) as exc:
        print(f"nnrouter: {exc}", file=sys.stderr)
        return 1
    print(summary.text())
    return 0


def cmd_train_classifier(args: argparse.Namespace) -> int:
    from nnrouter.training.train import TrainConfig, train

    cfg = TrainConfig(epochs=args.epochs, per_class=args.per_class, seed=args.seed, size=args.size,
                      batch_size=args.batch_size, threads=args.threads, min_images=args.min_images)
    command = "nnrouter " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("nnrouter") else ""
    result = train(args.dataset, args.out, cfg, name=args.name, version=args.version, cache_dir=args.cache,
                   command=command or f"nnrouter train classifier --dataset {args.dataset} --out {args.out} --seed {args.seed}")
    print(f"wrote {result.out}: {len(result.labels)} classes, validation accuracy {result.val_accuracy:.3f} after {result.epochs_run} epochs")
    return 0


def cmd_train_detector(args: argparse.Namespace) -> int:
    from nnrouter.training.train_detector import DetectorConfig, train_detector

    cfg = DetectorConfig(epochs=args.epochs, seed=args.seed, size=args.size, threads=args.threads)
    command = "nnrouter " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("nnrouter") else ""
    card = train_detector(args.regions, args.out, cfg, negatives=args.negatives, name=args.name, version=args.version,
                          cache_dir=args.cache,
                          command=command or f"nnrouter train detector --regions {args.regions} --out {args.out} --seed {args.seed}")
    t = card.metrics["thresholds"]
    print(f"wrote {args.out}: labels {', '.join(card.labels)}, conf {t['conf']}, iou {t['iou']}, "
          f"validation mAP@0.5 {card.metrics['validation'].get('best_epoch_map50')}")
    return 0


def cmd_evaluate_detector(args: argparse.Namespace) -> int:
    from nnrouter.training.evaluate_detector import evaluate, update_card

    if not args.regions:
        print("nnrouter: a detector is evaluated on boxes: give --regions CSV|COCO.json|YOLO_DIR", file=sys.stderr)
        return 2
    report = evaluate(args.model, args.regions, negatives=args.negatives, out=args.out, cache_dir=args.cache,
                      max_epochs=args.max_epochs)
    print(report.text())
    if args.update_card:
        update_card(args.model, report)
        print(f"updated {args.model / 'model.yaml'} with these figures")
    if args.out:
        print(f"wrote {args.out / 'report.json'}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from nnrouter.dicom.send import expand
    from nnrouter.pixels.modelcard import load_card
    from nnrouter.training.evaluate import evaluate

    if load_card(args.model).task == "detect":
        return cmd_evaluate_detector(args)
    if not args.dataset:
        print("nnrouter: a classifier is evaluated on a manifest: give --dataset M.csv", file=sys.stderr)
        return 2

    report = evaluate(args.model, args.dataset, split=args.split, external=expand(args.external) if args.external else None,
                      out=args.out, loso=args.loso, ablate=args.ablate, cache_dir=args.cache, cams=args.cams,
                      max_epochs=args.max_epochs)
    print(report.text())
    if args.update_card:
        from nnrouter.training.evaluate import update_card

        update_card(args.model, report, args.dataset, args.split)
        print(f"updated {args.model / 'model.yaml'} with these figures")
    if args.out:
        print(f"wrote {args.out / 'report.json'} and {args.out / 'confusion.png'}")
    return 0


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

    add(sub, "serve", cmd_serve, "run the DICOM node (C-STORE / C-ECHO SCP) and its workers")
    wk = add(sub, "worker", cmd_worker, "decode and classify received instances (one worker process)")
    wk.add_argument("--until-empty", action="store_true", help="exit when no work is left; print counts")

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

    add(sub, "route", cmd_route, "run the router and forwarder alone (serve runs one when routing.rules is set)")

    rl = sub.add_parser("rules", help="routing rules").add_subparsers(dest="sub", required=True)
    rc = add(rl, "check", cmd_rules_check, "validate a rule file; every problem with file, line, column, field "
             "(region conditions against the detector of --config)")
    rc.add_argument("file", type=Path)
    add(rl, "schema", cmd_rules_schema, "print the JSON Schema of rule files, for editors", config="none")
    rtest = add(rl, "test", cmd_rules_test, "show what the rules would do with DICOM files or a stored study; sends nothing")
    rtest.add_argument("--rules", type=Path, required=True)
    rtest.add_argument("--calling-ae", nargs="*", help="calling AE titles to assume for files")
    rtest.add_argument("input", nargs="+", help="DICOM files or folders, or a Study Instance UID in the store")

    ob = sub.add_parser("outbox", help="deliveries to destinations").add_subparsers(dest="sub", required=True)
    for name, func, help in (
        ("list", cmd_outbox_list, "list deliveries"),
        ("retry", cmd_outbox_retry, "queue failed, dead or held deliveries again"),
        ("purge", cmd_outbox_purge, "remove delivery rows (default: sent ones)"),
    ):
        o = add(ob, name, func, help)
        o.add_argument("--state", nargs="+", help="pending sending sent failed dead held")
        o.add_argument("--destination", nargs="+")
        o.add_argument("--study", help="Study Instance UID")
        if name == "list":
            o.add_argument("--limit", type=int, default=1000)
            o.add_argument("--json", action="store_true")

    st = add(sub, "status", cmd_status, "counts of instances per state")
    st.add_argument("--json", action="store_true")
    cl = add(sub, "clean", cmd_clean, "delete delivered studies kept long enough, and orphan files (retention)")
    cl.add_argument("--dry-run", action="store_true", help="show what would go and why; delete nothing")
    cl.add_argument("--json", action="store_true")
    cl.add_argument("--loop", action="store_true", help="run the cleaner stage until stopped (serve runs one itself)")

    study = sub.add_parser("study", help="look at one study").add_subparsers(dest="sub", required=True)
    show = add(study, "show", cmd_study_show, "series, instances, paths and states of a study")
    show.add_argument("study_uid")
    show.add_argument("--json", action="store_true")

    models = sub.add_parser("models", help="model cards and ONNX models").add_subparsers(dest="sub", required=True)
    ml = add(models, "list", cmd_models_list, "list the models in a folder with their cards", config="none")
    ml.add_argument("--dir", type=Path, default=Path("models"))
    ml.add_argument("--json", action="store_true")
    mv = add(models, "verify", cmd_models_verify, "check each model's sha256 against its card", config="none")
    mv.add_argument("models", nargs="*", type=Path, metavar="MODEL_DIR")
    mr = add(models, "run", cmd_models_run, "run a model on DICOM, PNG or JPEG files", config="none")
    mr.add_argument("model", type=Path, metavar="MODEL_DIR")
    mr.add_argument("files", nargs="+", type=Path, metavar="FILE")
    mr.add_argument("--providers", nargs="+", default=None, help="onnxruntime providers, in order")
    mi = add(models, "import-nncpr", cmd_models_import_nncpr, "convert the published NNCPR frozen graph to ONNX with its card", config="none")
    mi.add_argument("pb", type=Path, metavar="network.pb")
    mi.add_argument("--out", type=Path, default=Path("models/nncpr"))
    mi.add_argument("--name", default="nncpr")
    mi.add_argument("--version", default="1.0")
    mp = add(models, "promote", cmd_models_promote,
             "replace the configured classifier with a retrained one only if it is at least as good on held-out images")
    mp.add_argument("--candidate", type=Path, metavar="DIR", help="the retrained model folder")
    mp.add_argument("--dataset", type=Path, metavar="CSV", help="manifest (nnrouter dataset build) to compare on")
    mp.add_argument("--current", type=Path, metavar="DIR", help="the model folder to compare and replace "
                    "(default: models.classifier of --config)")
    mp.add_argument("--holdout-groups", action="append", metavar="G1,G2",
                    help="compare on these source groups (default: the validation split both cards record)")
    mp.add_argument("--trained-on", type=Path, metavar="CSV",
                    help="the candidate's training manifest: shows it was kept off --holdout-groups")
    mp.add_argument("--tolerance", type=float, default=0.0,
                    help="sensitivity a class of the current model may lose (0..1, default 0)")
    mp.add_argument("--dry-run", action="store_true", help="compare and print; replace nothing")
    mp.add_argument("--rollback", action="store_true", help="swap NAME.previous back in")

    ds = sub.add_parser("dataset", help="training and evaluation data").add_subparsers(dest="sub", required=True)
    dsb = add(ds, "build", cmd_dataset_build, "write a dataset manifest (file,label,group,kind) and its summary")
    dsb.add_argument("--out", type=Path, required=True, metavar="M.csv", help="manifest to write; M.csv.summary.json beside it")
    dsb.add_argument("--images", type=Path, metavar="DIR", help="folder of class folders (PNG/JPEG); MANIFEST.csv gives groups")
    dsb.add_argument("--dicom", type=Path, nargs="+", metavar="FILE_OR_DIR", help="DICOM files or folders, labelled from headers")
    dsb.add_argument("--store", action="store_true", help="the instances in nnrouter's store (database from --config)")
    dsb.add_argument("--mapping", type=Path, default=Path("rules/labels.yaml"), help="header-to-class rules")
    dsb.add_argument("--no-check-decode", dest="check_decode", action="store_false", help="skip the decode check (faster)")
    dsb.add_argument("--group-by", choices=["calling_ae", "institution", "station"], default="calling_ae",
                     help="source group of stored instances: the sending AE title, or the header's Institution or "
                          "Station Name (evaluation holds out whole groups)")
    dsb.add_argument("--exclude-groups", action="append", metavar="G1,G2",
                     help="leave these source groups out (a training manifest that holds them out)")

    tr = sub.add_parser("train", help="train models (needs the [train] extra)").add_subparsers(dest="sub", required=True)
    tc = add(tr, "classifier", cmd_train_classifier, "fine-tune the view classifier and export ONNX with its card", config="none")
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
    td = add(tr, "detector", cmd_train_detector, "train the region detector (head, spine) and export ONNX with its card",
             config="none")
    td.add_argument("--regions", type=Path, required=True, metavar="CSV|COCO.json|YOLO_DIR", help="the boxes")
    td.add_argument("--out", type=Path, required=True, help="model folder to write")
    td.add_argument("--negatives", type=Path, nargs="*", metavar="DIR",
                    help="folders of films showing no region (default: ../radiographs/{knee,hand,wrist,shoulder}_ap)")
    td.add_argument("--epochs", type=int, default=30)
    td.add_argument("--size", type=int, default=256)
    td.add_argument("--seed", type=int, default=0)
    td.add_argument("--threads", type=int, default=0)
    td.add_argument("--cache", type=Path, help="folder for the feature bank (reused by evaluate)")
    td.add_argument("--name", default="nnrouter-regions")
    td.add_argument("--version", default="1")

    ev = add(sub, "evaluate", cmd_evaluate, "accuracy, per-class figures, calibration, confusion matrix", config="none")
    ev.add_argument("--model", type=Path, required=True)
    ev.add_argument("--dataset", type=Path, help="classifier: manifest CSV")
    ev.add_argument("--regions", type=Path, metavar="CSV|COCO.json|YOLO_DIR",
                    help="detector (card task detect): the boxes; held-out-source folds are retrained")
    ev.add_argument("--negatives", type=Path, nargs="*", metavar="DIR", help="detector: films showing no region")
    ev.add_argument("--split", choices=["val", "all"], default="val", help="the model's validation images, or all")
    ev.add_argument("--external", nargs="*", type=Path, help="DICOM files or folders from other sources")
    ev.add_argument("--out", type=Path, help="folder for report.json and confusion.png")
    ev.add_argument("--update-card", action="store_true", help="write the figures into the model card")
    ev.add_argument("--loso", action="store_true",
                    help="leave-one-source-out: retrain without each source of a multi-source class, test on it")
    ev.add_argument("--ablate", action="store_true", help="also run leave-one-source-out without the augmented views "
                    "(reuses the card's own leave-one-source-out figures when --loso is not given)")
    ev.add_argument("--cache", type=Path, help="folder for the feature bank the folds share (reused between runs)")
    ev.add_argument("--max-epochs", type=int, default=0, metavar="N",
                    help="cap each leave-one-source-out fold at N epochs (default: the model's own recipe)")
    ev.add_argument("--cams", type=int, default=0, metavar="N",
                    help="write class activation map sheets: N images per single-source class, and the external films")

    mm = add(sub, "mismatches", cmd_mismatches, "studies whose images are not what was ordered")
    mm.add_argument("--kind", nargs="+", help="only these flags (default: the mismatches, not uncertain/unmapped)")
    mm.add_argument("--all", action="store_true", help="every flag, uncertain and unmapped included")
    mm.add_argument("--study", help="one study")
    mm.add_argument("--limit", type=int, default=200)
    mm.add_argument("--json", action="store_true")
    hg = add(sub, "hang", cmd_hang, "hanging-protocol layout of a study, as JSON")
    hg.add_argument("study_uid")
    hgp = add(sub, "hang-protocols", cmd_hang_protocols, "write (and store) the generic DICOM Hanging Protocol instances",
              config="none")
    hgp.add_argument("--out", type=Path, required=True, help="folder for the .dcm files")
    hgp.add_argument("--creator", default="NNROUTER")
    hgp.add_argument("--version", default="1")
    hgp.add_argument("--send", metavar="DESTINATION", help="also store them to this destination of the rule file")
    hgp.add_argument("--rules", type=Path, help="the rule file that names the destination")
    rp = add(sub, "report", cmd_report, "write a study's Comprehensive SR (what nnrouter found)")
    rp.add_argument("study_uid")
    rp.add_argument("--out", type=Path, required=True)
    proc = sub.add_parser("procedures", help="what each ordered procedure should produce").add_subparsers(dest="sub", required=True)
    pc = add(proc, "check", cmd_procedures_check, "validate a procedures file", config="none")
    pc.add_argument("file", type=Path)

    bench = sub.add_parser("bench", help="benchmarks that print figures").add_subparsers(dest="sub", required=True)
    ing = add(bench, "ingest", cmd_bench_ingest, "C-STORE throughput: nnrouter vs DCMTK storescp", config="none")
    ing.add_argument("--count", type=int, default=20, help="files per round")
    ing.add_argument("--rounds", type=int, default=3, help="alternating rounds per receiver")
    ing.add_argument("--rows", type=int, default=2500)
    ing.add_argument("--columns", type=int, default=2048)
    ing.add_argument("--workdir", type=Path, default=None, help="where to write files (default: a temp folder)")
    inf = add(bench, "infer", cmd_bench_infer, "decode + preprocess + inference speed per stage")
    inf.add_argument("--model", type=Path, default=None, help="model folder (default: models.classifier)")
    inf.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    inf.add_argument("--images", type=int, default=64, help="images per batch size")
    inf.add_argument("--providers", nargs="+", default=None)
    inf.add_argument("files", nargs="*", type=Path, help="DICOM files or folders (default: pydicom-data + ../shared good)")
    rt = add(bench, "route", cmd_bench_route, "end to end: storescu -> nnrouter -> storescp vs direct")
    rt.add_argument("--studies", type=int, default=5)
    rt.add_argument("--images", type=int, default=4, help="images per study")
    rt.add_argument("--rows", type=int, default=2500)
    rt.add_argument("--columns", type=int, default=2048)
    rt.add_argument("--workers", type=int, default=2, help="classify worker processes")
    rt.add_argument("--quiet-s", type=float, default=1.0, help="the routing quiet period")
    rt.add_argument("--max-associations", type=int, default=1, help="associations to the destination (storescp takes one at a time)")
    rt.add_argument("--model", type=Path, default=None, help="classifier (default: models.classifier)")
    rt.add_argument("--no-model", action="store_true", help="route without classifying")
    rt.add_argument("--workdir", type=Path, default=None)
    sk = add(bench, "soak", cmd_bench_soak, "hours of small instances: RSS per process, images/s, counts", config="none")
    sk_len = sk.add_mutually_exclusive_group()
    sk_len.add_argument("--minutes", type=float, default=30.0)
    sk_len.add_argument("--seconds", type=float, default=None, help="instead of --minutes (short runs, tests)")
    sk.add_argument("--senders", type=int, default=4, help="associations open at once")
    sk.add_argument("--per-association", type=int, default=10, help="instances sent on each association")
    sk.add_argument("--rows", type=int, default=128)
    sk.add_argument("--columns", type=int, default=128)
    sk.add_argument("--workers", type=int, default=1, help="decode/classify worker processes")
    sk.add_argument("--model", type=Path, default=None, help="classifier for the workers (default: none, decode only)")
    sk.add_argument("--interval-s", type=float, default=None, help="seconds between RSS lines (default 60)")
    sk.add_argument("--warmup-s", type=float, default=None, help="RSS growth is measured from here (default 20 %%, at most 300 s)")
    sk.add_argument("--workdir", type=Path, default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
