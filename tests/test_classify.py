"""Workers: claim, decode, infer, record; and nothing lost when a worker dies."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest
from pydicom import dcmread
from sqlalchemy import select

from conftest import needs, pydicom_data, shared_files
from dicomfiles import send_as_is
from nnrouter import peers
from nnrouter.classify import Queue, Worker, patient_corners
from nnrouter.config import load
from nnrouter.store import Instance, InstanceState, Store
from nnrouter.synthetic import write_series
from test_detect import detector
from test_runtime import make_model

pytestmark = needs("storescu")

# What the decode stage must conclude about each real broken file.
BAD_OUTCOME = {
    "dx_chest_j2k_corrupt_codestream.dcm": InstanceState.UNDECODABLE,
    "wrong_transfer_syntax.dcm": InstanceState.UNDECODABLE,
}


def _rows(url: str) -> list[Instance]:
    store = Store(url)
    try:
        with store.read() as s:
            rows = s.execute(select(Instance).order_by(Instance.id)).scalars().all()
            for r in rows:  # load relationships while the session is open
                _ = r.predictions, r.detections
            return rows
    finally:
        store.dispose()


def _send(node: peers.Node, files: list[Path], tmp_path: Path) -> None:
    res = peers.storescu(node.port, files, config=peers.storescu_config(files, tmp_path / "scu.cfg"))
    assert res.stderr.count("Received Store Response (Success)") == len(files), res.stderr[-2000:]


def test_worker_classifies_and_detects_real_radiographs(node_factory, database_url, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    classifier = make_model(models, cam=True, unknown_threshold=0.0, scores_are="logits")
    regions = detector(models, "ultralytics")
    node = node_factory(
        database_url=database_url,
        settings={"models": {"classifier": str(classifier), "detector": str(regions)}, "workers": {"batch_size": 4, "max_wait_ms": 0}},
    ).start()
    good = [pydicom_data("RG1_UNCI.dcm"), pydicom_data("RG3_J2KR.dcm")] + shared_files("good")
    bad = shared_files("bad")
    _send(node, good, tmp_path)
    assert [s for s, _ in send_as_is(node.port, bad)] == [0] * len(bad)

    res = node.cli("worker", "--until-empty")
    totals = json.loads(res.stdout.strip().splitlines()[-1])
    rows = _rows(node.db_url)
    def rows_of(f: Path) -> list[Instance]:
        uid = str(dcmread(f, stop_before_pixels=True, force=True).SOPInstanceUID).strip()
        return [r for r in rows if r.sop_instance_uid == uid]

    for f in good:
        assert all(r.state == InstanceState.CLASSIFIED for r in rows_of(f)), [(f.name, r.state, r.state_reason) for r in rows_of(f)]
    for r in rows:
        if r.state != InstanceState.CLASSIFIED:
            continue
        (p,) = r.predictions
        assert p.model_name == "toy" and p.provider == "CPUExecutionProvider"
        assert len(p.top5) == 5 and p.top5[0][0] == p.label and abs(p.top5[0][1] - p.score) < 1e-6
        assert p.decode_ms > 0 and p.infer_ms > 0
        cam = cv2.imread(p.cam_path)
        assert cam is not None and max(cam.shape[:2]) == 256
        # The toy detector always finds its boxes; they are mapped to the original pixel grid.
        assert r.detections and all(0 <= d.box_px[0] < d.box_px[2] <= r.columns + 1e-6 for d in r.detections)
        hdr = dcmread(r.path, stop_before_pixels=True)
        spacing = hdr.get("PixelSpacing") or hdr.get("ImagerPixelSpacing")
        usable = spacing is not None and all(float(v) > 0 for v in spacing)  # some CRs say 0.000
        for d in r.detections:
            if usable:
                assert d.box_mm == pytest.approx([d.box_px[0] * float(spacing[1]), d.box_px[1] * float(spacing[0]),
                                                  d.box_px[2] * float(spacing[1]), d.box_px[3] * float(spacing[0])], abs=0.05)
            else:
                assert d.box_mm is None
    for f in bad:
        (row,) = rows_of(f)
        expected = BAD_OUTCOME.get(f.name, InstanceState.CLASSIFIED)
        assert row.state == expected, (f.name, row.state, row.state_reason)
        if expected == InstanceState.UNDECODABLE:
            assert row.state_reason
    assert totals["undecodable"] == sum(1 for v in BAD_OUTCOME.values() if v == InstanceState.UNDECODABLE)

    (j2k,) = rows_of(pydicom_data("RG3_J2KR.dcm"))[:1]
    show = json.loads(node.cli("study", "show", _study_of(node, j2k), "--json").stdout)
    inst = show["series"][0]["instances"][0]
    assert inst["predictions"][0]["model"] == "toy 0.0.1" and inst["detections"]


def _study_of(node: peers.Node, row: Instance) -> str:
    store = Store(node.db_url)
    try:
        with store.read() as s:
            return s.get(Instance, row.id).series.study.study_uid
    finally:
        store.dispose()


def test_without_models_instances_are_decoded_only(node_factory, tmp_path):
    node = node_factory().start()
    _send(node, write_series(tmp_path / "in", 3, rows=64, columns=64), tmp_path)
    node.cli("worker", "--until-empty")
    assert [r.state for r in _rows(node.db_url)] == [InstanceState.DECODED] * 3


def test_worker_killed_mid_batch_loses_nothing(node_factory, tmp_path):
    """kill -9 a worker holding claims: after the lease, another worker finishes the job."""
    models = tmp_path / "models"
    models.mkdir()
    classifier = make_model(models)
    node = node_factory(
        settings={
            "models": {"classifier": str(classifier)},
            # A batch larger than the work, and a long wait to fill it: the
            # worker sits on its claims, and that is when it dies.
            "workers": {"batch_size": 64, "max_wait_ms": 60000, "lease_s": 2, "poll_ms": 50},
        }
    ).start()
    _send(node, write_series(tmp_path / "in", 12, rows=64, columns=64), tmp_path)
    worker = subprocess.Popen([sys.executable, "-m", "nnrouter", "worker", "--config", str(node.config_path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if [r.state for r in _rows(node.db_url)] == [InstanceState.CLASSIFYING] * 12:
            break
        time.sleep(0.05)
    else:
        worker.kill()
        pytest.fail("worker never claimed the instances")
    worker.send_signal(signal.SIGKILL)
    worker.wait()

    # A second worker, right away: the claims are still leased, nothing to take.
    node.settings["workers"] = {"batch_size": 64, "max_wait_ms": 0, "lease_s": 2, "poll_ms": 50}
    node.write_config()
    assert json.loads(node.cli("worker", "--until-empty").stdout.splitlines()[-1]) == {}
    time.sleep(2.2)
    totals = json.loads(node.cli("worker", "--until-empty").stdout.splitlines()[-1])
    assert totals["classified"] == 12
    rows = _rows(node.db_url)
    assert all(r.state == InstanceState.CLASSIFIED and r.attempts == 2 and len(r.predictions) == 1 for r in rows)


def test_claims_are_exclusive_and_failures_give_up(database_url, tmp_path):
    """Two queues never hold the same instance; inference that keeps failing ends as failed."""
    store = Store(database_url)
    store.upgrade()
    settings = load(None).model_copy(update={"database": load(None).database.model_copy(update={"url": database_url})})
    from nnrouter.receive import Header, Receiver
    from nnrouter.spool import Spool

    receiver = Receiver(settings, store, Spool(tmp_path / "spool"))
    files = write_series(tmp_path / "in", 6, rows=32, columns=32)
    for f in files:
        ds = dcmread(f)
        receiver.keep(
            Header(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SOPClassUID, {}, {}, {}),
            b"\0" * 128 + b"DICM", memoryview(f.read_bytes()[132:]),
            {"transfer_syntax_uid": "1.2.840.10008.1.2.1"},
        )
    a = Queue(store, "a", lease_s=60, max_attempts=2)
    b = Queue(store, "b", lease_s=60, max_attempts=2)
    got_a, got_b = a.claim(4), b.claim(4)
    assert len(got_a) == 4 and len(got_b) == 2
    assert not {c.id for c in got_a} & {c.id for c in got_b}
    assert b.claim(4) == []
    a.release(got_a, "test")
    b.release(got_b, "test")

    class Exploding:
        card = None
        timings = None

        def classify(self, images):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    worker = Worker(settings.model_copy(update={"workers": settings.workers.model_copy(update={"max_attempts": 2, "max_wait_ms": 0})}),
                    store, classifier=Exploding())
    for _ in range(3):
        worker.process(worker.next_batch())
    with store.read() as s:
        rows = s.execute(select(Instance)).scalars().all()
    assert {r.state for r in rows} == {InstanceState.FAILED}
    assert all("gave up after 2 attempts" in r.state_reason for r in rows)
    store.dispose()


def test_patient_corners_for_a_ct_localizer():
    # Axial-ish localizer: rows along +x, columns along -z, 0.5 mm columns, 2 mm rows.
    geo = {"ipp": [-250.0, 0.0, 100.0], "iop": [1, 0, 0, 0, 0, -1], "spacing": [2.0, 0.5]}
    corners = patient_corners([10, 20, 110, 70], geo)
    assert corners[0] == [-250 + 10 * 0.5, 0, 100 - 20 * 2.0]
    assert corners[2] == [-250 + 110 * 0.5, 0, 100 - 70 * 2.0]
    assert patient_corners([0, 0, 1, 1], {}) is None


def _wait_states(node: peers.Node, want: str, n: int, timeout: float = 90) -> list[Instance]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = _rows(node.db_url)
        if len(rows) == n and all(r.state == want for r in rows):
            return rows
        time.sleep(0.2)
    pytest.fail(f"not all {n} instances became {want}: {[r.state for r in _rows(node.db_url)]}")


def _worker_pids(node: peers.Node) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(node.proc.pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text().replace("\0", " ")]


@needs("pgrep")
def test_serve_runs_workers_and_replaces_a_dead_one(node_factory, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    node = node_factory(
        settings={"models": {"classifier": str(make_model(models))},
                  "workers": {"count": 1, "max_wait_ms": 0, "poll_ms": 50, "lease_s": 2},
                  # No router process: the only children are workers.
                  "orders": {"procedures": None}}
    ).start()
    _send(node, write_series(tmp_path / "a", 3, rows=64, columns=64), tmp_path)
    _wait_states(node, InstanceState.CLASSIFIED, 3)

    (pid,) = _worker_pids(node)
    subprocess.run(["kill", "-9", str(pid)], check=True)
    _send(node, write_series(tmp_path / "b", 3, rows=64, columns=64), tmp_path)
    _wait_states(node, InstanceState.CLASSIFIED, 6)
    assert _worker_pids(node) and _worker_pids(node) != [pid]
    assert any('"worker_died"' in line for line in node.log_lines())
