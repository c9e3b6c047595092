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

import contextlib
import ipaddress
import re
import select
import socket
import socketserver
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Self

import hl7 as hl7v2  # python-hl7 ships no type information (ignore_missing_imports in pyproject.toml)

from nnrouter.core import logs
from nnrouter.core.codes import Code
from nnrouter.core.config import Hl7
from nnrouter.orders.laterality import laterality_from_text
from nnrouter.orders.order import Order, OrderSource

__all__ = ["HL7Error", "Limits", "MLLPServer", "ack", "parse", "parse_all", "send"]

log = logs.get("nnrouter.orders.hl7")

START = b"\x0b"  # VT
END = b"\x1c"  # FS, followed by CR on the wire
# The orders.hl7 section's defaults, which are also those of a listener or client made without it: one home.
_DEFAULTS = Hl7.model_validate({})
MAX_MESSAGE = _DEFAULTS.max_message_bytes  # bytes; an order is a few KiB, anything near this is not one

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
    "8859/1": "latin-1",
    "8859/2": "iso8859-2",
    "8859/3": "iso8859-3",
    "8859/4": "iso8859-4",
    "8859/5": "iso8859-5",
    "8859/6": "iso8859-6",
    "8859/7": "iso8859-7",
    "8859/8": "iso8859-8",
    "8859/9": "iso8859-9",
    "8859/15": "iso8859-15",
    "UNICODE UTF-8": "utf-8",
    "UNICODE": "utf-8",
}

# OBR-24 holds an HL7 diagnostic service section (table 0074), not a DICOM
# modality. The ones that are DICOM terms pass; the few that name one modality
# are mapped; "RAD" or "RX" could be CR or DX and give no modality rather
# than a wrong one the mismatch check would trip on.
_DICOM_MODALITIES = frozenset(
    [
        "CR",
        "DX",
        "CT",
        "MR",
        "US",
        "NM",
        "PT",
        "XA",
        "RF",
        "MG",
        "IO",
        "PX",
        "OT",
        "ES",
        "XC",
        "OP",
        "SM",
        "BMD",
        "DG",
        "IVUS",
        "OCT",
    ]
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
#
# python-hl7 splits the message into segments, fields, repetitions, components
# and subcomponents, and escapes the ACK's texts. What it does not do is kept
# here: checking the separators MSH-1/MSH-2 declare (it takes any), the
# character set of MSH-18 (it takes one codec from the caller), and reading
# escape sequences. Its unescape drops what it does not know ("\Left" with no
# closing escape, a \Z..\ of the sender's own) and so loses text such as a
# side; it fails on "\.sp x\"; and it logs the field it could not read, which
# may hold the patient's name, to a logger nnrouter's log receives. Ours
# keeps what it does not know as sent.


@dataclass(frozen=True)
class _Encoding:
    """The separators a message declares; "" for one it does not (then nothing splits on it)."""

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

    def _complete(self, text: str, escape: str | None = None) -> tuple[str, str, str, str]:
        """Component, repetition, escape, subcomponent for python-hl7, which assumes HL7's default for any not declared.

        A character found nowhere in ``text`` stands in for each undeclared
        one, so that, as the sender meant, nothing splits on it.
        """
        spare = (c for c in map(chr, range(0xE000, 0xF900)) if c not in text)  # Unicode private use
        return (
            self.component or next(spare),
            self.repetition or next(spare),
            (escape if escape is not None else self.escape) or next(spare),
            self.subcomponent or next(spare),
        )

    def header(self, msh: str, text: str) -> str:
        """The MSH line of ``text`` with every separator declared (stand-ins from ``_complete``), for python-hl7 to split on."""
        rest = msh[4:].split(self.field, 1)
        return "MSH" + self.field + "".join(self._complete(text)) + self.field + (rest[1] if len(rest) > 1 else "")

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
        simple = {"F": self.field, "S": self.component, "T": self.subcomponent, "R": self.repetition, "E": self.escape}
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
        """Text made safe to put in a field of the ACK, by python-hl7: separators escaped, line breaks as \\.br\\.

        Before it sees the text, line ends become CR and other control
        characters blanks (it would write LF or TAB as a malformed \\X 9\\).
        Characters outside ASCII are kept as they are: python-hl7 writes the
        code point as \\Xhh\\, a byte, wrong in a UTF-8 message; the ACK goes
        back in the message's own character set, which carries them.
        """
        clean = "".join(c if c >= " " or c == "\r" else " " for c in re.sub(r"\r\n|\n", "\r", text))
        comp, rep, esc, sub = self._complete(clean, escape=self.escape or "\\")
        container = hl7v2.Message(separators="\r" + self.field + rep + comp + sub, esc=esc)
        return "".join(
            part if len(part) == 1 and part > "~" else container.escape(part)
            for part in re.split(r"([^\r -~])", clean)
            if part
        )


@dataclass
class _Segment:
    name: str
    tree: Any  # a python-hl7 Segment: tree[n] is SEG-n (for MSH, tree[1] is MSH-1, the field separator itself)
    enc: _Encoding

    def raw(self, n: int) -> str:
        """Field ``n`` as the sender wrote it (escapes and components kept); "" when absent."""
        return str(self.tree[n]) if 0 < n < len(self.tree) else ""

    def repetitions(self, n: int) -> int:
        return len(self.tree[n]) if 0 < n < len(self.tree) else 1

    def _leaf(self, n: int, rep: int, component: int, sub: int) -> str:
        """One leaf as sent. python-hl7 nests only as deep as the separators found: "A" is a bare string, "A^B" has components."""
        if not 0 < n < len(self.tree):
            return ""
        node: Any = self.tree[n]
        path = (rep, component - 1, sub - 1)
        for depth, i in enumerate(path):
            if isinstance(node, str):  # the value ends here: only the first of each deeper level is it
                return node if not any(path[depth:]) else ""
            if i >= len(node):
                return ""
            node = node[i]
        return str(node)

    def value(self, n: int, component: int = 1, sub: int = 1, rep: int = 0) -> str:
        """One leaf value, unescaped; "" when absent. HL7's null ("") reads as absent."""
        v = _text(self.enc.unescape(self._leaf(n, rep, component, sub)))
        return "" if v == '""' else v

    def leaves(self, n: int) -> list[str]:
        """Every non-empty leaf value of a field, all repetitions and components."""
        out: list[str] = []
        todo: list[Any] = [self.tree[n]] if 0 < n < len(self.tree) else []
        while todo:
            node = todo.pop(0)
            if isinstance(node, str):
                v = _text(self.enc.unescape(node))
                if v and v != '""':
                    out.append(v)
            else:
                todo[:0] = list(node)
        return out


def _text(value: str) -> str:
    """A field value as text: no NUL (raw, or from a \\X00\\ escape), which no HL7 text holds and PostgreSQL refuses.

    Kept, an order with a NUL in the patient's name could never be stored,
    and the RIS would resend it for ever on AE.
    """
    return value.replace("\x00", "").strip()


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
        enc = _Encoding.from_msh(lines[0].lstrip())
        lines[0] = enc.header(lines[0].lstrip(), text)
        tree = hl7v2.parse("\r".join(lines))
        return cls(enc, [_Segment(str(seg[0]).strip().upper(), seg, enc) for seg in tree], codec)


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
    ids = [(pid.value(3, 1, rep=r), pid.value(3, 5, rep=r).upper()) for r in range(pid.repetitions(3))]
    # PID-3 repeats (MRN, national ID, ...); the medical record number is the one images carry.
    patient_id = next((i for i, kind in ids if i and kind in ("MR", "PI")), None) or next(
        (i for i, _ in ids if i), None
    )
    # XPN: family^given^middle^suffix^prefix; DICOM PN: family^given^middle^prefix^suffix.
    family, given, middle, suffix, prefix = (pid.value(5, c) for c in range(1, 6))
    name = f"{family}^{given}^{middle}^{prefix}^{suffix}".rstrip("^")
    return patient_id, name or None


def _modifier_side(obr: _Segment) -> str | None:
    """Laterality from OBR-15 (specimen source: body site modifier) or OBR-46 (supplemental service info)."""
    for code in [obr.value(15, 5, 1)] + [obr.value(46, 1, rep=r) for r in range(obr.repetitions(46))]:
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
        return msg.msh.raw(n) if msg else ""

    version = raw(12) or "2.5"
    trigger = msg.type[1] if msg else ""
    encoding_chars = enc.component + enc.repetition + enc.escape + enc.subcomponent
    msh = [
        "MSH",
        encoding_chars,
        raw(5),
        raw(6),
        raw(3),
        raw(4),
        datetime.now().astimezone().strftime("%Y%m%d%H%M%S%z"),
        "",
        f"ACK{cs}{trigger}{cs}ACK" if trigger else "ACK",
        uuid.uuid4().hex[:20],
        raw(11) or "P",
        version,
    ]
    if raw(18):
        msh += ["", "", "", "", "", raw(18)]
    esc_text = enc.escaped(text)
    segments = [
        fs.join(msh),
        fs.join(["MSA", code, enc.escaped(msg.control_id) if msg else "", enc.escaped(text[:80])]),
    ]
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

# Bytes outside any frame that are not line noise (CR, LF, blanks): a few are
# skipped, more mean the peer does not speak MLLP and the connection is closed.
_BLANK = b"\r\n\t "
JUNK_LIMIT = 4096


@dataclass(frozen=True)
class Limits:
    """What the MLLP listener lets a peer do (the ``orders.hl7`` section, read once).

    An HL7 order wins over what the images say, so who may send one matters
    as much as who may send images; and a peer that opens connections and
    never finishes a message must not lock the RIS out. Every connection
    costs a thread and at most ``max_message`` bytes of buffer.
    """

    # Addresses, networks (10.1.2.0/24) or host names (resolved once, at
    # start); empty: loopback only, so a listener nobody configured takes
    # orders from this machine alone.
    allowed_hosts: tuple[str, ...] = tuple(_DEFAULTS.allowed_hosts)
    max_connections: int = _DEFAULTS.max_connections
    max_connections_per_host: int = _DEFAULTS.max_connections_per_host
    # From connect, or from the last answered message, to the next message's first byte.
    idle_timeout_s: float = _DEFAULTS.idle_timeout_s
    # From a message's first byte to its end block; also for the peer to take our ACK.
    message_timeout_s: float = _DEFAULTS.message_timeout_s
    max_message: int = MAX_MESSAGE

    @classmethod
    def from_config(cls, cfg: Hl7) -> Limits:
        return cls(
            allowed_hosts=tuple(cfg.allowed_hosts),
            max_connections=cfg.max_connections,
            max_connections_per_host=cfg.max_connections_per_host,
            idle_timeout_s=cfg.idle_timeout_s,
            message_timeout_s=cfg.message_timeout_s,
            max_message=cfg.max_message_bytes,
        )


_LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


class _Allowed:
    """The peer addresses that may connect; host names are resolved once, when the listener starts."""

    def __init__(self, entries: tuple[str, ...]):
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = [] if entries else list(_LOOPBACK)
        self.unresolved: list[str] = []
        for entry in entries:
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
                continue
            except ValueError:
                pass
            try:
                infos = socket.getaddrinfo(entry, None, type=socket.SOCK_STREAM)
            except OSError:
                self.unresolved.append(entry)
                continue
            for info in infos:
                self.networks.append(ipaddress.ip_network(str(info[4][0]).split("%")[0]))

    def __contains__(self, host: str) -> bool:
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self.networks)


class _Warnings:
    """At most one warning line per (event, peer, reason) every ``every_s``, saying how many were folded in.

    A refused host that reconnects in a loop must not fill the disk with
    log lines; the first one, and a count, are what an admin needs.
    """

    def __init__(self, every_s: float = 10.0):
        self.every_s = every_s
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, str, str], tuple[float, int]] = {}

    def warn(self, event: str, peer: str, reason: str, **fields: object) -> None:
        now = time.monotonic()
        key = (event, peer, reason)
        with self._lock:
            last, folded = self._seen.get(key, (None, 0))
            if last is not None and now - last < self.every_s:
                self._seen[key] = (last, folded + 1)
                return
            if len(self._seen) > 10_000:  # a scan from many addresses: forget, stay bounded
                self._seen.clear()
            self._seen[key] = (now, 0)
        log.warning(event, peer=peer, reason=reason, suppressed=folded, **fields)


@dataclass(frozen=True)
class Frame:
    """One MLLP frame's payload; ``problem`` is "oversized" or "interrupted" when it is not a whole message."""

    payload: bytes
    problem: str | None = None


class _Frames:
    """Cuts a byte stream into MLLP frames (VT ... FS CR), holding at most ``limit`` bytes of one.

    An oversized frame is read to its end and dropped, keeping its start so
    the AR can still be addressed from its MSH; the connection stays usable.
    A frame cut short by a new start block is answered too (its start is
    kept, the new frame is read on; an empty one is noise). Bytes between frames are skipped and
    counted in ``junk`` (line ends and blanks are not), so the caller can
    close a connection that sends no framing at all.
    """

    _HEAD = 64 * 1024

    def __init__(self, limit: int = MAX_MESSAGE):
        self.limit = limit
        self.inside = False
        self.buf = bytearray()
        self.size = 0
        self.junk = 0

    @property
    def pending(self) -> bool:
        """Bytes of a message (or junk) have come that no answered frame accounts for yet."""
        return self.inside or self.junk > 0

    def feed(self, data: bytes) -> list[Frame]:
        """The frames completed by ``data``."""
        out: list[Frame] = []
        i, n = 0, len(data)
        while i < n:
            if not self.inside:
                j = data.find(START, i)
                self.junk += len(data[i : n if j < 0 else j].translate(None, _BLANK))
                if j < 0:
                    break
                self.inside, self.size, self.junk = True, 0, 0
                self.buf.clear()
                i = j + 1
                continue
            end, restart = data.find(END, i), data.find(START, i)
            if restart >= 0 and (end < 0 or restart < end):  # a new frame before this one ended
                self._take(data, i, restart)
                if self.buf.strip(_BLANK):  # a doubled start block is line noise, not a message
                    out.append(Frame(bytes(self.buf), "interrupted"))
                self.inside = False
                i = restart
                continue
            stop = n if end < 0 else end
            self._take(data, i, stop)
            if end < 0:
                break
            out.append(Frame(bytes(self.buf), "oversized" if self.size > self.limit else None))
            self.inside = False
            i = end + 1
        return out

    def _take(self, data: bytes, i: int, stop: int) -> None:
        self.size += stop - i
        room = (self._HEAD if self.size > self.limit else self.limit) - len(self.buf)
        if room > 0:
            self.buf += data[i : i + min(room, stop - i)]
        if self.size > self.limit:
            del self.buf[self._HEAD :]


def _clip(value: str | None, n: int = 64) -> str | None:
    """A value from the peer, short enough for a log line."""
    return value if value is None or len(value) <= n else value[:n] + "..."


class MLLPServer:
    """Listens for HL7 orders over MLLP; ``on_order`` is called for each, from connection threads.

    ``on_order`` must be thread-safe: each connection has a thread. The ACK
    says AA only after it returned; if it raises, the sender gets AE and will
    resend, so a store that is down loses nothing. Peers not allowed, and
    connections over the caps, are closed at once with a warning line (peer
    address and reason, nothing from the messages).
    """

    def __init__(self, bind: str, port: int, on_order: Callable[[Order], None], *, limits: Limits | None = None):
        self.bind = bind
        self.on_order = on_order
        self.limits = limits or Limits()
        self.allowed = _Allowed(())
        self.warnings = _Warnings()
        self._port = port
        self._server: _TCPServer | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def from_config(cls, cfg: Hl7, on_order: Callable[[Order], None]) -> MLLPServer:
        return cls(cfg.bind, cfg.port, on_order, limits=Limits.from_config(cfg))

    @property
    def port(self) -> int:
        return self._server.server_address[1] if self._server else self._port

    def start(self) -> Self:
        self.allowed = _Allowed(self.limits.allowed_hosts)
        for name in self.allowed.unresolved:
            log.warning("mllp_allowed_host_unresolved", host=name, reason="cannot resolve the name; it is not allowed")
        self._server = _TCPServer((self.bind, self._port), _Connection, self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.2}, name=f"mllp-{self.port}", daemon=True
        )
        self._thread.start()
        lim = self.limits
        log.info(
            "mllp_listening",
            bind=self.bind,
            port=self.port,
            allowed_hosts=list(lim.allowed_hosts) or "loopback only",
            max_connections=lim.max_connections,
            max_connections_per_host=lim.max_connections_per_host,
            idle_timeout_s=lim.idle_timeout_s,
            message_timeout_s=lim.message_timeout_s,
            max_message_bytes=lim.max_message,
        )
        if not lim.allowed_hosts and not _is_loopback(self.bind):
            log.warning(
                "mllp_loopback_only",
                bind=self.bind,
                reason="orders.hl7.allowed_hosts is empty: only this machine may send orders",
            )
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

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _reply(self, frame: Frame, peer: str) -> bytes:
        """One frame in, its ACK out; never raises for what the peer sent."""
        msg: _Message | None = None
        orders: list[Order] = []
        code, text, condition, reason = "AA", "", None, None
        try:
            try:
                msg = _Message.read(frame.payload)  # of a frame cut short, its start: enough to address the AR
            except HL7Error:
                if frame.problem is None:
                    raise
            if frame.problem == "oversized":
                raise HL7Error("AR", f"message larger than {self.limits.max_message} bytes", "207")
            if frame.problem == "interrupted":
                raise HL7Error(
                    "AR", "MLLP frame cut short: a start block (0x0B) came before its end block (0x1C)", "207"
                )
            assert msg is not None
            orders = _orders(msg)
        except HL7Error as exc:
            # Our own texts name segments and fields, never their values: fine to log.
            code, text, condition, reason = exc.ack_code, exc.text, exc.condition, exc.text
        except Exception as exc:  # a reader bug must cost one AE, not the connection
            code, text, condition = "AE", "message could not be read (internal error)", "207"
            reason = f"reader failed ({type(exc).__name__})"
            log.debug("hl7_read_failed", exc_info=True)
        else:
            try:
                for order in orders:
                    self.on_order(order)
            except Exception as exc:  # any failure to keep it is an AE
                # Not the exception's text: a database error quotes the values it
                # was given (patient name and ID among them), and the RIS shows ACK
                # texts to its users. The type says enough to resend; the log has more.
                code, text, condition = "AE", f"order not kept ({type(exc).__name__}); send it again", "207"
                reason = f"order not kept ({type(exc).__name__})"
                log.debug("order_not_kept", error=str(exc), exc_info=True)
        log.info(
            "hl7_message",
            peer=peer,
            message_type=_clip(msg.type_text) if msg else None,
            control_id=_clip(msg.control_id) if msg else None,
            orders=len(orders),
            ack=code,
            reason=_clip(reason, 200),
        )
        try:
            return _ack(msg, code, text, condition)
        except Exception:  # an MSH we cannot echo: answer unaddressed
            log.debug("hl7_ack_failed", exc_info=True)
            return _ack(None, code, text, condition)


def _is_loopback(bind: str) -> bool:
    try:
        return ipaddress.ip_address(bind).is_loopback
    except ValueError:
        return bind == "localhost"


class _TCPServer(socketserver.ThreadingTCPServer):
    """Admits a connection (allow list, caps) before it gets a thread; counts it until it closes."""

    allow_reuse_address = True
    daemon_threads = False
    block_on_close = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], handler: type, owner: MLLPServer):
        self.owner = owner
        self._lock = threading.Lock()
        self._open: dict[socket.socket, str] = {}
        self._per_host: Counter[str] = Counter()
        self._closing = False
        super().__init__(address, handler)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        host = str(client_address[0])
        reason = self._admit(request, host)
        if reason is None:
            return True
        if reason:
            self.owner.warnings.warn("mllp_refused", host, reason)
        return False

    def _admit(self, sock: socket.socket, host: str) -> str | None:
        """None when admitted; else why not ("" when stopping: nothing to warn about)."""
        lim = self.owner.limits
        if host not in self.owner.allowed:
            return "peer address not in orders.hl7.allowed_hosts"
        with self._lock:
            if self._closing:
                return ""
            if len(self._open) >= lim.max_connections:
                return f"{lim.max_connections} connections open (orders.hl7.max_connections)"
            if (
                self._per_host[host] >= lim.max_connections_per_host
                and self._live(host) >= lim.max_connections_per_host
            ):
                return f"{lim.max_connections_per_host} connections open from this host (orders.hl7.max_connections_per_host)"
            self._open[sock] = host
            self._per_host[host] += 1
        return None

    def _live(self, host: str) -> int:
        """Connections from ``host`` whose peer has not hung up (under the lock).

        A RIS that sends each message on a new connection closes the last one
        a moment before our thread notices; such a connection holds no slot.
        """
        live = 0
        for sock, h in self._open.items():
            if h != host:
                continue
            try:
                # select first: with a timeout set, recv would wait for data, MSG_DONTWAIT or not.
                readable, _, _ = select.select([sock], [], [], 0)
                gone = bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
            except (OSError, ValueError):  # ValueError: already closed (fileno -1)
                gone = True
            live += not gone
        return live

    def shutdown_request(self, request: Any) -> None:
        with self._lock:
            host = self._open.pop(request, None)
            if host is not None:
                self._per_host[host] -= 1
                if self._per_host[host] <= 0:
                    del self._per_host[host]
        super().shutdown_request(request)

    def open_connections(self) -> int:
        with self._lock:
            return len(self._open)

    def close_connections(self) -> None:
        with self._lock:
            self._closing = True
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


class _Connection(socketserver.BaseRequestHandler):
    """One peer: frames in, ACKs out, under the idle and per-message deadlines."""

    server: _TCPServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        owner = self.server.owner
        lim = owner.limits
        peer = str(self.client_address[0])
        frames = _Frames(lim.max_message)
        last = time.monotonic()  # connected, or the last message answered
        begun: float | None = None  # when the message being read began
        try:
            while True:
                deadline = last + lim.idle_timeout_s if begun is None else begun + lim.message_timeout_s
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                sock.settimeout(left)
                data = sock.recv(65536)
                if not data:
                    return
                got = frames.feed(data)
                for frame in got:
                    reply = owner._reply(frame, peer)
                    sock.settimeout(lim.message_timeout_s)
                    try:
                        sock.sendall(START + reply + END + b"\r")
                    except TimeoutError:
                        owner.warnings.warn("mllp_closed", peer, f"ACK not taken within {lim.message_timeout_s:g} s")
                        return
                if frames.junk > JUNK_LIMIT:
                    owner.warnings.warn(
                        "mllp_closed", peer, f"over {JUNK_LIMIT} bytes outside MLLP frames (no start block 0x0B)"
                    )
                    return
                if got:
                    last = time.monotonic()
                    begun = last if frames.pending else None
                elif frames.pending and begun is None:
                    begun = time.monotonic()
        except TimeoutError:
            if begun is None:
                log.debug("mllp_idle_close", peer=peer, idle_timeout_s=lim.idle_timeout_s)
            else:
                owner.warnings.warn("mllp_closed", peer, f"message not complete within {lim.message_timeout_s:g} s")
        except OSError as exc:
            log.debug("mllp_connection_lost", peer=peer, error=str(exc))


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
                return got[0].payload
