"""Malformed MLLP and HL7 against a running ``nnrouter serve``: every case answered or cleanly closed.

Seeded and bounded: ``NNROUTER_FUZZ_CASES`` (default 150) cases from
``NNROUTER_FUZZ_SEED`` (default 0). Each case is one connection carrying a
broken thing (byte flips, truncation, missing or nested start blocks, junk
between frames, binary noise, oversized segments, odd separators, a peer
that stops mid-frame); the listener must answer every frame it can read
with an ACK (AA, AE or AR) or close the connection, and keep answering a
good ORM^O01, sent every few cases, with AA. Hogs (idle and trickling
connections from other loopback addresses) and a peer not on the allow list
run alongside and must not lock the good sender out.
"""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from dataclasses import dataclass, field

import pytest
from conftest import connect_from, rss_mb

from nnrouter.orders import hl7
from nnrouter.testing import peers

pytestmark = pytest.mark.slow

CASES = int(os.environ.get("NNROUTER_FUZZ_CASES", "150"))
SEED = int(os.environ.get("NNROUTER_FUZZ_SEED", "0"))
MAX_MESSAGE = 64 * 1024  # the node's orders.hl7.max_message_bytes, small so oversized cases stay cheap
MESSAGE_TIMEOUT_S = 1.5
IDLE_TIMEOUT_S = 3.0
PER_HOST = 4

VT, FS, CR = b"\x0b", b"\x1c", b"\r"


def order(n: int, placer: str = "FZ") -> bytes:
    return (
        "\r".join(
            [
                f"MSH|^~\\&|RIS|HOSP|NNROUTER|HOSP|20260101080000||ORM^O01|{placer}{n:05d}|P|2.5",
                "PID|1||FZ123456^^^HOSP^MR||FUZZ^PATIENT||19800101|F",
                f"ORC|NW|{placer}PL{n:05d}|{placer}FL{n:05d}||SC",
                f"OBR|1|{placer}PL{n:05d}|{placer}FL{n:05d}|36643-5^XR Chest 2 Views^LN||||||||||||||{placer}A{n:05d}",
            ]
        ).encode()
        + b"\r"
    )


def frame(payload: bytes) -> bytes:
    return VT + payload + FS + CR


# --- the cases ------------------------------------------------------------------------------


@dataclass
class Case:
    kind: str
    data: bytes
    # ACKs the case must get, when that can be said (None: any number, as long as the connection ends cleanly).
    acks: int | None = None
    half_close: bool = True  # the peer says it is done; else it waits and the server's timeouts must end it
    chunks: list[int] = field(default_factory=list)


def _flip(rng: random.Random, data: bytes, n: int) -> bytes:
    b = bytearray(data)
    for _ in range(n):
        i = rng.randrange(len(b))
        v = rng.randrange(256)
        while v in (0x0B, 0x1C):  # framing bytes belong to other cases
            v = rng.randrange(256)
        b[i] = v
    return bytes(b)


def make_case(rng: random.Random, n: int) -> Case:
    base = order(n, "FX")
    kind = rng.choice(
        [
            "byte_flips",
            "truncated",
            "no_start_block",
            "no_end_block",
            "nested_start",
            "junk_between_frames",
            "binary_noise",
            "oversized_segment",
            "huge_segment_within_limit",
            "odd_separators",
            "field_soup",
            "wrong_type",
            "nul_and_control",
            "many_frames_one_write",
            "empty_frames",
        ]
    )
    if kind == "byte_flips":
        return Case(kind, frame(_flip(rng, base, rng.randint(1, 20))), acks=1)
    if kind == "truncated":
        return Case(kind, frame(base[: rng.randrange(len(base))]), acks=1)
    if kind == "no_start_block":
        # Skipped as junk; the good frame after it is answered.
        return Case(kind, base + FS + CR + frame(order(n, "FY")), acks=1)
    if kind == "no_end_block":
        return Case(kind, VT + base[: rng.randrange(1, len(base))], acks=0, half_close=rng.random() < 0.5)
    if kind == "nested_start":
        return Case(kind, VT + base[: rng.randrange(20, len(base))] + frame(order(n, "FY")), acks=2)
    if kind == "junk_between_frames":
        junk = bytes(rng.choice(b"\r\n\t ABC|^~\\&\x00\xff\x1c") for _ in range(rng.randrange(1, 2000)))
        return Case(kind, frame(base) + junk + frame(order(n, "FY")), acks=2)
    if kind == "binary_noise":
        return Case(kind, rng.randbytes(rng.randrange(1, 20000)), acks=None)
    if kind == "oversized_segment":
        big = base + b"NTE|1||" + b"x" * (MAX_MESSAGE + rng.randrange(1, 4 * MAX_MESSAGE)) + CR
        return Case(kind, frame(big) + frame(order(n, "FY")), acks=2)
    if kind == "huge_segment_within_limit":
        return Case(kind, frame(base + b"NTE|1||" + b"y" * (MAX_MESSAGE - len(base) - 100) + CR), acks=1)
    if kind == "odd_separators":
        seps = bytes(rng.choice(b"|^~\\&!@#$%*+-/ aZ9\x00\x7f") for _ in range(5))
        return Case(kind, frame(b"MSH" + seps + base[8:]), acks=1)
    if kind == "field_soup":
        segs = [
            b"MSH|^~\\&|"
            + b"|".join(
                rng.randbytes(rng.randrange(0, 8)).replace(VT, b"").replace(FS, b"")
                for _ in range(rng.randrange(0, 30))
            )
        ]
        for _ in range(rng.randrange(0, 30)):
            name = rng.choice([b"PID", b"ORC", b"OBR", b"ZDS", b"IPC", b"TQ1", b"NTE", b"XXX", b""])
            segs.append(
                name
                + b"|"
                + b"|".join(
                    b"^".join(b"&" * rng.randrange(3) for _ in range(rng.randrange(4)))
                    for _ in range(rng.randrange(60))
                )
            )
        return Case(kind, frame(b"\r".join(segs)), acks=1)
    if kind == "wrong_type":
        t = rng.choice([b"ORU^R01", b"ADT^A01", b"", b"^^^", b"ORM", b"OMI^O99", b"\\F\\^\\S\\", b"A" * 300])
        return Case(kind, frame(base.replace(b"ORM^O01", t, 1)), acks=1)
    if kind == "nul_and_control":
        ctrl = bytes(v for v in range(32) if v not in (0x0B, 0x1C))
        b = bytearray(base)
        for _ in range(rng.randint(1, 30)):
            b.insert(rng.randrange(len(b)), rng.choice(ctrl))
        return Case(kind, frame(bytes(b)), acks=1)
    if kind == "many_frames_one_write":
        k = rng.randint(2, 20)
        return Case(kind, b"".join(frame(order(n * 100 + i, "FM")) for i in range(k)), acks=k)
    # empty_frames: VT FS, doubled start blocks, stray end blocks
    return Case(kind, VT + FS + CR + VT + VT + FS + FS + CR, acks=None)


# --- talking to the node --------------------------------------------------------------------


@dataclass
class Outcome:
    acks: list[str]  # MSA-1 of every reply
    closed: bool  # the server ended the connection (EOF or reset) within the bound
    bad_replies: int  # replies that are not ACKs


def run_case(port: int, case: Case, rng: random.Random) -> Outcome:
    acks: list[str] = []
    bad = 0
    closed = False
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        frames = hl7._Frames(1 << 24)
        try:
            data, i = case.data, 0
            while i < len(data):  # split anywhere: frames arrive in pieces
                step = rng.choice([len(data), rng.randint(1, 4096)])
                sock.sendall(data[i : i + step])
                i += step
            if case.half_close:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may close first (junk flood); what it sent before is still read
        deadline = time.monotonic() + IDLE_TIMEOUT_S + MESSAGE_TIMEOUT_S + 10
        while time.monotonic() < deadline:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            except OSError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            for f in frames.feed(chunk):
                msa = [line for line in f.payload.split(b"\r") if line.startswith(b"MSA")]
                if not f.payload.startswith(b"MSH") or not msa or msa[0][4:6] not in (b"AA", b"AE", b"AR"):
                    bad += 1
                else:
                    acks.append(msa[0][4:6].decode())
    return Outcome(acks, closed, bad)


class Hogs:
    """Connections from other loopback addresses that hold slots: idle, and trickling a frame byte by byte."""

    def __init__(self, port: int):
        self.port = port
        self.stop = threading.Event()
        self.opened = 0
        self.threads: list[threading.Thread] = []

    def _hog(self, source: str, trickle: bool) -> None:
        while not self.stop.is_set():
            try:
                sock = connect_from(source, self.port)
            except OSError:
                time.sleep(0.2)
                continue
            self.opened += 1
            try:
                if trickle:
                    sock.sendall(VT + b"MSH|")
                while not self.stop.is_set():
                    if trickle:
                        sock.sendall(b"x")
                    sock.settimeout(0.5)
                    try:
                        if sock.recv(1) == b"":
                            break  # dropped: open another
                    except TimeoutError:
                        continue
            except OSError:
                pass
            finally:
                sock.close()
            self.stop.wait(0.2)

    def start(self) -> Hogs:
        for k in range(PER_HOST + 2):
            t = threading.Thread(target=self._hog, args=("127.0.0.2", k % 2 == 1), daemon=True)
            t.start()
            self.threads.append(t)
        return self

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(5)


def test_malformed_mllp(node_factory, figures):
    from sqlalchemy import func, select

    from nnrouter.core.store import OrderRequest, Store

    hl7_port = peers.free_port()
    node = node_factory(
        settings={
            "orders": {
                "hl7": {
                    "bind": "127.0.0.1",
                    "port": hl7_port,
                    # 127.0.0.2 may connect (and hogs the per-host cap); 127.0.0.3 may not.
                    "allowed_hosts": ["127.0.0.1", "127.0.0.2"],
                    "max_connections": 20,
                    "max_connections_per_host": PER_HOST,
                    "message_timeout_s": MESSAGE_TIMEOUT_S,
                    "idle_timeout_s": IDLE_TIMEOUT_S,
                    "max_message_bytes": MAX_MESSAGE,
                }
            }
        }
    ).start()
    peers.wait_port(hl7_port, proc=node.proc)
    rng = random.Random(SEED)
    rss_start = rss_mb(node.proc.pid)["VmRSS"]
    hogs = Hogs(hl7_port).start()
    good_sent = good_acked = 0
    kinds: dict[str, int] = {}
    failures: list[str] = []
    answered = closed_clean = 0
    t0 = time.monotonic()
    try:
        for n in range(CASES):
            if n % 5 == 0:  # the RIS keeps getting through
                good_sent += 1
                reply = hl7.send("127.0.0.1", hl7_port, order(good_sent, "FG"), timeout=15)
                if b"MSA|AA|" in reply:
                    good_acked += 1
                else:
                    failures.append(f"good order {good_sent}: {reply[:200]!r}")
            if n % 25 == 0:  # a peer not on the allow list: closed at once, no ACK
                with connect_from("127.0.0.3", hl7_port) as sock:
                    try:
                        sock.sendall(frame(order(n, "FN")))
                        sock.settimeout(10)
                        if sock.recv(65536) != b"":
                            failures.append("127.0.0.3 got an answer")
                    except OSError:
                        pass
            case = make_case(rng, n)
            kinds[case.kind] = kinds.get(case.kind, 0) + 1
            out = run_case(hl7_port, case, rng)
            ok = out.bad_replies == 0 and out.closed and (case.acks is None or len(out.acks) == case.acks)
            if out.acks:
                answered += 1
            if out.closed:
                closed_clean += 1
            if not ok:
                failures.append(
                    f"case {n} {case.kind}: acks {out.acks} (expected {case.acks}), closed {out.closed}, "
                    f"bad replies {out.bad_replies}"
                )
            if node.proc.poll() is not None:
                failures.append(f"nnrouter exited with {node.proc.returncode} after case {n}")
                break
        good_sent += 1
        final = hl7.send("127.0.0.1", hl7_port, order(good_sent, "FG"), timeout=15)
        good_acked += b"MSA|AA|" in final
    finally:
        hogs.close()
    elapsed = time.monotonic() - t0
    rss_end = rss_mb(node.proc.pid)["VmRSS"]
    store = Store(node.db_url)
    try:
        with store.read() as s:
            stored = s.execute(
                select(func.count()).select_from(OrderRequest).where(OrderRequest.placer_order_number.like("FGPL%"))
            ).scalar_one()
    finally:
        store.dispose()
    log = "\n".join(node.log_lines())
    figures.add(
        "malformed MLLP frames and HL7 messages",
        cases=CASES,
        seed=SEED,
        kinds=len(kinds),
        answered_with_ack=answered,
        closed_by_server=closed_clean,
        unanswered=len(failures),
        good_orders_sent=good_sent,
        good_acked=good_acked,
        good_stored=stored,
        hog_connections=hogs.opened,
        rss_start_mb=round(rss_start, 1),
        rss_end_mb=round(rss_end, 1),
        seconds=round(elapsed, 1),
    )
    assert not failures, "\n".join(failures[:20])
    assert node.proc.poll() is None
    assert good_acked == good_sent == stored
    assert "Traceback" not in log
    assert '"mllp_refused"' in log and "127.0.0.3" in log  # the allow list said who it closed
    assert rss_end - rss_start < 150, (rss_start, rss_end)  # oversized frames are not buffered
