"""Route: decide, per complete study, where its images go, and queue the deliveries.

A study is routed once nothing has arrived for its quiet period and every
instance has been looked at by a worker. The decision (which rules matched,
why, which deliveries) is written with the outbox rows in one transaction, so
a crash either leaves the study undecided or fully queued. Instances that
arrive after the decision follow it. The rule file is reloaded when it
changes; a file that fails validation never replaces the running rules.

The router only decides and writes: it sends nothing (the forwarder, a
stage of its own in ``nnrouter.routing.forward``, reads the outbox rows) and
asks no one over the network (the worklist stage keeps the RIS's orders in
the store; a study whose worklist answer is still to come waits for it, at
most ``WORKLIST_WAIT_S`` past its quiet period).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from functools import partial
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName
from sqlalchemy import exists, func, select
from sqlalchemy.orm import Session, aliased

from nnrouter.core import headers, logs, yamlfile
from nnrouter.core.config import Settings
from nnrouter.core.store import (
    Flag,
    FlagReview,
    Instance,
    InstanceState,
    Outbox,
    OutboxState,
    Prediction,
    RoutingDecision,
    RulesLoad,
    Series,
    Store,
    Study,
    current_instances,
    latest_predictions,
    utcnow,
)
from nnrouter.orders import reviews
from nnrouter.orders.mismatch import OrderCheck
from nnrouter.orders.worklist_poll import WORKLIST_WAIT_S
from nnrouter.routing import rules

if TYPE_CHECKING:
    from nnrouter.results import report

log = logs.get("nnrouter.routing.router")

# The classify stage is done with an instance in these states.
LOOKED_AT = (
    InstanceState.CLASSIFIED,
    InstanceState.DECODED,
    InstanceState.UNDECODABLE,
    InstanceState.FAILED,
    InstanceState.CREATED,
)


def header_facts(ds: Dataset) -> dict[str, Any]:
    """Top-level attributes by keyword, as plain values, for tag conditions.

    Patient attributes are included (a rule may need them) but never logged.
    """
    out: dict[str, Any] = {}
    for elem in ds:
        if not elem.keyword or elem.VR in rules.UNTESTABLE_VRS:
            continue
        value = elem.value
        if isinstance(value, MultiValue):
            value = [str(v) for v in value]
        elif isinstance(value, PersonName):
            value = str(value)
        elif isinstance(value, bytes):
            continue
        out[elem.keyword] = value
    return out


def _utc(ts: dt.datetime) -> dt.datetime:
    """SQLite hands back naive datetimes; they were written in UTC."""
    return ts if ts.tzinfo else ts.replace(tzinfo=dt.UTC)


def _detector_regions(settings: Settings) -> rules.DetectorRegions | None:
    """What the configured detector can find; None (regions unchecked) when its card cannot be read.

    The workers refuse such a detector loudly; routing goes on, without this check rather than without rules.
    """
    from nnrouter.pixels.modelcard import ModelCardError

    try:
        return rules.detector_regions(settings.models.detector)
    except ModelCardError as exc:
        log.error("detector_card_unreadable", detector=str(settings.models.detector), error=str(exc)[:500])
        return None


@dataclass
class Loaded:
    ruleset: rules.RuleSet
    digest: str


class Router:
    def __init__(self, settings: Settings, store: Store):
        self.settings = settings
        self.store = store
        self.path: Path | None = settings.routing.rules
        self.loaded: Loaded | None = None
        # Region conditions are checked against the configured detector: one it cannot answer never fires.
        detector = None if self.path is None else _detector_regions(settings)
        self._rules_file = (
            None
            if self.path is None
            else yamlfile.Reloaded(
                self.path,
                partial(rules.load_rules, detector=detector, calling_ae=settings.dicom.ae_title),
                self._record,
                "rules",
                lambda r: {"rules": len(r.rules), "destinations": len(r.destinations)},
                log,
            )
        )
        self.order_check = OrderCheck(settings, store)

    # --- rules, reloaded safely ---

    def reload(self) -> bool:
        """Load the rule file if it changed; keep the running rules if it is invalid."""
        if self._rules_file is None or not self._rules_file.poll():
            return False
        assert self._rules_file.value is not None and self._rules_file.digest is not None
        self.loaded = Loaded(self._rules_file.value, self._rules_file.digest)
        return True

    def _record(self, ok: bool, digest: str, errors: str | None, text: str | None) -> None:
        with self.store.write() as s:
            s.add(
                RulesLoad(
                    path=str(self.path), digest=digest, ok=ok, errors=errors, node=self.settings.node.name, text=text
                )
            )

    # --- deciding ---

    def quiet_s(self, calling_aes: set[str]) -> float:
        st = self.loaded.ruleset.settings if self.loaded else None
        if st is None:
            return rules.RouteSettings.model_validate({}).quiet_s  # no rules yet: the rule files' default quiet period
        per_ae = [st.quiet_s_by_calling_ae[a] for a in calling_aes if a in st.quiet_s_by_calling_ae]
        return max(per_ae) if per_ae else st.quiet_s

    def facts(self, s: Session, study: Study, now: dt.datetime) -> rules.StudyFacts:
        """What the rules look at: every current instance's header, prediction and regions."""
        rows = current_instances(s, study.id)
        predictions = latest_predictions(s, (i.id for i in rows))
        instances = []
        for inst in rows:
            pred = predictions.get(inst.id)
            try:
                header = header_facts(headers.of(inst))
            except Exception:  # an unreadable header still routes on what the store knows
                header = {}
            instances.append(
                rules.InstanceFacts(
                    sop_instance_uid=inst.sop_instance_uid,
                    header=header,
                    modality=inst.series.modality,
                    label=pred.label if pred else None,
                    score=pred.score if pred else None,
                    regions=tuple((d.label, d.score) for d in inst.detections),
                )
            )
        # A resolved flag (orders.reviews) no longer counts: it holds nothing.
        flags = reviews.open_kinds(s, study.id)
        return rules.StudyFacts(
            study_uid=study.study_uid,
            instances=tuple(instances),
            calling_aes=frozenset(i.calling_ae for i in rows if i.calling_ae),
            called_aes=frozenset(i.called_ae for i in rows if i.called_ae),
            mismatches=frozenset(flags),
            now=now,
        )

    def ready_studies(self, s: Session) -> list[Study]:
        """Undecided studies whose instances have all been looked at; completeness is checked by the caller.

        Without rules there is nothing to decide; studies are still checked
        against their orders, once.
        """
        busy = select(Instance.id).join(Series).where(Series.study_id == Study.id, Instance.state.not_in(LOOKED_AT))
        decided = select(RoutingDecision.id).where(RoutingDecision.study_id == Study.id)
        query = select(Study).where(~exists(busy), ~exists(decided))
        if self.loaded is None:
            query = query.where(Study.checked_at.is_(None))
        return list(s.execute(query.order_by(Study.last_received_at)).scalars())

    def tick(self, now: dt.datetime | None = None) -> dict[str, int]:
        self.reload()
        self.order_check.reload()
        counts = {"checked": 0, "decided": 0, "late": 0, "failed": 0}
        now = now or utcnow()
        with self.store.read() as s:
            ready = self.ready_studies(s)
        self.order_check.prepare(ready)
        due = []
        with self.store.read() as s:
            for study in ready:
                calling = {
                    i
                    for i in s.execute(
                        select(Instance.calling_ae).join(Series).where(Series.study_id == study.id)
                    ).scalars()
                    if i
                }
                waited = (now - _utc(study.last_received_at)).total_seconds()
                quiet = self.quiet_s(calling)
                if self.order_check.worklist_pending(s, study):
                    # Its order may yet come from the worklist stage: checked now, the study would be checked
                    # against the wrong orders (or none) and perhaps sent early as complete.
                    if waited < quiet + WORKLIST_WAIT_S:
                        continue
                    log.warning("worklist_not_asked", study_uid=study.study_uid, waited_s=round(waited))
                    due.append(study)
                # Every ordered view is here: no reason to wait out the quiet period.
                elif waited >= quiet or self.order_check.complete(s, study):
                    due.append(study)
        for study in due:
            try:
                self.order_check.run(study)
                counts["checked"] += 1
                if self.loaded is not None:
                    with self.store.read() as s:
                        facts = self.facts(s, study, now)
                    self.decide(study, facts)
                    counts["decided"] += 1
            except Exception as exc:  # one study that cannot be routed must not hold up the others
                counts["failed"] += 1
                # The type only: messages from DICOM libraries quote the values (names, birth dates).
                log.error("study_route_failed", study_uid=study.study_uid, error=type(exc).__name__)
                log.debug("study_route_failed_detail", study_uid=study.study_uid, error=str(exc)[:500])
        if self.loaded is not None:
            try:
                counts["late"] = self.follow_decisions()
            except Exception as exc:  # late images wait for the next tick; deciding and forwarding go on
                log.error("follow_decisions_failed", error=type(exc).__name__)
            try:
                counts["released"] = self.redecide_reviewed(now)
            except Exception as exc:  # the held deliveries wait for the next tick
                log.error("redecide_failed", error=type(exc).__name__)
        return counts

    def redecide_reviewed(self, now: dt.datetime) -> int:
        """Decide again the held studies whose flags someone resolved since; release them if nothing else holds.

        Returns the deliveries released. A study still held (another flag, a
        rule that holds everything) keeps its rows held, and its decision the
        new time, so it is not decided again until the next review.
        """
        with self.store.read() as s:
            studies = list(
                s.execute(
                    select(Study)
                    .join(RoutingDecision, RoutingDecision.study_id == Study.id)
                    .where(
                        RoutingDecision.hold.is_(True),
                        exists(
                            select(FlagReview.id).where(
                                FlagReview.study_id == Study.id,
                                FlagReview.state == "resolved",
                                FlagReview.at > RoutingDecision.decided_at,
                            )
                        ),
                    )
                ).scalars()
            )
        released = 0
        for study in studies:
            try:
                released += self._redecide(study, now)
            except Exception as exc:  # this study waits for the next tick; the others go on
                log.error("redecide_failed", study_uid=study.study_uid, error=type(exc).__name__)
        return released

    def decide(self, study: Study, facts: rules.StudyFacts) -> rules.Decision:
        loaded = self.loaded
        assert loaded is not None  # studies are decided only with rules loaded
        study_id = study.id
        decision = rules.decide(loaded.ruleset, facts)
        deliveries = [] if decision.discard else _delivery_dicts(decision)
        if any(d["report"] for d in deliveries):
            # Made before the decision is recorded, with UIDs and time from the
            # study: a second router, or this one after a crash, makes the same
            # bytes, which the store keeps once.
            try:
                self.make_report(study)
            except Exception as exc:  # the images still go; the SR is what is missing, and the log says so
                log.error("report_failed", study_uid=study.study_uid, error=type(exc).__name__)
        with self.store.write() as s:
            if s.execute(select(RoutingDecision.id).where(RoutingDecision.study_id == study_id)).first():
                return decision  # another router got there first
            s.add(
                RoutingDecision(
                    study_id=study_id,
                    rules_digest=loaded.digest,
                    outcomes=[{"rule": o.rule, "matched": o.matched, "why": o.why} for o in decision.outcomes],
                    deliveries=deliveries,
                    hold=decision.hold,
                    discard=decision.discard,
                )
            )
            s.flush()
            n = self._queue(s, study_id, deliveries, decision.hold)
        log.info(
            "study_routed",
            study_uid=facts.study_uid,
            instances=len(facts.instances),
            deliveries=n,
            destinations=sorted({d["destination"] for d in deliveries}),
            hold=decision.hold,
            discard=decision.discard,
            matched=[o.rule for o in decision.outcomes if o.matched],
        )
        return decision

    def make_report(self, study: Study) -> str | None:
        """The study's Comprehensive SR, kept in the spool and the store like a received instance."""
        from pydicom.uid import generate_uid

        from nnrouter.core import ingest
        from nnrouter.core.spool import Spool
        from nnrouter.results import report

        with self.store.read() as s:
            findings = study_findings(s, study.id)
        if findings is None:
            return None
        when = _utc(study.last_received_at)
        sr = report.build_sr(
            findings,
            series_uid=generate_uid(entropy_srcs=[study.study_uid, "nnrouter SR series"]),
            instance_uid=generate_uid(
                entropy_srcs=[study.study_uid, "nnrouter SR", self.loaded.digest if self.loaded else ""]
            ),
            now=when,
        )
        kept = ingest.keep(
            self.store,
            Spool(self.settings.storage.path),
            sr,
            self.settings.dicom.ae_title,
            node=self.settings.node.name,
        )
        log.info(
            "report_made",
            study_uid=str(sr.StudyInstanceUID),
            sop_instance_uid=str(sr.SOPInstanceUID),
            images=len(findings.images),
            flags=len(findings.flags),
            duplicate=kept.duplicate,
        )
        return str(sr.SOPInstanceUID)

    def _queue(self, s: Session, study_id: int, deliveries: list[dict[str, Any]], hold: bool) -> int:
        """Outbox rows for the study's current, looked-at instances that do not have one yet.

        nnrouter's own SR goes only where a delivery asked for the report,
        and as it was made (no coercion).
        """
        n = 0
        queued = set(
            s.execute(
                select(Outbox.instance_id, Outbox.destination)
                .join(Instance)
                .join(Series)
                .where(Series.study_id == study_id)
            ).tuples()
        )
        for inst in current_instances(s, study_id, created=True):
            if inst.state not in LOOKED_AT:
                continue
            own = inst.state == InstanceState.CREATED
            for d in deliveries:
                if (own and not d.get("report")) or (inst.id, d["destination"]) in queued:
                    continue
                queued.add((inst.id, d["destination"]))
                s.add(
                    Outbox(
                        instance_id=inst.id,
                        destination=d["destination"],
                        rule=d["rule"],
                        coerce=None if own else d["coerce"],
                        state=OutboxState.HELD if hold else OutboxState.PENDING,
                    )
                )
                n += 1
        return n

    def _redecide(self, study: Study, now: dt.datetime) -> int:
        """One reviewed study decided again: the new decision replaces the old, its deliveries are queued, and
        the held rows go where it says (released), or away (a destination it no longer names, a discard)."""
        loaded = self.loaded
        assert loaded is not None
        with self.store.read() as s:
            facts = self.facts(s, study, now)
        decision = rules.decide(loaded.ruleset, facts)
        deliveries = [] if decision.discard else _delivery_dicts(decision)
        with self.store.write() as s:
            row = s.execute(select(RoutingDecision).where(RoutingDecision.study_id == study.id)).scalar_one()
            row.decided_at = utcnow()
            row.rules_digest = loaded.digest
            row.outcomes = [{"rule": o.rule, "matched": o.matched, "why": o.why} for o in decision.outcomes]
            row.deliveries, row.hold, row.discard = deliveries, decision.hold, decision.discard
            if decision.hold:  # still held (another open flag, a rule that holds everything): until the next review
                s.flush()
                self._queue(s, study.id, deliveries, True)
                return 0
            wanted = {d["destination"] for d in deliveries}
            held = s.execute(
                select(Outbox)
                .join(Instance)
                .join(Series)
                .where(Series.study_id == study.id, Outbox.state == OutboxState.HELD)
            ).scalars()
            n = dropped = 0
            for o in held:
                if o.destination in wanted:
                    o.state, o.next_attempt_at = OutboxState.PENDING, utcnow()
                    n += 1
                else:
                    s.delete(o)
                    dropped += 1
            s.flush()
            queued = self._queue(s, study.id, deliveries, False)
        log.info(
            "study_released",
            study_uid=study.study_uid,
            released=n,
            queued=queued,
            dropped=dropped,
            discard=decision.discard,
            reason="flags resolved",
        )
        return n + queued

    def follow_decisions(self) -> int:
        """Instances that arrived after their study was decided follow the decision; the flags are redone."""
        newer = aliased(Instance)
        with self.store.read() as s:
            # DISTINCT over the study id only: PostgreSQL has no equality for json columns.
            late_ids = (
                select(RoutingDecision.study_id)
                .join(Series, Series.study_id == RoutingDecision.study_id)
                .join(Instance, Instance.series_id == Series.id)
                .where(
                    Instance.state.in_(LOOKED_AT),
                    Instance.state != InstanceState.CREATED,  # the SR is queued with its decision
                    func.json_array_length(RoutingDecision.deliveries) > 0,  # SQLite and PostgreSQL both have it
                    ~exists(select(Outbox.id).where(Outbox.instance_id == Instance.id)),
                    # A version replaced by a newer one is not sent.
                    ~exists(
                        select(newer.id).where(
                            newer.sop_instance_uid == Instance.sop_instance_uid, newer.version > Instance.version
                        )
                    ),
                )
                .distinct()
            )
            late = s.execute(
                select(RoutingDecision.study_id, RoutingDecision.deliveries, RoutingDecision.hold).where(
                    RoutingDecision.study_id.in_(late_ids)
                )
            ).all()
        n = 0
        for study_id, deliveries, hold in late:
            with self.store.write() as s:
                queued = self._queue(s, study_id, deliveries, hold)
            n += queued
            if queued:
                try:
                    with self.store.read() as s:
                        study = s.get_one(Study, study_id)
                    self.order_check.prepare([study], prune=False)  # the late image's order too
                    self.order_check.run(study)
                except Exception as exc:  # the deliveries are queued; stale flags are no reason to stop
                    log.error("study_recheck_failed", study_id=study_id, error=type(exc).__name__)
        return n


def _delivery_dicts(decision: rules.Decision) -> list[dict[str, Any]]:
    """A decision's deliveries as the routing_decision row keeps them."""
    return [
        {
            "destination": d.destination,
            "rule": d.rule,
            "coerce": d.coerce.model_dump() if d.coerce else None,
            "report": d.report,
        }
        for d in decision.deliveries
    ]


def study_findings(s: Session, study_id: int) -> report.StudyFindings | None:
    """What nnrouter found in a study, as the SR builder takes it; None for a study with no images."""
    from nnrouter.core.codes import classes
    from nnrouter.results import report

    known = classes()
    kept: list[Dataset] = []
    images = []
    rows = current_instances(s, study_id)
    predictions = latest_predictions(s, (i.id for i in rows))
    for inst in rows:
        try:
            kept.append(headers.of(inst))
        except Exception:
            continue  # an unreadable header cannot be referenced by the SR
        pred = predictions.get(inst.id)
        if pred is None:
            continue
        images.append(
            report.ImageFinding(
                sop_instance_uid=inst.sop_instance_uid,
                label=pred.label if pred.label in known else report.UNKNOWN,
                score=min(max(pred.score, 0.0), 1.0),
                # A box squeezed to a line at the image edge has no area to report.
                regions=tuple(
                    report.Region(d.label, min(max(d.score, 0.0), 1.0), tuple(d.box_px))
                    for d in inst.detections
                    if d.box_px[2] > d.box_px[0] and d.box_px[3] > d.box_px[1]
                ),
            )
        )
    if not kept:
        return None
    flags = s.execute(select(Flag).where(Flag.study_id == study_id).order_by(Flag.id)).scalars().all()
    model = s.execute(
        select(Prediction.model_name, Prediction.model_version)
        .join(Instance)
        .join(Series)
        .where(Series.study_id == study_id)
        .limit(1)
    ).first()
    uids = {h.SOPInstanceUID for h in kept}
    return report.StudyFindings(
        instances=tuple(kept),
        images=tuple(images),
        flags=tuple(
            report.MismatchFlag(
                f.kind, f.severity, f.reason, f.sop_instance_uid if f.sop_instance_uid in uids else None
            )
            for f in flags
        ),
        algorithm_name=model[0] if model else "nnrouter",
        algorithm_version=model[1] if model else "none",
    )


def run_router(settings: Settings, stop: Any = None, parent_pid: int | None = None) -> None:
    """The router process: decide complete studies and queue their deliveries, every tick_s (APScheduler).

    Started by ``serve`` (``parent_pid`` set), it stops on SIGTERM and when
    that parent is gone. A database outage is logged once and waited out:
    ticks are skipped with backoff until the database answers again. It
    sends nothing: the forwarder (``nnrouter.routing.forward.run_forwarder``)
    delivers the outbox rows it writes.
    """
    from nnrouter.service import lifecycle

    opened = lifecycle.open_stage(settings, "router", stop, parent_pid)
    if opened is None:
        return
    stop, store = opened
    try:
        router = Router(settings, store)
        ticker = lifecycle.Ticker("router", [("route", router.tick)])
        log.info("router_started", rules=str(settings.routing.rules))
        lifecycle.tick_until_stopped(ticker, settings.routing.tick_s, stop)
    finally:
        store.dispose()


def spawn_router(settings: Settings, name: str = "nnrouter-router") -> BaseProcess:
    """The router as a child process of ``serve``: it stops on SIGTERM and dies with its parent."""
    from nnrouter.service import lifecycle

    return lifecycle.spawn_stage("nnrouter.routing.router:run_router", name, settings=settings)
