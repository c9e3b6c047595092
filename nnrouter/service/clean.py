"""Clean: delete what has been delivered and kept long enough, and nothing else.

nnrouter is a router, not an archive: once every delivery of a study is
``sent`` and ``retention.keep_days`` have passed (since the last delivery and
the last image), the study's files (spool and class activation overlays) and
its rows (study, series, instances, predictions, detections, flags, routing
decision, deliveries, the orders its own images carried) are deleted. The
study then no longer answers C-FIND and is no longer anyone's prior: what is
queryable is what nnrouter still holds.

Never deleted: a study with a delivery pending, sending, failed, dead or held;
one that rules are configured for but that is not routed yet; one with an
image not yet classified, or not yet queued for its study's deliveries. A
study forwarded nowhere (no rules, no rule matched, or ``discard``) is the only
copy: it is kept until ``retention.not_forwarded_keep_days`` after its last
image, and forever when that is null (the default).

When the spool has less than ``retention.clean_below_free_mb`` free, delivered
studies go before their keep_days, oldest first, until there is enough again;
undelivered ones never do.

Order of a deletion, so that a crash leaves nothing that points to nothing:
the rows are deleted and committed first, then the files. A crash in between
leaves files without rows, which the sweep removes; the sweep also removes
spool files left without a row by a crash between a receive's write and its
commit, overlays without a prediction and empty folders, once they are older
than ``retention.orphan_grace_s`` (a receive in progress has a fresh file).

The stage has its own loop (``run_cleaner``), started by ``nnrouter serve`` as
its own process, or alone as ``nnrouter clean --loop``; ``nnrouter clean``
makes one pass, ``--dry-run`` shows what would go and why.
"""

from __future__ import annotations

import datetime as dt
import os
import stat
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from nnrouter.core import logs
from nnrouter.core.config import Settings
from nnrouter.core.store import (
    Detection,
    Flag,
    FlagReview,
    Instance,
    InstanceState,
    OrderRequest,
    Outbox,
    OutboxState,
    Prediction,
    RoutingDecision,
    Series,
    Store,
    Study,
    utcnow,
)
from nnrouter.service import lifecycle, pressure

log = logs.get("nnrouter.service.clean")

DAY_S = 86400.0
# The classify stage is done with an instance in these states (as the router counts them).
LOOKED_AT = frozenset(
    (
        InstanceState.CLASSIFIED,
        InstanceState.DECODED,
        InstanceState.UNDECODABLE,
        InstanceState.FAILED,
        InstanceState.CREATED,
    )
)
_PAGE = 200  # studies judged per query batch
# nnrouter.orders.order.OrderSource.IMAGE, spelled out: importing orders would pull in the hanging-protocol tables.
ORDER_FROM_IMAGES = "image"
_CHUNK = 500  # paths per IN (...) lookup


def _utc(ts: dt.datetime | None) -> dt.datetime | None:
    """SQLite hands back naive datetimes; they were written in UTC."""
    if ts is None:
        return None
    return ts if ts.tzinfo else ts.replace(tzinfo=dt.UTC)


def clean_below_free_mb(settings: Settings) -> int:
    value = settings.retention.clean_below_free_mb
    return settings.storage.min_free_mb + 1024 if value is None else value


# --- the policy: pure decisions on what the store says about one study ---------


@dataclass(frozen=True)
class Policy:
    keep_s: float
    keep_s_by_destination: dict[str, float]
    keep_s_by_calling_ae: dict[str, float]
    not_forwarded_keep_s: float | None
    routing: bool  # routing rules are configured: an undecided study is waiting for them

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        r = settings.retention
        return cls(
            keep_s=r.keep_days * DAY_S,
            keep_s_by_destination={k: v * DAY_S for k, v in r.keep_days_by_destination.items()},
            keep_s_by_calling_ae={k: v * DAY_S for k, v in r.keep_days_by_calling_ae.items()},
            not_forwarded_keep_s=None if r.not_forwarded_keep_days is None else r.not_forwarded_keep_days * DAY_S,
            routing=settings.routing.rules is not None,
        )

    def keep_for(self, destinations: Iterable[str], calling_aes: Iterable[str]) -> float:
        """Seconds to keep a delivered study: the longest override that applies, else keep_days."""
        found = [self.keep_s_by_destination[d] for d in destinations if d in self.keep_s_by_destination]
        found += [self.keep_s_by_calling_ae[a] for a in calling_aes if a in self.keep_s_by_calling_ae]
        return max(found) if found else self.keep_s


@dataclass(frozen=True)
class StudyView:
    """What the policy looks at for one study."""

    study_id: int
    study_uid: str
    last_received_at: dt.datetime
    instance_states: tuple[str, ...]  # every version of every instance
    calling_aes: frozenset[str]
    decided: bool = False
    hold: bool = False
    discard: bool = False
    destinations: frozenset[str] = frozenset()  # the decision's deliveries
    outbox: tuple[tuple[str, str, dt.datetime | None], ...] = ()  # (destination, state, sent_at)
    unqueued: int = 0  # current, looked-at images without a delivery to one of the decision's destinations


@dataclass(frozen=True)
class Verdict:
    go: bool  # may be deleted now
    code: str  # a short name for the reason, for counting
    reason: str
    keep_until: dt.datetime | None = None  # when age alone lets it go (None: never by age)
    early: bool = False  # delivered: may go before keep_until when the spool is short of space


def _stay(code: str, reason: str) -> Verdict:
    return Verdict(False, code, reason)


def judge(view: StudyView, policy: Policy, now: dt.datetime) -> Verdict:
    """Whether a study may be deleted now, and why (or why not)."""
    busy = sum(1 for st in view.instance_states if st not in LOOKED_AT)
    if busy:
        return _stay("not_classified", f"{busy} image(s) not yet classified")
    states = Counter(state for _, state, _ in view.outbox)
    if view.hold or states[OutboxState.HELD]:
        return _stay("held", "held for a person by a rule")
    for state in (OutboxState.PENDING, OutboxState.SENDING, OutboxState.FAILED, OutboxState.DEAD):
        if states[state]:
            dests = sorted({d for d, st, _ in view.outbox if st == state})
            return _stay(state, f"{states[state]} deliveries {state} ({', '.join(dests)})")
    if policy.routing and not view.decided:
        return _stay("not_routed", "not yet routed")
    last_received = _utc(view.last_received_at)
    assert last_received is not None
    if view.decided and view.destinations and not view.discard:
        if view.unqueued:
            return _stay("not_queued", f"{view.unqueued} image(s) not yet queued for delivery")
        sent = [_utc(at) for _, _, at in view.outbox if at is not None]
        last = max([last_received, *[s for s in sent if s is not None]])
        keep = policy.keep_for(view.destinations, view.calling_aes)
        until = last + dt.timedelta(seconds=keep)
        where = ", ".join(sorted(view.destinations))
        if now >= until:
            return Verdict(
                True,
                "delivered",
                f"delivered to {where}; kept {keep / DAY_S:g} days after the last delivery",
                until,
                early=True,
            )
        return Verdict(
            False, "kept_delivered", f"delivered to {where}; kept until {until:%Y-%m-%d %H:%M} UTC", until, early=True
        )
    why = (
        "discarded by a rule"
        if view.discard
        else "no rule forwarded it"
        if view.decided
        else "routing.rules is not set"
    )
    if policy.not_forwarded_keep_s is None:
        return _stay(
            "not_forwarded",
            f"forwarded nowhere ({why}): nnrouter holds the only copy (retention.not_forwarded_keep_days is null)",
        )
    until = last_received + dt.timedelta(seconds=policy.not_forwarded_keep_s)
    days = policy.not_forwarded_keep_s / DAY_S
    if now >= until:
        return Verdict(
            True, "not_forwarded_expired", f"forwarded nowhere ({why}); kept {days:g} days after the last image", until
        )
    return Verdict(
        False, "kept_not_forwarded", f"forwarded nowhere ({why}); kept until {until:%Y-%m-%d %H:%M} UTC", until
    )


# --- reading the store -----------------------------------------------------------


@dataclass
class StudyFiles:
    """What deleting a study frees: its spool files and overlays, with sizes."""

    spool: list[str] = field(default_factory=list)
    overlays: list[str] = field(default_factory=list)
    bytes: int = 0
    overlay_bytes: int = 0


def _views(s: Session, study_ids: list[int], node: str | None = None) -> dict[int, tuple[StudyView, StudyFiles]]:
    """The policy's view of these studies and the files each holds, in a few queries.

    The files are those on this node (``node``; None: a shared spool, all):
    another node's are in its own spool, and its sweep removes them once
    their rows are gone.
    """
    studies = {
        row.id: row
        for row in s.execute(
            select(Study.id, Study.study_uid, Study.last_received_at).where(Study.id.in_(study_ids))
        ).all()
    }
    inst_rows = s.execute(
        select(
            Instance.id,
            Series.study_id,
            Instance.sop_instance_uid,
            Instance.version,
            Instance.state,
            Instance.calling_ae,
            Instance.path,
            Instance.size_bytes,
            Instance.node,
        )
        .join(Series, Series.id == Instance.series_id)
        .where(Series.study_id.in_(study_ids))
    ).all()
    by_study: dict[int, list[Any]] = {sid: [] for sid in studies}
    for r in inst_rows:
        by_study[r.study_id].append(r)
    inst_ids = [r.id for r in inst_rows]
    study_of = {r.id: r.study_id for r in inst_rows}
    outbox: dict[int, list[tuple[int, str, str, dt.datetime | None]]] = {sid: [] for sid in studies}
    overlays: dict[int, set[str]] = {sid: set() for sid in studies}
    for chunk in _chunks(inst_ids):
        for o in s.execute(
            select(Outbox.instance_id, Outbox.destination, Outbox.state, Outbox.sent_at).where(
                Outbox.instance_id.in_(chunk)
            )
        ).all():
            outbox[study_of[o.instance_id]].append((o.instance_id, o.destination, o.state, o.sent_at))
        for p in s.execute(
            select(Prediction.instance_id, Prediction.cam_path).where(
                Prediction.instance_id.in_(chunk), Prediction.cam_path.is_not(None)
            )
        ).all():
            overlays[study_of[p.instance_id]].add(p.cam_path)
    decisions = {
        d.study_id: d
        for d in s.execute(
            select(
                RoutingDecision.study_id, RoutingDecision.deliveries, RoutingDecision.hold, RoutingDecision.discard
            ).where(RoutingDecision.study_id.in_(study_ids))
        ).all()
    }
    out: dict[int, tuple[StudyView, StudyFiles]] = {}
    for sid, st in studies.items():
        rows = by_study[sid]
        d = decisions.get(sid)
        dests = frozenset() if d is None or d.discard else frozenset(x["destination"] for x in (d.deliveries or []))
        # The newest version of each image the router queues for the study's deliveries.
        newest: dict[str, Any] = {}
        for r in rows:
            if r.state != InstanceState.CREATED and (
                r.sop_instance_uid not in newest or r.version > newest[r.sop_instance_uid].version
            ):
                newest[r.sop_instance_uid] = r
        queued = {(iid, dest) for iid, dest, _, _ in outbox[sid]}
        unqueued = sum(
            1 for r in newest.values() if r.state in LOOKED_AT and any((r.id, x) not in queued for x in dests)
        )
        view = StudyView(
            study_id=sid,
            study_uid=st.study_uid,
            last_received_at=st.last_received_at,
            instance_states=tuple(r.state for r in rows),
            calling_aes=frozenset(r.calling_ae for r in rows if r.calling_ae),
            decided=d is not None,
            hold=bool(d and d.hold),
            discard=bool(d and d.discard),
            destinations=dests,
            outbox=tuple((dest, state, sent) for _, dest, state, sent in outbox[sid]),
            unqueued=unqueued,
        )
        here = [r for r in rows if node is None or r.node is None or r.node == node]
        files = StudyFiles(
            spool=[r.path for r in here if r.path],
            overlays=sorted(overlays[sid]),
            bytes=sum(r.size_bytes or 0 for r in here),
        )
        files.overlay_bytes = sum(_size(p) for p in files.overlays)
        out[sid] = (view, files)
    return out


def _chunks(items: list[Any], n: int = _CHUNK) -> Iterator[list[Any]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


# --- the plan and its execution --------------------------------------------------------


@dataclass
class Candidate:
    """A study that would go (or went), with what it frees and why."""

    study_id: int
    study_uid: str
    reason: str
    early: bool
    files: StudyFiles

    def as_dict(self) -> dict[str, Any]:
        return {
            "study_uid": self.study_uid,
            "reason": self.reason,
            "early": self.early,
            "files": len(self.files.spool),
            "bytes": self.files.bytes,
            "overlays": len(self.files.overlays),
            "overlay_bytes": self.files.overlay_bytes,
        }


@dataclass
class Sweep:
    """Orphans: spool files without a row, overlays without a prediction, empty folders."""

    files: list[str] = field(default_factory=list)
    bytes: int = 0
    overlays: list[str] = field(default_factory=list)
    overlay_bytes: int = 0
    folders: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "orphan_files": len(self.files),
            "orphan_bytes": self.bytes,
            "orphan_overlays": len(self.overlays),
            "orphan_overlay_bytes": self.overlay_bytes,
            "empty_folders": self.folders,
            "paths": self.files + self.overlays,
        }


@dataclass
class Pass:
    """One cleaning pass: what went (or would go, in a dry run), what stays and why."""

    dry_run: bool
    free_mb: float | None
    clean_below_free_mb: int
    studies: list[Candidate] = field(default_factory=list)
    kept: Counter = field(default_factory=Counter)
    skipped: int = 0  # candidates that changed under us (a new image, a new delivery), left for the next pass
    sweep: Sweep = field(default_factory=Sweep)

    def as_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "spool_free_mb": None if self.free_mb is None else round(self.free_mb, 1),
            "clean_below_free_mb": self.clean_below_free_mb,
            "studies": [c.as_dict() for c in self.studies],
            "totals": {
                "studies": len(self.studies),
                "files": sum(len(c.files.spool) for c in self.studies),
                "bytes": sum(c.files.bytes for c in self.studies),
                "overlays": sum(len(c.files.overlays) for c in self.studies),
                "overlay_bytes": sum(c.files.overlay_bytes for c in self.studies),
            },
            "kept": dict(self.kept.most_common()),
            "skipped": self.skipped,
            "sweep": self.sweep.as_dict(),
        }

    def text(self) -> str:
        verb = "would delete" if self.dry_run else "deleted"
        lines = []
        for c in self.studies:
            lines.append(
                f"{verb} study {c.study_uid}: {len(c.files.spool)} files, {c.files.bytes / 1e6:.1f} MB, "
                f"{len(c.files.overlays)} overlays ({c.reason}{', early: spool short of space' if c.early else ''})"
            )
        d = self.as_dict()
        t = d["totals"]
        lines.append(
            f"{verb} {t['studies']} studies, {t['files']} files, {t['bytes'] / 1e6:.1f} MB "
            f"+ {t['overlays']} overlays, {t['overlay_bytes'] / 1e6:.1f} MB"
        )
        sw = self.sweep
        lines.append(
            f"{'would sweep' if self.dry_run else 'swept'} {len(sw.files)} spool files without a row "
            f"({sw.bytes / 1e6:.1f} MB), {len(sw.overlays)} overlays without a prediction, {sw.folders} empty folders"
        )
        if self.kept:
            lines.append("kept: " + ", ".join(f"{n} {code}" for code, n in self.kept.most_common()))
        if self.free_mb is not None:
            lines.append(f"spool free {self.free_mb:.0f} MB (cleaning early below {self.clean_below_free_mb} MB)")
        return "\n".join(lines)


class Cleaner:
    def __init__(self, settings: Settings, store: Store):
        self.settings = settings
        self.store = store
        self.policy = Policy.from_settings(settings)
        self.spool_root = Path(settings.storage.path).resolve()
        self.derived_root = Path(settings.storage.derived_path).resolve()
        self.overlay_folder = Path(settings.storage.derived_path) / "cam"  # as the workers write it
        self.below = clean_below_free_mb(settings)
        self.node = settings.files_of

    def free_mb(self) -> float | None:
        return pressure.free_mb(self.spool_root)

    def _short(self, free: float | None) -> bool:
        return free is not None and free < self.below

    # --- studies ---

    def judge_all(self, now: dt.datetime) -> Iterator[tuple[StudyView, StudyFiles, Verdict]]:
        """Every study with its verdict, the least recently active first."""
        last_id, last_at = 0, None
        while True:
            with self.store.read() as s:
                q = select(Study.id, Study.last_received_at).order_by(Study.last_received_at, Study.id).limit(_PAGE)
                if last_at is not None:
                    q = q.where(
                        (Study.last_received_at > last_at)
                        | ((Study.last_received_at == last_at) & (Study.id > last_id))
                    )
                page = s.execute(q).all()
                if not page:
                    return
                views = _views(s, [r.id for r in page], self.node)
            for r in page:
                view, files = views[r.id]
                yield view, files, judge(view, self.policy, now)
            last_id, last_at = page[-1].id, page[-1].last_received_at

    def run(self, *, dry_run: bool = False, now: dt.datetime | None = None, stop: Any = None) -> Pass:
        """One pass: expired studies, then (when the spool is short) delivered ones early, then the sweep.

        ``stop`` (anything with ``is_set``) ends the pass between two studies.
        """
        now = now or utcnow()
        free = self.free_mb()
        result = Pass(dry_run=dry_run, free_mb=free, clean_below_free_mb=self.below)
        early: list[tuple[StudyView, StudyFiles]] = []
        for view, files, verdict in self.judge_all(now):
            if stop is not None and stop.is_set():
                return result
            if verdict.go:
                self._take(result, view, files, verdict.reason, False, dry_run, now)
            else:
                result.kept[verdict.code] += 1
                if verdict.early and files.spool:  # early only where it frees room here, not another node's studies
                    early.append((view, files))
        # Oldest delivered first, until the spool has room again. A dry run estimates the room from the sizes.
        freed = sum(c.files.bytes + c.files.overlay_bytes for c in result.studies) / (1024 * 1024)
        for view, files in early:
            if stop is not None and stop.is_set():
                return result
            room = self.free_mb() if not dry_run else (None if free is None else free + freed)
            if not self._short(room):
                break
            if self._take(
                result, view, files, f"spool below {self.below} MB free: delivered, cleaned early", True, dry_run, now
            ):
                result.kept["kept_delivered"] -= 1
                freed += (files.bytes + files.overlay_bytes) / (1024 * 1024)
        result.kept = +result.kept  # drop zero counts
        result.sweep = self.sweep(dry_run=dry_run)
        return result

    def _take(
        self,
        result: Pass,
        view: StudyView,
        files: StudyFiles,
        reason: str,
        early: bool,
        dry_run: bool,
        now: dt.datetime,
    ) -> bool:
        if not dry_run:
            done = self.delete_study(view.study_id, now, early=early)
            if done is None:
                result.skipped += 1
                return False
            files = done
            log.info(
                "study_cleaned",
                study_uid=view.study_uid,
                files=len(files.spool),
                bytes=files.bytes,
                overlays=len(files.overlays),
                overlay_bytes=files.overlay_bytes,
                reason=reason,
                early=early,
            )
        result.studies.append(Candidate(view.study_id, view.study_uid, reason, early, files))
        return True

    def delete_study(self, study_id: int, now: dt.datetime, *, early: bool = False) -> StudyFiles | None:
        """Rows first (judged again inside the same transaction), then files; None if the study may not go now."""
        seen = self.delete_rows(study_id, now, early=early)
        if seen is None:
            return None
        files, identities = seen
        self.remove_files(identities)
        return files

    def delete_rows(
        self, study_id: int, now: dt.datetime, *, early: bool = False
    ) -> tuple[StudyFiles, dict[str, tuple[int, int]]] | None:
        """Delete the study's rows if the policy still lets it go; the files it held, and their identities.

        The study row is locked first (a write on SQLite takes the database's
        write lock; PostgreSQL locks the row), so no image or delivery can be
        added between the judgment and the delete; one added before makes the
        judgment say no, and a series or image that slips in anyway makes the
        delete fail on its foreign key. Files are stat'ed here, before the
        commit: after it, a re-sent image may take the same path, and only the
        file seen here is removed.
        """
        try:
            with self.store.write() as s:
                locked = s.execute(
                    update(Study)
                    .where(Study.id == study_id)
                    .values(last_received_at=Study.last_received_at)
                    .execution_options(synchronize_session=False)
                )
                if not getattr(locked, "rowcount", 1):
                    return None
                view, files = _views(s, [study_id], self.node)[study_id]
                verdict = judge(view, self.policy, now)
                if not (verdict.go or (early and verdict.early)):
                    return None
                identities = {p: ident for p in files.spool + files.overlays if (ident := _identity(p)) is not None}
                inst_ids = list(
                    s.execute(select(Instance.id).join(Series).where(Series.study_id == study_id)).scalars()
                )
                for chunk in _chunks(inst_ids):
                    s.execute(delete(Detection).where(Detection.instance_id.in_(chunk)))
                    s.execute(delete(Prediction).where(Prediction.instance_id.in_(chunk)))
                    s.execute(delete(Outbox).where(Outbox.instance_id.in_(chunk)))
                s.execute(delete(Flag).where(Flag.study_id == study_id))
                s.execute(delete(FlagReview).where(FlagReview.study_id == study_id))
                s.execute(delete(RoutingDecision).where(RoutingDecision.study_id == study_id))
                # Orders taken from this study's own images go with them; RIS orders (HL7, worklist) stay.
                s.execute(
                    delete(OrderRequest).where(
                        OrderRequest.source == ORDER_FROM_IMAGES, OrderRequest.study_uid == view.study_uid
                    )
                )
                for chunk in _chunks(inst_ids):
                    s.execute(delete(Instance).where(Instance.id.in_(chunk)))
                s.execute(delete(Series).where(Series.study_id == study_id))
                s.execute(delete(Study).where(Study.id == study_id))
        except Exception as exc:  # a row that another stage added or locked: the next pass judges again
            log.warning("study_clean_skipped", study_id=study_id, error=type(exc).__name__)
            log.debug("study_clean_skipped_detail", study_id=study_id, error=str(exc)[:500])
            return None
        return files, identities

    def remove_files(self, identities: dict[str, tuple[int, int]]) -> int:
        """Remove the files seen before the rows went, if they are still those files; returns how many."""
        n = 0
        for path, ident in identities.items():
            if not self._ours(path):
                log.warning("clean_refused_path", path=path, reason="outside storage.path and storage.derived_path")
                continue
            if _identity(path) == ident:
                try:
                    os.unlink(path)
                    n += 1
                except FileNotFoundError:
                    pass
        return n

    def _ours(self, path: str) -> bool:
        p = Path(path).resolve()
        return p.is_relative_to(self.spool_root) or p.is_relative_to(self.derived_root)

    # --- orphans ---

    def sweep(self, *, dry_run: bool = False, grace_s: float | None = None) -> Sweep:
        """Remove spool files without a row, overlays without a prediction and empty folders, older than the grace."""
        grace = self.settings.retention.orphan_grace_s if grace_s is None else grace_s
        cutoff = time.time() - grace
        out = Sweep()
        spool_files = [p for p in _old_files(self.spool_root, cutoff, skip={".incoming"}) if p.endswith(".dcm")]
        for chunk in _chunks(spool_files):
            with self.store.read() as s:
                known = set(s.execute(select(Instance.path).where(Instance.path.in_(chunk))).scalars())
            for path in chunk:
                if path not in known and not self._known_elsewhere(path):
                    out.bytes += self._remove_orphan(path, dry_run, out.files)
        # Overlays are named as the workers name them: relative to where nnrouter runs when derived_path is.
        folder = self.overlay_folder
        if folder.is_dir():
            names = [
                e.name
                for e in os.scandir(folder)
                if e.is_file(follow_symlinks=False)
                and e.name.endswith(".png")
                and e.stat(follow_symlinks=False).st_mtime < cutoff
            ]
            for chunk in _chunks(names):
                as_written = {str(folder / n): n for n in chunk}
                with self.store.read() as s:
                    known = {
                        p
                        for p in s.execute(
                            select(Prediction.cam_path).where(Prediction.cam_path.in_(list(as_written)))
                        ).scalars()
                        if p
                    }
                for written in as_written:
                    if written not in known:
                        out.overlay_bytes += self._remove_orphan(written, dry_run, out.overlays)
        if not dry_run:
            out.folders = _remove_empty_folders(
                self.spool_root, cutoff, keep={self.spool_root, self.spool_root / ".incoming"}
            )
        if out.files or out.overlays or out.folders:
            log.info(
                "spool_swept" if not dry_run else "spool_sweep_preview",
                orphan_files=len(out.files),
                orphan_bytes=out.bytes,
                orphan_overlays=len(out.overlays),
                orphan_overlay_bytes=out.overlay_bytes,
                empty_folders=out.folders,
            )
        return out

    def _known_elsewhere(self, path: str) -> bool:
        """A row for this study/series/file under another spelling of the spool's path (a symlink, a mount)?

        A file is only an orphan when no row could mean it: deleting a kept
        image because two strings differ would lose it.
        """
        tail = "/".join(Path(path).parts[-3:])
        with self.store.read() as s:
            return s.execute(select(Instance.id).where(Instance.path.like(f"%/{tail}")).limit(1)).first() is not None

    def _remove_orphan(self, path: str, dry_run: bool, into: list[str]) -> int:
        ident = _identity(path)
        if ident is None:
            return 0
        size = _size(path)
        if not dry_run:
            # Still the same old file? A re-sent image may have just been renamed onto this path.
            if _identity(path) != ident:
                return 0
            try:
                os.unlink(path)
            except FileNotFoundError:
                return 0
        into.append(path)
        return size


def _identity(path: str) -> tuple[int, int] | None:
    """A file's inode and modification time, or None when it is gone (or no regular file)."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return st.st_ino, st.st_mtime_ns


def _old_files(root: Path, cutoff: float, skip: set[str]) -> Iterator[str]:
    """Regular files under ``root`` last modified before ``cutoff``; folders named in ``skip`` (at the top) are left out."""
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for e in entries:
            if e.is_dir(follow_symlinks=False):
                if not (folder == root and e.name in skip):
                    stack.append(Path(e.path))
            elif e.is_file(follow_symlinks=False):
                try:
                    if e.stat(follow_symlinks=False).st_mtime < cutoff:
                        yield e.path
                except OSError:
                    continue


def _remove_empty_folders(root: Path, cutoff: float, keep: set[Path]) -> int:
    """Remove empty folders (bottom up) not touched since ``cutoff``; returns how many.

    A folder whose last change was ours (we removed its empty subfolders in
    this walk) counts as untouched: a study folder goes with its series folders.
    """
    n = 0
    emptied: set[str] = set()
    for folder, dirs, files in os.walk(root, topdown=False):
        p = Path(folder)
        if p in keep or files or any(os.path.exists(os.path.join(folder, d)) for d in dirs):
            continue
        try:
            if os.stat(folder).st_mtime < cutoff or (dirs and folder in emptied):
                os.rmdir(folder)
                n += 1
                emptied.add(os.path.dirname(folder))
        except OSError:  # not empty after all (a receive just wrote into it), or gone
            continue
    return n


# --- the stage --------------------------------------------------------------------------


class CleanerTick:
    """One turn of the cleaner stage: measure back-pressure, and clean when a pass is due.

    A pass is due every retention.interval_s, and every 30 s (or the
    interval, if shorter) while the spool is short of space. Back-pressure is
    logged when a refusal or an alert starts or ends, so the alert is in the
    log even when no modality is calling.
    """

    def __init__(self, settings: Settings, store: Store, stop: Any):
        self.settings = settings
        self.store = store
        self.stop = stop
        self.cleaner = Cleaner(settings, store)
        self.interval = settings.retention.interval_s
        self.short_interval = min(self.interval, 30.0)
        self.last_pass = float("-inf")
        self.raised: tuple[tuple[str, ...], tuple[str, ...], str | None] = ((), (), None)

    @property
    def every_s(self) -> float:
        """How often the stage turns: back-pressure is measured at least every 5 s."""
        return min(5.0, self.short_interval)

    def __call__(self) -> None:
        health = pressure.measure(self.settings, self.store)
        now_raised = (health.refuse, health.alerts, health.store_error)
        if now_raised != self.raised:
            if health.refuse or health.alerts:
                log.warning("backpressure", refusing=list(health.refuse), alerts=list(health.alerts))
            elif self.raised[0] or self.raised[1]:
                log.info("backpressure_cleared")
            self.raised = now_raised
        since = time.monotonic() - self.last_pass
        due = since >= self.interval or (self.cleaner._short(health.spool_free_mb) and since >= self.short_interval)
        if health.store_error is not None or not due:
            return
        self.last_pass = time.monotonic()
        try:
            done = self.cleaner.run(stop=self.stop)
        except Exception as exc:  # a database restart: the next turn tries again
            log.error("clean_pass_failed", error=type(exc).__name__)
            log.debug("clean_pass_failed_detail", exc_info=True)
            return
        if done.studies or done.skipped:
            log.info(
                "clean_pass",
                studies=len(done.studies),
                skipped=done.skipped,
                bytes=sum(c.files.bytes for c in done.studies),
                overlay_bytes=sum(c.files.overlay_bytes for c in done.studies),
                spool_free_mb=None if done.free_mb is None else round(done.free_mb),
            )


def run_cleaner(settings: Settings, stop: Any = None, parent_pid: int | None = None) -> None:
    """The cleaner process: a :class:`CleanerTick` every few seconds (APScheduler) until stopped.

    Started by ``nnrouter serve`` (``parent_pid`` set: it stops on SIGTERM and
    when that process is gone, as the other stages do) or by ``nnrouter clean
    --loop``.
    """
    opened = lifecycle.open_stage(settings, "cleaner", stop, parent_pid)
    if opened is None:
        return
    stop, store = opened
    tick = CleanerTick(settings, store, stop)
    log.info(
        "cleaner_started",
        keep_days=settings.retention.keep_days,
        clean_below_free_mb=tick.cleaner.below,
        not_forwarded_keep_days=settings.retention.not_forwarded_keep_days,
    )
    try:
        lifecycle.tick_until_stopped(tick, tick.every_s, stop)
    finally:
        store.dispose()


def spawn_cleaner(settings: Settings, name: str = "nnrouter-cleaner") -> BaseProcess:
    """The cleaner as a child process of ``serve``: it stops on SIGTERM and dies with its parent."""
    return lifecycle.spawn_stage("nnrouter.service.clean:run_cleaner", name, settings=settings)
