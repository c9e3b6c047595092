"""Forward: deliver outbox rows to their destinations, at least once, never lost.

Each destination gets its own association, reused while there is work and
released when idle. The instance goes out as it was received (the spool
bytes, streamed) when the destination accepts its transfer syntax; when it
does not, it is transcoded to Explicit VR Little Endian. A failure is retried
with backoff until the destination's retry policy gives up (dead). A crash
between sending and recording leaves the row leased; it is sent again after
the lease, so a destination may see an instance twice, never zero times.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, _config
from sqlalchemy import and_, or_, select, update

from nnrouter import logs, rules
from nnrouter.config import Settings
from nnrouter.send import MAX_CONTEXTS
from nnrouter.store import Instance, Outbox, OutboxState, Store, latest_predictions, utcnow

log = logs.get("nnrouter.forward")



def ok_status(status: int) -> bool:
    # Success, or the warnings (coercion, elements discarded, data set does not match) that still mean stored.
    return status == 0x0000 or status in (0x0001, 0x0107, 0x0116) or status & 0xF000 == 0xB000


def _tls_problem(ctx, host: str, port: int) -> str | None:  # type: ignore[no-untyped-def]
    """Why a TLS handshake fails, in the words of the TLS library.

    pynetdicom reports a failed handshake only as an aborted association;
    the PACS engineer needs to know it was the certificate (or the protocol).
    """
    import ssl

    try:
        with socket.create_connection((host, port), timeout=10) as raw, ctx.wrap_socket(raw, server_hostname=host):
            return None
    except ssl.SSLError as exc:
        return f"TLS: {exc.reason or exc}: {exc.verify_message}" if isinstance(exc, ssl.SSLCertVerificationError) else f"TLS: {exc}"
    except OSError as exc:
        return f"TLS: {exc}"


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


@dataclass
class Link:
    """An association to one destination and the contexts it was opened with."""

    assoc: object
    pairs: set[tuple[str, str]]
    last_used: float = field(default_factory=time.monotonic)

    def accepted(self, sop_class: str, ts: str) -> bool:
        return any(cx.abstract_syntax == sop_class and cx.transfer_syntax[0] == ts for cx in self.assoc.accepted_contexts)


class Forwarder:
    def __init__(self, settings: Settings, store: Store, worker_id: str | None = None):
        self.settings = settings
        self.store = store
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        # One association per lane; a destination has max_associations lanes.
        self.links: dict[str, Link] = {}
        # pynetdicom streams a file's data set unchanged (no decode, no
        # re-encode) only in this mode. It is a pynetdicom-wide switch, set in
        # the forwarder's own process; it changes nothing for data sets sent
        # from memory (coerced or transcoded copies).
        _config.STORE_SEND_CHUNKED_DATASET = True

    # --- the queue ---

    def claim(self, destination: str, n: int, now: dt.datetime) -> list[Job]:
        eligible = (
            select(Outbox.id)
            .where(
                Outbox.destination == destination,
                or_(
                    and_(Outbox.state.in_([OutboxState.PENDING, OutboxState.FAILED]), Outbox.next_attempt_at <= now),
                    and_(Outbox.state == OutboxState.SENDING, Outbox.lease_until < now),
                ),
            )
            .order_by(Outbox.id)
            .limit(n)
        )
        if not self.store.is_sqlite:
            eligible = eligible.with_for_update(skip_locked=True)
        lease = now + dt.timedelta(seconds=self.settings.routing.lease_s)
        with self.store.write() as s:
            ids = s.execute(
                update(Outbox)
                .where(Outbox.id.in_(eligible.scalar_subquery()))
                .values(state=OutboxState.SENDING, claimed_by=self.worker_id, lease_until=lease, attempts=Outbox.attempts + 1)
                .returning(Outbox.id)
            ).scalars().all()
            if not ids:
                return []
            rows = s.execute(
                select(Outbox, Instance).join(Instance, Instance.id == Outbox.instance_id).where(Outbox.id.in_(ids)).order_by(Outbox.id)
            ).all()
            predictions = latest_predictions(s, (inst.id for _, inst in rows))
            jobs = []
            for ob, inst in rows:
                pred = predictions.get(inst.id)
                jobs.append(Job(ob.id, inst.id, inst.path, inst.sop_class_uid, inst.transfer_syntax_uid, ob.coerce,
                                pred.label if pred else None, ob.attempts))
            return jobs

    def _finish(self, job: Job, dest: rules.Destination, ok: bool, error: str | None, ts: str | None = None) -> str:
        now = utcnow()
        if ok:
            values = dict(state=OutboxState.SENT, sent_at=now, last_error=None, transfer_syntax_uid=ts)
        elif job.attempts > dest.retry.max_retries:
            values = dict(state=OutboxState.DEAD, last_error=error)
        else:
            delay = dest.retry.delay(job.attempts)
            values = dict(state=OutboxState.FAILED, last_error=error, next_attempt_at=now + dt.timedelta(seconds=delay))
        with self.store.write() as s:
            s.execute(
                update(Outbox)
                .where(Outbox.id == job.outbox_id, Outbox.claimed_by == self.worker_id)
                .values(claimed_by=None, lease_until=None, **values)
            )
        return values["state"]

    # --- associations ---

    def _link(self, dest: rules.Destination, jobs: list[Job], lane: str) -> Link:
        pairs = {(j.sop_class_uid, j.transfer_syntax_uid) for j in jobs}
        link = self.links.get(lane)
        if link is not None and (not link.assoc.is_established or not pairs <= link.pairs):
            pairs |= link.pairs
            self._close(lane)
            link = None
        if link is None:
            link = self._open(dest, pairs)
            self.links[lane] = link
        return link

    def _open(self, dest: rules.Destination, pairs: set[tuple[str, str]]) -> Link:
        ae = AE(ae_title=dest.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
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
        if not assoc.is_established:
            why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "no answer"
            if tls is not None and not assoc.is_rejected:
                why = _tls_problem(tls[0], dest.host, dest.port) or why
            raise ConnectionError(f"association with {dest.ae_title}@{dest.host}:{dest.port} failed ({why})")
        return Link(assoc, pairs)

    def _close(self, name: str) -> None:
        link = self.links.pop(name, None)
        if link is not None and link.assoc.is_established:
            link.assoc.release()

    def close_idle(self) -> None:
        idle = self.settings.routing.idle_close_s
        for name in [n for n, link in self.links.items() if time.monotonic() - link.last_used > idle]:
            self._close(name)

    def close(self) -> None:
        for name in list(self.links):
            self._close(name)

    # --- sending ---

    def _send(self, link: Link, job: Job) -> tuple[int | None, str, str | None]:
        """Status, error text, and the transfer syntax the instance went out in."""
        assoc = link.assoc
        if job.coerce is None and link.accepted(job.sop_class_uid, job.transfer_syntax_uid):
            rsp = assoc.send_c_store(job.path)
            ts = job.transfer_syntax_uid
        else:
            ds = dcmread(job.path)
            if job.coerce is not None:
                changed = rules.coerce(ds, rules.Coerce(**job.coerce), job.label)
                log.debug("coerced", outbox_id=job.outbox_id, attributes=changed)
            ts = job.transfer_syntax_uid
            if not link.accepted(job.sop_class_uid, ts):
                if not link.accepted(job.sop_class_uid, ExplicitVRLittleEndian):
                    return None, f"destination accepts neither {ts} nor Explicit VR Little Endian for {job.sop_class_uid}", None
                if ds.file_meta.TransferSyntaxUID.is_compressed:
                    # Keep the UID: transcoding is not a new instance.
                    ds.decompress(generate_instance_uid=False)
                ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
                ts = ExplicitVRLittleEndian
            rsp = assoc.send_c_store(ds)
        link.last_used = time.monotonic()
        if "Status" not in rsp:
            return None, "no response (association lost or timed out)", ts
        status = int(rsp.Status)
        return status, "" if ok_status(status) else f"status 0x{status:04X} {rsp.get('ErrorComment', '')}".strip(), ts

    def deliver(self, dest: rules.Destination, jobs: list[Job], lane: str | None = None) -> dict[str, int]:
        lane = lane or dest.name
        counts: dict[str, int] = {}

        def done(job: Job, ok: bool, error: str | None, ts: str | None = None) -> None:
            state = self._finish(job, dest, ok, error, ts)
            counts[state] = counts.get(state, 0) + 1
            if not ok:
                log.warning("delivery_failed", destination=dest.name, outbox_id=job.outbox_id, attempt=job.attempts,
                            state=state, error=error)

        try:
            link = self._link(dest, jobs, lane)
        except (ConnectionError, OSError, RuntimeError) as exc:
            for job in jobs:
                done(job, False, str(exc))
            return counts
        for i, job in enumerate(jobs):
            if not link.assoc.is_established:
                for rest in jobs[i:]:
                    done(rest, False, "association lost")
                self.links.pop(lane, None)
                break
            try:
                status, error, ts = self._send(link, job)
            except Exception as exc:  # a file we cannot read or transcode must not stop the queue
                done(job, False, f"{type(exc).__name__}: {exc}")
                continue
            done(job, status is not None and ok_status(status), error or None, ts)
        return counts

    def drain(self, dest: rules.Destination, lane: str, batch: int, budget_s: float) -> dict[str, int]:
        """Claim and send on one association until the queue is empty or the time budget is spent."""
        totals: dict[str, int] = {}
        t0 = time.monotonic()
        while time.monotonic() - t0 < budget_s:
            jobs = self.claim(dest.name, batch, utcnow())
            if not jobs:
                break
            counts = self.deliver(dest, jobs, lane)
            log.info("forwarded", destination=dest.name, lane=lane, **counts)
            for k, v in counts.items():
                totals[k] = totals.get(k, 0) + v
            if set(counts) - {OutboxState.SENT}:
                break  # failures wait for their retry time
        return totals

    def tick(self, ruleset: rules.RuleSet, now: dt.datetime | None = None, batch: int = 16,
             budget_s: float | None = None) -> dict[str, int]:
        """Send what is due to every open destination, on up to max_associations associations each.

        Lanes of all destinations run at once, so a slow or unreachable
        destination does not hold up the others.
        """
        now = now or utcnow()
        budget = budget_s if budget_s is not None else 5 * self.settings.routing.tick_s
        lanes = [
            (dest, f"{dest.name}#{i}")
            for dest in ruleset.destinations if dest.open_at(now)
            for i in range(dest.max_associations)
        ]
        totals: dict[str, int] = {}
        if lanes:
            with ThreadPoolExecutor(max_workers=len(lanes), thread_name_prefix="forward") as pool:
                for counts in pool.map(lambda dl: self.drain(dl[0], dl[1], batch, budget), lanes):
                    for k, v in counts.items():
                        totals[k] = totals.get(k, 0) + v
        self.close_idle()
        return totals
