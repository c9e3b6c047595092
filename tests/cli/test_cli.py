"""The command line against real peers: send/echo to DCMTK, status and study show of a node."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import needs, pydicom_data
from dicomfiles import by_sop_uid, dataset_bytes
from pydicom import dcmread
from pydicom.uid import generate_uid

from nnrouter.testing import peers
from nnrouter.testing.synthetic import write_series

pytestmark = needs("storescp", "storescu")


def nnrouter(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nnrouter", *args], check=False, capture_output=True, text=True, timeout=120
    )


def test_echo(storescp):
    ok = nnrouter("echo", "127.0.0.1", str(storescp.port), "--aec", storescp.aet)
    assert ok.returncode == 0 and "status 0x0000" in ok.stdout
    closed = nnrouter("echo", "127.0.0.1", str(peers.free_port()), "--aec", "NOBODY")
    assert closed.returncode == 1 and "echo failed" in closed.stderr

    # --json: the same answers, one document on stdout.
    ok = nnrouter("echo", "127.0.0.1", str(storescp.port), "--aec", storescp.aet, "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout) == {
        "host": "127.0.0.1",
        "port": storescp.port,
        "calling_ae": "NNROUTER_SCU",
        "called_ae": storescp.aet,
        "ok": True,
        "status": 0,
        "error": None,
    }
    closed = nnrouter("echo", "127.0.0.1", str(peers.free_port()), "--aec", "NOBODY", "--json")
    answer = json.loads(closed.stdout)
    assert closed.returncode == 1 and answer["ok"] is False and answer["status"] is None and answer["error"]


def test_send_files_and_folders_on_one_association(storescp, tmp_path):
    series = write_series(tmp_path / "study", 3, rows=64, columns=64)
    j2k = pydicom_data("RG1_J2KR.dcm")
    res = nnrouter("send", "127.0.0.1", str(storescp.port), str(tmp_path / "study"), str(j2k), "--aec", storescp.aet)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "4 sent, 0 failed" in res.stdout
    got = by_sop_uid(storescp.folder)
    assert len(got) == 4
    # The JPEG 2000 file travelled in its own syntax, pixel data untouched.
    uid = str(dcmread(j2k, stop_before_pixels=True).SOPInstanceUID)
    assert dcmread(got[uid]).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"
    assert dcmread(got[uid]).PixelData == dcmread(j2k).PixelData
    for f in series:
        assert dataset_bytes(got[str(dcmread(f).SOPInstanceUID)]) == dataset_bytes(f)


def test_send_reports_unreadable_files(storescp, tmp_path):
    junk = tmp_path / "notes.txt"
    junk.write_text("not dicom")
    good = write_series(tmp_path / "s", 1, rows=32, columns=32)[0]
    res = nnrouter("send", "127.0.0.1", str(storescp.port), str(junk), str(good), "--aec", storescp.aet)
    assert res.returncode == 1
    assert "not sent" in res.stdout and "1 sent, 1 failed" in res.stdout

    res = nnrouter("send", "127.0.0.1", str(storescp.port), str(junk), str(good), "--aec", storescp.aet, "--json")
    out = json.loads(res.stdout)
    assert res.returncode == 1 and (out["sent"], out["failed"], out["error"]) == (1, 1, None)
    by_path = {f["path"]: f for f in out["files"]}
    assert by_path[str(junk)]["ok"] is False and by_path[str(junk)]["status"] is None
    assert by_path[str(good)] == {"path": str(good), "ok": True, "status": 0, "comment": None}


def test_status_and_study_show(node_factory, tmp_path):
    node = node_factory().start()
    study_uid = generate_uid()
    files = write_series(tmp_path / "in", 2, rows=64, columns=64, study_uid=study_uid)
    sent = nnrouter("send", "127.0.0.1", str(node.port), *map(str, files), "--aec", node.ae_title)
    assert sent.returncode == 0, sent.stdout + sent.stderr

    status = json.loads(node.cli("status", "--json").stdout)
    assert status["instances"] == {"total": 2, "by_state": {"received": 2}}
    assert status["schema"]["current"] == status["schema"]["head"]

    show = json.loads(node.cli("study", "show", study_uid, "--json").stdout)
    assert show["study_uid"] == study_uid and len(show["series"]) == 1
    insts = show["series"][0]["instances"]
    assert sorted(i["sop_instance_uid"] for i in insts) == sorted(str(dcmread(f).SOPInstanceUID) for f in files)
    assert all(i["state"] == "received" and i["path"].startswith(str(node.spool)) for i in insts)
    # Patient data is not part of this operator view.
    assert "SYNTHETIC" not in json.dumps(show)

    missing = node.cli("study", "show", "1.2.3.4", check=False)
    assert missing.returncode == 1 and "no study" in missing.stderr
