"""logging.format auto: readable lines on a terminal, JSON lines into a pipe, no patient data either way."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import textwrap

from nnrouter.core.config import Settings

# A logged patient name, and one in a local variable of a frame in a logged traceback.
SCRIPT = textwrap.dedent("""
    import sys
    from nnrouter.core import logs

    logs.setup("info", sys.argv[1])
    log = logs.get("test")
    log.info("study_received", study_uid="1.2.3.4", patient_name="DOE^JANE^Q")

    def decode(patient="DOE^JANE^Q"):
        raise ValueError("unsupported transfer syntax")

    try:
        decode()
    except ValueError:
        log.exception("decode_failed")
""")


def run_on_a_terminal(fmt: str) -> str:
    """The script's stderr as a pseudo-terminal shows it."""
    main, side = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, fmt], stdin=subprocess.DEVNULL, stdout=side, stderr=side)
    os.close(side)
    out = b""
    try:
        while True:
            ready, _, _ = select.select([main], [], [], 60)
            if not ready:
                break
            try:
                chunk = os.read(main, 4096)
            except OSError:  # the other end closed (Linux answers EIO)
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(main)
        proc.wait(timeout=60)
    assert proc.returncode == 0, out
    return out.decode()


def test_auto_is_the_default():
    assert Settings().logging.format == "auto"


def test_auto_on_a_terminal_is_console_lines_without_patient_data():
    text = run_on_a_terminal("auto")
    assert "study_received" in text and "study_uid" in text and "1.2.3.4" in text
    assert "<redacted>" in text and "ValueError: unsupported transfer syntax" in text
    assert "DOE" not in text  # neither the logged key nor the traceback frame's local variable
    assert not [line for line in text.splitlines() if line.lstrip().startswith("{")]  # not JSON


def test_auto_into_a_pipe_is_json_lines_without_patient_data():
    res = subprocess.run(
        [sys.executable, "-c", SCRIPT, "auto"], check=False, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    events = [json.loads(line) for line in res.stderr.splitlines()]
    assert [e["event"] for e in events] == ["study_received", "decode_failed"]
    assert events[0]["patient_name"] == "<redacted>" and events[0]["study_uid"] == "1.2.3.4"
    assert "ValueError: unsupported transfer syntax" in events[1]["exception"]
    assert "DOE" not in res.stderr


def test_json_stays_json_on_a_terminal():
    text = run_on_a_terminal("json")
    events = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert [e["event"] for e in events] == ["study_received", "decode_failed"] and "DOE" not in text
