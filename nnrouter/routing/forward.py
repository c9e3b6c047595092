"""Forward: deliver outbox rows to their destinations, at least once, never lost.

Each association a destination may have (``max_associations``) is a *lane*:
a thread of its own that claims that destination's due rows from the store,
sends them on its association (reused while there is work, released when
idle) and records each outcome. Lanes never wait for one another, so a peer
that hangs for its whole timeout delays only its own deliveries: the other
destinations' sends and retries go on at their own pace.

The forwarder is a stage of its own (``run_forwarder``): it meets the router
only in the outbox, and reads the destinations from the rule file itself,
reloaded when it changes (an invalid edit keeps the running destinations, as
it keeps the router's rules; the router is the one that records each load).

The instance goes out as it was received (the spool bytes, streamed) when
the destination accepts its transfer syntax; when it does not, it is
transcoded to Explicit VR Little Endian. A crash between sending and
recording leaves the row leased; it is sent again after the lease, so a
destination may see an instance twice, never zero times.

What a failure means for the row (``last_error`` says which and why):

- **sent**: 0x0000, and the warnings that still mean stored (0x0001, 0x0107,
  0x0116, 0xBxxx).
- **transient**, retried after the destination's ``retry`` back-off, counted
  from the moment of the failure, until ``max_retries`` is spent (then
  ``dead``): connection refused, association rejected or aborted, no answer
  within the destination's ``timeout_s``, the association lost mid-batch,
  0xA7xx (out of resources), 0x0110 (processing failure), 0x0213 (resource
  limitation), any other failure status, a spool file that cannot be read.
- **permanent**, ``dead`` at once, no retry (the same request would get the
  same answer; fix the cause, then ``nnrouter outbox retry``): 0xCxxx (cannot
  understand), 0xA9xx (data set does not match SOP class), 0x0117 (invalid
  object instance), 0x0122 (SOP class not supported), 0x0124 (not
  authorized), 0x0211/0x0212 (unrecognised operation, mistyped argument);
  the destination refusing every presentation context we offered (SOP class
  or transfer syntax refused and no fallback); an instance that cannot be
  coerced or transcoded.
"""

from __future__ import annotations

import datetime as dt
import socket
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.association import Association
from sqlalchemy import ColumnElement, Exists, and_, func, or_, select, update

from nnrouter.core import logs, yamlfile
from nnrouter.core.config import Settings
from nnrouter.core.store import (
    DestinationPause,
    Instance,
    Outbox,
    OutboxState,
    RulesLoad,
    Store,
    held_here,
    latest_predictions,
    new_claimant,
    unavailable,
    utcnow,
)
from nnrouter.dicom.send import MAX_CONTEXTS, NotAccepted, transcoded
from nnrouter.dicom.statuses import stored
from nnrouter.routing import rules
from nnrouter.service import lifecycle

if TYPE_CHECKING:
    import ssl

log = logs.get("nnrouter.routing.forward")

# Failure statuses that no retry can cure, besides the 0xA9xx and 0xCxxx ranges.
PERMANENT_STATUSES = {
    0x0117: "invalid object instance",
    0x0122: "SOP class not supported",
    0x0124: "not authorized",
    0x0211: "unrecognised operation",
    0x0212: "mistyped argument",
}


def ok_status(status: int) -> bool:
    # Success, or the warnings (coercion, elements discarded, data set does not match) that still mean stored.
    return stored(status)  # pynetdicom's code_to_category: Success or Warning


def permanent_status(status: int) -> bool:
    """A failure status the peer would give again however often we asked (see the module docstring)."""
    return 0xA900 <= status <= 0xA9FF or 0xC000 <= status <= 0xCFFF or status in PERMANENT_STATUSES


def _utc(ts: dt.datetime) -> dt.datetime:
    """SQLite hands back naive datetimes; they were written in UTC."""
    return ts if ts.tzinfo else ts.replace(tzinfo=dt.UTC)


def _tls_problem(ctx: ssl.SSLContext, host: str, port: int) -> str | None:
    """Why a TLS handshake fails, in the words of the TLS library.

    pynetdicom reports a failed handshake only as an aborted association;
    the PACS engineer needs to know it was the certificate (or the protocol).
    """
    import ssl

    try:
        with socket.create_connection((host, port), timeout=10) as raw, ctx.wrap_socket(raw, server_hostname=host):
            return None
    except ssl.SSLError as exc:
        return (
            f"TLS: {exc.reason or exc}: {exc.verify_message}"
            if isinstance(exc, ssl.SSLCertVerificationError)
            else f"TLS: {exc}"
        )
    except OSError as exc:
        return f"TLS: {exc}"


class Refused(ConnectionError):
    """The association could not be used for these instances, and asking again will not change that."""


@dataclass(frozen=True)
class Job:
    outbox_id: int
    instance_id: int
    path: str
    sop_class_uid: str
    transfer_syntax_uid: str
    coerce: dict | None
    label: str | None
    attempts: int


@dataclass(frozen=True)
class Outcome:
    """What one try of one delivery came to."""

    ok: bool
    error: str | None = None
    permanent: bool = False
    transfer_syntax_uid: str | None = None


@dataclass
class Link:
    """An association to one destination and the contexts it was opened with."""

    assoc: Association
    pairs: set[tuple[str, str]]
    dest: rules.Destination
    last_used: float = field(default_factory=time.monotonic)

    def accepted(self, sop_class: str, ts: str) -> bool:
        return any(
            cx.abstract_syntax == sop_class and cx.transfer_syntax[0] == ts for cx in self.assoc.accepted_contexts
        )


def open_link(dest: rules.Destination, pairs: set[tuple[str, str]], idle_close_s: float) -> Link:
    ae = AE(ae_title=dest.calling_ae)
    ae.acse_timeout = ae.dimse_timeout = dest.timeout_s
    # An idle association is ours to release (idle_close_s); the peer's silence must not abort it first.
    ae.network_timeout = max(dest.timeout_s, idle_close_s + 5)
    contexts: list[tuple[str, str]] = []
    for sop, ts in sorted(pairs):
        # Our own syntax first (the bytes go as received); Explicit VR LE as the fallback.
        for t in [ts, *dest.transfer_syntaxes, ExplicitVRLittleEndian]:
            if (sop, t) not in contexts:
                contexts.append((sop, t))
    if len(contexts) > MAX_CONTEXTS:
        raise ConnectionError(f"{len(contexts)} presentation contexts needed, DICOM allows {MAX_CONTEXTS}")
    for sop, ts in contexts:
        ae.add_requested_context(sop, [ts])
    tls = None
    if dest.tls.enabled:
        import ssl

        ctx = ssl.create_default_context(cafile=str(dest.tls.ca))
        if dest.tls.cert:
            ctx.load_cert_chain(str(dest.tls.cert), str(dest.tls.key))
        tls = (ctx, dest.host)
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls)
    where = f"{dest.ae_title}@{dest.host}:{dest.port}"
    if not assoc.is_established:
        if assoc.rejected_contexts and not assoc.accepted_contexts:
            refused = sorted({str(cx.abstract_syntax) for cx in assoc.rejected_contexts})
            raise Refused(
                f"{where} accepted none of the presentation contexts offered (SOP class {', '.join(refused)} "
                "in the received syntax and Explicit VR Little Endian)"
            )
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "no answer"
        if tls is not None and not assoc.is_rejected:
            why = _tls_problem(tls[0], dest.host, dest.port) or why
        raise ConnectionError(f"association with {where} failed ({why})")
    return Link(assoc, pairs, dest)


class Lane:
    """One association's worth of deliveries for one destination, on a thread of its own.

    It claims the destination's due rows, sends them and records each
    outcome, then looks again when the next row falls due (at most every
    ``routing.tick_s``). Nothing it does waits for another lane.
    """

    def __init__(self, forwarder: Forwarder, dest: rules.Destination, index: int):
        self.forwarder = forwarder
        self.dest = dest  # replaced by the forwarder when the rules change
        self.name = f"{dest.name}#{index}"
        self.link: Link | None = None
        self.stopping = threading.Event()
        self._wake = threading.Event()
        self.outage = lifecycle.Outage("forward", lane=self.name)
        self.thread = threading.Thread(target=self.run, name=f"forward-{self.name}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def nudge(self) -> None:
        """Look at the queue now (the rules changed), even while resting after a failure."""
        self._wake.set()

    def stop(self) -> None:
        """Ask the lane to finish the instance it is sending and go; does not wait."""
        self.stopping.set()
        self._wake.set()

    def run(self) -> None:
        poll = self.forwarder.settings.routing.tick_s
        while not self.stopping.is_set():
            try:
                wait = self.step()
                self.outage.over()
            except Exception as exc:  # the lane lives on and looks again
                down = unavailable(exc)
                if down is not None:  # logged once, waited out; what was claimed comes back after its lease
                    wait = self.outage.failed(down)
                else:  # the type only: messages may quote patient data
                    log.error(
                        "forward_lane_failed", destination=self.dest.name, lane=self.name, error=type(exc).__name__
                    )
                    log.debug("forward_lane_failed_detail", lane=self.name, exc_info=True)
                    self.drop_link()
                    wait = poll
            if wait > 0:
                self._wake.wait(wait)
            self._wake.clear()
        self.close_link()

    def step(self) -> float:
        """One look at the queue; returns how long to wait before the next."""
        fwd, dest = self.forwarder, self.dest
        poll = fwd.settings.routing.tick_s
        now = utcnow()
        if self.link is not None and (
            self.link.dest != dest
            or not self.link.assoc.is_established
            or time.monotonic() - self.link.last_used > fwd.settings.routing.idle_close_s
        ):
            self.close_link()
        if not dest.open_at(now):
            self.close_link()
            return poll
        due_in = fwd.due_in(dest.name, now)
        if due_in is None or due_in > 0:
            return poll if due_in is None else min(poll, due_in)
        jobs = fwd.claim(dest.name, fwd.batch, now)
        if not jobs:
            return poll
        counts, rest_s = self.deliver(dest, jobs)
        log.info("forwarded", destination=dest.name, lane=self.name, **counts)
        # After a failure, wait at least one poll even if the policy says retry at once: no busy loop.
        return 0.0 if set(counts) <= {OutboxState.SENT} else max(poll, rest_s)

    # --- the association ---

    def _link_for(self, dest: rules.Destination, jobs: list[Job]) -> Link:
        pairs = {(j.sop_class_uid, j.transfer_syntax_uid) for j in jobs}
        link = self.link
        if link is not None and (not link.assoc.is_established or not pairs <= link.pairs):
            pairs |= link.pairs
            self.close_link()
            link = None
        if link is None:
            link = open_link(dest, pairs, self.forwarder.settings.routing.idle_close_s)
            self.link = link
        return link

    def close_link(self) -> None:
        link, self.link = self.link, None
        if link is not None and link.assoc.is_established:
            try:
                link.assoc.release()
            except Exception:  # a peer gone while we say goodbye is no failure of ours
                link.assoc.abort()

    def drop_link(self) -> None:
        link, self.link = self.link, None
        if link is not None and link.assoc.is_established:
            link.assoc.abort()

    # --- sending ---

    def deliver(self, dest: rules.Destination, jobs: list[Job]) -> tuple[dict[str, int], float]:
        """Send a claimed batch; the outcome counts, and how long the destination should rest.

        When the association itself fails (refused, aborted, timed out, lost)
        the destination is what is wrong, not the instances: the batch shares
        one failure time, and the lane rests until the whole batch is due
        again, so that a peer that is down sees one association attempt per
        back-off interval, not one per row or per study.
        """
        fwd = self.forwarder
        counts: dict[str, int] = {}
        rest_s = 0.0

        def done(job: Job, outcome: Outcome, at: dt.datetime | None = None) -> None:
            nonlocal rest_s
            state = fwd.finish(job, dest, outcome, at)
            counts[state] = counts.get(state, 0) + 1
            if not outcome.ok:
                log.warning(
                    "delivery_failed",
                    destination=dest.name,
                    outbox_id=job.outbox_id,
                    attempt=job.attempts,
                    state=state,
                    permanent=outcome.permanent,
                    error=outcome.error,
                )
            if at is not None and state == OutboxState.FAILED:
                rest_s = max(rest_s, dest.retry.delay(job.attempts))

        try:
            link = self._link_for(dest, jobs)
        except Refused as exc:
            for job in jobs:
                done(job, Outcome(False, str(exc), permanent=True))
            return counts, rest_s
        except (ConnectionError, OSError, RuntimeError) as exc:
            at = utcnow()
            for job in jobs:
                done(job, Outcome(False, str(exc)), at)
            return counts, rest_s
        for i, job in enumerate(jobs):
            if self.stopping.is_set():
                fwd.release(jobs[i:])  # not tried: back in the queue as they were, for whoever runs next
                break
            outcome = send(link, job) if link.assoc.is_established else Outcome(False, "association lost")
            if outcome.ok or link.assoc.is_established:
                done(job, outcome)
                continue
            # The association died (with this instance, or after the last): the rest of the batch fails as one.
            at = utcnow()
            done(job, outcome, at)
            for rest in jobs[i + 1 :]:
                done(rest, Outcome(False, "association lost"), at)
            self.link = None
            break
        return counts, rest_s


def _prepare(link: Link, job: Job) -> tuple[Dataset | str, str]:
    """What goes on the wire (the file itself, or a coerced or transcoded copy) and in which syntax."""
    ds = None
    if job.coerce is not None:
        ds = dcmread(job.path)
        changed = rules.coerce(ds, rules.Coerce(**job.coerce), job.label)
        log.debug("coerced", outbox_id=job.outbox_id, attributes=changed)
    try:
        return transcoded(job.path, job.sop_class_uid, job.transfer_syntax_uid, link.accepted, ds)
    except NotAccepted as exc:
        raise Refused(str(exc)) from exc


def send(link: Link, job: Job) -> Outcome:
    """Send one instance on an open association and say what came of it."""
    try:
        what, ts = _prepare(link, job)
    except Refused as exc:
        return Outcome(False, str(exc), permanent=True)
    except (OSError, MemoryError) as exc:  # the spool file cannot be read, or the copy made, now; later it may
        return Outcome(False, f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # the same bytes will not coerce or transcode any better next time
        return Outcome(False, f"cannot prepare the instance: {type(exc).__name__}: {exc}", permanent=True)
    try:
        rsp = link.assoc.send_c_store(what)
    except (AttributeError, ValueError) as exc:  # pynetdicom cannot encode it, or finds no context for it
        return Outcome(False, f"cannot send the instance: {type(exc).__name__}: {exc}", permanent=True)
    except Exception as exc:  # the association broke under us: the peer's trouble, not the instance's
        return Outcome(False, f"{type(exc).__name__}: {exc}", transfer_syntax_uid=ts)
    link.last_used = time.monotonic()
    if "Status" not in rsp:
        return Outcome(False, "no response (association lost or timed out)", transfer_syntax_uid=ts)
    status = int(rsp.Status)
    if ok_status(status):
        return Outcome(True, transfer_syntax_uid=ts)
    error = f"status 0x{status:04X} {rsp.get('ErrorComment', '')}".strip()
    return Outcome(False, error, permanent=permanent_status(status), transfer_syntax_uid=ts)


class Forwarder:
    """The lanes of every destination the running rules name, and the queue they share."""

    def __init__(self, settings: Settings, store: Store, worker_id: str | None = None, batch: int = 16):
        self.settings = settings
        self.store = store
        self.batch = batch
        self.worker_id = worker_id or new_claimant(settings.node.name)
        # Deliveries of the instances whose file this node's spool holds (all of them on a shared spool).
        self.node = settings.files_of
        self.lanes: dict[str, Lane] = {}
        # pynetdicom streams a file's data set unchanged (no decode, no
        # re-encode) only in this mode. It is a pynetdicom-wide switch, set in
        # the forwarder's own process; it changes nothing for data sets sent
        # from memory (coerced or transcoded copies).
        _config.STORE_SEND_CHUNKED_DATASET = True

    # --- lanes ---

    def tick(self, ruleset: rules.RuleSet) -> dict[str, int]:
        """Keep one running lane per association each destination may have, under the current rules.

        Returns at once: the lanes do the sending. A lane whose destination
        left the rules stops after its current instance; one that died is
        replaced.
        """
        wanted = {f"{d.name}#{i}": (d, i) for d in ruleset.destinations for i in range(d.max_associations)}
        stopped = started = 0
        for name in list(self.lanes):
            lane = self.lanes[name]
            if name not in wanted or not lane.thread.is_alive():
                lane.stop()
                del self.lanes[name]
                stopped += 1
        for name, (dest, i) in wanted.items():
            current = self.lanes.get(name)
            if current is None:
                current = self.lanes[name] = Lane(self, dest, i)
                current.start()
                started += 1
            elif current.dest != dest:
                current.dest = dest
                current.nudge()
        return {"lanes": len(self.lanes), "started": started, "stopped": stopped}

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop every lane: each finishes the instance it is sending, puts back what it had not tried, releases.

        A lane still waiting on a hung peer after ``timeout_s`` has its
        association aborted; what it held comes back after ``routing.lease_s``.
        """
        lanes = list(self.lanes.values())
        self.lanes.clear()
        for lane in lanes:
            lane.stop()
        deadline = time.monotonic() + timeout_s
        for lane in lanes:
            lane.thread.join(max(0.0, deadline - time.monotonic()))
        stuck = [lane for lane in lanes if lane.thread.is_alive()]
        for lane in stuck:
            link = lane.link
            if link is not None and link.assoc.is_established:
                link.assoc.abort()
        deadline = time.monotonic() + 1.0
        for lane in stuck:
            lane.thread.join(max(0.0, deadline - time.monotonic()))

    # --- the queue ---

    def _held(self) -> Exists:
        """Rows whose instance's file is on this node: another node's would fail to open and be retried to death."""
        return select(Instance.id).where(Instance.id == Outbox.instance_id, held_here(self.node)).exists()

    @staticmethod
    def _paused(destination: str) -> Exists:
        """An admin paused the destination (console or ``nnrouter outbox pause``): nothing goes until resumed."""
        return select(DestinationPause.destination).where(DestinationPause.destination == destination).exists()

    def _eligible(self, destination: str, now: dt.datetime) -> ColumnElement[bool]:
        return and_(
            Outbox.destination == destination,
            self._held(),
            ~self._paused(destination),
            or_(
                and_(Outbox.state.in_([OutboxState.PENDING, OutboxState.FAILED]), Outbox.next_attempt_at <= now),
                and_(Outbox.state == OutboxState.SENDING, Outbox.lease_until < now),
            ),
        )

    def due_in(self, destination: str, now: dt.datetime) -> float | None:
        """Seconds until the destination's next row falls due (0: now); None when it has none waiting."""
        with self.store.read() as s:
            if s.execute(select(self._paused(destination))).scalar():
                return None
            waiting = s.execute(
                select(func.min(Outbox.next_attempt_at)).where(
                    Outbox.destination == destination,
                    Outbox.state.in_([OutboxState.PENDING, OutboxState.FAILED]),
                    self._held(),
                )
            ).scalar()
            leased = s.execute(
                select(func.min(Outbox.lease_until)).where(
                    Outbox.destination == destination, Outbox.state == OutboxState.SENDING, self._held()
                )
            ).scalar()
        times = [_utc(t) for t in (waiting, leased) if t is not None]
        if not times:
            return None
        return max(0.0, (min(times) - now).total_seconds())

    def claim(self, destination: str, n: int, now: dt.datetime) -> list[Job]:
        eligible = select(Outbox.id).where(self._eligible(destination, now)).order_by(Outbox.id).limit(n)
        if not self.store.is_sqlite:
            eligible = eligible.with_for_update(skip_locked=True)
        lease = now + dt.timedelta(seconds=self.settings.routing.lease_s)
        with self.store.write() as s:
            ids = (
                s.execute(
                    update(Outbox)
                    .where(Outbox.id.in_(eligible.scalar_subquery()))
                    .values(
                        state=OutboxState.SENDING,
                        claimed_by=self.worker_id,
                        lease_until=lease,
                        attempts=Outbox.attempts + 1,
                    )
                    .returning(Outbox.id)
                )
                .scalars()
                .all()
            )
            if not ids:
                return []
            rows = s.execute(
                select(Outbox, Instance)
                .join(Instance, Instance.id == Outbox.instance_id)
                .where(Outbox.id.in_(ids))
                .order_by(Outbox.id)
            ).all()
            predictions = latest_predictions(s, (inst.id for _, inst in rows))
            jobs = []
            for ob, inst in rows:
                pred = predictions.get(inst.id)
                jobs.append(
                    Job(
                        ob.id,
                        inst.id,
                        inst.path,
                        inst.sop_class_uid,
                        inst.transfer_syntax_uid,
                        ob.coerce,
                        pred.label if pred else None,
                        ob.attempts,
                    )
                )
            return jobs

    def release(self, jobs: list[Job]) -> None:
        """Claimed rows that were not tried go back to the queue, due now, their attempt not counted."""
        if not jobs:
            return
        with self.store.write() as s:
            s.execute(
                update(Outbox)
                .where(
                    Outbox.id.in_([j.outbox_id for j in jobs]),
                    Outbox.claimed_by == self.worker_id,
                    Outbox.state == OutboxState.SENDING,
                )
                .values(
                    state=OutboxState.PENDING,
                    claimed_by=None,
                    lease_until=None,
                    next_attempt_at=utcnow(),
                    attempts=Outbox.attempts - 1,
                )
            )

    def finish(self, job: Job, dest: rules.Destination, outcome: Outcome, at: dt.datetime | None = None) -> str:
        """Record one try: sent, failed (retry at failure time + back-off) or dead (permanent, or retries spent)."""
        now = at or utcnow()
        if outcome.ok:
            state = OutboxState.SENT
            values: dict[str, object] = {
                "sent_at": now,
                "last_error": None,
                "transfer_syntax_uid": outcome.transfer_syntax_uid,
            }
        elif outcome.permanent:
            state, values = OutboxState.DEAD, {"last_error": f"permanent, not retried: {outcome.error}"}
        elif job.attempts > dest.retry.max_retries:
            state, values = OutboxState.DEAD, {"last_error": f"{outcome.error} (gave up after {job.attempts} attempts)"}
        else:
            delay = dest.retry.delay(job.attempts)
            state = OutboxState.FAILED
            values = {"last_error": outcome.error, "next_attempt_at": now + dt.timedelta(seconds=delay)}
        with self.store.write() as s:
            s.execute(
                update(Outbox)
                .where(Outbox.id == job.outbox_id, Outbox.claimed_by == self.worker_id)
                .values(state=state, claimed_by=None, lease_until=None, **values)
            )
        return state


# --- the forwarder stage ---------------------------------------------------------


class Destinations:
    """The destinations of the rule version the router runs, read from the store (its last load that held).

    The forwarder does not read the rule file: an edit the router refused,
    or one it has not loaded yet, must not change where deliveries go, and a
    forwarder started after such an edit must still know the running
    destinations. The router keeps the text of every version it loaded
    (``rules_load.text``); this follows the newest of this node's.
    """

    def __init__(self, settings: Settings, store: Store):
        self.settings = settings
        self.store = store
        self.path = settings.routing.rules
        self.ruleset: rules.RuleSet | None = None
        self.digest: str | None = None

    def current(self) -> rules.RuleSet | None:
        """The rule set running now (None until the router loaded a valid file)."""
        if self.path is None:
            return None
        with self.store.read() as s:
            row = s.execute(
                select(RulesLoad.digest, RulesLoad.path, RulesLoad.text)
                .where(
                    RulesLoad.kind == "rules",
                    RulesLoad.ok.is_(True),
                    RulesLoad.text.is_not(None),
                    RulesLoad.node == self.settings.node.name,
                )
                .order_by(RulesLoad.id.desc())
                .limit(1)
            ).first()
        if row is None or row.digest == self.digest:
            return self.ruleset
        try:
            # Region conditions were checked by the router when it loaded this version; where to send does
            # not depend on them.
            ruleset = rules.load_rules(Path(row.path), row.text, calling_ae=self.settings.dicom.ae_title)
        except yamlfile.FileProblems as exc:  # a version the router accepted; only a newer nnrouter could refuse it
            log.error("destinations_unreadable", digest=row.digest[:12], problems=len(exc.problems))
            self.digest = row.digest
            return self.ruleset
        self.ruleset, self.digest = ruleset, row.digest
        log.info("destinations_loaded", digest=row.digest[:12], destinations=len(ruleset.destinations))
        return ruleset


def run_forwarder(settings: Settings, stop: Any = None, parent_pid: int | None = None) -> None:
    """The forwarder process: keep a lane per association for each destination, every tick_s (APScheduler).

    Started by ``serve`` when routing.rules is set (``parent_pid`` set), it
    stops on SIGTERM and when that parent is gone: each lane finishes the
    instance it is sending and puts back what it had not tried. A database
    outage is logged once and waited out, by the tick as by each lane.
    """
    opened = lifecycle.open_stage(settings, "forwarder", stop, parent_pid)
    if opened is None:
        return
    stop, store = opened
    forwarder = None
    try:
        destinations = Destinations(settings, store)
        forwarder = Forwarder(settings, store)
        fwd = forwarder

        def tick() -> None:
            ruleset = destinations.current()
            if ruleset is not None:
                fwd.tick(ruleset)

        ticker = lifecycle.Ticker("forwarder", [("forward", tick)], worker=forwarder.worker_id)
        log.info("forwarder_started", rules=str(settings.routing.rules), worker=forwarder.worker_id)
        lifecycle.tick_until_stopped(ticker, settings.routing.tick_s, stop)
    finally:
        if forwarder is not None:
            forwarder.close()
        store.dispose()


def spawn_forwarder(settings: Settings, name: str = "nnrouter-forwarder") -> BaseProcess:
    """The forwarder as a child process of ``serve``: it stops on SIGTERM and dies with its parent."""
    return lifecycle.spawn_stage("nnrouter.routing.forward:run_forwarder", name, settings=settings)
