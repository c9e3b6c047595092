"""HL7 v2 orders: parsing ORM^O01 / OMI^O23, and the MLLP listener over real loopback sockets."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest
import structlog

from nnrouter.core import codes
from nnrouter.core.codes import Code
from nnrouter.orders import hl7
from nnrouter.orders.laterality import laterality_from_text
from nnrouter.orders.order import Order, OrderSource

# Procedure codes as the view table has them: an order for these expects that view.
KNEE_LATERAL = codes.classes()["knee_lateral"].order_codes[0].value
CHEST_PA = codes.classes()["chest_pa_ap"].order_codes[0].value

ORM_KNEE = (
    "\r".join(
        [
            "MSH|^~\\&|RIS|GENHOSP|NNROUTER|RADIOLOGY|20240501083000||ORM^O01|MSG00001|P|2.3.1",
            "PID|1||123456^^^GENHOSP^MR~987654321^^^SSA^SS||TESTPATIENT^ANNA^M^^DR||19700101|F",
            "PV1|1|O|XRAY^^^GENHOSP",
            "ORC|NW|PL1001^RIS|FL2002^PACS||SC||^^^20240502090000",
            "OBR|1|PL1001^RIS|FL2002^PACS|" + KNEE_LATERAL + "^XR Knee Lateral LEFT^LN^KNEELAT^Knee lateral^99LOCAL"
            "||||||||||||||ACC0001|RP0001|SPS0001||||CR|||1^once^^20240502091500^^R",
            "ZDS|1.2.826.0.1.3680043.8.498.100^RIS^Application^DICOM",
        ]
    )
    + "\r"
)

OMI_CHEST = (
    "\r".join(
        [
            "MSH|^~\\&|RIS|GENHOSP|NNROUTER|RADIOLOGY|20240501083000||OMI^O23^OMI_O23|MSG00002|P|2.5.1|||AL|NE||UNICODE UTF-8",
            "PID|1||778899^^^GENHOSP^MR||MÜLLER^JÜRGEN||19650315|M",
            "ORC|NW|PL3003|FL4004||SC",
            "TQ1|1||||||20240503101500|",
            "OBR|1|PL3003|FL4004|" + CHEST_PA + "^XR Chest PA^LN||||||||||||||ACC-IGNORED||||||RAD|||^^^20240509000000",
            "IPC|ACC0002|RP0002|1.2.826.0.1.3680043.8.498.200|SPS0002|DX",
        ]
    )
    + "\r"
)


def _set(message: str, segment: str, n: int, value: str) -> str:
    """The message with field n of the first ``segment`` replaced."""
    lines = message.rstrip("\r").split("\r")
    n = n - 1 if segment == "MSH" else n  # MSH-1 is the separator itself
    for i, line in enumerate(lines):
        if line.startswith(segment + "|"):
            fields = line.split("|")
            fields += [""] * (n + 1 - len(fields))
            fields[n] = value
            lines[i] = "|".join(fields)
            break
    return "\r".join(lines) + "\r"


def _drop(message: str, segment: str) -> str:
    return "\r".join(line for line in message.split("\r") if not line.startswith(segment + "|"))


def _segments(reply: bytes) -> dict[str, list[str]]:
    text = reply.decode()
    fs = text[3]
    return {line[:3]: line.split(fs) for line in text.split("\r") if line}


# --- parsing -------------------------------------------------------------------


def test_orm_knee_order():
    order = hl7.parse(ORM_KNEE.encode())
    assert order == Order(
        source=OrderSource.HL7,
        accession_number="ACC0001",
        study_uid="1.2.826.0.1.3680043.8.498.100",
        requested_procedure_id="RP0001",
        placer_order_number="PL1001",
        filler_order_number="FL2002",
        codes=(Code(KNEE_LATERAL, "LN", "XR Knee Lateral LEFT"), Code("KNEELAT", "99LOCAL", "Knee lateral")),
        description="XR Knee Lateral LEFT",
        laterality="L",
        modality="CR",
        control="NW",
        scheduled_at="20240502091500",  # OBR-27.4 before ORC-7
        patient_id="123456",
        patient_name="TESTPATIENT^ANNA^M^DR",  # DICOM order: prefix after middle
    )
    assert order.extra["control_id"] == "MSG00001"
    assert order.extra["message_type"] == "ORM^O01"
    assert order.extra["scheduled_procedure_step_id"] == "SPS0001"


def test_omi_chest_order_takes_ipc_and_tq1():
    order = hl7.parse(OMI_CHEST.encode("utf-8"))
    assert order.accession_number == "ACC0002"  # IPC-1 over OBR-18
    assert order.requested_procedure_id == "RP0002"
    assert order.study_uid == "1.2.826.0.1.3680043.8.498.200"
    assert order.modality == "DX"  # IPC-5; OBR-24 "RAD" names no modality anyway
    assert order.scheduled_at == "20240503101500"  # TQ1-7 over OBR-27
    assert order.codes == (Code(CHEST_PA, "LN", "XR Chest PA"),)
    assert order.laterality is None
    assert order.patient_name == "MÜLLER^JÜRGEN"
    assert order.extra["scheduled_procedure_step_id"] == "SPS0002"


def test_latin1_without_msh18_and_declared_8859_1():
    plain = OMI_CHEST.replace("|||AL|NE||UNICODE UTF-8", "")
    assert hl7.parse(plain.encode("latin-1")).patient_name == "MÜLLER^JÜRGEN"
    declared = OMI_CHEST.replace("UNICODE UTF-8", "8859/1")
    assert hl7.parse(declared.encode("latin-1")).patient_name == "MÜLLER^JÜRGEN"


@pytest.mark.parametrize("eol", ["\n", "\r\n"])
def test_other_line_ends(eol):
    assert hl7.parse(ORM_KNEE.replace("\r", eol)) == hl7.parse(ORM_KNEE)


def test_escape_sequences():
    text = "Knee\\F\\lateral\\S\\a\\T\\b\\R\\c\\E\\d\\X41\\ \\H\\bold\\N\\"
    order = hl7.parse(_set(ORM_KNEE, "OBR", 4, f"{KNEE_LATERAL}^{text}^LN"))
    assert order.description == "Knee|lateral^a&b~c\\dA bold"


def test_custom_separators():
    # Field !, component @, repetition *, escape $, subcomponent %.
    message = "\r".join(
        [
            "MSH!@*$%!RIS!GENHOSP!NNROUTER!RADIOLOGY!20240501083000!!ORM@O01!MSG00003!P!2.3",
            "PID!1!!555@@@GENHOSP@MR!!DOE@JOHN",
            "ORC!XO!PL5@RIS!FL6",
            "OBR!1!PL5!FL6!" + KNEE_LATERAL + "@XR Knee $F$ lateral RT@LN!!!!!!!!!!!!!!ACC0003",
        ]
    )
    order = hl7.parse(message)
    assert (order.control, order.accession_number, order.placer_order_number) == ("XO", "ACC0003", "PL5")
    assert order.description == "XR Knee ! lateral RT"
    assert order.laterality == "R"
    assert order.patient_id == "555"
    reply = hl7.ack(message, "AE", "bad ! thing")
    assert reply.startswith(b"MSH!@*$%!NNROUTER!RADIOLOGY!RIS!GENHOSP!")
    assert b"MSA!AE!MSG00003!bad $F$ thing" in reply


def test_cancel():
    order = hl7.parse(_set(ORM_KNEE, "ORC", 1, "CA"))
    assert order.control == "CA"
    assert order.placer_order_number == "PL1001"


def test_placer_and_filler_fall_back_to_obr():
    message = _set(_set(ORM_KNEE, "ORC", 2, ""), "ORC", 3, "")
    order = hl7.parse(message)
    assert (order.placer_order_number, order.filler_order_number) == ("PL1001", "FL2002")


@pytest.mark.parametrize(
    ("obr15", "obr46", "side"),
    [
        ("^^^KNEE^RT", "", "R"),
        ("^^^KNEE&Knee&SCT^L&Left&HL70495", "", "L"),
        ("", "B^Bilateral^HL70495", "B"),
        ("", "XX^both knees", "B"),
        ("", "", None),
    ],
)
def test_laterality_from_modifiers(obr15, obr46, side):
    message = _set(ORM_KNEE, "OBR", 4, f"{KNEE_LATERAL}^XR Knee Lateral^LN")
    message = _set(_set(message, "OBR", 15, obr15), "OBR", 46, obr46)
    assert hl7.parse(message).laterality == side


@pytest.mark.parametrize(
    ("text", "side"),
    [
        ("XR Knee Lateral LEFT", "L"),
        ("Knee, lt.", "L"),
        ("hand right", "R"),
        ("XR Hand RT 3 views", "R"),
        ("Knees BILAT", "B"),
        ("Knees bilateral", "B"),
        ("Both hands", "B"),
        ("Left and right hands", "B"),
        ("XR Heart and lungs", None),  # RT inside a word
        ("Adult chest", None),  # LT inside a word
        ("Leftover", None),
        ("", None),
        (None, None),
    ],
)
def test_laterality_words(text, side):
    assert laterality_from_text(text) == side


def test_several_orders_in_one_message():
    message = (
        ORM_KNEE + "ORC|NW|PL1002|FL2003\rOBR|2|PL1002|FL2003|" + CHEST_PA + "^XR Chest PA^LN" + "|" * 14 + "ACC0004\r"
    )
    orders = hl7.parse_all(message)
    assert [o.accession_number for o in orders] == ["ACC0001", "ACC0004"]
    assert orders[1].patient_id == "123456"  # the PID applies to every order after it
    with pytest.raises(hl7.HL7Error) as err:
        hl7.parse(message)
    assert err.value.ack_code == "AE"


MALFORMED = [
    ("PID|1||123\rORC|NW|1\r", "AR", "no MSH"),
    ("MSH|^~\\&|LAB|GENHOSP|NNROUTER||20240501||ORU^R01|MSG9|P|2.5\rOBR|1\r", "AR", "unsupported message type ORU^R01"),
    ("MSHX^~\\&|RIS|GENHOSP\r", "AR", "separators"),
    (_drop(ORM_KNEE, "ORC"), "AE", "missing ORC"),
    (_drop(ORM_KNEE, "OBR"), "AE", "missing OBR"),
    (_set(ORM_KNEE, "ORC", 1, ""), "AE", "ORC-1"),
]


@pytest.mark.parametrize(("message", "code", "reason"), MALFORMED)
def test_malformed_raises(message, code, reason):
    with pytest.raises(hl7.HL7Error) as err:
        hl7.parse(message)
    assert err.value.ack_code == code
    assert reason in err.value.text


# --- acknowledgements -------------------------------------------------------------


def test_ack_accept():
    seg = _segments(hl7.ack(ORM_KNEE.encode(), "AA"))
    assert seg["MSH"][2:6] == ["NNROUTER", "RADIOLOGY", "RIS", "GENHOSP"]
    assert seg["MSH"][8] == "ACK^O01^ACK"
    assert seg["MSH"][11] == "2.3.1"
    assert seg["MSH"][9] and seg["MSH"][9] != "MSG00001"
    assert seg["MSA"][1:3] == ["AA", "MSG00001"]
    assert "ERR" not in seg


def test_ack_error_v25_and_v23():
    seg = _segments(hl7.ack(OMI_CHEST.encode(), "AE", "store down", condition="207"))
    assert seg["MSH"][8] == "ACK^O23^ACK"
    assert seg["MSH"][17] == "UNICODE UTF-8"
    assert seg["MSA"][1:4] == ["AE", "MSG00002", "store down"]
    assert seg["ERR"][3].startswith("207^") and seg["ERR"][4] == "E" and seg["ERR"][8] == "store down"
    seg = _segments(hl7.ack(ORM_KNEE.encode(), "AR", "nope", condition="200"))
    assert seg["ERR"][1] == "^^^200&nope&HL70357"


def test_ack_for_garbage_still_answers():
    seg = _segments(hl7.ack(b"\x00not hl7 at all", "AR", "no MSH segment"))
    assert seg["MSA"][1] == "AR"


# --- MLLP over loopback -------------------------------------------------------------


@pytest.fixture
def received():
    return []


@pytest.fixture
def server(received):
    srv = hl7.MLLPServer("127.0.0.1", 0, received.append).start()
    yield srv
    srv.stop()


def _frame(message: str | bytes) -> bytes:
    data = message.encode() if isinstance(message, str) else message
    return b"\x0b" + data + b"\x1c\x0d"


def _read_acks(sock: socket.socket, count: int, timeout: float = 10) -> list[bytes]:
    sock.settimeout(timeout)
    buf = b""
    while buf.count(b"\x1c\x0d") < count:
        chunk = sock.recv(65536)
        assert chunk, "connection closed before all ACKs came"
        buf += chunk
    return [f.lstrip(b"\r").removeprefix(b"\x0b") for f in buf.split(b"\x1c\x0d")[:count]]


def _msa(reply: bytes) -> list[str]:
    return _segments(reply)["MSA"]


def test_order_over_mllp(server, received):
    assert server.port > 0
    reply = hl7.send("127.0.0.1", server.port, ORM_KNEE, timeout=10)
    assert _msa(reply)[1:3] == ["AA", "MSG00001"]
    assert received == [hl7.parse(ORM_KNEE)]


@pytest.mark.parametrize(("message", "code", "reason"), MALFORMED)
def test_malformed_gets_its_ack_over_mllp(server, received, message, code, reason):
    reply = hl7.send("127.0.0.1", server.port, message, timeout=10)
    msa = _msa(reply)
    assert msa[1] == code
    assert reason.replace("^", "\\S\\") in msa[3]  # separators in the text come back escaped
    assert "ERR" in _segments(reply)
    assert received == []


def test_on_order_failure_is_ae_and_the_sender_may_retry(received):
    calls = []

    def flaky(order: Order) -> None:
        calls.append(order)
        if len(calls) == 1:
            raise RuntimeError("database is locked\nSQL: INSERT ...")
        received.append(order)

    with hl7.MLLPServer("127.0.0.1", 0, flaky) as srv:
        first = hl7.send("127.0.0.1", srv.port, ORM_KNEE, timeout=10)
        second = hl7.send("127.0.0.1", srv.port, ORM_KNEE, timeout=10)
    assert _msa(first)[1] == "AE"
    assert "order not kept (RuntimeError)" in _msa(first)[3]
    # Not the error's text: a database error quotes the values it was given.
    assert "locked" not in first.decode() and "INSERT" not in first.decode()
    assert _msa(second)[1] == "AA"
    assert len(received) == 1


def test_several_messages_on_one_connection(server, received):
    messages = [_set(ORM_KNEE, "MSH", 10, f"MSG1{i:04d}") for i in range(3)] + [OMI_CHEST]
    stream = b"".join(_frame(m) for m in messages)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(stream[:7])  # frames split anywhere still arrive whole
        time.sleep(0.05)
        sock.sendall(stream[7:])
        acks = _read_acks(sock, len(messages))
        # ... and the connection stays open for more.
        sock.sendall(_frame(_set(ORM_KNEE, "MSH", 10, "MSGLAST")))
        acks += _read_acks(sock, 1)
    assert [_msa(a)[1:3] for a in acks] == [
        ["AA", "MSG10000"],
        ["AA", "MSG10001"],
        ["AA", "MSG10002"],
        ["AA", "MSG00002"],
        ["AA", "MSGLAST"],
    ]
    assert [o.accession_number for o in received] == ["ACC0001"] * 3 + ["ACC0002", "ACC0001"]


def test_oversized_message_is_rejected_and_the_connection_survives(server, received):
    big = ORM_KNEE + "NTE|1||" + "x" * (hl7.MAX_MESSAGE + 10) + "\r"
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(_frame(big) + _frame(ORM_KNEE))
        acks = _read_acks(sock, 2)
    assert _msa(acks[0])[1:3] == ["AR", "MSG00001"]
    assert "larger than" in _msa(acks[0])[3]
    assert _msa(acks[1])[1] == "AA"
    assert len(received) == 1


def test_concurrent_connections(received):
    # Eight at once from one host: the per-host cap (4 by default) would refuse
    # some whenever five overlap, which is the cap working, not concurrency
    # failing; the cap has its own tests below.
    server = _limited(received, max_connections_per_host=8)
    replies: list[bytes] = []
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            replies.append(hl7.send("127.0.0.1", server.port, _set(ORM_KNEE, "OBR", 18, f"ACC9{i:03d}"), timeout=10))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
    finally:
        server.stop()
    assert errors == []
    assert [_msa(r)[1] for r in replies] == ["AA"] * 8
    assert sorted(o.accession_number for o in received) == [f"ACC9{i:03d}" for i in range(8)]


def test_log_lines_carry_no_patient_data(server):
    with structlog.testing.capture_logs() as events:
        hl7.send("127.0.0.1", server.port, ORM_KNEE, timeout=10)
        hl7.send("127.0.0.1", server.port, _drop(ORM_KNEE, "OBR"), timeout=10)
    lines = [e for e in events if e["event"] == "hl7_message"]
    assert [(e["message_type"], e["control_id"], e["ack"]) for e in lines] == [
        ("ORM^O01", "MSG00001", "AA"),
        ("ORM^O01", "MSG00001", "AE"),
    ]
    assert all(e["log_level"] == "info" for e in lines)
    text = repr(events)
    for phi in ("TESTPATIENT", "ANNA", "123456", "19700101"):
        assert phi not in text


def test_stop_closes_idle_connections_and_the_port(received):
    srv = hl7.MLLPServer("127.0.0.1", 0, received.append).start()
    port = srv.port
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    time.sleep(0.3)  # accepted, and idle in recv
    t0 = time.monotonic()
    srv.stop()
    assert time.monotonic() - t0 < 5
    assert sock.recv(1) == b""  # the server closed it
    sock.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_send_times_out_on_a_silent_peer():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="no reply"):
            hl7.send("127.0.0.1", listener.getsockname()[1], ORM_KNEE, timeout=0.5)
        assert time.monotonic() - t0 < 3


# --- who may connect, for how long, with how much -------------------------------------


def _closed(sock: socket.socket, timeout: float = 10) -> bool:
    """Whether the server closes ``sock`` (EOF or reset) within ``timeout``, reading and dropping what comes."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionError:
        pass
    return True


def _limited(received, **limits) -> hl7.MLLPServer:  # type: ignore[no-untyped-def]
    return hl7.MLLPServer("127.0.0.1", 0, received.append, limits=hl7.Limits(**limits)).start()


def test_allow_list_entries():
    allowed = hl7._Allowed(("10.1.2.0/24", "192.0.2.7", "localhost"))
    assert "10.1.2.200" in allowed and "192.0.2.7" in allowed
    assert "127.0.0.1" in allowed  # localhost, resolved at start
    assert "::ffff:10.1.2.3" in allowed  # an IPv4 peer seen through an IPv6 socket
    assert "10.1.3.1" not in allowed and "192.0.2.8" not in allowed and "garbage" not in allowed
    loopback = hl7._Allowed(())  # empty: this machine only
    assert "127.0.0.1" in loopback and "::1" in loopback and "10.1.2.3" not in loopback
    assert hl7._Allowed(("no-such-host.invalid",)).unresolved == ["no-such-host.invalid"]


def test_config_checks_allowed_hosts():
    from nnrouter.core.config import Hl7

    assert Hl7(allowed_hosts=["10.0.0.0/8", "ris.example", "::1"]).allowed_hosts == ["10.0.0.0/8", "ris.example", "::1"]
    with pytest.raises(ValueError, match="not an address"):
        Hl7(allowed_hosts=["ris example; rm -rf"])
    limits = hl7.Limits.from_config(Hl7(allowed_hosts=["10.0.0.1"], max_connections=3, message_timeout_s=2))
    assert (limits.allowed_hosts, limits.max_connections, limits.message_timeout_s) == (("10.0.0.1",), 3, 2)


def test_peer_not_allowed_is_closed_with_a_warning(received):
    with structlog.testing.capture_logs() as events:
        srv = _limited(received, allowed_hosts=("192.0.2.1",))
        try:
            with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
                with contextlib.suppress(OSError):
                    sock.sendall(_frame(ORM_KNEE))
                assert _closed(sock)
            with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
                assert _closed(sock)
        finally:
            srv.stop()
    assert received == []
    refused = [e for e in events if e["event"] == "mllp_refused"]
    assert refused and refused[0]["log_level"] == "warning" and refused[0]["peer"] == "127.0.0.1"
    assert "allowed_hosts" in refused[0]["reason"]
    assert len(refused) == 1  # the second refusal within 10 s is folded into the next line's count
    for phi in ("TESTPATIENT", "ANNA", "123456", "19700101"):
        assert phi not in repr(events)


def test_allowed_network_admits_loopback(received):
    srv = _limited(received, allowed_hosts=("127.0.0.0/8",))
    try:
        assert _msa(hl7.send("127.0.0.1", srv.port, ORM_KNEE, timeout=10))[1] == "AA"
    finally:
        srv.stop()


@pytest.mark.parametrize("cap", [{"max_connections": 2}, {"max_connections_per_host": 2}])
def test_connection_caps(received, cap):
    srv = _limited(received, **cap)
    try:
        first = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        second = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        with structlog.testing.capture_logs() as events:
            third = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
            assert _closed(third)
        third.close()
        assert any(e["event"] == "mllp_refused" and "connections open" in e["reason"] for e in events)
        for sock in (first, second):  # the two held slots still work
            sock.sendall(_frame(ORM_KNEE))
            assert _msa(_read_acks(sock, 1)[0])[1] == "AA"
        first.close()
        deadline = time.monotonic() + 10  # a slot freed is a slot again
        while srv._server.open_connections() > 1 and time.monotonic() < deadline:  # type: ignore[union-attr]
            time.sleep(0.05)
        assert _msa(hl7.send("127.0.0.1", srv.port, ORM_KNEE, timeout=10))[1] == "AA"
        second.close()
    finally:
        srv.stop()


def test_a_connection_whose_peer_hung_up_holds_no_slot(received):
    """A RIS that opens a connection per message closes each a moment before our thread sees it.

    Seen under load: five messages in 5 ms, the fifth refused by a cap of 4. The cap counts
    only connections whose peer is still there.
    """
    srv = _limited(received, max_connections_per_host=1)
    try:
        server = srv._server
        assert server is not None
        host = "127.0.0.9"  # loopback: allowed by default
        ours, theirs = socket.socketpair()
        newcomer = socket.socket()
        try:
            with server._lock:
                server._open[ours] = host
                server._per_host[host] += 1
            assert server._admit(newcomer, host) is not None  # the peer is there: the slot is taken
            theirs.close()  # the peer hangs up; no thread has read the EOF yet
            assert server._admit(newcomer, host) is None
        finally:
            with server._lock:
                server._open.pop(ours, None)
                server._open.pop(newcomer, None)
                server._per_host.pop(host, None)
            ours.close()
            newcomer.close()
    finally:
        srv.stop()


def test_trickling_peer_is_dropped(received):
    """One byte every 0.2 s never finishes a message: closed after message_timeout_s, with a warning."""
    with structlog.testing.capture_logs() as events:
        srv = _limited(received, message_timeout_s=1.0, idle_timeout_s=60)
        try:
            with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
                sock.sendall(b"\x0bMSH|")
                closed = False
                deadline = time.monotonic() + 15
                for byte in ORM_KNEE.encode()[4:] * 10:
                    if time.monotonic() > deadline:
                        break
                    try:
                        sock.sendall(bytes([byte]))
                    except OSError:
                        closed = True
                        break
                    sock.settimeout(0.2)
                    try:
                        if sock.recv(1) == b"":
                            closed = True
                            break
                    except TimeoutError:
                        continue
                    except ConnectionError:
                        closed = True
                        break
                assert closed
        finally:
            srv.stop()
    assert received == []
    assert any(e["event"] == "mllp_closed" and "not complete within 1 s" in e["reason"] for e in events)


@pytest.mark.parametrize("noise", [b"", b"\r"])
def test_silent_peer_is_closed_after_the_idle_timeout(received, noise):
    """Saying nothing, or only line ends, does not hold a connection open."""
    srv = _limited(received, idle_timeout_s=0.5)
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
            deadline = time.monotonic() + 10
            closed = False
            while time.monotonic() < deadline and not closed:
                try:
                    if noise:
                        sock.sendall(noise)
                    sock.settimeout(0.2)
                    closed = sock.recv(1) == b""
                except TimeoutError:
                    continue
                except OSError:
                    closed = True
            assert closed
    finally:
        srv.stop()


def test_junk_between_frames_is_skipped_but_a_flood_of_it_closes(received):
    with structlog.testing.capture_logs() as events:
        srv = _limited(received)
        try:
            with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
                # A message without its start block, line noise, binary junk: skipped; the next frame is answered.
                sock.sendall(ORM_KNEE.encode() + b"\x1c\r\n\x00\xff\xfe junk \x1c\x1c" + _frame(ORM_KNEE))
                assert _msa(_read_acks(sock, 1)[0])[1] == "AA"
                sock.sendall(bytes(range(256)).replace(b"\x0b", b"") * 64)  # 16 KiB, no start block
                assert _closed(sock)
        finally:
            srv.stop()
    assert len(received) == 1
    assert any(e["event"] == "mllp_closed" and "outside MLLP frames" in e["reason"] for e in events)


def test_frame_cut_short_by_a_new_start_block(received, server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        cut = ORM_KNEE.encode()[:120]  # MSH and half the PID: no end block
        sock.sendall(b"\x0b" + cut + _frame(_set(ORM_KNEE, "MSH", 10, "MSGNEXT")) + b"\x0b\x0b" + _frame(OMI_CHEST))
        acks = _read_acks(sock, 3)
    assert _msa(acks[0])[1:3] == ["AR", "MSG00001"]  # addressed from its MSH
    assert "cut short" in _msa(acks[0])[3]
    assert _msa(acks[1])[1:3] == ["AA", "MSGNEXT"]
    assert _msa(acks[2])[1:3] == ["AA", "MSG00002"]  # doubled start blocks are noise
    assert [o.accession_number for o in received] == ["ACC0001", "ACC0002"]


def test_frames_hold_bounded_memory():
    frames = hl7._Frames(limit=64 * 1024)
    chunk = b"A" * 65536
    assert frames.feed(b"\x0bMSH|^~\\&|X\r") == []
    for _ in range(200):  # 12.5 MiB inside one frame
        assert frames.feed(chunk) == []
        assert len(frames.buf) <= 64 * 1024
    (frame,) = frames.feed(b"tail\x1c\r")
    assert frame.problem == "oversized" and frame.payload.startswith(b"MSH|")
    assert frames.feed(b"\r\n  ") == [] and not frames.pending
    assert frames.feed(b"x") == [] and frames.pending and frames.junk == 1


def test_huge_segment_within_the_limit_is_read(server, received):
    big = _set(ORM_KNEE, "OBR", 13, "y" * (hl7.MAX_MESSAGE - 2000))
    assert _msa(hl7.send("127.0.0.1", server.port, big, timeout=20))[1] == "AA"
    assert len(received) == 1


def test_warnings_are_folded():
    w = hl7._Warnings(every_s=60)
    with structlog.testing.capture_logs() as events:
        for _ in range(5):
            w.warn("mllp_refused", "192.0.2.1", "not allowed")
        w.warn("mllp_refused", "192.0.2.2", "not allowed")
    assert [(e["peer"], e["suppressed"]) for e in events] == [("192.0.2.1", 0), ("192.0.2.2", 0)]
    w.every_s = 0
    with structlog.testing.capture_logs() as events:
        w.warn("mllp_refused", "192.0.2.1", "not allowed")
    assert events[0]["suppressed"] == 4


def test_nul_is_dropped_from_values():
    """PostgreSQL refuses NUL in text: an order carrying one (raw or escaped) would be AE'd for ever."""
    message = _set(_set(ORM_KNEE, "PID", 5, "TEST\x00PATIENT^AN\\X00\\NA"), "OBR", 18, "ACC\x000001")
    order = hl7.parse(message)
    assert (order.patient_name, order.accession_number) == ("TESTPATIENT^ANNA", "ACC0001")
