"""Retention under a small soak: delivered studies and their overlays go, an undelivered one stays, orphans are swept.

Finding 7: in a 2,000-instance soak the spool held 259 MB and the class
activation overlays 376 MB, and nothing ever deleted either. Finding 8 (in
part): a crash between a receive's write and its commit left a spool file
with no row that nothing swept. Here a running ``nnrouter serve`` (classifier
on, so overlays are made) forwards five studies to a DCMTK storescp and one
to a destination that is down; then ``nnrouter clean`` runs as an admin would,
with ``keep_days`` 0, beside the running node.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, needs
from dicomfiles import node_rows, wait_for
from pydicom import dcmread
from pydicom.uid import generate_uid

from nnrouter.core.spool import Spool
from nnrouter.core.store import Instance, Outbox, OutboxState, Study
from nnrouter.testing import peers

pytestmark = [pytest.mark.slow, needs("storescu", "storescp")]

STUDIES, IMAGES = 6, 10  # the last study goes to the destination that is down


def _mb(folder: Path, pattern: str) -> float:
    return sum(f.stat().st_size for f in folder.rglob(pattern) if f.is_file()) / 1e6 if folder.exists() else 0.0


def test_retention_soak(node_factory, storescp, tmp_path, figures):
    from nnrouter.testing.synthetic import write_series

    rules_file = tmp_path / "routes.yaml"
    rules_file.write_text(
        yaml.safe_dump(
            {
                "settings": {"quiet_s": 0.5},
                "destinations": [
                    {"name": "archive", "ae_title": storescp.aet, "host": "127.0.0.1", "port": storescp.port},
                    {
                        "name": "down",
                        "ae_title": "DOWN",
                        "host": "127.0.0.1",
                        "port": peers.free_port(),
                        "retry": {"max_retries": 1000, "first_delay_s": 1, "multiplier": 1, "max_delay_s": 1},
                    },
                ],
                "rules": [
                    {
                        "name": "held_back",
                        "priority": 1,
                        "when": {"calling_ae": ["HELDBACK"]},
                        "then": {"forward": ["down"]},
                    },
                    {"name": "everything", "priority": 10, "then": {"forward": ["archive"]}},
                ],
            }
        )
    )
    node = node_factory(
        settings={
            "models": {"classifier": str(REPO / "models" / "nnrouter-view")},
            "workers": {"count": 1, "max_wait_ms": 0, "poll_ms": 100},
            "routing": {"rules": str(rules_file), "tick_s": 0.3},
            "retention": {"keep_days": 1},  # nothing goes while the node runs; the admin's pass below uses 0
        }
    ).start()
    sent = 0
    acked = 0
    for i in range(STUDIES):
        files = write_series(tmp_path / f"in{i}", IMAGES, rows=256, columns=256)
        res = peers.storescu(node.port, files, aet="HELDBACK" if i == STUDIES - 1 else "STORESCU")
        sent += len(files)
        acked += res.stderr.count("Received Store Response (Success)")
    total = STUDIES * IMAGES
    assert acked == total
    delivered = (STUDIES - 1) * IMAGES

    def settled():  # type: ignore[no-untyped-def]
        rows = node_rows(node, Outbox)
        done = [o for o in rows if o.destination == "archive" and o.state == OutboxState.SENT]
        waiting = [o for o in rows if o.destination == "down"]
        return (
            len(done) == delivered and len(waiting) == IMAGES
        ) or f"{len(done)} sent, {len(waiting)} to the dead peer"

    wait_for(settled, timeout=240)
    spool_before, overlays_before = _mb(node.spool, "*.dcm"), _mb(node.home / "derived", "*.png")
    assert overlays_before > 0, "the classifier made no overlays"
    # A crash between a receive's rename and its commit: a spool file with no row, older than the grace period.
    orphan = Spool(node.spool).path_for(generate_uid(), generate_uid(), generate_uid(), 1)
    Spool(node.spool).keep([b"\0" * 128 + b"DICM" + os.urandom(50_000)], orphan)
    old = time.time() - 2 * 3600
    os.utime(orphan, (old, old))

    env = {**os.environ, "NNROUTER_RETENTION__KEEP_DAYS": "0"}
    started = time.monotonic()

    def clean(*args: str) -> dict:
        res = subprocess.run(
            [sys.executable, "-m", "nnrouter", "clean", "--json", *args, "--config", str(node.config_path)],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        assert res.returncode == 0, res.stderr[-2000:]
        return json.loads(res.stdout)

    preview = clean("--dry-run")
    assert len(preview["studies"]) == STUDIES - 1 and preview["sweep"]["orphan_files"] == 1
    assert orphan.exists() and _mb(node.spool, "*.dcm") == pytest.approx(spool_before + orphan.stat().st_size / 1e6)
    done = clean()
    clean_s = time.monotonic() - started
    spool_after, overlays_after = _mb(node.spool, "*.dcm"), _mb(node.home / "derived", "*.png")

    assert len(done["studies"]) == STUDIES - 1 and done["totals"]["files"] == delivered
    assert done["sweep"]["orphan_files"] == 1 and not orphan.exists()
    kept = node_rows(node, Instance)
    assert len(kept) == IMAGES and all(Path(i.path).exists() for i in kept)  # the undelivered study, untouched
    assert len(node_rows(node, Study)) == 1
    assert sum(1 for _ in (node.home / "derived").rglob("*.png")) == IMAGES
    at_archive = {
        str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in storescp.folder.iterdir() if f.is_file()
    }
    lost = delivered - len(at_archive)
    figures.add(
        "retention soak (keep_days 0, one destination down)",
        cases=total,
        acknowledged=acked,
        stored=len(at_archive) + len(kept),
        lost=lost,
        duplicated=0,
        studies_cleaned=len(done["studies"]),
        studies_kept=1,
        kept_because=done["kept"],
        spool_mb_before=round(spool_before, 2),
        spool_mb_after=round(spool_after, 2),
        overlays_mb_before=round(overlays_before, 2),
        overlays_mb_after=round(overlays_after, 2),
        overlay_to_spool=round(overlays_before / spool_before, 2),
        orphans_swept=done["sweep"]["orphan_files"],
        clean_s=round(clean_s, 2),
    )
    assert lost == 0
    assert spool_after == pytest.approx(spool_before / STUDIES, rel=0.05)
