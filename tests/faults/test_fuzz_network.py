"""Hostile TCP peers against a running node, while a good sender keeps sending.

Raw PDU garbage, A-ASSOCIATE-RQs with broken items, PDUs that announce
0xFFFFFFF0 bytes (and then stream hundreds of MB), 50 connections that never
speak, 10 that trickle a byte every 1.5 s. The attackers connect from other
loopback addresses (127.0.x.y) than the good sender (127.0.0.1), as they would
from other hosts. Throughout, DCMTK echoscu (and storescu, after each case)
must keep being served; every attacking socket must be closed by the server;
the serve process's memory must stay bounded.

Seeded (NNROUTER_FUZZ_SEED, default 11) and bounded: about a minute.
NNROUTER_FUZZ_LONG=1 runs ten times the cases and streams 600 MB.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import struct
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import pytest
from conftest import connect_from, needs, rss_mb

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("NNROUTER_FUZZ_SEED", "11"))
LONG = os.environ.get("NNROUTER_FUZZ_LONG") == "1"
SCALE = 10 if LONG else 1
STREAM_MB = 600 if LONG else 300

# Small timeouts so the run is short; the defaults are 10 s and 30 s.
FIRST_PDU_S = 2.0
PDU_S = 3.0
SETTINGS = {
    "dicom": {
        "first_pdu_timeout_s": FIRST_PDU_S,
        "pdu_timeout_s": PDU_S,
        "acse_timeout_s": 5,
        "network_timeout_s": 5,
        "max_connections_per_host": 8,
        "max_pending_connections": 16,
    }
}
# How long an attacking socket may stay open before we say the server never closed it.
CLOSE_WITHIN_S = 12.0

VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT = "1.2.840.10008.1.2"


# --- raw PDUs --------------------------------------------------------------------


def item(kind: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(payload)) + payload


def associate_rq(called: str = "NNROUTER", calling: str = "FUZZ", max_pdu: int = 16384) -> bytes:
    """A valid A-ASSOCIATE-RQ proposing Verification in Implicit VR Little Endian."""
    app = item(0x10, b"1.2.840.10008.3.1.1.1")
    pc = item(0x20, bytes([1, 0, 0, 0]) + item(0x30, VERIFICATION.encode()) + item(0x40, IMPLICIT.encode()))
    user = item(0x50, item(0x51, struct.pack(">L", max_pdu)) + item(0x52, b"1.2.826.0.1.3680043.9.9999.1"))
    body = (
        struct.pack(">HH", 1, 0) + called.ljust(16).encode() + calling.ljust(16).encode() + bytes(32) + app + pc + user
    )
    return struct.pack(">BBL", 1, 0, len(body)) + body


def broken_rq(rng: random.Random) -> tuple[str, bytes]:
    """A-ASSOCIATE-RQs whose items are wrong in one of several ways."""
    good = associate_rq()
    head, items = good[:74], bytearray(good[74:])  # header + fixed fields, then the variable items
    kind = rng.choice(
        ["item_length", "flip", "unknown_item", "no_app_context", "empty_context", "truncated_item", "short_fixed"]
    )
    if kind == "item_length":  # an item claims more than the PDU holds
        starts = [0]
        while starts[-1] + 4 <= len(items):
            nxt = starts[-1] + 4 + struct.unpack(">H", items[starts[-1] + 2 : starts[-1] + 4])[0]
            if nxt >= len(items):
                break
            starts.append(nxt)
        at = rng.choice(starts)
        items[at + 2 : at + 4] = struct.pack(">H", rng.choice([0xFFFF, len(items) + 1, 0x8000]))
    elif kind == "flip":
        for _ in range(rng.randint(1, 8)):
            items[rng.randrange(len(items))] ^= 1 << rng.randrange(8)
    elif kind == "unknown_item":
        items[0:0] = item(rng.choice([0x11, 0x33, 0x77, 0xFF]), rng.randbytes(rng.randint(0, 40)))
    elif kind == "no_app_context":
        del items[: 4 + struct.unpack(">H", items[2:4])[0]]
    elif kind == "empty_context":
        items = bytearray(item(0x10, b"1.2.840.10008.3.1.1.1") + item(0x20, bytes([1, 0, 0, 0])) + items[-44:])
    elif kind == "truncated_item":
        items = items[: rng.randint(1, len(items) - 1)]
    else:  # fixed fields cut short: the PDU is smaller than its own fixed part
        return kind, struct.pack(">BBL", 1, 0, 20) + rng.randbytes(20)
    body = head[6:] + bytes(items)
    return kind, struct.pack(">BBL", 1, 0, len(body)) + body


def garbage(rng: random.Random) -> tuple[str, bytes]:
    kind = rng.choice(["random", "http", "type_0x01_short", "release_first", "zeros"])
    if kind == "random":
        return kind, rng.randbytes(rng.randint(1, 3000))
    if kind == "http":
        return kind, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    if kind == "type_0x01_short":  # an A-ASSOCIATE-RQ header promising more than ever comes
        return kind, struct.pack(">BBL", 1, 0, rng.randint(100, 60000)) + rng.randbytes(rng.randint(0, 50))
    if kind == "release_first":
        return kind, bytes.fromhex("05000000000400000000")
    return kind, bytes(rng.randint(1, 500))


def read_pdu(s: socket.socket, timeout: float) -> bytes | None:
    """One PDU from the server, or None when it closed (or said nothing) in time."""
    s.settimeout(timeout)
    buf = b""
    try:
        while len(buf) < 6:
            chunk = s.recv(6 - len(buf))
            if not chunk:
                return None
            buf += chunk
        length = min(struct.unpack(">L", buf[2:6])[0], 1 << 16)
        while len(buf) < 6 + length:
            chunk = s.recv(6 + length - len(buf))
            if not chunk:
                return buf
            buf += chunk
        return buf
    except (TimeoutError, OSError):
        return buf or None


def closed_by_server(s: socket.socket, within: float) -> bool:
    """Whether the server hangs up on us within the time (whatever it sends first)."""
    deadline = time.monotonic() + within
    try:
        while time.monotonic() < deadline:
            s.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                if not s.recv(65536):
                    return True
            except TimeoutError:
                return False
            except OSError:  # reset
                return True
        return False
    finally:
        s.close()


# --- the good sender -----------------------------------------------------------------


@dataclass
class GoodSender:
    """echoscu in a loop, from 127.0.0.1, while the attacks run; storescu on request."""

    port: int
    file: Path
    echo_ok: int = 0
    echo_total: int = 0
    store_ok: int = 0
    store_total: int = 0
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def echo(self) -> None:
        res = subprocess.run(
            [
                "echoscu",
                "-aet",
                "GOOD",
                "-aec",
                "NNROUTER",
                "-to",
                "5",
                "-ta",
                "5",
                "-td",
                "5",
                "127.0.0.1",
                str(self.port),
            ],
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
        )
        self.echo_total += 1
        if res.returncode == 0:
            self.echo_ok += 1
        else:
            self.failures.append(f"echo: {res.stderr.strip()[-200:]}")

    def store(self) -> None:
        res = subprocess.run(
            [
                "storescu",
                "-aet",
                "GOOD",
                "-aec",
                "NNROUTER",
                "-to",
                "5",
                "-ta",
                "5",
                "-td",
                "10",
                "127.0.0.1",
                str(self.port),
                str(self.file),
            ],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.store_total += 1
        if res.returncode == 0:
            self.store_ok += 1
        else:
            self.failures.append(f"store: {res.stderr.strip()[-200:]}")

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.echo()
            self._stop.wait(0.3)

    def __enter__(self) -> Self:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(60)


# --- the attacks: each returns its figures ----------------------------------------------


def attack_garbage(port: int, rng: random.Random, cases: int) -> dict:
    payloads = [garbage(rng) for _ in range(cases)]

    def one(i: int) -> tuple[bool, bool]:
        s = connect_from(f"127.0.2.{10 + i % 200}", port, timeout=5)
        with contextlib.suppress(OSError):
            s.sendall(payloads[i][1])
        aborted = (read_pdu(s, CLOSE_WITHIN_S) or b"")[:1] == b"\x07"
        return aborted, closed_by_server(s, CLOSE_WITHIN_S)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(cases)))
    return {
        "cases": cases,
        "aborted": sum(a for a, _ in results),
        "closed_by_server": sum(c for _, c in results),
        "kinds": sorted({k for k, _ in payloads}),
    }


def attack_broken_rq(port: int, rng: random.Random, cases: int) -> dict:
    payloads = [broken_rq(rng) for _ in range(cases)]

    def one(i: int) -> tuple[str, bool]:
        s = connect_from(f"127.0.3.{10 + i % 200}", port, timeout=5)
        with contextlib.suppress(OSError):
            s.sendall(payloads[i][1])
        rsp = read_pdu(s, CLOSE_WITHIN_S)
        answer = {None: "closed", b"\x02": "accepted", b"\x03": "rejected", b"\x07": "aborted"}.get(
            rsp[:1] if rsp else None, "other"
        )
        if answer == "accepted":  # a mutation pynetdicom could live with: release politely
            with contextlib.suppress(OSError):
                s.sendall(bytes.fromhex("05000000000400000000"))
            read_pdu(s, CLOSE_WITHIN_S)
        return answer, closed_by_server(s, CLOSE_WITHIN_S)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(cases)))
    answers: dict[str, int] = {}
    for a, _ in results:
        answers[a] = answers.get(a, 0) + 1
    return {
        "cases": cases,
        "answers": answers,
        "closed_by_server": sum(c for _, c in results),
        "kinds": sorted({k for k, _ in payloads}),
    }


def attack_oversized(port: int, pid: int, after_association: bool, stream_mb: int) -> dict:
    """Announce 0xFFFFFFF0 bytes and stream up to ``stream_mb`` MB; how much got in before the server hung up."""
    before = rss_mb(pid)
    s = connect_from("127.0.4.1" if after_association else "127.0.4.2", port, timeout=5)
    if after_association:
        s.sendall(associate_rq())
        rsp = read_pdu(s, 10)
        assert rsp and rsp[:1] == b"\x02", f"no A-ASSOCIATE-AC: {rsp!r}"
        pdu_type = 0x04
    else:
        pdu_type = 0x01
    chunk = bytes(1 << 20)
    sent = 0
    closed = False
    try:
        s.sendall(struct.pack(">BBL", pdu_type, 0, 0xFFFFFFF0))
        while sent < stream_mb:
            s.sendall(chunk)
            sent += 1
    except OSError:
        closed = True
    if not closed:
        closed = closed_by_server(s, 2)
    else:
        s.close()
    time.sleep(0.5)
    after = rss_mb(pid)
    return {
        "cases": 1,
        "streamed_mb": sent,
        "closed_by_server": int(closed),
        "rss_growth_mb": round(after["VmHWM"] - before["VmRSS"], 1),
    }


def attack_idle(port: int, count: int, one_host: bool) -> dict:
    """Connections that never speak: from one host (the per-host cap) or from as many hosts."""
    socks = []
    refused_at_once = 0
    for i in range(count):
        try:
            socks.append(connect_from("127.0.5.1" if one_host else f"127.0.6.{10 + i}", port, timeout=5))
        except OSError:
            refused_at_once += 1
    with ThreadPoolExecutor(len(socks) or 1) as pool:
        closed = sum(pool.map(lambda s: closed_by_server(s, CLOSE_WITHIN_S), socks))
    return {"cases": count, "closed_by_server": closed + refused_at_once}


def attack_trickle(port: int, count: int, every_s: float, after_association: int) -> dict:
    """Tricklers: an A-ASSOCIATE-RQ a byte at a time; and (``after_association`` of them) a P-DATA a byte at a time."""
    results: list[bool] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        s = connect_from(f"127.0.7.{10 + i}", port, timeout=5)
        closed = False
        try:
            if i < after_association:
                s.sendall(associate_rq())
                rsp = read_pdu(s, 10)
                assert rsp and rsp[:1] == b"\x02", f"no A-ASSOCIATE-AC: {rsp!r}"
                payload = struct.pack(">BBL", 4, 0, 1000) + bytes(1000)
            else:
                payload = associate_rq()
            deadline = time.monotonic() + CLOSE_WITHIN_S
            for b in payload:
                if time.monotonic() > deadline:
                    break
                try:
                    s.sendall(bytes([b]))
                except OSError:
                    closed = True
                    break
                s.settimeout(every_s)
                try:
                    data = s.recv(65536)
                    while data and data[:1] == b"\x07":  # an A-ABORT: the close follows
                        data = s.recv(65536)
                    if not data:
                        closed = True
                        break
                except TimeoutError:
                    pass
                except OSError:
                    closed = True
                    break
        finally:
            s.close()
        with lock:
            results.append(closed)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(CLOSE_WITHIN_S + 20)
    return {"cases": count, "closed_by_server": sum(results)}


def run_attacks(port: int, pid: int, good: GoodSender, figures, rng: random.Random) -> list[dict]:  # type: ignore[no-untyped-def]
    """Every attack in turn, each followed by a storescu of the good file; their figures."""
    rows = []
    seen = {"ok": 0, "total": 0}

    def record(fault: str, numbers: dict) -> None:
        # The good C-ECHOs made while this attack ran, and one C-STORE after it.
        ok, total = good.echo_ok, good.echo_total
        numbers = {**numbers, "good_echo_ok": ok - seen["ok"], "good_echo_total": total - seen["total"]}
        seen.update(ok=ok, total=total)
        before = good.store_ok
        good.store()
        numbers["good_store_ok"] = good.store_ok - before
        rows.append({"fault": fault, **numbers})
        if figures is not None:
            figures.add(fault, **numbers)

    record("raw PDU garbage", attack_garbage(port, rng, 12 * SCALE))
    record("A-ASSOCIATE-RQ with broken items", attack_broken_rq(port, rng, 12 * SCALE))
    record("0xFFFFFFF0-byte A-ASSOCIATE-RQ", attack_oversized(port, pid, False, STREAM_MB))
    record("0xFFFFFFF0-byte P-DATA-TF", attack_oversized(port, pid, True, STREAM_MB))
    record("50 idle connections, 50 hosts", attack_idle(port, 50, one_host=False))
    record("50 idle connections, one host", attack_idle(port, 50, one_host=True))
    record("10 trickling connections", attack_trickle(port, 10, 1.5, after_association=2))
    return rows


@needs("echoscu", "storescu")
def test_hostile_peers_do_not_lock_out_a_good_sender(node_factory, tmp_path, figures):
    from nnrouter.testing.synthetic import write_series

    (good_file,) = write_series(tmp_path / "good", 1, rows=32, columns=32)
    node = node_factory(settings=SETTINGS).start()
    assert node.proc is not None
    pid = node.proc.pid
    start_rss = rss_mb(pid)["VmRSS"]
    rng = random.Random(SEED)
    good = GoodSender(node.port, good_file)
    with good:
        rows = run_attacks(node.port, pid, good, figures, rng)
    good.echo()  # and once more after everything
    end = rss_mb(pid)
    figures.add(
        "hostile network peers (all)",
        cases=sum(r["cases"] for r in rows),
        closed_by_server=sum(r["closed_by_server"] for r in rows),
        good_echo_ok=good.echo_ok,
        good_echo_total=good.echo_total,
        good_store_ok=good.store_ok,
        good_store_total=good.store_total,
        max_rss_growth_mb=round(end["VmHWM"] - start_rss, 1),
    )
    assert node.proc.poll() is None, "the node died"
    assert good.failures == [], good.failures[:5]
    for r in rows:
        assert r["closed_by_server"] == r["cases"], r
    for r in rows:
        if "rss_growth_mb" in r:
            assert r["rss_growth_mb"] < 64, r
            assert r["streamed_mb"] < 64, r  # hung up on at the header, not after buffering
    assert end["VmHWM"] - start_rss < 100
    logged = "\n".join(node.log_lines())
    for reason in (
        "not an A-ASSOCIATE-RQ",
        "announces 4294967280 bytes",
        "not complete within",
        "max_connections_per_host",
    ):
        assert reason in logged, reason
