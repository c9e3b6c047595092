"""kill -9 while a modality is sending: everything acknowledged survives."""

from __future__ import annotations

import hashlib
import subprocess
import time
from pathlib import Path

import pytest
from conftest import children_of, needs
from dicomfiles import dataset_bytes, storescu_stream
from pydicom import dcmread
from sqlalchemy import select, text

from nnrouter.core.store import Instance, Store
from nnrouter.testing import peers
from nnrouter.testing.synthetic import write_series

pytestmark = [needs("storescu"), pytest.mark.slow]

FILES = 200
KILL_AFTER = 60


def test_kill_9_mid_stream_loses_nothing_acknowledged(node_factory, database_url, tmp_path):
    files = write_series(tmp_path / "in", FILES, rows=256, columns=256)
    node = node_factory(database_url=database_url).start()

    acked = storescu_stream(node, files, KILL_AFTER, node.kill9, timeout=120)
    assert KILL_AFTER <= len(acked) < FILES, f"kill landed outside the stream ({len(acked)} acknowledged)"

    node.start()  # restart on the same spool and database
    store = Store(node.db_url)
    try:
        with store.read() as s:
            rows = {r.sop_instance_uid: r for r in s.execute(select(Instance)).scalars()}
            if store.is_sqlite:
                assert s.execute(text("PRAGMA integrity_check")).scalar() == "ok"
            else:
                # Foreign keys hold: no instance without its series and study.
                orphans = s.execute(
                    text(
                        "SELECT count(*) FROM instance i LEFT JOIN series se ON se.id = i.series_id WHERE se.id IS NULL"
                    )
                ).scalar()
                assert orphans == 0
    finally:
        store.dispose()

    for f in acked:
        uid = str(dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        assert uid in rows, f"{f.name} was acknowledged but is not in the database"
        row = rows[uid]
        kept = Path(row.path)
        assert kept.is_file(), f"{f.name} was acknowledged but is not in the spool"
        ours = dataset_bytes(kept)
        assert ours == dataset_bytes(f), f"{f.name}: kept bytes differ from the file sent"
        assert hashlib.sha256(ours).hexdigest() == row.sha256
    # Whatever was not acknowledged may or may not be there, but never half:
    for row in rows.values():
        assert hashlib.sha256(dataset_bytes(Path(row.path))).hexdigest() == row.sha256
    assert not list((node.spool / ".incoming").iterdir()), "partial files left after restart"
    # The restarted node serves again.
    res = peers.storescu(node.port, files[-3:])
    assert res.stderr.count("Received Store Response (Success)") == 3


# --- the supervisor's children (issue 11, finding 5) ------------------------------


def alive(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except OSError:
        return False


def wait_started(node, events: tuple[str, ...] = ('"worker_started"', '"router_started"'), timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = node.log_lines()
        if all(any(e in line for line in lines) for e in events):
            return
        time.sleep(0.2)
    pytest.fail(f"not started: {node.log_lines()[-5:]}")


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


def _serve_in_own_group(node):  # type: ignore[no-untyped-def]
    """``nnrouter serve`` as systemd or a container runtime runs it: leader of its own process group."""
    import os
    import sys

    node.write_config()
    node.cli("db", "upgrade")
    log = open(node.log_path, "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "nnrouter", "serve", "--config", str(node.config_path)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    log.close()
    node.proc = proc
    peers.wait_port(node.port, proc=proc)
    return proc


@pytest.mark.parametrize("to", ["pid", "group"])
def test_serve_stops_on_sigterm_to_it_or_its_group(node_factory, to):
    import os
    import signal

    node = node_factory(settings={"workers": {"count": 1}})
    proc = _serve_in_own_group(node)
    try:
        wait_started(node)
        kids = children_of(proc.pid)
        assert len(kids) >= 2  # a worker, the router (and multiprocessing's resource tracker)
        if to == "group":
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        rc = proc.wait(15)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert rc == 0
    assert any('"stopped"' in line for line in node.log_lines())
    assert wait_gone(kids, 2) == []


def test_children_exit_when_serve_is_killed(node_factory):
    import os
    import signal

    node = node_factory(settings={"workers": {"count": 1}}).start()
    wait_started(node)
    kids = children_of(node.proc.pid)
    assert len(kids) >= 2
    node.kill9()
    left = wait_gone(kids, 15)
    for pid in left:  # leave no orphans to the rest of the suite, even on failure
        os.kill(pid, signal.SIGKILL)
    assert left == [], "children of the killed serve live on"


# --- a database outage (issue 11, finding 8: the worker died instead of waiting) ---


class OwnPostgres:
    """A PostgreSQL cluster of this test's own, to stop and start without hurting the session's server."""

    def __init__(self, base: Path):
        from conftest import _as_postgres, init_pg_cluster

        self.bin, base = init_pg_cluster(base=base)
        self.as_postgres = _as_postgres
        self.data, self.sock = base / "data", base / "sock"
        self.port = peers.free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.as_postgres(
                [
                    str(self.bin / "postgres"),
                    "-D",
                    str(self.data),
                    "-p",
                    str(self.port),
                    "-k",
                    str(self.sock),
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    "fsync=off",
                ]
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        peers.wait_port(self.port, proc=self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # Fast shutdown: clients are cut off, as in an outage (runuser passes no SIGINT on).
            subprocess.run(
                self.as_postgres([str(self.bin / "pg_ctl"), "stop", "-D", str(self.data), "-m", "fast", "-w"]),
                check=True,
                capture_output=True,
                timeout=60,
            )
            self.proc.wait(30)


@pytest.fixture
def own_postgres():  # type: ignore[no-untyped-def]
    import shutil
    import tempfile

    # Not under tmp_path: PostgreSQL runs as its own user, which may not enter pytest's folders.
    base = Path(tempfile.mkdtemp(prefix="nnrouter-pg-outage-"))
    try:
        pg = OwnPostgres(base)
        pg.start()
        yield pg
        pg.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


OUTAGE_S = 8


def test_worker_and_router_wait_out_a_database_outage(own_postgres, node_factory, tmp_path):
    # The worker waits 5 s to fill a batch: the outage finds it holding claims.
    node = node_factory(
        database_url=own_postgres.url,
        settings={
            "workers": {"count": 1, "batch_size": 16, "max_wait_ms": 5000, "poll_ms": 100},
            "retention": {"enabled": False},
        },
    ).start()  # the worker and the router only
    wait_started(node)
    kids = children_of(node.proc.pid)
    stages = [p for p in kids if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text()]
    assert len(stages) == 2  # the worker and the router
    first = write_series(tmp_path / "a", 3, rows=64, columns=64)
    assert peers.storescu(node.port, first).stderr.count("Received Store Response (Success)") == 3
    store = Store(node.db_url)
    deadline = time.monotonic() + 30
    while store.state_counts().get("classifying") != 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store.state_counts().get("classifying") == 3, store.state_counts()
    store.dispose()

    own_postgres.stop()
    time.sleep(OUTAGE_S)
    assert [p for p in stages if not alive(p)] == [], "a stage died with the database"
    own_postgres.start()

    second = write_series(tmp_path / "b", 3, rows=64, columns=64)
    deadline = time.monotonic() + 60
    sent = 0
    while time.monotonic() < deadline and sent < 3:  # the receiver may need a moment to reconnect
        sent = peers.storescu(node.port, second).stderr.count("Received Store Response (Success)")
        time.sleep(0.5)
    assert sent == 3
    store = Store(node.db_url)
    try:
        while time.monotonic() < deadline:
            counts = store.state_counts()
            if counts.get("decoded", 0) == 6:
                break
            time.sleep(0.3)
        assert store.state_counts().get("decoded") == 6, store.state_counts()
        with store.read() as s:  # the outage is not held against the instances it caught in hand
            assert set(s.execute(select(Instance.attempts)).scalars()) == {0}
    finally:
        store.dispose()
    lines = node.log_lines()
    assert not [line for line in lines if '"worker_died"' in line]
    assert [p for p in stages if not alive(p)] == []
    # One line per stage and outage when it starts, one when it ends.
    down = [line for line in lines if '"database_unavailable"' in line]
    assert sum('"stage": "worker"' in line for line in down) == 1, down
    assert sum('"stage": "router"' in line for line in down) == 1, down
    up = [line for line in lines if '"database_available"' in line]
    assert any('"stage": "worker"' in line and '"returned": 3' in line for line in up), up
    assert any('"stage": "router"' in line for line in up), up
