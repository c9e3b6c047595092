"""The DICOM port's defences (nnrouter.dicom.netguard), inbound TLS and who may query.

Unit tests of the PDU framer and the admission bookkeeping, then real sockets
against a guarded pynetdicom server in this process, then DCMTK (echoscu,
storescu, findscu, with and without TLS) against ``nnrouter serve``.

These tests also pin what netguard relies on in pynetdicom 3.0 (see the
module's docstring): that AssociationSocket reads through the wrapped
socket's ``recv`` (the oversized and trickling P-DATA tests fail otherwise)
and asks a TLS socket's ``pending()`` (the TLS tests fail otherwise).
"""

from __future__ import annotations

import socket
import struct
import subprocess
import time

import pytest
from conftest import needs, tls_files
from pydicom import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import HangingProtocolInformationModelFind, Verification

from nnrouter.core.config import Settings
from nnrouter.dicom import netguard
from nnrouter.dicom.netguard import ConnectionGuard, Limits, PduFramer, Refusal
from nnrouter.testing import peers

LIMITS = Limits(
    first_pdu_timeout_s=1.0,
    pdu_timeout_s=1.5,
    max_associate_pdu=65536,
    max_pdata_pdu=16384 + 1024,
    max_connections_per_host=3,
    max_pending_connections=4,
)


def item(kind: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(payload)) + payload


def associate_rq(called: str = "GUARDED", calling: str = "TESTER") -> bytes:
    app = item(0x10, b"1.2.840.10008.3.1.1.1")
    pc = item(0x20, bytes([1, 0, 0, 0]) + item(0x30, b"1.2.840.10008.1.1") + item(0x40, b"1.2.840.10008.1.2"))
    user = item(0x50, item(0x51, struct.pack(">L", 16384)) + item(0x52, b"1.2.826.0.1.3680043.9.9999.1"))
    body = (
        struct.pack(">HH", 1, 0) + called.ljust(16).encode() + calling.ljust(16).encode() + bytes(32) + app + pc + user
    )
    return struct.pack(">BBL", 1, 0, len(body)) + body


def header(pdu_type: int, length: int) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, length)


# --- the framer -----------------------------------------------------------------


def test_first_pdu_must_be_an_associate_request():
    f = PduFramer(LIMITS, connected_at=0.0)
    problem = f.feed(b"GET / HTTP/1.1\r\n", now=0.1)
    assert isinstance(problem, Refusal) and "first PDU is type 0x47, not an A-ASSOCIATE-RQ" in problem.reason
    assert problem.abort == netguard.ABORT_UNRECOGNISED_PDU


def test_length_is_refused_on_the_header_before_any_body():
    f = PduFramer(LIMITS, connected_at=0.0)
    problem = f.feed(header(0x01, 0xFFFFFFF0), now=0.1)
    assert problem is not None and problem.reason == "PDU type 0x01 announces 4294967280 bytes, limit 65536"
    f = PduFramer(LIMITS, connected_at=0.0)
    rq = associate_rq()
    assert f.feed(rq, now=0.1) is None and f.pdus == 1
    assert f.feed(header(0x04, 16384 + 1024), now=0.2) is None  # our max_pdu, with the slack
    f = PduFramer(LIMITS, connected_at=0.0)
    f.feed(rq, now=0.1)
    problem = f.feed(header(0x04, 16384 + 1025), now=0.2)
    assert problem is not None and problem.reason == "PDU type 0x04 announces 17409 bytes, limit 17408"
    f = PduFramer(LIMITS, connected_at=0.0)
    f.feed(rq, now=0.1)
    assert "unknown PDU type 0x09" in f.feed(header(0x09, 4), now=0.2).reason  # type: ignore[union-attr]
    unlimited = PduFramer(Limits(max_pdata_pdu=None), connected_at=0.0)
    unlimited.feed(rq, now=0.1)
    assert unlimited.feed(header(0x04, 0xFFFFFFF0), now=0.2) is None  # dicom.max_pdu 0: no P-DATA cap


def test_a_trickle_does_not_move_the_deadline():
    f = PduFramer(LIMITS, connected_at=100.0)
    rq = associate_rq()
    assert f.deadline(now=100.5) == 101.0  # the first PDU: from the connect
    for i, b in enumerate(rq[:10]):
        f.feed(bytes([b]), now=100.0 + i * 0.05)
    assert f.deadline(now=100.9) == 101.0
    assert f.feed(rq[10:], now=100.9) is None and f.pdus == 1
    assert f.deadline(now=200.0) == 201.5  # between PDUs: one starting now
    f.feed(header(0x04, 100)[:3], now=200.0)
    f.feed(header(0x04, 100)[3:] + bytes(50), now=201.0)
    assert f.deadline(now=201.4) == 201.5 and f.overdue() == "PDU not complete within 1.5 s"
    f.feed(bytes(50), now=201.4)
    assert not f.in_pdu and f.pdus == 2


def test_chunks_across_pdu_boundaries():
    f = PduFramer(LIMITS, connected_at=0.0)
    release = header(0x05, 4) + bytes(4)
    stream = associate_rq() + header(0x04, 10) + bytes(10) + release + header(0x04, 0)
    for size in (1, 7, 4096):
        f = PduFramer(LIMITS, connected_at=0.0)
        for i in range(0, len(stream), size):
            assert f.feed(stream[i : i + size], now=0.1) is None
        assert f.pdus == 4 and not f.in_pdu


def test_associate_request_is_decoded_before_pynetdicom_sees_it():
    netguard.check_associate_rq(associate_rq())
    broken = bytearray(associate_rq())
    broken[6 + 68 + 2 : 6 + 68 + 4] = b"\xff\xff"  # the application context item claims 65535 bytes
    with pytest.raises(Refusal, match="A-ASSOCIATE-RQ cannot be decoded"):
        netguard.check_associate_rq(bytes(broken))
    # A presentation context without an abstract syntax: pynetdicom 3.0.4 decodes
    # it, then its association thread dies on it and the socket stays open.
    rq = associate_rq()
    at = 74 + 4 + len(b"1.2.840.10008.3.1.1.1")  # after the fixed fields and the application context item
    assert rq[at] == 0x20
    cx = item(0x20, bytes([1, 0, 0, 0]) + item(0x40, b"1.2.840.10008.1.2"))
    body = rq[6:at] + cx + rq[at + 4 + struct.unpack(">H", rq[at + 2 : at + 4])[0] :]
    with pytest.raises(Refusal, match="presentation context 1 has no abstract syntax"):
        netguard.check_associate_rq(struct.pack(">BBL", 1, 0, len(body)) + body)


def test_sweep_closes_what_a_dead_association_thread_left_open():
    import threading
    import weakref

    class Dul:
        killed = False

        def kill_dul(self) -> None:
            self.killed = True

    dead = threading.Thread(target=lambda: None)
    dead.dul = Dul()  # type: ignore[attr-defined]
    dead.start()
    dead.join()
    guard = ConnectionGuard(LIMITS)
    a, b = socket.socketpair()
    try:
        ticket = guard.admit(a, "10.0.3.1")
        assert isinstance(ticket, netguard.Ticket)
        ticket.promote()
        assert guard.sweep() == 0  # no association yet
        ticket.assoc = weakref.ref(dead)
        assert guard.sweep() == 1
        assert dead.dul.killed and a.fileno() == -1 and b.recv(1) == b""  # type: ignore[attr-defined]
        assert guard.counts() == {"pending": 0, "associated": 0}
    finally:
        a.close()
        b.close()


# --- admission ---------------------------------------------------------------------


def test_per_host_cap_and_release():
    guard = ConnectionGuard(LIMITS)
    socks = [socket.socket() for _ in range(5)]
    try:
        tickets = [guard.admit(s, "10.0.0.1") for s in socks[:3]]
        assert all(isinstance(t, netguard.Ticket) for t in tickets)
        refused = guard.admit(socks[3], "10.0.0.1")
        assert refused == "host has 3 connections open (dicom.max_connections_per_host)"
        assert isinstance(guard.admit(socks[4], "10.0.0.2"), netguard.Ticket)  # another host is not affected
        tickets[0].release()  # type: ignore[union-attr]
        tickets[0].release()  # type: ignore[union-attr]  # twice is harmless
        assert isinstance(guard.admit(socks[3], "10.0.0.1"), netguard.Ticket)
    finally:
        for s in socks:
            s.close()


def test_full_pending_pool_closes_its_oldest():
    clock = iter(range(100))
    guard = ConnectionGuard(LIMITS, clock=lambda: float(next(clock)))
    pairs = [socket.socketpair() for _ in range(6)]
    try:
        tickets = [guard.admit(a, f"10.0.1.{i}") for i, (a, _) in enumerate(pairs)]
        assert guard.evicted == 2 and guard.counts() == {"pending": 4, "associated": 0}
        for (a, _), t in zip(pairs[:2], tickets[:2]):
            assert t.released and a.recv(1) == b""  # hung up: its thread wakes at once
        tickets[2].promote()  # type: ignore[union-attr]  # sent its A-ASSOCIATE-RQ: never evicted
        for i in range(3):
            guard.admit(socket.socket(), f"10.0.2.{i}")
        assert not tickets[2].released  # type: ignore[union-attr]
        assert guard.counts()["associated"] == 1
    finally:
        for a, b in pairs:
            a.close()
            b.close()


# --- real sockets against a guarded server ------------------------------------------


@pytest.fixture
def guarded(request):  # type: ignore[no-untyped-def]
    """A pynetdicom C-ECHO SCP behind netguard with one association slot and small limits (or the test's own)."""
    limits = getattr(request, "param", LIMITS)
    ae = AE(ae_title="GUARDED")
    ae.add_supported_context(Verification)
    ae.maximum_associations = 1
    ae.maximum_pdu_size = 16384
    port = peers.free_port()
    server = netguard.run_in_thread(
        netguard.make_server(ae, ("127.0.0.1", port), limits, [(evt.EVT_C_ECHO, lambda e: 0)])
    )
    try:
        yield port, server
    finally:
        server.shutdown()


def _idle(server) -> None:  # type: ignore[no-untyped-def]
    """Until pynetdicom's acceptor threads of released associations are gone (they linger a moment)."""
    deadline = time.monotonic() + 10
    while server.active_associations and time.monotonic() < deadline:
        time.sleep(0.05)


def _connect(port: int, src: str = "127.0.0.1") -> socket.socket:
    s = socket.socket()
    s.bind((src, 0))
    s.settimeout(10)
    s.connect(("127.0.0.1", port))
    return s


def _until_closed(s: socket.socket, within: float = 10) -> tuple[bool, bytes]:
    """(closed by the server within the time, what it sent before)."""
    got = b""
    s.settimeout(within)
    try:
        while True:
            chunk = s.recv(4096)
            if not chunk:
                return True, got
            got += chunk
    except TimeoutError:
        return False, got
    except ConnectionResetError:
        return True, got
    finally:
        s.close()


def _echo(port: int) -> bool:
    ae = AE(ae_title="TESTER")
    ae.add_requested_context(Verification)
    ae.acse_timeout = 5
    assoc = ae.associate("127.0.0.1", port, ae_title="GUARDED")
    if not assoc.is_established:
        return False
    try:
        return int(assoc.send_c_echo().Status) == 0
    finally:
        assoc.release()


def test_silent_connections_hold_no_association_slot(guarded):
    port, _ = guarded
    silent = [_connect(port, f"127.0.8.{i}") for i in range(3)]
    # One association slot, three silent connections: the slot is still free.
    assert _echo(port)
    for s in silent:
        closed, got = _until_closed(s)
        assert closed and got[:1] == b"\x07"  # A-ABORT, then the close, at the first-PDU deadline


@pytest.mark.parametrize("guarded", [Limits(first_pdu_timeout_s=5.0, max_pending_connections=4)], indirect=True)
def test_eviction_keeps_the_door_open(guarded):
    port, server = guarded
    silent = [_connect(port, f"127.0.9.{i}") for i in range(4 + 3)]
    assert _echo(port)  # the pool is full of silent ones: the oldest make room
    assert server.guard.evicted >= 3
    for s in silent:
        assert _until_closed(s)[0]


def test_per_host_cap_on_the_wire(guarded):
    port, _ = guarded
    socks = [_connect(port, "127.0.10.1") for _ in range(LIMITS.max_connections_per_host + 2)]
    # The ones over the cap are closed at once, without a word.
    extra = [_until_closed(s, within=0.8) for s in socks[LIMITS.max_connections_per_host :]]
    assert extra == [(True, b"")] * 2
    assert _echo(port)  # from 127.0.0.1
    for s in socks[: LIMITS.max_connections_per_host]:
        assert _until_closed(s)[0]


def test_trickled_associate_request_is_cut_off(guarded):
    port, _ = guarded
    s = _connect(port, "127.0.11.1")
    rq = associate_rq()
    started = time.monotonic()
    closed = False
    for b in rq:
        try:
            s.sendall(bytes([b]))
            time.sleep(0.3)
        except OSError:
            closed = True
            break
        if time.monotonic() - started > 6:
            break
    assert closed or _until_closed(s, within=1)[0]


def test_garbage_gets_an_abort_and_the_close(guarded):
    port, _ = guarded
    for junk in (b"GET / HTTP/1.1\r\n\r\n", header(0x01, 0xFFFFFFF0), bytes(100), header(0x05, 4) + bytes(4)):
        s = _connect(port, "127.0.12.1")
        s.sendall(junk)
        closed, got = _until_closed(s, within=3)
        assert closed and got[:2] == b"\x07\x00", junk


def _associated(port: int) -> socket.socket:
    s = _connect(port, "127.0.13.1")
    s.sendall(associate_rq())
    rsp = s.recv(4096)
    assert rsp[:1] == b"\x02", rsp
    return s


def test_oversized_p_data_is_refused_on_its_header(guarded):
    port, _ = guarded
    s = _associated(port)
    s.sendall(header(0x04, 0xFFFFFFF0))
    sent = 0
    try:
        for _ in range(200):  # up to 200 MB if nobody stops us
            s.sendall(bytes(1 << 20))
            sent += 1
    except OSError:
        pass
    assert sent < 16, f"{sent} MB were taken in before the close"
    s.close()


def test_trickled_p_data_is_cut_off(guarded):
    port, _ = guarded
    s = _associated(port)
    pdu = header(0x04, 200) + bytes(200)
    started = time.monotonic()
    closed = False
    for b in pdu:
        try:
            s.sendall(bytes([b]))
        except OSError:
            closed = True
            break
        s.settimeout(0.3)
        try:
            data = s.recv(100)
            if not data:
                closed = True
                break
        except TimeoutError:
            pass
        if time.monotonic() - started > 8:
            break
    s.close()
    assert closed


def test_guarded_server_keeps_serving_after_all_that(guarded):
    port, server = guarded
    for junk in (b"\x00", header(0x01, 10)):
        s = _connect(port, "127.0.14.1")
        s.sendall(junk)
        s.close()
    assert _echo(port)
    _idle(server)
    assert _echo(port)


# --- config -------------------------------------------------------------------------


def test_limits_from_settings():
    d = Settings(dicom={"max_pdu": 0, "first_pdu_timeout_s": 3}).dicom
    limits = Limits.from_settings(d)
    assert limits.max_pdata_pdu is None and limits.first_pdu_timeout_s == 3
    assert Limits.from_settings(Settings().dicom).max_pdata_pdu == 131072 + netguard.PDATA_SLACK
    with pytest.raises(Exception, match="require_client_cert needs `ca`"):
        Settings(dicom={"tls": {"cert": "c.pem", "key": "k.pem", "require_client_cert": True}})


# --- TLS, with DCMTK ----------------------------------------------------------------


@needs("openssl", "echoscu", "storescu")
def test_inbound_tls_with_client_certificates(node_factory, tmp_path):
    tls = tls_files(tmp_path / "tls")
    node = node_factory(
        settings={
            "dicom": {
                "tls": {
                    "cert": str(tls["server.pem"]),
                    "key": str(tls["server.key"]),
                    "ca": str(tls["ca.pem"]),
                    "require_client_cert": True,
                }
            }
        }
    ).start()
    client = ["+tls", str(tls["client.key"]), str(tls["client.pem"]), "+cf", str(tls["ca.pem"])]
    res = subprocess.run(
        ["echoscu", "-v", *client, "-aec", node.ae_title, "127.0.0.1", str(node.port)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0 and "Received Echo Response (Success)" in res.stderr, res.stderr
    from nnrouter.testing.synthetic import write_series

    files = write_series(tmp_path / "in", 2, rows=32, columns=32)
    res = peers.storescu(node.port, files, extra=client)
    assert res.returncode == 0 and res.stderr.count("Received Store Response (Success)") == 2, res.stderr[-2000:]
    assert len(list(node.spool.rglob("*.dcm"))) == 2
    # No certificate, though required: refused, and the log says why.
    res = subprocess.run(
        ["echoscu", "+tla", "+cf", str(tls["ca.pem"]), "-aec", node.ae_title, "127.0.0.1", str(node.port)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode != 0
    # Plain DICOM on the TLS port: refused too.
    res = subprocess.run(
        # Long timeouts: the node closes at once; a client that gave up first (CI under load) would leave
        # the node only an unexpected EOF to log, not the reason this test is about.
        ["echoscu", "-to", "30", "-ta", "30", "-aec", node.ae_title, "127.0.0.1", str(node.port)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode != 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        reasons = [
            line for line in node.log_lines() if '"connection_closed"' in line and "TLS handshake failed" in line
        ]
        if len(reasons) >= 2:
            break
        time.sleep(0.2)
    assert any("peer did not return a certificate" in line for line in reasons), reasons
    assert any("wrong version number" in line or "http request" in line for line in reasons), reasons
    # And the node keeps serving TLS.
    res = subprocess.run(
        ["echoscu", *client, "-aec", node.ae_title, "127.0.0.1", str(node.port)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr


@needs("openssl", "echoscu")
def test_inbound_tls_without_client_certificates(node_factory, tmp_path):
    tls = tls_files(tmp_path / "tls")
    node = node_factory(
        settings={"dicom": {"tls": {"cert": str(tls["server.pem"]), "key": str(tls["server.key"])}}}
    ).start()
    res = subprocess.run(
        ["echoscu", "+tla", "+cf", str(tls["ca.pem"]), "-aec", node.ae_title, "127.0.0.1", str(node.port)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr


# --- who may query --------------------------------------------------------------------


def _hp_find(port: int, calling: str) -> list[tuple[int, str | None]]:
    ae = AE(ae_title=calling)
    ae.add_requested_context(HangingProtocolInformationModelFind)
    assoc = ae.associate("127.0.0.1", port, ae_title="NNROUTER")
    assert assoc.is_established
    q = Dataset()
    q.HangingProtocolName = "XR KNEE*"
    try:
        return [
            (int(s.Status), s.get("ErrorComment")) for s, _ in assoc.send_c_find(q, HangingProtocolInformationModelFind)
        ]
    finally:
        assoc.release()


@needs("findscu")
def test_only_declared_peers_may_query(node_factory, tmp_path):
    node = node_factory(
        settings={"dicom": {"query_aes": [{"ae_title": "PACS"}, {"ae_title": "VIEWER", "host": "127.0.0.2"}]}}
    ).start()

    def findscu(calling: str, verbosity: str = "-v") -> subprocess.CompletedProcess:
        return subprocess.run(
            [
                "findscu",
                verbosity,
                "-S",
                "-aet",
                calling,
                "-aec",
                node.ae_title,
                "-k",
                "QueryRetrieveLevel=STUDY",
                "-k",
                "PatientName=*",
                "127.0.0.1",
                str(node.port),
            ],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )

    res = findscu("INTRUDER", "-d")  # DCMTK shows a failure's Error Comment only in its debug output
    assert "DIMSE Status                  : 0x0124: Failure" in res.stderr, res.stderr[-3000:]
    assert "[calling AE INTRUDER is not allowed to query ]" in res.stderr, res.stderr[-3000:]
    assert "Find Response (Pending)" not in res.stderr
    res = findscu("PACS")
    assert res.returncode == 0 and "Final Find Response (Success)" in res.stderr, res.stderr
    # The Hanging Protocol FIND likewise; a host pin that does not match is refused.
    assert _hp_find(node.port, "PACS")[-1][0] == 0x0000
    assert _hp_find(node.port, "VIEWER") == [(0x0124, "calling AE VIEWER is not allowed to query")]
    refused = [line for line in node.log_lines() if '"query_refused"' in line]
    assert len(refused) == 2 and all('"status": "0x0124"' in line for line in refused)
    # C-STORE keeps its accept-any default.
    from nnrouter.testing.synthetic import write_series

    res = peers.storescu(node.port, write_series(tmp_path / "in", 1, rows=32, columns=32), aet="INTRUDER")
    assert res.returncode == 0 and "Received Store Response (Success)" in res.stderr


def test_nobody_may_query_by_default(node_factory):
    node = node_factory().start()
    assert _hp_find(node.port, "VIEWER") == [(0x0124, "calling AE VIEWER is not allowed to query")]
