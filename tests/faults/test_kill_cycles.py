"""kill -9, over and over, while a modality sends: of the main process, then of a worker.

Each test runs 10 cycles with DCMTK storescu streaming small (64x64) files
into a node with one worker (no model: the worker decodes only) and checks
what the issue promises: every acknowledged instance is stored, byte for
byte; the SQLite database passes its integrity check; no process of the node
outlives its parent; and no instance ends ``failed`` because a batch-mate's
worker was killed.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest
from conftest import needs
from dicomfiles import dataset_bytes, storescu_stream
from pydicom import dcmread
from sqlalchemy import func, select, text

from nnrouter.core.store import Instance, InstanceState, Store
from nnrouter.testing.synthetic import write_series

pytestmark = [needs("storescu"), pytest.mark.slow]

CYCLES = 10
FILES_PER_CYCLE = 30
KILL_AT_ACK = 10
SETTINGS = {
    # The worker sits on a partly filled batch while the stream comes in:
    # that is when a kill catches batch-mates. The lease is left long
    # (300 s), so that recovery cannot come from it running out.
    "workers": {"count": 1, "batch_size": 16, "max_wait_ms": 1000, "poll_ms": 100, "max_attempts": 3},
}


# --- processes, from /proc ---------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def children_of(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            fields = _stat(int(d.name))
            if fields is not None and int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(d.name))
    return out


def with_config(config: Path) -> list[int]:
    """Live processes whose command line names the node's config file."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(config) in cmd and alive(int(d.name)):
                out.append(int(d.name))
    return out


def wait_gone(pids: list[int], timeout: float) -> tuple[list[int], float]:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout and any(alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if alive(p)], time.monotonic() - t0


# --- the stream ----------------------------------------------------------------------


def worker_pids(node) -> list[int]:  # type: ignore[no-untyped-def]
    """Worker processes, in start order, from their worker_started log lines."""
    pids = []
    for line in node.log_lines():
        if '"worker_started"' in line:
            pids.append(int(json.loads(line)["worker"].split(":")[1]))
    return pids


def wait_for(what, timeout: float, why: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = what()
        if got:
            return got
        time.sleep(0.1)
    pytest.fail(why)


def settle(check, timeout: float) -> bool:  # type: ignore[no-untyped-def]
    """Wait until check() is true; False on timeout, so that the figures are still recorded."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return bool(check())


def drained(store: Store) -> bool:
    counts = store.state_counts()
    return not counts.get(InstanceState.RECEIVED) and not counts.get(InstanceState.CLASSIFYING)


# --- what must hold afterwards ---------------------------------------------------------


def check_store(node, acked: list[Path]) -> tuple[dict[str, int], list[str]]:  # type: ignore[no-untyped-def]
    """The figures, and what broke the promises (acknowledged = stored, byte-identical, integrity ok, none failed)."""
    store = Store(node.db_url)
    try:
        with store.read() as s:
            integrity = s.execute(text("PRAGMA integrity_check")).scalar()
            rows = list(s.execute(select(Instance)).scalars())
            per_uid = dict(
                s.execute(select(Instance.sop_instance_uid, func.count()).group_by(Instance.sop_instance_uid)).all()
            )
    finally:
        store.dispose()
    by_uid = {r.sop_instance_uid: r for r in rows}
    lost, stored, differ = [], 0, []
    for f in acked:
        uid = str(dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        row = by_uid.get(uid)
        if row is None or not Path(row.path).is_file():
            lost.append(f.name)
            continue
        stored += 1
        sent = hashlib.sha256(dataset_bytes(f)).hexdigest()
        kept = hashlib.sha256(dataset_bytes(Path(row.path))).hexdigest()
        if not (sent == kept == row.sha256):
            differ.append(f.name)
    # Whatever was not acknowledged may be there or not, but never half.
    half = [r.sop_instance_uid for r in rows if hashlib.sha256(dataset_bytes(Path(r.path))).hexdigest() != r.sha256]
    failed = [(r.sop_instance_uid, r.attempts, r.state_reason) for r in rows if r.state == InstanceState.FAILED]
    partial = list((node.spool / ".incoming").iterdir())
    broken = [
        what
        for what, bad in (
            (f"integrity_check: {integrity}", integrity != "ok"),
            (f"acknowledged but not stored: {lost}", bool(lost)),
            (f"stored bytes differ from those sent: {differ}", bool(differ)),
            (f"rows whose file does not match: {half}", bool(half)),
            (f"failed instances (uid, attempts, reason): {failed}", bool(failed)),
            (f"partial files left: {partial}", bool(partial)),
        )
        if bad
    ]
    return {
        "acknowledged": len(acked),
        "stored": stored,
        "lost": len(lost),
        "duplicated": sum(n - 1 for n in per_uid.values() if n > 1),
        "failed": len(failed),
        "max_attempts_seen": max((r.attempts for r in rows), default=0),
    }, broken


def test_kill_9_of_the_main_process_ten_times(node_factory, tmp_path, figures):
    node = node_factory(settings=SETTINGS)
    acked: list[Path] = []
    orphans = 0
    exit_s: list[float] = []
    recovery_s: list[float] = []
    for cycle in range(CYCLES):
        started = len(worker_pids(node))
        t0 = time.monotonic()
        node.start(upgrade=cycle == 0)
        if cycle:  # from the restart to serving again, on the spool and database the kill left
            recovery_s.append(time.monotonic() - t0)
        if cycle % 2 == 0:  # half the kills find a running worker, half one still starting
            wait_for(lambda n=started: len(worker_pids(node)) > n, 60, f"cycle {cycle}: no worker started")
        kids: list[int] = []

        def kill_main(kids: list[int] = kids) -> None:
            kids.extend(children_of(node.proc.pid))
            node.kill9()

        files = write_series(tmp_path / "in" / str(cycle), FILES_PER_CYCLE, rows=64, columns=64)
        got = storescu_stream(node, files, KILL_AT_ACK, kill_main)
        assert KILL_AT_ACK <= len(got) < FILES_PER_CYCLE, (
            f"cycle {cycle}: the kill landed outside the stream ({len(got)})"
        )
        acked += got
        assert len(kids) >= 2, f"cycle {cycle}: no stage processes to watch ({kids})"
        left, took = wait_gone(kids, 15)
        exit_s.append(took)
        orphans += len(left)
        for pid in left:  # do not leak them into the rest of the suite
            os.kill(pid, signal.SIGKILL)

    node.start(upgrade=False)
    store = Store(node.db_url)
    try:
        settled = settle(lambda: drained(store), 90)
    finally:
        store.dispose()
    numbers, broken = check_store(node, acked)
    kids = children_of(node.proc.pid)
    rc = node.stop()
    left, _ = wait_gone(kids, 5)
    orphans += len(left) + len(with_config(node.config_path))
    figures.add(
        "kill -9 main process",
        cases=CYCLES,
        **numbers,
        orphans=orphans,
        children_exit_s=round(max(exit_s), 1),
        recovery_s=round(max(recovery_s), 1),
    )
    assert settled, "work left after the cycles"
    assert not broken, broken
    assert rc == 0
    assert orphans == 0, "stage processes outlived the killed main process"


def test_kill_9_of_a_worker_ten_times(node_factory, tmp_path, figures):
    node = node_factory(settings=SETTINGS).start()
    store = Store(node.db_url)
    acked: list[Path] = []
    held_at_kill = 0
    recovery_s: list[float] = []
    try:
        wait_for(lambda: worker_pids(node), 60, "no worker started")
        for cycle in range(CYCLES):
            victim = worker_pids(node)[-1]
            killed_at = 0.0

            def kill_worker(victim: int = victim) -> None:
                nonlocal killed_at, held_at_kill
                os.kill(victim, signal.SIGKILL)
                killed_at = time.monotonic()
                with store.read() as s:  # what it held when it died, before the supervisor sees it: batch-mates
                    held_at_kill += (
                        s.execute(
                            select(func.count())
                            .select_from(Instance)
                            .where(Instance.claimed_by.startswith(f"{socket.gethostname()}:{victim}:"))
                        ).scalar()
                        or 0
                    )

            files = write_series(tmp_path / "in" / str(cycle), FILES_PER_CYCLE, rows=64, columns=64)
            acked += storescu_stream(node, files, KILL_AT_ACK, kill_worker)
            assert killed_at, f"cycle {cycle}: the stream ended before the kill"
            wait_for(
                lambda v=victim: worker_pids(node)[-1] != v, 60, f"cycle {cycle}: the killed worker was not replaced"
            )
            recovery_s.append(time.monotonic() - killed_at)
        t0 = time.monotonic()
        settled = settle(lambda: drained(store), 90)
        drain_s = time.monotonic() - t0
    finally:
        store.dispose()
    numbers, broken = check_store(node, acked)
    died = sum('"worker_died"' in line for line in node.log_lines())
    kids = children_of(node.proc.pid)
    rc = node.stop()
    left, _ = wait_gone(kids, 5)
    orphans = len(left) + len(with_config(node.config_path))
    figures.add(
        "kill -9 worker",
        cases=CYCLES,
        **numbers,
        orphans=orphans,
        worker_died_logged=died,
        claims_held_at_kill=held_at_kill,
        recovery_s=round(max(recovery_s), 1),
        drain_s=round(drain_s, 1),
    )
    assert settled, "work left after the cycles (a dead worker's claims must not wait for their lease)"
    assert not broken, broken
    assert died == CYCLES
    assert rc == 0
    assert orphans == 0
