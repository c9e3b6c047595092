"""kill -9 while a modality is sending: everything acknowledged survives."""

from __future__ import annotations

import hashlib
import subprocess
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select, text

from conftest import needs
from dicomfiles import dataset_bytes
from nnrouter import peers
from nnrouter.store import Instance, Store
from nnrouter.synthetic import write_series

pytestmark = [needs("storescu"), pytest.mark.slow]

FILES = 200
KILL_AFTER = 60


def test_kill_9_mid_stream_loses_nothing_acknowledged(node_factory, database_url, tmp_path):
    files = write_series(tmp_path / "in", FILES, rows=256, columns=256)
    node = node_factory(database_url=database_url).start()

    proc = subprocess.Popen(
        ["storescu", "-v", "-aec", node.ae_title, "127.0.0.1", str(node.port), *map(str, files)],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, bufsize=1,
    )
    acked: list[Path] = []
    current: Path | None = None
    deadline = time.monotonic() + 120
    assert proc.stderr is not None
    for line in proc.stderr:
        if "Sending file:" in line:
            current = Path(line.split("Sending file:", 1)[1].strip())
        elif "Received Store Response (Success)" in line and current is not None:
            acked.append(current)
            if len(acked) == KILL_AFTER:
                node.kill9()
        if time.monotonic() > deadline:
            break
    proc.wait(30)
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
                    text("SELECT count(*) FROM instance i LEFT JOIN series se ON se.id = i.series_id WHERE se.id IS NULL")
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
