"""``nnrouter bench soak``: a short run of the real thing (the 30-minute one is in the README)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_soak_smoke_run(tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "nnrouter",
            "bench",
            "soak",
            "--seconds",
            "30",
            "--senders",
            "3",
            "--per-association",
            "5",
            "--interval-s",
            "5",
            "--workdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    out = res.stdout
    assert res.returncode in (0, 1), res.stdout + res.stderr
    # An RSS line per interval, for the main process and each stage process by role.
    lines = [line for line in out.splitlines() if re.match(r"\[\s*\d+:\d\d\]", line)]
    assert len(lines) >= 3, out
    for role in ("main", "worker-1", "router"):
        assert f"{role} " in lines[-1], lines[-1]
    # Many associations, fresh instances, every one acknowledged, stored and in the spool.
    m = re.search(r"counts: acknowledged (\d+), stored rows (\d+), spool files (\d+): (\w+)", out)
    assert m, out
    acked, rows, files, verdict = int(m[1]), int(m[2]), int(m[3]), m[4]
    assert acked > 0 and acked == rows == files and verdict == "OK", out
    assert int(re.search(r"over (\d+) associations", out)[1]) > acked / 5 - 3  # type: ignore[index]
    assert "failed stores" in out and not re.search(r"FAIL: (counts|\d+ stores)", out), out
    # 30 s is too short to judge memory growth, so a FAIL line about RSS is allowed here; nothing else.
    assert all("RSS of" in f for f in re.findall(r"FAIL: .*", out)), out
    assert (res.returncode == 0) == ("soak OK" in out)
