"""The forwarder: which failures are retried, and lanes that never wait for one another.

The peers are real sockets on loopback: pynetdicom SCPs that answer a chosen
status, and a listener that accepts and never speaks (a hung PACS).
"""

from __future__ import annotations

import hashlib
import socket
import threading
from pathlib import Path

import pytest
from dicomfiles import StatusSCP, wait_for
from pydicom import dcmread
from pynetdicom import StoragePresentationContexts
from pynetdicom.sop_class import CTImageStorage

from nnrouter.core.config import Settings
from nnrouter.core.store import Instance, Outbox, OutboxState, Series, Store, Study
from nnrouter.routing import rules
from nnrouter.routing.forward import Forwarder, ok_status, permanent_status
from nnrouter.testing.synthetic import write_series


@pytest.mark.parametrize(
    "status, kind",
    [
        (0x0000, "sent"),
        (0x0001, "sent"),
        (0xB000, "sent"),
        (0xB007, "sent"),
        (0x0107, "sent"),
        (0x0116, "sent"),
        (0xA700, "transient"),
        (0xA701, "transient"),
        (0xA7FF, "transient"),
        (0x0110, "transient"),
        (0x0213, "transient"),
        (0x0210, "transient"),
        (0xA801, "transient"),
        (0xFFFF, "transient"),
        (0xC000, "permanent"),
        (0xC001, "permanent"),
        (0xCFFF, "permanent"),
        (0xA900, "permanent"),
        (0xA9FF, "permanent"),
        (0x0117, "permanent"),
        (0x0122, "permanent"),
        (0x0124, "permanent"),
        (0x0211, "permanent"),
        (0x0212, "permanent"),
    ],
)
def test_status_classes(status, kind):
    got = "sent" if ok_status(status) else "permanent" if permanent_status(status) else "transient"
    assert got == kind, f"0x{status:04X}"


# --- peers -------------------------------------------------------------------


class Mute:
    """Accepts TCP connections and never says a word: a PACS that hangs."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            self.conns.append(conn)

    def stop(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


# --- a store with instances queued for destinations ---------------------------


def queued_store(tmp_path: Path, files: list[Path], destinations: list[str]) -> Store:
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    store.upgrade()
    return queue(store, files, destinations)


def queue(store: Store, files: list[Path], destinations: list[str]) -> Store:
    """Rows for ``files`` as if received and decoded, each with an outbox row per destination."""
    first = dcmread(files[0], stop_before_pixels=True)
    with store.write() as s:
        study = Study(study_uid=str(first.StudyInstanceUID))
        series = Series(study=study, series_uid=str(first.SeriesInstanceUID), modality="DX")
        s.add_all([study, series])
        for f in files:
            ds = dcmread(f, stop_before_pixels=True)
            inst = Instance(
                series=series,
                sop_instance_uid=str(ds.SOPInstanceUID),
                sop_class_uid=str(ds.SOPClassUID),
                transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                path=str(f),
                size_bytes=f.stat().st_size,
                sha256=hashlib.sha256(f.read_bytes()).hexdigest(),
                state="decoded",
            )
            s.add(inst)
            for d in destinations:
                s.add(Outbox(instance=inst, destination=d, rule="all"))
    return store


def ruleset(dests: dict[str, dict]) -> rules.RuleSet:
    return rules.RuleSet.model_validate(
        {
            "destinations": [{"name": n, "ae_title": "PEER", "host": "127.0.0.1", **d} for n, d in dests.items()],
            "rules": [{"name": "all", "then": {"forward": list(dests)}}],
        }
    )


def rows(store: Store, destination: str) -> list[Outbox]:
    from sqlalchemy import select

    with store.read() as s:
        return list(s.execute(select(Outbox).where(Outbox.destination == destination).order_by(Outbox.id)).scalars())


class Ticking:
    """Call the forwarder's tick every 0.1 s on a thread of its own, as the router's scheduler does."""

    def __init__(self, fwd: Forwarder, rs: rules.RuleSet):
        self.stop = threading.Event()
        self.ticks = 0

        def loop() -> None:
            while not self.stop.is_set():
                fwd.tick(rs)
                self.ticks += 1
                self.stop.wait(0.1)

        self.thread = threading.Thread(target=loop, daemon=True)
        self.thread.start()


def test_a_hung_destination_delays_no_other_and_permanent_failures_end_at_once(tmp_path):
    files = write_series(tmp_path / "in", 2, rows=32, columns=32)
    healthy, full, cannot = StatusSCP(), StatusSCP(0xA700), StatusSCP(0xC000)
    picky = StatusSCP(contexts=[c for c in StoragePresentationContexts if c.abstract_syntax == CTImageStorage])
    mute = Mute()
    retry = {"max_retries": 2, "first_delay_s": 0.3, "multiplier": 2, "max_delay_s": 5}
    rs = ruleset(
        {
            "hung": {"port": mute.port, "timeout_s": 20, "retry": retry},
            "healthy": {"port": healthy.port, "retry": retry},
            "full": {"port": full.port, "retry": retry},
            "cannot": {"port": cannot.port, "retry": retry},
            "picky": {"port": picky.port, "retry": retry},
        }
    )
    store = queued_store(tmp_path, files, [d.name for d in rs.destinations])
    fwd = Forwarder(Settings(routing={"tick_s": 0.1}), store)
    ticking = Ticking(fwd, rs)
    try:
        done = {OutboxState.SENT, OutboxState.DEAD}
        wait_for(
            lambda: (
                all(r.state in done for d in ("healthy", "full", "cannot", "picky") for r in rows(store, d))
                or {d: [(r.state, r.attempts) for r in rows(store, d)] for d in ("healthy", "full", "cannot", "picky")}
            ),
            timeout=60,
            every=0.1,
        )
        # All of that happened inside the hung peer's first attempt: nobody waited for it.
        assert [(r.state, r.attempts) for r in rows(store, "hung")] == [(OutboxState.SENDING, 1)] * 2
        assert mute.accepted == 1
        assert ticking.ticks > 1  # the tick hands out work and returns; it never waits for a lane

        assert [r.state for r in rows(store, "healthy")] == [OutboxState.SENT] * 2
        # Out of resources: tried 1 + max_retries times, then dead, each retry after its back-off.
        assert [(r.state, r.attempts) for r in rows(store, "full")] == [(OutboxState.DEAD, 3)] * 2
        assert all("0xA700" in r.last_error and "gave up after 3 attempts" in r.last_error for r in rows(store, "full"))
        assert len(full.stores) == 6
        firsts = [t for i, (t, _) in enumerate(full.stores) if i % 2 == 0]
        # Never sooner than the policy says (0.3 s, then 0.6 s), counted from the failure.
        assert [b - a >= d for a, b, d in zip(firsts, firsts[1:], (0.3, 0.6))] == [True, True], firsts
        # Cannot understand: dead after one try, the reason kept.
        assert [(r.state, r.attempts) for r in rows(store, "cannot")] == [(OutboxState.DEAD, 1)] * 2
        assert all(r.last_error.startswith("permanent, not retried: status 0xC000") for r in rows(store, "cannot"))
        assert len(cannot.stores) == 2
        # SOP class refused, no fallback: dead after one association attempt.
        assert [(r.state, r.attempts) for r in rows(store, "picky")] == [(OutboxState.DEAD, 1)] * 2
        assert all("accepted none of the presentation contexts" in r.last_error for r in rows(store, "picky"))
        assert picky.associations == 1 and picky.stores == []
    finally:
        ticking.stop.set()
        ticking.thread.join(30)
        lanes = list(fwd.lanes.values())
        mute.stop()  # the hung attempt ends now, so closing is quick
        fwd.close(timeout_s=10)
        for p in (healthy, full, cannot, picky):
            p.stop()
        store.dispose()
    assert not any(lane.thread.is_alive() for lane in lanes)


def test_closing_puts_back_what_was_not_tried(tmp_path):
    files = write_series(tmp_path / "in", 5, rows=32, columns=32)
    slow = StatusSCP(pause_s=0.5)
    rs = ruleset({"slow": {"port": slow.port}})
    store = queued_store(tmp_path, files, ["slow"])
    fwd = Forwarder(Settings(routing={"tick_s": 0.1}), store)
    try:
        fwd.tick(rs)
        wait_for(lambda: len(slow.stores) >= 1 or "no store yet", timeout=30, every=0.05)
        fwd.close(timeout_s=10)
        got = [(r.state, r.attempts) for r in rows(store, "slow")]
        sent = sum(1 for s, _ in got if s == OutboxState.SENT)
        assert 1 <= sent < 5, got
        # The rest are back in the queue, due, with no attempt counted against them.
        assert got[sent:] == [(OutboxState.PENDING, 0)] * (5 - sent)
    finally:
        slow.stop()
        store.dispose()


def test_lanes_follow_the_rules(tmp_path):
    files = write_series(tmp_path / "in", 1, rows=32, columns=32)
    peer = StatusSCP()
    store = queued_store(tmp_path, files, ["a"])
    fwd = Forwarder(Settings(routing={"tick_s": 0.1}), store)
    try:
        assert fwd.tick(ruleset({"a": {"port": peer.port, "max_associations": 3}}))["lanes"] == 3
        wait_for(lambda: [r.state for r in rows(store, "a")] == [OutboxState.SENT] or "not sent", timeout=30, every=0.1)
        old = list(fwd.lanes.values())
        assert fwd.tick(ruleset({"b": {"port": peer.port}})) == {"lanes": 1, "started": 1, "stopped": 3}
        for lane in old:
            lane.thread.join(5)
            assert not lane.thread.is_alive()
    finally:
        fwd.close()
        peer.stop()
        store.dispose()
