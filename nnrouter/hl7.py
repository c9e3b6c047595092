"""HL7 v2 orders over MLLP: ORM^O01 and OMI^O23 in, an ACK out.

Many RIS never run a Modality Worklist for a router to query; they push every
order to whoever listens on an MLLP port. nnrouter listens, turns each order
into the same ``Order`` the worklist and the images give, and acknowledges it
only once the caller has kept it: an AE tells the RIS to send it again rather
than lose it.

Field positions follow HL7 v2.3-2.5 and the IHE Scheduled Workflow habits
for ORM (accession number in OBR-18, requested procedure ID in OBR-19,
Study Instance UID in a ZDS segment); OMI carries them in IPC. Whatever
separators MSH-1/MSH-2 declare are honoured, so no site has to reconfigure
its interface engine for us.
"""

from __future__ import annotations

import re
import socket
import socketserver
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable

from nnrouter import logs
from nnrouter.codes import Code
from nnrouter.laterality import laterality_from_text
from nnrouter.orders import Order, OrderSource

__all__ = ["HL7Error", "MLLPServer", "ack", "parse", "parse_all", "send"]

log = logs.get("nnrouter.hl7")

START = b"\x0b"  # VT
END = b"\x1c"  # FS, followed by CR on the wire
MAX_MESSAGE = 1 << 20  # bytes; an order is a few KiB, anything near this is not one

SUPPORTED = frozenset({("ORM", "O01"), ("OMI", "O23")})

# HL7 table 0357 (message error condition codes) for the ERR segment.
_CONDITIONS = {
    "100": "Segment sequence error",
    "101": "Required field missing",
    "102": "Data type error",
    "200": "Unsupported message type",
    "207": "Application internal error",
}

# HL7 table 0211 (MSH-18) to Python codecs. Without MSH-18 the standard says
# ASCII; in practice it is UTF-8 or Latin-1, tried in that order.
_CHARSETS = {
    "ASCII": "ascii",
    "8859/1": "latin-1", "8859/2": "iso8859-2", "8859/3": "iso8859-3", "8859/4": "iso8859-4",
    "8859/5": "iso8859-5", "8859/6": "iso8859-6", "8859/7": "iso8859-7", "8859/8": "iso8859-8",
    "8859/9": "iso8859-9", "8859/15": "iso8859-15",
    "UNICODE UTF-8": "utf-8", "UNICODE": "utf-8",
}

# OBR-24 holds an HL7 diagnostic service section (table 0074), not a DICOM
# modality. The ones that are DICOM terms pass; the few that name one modality
# are mapped; "RAD" or "RX" could be CR or DX and give no modality rather
# than a wrong one the mismatch check would trip on.
_DICOM_MODALITIES = frozenset(
    "CR DX CT MR US NM PT XA RF MG IO PX OT ES XC OP SM BMD DG IVUS OCT".split()
)
_SECTIONS = {"NMR": "MR", "NMS": "NM", "VUS": "US", "OUS": "US", "CUS": "US"}

# HL7 table 0495 (body site modifier) codes for a side.
_SITE_MODIFIERS = frozenset({"L", "R", "B"})


class HL7Error(Exception):
    """A message nnrouter will not take, with the ACK code the sender gets.

    AR: the message itself is unacceptable (no MSH, a type we do not handle,
    too big), resending it will not help. AE: it is an order message but an
    order in it is incomplete, or nnrouter could not keep it.
    ``condition`` is the HL7 table 0357 code for the ERR segment.
    """

    def __init__(self, ack_code: str, text: str, condition: str = "207"):
        super().__init__(f"{ack_code}: {text}")
        self.ack_code = ack_code
        self.text = text
        self.condition = condition


# --- reading ------------------------------------------------------------------


@dataclass(frozen=True)
class _Encoding:
    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"

    @classmethod
    def from_msh(cls, segment: str) -> _Encoding:
        if len(segment) < 5 or not segment.startswith("MSH"):
            raise HL7Error("AR", "MSH segment too short to declare its separators", "102")
        fs = segment[3]
        chars = segment[4:].split(fs, 1)[0]
        enc = cls(fs, *(list(chars[:4]) + [""] * (4 - len(chars[:4]))))
        used = [c for c in (enc.field, enc.component, enc.repetition, enc.escape, enc.subcomponent) if c]
        if not chars or len(set(used)) != len(used) or any(c.isalnum() or c.isspace() for c in used):
            raise HL7Error("AR", "MSH-1/MSH-2 declare unusable separators", "102")
        return enc

    def unescape(self, value: str) -> str:
        e = self.escape
        if not e or e not in value:
            return value
        out: list[str] = []
        i = 0
        while i < len(value):
            if value[i] != e:
                out.append(value[i])
                i += 1
                continue
            j = value.find(e, i + 1)
            if j < 0:  # unterminated: the rest is literal
                out.append(value[i:])
                break
            out.append(self._sequence(value[i + 1 : j]))
            i = j + 1
        return "".join(out)

    def _sequence(self, seq: str) -> str:
        simple = {"F": self.field, "S": self.component, "T": self.subcomponent,
                  "R": self.repetition, "E": self.escape}
        if seq in simple:
            return simple[seq]
        if seq.startswith("X") and len(seq) > 1 and len(seq) % 2 == 1:
            try:
                return bytes.fromhex(seq[1:]).decode("latin-1")
            except ValueError:
                pass
        if seq == ".br":
            return "\n"
        if seq in ("H", "N") or seq.startswith("."):  # highlighting and formatting
            return ""
        return self.escape + seq + self.escape  # unknown: as sent

    def escaped(self, text: str) -> str:
        """Text made safe to put in a field: separators escaped, line breaks as \\.br\\."""
        e = self.escape or "\\"
        table = {e: f"{e}E{e}", self.field: f"{e}F{e}", self.component: f"{e}S{e}",
                 "\r": f"{e}.br{e}", "\n": f"{e}.br{e}"}
        if self.repetition:
            table[self.repetition] = f"{e}R{e}"
        if self.subcomponent:
            table[self.subcomponent] = f"{e}T{e}"
        return "".join(table.get(c, c) for c in text)


@dataclass
class _Segment:
    name: str
    fields: list[str]  # fields[n] is SEG-n, raw (escaped); for MSH fields[1] is MSH-1
    enc: _Encoding

    def repetitions(self, n: int) -> list[str]:
        raw = self.fields[n] if n < len(self.fields) else ""
        return raw.split(self.enc.repetition) if self.enc.repetition else [raw]

    def value(self, n: int, component: int = 1, sub: int = 1, rep: int = 0) -> str:
        """One leaf value, unescaped; "" when absent. HL7's null ("") reads as absent."""
        reps = self.repetitions(n)
        if rep >= len(reps):
            return ""
        comps = reps[rep].split(self.enc.component)
        if component > len(comps):
            return ""
        subs = comps[component - 1].split(self.enc.subcomponent) if self.enc.subcomponent else [comps[component - 1]]
        if sub > len(subs):
            return ""
        v = self.enc.unescape(subs[sub - 1]).strip()
        return "" if v == '""' else v

    def leaves(self, n: int) -> list[str]:
        """Every non-empty leaf value of a field, all repetitions and components."""
        out = []
        for rep in self.repetitions(n):
            for comp in rep.split(self.enc.component):
                for sub in comp.split(self.enc.subcomponent) if self.enc.subcomponent else [comp]:
                    v = self.enc.unescape(sub).strip()
                    if v and v != '""':
                        out.append(v)
        return out


@dataclass
class _Message:
    enc: _Encoding
    segments: list[_Segment]
    codec: str  # how the bytes were decoded, and how the ACK goes back

    @property
    def msh(self) -> _Segment:
        return self.segments[0]

    @property
    def type(self) -> tuple[str, str]:
        return self.msh.value(9, 1).upper(), self.msh.value(9, 2).upper()

    @property
    def type_text(self) -> str:
        kind, trigger = self.type
        return f"{kind}^{trigger}" if trigger else kind

    @property
    def control_id(self) -> str:
        return self.msh.value(10)

    @classmethod
    def read(cls, message: bytes | str) -> _Message:
        text, codec = _decode(message)
        lines = [line for line in re.split(r"\r\n|\r|\n", text) if line.strip()]
        if not lines or not lines[0].lstrip().startswith("MSH"):
            raise HL7Error("AR", "no MSH segment at the start of the message", "100")
        lines[0] = lines[0].lstrip()
        enc = _Encoding.from_msh(lines[0])
        segments = []
        for i, line in enumerate(lines):
            parts = line.split(enc.field)
            if i == 0:
                parts = ["MSH", enc.field, *parts[1:]]
            segments.append(_Segment(parts[0].strip().upper(), parts, enc))
        return cls(enc, segments, codec)


def _decode(message: bytes | str) -> tuple[str, str]:
    if isinstance(message, str):
        return message, "utf-8"
    head = message[:4096].decode("latin-1").lstrip()
    charset = ""
    if head.startswith("MSH") and len(head) > 3:
        msh = re.split(r"\r|\n", head, maxsplit=1)[0].split(head[3])
        if len(msh) > 17 and len(msh[1]) > 1:  # MSH-18 is msh[17]: MSH-1 is the separator itself
            charset = msh[17].split(msh[1][1])[0].split(msh[1][0])[0].strip().upper()
    codec = _CHARSETS.get(charset)
    if codec:
        return message.decode(codec, errors="replace"), codec
    try:
        return message.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return message.decode("latin-1"), "latin-1"


# --- orders -------------------------------------------------------------------


@dataclass
class _Group:
    orc: _Segment
    pid: _Segment | None
    obr: _Segment | None = None
    others: dict[str, _Segment] = field(default_factory=dict)  # first TQ1, IPC, ZDS


def parse(message: bytes | str) -> Order:
    """The one order in an ORM^O01 or OMI^O23 message; HL7Error if there is not exactly one."""
    orders = parse_all(message)
    if len(orders) > 1:
        raise HL7Error("AE", f"message holds {len(orders)} orders, expected one", "100")
    return orders[0]


def parse_all(message: bytes | str) -> list[Order]:
    """Every order in an ORM^O01 or OMI^O23 message, one per ORC/OBR pair.

    A message may order several procedures; dropping all but the first would
    lose orders the RIS believes delivered.
    """
    return _orders(_Message.read(message))


def _orders(msg: _Message) -> list[Order]:
    if msg.type not in SUPPORTED:
        raise HL7Error("AR", f"unsupported message type {msg.type_text or '(empty MSH-9)'}", "200")
    groups: list[_Group] = []
    pid: _Segment | None = None
    current: _Group | None = None
    for seg in msg.segments[1:]:
        if seg.name == "PID":
            pid = seg
        elif seg.name == "ORC":
            current = _Group(seg, pid)
            groups.append(current)
        elif seg.name == "OBR":
            if current is None:
                raise HL7Error("AE", "missing ORC segment before an OBR segment", "100")
            if current.obr is not None:  # a second OBR under one ORC: a second order
                current = _Group(current.orc, pid)
                groups.append(current)
            current.obr = seg
        elif current is not None and seg.name in ("TQ1", "IPC", "ZDS"):
            current.others.setdefault(seg.name, seg)
    if not groups:
        raise HL7Error("AE", "missing ORC segment: the message holds no order", "100")
    for n, group in enumerate(groups, 1):
        if group.obr is None:
            raise HL7Error("AE", f"missing OBR segment for order {n} (ORC without OBR)", "100")
        if not group.orc.value(1):
            raise HL7Error("AE", f"ORC-1 order control is empty in order {n}", "101")
    return [_order(msg, g) for g in groups]


def _order(msg: _Message, g: _Group) -> Order:
    orc, obr = g.orc, g.obr
    assert obr is not None
    ipc, tq1, zds = g.others.get("IPC"), g.others.get("TQ1"), g.others.get("ZDS")

    def ipc_value(n: int) -> str:
        return ipc.value(n) if ipc else ""

    # OBR-4: identifier^text^coding system, then the alternate code. HL7's
    # coding system "LN" is DICOM's designator for LOINC too; local systems
    # ("L", "99XYZ") are kept as sent, for rules that know them.
    codes = tuple(
        Code(obr.value(4, base), obr.value(4, base + 2), obr.value(4, base + 1))
        for base in (1, 4)
        if obr.value(4, base)
    )
    description = obr.value(4, 2) or obr.value(4, 5) or None
    patient_id, patient_name = _patient(g.pid)
    return Order(
        source=OrderSource.HL7,
        accession_number=ipc_value(1) or obr.value(18) or None,
        study_uid=ipc_value(3) or (zds.value(1) if zds else "") or None,
        requested_procedure_id=ipc_value(2) or obr.value(19) or None,
        placer_order_number=orc.value(2) or obr.value(2) or None,
        filler_order_number=orc.value(3) or obr.value(3) or None,
        codes=codes,
        description=description,
        laterality=laterality_from_text(description) or _modifier_side(obr),
        modality=ipc_value(5).upper() or _modality(obr.value(24)),
        control=orc.value(1).upper(),
        scheduled_at=(tq1.value(7) if tq1 else "") or obr.value(27, 4) or orc.value(7, 4) or None,
        patient_id=patient_id,
        patient_name=patient_name,
        extra={
            "message_type": msg.type_text,
            "control_id": msg.control_id,
            "sending_application": msg.msh.value(3),
            "sending_facility": msg.msh.value(4),
            "scheduled_procedure_step_id": ipc_value(4) or obr.value(20) or None,
        },
    )


def _patient(pid: _Segment | None) -> tuple[str | None, str | None]:
    """PID-3 and PID-5, the name in DICOM PN component order so it compares with the images'."""
    if pid is None:
        return None, None
    ids = [(pid.value(3, 1, rep=r), pid.value(3, 5, rep=r).upper()) for r in range(len(pid.repetitions(3)))]
    # PID-3 repeats (MRN, national ID, ...); the medical record number is the one images carry.
    patient_id = next((i for i, kind in ids if i and kind in ("MR", "PI")), None) or next((i for i, _ in ids if i), None)
    # XPN: family^given^middle^suffix^prefix; DICOM PN: family^given^middle^prefix^suffix.
    family, given, middle, suffix, prefix = (pid.value(5, c) for c in range(1, 6))
    name = "^".join((family, given, middle, prefix, suffix)).rstrip("^")
    return patient_id, name or None


def _modifier_side(obr: _Segment) -> str | None:
    """Laterality from OBR-15 (specimen source: body site modifier) or OBR-46 (supplemental service info)."""
    for code in [obr.value(15, 5, 1)] + [obr.value(46, 1, rep=r) for r in range(len(obr.repetitions(46)))]:
        if code.upper() in _SITE_MODIFIERS:
            return code.upper()
    return laterality_from_text(" ".join(obr.leaves(15) + obr.leaves(46)))


def _modality(section: str) -> str | None:
    section = section.upper()
    if section in _DICOM_MODALITIES:
        return section
    return _SECTIONS.get(section)


# --- acknowledging ------------------------------------------------------------


def ack(message: bytes | str, code: str, text: str = "", *, condition: str | None = None) -> bytes:
    """The ACK for a message: MSH back to its sender, MSA, and ERR unless AA.

    Works on messages ``parse`` refused too (a sender must get an AR for a
    message without MSH rather than silence); the reply then has empty
    addressing fields and default separators.
    """
    if code not in ("AA", "AE", "AR"):
        raise ValueError(f"ACK code must be AA, AE or AR, not {code!r}")
    try:
        msg: _Message | None = _Message.read(message)
    except HL7Error:
        msg = None
    return _ack(msg, code, text, condition)


def _ack(msg: _Message | None, code: str, text: str, condition: str | None) -> bytes:
    enc = msg.enc if msg else _Encoding()
    fs, cs, ss = enc.field, enc.component, enc.subcomponent or enc.component

    def raw(n: int) -> str:  # a field as the sender wrote it (escapes and components kept)
        return msg.msh.fields[n] if msg and n < len(msg.msh.fields) else ""

    version = raw(12) or "2.5"
    trigger = msg.type[1] if msg else ""
    encoding_chars = enc.component + enc.repetition + enc.escape + enc.subcomponent
    msh = [
        "MSH", encoding_chars, raw(5), raw(6), raw(3), raw(4),
        datetime.now().astimezone().strftime("%Y%m%d%H%M%S%z"), "",
        f"ACK{cs}{trigger}{cs}ACK" if trigger else "ACK",
        uuid.uuid4().hex[:20], raw(11) or "P", version,
    ]
    if raw(18):
        msh += ["", "", "", "", "", raw(18)]
    esc_text = enc.escaped(text)
    segments = [fs.join(msh), fs.join(["MSA", code, enc.escaped(msg.control_id) if msg else "", enc.escaped(text[:80])])]
    if code != "AA":
        cond = condition or "207"
        cond_text = enc.escaped(_CONDITIONS.get(cond, ""))
        if _version(msg.msh.value(12) if msg else version) >= (2, 5):
            segments.append(fs.join(["ERR", "", "", f"{cond}{cs}{cond_text}{cs}HL70357", "E", "", "", "", esc_text]))
        else:  # ERR-1 (ELD): segment^sequence^field^code, the code's parts as subcomponents
            segments.append(fs.join(["ERR", f"{cs}{cs}{cs}{cond}{ss}{esc_text}{ss}HL70357"]))
    return ("\r".join(segments) + "\r").encode(msg.codec if msg else "utf-8", errors="replace")


def _version(text: str) -> tuple[int, ...]:
    nums = []
    for part in text.split("."):
        if not part.isdigit():
            break
        nums.append(int(part))
    return tuple(nums)


# --- MLLP ---------------------------------------------------------------------


class _Frames:
    """Cuts a byte stream into MLLP frames (VT ... FS CR), holding at most ``limit`` bytes of one.

    An oversized frame is read to its end and dropped, keeping its start so
    the AR can still be addressed from its MSH; the connection stays usable.
    Bytes between frames (the CR after FS, stray line noise) are skipped.
    """

    _HEAD = 64 * 1024

    def __init__(self, limit: int = MAX_MESSAGE):
        self.limit = limit
        self.inside = False
        self.buf = bytearray()
        self.size = 0

    def feed(self, data: bytes) -> list[tuple[bytes, bool]]:
        """Complete frames in ``data`` as (payload, oversized)."""
        out = []
        i = 0
        while i < len(data):
            if not self.inside:
                j = data.find(START, i)
                if j < 0:
                    break
                self.inside, self.size = True, 0
                self.buf.clear()
                i = j + 1
                continue
            end, restart = data.find(END, i), data.find(START, i)
            if restart >= 0 and (end < 0 or restart < end):  # a new frame before this one ended: drop it
                self.inside = False
                i = restart
                continue
            stop = len(data) if end < 0 else end
            self.size += stop - i
            room = (self._HEAD if self.size > self.limit else self.limit) - len(self.buf)
            self.buf += data[i : i + max(0, min(room, stop - i))]
            if self.size > self.limit:
                del self.buf[self._HEAD :]
            if end < 0:
                break
            out.append((bytes(self.buf), self.size > self.limit))
            self.inside = False
            i = end + 1
        return out


class MLLPServer:
    """Listens for HL7 orders over MLLP; ``on_order`` is called for each, from connection threads.

    ``on_order`` must be thread-safe: each connection has a thread. The ACK
    says AA only after it returned; if it raises, the sender gets AE with the
    error text and will resend, so a store that is down loses nothing.
    """

    def __init__(
        self,
        bind: str,
        port: int,
        on_order: Callable[[Order], None],
        *,
        max_message: int = MAX_MESSAGE,
        idle_timeout: float = 300.0,
    ):
        self.bind = bind
        self.on_order = on_order
        self.max_message = max_message
        self.idle_timeout = idle_timeout
        self._port = port
        self._server: _TCPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._server.server_address[1] if self._server else self._port

    def start(self) -> MLLPServer:
        self._server = _TCPServer((self.bind, self._port), _Connection, self)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name=f"mllp-{self.port}", daemon=True)
        self._thread.start()
        log.info("mllp_listening", bind=self.bind, port=self.port)
        return self

    def stop(self) -> None:
        """Stop accepting, close open connections, and wait for orders being handled to finish."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.close_connections()
        server.server_close()  # joins connection threads
        if self._thread:
            self._thread.join(10)
        log.info("mllp_stopped", port=server.server_address[1])

    def __enter__(self) -> MLLPServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _reply(self, payload: bytes, oversized: bool, peer: str) -> bytes:
        """One framed message in, its ACK out."""
        msg: _Message | None = None
        orders: list[Order] = []
        code, text, condition, reason = "AA", "", None, None
        try:
            try:
                msg = _Message.read(payload)  # of an oversized one, its start: enough to address the AR
            except HL7Error:
                if not oversized:
                    raise
            if oversized:
                raise HL7Error("AR", f"message larger than {self.max_message} bytes", "207")
            assert msg is not None
            orders = _orders(msg)
        except HL7Error as exc:
            # Our own texts name segments and fields, never their values: fine to log.
            code, text, condition, reason = exc.ack_code, exc.text, exc.condition, exc.text
        else:
            try:
                for order in orders:
                    self.on_order(order)
            except Exception as exc:  # noqa: BLE001 - any failure to keep it is an AE
                code, text, condition = "AE", _short(exc), "207"
                # The text may quote order values (a database error echoes its parameters): debug only.
                reason = f"order not kept ({type(exc).__name__})"
                log.debug("order_not_kept", error=str(exc), exc_info=True)
        log.info(
            "hl7_message",
            peer=peer,
            message_type=msg.type_text if msg else None,
            control_id=msg.control_id if msg else None,
            orders=len(orders),
            ack=code,
            reason=reason,
        )
        return _ack(msg, code, text, condition)


def _short(exc: Exception) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return text[:200]


class _TCPServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = False
    block_on_close = True

    def __init__(self, address: tuple[str, int], handler: type, owner: MLLPServer):
        self.owner = owner
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._closing = False
        super().__init__(address, handler)

    def track(self, sock: socket.socket) -> bool:
        with self._lock:
            if self._closing:
                return False
            self._open.add(sock)
            return True

    def untrack(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.discard(sock)

    def close_connections(self) -> None:
        with self._lock:
            self._closing = True
            for sock in self._open:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class _Connection(socketserver.BaseRequestHandler):
    server: _TCPServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        if not self.server.track(sock):
            return
        owner = self.server.owner
        peer = self.client_address[0]
        frames = _Frames(owner.max_message)
        sock.settimeout(owner.idle_timeout)
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    return
                for payload, oversized in frames.feed(data):
                    reply = owner._reply(payload, oversized, peer)
                    sock.sendall(START + reply + END + b"\r")
        except TimeoutError:
            log.debug("mllp_idle_close", peer=peer)
        except OSError as exc:
            log.debug("mllp_connection_lost", peer=peer, error=str(exc))
        finally:
            self.server.untrack(sock)


def send(host: str, port: int, message: bytes | str, timeout: float = 30.0) -> bytes:
    """Send one message over MLLP and return the reply (the ACK, without framing).

    Line ends are made CR, HL7's segment terminator, so a message kept in a
    text file goes out as a RIS would send it. Raises OSError (TimeoutError,
    ConnectionError) when the peer is down, silent or hangs up.
    """
    data = message.encode("utf-8") if isinstance(message, str) else message
    data = re.sub(rb"\r\n|\n", b"\r", data).rstrip(b"\r") + b"\r"
    deadline = time.monotonic() + timeout
    frames = _Frames(MAX_MESSAGE)
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(START + data + END + b"\r")
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no reply from {host}:{port} within {timeout} s")
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                raise TimeoutError(f"no reply from {host}:{port} within {timeout} s") from None
            if not chunk:
                raise ConnectionError(f"{host}:{port} closed the connection without a reply")
            got = frames.feed(chunk)
            if got:
                return got[0][0]
