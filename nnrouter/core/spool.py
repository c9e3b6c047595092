"""The spool: received instances on disk, written so that none is ever lost.

A file is first written under a temporary name, fsync'd, renamed into place,
and the folder fsync'd too: after ``keep`` returns, the bytes survive a crash
or a power cut. Only then may the row be committed and the sender told
"success". The layout (study/series/instance UID) lets a person find a file
without the database.

A file renamed into place whose row was never committed (a crash in
between) was never acknowledged either; the cleaner (``nnrouter.service.clean``)
sweeps such files once they are older than ``retention.orphan_grace_s``.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import uuid
from pathlib import Path

_SAFE_UID = re.compile(r"^[0-9][0-9.]{0,63}$")


def _component(uid: str) -> str:
    """A UID as a path component; anything odd (a malformed UID) is hashed."""
    if _SAFE_UID.match(uid) and ".." not in uid:
        return uid
    return "x" + hashlib.sha1(uid.encode("utf-8", "replace")).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.tmp = self.root / ".incoming"
        self.tmp.mkdir(parents=True, exist_ok=True)

    def sweep_incoming(self) -> int:
        """Remove temp files left by a crash; only the receiver calls this, at start.

        A temp file exists only between write and rename, so it was never
        acknowledged and is safe to remove.
        """
        n = 0
        for leftover in self.tmp.iterdir():
            leftover.unlink(missing_ok=True)
            n += 1
        return n

    def free_mb(self) -> float:
        return shutil.disk_usage(self.root).free / (1024 * 1024)

    def path_for(self, study_uid: str, series_uid: str, sop_uid: str, version: int) -> Path:
        name = _component(sop_uid) + (f".v{version}" if version > 1 else "") + ".dcm"
        return self.root / _component(study_uid) / _component(series_uid) / name

    def _makedirs(self, folder: Path) -> None:
        """Create folders and fsync each new one's parent, so the entry itself is durable."""
        missing = []
        probe = folder
        while not probe.exists():
            missing.append(probe)
            probe = probe.parent
        for new in reversed(missing):
            try:
                new.mkdir()
            except FileExistsError:
                continue
            _fsync_dir(new.parent)

    def keep(self, chunks: list[bytes], dest: Path) -> int:
        """Write ``chunks`` durably at ``dest``; returns the size in bytes."""
        tmp = self.tmp / f"{uuid.uuid4().hex}.part"
        size = 0
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                for chunk in chunks:
                    view = memoryview(chunk)
                    while view:
                        n = os.write(fd, view)
                        view = view[n:]
                        size += n
                os.fsync(fd)
            finally:
                os.close(fd)
            self._makedirs(dest.parent)
            os.replace(tmp, dest)
            _fsync_dir(dest.parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return size

    def discard(self, dest: Path) -> None:
        """Remove a file whose row could not be committed (never acknowledged)."""
        dest.unlink(missing_ok=True)
