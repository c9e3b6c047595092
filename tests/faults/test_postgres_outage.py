"""PostgreSQL stopped for 30 s while a modality streams: told to retry, nothing acknowledged is lost.

A node that shares its work through PostgreSQL cannot record an instance
while the server is down. The sender must then be told "out of resources,
try later" (0xA700 with a plain comment, never the driver's text), and no
instance may be acknowledged that is not both on disk and in a committed
row. When the server is back the same nnrouter process (no restart)
stores again. The storescu sender behaves as a modality does: what was
refused is sent again later.

The cluster is this test's own (initdb + pg_ctl in a temp folder), never the
session-wide one that other tests share.
"""

from __future__ import annotations

import collections
import contextlib
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import _as_postgres, init_pg_cluster, needs
from dicomfiles import (
    NO_ASSOCIATION_FLOOR,
    dataset_sha256,
    echo,
    node_rows,
    storescu_statuses,
)

from nnrouter.core.store import Instance
from nnrouter.testing import peers
from nnrouter.testing.synthetic import DXSpec, write_dx

pytestmark = [pytest.mark.slow, needs("storescu", "echoscu")]

OUTAGE_S = 30


@dataclass
class Cluster:
    bin: Path
    base: Path
    port: int

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}"

    def _ctl(self, *args: str) -> None:
        subprocess.run(
            _as_postgres([str(self.bin / "pg_ctl"), "-D", str(self.base / "data"), *args]),
            check=True,
            capture_output=True,
            timeout=60,
        )

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.base / 'sock'} -c listen_addresses=127.0.0.1"
        self._ctl("-o", opts, "-l", str(self.base / "postgres.log"), "-w", "start")

    def stop(self) -> None:
        self._ctl("-m", "fast", "-w", "stop")


@pytest.fixture
def own_postgres():  # type: ignore[no-untyped-def]
    pg_bin, base = init_pg_cluster("nnrouter-pg-outage-")
    cluster = Cluster(pg_bin, base, peers.free_port())
    cluster.start()
    try:
        yield cluster
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):  # already stopped
            cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_postgres_stopped_mid_stream(own_postgres, node_factory, tmp_path, figures):
    from sqlalchemy import create_engine, text

    admin = create_engine(own_postgres.url + "/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text('CREATE DATABASE "nnrouter"'))
    admin.dispose()
    node = node_factory(
        database_url=own_postgres.url + "/nnrouter", settings={"storage": {"min_free_mb": 0}, **NO_ASSOCIATION_FLOOR}
    )
    node.start()
    pid = node.proc.pid
    src = tmp_path / "src"
    src.mkdir()
    files = [write_dx(src / f"{i:03d}.dcm", DXSpec(rows=64, columns=64, seed=i)) for i in range(120)]

    times: dict[str, float] = {}

    def outage() -> None:
        time.sleep(4)
        own_postgres.stop()
        times["down"] = time.monotonic()
        time.sleep(OUTAGE_S)
        own_postgres.start()
        times["up"] = time.monotonic()

    t0 = time.monotonic()
    controller = threading.Thread(target=outage, daemon=True)
    controller.start()

    pending = list(files)
    attempts = 0
    statuses: collections.Counter = collections.Counter()
    comments: collections.Counter = collections.Counter()
    acked: dict[Path, float] = {}
    refused_while_down = 0
    first_success_after_up: float | None = None
    deadline = t0 + OUTAGE_S + 120
    while (pending or controller.is_alive()) and time.monotonic() < deadline:
        batch = pending[:4] or files[:1]  # once all are in, keep probing with a re-send
        for f, status, comment in storescu_statuses(node.port, batch, timeout=120):
            attempts += 1
            statuses[f"0x{status:04X}" if status is not None else "none"] += 1
            now = time.monotonic()
            if status == 0:
                acked.setdefault(f, now)
                if f in pending:
                    pending.remove(f)
                if "up" in times and first_success_after_up is None:
                    first_success_after_up = now
            else:
                comments[re.sub(r" \(ref \w+\)", "", comment)] += 1
                if "down" in times and "up" not in times:
                    refused_while_down += 1
        time.sleep(0.2)
    controller.join(5)
    echoed = echo(node.port)

    rows = node_rows(node, Instance)
    held = {(r.sop_instance_uid, r.sha256) for r in rows if Path(r.path).is_file()}
    from pydicom import dcmread

    want = {f: (str(dcmread(f, stop_before_pixels=True).SOPInstanceUID), dataset_sha256(f)) for f in acked}
    stored = sum(want[f] in held for f in acked)
    spool_files = {str(p) for p in node.spool.rglob("*.dcm") if ".incoming" not in p.parts}
    temp = list((node.spool / ".incoming").glob("*"))
    per_uid = collections.Counter(r.sop_instance_uid for r in rows)
    recovery_s = round(first_success_after_up - times["up"], 2) if first_success_after_up and "up" in times else None
    figures.add(
        f"PostgreSQL stopped {OUTAGE_S} s mid-stream",
        cases=len(files),
        attempts=attempts,
        acknowledged=len(acked),
        stored=stored,
        lost=len(acked) - stored,
        duplicated=sum(n - 1 for n in per_uid.values() if n > 1),
        statuses=dict(sorted(statuses.items())),
        comments=dict(comments),
        refused_while_down=refused_while_down,
        outage_s=round(times["up"] - times["down"], 1) if "up" in times else None,
        recovery_s=recovery_s,
        temp_files=len(temp),
        rows_without_file=len({r.path for r in rows} - spool_files),
        files_without_row=len(spool_files - {r.path for r in rows}),
        restarted=node.proc.pid != pid,
    )

    assert "down" in times and "up" in times, "the outage did not happen as planned"
    assert refused_while_down > 0, "nothing was sent while the database was down"
    assert set(statuses) <= {"0x0000", "0xA700"}, statuses
    assert set(comments) <= {"database unavailable"}, comments
    assert len(acked) == len(files) and not pending, f"{len(pending)} never stored after the database came back"
    assert stored == len(acked)
    assert not temp
    assert {r.path for r in rows} == spool_files
    assert max(per_uid.values()) == 1
    assert recovery_s is not None
    assert node.proc.poll() is None and node.proc.pid == pid
    assert echoed
