"""Classify: worker processes that look at what the receiver kept.

A worker claims received instances from the store with a lease, decodes their
pixels, runs the view classifier and the region detector in batches, and
writes what it saw. It is a separate process from the receiver because
decoding and inference are CPU-bound and Python has one GIL per process: the
receive path must never wait for a model. A worker that dies mid-batch loses
nothing; its claims run out and another worker takes them.

One bad instance must not take its batch-mates down with it. Decoding guards
each instance (a codec's panic ends that instance ``undecodable``); what
still kills the process (a segfault in native code, the OOM killer, kill -9)
leaves a batch in which nobody knows who was in hand. So a claim that comes
back unfinished is retried alone, and only tries made alone count against
the instance: ``attempts`` is that count, and after ``workers.max_attempts``
of them the instance is ``failed``. An innocent batch-mate loses one
uncounted try and succeeds alone; the culprit crashes alone until it gives
up. Why not a decode subprocess per worker: it would double the processes and
copy every image between them for a crash that the retry alone already
confines to the one instance that causes it.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import time
import uuid
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
from pydicom import dcmread
from sqlalchemy import ColumnElement, and_, delete, select, update
from sqlalchemy.orm import Session

from nnrouter.core import logs
from nnrouter.core.config import Settings
from nnrouter.core.store import (
    Detection,
    Instance,
    InstanceState,
    Prediction,
    Store,
    claimant_prefix,
    held_here,
    new_claimant,
    unavailable,
    utcnow,
)
from nnrouter.pixels.decode import Decoded, DecodeError, decode_file
from nnrouter.service import lifecycle

if TYPE_CHECKING:
    from nnrouter.pixels import detect
    from nnrouter.pixels.runtime import Classification, Model, Timings

log = logs.get("nnrouter.pixels.classify")

CAM_SIDE = 256


@dataclass(frozen=True)
class Claim:
    id: int
    path: str
    sop_instance_uid: str
    attempts: int
    retry: bool = False
    """Claimed after an unfinished try: it is processed alone, and the try counts."""


@dataclass
class Looked:
    """One decoded instance on its way through the models."""

    claim: Claim
    decoded: Decoded
    decode_ms: float
    geometry: dict[str, Any]


class Queue:
    """Received instances as a work queue, claimed with a lease.

    On PostgreSQL, concurrent workers skip each other's rows (SKIP LOCKED); on
    SQLite the claim is one UPDATE ... RETURNING, which SQLite runs under its
    single writer lock, so two workers never get the same row either.

    Two kinds of claim: fresh instances (state ``received``) in batches, not
    counted; and retries (``classifying`` with a lease run out: the worker
    died, stalled or gave them back) one at a time, each counted in
    ``attempts``. A retry due with ``max_attempts`` used up ends ``failed``
    without another try.

    ``node`` (``node.name``; None when ``storage.shared``) limits both kinds
    to the instances whose file this node's spool holds.
    """

    def __init__(self, store: Store, worker_id: str, lease_s: float, max_attempts: int, node: str | None = None):
        self.store = store
        self.worker_id = worker_id
        self.lease = dt.timedelta(seconds=lease_s)
        self.max_attempts = max_attempts
        self.node = node

    def claim(self, n: int, *, fresh_only: bool = False) -> list[Claim]:
        """One retry alone if any is due (unless ``fresh_only``), else up to ``n`` fresh instances."""
        if not fresh_only:
            self._give_up()
            retry = self._take(
                and_(Instance.state == InstanceState.CLASSIFYING, Instance.lease_until < utcnow()), 1, count=True
            )
            if retry:
                return retry
        return self._take(Instance.state == InstanceState.RECEIVED, n, count=False)

    def _take(self, where: ColumnElement[bool], n: int, *, count: bool) -> list[Claim]:
        now = utcnow()
        eligible = select(Instance.id).where(where, held_here(self.node)).order_by(Instance.id).limit(n)
        if not self.store.is_sqlite:
            eligible = eligible.with_for_update(skip_locked=True)
        values: dict[str, Any] = {
            "state": InstanceState.CLASSIFYING,
            "claimed_by": self.worker_id,
            "lease_until": now + self.lease,
            "updated_at": now,
        }
        if count:
            values["attempts"] = Instance.attempts + 1
        stmt = (
            update(Instance)
            .where(Instance.id.in_(eligible.scalar_subquery()))
            .values(**values)
            .returning(Instance.id, Instance.path, Instance.sop_instance_uid, Instance.attempts)
        )
        with self.store.write() as s:
            rows = s.execute(stmt).all()
        return sorted(
            (Claim(r.id, r.path, r.sop_instance_uid, r.attempts, retry=count) for r in rows), key=lambda c: c.id
        )

    def _give_up(self) -> None:
        """Retries due on instances that used up their tries alone: failed, with the last reason."""
        worn = select(Instance.id, Instance.sop_instance_uid, Instance.attempts, Instance.state_reason).where(
            Instance.state == InstanceState.CLASSIFYING,
            Instance.lease_until < utcnow(),
            Instance.attempts >= self.max_attempts,
        )
        if not self.store.is_sqlite:
            worn = worn.with_for_update(skip_locked=True)
        with self.store.write() as s:
            for r in s.execute(worn).all():
                why = f"gave up after {r.attempts} attempts with this instance alone in hand"
                why += f" (last: {r.state_reason})" if r.state_reason else " (the worker stopped: a crash or a kill)"
                s.execute(
                    update(Instance)
                    .where(Instance.id == r.id, Instance.state == InstanceState.CLASSIFYING)
                    .values(
                        state=InstanceState.FAILED,
                        state_reason=why[:500],
                        claimed_by=None,
                        lease_until=None,
                        updated_at=utcnow(),
                    )
                )
                log.error("instance_failed", sop_instance_uid=r.sop_instance_uid, attempts=r.attempts)

    def count_alone(self, claim: Claim) -> Claim:
        """A fresh instance that is alone in its batch: this try counts, as a retry's does."""
        with self.store.write() as s:
            s.execute(update(Instance).where(self._ours(claim)).values(attempts=Instance.attempts + 1))
        return Claim(claim.id, claim.path, claim.sop_instance_uid, claim.attempts + 1, retry=claim.retry)

    def _ours(self, claim: Claim) -> ColumnElement[bool]:
        return and_(Instance.id == claim.id, Instance.claimed_by == self.worker_id)

    def finish(self, claim: Claim, state: str, reason: str | None = None, session: Session | None = None) -> bool:
        """Set the outcome, if the claim is still ours (a lease can run out)."""
        stmt = (
            update(Instance)
            .where(self._ours(claim))
            .values(state=state, state_reason=reason, claimed_by=None, lease_until=None, updated_at=utcnow())
        )
        if session is not None:
            return session.execute(stmt).rowcount == 1  # type: ignore[attr-defined]  # an UPDATE's result is a CursorResult
        with self.store.write() as s:
            return s.execute(stmt).rowcount == 1  # type: ignore[attr-defined]  # an UPDATE's result is a CursorResult

    def release(self, claims: list[Claim], reason: str) -> None:
        """Give claims back as retries (each then tried alone, and counted): their try failed."""
        with self.store.write() as s:
            for c in claims:
                s.execute(
                    update(Instance)
                    .where(self._ours(c))
                    .values(state_reason=reason, claimed_by=None, lease_until=utcnow() - dt.timedelta(seconds=1))
                )

    def return_held(self) -> int:
        """Give back, as fresh and uncounted, what this worker holds: the database failed, not they."""
        with self.store.write() as s:
            return s.execute(
                update(Instance)
                .where(Instance.claimed_by == self.worker_id, Instance.state == InstanceState.CLASSIFYING)
                .values(state=InstanceState.RECEIVED, claimed_by=None, lease_until=None)
            ).rowcount  # type: ignore[attr-defined]  # an UPDATE's result is a CursorResult


def expire_claims(store: Store, node: str, pid: int, reason: str) -> int:
    """The claims of a worker process that died, due for retry now rather than after their lease.

    The supervisor calls it when it sees a worker die; each of those
    instances is then retried alone, so a crash's culprit is found at once.
    """
    with store.write() as s:
        return s.execute(
            update(Instance)
            .where(
                Instance.state == InstanceState.CLASSIFYING,
                Instance.claimed_by.startswith(claimant_prefix(node, pid), autoescape=True),
            )
            .values(state_reason=reason, claimed_by=None, lease_until=utcnow() - dt.timedelta(seconds=1))
        ).rowcount  # type: ignore[attr-defined]  # an UPDATE's result is a CursorResult


def _geometry(path: str) -> dict[str, Any]:
    """Header attributes that turn pixel boxes into millimetres and patient coordinates."""
    ds = dcmread(path, stop_before_pixels=True, force=True)
    geo: dict[str, Any] = {}
    try:
        if "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds and "PixelSpacing" in ds:
            geo["ipp"] = [float(v) for v in ds.ImagePositionPatient]
            geo["iop"] = [float(v) for v in ds.ImageOrientationPatient]
            geo["spacing"] = [float(v) for v in ds.PixelSpacing]
    except (TypeError, ValueError):
        geo.clear()
    return geo


def patient_corners(box: list[float], geo: dict[str, Any]) -> list[list[float]] | None:
    """Box corners in patient coordinates (PS3.3 C.7.6.2.1.1), or None without geometry."""
    if "ipp" not in geo:
        return None
    ipp = np.array(geo["ipp"])
    row_dir, col_dir = np.array(geo["iop"][:3]), np.array(geo["iop"][3:])
    dr, dc = geo["spacing"]  # between rows, between columns
    x1, y1, x2, y2 = box
    return [
        [round(float(v), 3) for v in ipp + row_dir * dc * x + col_dir * dr * y]
        for x, y in ((x1, y1), (x2, y1), (x2, y2), (x1, y2))
    ]


def cam_overlay(image: np.ndarray, cam: np.ndarray, side: int = CAM_SIDE) -> np.ndarray:
    """A heatmap over a gray image (BGR, longest side ``side``), for a person to see what the model looked at."""
    h, w = image.shape
    scale = side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    gray = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    heat = cv2.resize((np.clip(cam, 0, 1) * 255).astype(np.uint8), size, interpolation=cv2.INTER_LINEAR)
    return cv2.addWeighted(
        cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR), 0.6, cv2.applyColorMap(heat, cv2.COLORMAP_JET), 0.4, 0
    )


def _write_cam(folder: Path, instance_id: int, image: np.ndarray, cam: np.ndarray) -> Path:
    """A small heatmap over the image, for a person to see what the model looked at."""
    overlay = cam_overlay(image, cam, CAM_SIDE)
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / f"{instance_id}.png"
    tmp = folder / f".{instance_id}.{uuid.uuid4().hex}.png"
    if not cv2.imwrite(str(tmp), overlay):
        raise OSError(f"cannot write {tmp}")
    os.replace(tmp, dest)
    return dest


class Worker:
    """Decode, infer, record; one batch at a time."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        classifier: Model | None = None,
        detector: Model | None = None,
        worker_id: str | None = None,
    ):
        self.settings = settings
        self.store = store
        self.classifier = classifier
        self.detector = detector
        self.worker_id = worker_id or new_claimant(settings.node.name)
        w = settings.workers
        self.queue = Queue(store, self.worker_id, w.lease_s, w.max_attempts, settings.files_of)
        from nnrouter.pixels.watch import CardWatch

        # A model promoted into models.classifier (nnrouter models promote) is picked up between batches.
        sha256 = getattr(classifier, "sha256", None)
        self._watch = CardWatch.start(settings.models.classifier, sha256) if sha256 else None

    def pick_up_promoted(self) -> bool:
        """Load the configured classifier again when its card names other weights; True when it did."""
        if self._watch is None or not self._watch.changed():
            return False
        from nnrouter.pixels.runtime import Model

        m = self.settings.models
        try:
            model = Model.load(self._watch.model_dir, providers=m.providers, intra_op_threads=m.intra_op_threads)
        except Exception:  # a card read across a swap, a bad file (onnxruntime's own types): keep the running model
            self._watch.failed()
            log.exception("model_reload_failed", path=str(self._watch.model_dir))
            return False
        assert self.classifier is not None  # the watch follows the loaded classifier
        old = self.classifier.card
        self.classifier = model
        self._watch.loaded(model.sha256)
        log.info(
            "model_reloaded",
            worker=self.worker_id,
            was=f"{old.name} {old.version}",
            now=f"{model.card.name} {model.card.version}",
            sha256=model.sha256,
        )
        return True

    def next_batch(self, stop: Any = None) -> list[Claim]:
        """A retry alone, or up to batch_size fresh ones, waiting up to max_wait_ms to fill a started batch."""
        w = self.settings.workers
        batch = self.queue.claim(w.batch_size)
        if len(batch) == 1 and batch[0].retry:
            return batch
        deadline = time.monotonic() + w.max_wait_ms / 1000
        while batch and len(batch) < w.batch_size and time.monotonic() < deadline:
            if stop is not None and stop.is_set():
                break
            time.sleep(min(0.02, w.max_wait_ms / 1000))
            batch += self.queue.claim(w.batch_size - len(batch), fresh_only=True)
        if len(batch) == 1:
            batch = [self.queue.count_alone(batch[0])]
        return batch

    def process(self, batch: list[Claim]) -> dict[str, int]:
        counts = {"classified": 0, "decoded": 0, "undecodable": 0, "released": 0}
        looked: list[Looked] = []
        for claim in batch:
            t0 = time.perf_counter()
            try:
                decoded = decode_file(claim.path, max_side=self.settings.models.decode_max_side)
                geometry = _geometry(claim.path)
            except DecodeError as exc:
                self.queue.finish(claim, InstanceState.UNDECODABLE, exc.reason)
                log.warning("undecodable", sop_instance_uid=claim.sop_instance_uid, reason=exc.reason)
                counts["undecodable"] += 1
                continue
            except OSError as exc:
                self.queue.finish(claim, InstanceState.UNDECODABLE, f"cannot read spool file: {exc.strerror or exc}")
                log.error("spool_file_unreadable", sop_instance_uid=claim.sop_instance_uid, error=str(exc))
                counts["undecodable"] += 1
                continue
            except (KeyboardInterrupt, SystemExit):
                raise
            except (
                BaseException
            ) as exc:  # native code's panic (pyo3 PanicException is no Exception): this instance only
                reason = f"decoder crashed: {type(exc).__name__}: {' '.join(str(exc).split())}"[:500]
                self.queue.finish(claim, InstanceState.UNDECODABLE, reason)
                log.warning("undecodable", sop_instance_uid=claim.sop_instance_uid, reason=reason)
                counts["undecodable"] += 1
                continue
            looked.append(Looked(claim, decoded, (time.perf_counter() - t0) * 1000, geometry))
        if not looked:
            return counts
        images = [item.decoded.image for item in looked]
        try:
            classes = self.classifier.classify(images) if self.classifier else None
            ctime = self.classifier.timings if self.classifier else None
            regions = self.detector.detect(images) if self.detector else None
        except Exception as exc:  # onnxruntime raises its own types
            log.exception("inference_failed", instances=len(looked))
            self.queue.release([item.claim for item in looked], f"inference failed: {type(exc).__name__}: {exc}"[:500])
            counts["released"] += len(looked)
            return counts
        n = len(looked)
        for i, item in enumerate(looked):
            cam_path = None
            cam = classes[i].cam if classes is not None else None
            if cam is not None:
                cam_path = str(
                    _write_cam(self.settings.storage.derived_path / "cam", item.claim.id, item.decoded.image, cam)
                )
            with self.store.write() as s:
                state = (
                    InstanceState.CLASSIFIED if (classes is not None or regions is not None) else InstanceState.DECODED
                )
                if not self.queue.finish(item.claim, state, None, session=s):
                    log.warning("lease_lost", sop_instance_uid=item.claim.sop_instance_uid)
                    continue
                if classes is not None:
                    self._record_prediction(s, item, classes[i], ctime, n, cam_path)
                if regions is not None:
                    self._record_detections(s, item, regions[i])
            counts["classified" if state == InstanceState.CLASSIFIED else "decoded"] += 1
        return counts

    def _record_prediction(
        self, s: Session, item: Looked, c: Classification, timings: Timings | None, n: int, cam_path: str | None
    ) -> None:
        assert self.classifier is not None  # only a classifier's predictions are recorded
        card = self.classifier.card
        # A replay (lease ran out, another worker finished) replaces, never duplicates.
        s.execute(
            delete(Prediction).where(
                Prediction.instance_id == item.claim.id,
                Prediction.model_name == card.name,
                Prediction.model_version == card.version,
            )
        )
        s.add(
            Prediction(
                instance_id=item.claim.id,
                model_name=card.name,
                model_version=card.version,
                provider=self.classifier.provider,
                label=c.label,
                score=float(c.score),
                top5=[[label, round(float(score), 6)] for label, score in c.top],
                ood=None if c.ood is None else round(float(c.ood), 4),
                decode_ms=round(item.decode_ms, 3),
                # Batch time shared out equally: what one image cost.
                preprocess_ms=round(timings.preprocess_ms / n, 3) if timings else 0.0,
                infer_ms=round(timings.infer_ms / n, 3) if timings else 0.0,
                cam_path=cam_path,
            )
        )

    def _record_detections(self, s: Session, item: Looked, found: list[detect.Detection]) -> None:
        assert self.detector is not None  # only a detector's regions are recorded
        card = self.detector.card
        s.execute(delete(Detection).where(Detection.instance_id == item.claim.id, Detection.model_name == card.name))
        d = item.decoded
        h, w = d.image.shape
        sx, sy = d.columns / w, d.rows / h  # back to the original pixel grid
        for det in found:
            x1, y1, x2, y2 = det.box
            box = [round(x1 * sx, 2), round(y1 * sy, 2), round(x2 * sx, 2), round(y2 * sy, 2)]
            mm = None
            if d.pixel_spacing_mm:
                dr, dc = d.pixel_spacing_mm
                mm = [round(box[0] * dc, 2), round(box[1] * dr, 2), round(box[2] * dc, 2), round(box[3] * dr, 2)]
            s.add(
                Detection(
                    instance_id=item.claim.id,
                    model_name=card.name,
                    model_version=card.version,
                    label=det.label,
                    score=float(det.score),
                    box_px=box,
                    box_mm=mm,
                    corners_patient=patient_corners(box, item.geometry),
                )
            )

    def run(self, stop: Any = None, *, until_empty: bool = False) -> dict[str, int]:
        """Work until stopped (or, with until_empty, until the queue is empty).

        A database outage is waited out with backoff, logged once; when the
        database is back, what this worker held is given back uncounted.
        """
        totals: dict[str, int] = {}
        poll = self.settings.workers.poll_ms / 1000
        outage = lifecycle.Outage("worker", worker=self.worker_id)
        while stop is None or not stop.is_set():
            try:
                if outage.down:
                    returned = self.queue.return_held()
                    outage.over(returned=returned)
                self.pick_up_promoted()
                batch = self.next_batch(stop)
                counts = self.process(batch) if batch else None
            except Exception as exc:
                reason = unavailable(exc)
                if reason is None:
                    raise
                _pause(stop, outage.failed(reason))
                continue
            if counts is None:
                if until_empty:
                    break
                _pause(stop, poll)
                continue
            for k, v in counts.items():
                totals[k] = totals.get(k, 0) + v
            log.info("batch", worker=self.worker_id, size=len(batch), **counts)
        return totals


def _pause(stop: Any, seconds: float) -> None:
    if stop is not None:
        stop.wait(seconds)
    else:
        time.sleep(seconds)


def load_models(settings: Settings) -> tuple[Model | None, Model | None]:
    """The configured classifier and detector (either may be None)."""
    from nnrouter.pixels.runtime import Model

    m = settings.models
    kw: dict[str, Any] = {"providers": m.providers, "intra_op_threads": m.intra_op_threads}
    classifier = Model.load(m.classifier, **kw) if m.classifier else None
    detector = Model.load(m.detector, **kw) if m.detector else None
    return classifier, detector


def run_worker(
    settings: Settings, stop: Any = None, until_empty: bool = False, parent_pid: int | None = None
) -> dict[str, int]:
    """A whole worker: its own store connection and models (one process).

    Started by ``serve`` (``parent_pid`` set), it stops on SIGTERM and when
    that parent is gone; it waits for the database rather than dying with it.
    """
    logs.setup(settings.logging.level, settings.logging.format)
    if stop is None and parent_pid is not None:
        stop = lifecycle.child_of(parent_pid)
    store = Store(settings.database.url)
    try:
        if not lifecycle.wait_for_database(store.require_current, stop, "worker"):
            return {}
        classifier, detector = load_models(settings)
        worker = Worker(settings, store, classifier, detector)
        running = classifier or detector
        log.info(
            "worker_started",
            worker=worker.worker_id,
            classifier=classifier.card.name if classifier else None,
            detector=detector.card.name if detector else None,
            provider=running.provider if running else None,
        )
        return worker.run(stop, until_empty=until_empty)
    finally:
        store.dispose()


def spawn_worker(settings: Settings, name: str) -> BaseProcess:
    """One worker process, spawned: it shares no state with the receiver, and dies with it."""
    return lifecycle.spawn_stage("nnrouter.pixels.classify:run_worker", name, settings=settings)


def start_workers(settings: Settings, count: int) -> list[BaseProcess]:
    return [spawn_worker(settings, f"nnrouter-worker-{i}") for i in range(count)]


def exit_reason(exitcode: int | None) -> str:
    """A dead worker's exit status in words, for the retried instances' state_reason."""
    if exitcode is not None and exitcode < 0:
        try:
            return f"the worker was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"the worker was killed by signal {-exitcode}"
    return f"the worker exited with code {exitcode}"
