"""Destinations that go down, refuse, abort or hang, while a healthy one keeps receiving.

(a) A DCMTK storescp is killed (SIGKILL) while a stream of 100 instances is
    being forwarded to it, stays down NNROUTER_FAULT_OUTAGE_S seconds (120 by
    default, as the issue asks), and is started again on the same port: every
    instance arrives, and (nobody crashed on our side) exactly once.
(b) Five destinations side by side, each behind a TCP tap that notes every
    connection (association attempt): one answers 0xA700 (out of resources),
    one 0xC000 (cannot understand), one aborts during each C-STORE
    (storescp --abort-during), one hangs (storescp --sleep-during: the
    association is accepted, the C-STORE never answered), one is healthy.
    The transient ones are retried on their back-off and end dead after the
    policy; the permanent one ends dead after one try; nobody's retries or
    deliveries wait for the hung peer.

Assertions are on counts and order (association attempts, rows' attempts,
what the hung peer's lane had done by the time the others had finished);
latencies and gaps between attempts are recorded as figures. Both tests
together take about four minutes with the default outage.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import os
import socket
import statistics
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest import needs
from dicomfiles import StatusSCP, node_rows
from pydicom import dcmread

from nnrouter.core.store import Instance, Outbox, OutboxState
from nnrouter.testing import peers
from nnrouter.testing.synthetic import write_series

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

OUTAGE_S = float(os.environ.get("NNROUTER_FAULT_OUTAGE_S", "120"))
# The hung peer's timeout; "default" leaves it out of the rule file (30 s).
HANG_TIMEOUT = os.environ.get("NNROUTER_FAULT_HANG_TIMEOUT_S", "20")


def settle(check, timeout: float, every: float = 0.2) -> bool:  # type: ignore[no-untyped-def]
    """Wait until check() is true; False (not a failure) on timeout, so the figures still get recorded."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(every)
    return bool(check())


def outbox(node: peers.Node, destination: str | None = None) -> list[Outbox]:
    return [o for o in node_rows(node, Outbox) if destination is None or o.destination == destination]


def uids_written(folder: Path) -> tuple[list[str], int]:
    """SOP Instance UIDs of the complete files a storescp wrote, one per file; and how many files were cut short."""
    uids, partial = [], 0
    for f in sorted(folder.iterdir()) if folder.exists() else []:
        if not f.is_file():
            continue
        try:
            ds = dcmread(f)
            if len(ds.PixelData) < ds.Rows * ds.Columns * ds.BitsAllocated // 8:
                raise ValueError("short pixel data")
            uids.append(str(ds.SOPInstanceUID))
        except Exception:
            partial += 1
    return uids, partial


def node_for(tmp_path: Path, node_factory, rules: dict) -> peers.Node:  # type: ignore[no-untyped-def]
    rules_file = tmp_path / "routes.yaml"
    rules_file.write_text(yaml.safe_dump(rules, sort_keys=False))
    return node_factory(
        settings={
            "workers": {"count": 1, "max_wait_ms": 0, "poll_ms": 100},
            "routing": {"rules": str(rules_file), "tick_s": 0.3, "idle_close_s": 5},
        }
    ).start()


# --- peers ---------------------------------------------------------------------------------


class Tap:
    """A TCP relay in front of a peer; ``opened`` holds when each connection (association attempt) came."""

    def __init__(self, upstream: int):
        self.upstream = upstream
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.opened: list[float] = []
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.opened.append(time.monotonic())
            try:
                up = socket.create_connection(("127.0.0.1", self.upstream), timeout=5)
                up.settimeout(None)
            except OSError:
                conn.close()
                continue
            self.conns += [conn, up]
            for a, b in ((conn, up), (up, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


def gaps(times: list[float]) -> list[float]:
    return [round(b - a, 2) for a, b in itertools.pairwise(times)]


# --- (a) down two minutes mid-stream --------------------------------------------------------


@needs("storescu", "storescp")
def test_destination_down_mid_stream_gets_everything_exactly_once(node_factory, tmp_path, figures):
    port = peers.free_port()
    folder = tmp_path / "archive"
    # +uf: a file per reception, so a second copy of an instance shows as a second file.
    archive = peers.StoreSCP(folder, aet="ARCHIVE", port=port).start(["+uf"])
    node = node_for(
        tmp_path,
        node_factory,
        {
            "settings": {"quiet_s": 0.5},
            "destinations": [
                {
                    "name": "archive",
                    "ae_title": "ARCHIVE",
                    "host": "127.0.0.1",
                    "port": port,
                    "retry": {"max_retries": 1000, "first_delay_s": 1, "multiplier": 2, "max_delay_s": 5},
                }
            ],
            "rules": [{"name": "everything", "then": {"forward": ["archive"]}}],
        },
    )
    studies = [write_series(tmp_path / f"in{i}", 10, rows=64, columns=64) for i in range(10)]
    spacing = OUTAGE_S / 10  # the stream goes on through the outage
    acknowledged = 0

    def stream() -> None:
        nonlocal acknowledged
        for files in studies:
            res = peers.storescu(node.port, files)
            acknowledged += res.stderr.count("Received Store Response (Success)")
            time.sleep(spacing)

    sender = threading.Thread(target=stream)
    sender.start()
    try:
        # Mid-stream: the second study is being forwarded when the archive dies.
        assert settle(lambda: len(uids_written(folder)[0]) >= 12, timeout=120, every=0.05), "nothing forwarded"
        archive.proc.kill()
        archive.proc.wait()
        killed_at = time.monotonic()
        time.sleep(OUTAGE_S)
        at_restart = sorted(Counter(o.state for o in outbox(node)).items())
        archive = peers.StoreSCP(folder, aet="ARCHIVE", port=port).start(["+uf"])
        up_at, up_wall = time.monotonic(), dt.datetime.now(dt.UTC)
        all_sent = settle(
            lambda: len(outbox(node)) == 100 and all(o.state == OutboxState.SENT for o in outbox(node)), timeout=120
        )
        recovery_s = round(time.monotonic() - up_at, 1)
        sender.join(timeout=120)
        time.sleep(1.0)  # anything still in flight lands
        rows = outbox(node)
        got, partial = uids_written(folder)
        sent = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for fs in studies for f in fs}

        def after_up(pick) -> float | None:  # type: ignore[no-untyped-def]
            times = [
                o.sent_at.replace(tzinfo=dt.UTC)
                for o in rows
                if o.sent_at and o.sent_at.replace(tzinfo=dt.UTC) > up_wall
            ]
            return round((pick(times) - up_wall).total_seconds(), 1) if times else None

        failed_batches = sum(1 for line in node.log_lines() if '"forwarded"' in line and '"failed"' in line)
        figures.add(
            f"destination down {OUTAGE_S:.0f} s mid-stream",
            cases=len(sent),
            acknowledged=acknowledged,
            stored=len(set(got) & sent),
            lost=len(sent - set(got)),
            duplicated=len(got) - len(set(got)),
            partial_files=partial,
            retries=sum(o.attempts for o in rows) - len(rows),
            failed_association_attempts=failed_batches,
            outage_s=round(up_at - killed_at, 1),
            rows_at_restart=at_restart,
            first_sent_after_up_s=after_up(min),
            recovery_s=recovery_s,
        )
        assert acknowledged == 100
        assert all_sent, [(o.state, o.attempts, o.last_error) for o in rows if o.state != OutboxState.SENT][:5]
        assert set(got) == sent  # nothing lost
        assert len(got) == len(set(got))  # and nothing twice: no crash on our side, so no resend of a stored one
        # The retries were paced by the policy (at most one a second at first, then every 5 s), not a busy loop.
        assert failed_batches <= 2 * (OUTAGE_S / 5 + 10)
    finally:
        sender.join(timeout=120)
        archive.stop()


# --- (b) refusing, aborting and hanging peers beside a healthy one -------------------------


@needs("storescu", "storescp")
def test_misbehaving_destinations_back_off_alone(node_factory, tmp_path, figures):
    retry = {"max_retries": 2, "first_delay_s": 1, "multiplier": 2, "max_delay_s": 60}  # tries at 0, +1 s, +2 s: dead
    healthy_scp = peers.StoreSCP(tmp_path / "healthy", aet="PEER").start()
    abort_scp = peers.StoreSCP(tmp_path / "abort", aet="PEER").start(["--abort-during"])
    hang_scp = peers.StoreSCP(tmp_path / "hang", aet="PEER").start(["--sleep-during", "600"])
    full, cannot = StatusSCP(0xA700), StatusSCP(0xC000)
    taps = {"healthy": Tap(healthy_scp.port), "abort": Tap(abort_scp.port), "hang": Tap(hang_scp.port)}
    ports = {
        "healthy": taps["healthy"].port,
        "abort": taps["abort"].port,
        "hang": taps["hang"].port,
        "full": full.port,
        "cannot": cannot.port,
    }
    dests = []
    for name, p in ports.items():
        d = {"name": name, "ae_title": "PEER", "host": "127.0.0.1", "port": p, "retry": retry}
        if name == "hang" and HANG_TIMEOUT != "default":
            d["timeout_s"] = float(HANG_TIMEOUT)
        dests.append(d)
    node = node_for(
        tmp_path,
        node_factory,
        {
            "settings": {"quiet_s": 0.5},
            "destinations": dests,
            "rules": [
                # The second study goes to the healthy peer only, while the hung one is stuck on the first.
                {"name": "late_to_healthy", "when": {"calling_ae": ["LATE"]}, "then": {"forward": ["healthy"]}},
                {"name": "everything", "then": {"forward": list(ports)}},
            ],
        },
    )
    try:
        first = write_series(tmp_path / "first", 3, rows=64, columns=64)
        late = write_series(tmp_path / "late", 3, rows=64, columns=64)
        assert peers.storescu(node.port, first, aet="FIRST").stderr.count("Received Store Response (Success)") == 3
        # The hung peer has taken the first study's association and sits on it.
        assert settle(
            lambda: (
                len(taps["hang"].opened) >= 1 and [o.state for o in outbox(node, "hang")] == [OutboxState.SENDING] * 3
            ),
            timeout=60,
        )
        assert peers.storescu(node.port, late, aet="LATE").stderr.count("Received Store Response (Success)") == 3

        done = {OutboxState.SENT, OutboxState.DEAD}
        others = ("healthy", "full", "cannot", "abort")
        others_done = settle(
            lambda: len(outbox(node, "healthy")) == 6 and all(o.state in done for d in others for o in outbox(node, d)),
            timeout=150,
        )
        # Where the hung peer's lane was when everybody else had finished.
        hang_then = {
            "rows_attempts": sorted({o.attempts for o in outbox(node, "hang")}),
            "connections": len(taps["hang"].opened),
        }
        hang_dead = settle(lambda: all(o.state == OutboxState.DEAD for o in outbox(node, "hang")), timeout=150)

        rows = {d: outbox(node, d) for d in ports}
        instances = {i.id: i for i in node_rows(node, Instance)}
        latency = sorted(
            (o.sent_at - instances[o.instance_id].received_at).total_seconds() for o in rows["healthy"] if o.sent_at
        )
        # From the routing decision (the row's creation) to sent: the forwarder's own share.
        queued = sorted((o.sent_at - o.created_at).total_seconds() for o in rows["healthy"] if o.sent_at)
        healthy_uids, _ = uids_written(healthy_scp.folder)
        full_firsts = [t for t, uid in full.stores if uid == full.stores[0][1]] if full.stores else []

        def states(d: str) -> list[tuple[str, int]]:
            return sorted({(o.state, o.attempts) for o in rows[d]})

        figures.add(
            "healthy destination beside four misbehaving",
            cases=6,
            stored=len(set(healthy_uids)),
            duplicated=len(healthy_uids) - len(set(healthy_uids)),
            receipt_to_sent_p50_s=round(statistics.median(latency), 2) if latency else None,
            receipt_to_sent_max_s=round(max(latency), 2) if latency else None,
            queued_to_sent_p50_s=round(statistics.median(queued), 2) if queued else None,
            queued_to_sent_max_s=round(max(queued), 2) if queued else None,
            hung_peer_when_others_done=hang_then,
        )
        figures.add(
            "destination answers 0xA700",
            cases=3,
            rows=states("full"),
            c_stores=len(full.stores),
            retry_gaps_s=gaps(full_firsts),
        )
        figures.add("destination answers 0xC000", cases=3, rows=states("cannot"), c_stores=len(cannot.stores))
        figures.add(
            "destination aborts during C-STORE",
            cases=3,
            rows=states("abort"),
            association_attempts=len(taps["abort"].opened),
            retry_gaps_s=gaps(taps["abort"].opened),
        )
        figures.add(
            f"destination hangs (timeout {HANG_TIMEOUT} s)",
            cases=3,
            rows=states("hang"),
            association_attempts=len(taps["hang"].opened),
            gaps_s=gaps(taps["hang"].opened),
        )

        assert others_done, {d: states(d) for d in others}
        # Nobody waited for the hung peer: all that happened within its first attempt.
        assert hang_then == {"rows_attempts": [1], "connections": 1}, hang_then
        assert sorted(healthy_uids) == sorted(
            {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in first + late}
        )
        assert states("healthy") == [(OutboxState.SENT, 1)]
        # Transient: 1 + max_retries tries each, then dead, with the reason; never sooner than the back-off.
        assert states("full") == [(OutboxState.DEAD, 3)] and len(full.stores) == 9
        assert all("0xA700" in o.last_error for o in rows["full"])
        assert [g >= d for g, d in zip(gaps(full_firsts), (1, 2))] == [True, True]
        assert states("abort") == [(OutboxState.DEAD, 3)]
        assert len(taps["abort"].opened) == 3  # one association per try for the whole batch: no busy loop
        assert [g >= d for g, d in zip(gaps(taps["abort"].opened), (1, 2))] == [True, True]
        assert hang_dead and states("hang") == [(OutboxState.DEAD, 3)]
        assert len(taps["hang"].opened) == 3
        # Permanent: dead after one try, the status kept.
        assert states("cannot") == [(OutboxState.DEAD, 1)] and len(cannot.stores) == 3
        assert all(o.last_error.startswith("permanent, not retried: status 0xC000") for o in rows["cannot"])
    finally:
        for t in taps.values():
            t.stop()
        for s in (healthy_scp, abort_scp, hang_scp):
            s.stop()
        full.stop()
        cannot.stop()
