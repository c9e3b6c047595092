"""Disk full, for real: the spool, and separately the SQLite database, on a small tmpfs.

A modality that is told 0xA700 (out of resources) keeps its copy and tries
again later; one told success must never lose the image. So when the disk
fills, the sender must get 0xA700, not 0x0110 and not the database's words;
nothing half-written may stay (no temp files, no rows without files, no
files without rows); the node keeps answering (C-ECHO); and once space
returns it stores again without a restart.

``storage.min_free_mb`` is the first line of defence (a refusal before the
disk is full); ``min_free_mb: 0`` lets the write itself hit ENOSPC, which is
what happens when something else fills the disk faster than the check can
see. Back-pressure at association time (``limits.refuse_below_free_mb``) is
set to 0 here so that these C-STORE paths are what is tested.

Needs root to mount a tmpfs (CI runs as root); skipped with the reason otherwise.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import sqlite3
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import needs
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


@pytest.fixture
def tmpfs(tmp_path):  # type: ignore[no-untyped-def]
    """Mount small tmpfs folders under the test's tmp dir; all unmounted at the end."""
    mounted: list[Path] = []

    def mount(name: str, size_mb: int) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root (CI runs the tests as root)")
        folder = tmp_path / name
        folder.mkdir()
        res = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(folder)],
            check=False,
            capture_output=True,
            text=True,
        )
        if res.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs: {res.stderr.strip() or res.returncode}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):
        if subprocess.run(["umount", str(folder)], check=False, capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], check=False, capture_output=True)


def _by_status(answers: list[tuple[Path, int | None, str]]) -> dict[str, int]:
    return dict(sorted(collections.Counter(f"0x{s:04X}" if s is not None else "none" for _, s, _ in answers).items()))


def _fill(folder: Path, leave_kb: int) -> Path:
    """A filler file that leaves about ``leave_kb`` free on the file system of ``folder``."""
    filler = folder / "filler.bin"
    free = shutil.disk_usage(folder).free
    size = max(free - leave_kb * 1024, 0)
    with open(filler, "wb") as f:
        block = b"\xff" * (1 << 20)
        while size > 0:
            size -= f.write(block[: min(size, len(block))])
    return filler


def _consistent(node: peers.Node, spool: Path) -> dict[str, int]:
    """Temp files, rows without files, files without rows."""
    rows = node_rows(node, Instance)
    files = {str(p) for p in spool.rglob("*.dcm") if ".incoming" not in p.parts}
    temp = list((spool / ".incoming").glob("*")) if (spool / ".incoming").exists() else []
    paths = {r.path for r in rows}
    return {"temp_files": len(temp), "rows_without_file": len(paths - files), "files_without_row": len(files - paths)}


def _stored(node: peers.Node, files: list[Path]) -> int:
    """Of ``files``, how many the node holds byte for byte."""
    rows = {(r.sop_instance_uid, r.sha256) for r in node_rows(node, Instance) if Path(r.path).is_file()}
    n = 0
    for f in files:
        from pydicom import dcmread

        uid = str(dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        n += (uid, dataset_sha256(f)) in rows
    return n


def _recover(node: peers.Node, files: list[Path], filler: Path) -> tuple[float, list[tuple[Path, int | None, str]]]:
    """Free the space; the seconds until a store succeeds again, and the answers for ``files``."""
    filler.unlink()
    t0 = time.monotonic()
    while True:
        [(_, status, _)] = storescu_statuses(node.port, files[:1])
        if status == 0:
            break
        assert time.monotonic() - t0 < 60, "no recovery within 60 s of the space returning"
        time.sleep(0.5)
    recovery = time.monotonic() - t0
    return recovery, storescu_statuses(node.port, files[1:])


CLEAN = {"temp_files": 0, "rows_without_file": 0, "files_without_row": 0}


@dataclass
class Outcome:
    """What a stream into the full disk got, what the node held then, and how it did once space returned."""

    cases: int
    acked: list[Path]
    refused: list[tuple[Path, int | None, str]]
    statuses: dict[str, int]
    served: bool  # C-ECHO answered while full
    state: dict[str, int]  # _consistent() while full
    stored: int  # of the acknowledged, held byte for byte
    recovery_s: float
    recovered: int  # of the refused, stored once space returned
    final: dict[str, int]  # _consistent() after

    def figure(self) -> dict:
        return dict(
            cases=self.cases,
            acknowledged=len(self.acked),
            stored=self.stored,
            lost=len(self.acked) - self.stored,
            statuses=self.statuses,
            comments=sorted({re.sub(r" \(ref \w+\)", "", c) for _, _, c in self.refused}),
            echo_while_full=self.served,
            recovery_s=round(self.recovery_s, 2),
            stored_after_recovery=self.recovered,
            **self.state,
        )


def _fill_then_free(node: peers.Node, spool: Path, files: list[Path], filler: Path) -> Outcome:
    """Stream ``files`` into the full disk and look; then free the space and send the refused ones again."""
    answers = storescu_statuses(node.port, files)
    acked = [f for f, s, _ in answers if s == 0]
    refused = [(f, s, c) for f, s, c in answers if s != 0]
    statuses = _by_status(answers)
    served = echo(node.port)
    state = _consistent(node, spool)
    stored = _stored(node, acked)

    recovery_s, again = _recover(node, [f for f, _, _ in refused], filler)
    recovered = sum(1 for _, s, _ in again if s == 0) + 1
    return Outcome(
        len(files), acked, refused, statuses, served, state, stored, recovery_s, recovered, _consistent(node, spool)
    )


@pytest.mark.parametrize("min_free_mb", [0, 4], ids=["enospc", "threshold"])
def test_spool_disk_full(tmpfs, node_factory, tmp_path, figures, min_free_mb):
    disk = tmpfs("spool_fs", 20)
    spool = disk / "spool"
    node = node_factory(settings={"storage": {"path": str(spool), "min_free_mb": min_free_mb}, **NO_ASSOCIATION_FLOOR})
    node.start()
    filler = _fill(disk, leave_kb=8 * 1024)  # 8 MB left: about 15 of the 0.5 MB images
    src = tmp_path / "src"
    src.mkdir()
    files = [write_dx(src / f"{i:03d}.dcm", DXSpec(rows=512, columns=512, seed=i)) for i in range(30)]

    run = _fill_then_free(node, spool, files, filler)
    figures.add(f"spool disk full ({'ENOSPC' if min_free_mb == 0 else f'min_free_mb {min_free_mb}'})", **run.figure())

    assert run.acked and run.refused, "the disk never filled, or nothing fitted: resize the test"
    assert all(s == 0xA700 for _, s, _ in run.refused), run.refused
    expected = "spool disk full" if min_free_mb == 0 else f"spool below {min_free_mb} MB free"
    assert all(c.startswith(expected) for _, _, c in run.refused), run.refused
    assert run.stored == len(run.acked)
    assert run.served
    assert run.state == CLEAN
    assert run.recovered == len(run.refused)
    assert run.final == CLEAN
    assert _stored(node, files) == len(files)
    assert node.proc.poll() is None


def test_sqlite_database_disk_full(tmpfs, node_factory, tmp_path, figures):
    disk = tmpfs("db_fs", 8)
    node = node_factory(
        database_url=f"sqlite:///{disk / 'nnrouter.db'}",
        settings={"storage": {"min_free_mb": 0}, **NO_ASSOCIATION_FLOOR},
    )
    node.start()
    filler = _fill(disk, leave_kb=256)  # room for a few commits' worth of WAL frames
    src = tmp_path / "src"
    src.mkdir()
    files = [write_dx(src / f"{i:03d}.dcm", DXSpec(rows=64, columns=64, seed=i)) for i in range(60)]

    run = _fill_then_free(node, node.spool, files, filler)
    db = sqlite3.connect(str(disk / "nnrouter.db"))
    integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
    db.close()
    figures.add("SQLite database disk full", **run.figure(), integrity=integrity)

    assert run.acked and run.refused, "the database never filled, or nothing fitted: resize the test"
    assert all(s == 0xA700 for _, s, _ in run.refused), run.refused
    assert all(c.startswith("database disk full") for _, _, c in run.refused), run.refused
    for _, _, comment in run.refused:  # the driver's words stay in the log
        assert "sqlite" not in comment.lower() and "Error" not in comment and str(disk) not in comment
    assert run.stored == len(run.acked)
    assert run.served
    assert run.state == CLEAN
    assert run.recovered == len(run.refused)
    assert run.final == CLEAN
    assert integrity == "ok"
    assert _stored(node, files) == len(files)
    assert node.proc.poll() is None
