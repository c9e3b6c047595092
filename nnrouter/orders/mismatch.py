"""Mismatch: the ordered-vs-performed check, run by the router against the store.

The logic is ``orders.check``; this stage finds each study's orders (HL7 or
worklist ones first, else what the images say), knows which classes the
model can recognise, and writes the flags. It makes no network call: the
worklist is asked by a stage of its own (``nnrouter.orders.worklist_poll``),
and this check only reads what that stage kept, and whether it has asked
yet (``worklist_pending``). Completeness ("every ordered view is here") is
answered from the store alone, so a study still in its quiet period costs
no disk reads.
"""

from __future__ import annotations

from collections.abc import Iterable

from pydicom.dataset import Dataset
from sqlalchemy import delete, update
from sqlalchemy.orm import Session

from nnrouter.core import headers, logs, yamlfile
from nnrouter.core.config import Settings
from nnrouter.core.store import (
    Flag,
    Instance,
    RulesLoad,
    Store,
    Study,
    current_instances,
    latest_predictions,
    utcnow,
)
from nnrouter.orders import order as orders
from nnrouter.orders.procedures import ProcedureBook, load_procedures

__all__ = ["OrderCheck", "covered_classes", "seen"]

log = logs.get("nnrouter.orders.mismatch")


def _readable(instance: Instance) -> Dataset | None:
    """An instance's header, or None when it cannot be read (an old row whose file is on another node)."""
    try:
        return headers.of(instance)
    except Exception:
        return None


def covered_classes(settings: Settings) -> set[str]:
    """The classes the configured classifier can predict; an order for another is never called missing."""
    from nnrouter.core.codes import classes
    from nnrouter.pixels.modelcard import load_card

    if settings.models.classifier is None:
        return set()
    try:
        card = load_card(settings.models.classifier)
    except Exception:  # the workers refuse a broken model too: nothing is recognised
        return set()
    return set(card.labels) & set(classes())


def seen(s: Session, study_id: int) -> list[orders.Seen]:
    """The study's images as the check sees them, from the store (newest versions, images only)."""
    from nnrouter.core.codes import classes

    known = classes()
    out = []
    rows = current_instances(s, study_id)
    predictions = latest_predictions(s, (i.id for i in rows))
    for inst in rows:
        if inst.rows is None:  # not an image (a dose report, a presentation state): not a view
            continue
        pred = predictions.get(inst.id)
        out.append(
            orders.Seen(
                sop_instance_uid=inst.sop_instance_uid,
                label=pred.label if pred else None,
                score=pred.score if pred else None,
                confident=bool(pred and pred.label in known),
                body_part_examined=inst.series.body_part_examined,
                view_position=inst.view_position,
                laterality=inst.image_laterality,
            )
        )
    return out


class OrderCheck:
    def __init__(self, settings: Settings, store: Store, *, record: bool = True):
        """``record=False`` for a dry run: loading procedures.yaml leaves no trace in `nnrouter status`."""
        self.settings = settings
        self.store = store
        self._recording = record
        path = settings.orders.procedures
        self._book_file = (
            None
            if path is None
            else yamlfile.Reloaded(
                path, load_procedures, self._record, "procedures", lambda b: {"procedures": len(b.spec.procedures)}, log
            )
        )
        self.covered = covered_classes(settings)
        self._headers_read: dict[str, set[int]] = {}  # study UID -> instance ids whose orders are kept

    @property
    def book(self) -> ProcedureBook | None:
        return self._book_file.value if self._book_file else None

    def reload(self) -> None:
        """procedures.yaml, reloaded on change; an invalid edit keeps the running book."""
        if self._book_file is not None:
            self._book_file.poll()

    def _record(self, ok: bool, digest: str, errors: str | None, text: str | None) -> None:
        """Shown by `nnrouter status`, beside the routing rules."""
        assert self._book_file is not None
        if not self._recording:
            return
        with self.store.write() as s:
            s.add(
                RulesLoad(
                    kind="procedures",
                    path=str(self._book_file.path),
                    digest=digest,
                    ok=ok,
                    errors=errors,
                    node=self.settings.node.name,
                    text=text,
                )
            )

    # --- finding the orders ---

    def prepare(self, studies: list[Study], prune: bool = True) -> None:
        """Before a tick looks at them: read each new instance's order, once, and keep it.

        Runs outside any read session (it reads the instances' headers) and
        keeps what it finds at once, so the answer is there on later ticks.
        The worklist is not asked here (see ``worklist_pending``).
        """
        if prune:  # forget studies that are no longer waiting (decided, or busy again)
            ready = {st.study_uid for st in studies}
            self._headers_read = {k: v for k, v in self._headers_read.items() if k in ready}
        for study in studies:
            try:
                with self.store.read() as s:
                    fresh = {
                        i.id: _readable(i)
                        for i in current_instances(s, study.id)
                        if i.id not in self._headers_read.get(study.study_uid, set())
                    }
                if fresh:  # every image's request: the study is complete only against all of them
                    self.keep_image_orders(fresh.values())
                    self._headers_read.setdefault(study.study_uid, set()).update(fresh)
            except Exception as exc:  # the check runs again when the study is due; routing goes on
                log.error("orders_not_found", study_uid=study.study_uid, error=type(exc).__name__)

    def worklist_pending(self, s: Session, study: Study) -> bool:
        """The worklist stage is yet to ask about this study, and its answer could change the check.

        True only with a worklist configured, for a study with an accession
        number and no HL7 or worklist order kept: the worklist stage asks
        about exactly those, and marks each as asked (also when the RIS is
        down, so that nobody waits for a dead RIS).
        """
        if self.settings.orders.worklist is None or not study.accession_number or study.worklist_asked_at is not None:
            return False
        kept = orders.stored_for(s, study.accession_number, study.study_uid)
        return not any(o.source != orders.OrderSource.IMAGE for o in kept)

    def keep_image_orders(self, datasets: Iterable[Dataset | None]) -> None:
        """The orders written into these instances' headers, kept (an update when already known)."""
        found: dict[str, orders.Order] = {}
        for ds in datasets:
            if ds is None:  # an unreadable header has no order to give
                continue
            for o in orders.from_header(ds):
                found.setdefault(orders.key(o), o)
        if found:
            with self.store.write() as s:
                for o in found.values():
                    orders.save(s, o)

    def orders_of(self, s: Session, study: Study) -> list[orders.Order]:
        """HL7 or worklist orders when there are any; else what the images say."""
        kept = orders.stored_for(s, study.accession_number, study.study_uid)
        external = [o for o in kept if o.source != orders.OrderSource.IMAGE]
        return external or kept

    # --- the check ---

    def complete(self, s: Session, study: Study) -> bool:
        """Every view the study's orders expect has arrived and been recognised."""
        return self.book is not None and orders.complete(self.orders_of(s, study), seen(s, study.id), self.book)

    def findings(self, s: Session, study: Study) -> tuple[list[orders.Order], list[orders.Finding]]:
        """The orders the study is checked against, and what the check finds (nothing is written)."""
        found = self.orders_of(s, study)
        return found, orders.check(found if self.book else [], seen(s, study.id), self.book, self.covered)

    def run(self, study: Study) -> list[orders.Finding]:
        """Check one due study (its orders gathered by `prepare`) and replace its flags."""
        with self.store.read() as s:
            found, findings = self.findings(s, study)
        with self.store.write() as s:
            s.execute(delete(Flag).where(Flag.study_id == study.id))
            for f in findings:
                s.add(
                    Flag(
                        study_id=study.id,
                        kind=f.kind,
                        severity=f.severity,
                        reason=f.reason,
                        sop_instance_uid=f.sop_instance_uid,
                        evidence=f.evidence,
                    )
                )
            s.execute(update(Study).where(Study.id == study.id).values(checked_at=utcnow()))
        log.info(
            "study_checked", study_uid=study.study_uid, orders=len(found), flags=sorted({f.kind for f in findings})
        )
        return findings
