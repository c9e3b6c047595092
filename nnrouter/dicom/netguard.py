"""Netguard: the DICOM port's defences below the AE check.

Anyone who can reach the port could, with pynetdicom's defaults, lock every
modality out: connections that never speak, or trickle a byte now and then,
each held an association slot (and two threads polling every millisecond)
until the ACSE timeout, or for ever while a PDU was being read; a PDU length
of 4 GB was buffered as announced. This module stops all of that before
pynetdicom sees the connection:

- **admission** (``ConnectionGuard``): a cap per peer host, and a pool of
  connections that have not yet sent their A-ASSOCIATE-RQ; when the pool is
  full the oldest waiting connection is closed to make room, so connections
  that never speak cannot starve a modality that does.
- **the first PDU** (``read_first_pdu``): the TLS handshake (if any) and the
  complete A-ASSOCIATE-RQ must arrive within ``first_pdu_timeout_s`` of the
  connect, no bigger than ``max_associate_pdu``, and decodable. Until then the
  connection is not a pynetdicom association: it holds no slot of
  ``max_associations``. Anything else gets an A-ABORT and the socket closed.
- **every later PDU** (``PduFramer`` inside the socket pynetdicom reads from):
  each PDU must be complete within ``pdu_timeout_s`` of its first byte (a
  trickle does not reset it), a P-DATA-TF no longer than our ``max_pdu``
  (checked on the 6-byte header, before any of the body is read), every other
  PDU no longer than ``max_associate_pdu``, the type a known one. After an
  A-ABORT, sent or owed, the socket is closed.

Plain TCP reads the first PDU with MSG_PEEK (it stays in the kernel for
pynetdicom to read); TLS reads it and hands it back through the socket's
``pending()``, which pynetdicom consults for TLS sockets.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

from pynetdicom import evt
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_RQ
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer
from pynetdicom.utils import make_target

from nnrouter.core import config, logs

if TYPE_CHECKING:
    from pynetdicom import AE

    from nnrouter.core.config import Dicom, DicomTls

log = logs.get("nnrouter.dicom.netguard")

HEADER = 6  # PDU type, reserved, 4-byte length
A_ASSOCIATE_RQ_TYPE = 0x01
P_DATA_TF_TYPE = 0x04
A_ABORT_TYPE = 0x07
KNOWN_TYPES = frozenset(range(0x01, 0x08))
# Peers count a P-DATA-TF against our Maximum Length Received differently
# (some include headers); a little slack costs nothing and refuses no study.
PDATA_SLACK = 1024
# A-ABORT reasons (PS3.8 9.3.8): not specified, unrecognised PDU, invalid PDU parameter value.
ABORT_NOT_SPECIFIED = 0x00
ABORT_UNRECOGNISED_PDU = 0x01
ABORT_INVALID_PARAMETER = 0x06
# How long we try to hand a peer our A-ABORT before closing anyway.
ABORT_SEND_S = 1.0


@dataclass(frozen=True)
class Limits:
    """What a connection may do, from the ``dicom`` settings."""

    first_pdu_timeout_s: float = config.Dicom.model_fields["first_pdu_timeout_s"].default
    pdu_timeout_s: float = config.Dicom.model_fields["pdu_timeout_s"].default
    max_associate_pdu: int = config.Dicom.model_fields["max_associate_pdu"].default
    max_pdata_pdu: int | None = (
        config.Dicom.model_fields["max_pdu"].default + PDATA_SLACK
    )  # None: no limit (dicom.max_pdu 0)
    max_connections_per_host: int = config.Dicom.model_fields["max_connections_per_host"].default  # 0: no cap
    max_pending_connections: int = config.Dicom.model_fields["max_pending_connections"].default

    @classmethod
    def from_settings(cls, d: Dicom) -> Limits:
        return cls(
            first_pdu_timeout_s=d.first_pdu_timeout_s,
            pdu_timeout_s=d.pdu_timeout_s,
            max_associate_pdu=d.max_associate_pdu,
            max_pdata_pdu=d.max_pdu + PDATA_SLACK if d.max_pdu else None,
            max_connections_per_host=d.max_connections_per_host,
            max_pending_connections=d.max_pending_connections,
        )


class Refusal(Exception):
    """Why a connection is closed, and the A-ABORT reason to tell the peer (None: say nothing)."""

    def __init__(self, reason: str, abort: int | None = ABORT_NOT_SPECIFIED, level: str = "warning"):
        super().__init__(reason)
        self.reason = reason
        self.abort = abort
        self.level = level  # of its log line: a port probe that hangs up is no news


# --- the PDU stream -----------------------------------------------------------


def limit_for(pdu_type: int, first: bool, limits: Limits) -> tuple[int | None, str | None]:
    """The largest PDU length allowed for this type here, or why the type itself is refused."""
    if first and pdu_type != A_ASSOCIATE_RQ_TYPE:
        return None, f"first PDU is type 0x{pdu_type:02X}, not an A-ASSOCIATE-RQ"
    if pdu_type not in KNOWN_TYPES:
        return None, f"unknown PDU type 0x{pdu_type:02X}"
    if pdu_type == P_DATA_TF_TYPE:
        return limits.max_pdata_pdu, None
    return limits.max_associate_pdu, None


@dataclass
class PduFramer:
    """Follows the PDU boundaries of what a peer sends, and says when it breaks a limit.

    Fed every chunk as it is read; a PDU's deadline runs from its first byte
    (the first PDU's from the connect), so trickling does not extend it.
    """

    limits: Limits
    connected_at: float
    pdus: int = 0  # complete PDUs seen
    _header: bytearray = field(default_factory=bytearray)
    _body_left: int = 0
    _deadline: float | None = None

    def __post_init__(self) -> None:
        self._deadline = self.connected_at + self.limits.first_pdu_timeout_s

    @property
    def in_pdu(self) -> bool:
        return bool(self._header) or self._body_left > 0

    def deadline(self, now: float) -> float:
        """When the PDU being read (or one starting now) must be complete."""
        if self._deadline is not None:
            return self._deadline
        return now + self.limits.pdu_timeout_s

    def first_pdu_arrived(self, now: float) -> None:
        """The A-ASSOCIATE-RQ is known complete (read ahead): reading it again gets a PDU's usual time."""
        self._deadline = now + self.limits.pdu_timeout_s

    def overdue(self) -> str:
        what = "A-ASSOCIATE-RQ" if self.pdus == 0 else "PDU"
        limit = self.limits.first_pdu_timeout_s if self.pdus == 0 else self.limits.pdu_timeout_s
        got = f", {len(self._header)} of {HEADER} header bytes" if len(self._header) < HEADER else ""
        return f"{what} not complete within {limit:g} s{got}"

    def feed(self, data: bytes, now: float) -> Refusal | None:
        """Account for bytes just read; a Refusal when they break a limit."""
        view = memoryview(data)
        while view:
            if self._deadline is None:  # a new PDU starts with this byte
                self._deadline = now + self.limits.pdu_timeout_s
            if self._body_left == 0:
                take = min(HEADER - len(self._header), len(view))
                self._header += view[:take]
                view = view[take:]
                if len(self._header) < HEADER:
                    break
                pdu_type, _, length = struct.unpack(">BBL", self._header)
                limit, why = limit_for(pdu_type, self.pdus == 0, self.limits)
                if why:
                    return Refusal(why, ABORT_UNRECOGNISED_PDU)
                if limit is not None and length > limit:
                    return Refusal(
                        f"PDU type 0x{pdu_type:02X} announces {length} bytes, limit {limit}", ABORT_INVALID_PARAMETER
                    )
                self._body_left = length
                if length:
                    continue
            else:
                take = min(self._body_left, len(view))
                self._body_left -= take
                view = view[take:]
                if self._body_left:
                    break
            self.pdus += 1
            self._header = bytearray()
            self._deadline = None
        return None


# --- admission ----------------------------------------------------------------


@dataclass(eq=False)
class Ticket:
    """One admitted connection: pending (no A-ASSOCIATE-RQ yet) until promoted."""

    host: str
    guard: ConnectionGuard
    sock: weakref.ref[socket.socket]
    since: float
    pending: bool = True
    released: bool = False
    assoc: weakref.ref[Any] | None = None  # pynetdicom's Association, once it exists

    def promote(self) -> None:
        self.guard._promote(self)

    def rebind(self, sock: socket.socket) -> None:
        """The connection now lives in another socket object (detached, or wrapped in TLS)."""
        self.sock = weakref.ref(sock)

    def release(self) -> None:
        self.guard._release(self)


class ConnectionGuard:
    """Counts connections per host and the pool of pending ones; thread-safe."""

    def __init__(self, limits: Limits, clock: Callable[[], float] = time.monotonic):
        self.limits = limits
        self.clock = clock
        self._lock = threading.Lock()
        self._tickets: list[Ticket] = []
        self.evicted = 0
        self.refused = 0

    def admit(self, sock: socket.socket, host: str) -> Ticket | str:
        """A ticket for a new connection, or why it is refused.

        A full pending pool makes room by closing its oldest member: a
        modality sends its A-ASSOCIATE-RQ within milliseconds, so it is never
        the oldest for long, while a connection that keeps silent is.
        """
        self.sweep()
        victim: Ticket | None = None
        with self._lock:
            cap = self.limits.max_connections_per_host
            if cap and sum(1 for t in self._tickets if t.host == host) >= cap:
                self.refused += 1
                return f"host has {cap} connections open (dicom.max_connections_per_host)"
            pending = [t for t in self._tickets if t.pending]
            if len(pending) >= self.limits.max_pending_connections:
                victim = min(pending, key=lambda t: t.since)
                self._tickets.remove(victim)
                victim.released = True
                self.evicted += 1
            ticket = Ticket(host=host, guard=self, sock=weakref.ref(sock), since=self.clock())
            self._tickets.append(ticket)
        if victim is not None:
            log.warning(
                "connection_evicted",
                peer=victim.host,
                reason="waiting for its A-ASSOCIATE-RQ while the pending pool was full",
            )
            _hang_up(victim.sock())
        return ticket

    def counts(self) -> dict[str, int]:
        with self._lock:
            self._prune()
            return {
                "pending": sum(1 for t in self._tickets if t.pending),
                "associated": sum(1 for t in self._tickets if not t.pending),
            }

    def _prune(self) -> list[Ticket]:
        """Forget connections whose socket is gone; return those pynetdicom left open behind a dead thread.

        A socket collected without our close() (never expected) frees its
        place. An association thread that died (an exception in pynetdicom,
        as a malformed request once caused) leaves its socket open and its
        DUL thread polling for ever: those are closed by the caller.
        """
        alive, orphans = [], []
        for t in self._tickets:
            if t.sock() is None:
                t.released = True
                continue
            alive.append(t)
            if t.assoc is not None:
                a = t.assoc()
                if a is None or (a.ident is not None and not a.is_alive()):
                    orphans.append(t)
        self._tickets = alive
        return orphans

    def sweep(self) -> int:
        """Close what dead association threads left open; how many."""
        with self._lock:
            orphans = self._prune()
        for t in orphans:
            a = t.assoc() if t.assoc is not None else None
            log.warning("connection_closed", peer=t.host, reason="its association thread ended without closing it")
            if a is not None:
                a.dul.kill_dul()
            sock = t.sock()
            _hang_up(sock)
            if sock is not None:
                sock.close()
            t.release()
        return len(orphans)

    def _promote(self, ticket: Ticket) -> None:
        with self._lock:
            ticket.pending = False

    def _release(self, ticket: Ticket) -> None:
        with self._lock:
            if not ticket.released:
                ticket.released = True
                if ticket in self._tickets:
                    self._tickets.remove(ticket)


def _hang_up(sock: socket.socket | None) -> None:
    """Wake whatever thread waits on the socket: its reads return end-of-file."""
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


# --- the sockets pynetdicom reads from -----------------------------------------


class _Guarded:
    """recv/send/close of a socket under a PduFramer: limits, deadlines, close after A-ABORT.

    Until ``_guard`` is called (a TLS socket, while we read its first PDU
    ourselves) it behaves as the plain socket it extends.

    A mixin: mypy does not know the socket class it is mixed into, hence the
    ``type: ignore`` on its ``super()`` calls, socket methods and where it
    passes itself as a socket.
    """

    _framer: PduFramer | None = None
    _peer = ""
    _ticket: Ticket | None = None
    _closing = False
    _replay: bytearray | bytes = b""
    _out_left = 0
    _out_type = 0

    def _guard(self, framer: PduFramer, peer: str, ticket: Ticket | None, replay: bytes = b"") -> None:
        self._framer = framer
        self._peer = peer
        self._ticket = ticket
        self._closing = False
        self._replay = bytearray(replay)
        self._out_left = 0
        if ticket is not None:
            ticket.rebind(self)  # type: ignore[arg-type]

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        bufsize = buflen
        if self._framer is None:
            return super().recv(bufsize, flags)  # type: ignore[misc]
        if self._closing:
            return b""
        if self._replay:
            assert isinstance(self._replay, bytearray)
            data = bytes(self._replay[:bufsize])
            del self._replay[:bufsize]
        else:
            now = time.monotonic()
            remaining = self._framer.deadline(now) - now
            if remaining <= 0:
                return self._refuse(Refusal(self._framer.overdue()))
            try:
                self.settimeout(remaining)  # type: ignore[attr-defined]
                data = super().recv(bufsize, flags)  # type: ignore[misc]
            except TimeoutError:
                return self._refuse(Refusal(self._framer.overdue()))
            finally:
                self._send_mode()
        problem = self._framer.feed(data, time.monotonic())
        if problem is not None:
            return self._refuse(problem)
        return data

    def pending(self) -> int:
        """Bytes readable without waiting: the replayed first PDU, then TLS's own buffer."""
        return len(self._replay) + (super().pending() if isinstance(self, ssl.SSLSocket) else 0)  # type: ignore[misc]

    def send(self, data: Any, flags: int = 0) -> int:
        if self._framer is None:
            return super().send(data, flags)  # type: ignore[misc]
        if self._out_left == 0 and len(data) >= HEADER:
            # pynetdicom hands each encoded PDU to one send loop: its header comes first.
            pdu_type, _, length = struct.unpack(">BBL", bytes(data[:HEADER]))
            self._out_left = HEADER + length
            self._out_type = pdu_type
        sent: int = super().send(data, flags)  # type: ignore[misc]
        self._out_left = max(0, self._out_left - sent)
        if self._out_left == 0 and self._out_type == A_ABORT_TYPE and not self._closing:
            # Our A-ABORT is out: nothing the peer sends now matters (PS3.8 AA-1
            # would wait for it to hang up, up to the ARTIM timeout).
            log.info("connection_closed", peer=self._peer, reason="association aborted", pdus=self._framer.pdus)
            self._closing = True
            _shutdown(self, socket.SHUT_WR)  # type: ignore[arg-type]
        return sent

    def close(self) -> None:
        try:
            super().close()  # type: ignore[misc]
        finally:
            if self._ticket is not None:
                self._ticket.release()

    def _send_mode(self) -> None:
        assert self._framer is not None
        with contextlib.suppress(OSError):
            self.settimeout(self._framer.limits.pdu_timeout_s)  # type: ignore[attr-defined]

    def _refuse(self, problem: Refusal) -> bytes:
        """Tell the peer (A-ABORT), hang up, and show pynetdicom an end of file."""
        assert self._framer is not None
        log.warning("connection_closed", peer=self._peer, reason=problem.reason, pdus=self._framer.pdus)
        self._closing = True
        if problem.abort is not None:
            _send_abort(self, problem.abort)  # type: ignore[arg-type]
        _hang_up(self)  # type: ignore[arg-type]
        return b""


class GuardedSocket(_Guarded, socket.socket):
    """A plain TCP connection under the guard."""


class GuardedTLSSocket(_Guarded, ssl.SSLSocket):
    """A TLS connection under the guard (``SSLContext.sslsocket_class``)."""


def _shutdown(sock: socket.socket, how: int) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(how)


def _send_abort(sock: socket.socket, reason: int) -> None:
    pdu = A_ABORT_RQ()
    pdu.source = 0x02  # service-provider
    pdu.reason_diagnostic = reason
    try:
        sock.settimeout(ABORT_SEND_S)
        sock.sendall(pdu.encode())
    except (OSError, ValueError):
        pass


# --- the first PDU --------------------------------------------------------------


def check_associate_rq(data: bytes) -> None:
    """Refuse an A-ASSOCIATE-RQ that pynetdicom could not turn into a request.

    Decoded here with pynetdicom's own classes, so whatever passes will pass
    there too; one that fails there would leave an association thread waiting
    for a request that never comes.
    """
    try:
        pdu = A_ASSOCIATE_RQ()
        pdu.decode(data)
        request = pdu.to_primitive()
    except Exception as exc:  # any failure is the peer's malformed request
        raise Refusal(f"A-ASSOCIATE-RQ cannot be decoded: {type(exc).__name__}", ABORT_INVALID_PARAMETER) from exc
    # PS3.8 9.3.2: what pynetdicom 3.0's negotiation takes for granted (a
    # context without an abstract syntax kills its association thread).
    problem = None
    if not request.application_context_name:
        problem = "no application context"
    for cx in request.presentation_context_definition_list:
        if cx.abstract_syntax is None:
            problem = f"presentation context {cx.context_id} has no abstract syntax"
        elif not cx.transfer_syntax:
            problem = f"presentation context {cx.context_id} has no transfer syntax"
        elif cx.context_id is None or cx.context_id % 2 == 0:
            problem = f"presentation context ID {cx.context_id} is not odd"
    if problem:
        raise Refusal(f"A-ASSOCIATE-RQ is malformed: {problem}", ABORT_INVALID_PARAMETER)


def _check_header(header: bytes, limits: Limits) -> int:
    pdu_type, _, length = struct.unpack(">BBL", header)
    limit, why = limit_for(pdu_type, True, limits)
    if why:
        raise Refusal(why, ABORT_UNRECOGNISED_PDU)
    if limit is not None and length > limit:
        raise Refusal(f"A-ASSOCIATE-RQ announces {length} bytes, limit {limit}", ABORT_INVALID_PARAMETER)
    return HEADER + length


def _peek(sock: socket.socket, n: int, deadline: float, limits: Limits) -> bytes:
    """Wait until ``n`` bytes are in the kernel's buffer and return them, leaving them there.

    SO_RCVLOWAT makes the kernel wake us only when all of them are there, so a
    trickle costs no CPU; it also grows the receive buffer to fit.
    """
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, n)
    last = -1
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Refusal(f"A-ASSOCIATE-RQ not complete within {limits.first_pdu_timeout_s:g} s")
        sock.settimeout(remaining)
        try:
            data = sock.recv(n, socket.MSG_PEEK)
        except TimeoutError:
            continue
        if len(data) >= n:
            return data
        if not data:
            if last <= 0:
                raise Refusal("peer hung up without sending anything", abort=None, level="debug")
            raise Refusal("peer closed before its A-ASSOCIATE-RQ was complete", abort=None, level="info")
        if len(data) == last:  # the peer hung up mid-PDU (or the kernel woke us early): poll, slowly
            time.sleep(0.05)
        last = len(data)


def _read(sock: socket.socket, n: int, deadline: float, limits: Limits) -> bytes:
    """Read exactly ``n`` bytes by the deadline (a TLS socket: no peeking there)."""
    buf = bytearray()
    while len(buf) < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Refusal(f"A-ASSOCIATE-RQ not complete within {limits.first_pdu_timeout_s:g} s")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(n - len(buf))
        except TimeoutError:
            continue
        if not chunk:
            raise Refusal("peer closed before its A-ASSOCIATE-RQ was complete", abort=None, level="info")
        buf += chunk
    return bytes(buf)


def read_first_pdu(sock: socket.socket, deadline: float, limits: Limits, *, peek: bool) -> bytes:
    """The complete, decodable A-ASSOCIATE-RQ, by the deadline; else a Refusal."""
    get = _peek if peek else _read
    header = get(sock, HEADER, deadline, limits)[:HEADER]
    size = _check_header(header, limits)
    data = get(sock, size, deadline, limits) if peek else header + _read(sock, size - HEADER, deadline, limits)
    check_associate_rq(data[:size])
    if peek:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
    return data[:size]


# --- TLS --------------------------------------------------------------------------


def tls_context(tls: DicomTls) -> ssl.SSLContext:
    """The server side of DICOM TLS (PS3.15 B.9: TLS 1.2 or later), with our socket class."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(tls.cert), str(tls.key))
    if tls.ca is not None:
        ctx.load_verify_locations(cafile=str(tls.ca))
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    ctx.sslsocket_class = GuardedTLSSocket
    return ctx


def _tls_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or str(exc)).replace("_", " ").lower()
        verify = getattr(exc, "verify_message", None)
        return f"TLS handshake failed: {reason}" + (f" ({verify})" if verify else "")
    if isinstance(exc, TimeoutError):
        return "TLS handshake not complete in time"
    return f"TLS handshake failed: {type(exc).__name__}: {exc}"


# --- the server -------------------------------------------------------------------


class GuardedHandler(RequestHandler):
    """Admit, handshake and read the first PDU here, in the connection's own thread; then hand over."""

    server: GuardedServer

    def handle(self) -> None:
        ticket = self.server.take_ticket(self.request)
        host = str(self.client_address[0])
        try:
            conn = self.server.prepare(self.request, host, ticket)
        except BaseException:
            ticket.release()
            raise
        if conn is None:
            ticket.release()
            return
        ticket.promote()
        self.request = conn
        super().handle()  # the Association, as pynetdicom makes it, on our socket


class GuardedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with admission control and a guarded first PDU."""

    daemon_threads = True  # a connection still waiting for its first PDU does not hold up exit

    def __init__(
        self,
        ae: AE,
        address: tuple[str, int],
        ae_title: str,
        contexts: list[Any],
        ssl_context: ssl.SSLContext | None = None,
        evt_handlers: list[Any] | None = None,
        *,
        limits: Limits,
        tls: ssl.SSLContext | None = None,
    ):
        self.limits = limits
        self.tls = tls
        self.guard = ConnectionGuard(limits)
        self._tickets: dict[int, Ticket] = {}
        self._tickets_lock = threading.Lock()
        super().__init__(ae, address, ae_title, contexts, ssl_context, evt_handlers, request_handler=GuardedHandler)
        self.bind(evt.EVT_CONN_OPEN, self._opened)

    @staticmethod
    def _opened(event: evt.Event) -> None:
        """Let the connection's ticket know its Association, for ``ConnectionGuard.sweep``."""
        wrapper = event.assoc.dul.socket
        sock = wrapper.socket if wrapper is not None else None
        if isinstance(sock, _Guarded) and sock._ticket is not None:
            sock._ticket.assoc = weakref.ref(event.assoc)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """socketserver's admission hook, in the accept loop: never blocks."""
        host = str(client_address[0])
        ticket = self.guard.admit(request, host)
        if isinstance(ticket, str):
            log.warning("connection_refused", peer=host, reason=ticket)
            return False  # socketserver closes it
        with self._tickets_lock:
            self._tickets[id(request)] = ticket
        return True

    def take_ticket(self, request: Any) -> Ticket:
        with self._tickets_lock:
            return self._tickets.pop(id(request))

    def prepare(self, sock: socket.socket, host: str, ticket: Ticket) -> socket.socket | None:
        """The connection as a guarded socket once its A-ASSOCIATE-RQ is complete, or None (closed, logged)."""
        connected = ticket.since
        deadline = connected + self.limits.first_pdu_timeout_s
        framer = PduFramer(self.limits, connected_at=connected)
        conn: socket.socket = sock
        try:
            if self.tls is not None:
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                try:
                    conn = self.tls.wrap_socket(sock, server_side=True)
                except (OSError, ValueError) as exc:
                    raise Refusal(_tls_reason(exc), abort=None) from exc
                ticket.rebind(conn)
                first = read_first_pdu(conn, deadline, self.limits, peek=False)
                assert isinstance(conn, GuardedTLSSocket)
                framer.first_pdu_arrived(time.monotonic())
                conn._guard(framer, host, ticket, replay=first)
            else:
                read_first_pdu(sock, deadline, self.limits, peek=True)
                framer.first_pdu_arrived(time.monotonic())
                conn = GuardedSocket(fileno=sock.detach())
                conn._guard(framer, host, ticket)
            conn.settimeout(self.limits.pdu_timeout_s)
            return conn
        except Refusal as why:
            if not ticket.released:  # an evicted connection has had its log line
                getattr(log, why.level)("connection_closed", peer=host, reason=why.reason, pdus=0)
            if why.abort is not None:
                _send_abort(conn, why.abort)
        except OSError as exc:
            if not ticket.released:
                log.info(
                    "connection_closed", peer=host, reason=f"{type(exc).__name__} before the A-ASSOCIATE-RQ", pdus=0
                )
        _hang_up(conn)
        conn.close()
        return None

    def shutdown(self) -> None:
        with contextlib.suppress(ValueError):  # not in ae._servers: we were not started by ae.start_server
            super().shutdown()


def make_server(
    ae: AE,
    address: tuple[str, int],
    limits: Limits,
    evt_handlers: list[Any],
    tls: ssl.SSLContext | None = None,
) -> GuardedServer:
    """Like ``ae.make_server``, with the guard in front (pynetdicom's own TLS wrap is left off:
    it would shake hands in the accept loop, where one silent peer stops every other)."""
    server = ae.make_server(address, evt_handlers=evt_handlers, server_class=GuardedServer, limits=limits, tls=tls)
    return cast(GuardedServer, server)


def run_in_thread(server: GuardedServer) -> GuardedServer:
    """Serve in a daemon thread, as ``ae.start_server(..., block=False)`` does; stop with ``shutdown()``."""
    timestamp = datetime.strftime(datetime.now(), "%Y%m%d%H%M%S")
    thread = threading.Thread(target=make_target(server.serve_forever), name=f"AcceptorServer@{timestamp}", daemon=True)
    thread.start()
    return server
