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
from conftest import needs, pydicom_data, shared_files
from dicomfiles import send_as_is
from pixels.test_detect import detector
from pixels.test_runtime import make_model
from pydicom import dcmread
from sqlalchemy import select

from nnrouter.core.config import load
from nnrouter.core.store import Instance, InstanceState, Store
from nnrouter.pixels.classify import Queue, Worker, patient_corners
from nnrouter.testing import peers
from nnrouter.testing.synthetic import write_series

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
        settings={
            "models": {"classifier": str(classifier), "detector": str(regions)},
            "workers": {"batch_size": 4, "max_wait_ms": 0},
        },
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
        assert all(r.state == InstanceState.CLASSIFIED for r in rows_of(f)), [
            (f.name, r.state, r.state_reason) for r in rows_of(f)
        ]
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
                assert d.box_mm == pytest.approx(
                    [
                        d.box_px[0] * float(spacing[1]),
                        d.box_px[1] * float(spacing[0]),
                        d.box_px[2] * float(spacing[1]),
                        d.box_px[3] * float(spacing[0]),
                    ],
                    abs=0.05,
                )
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
            # worker sits on its claims, and that is when it dies. The lease
            # outlasts the start of the next worker (a few seconds).
            "workers": {"batch_size": 64, "max_wait_ms": 60000, "lease_s": 8, "poll_ms": 50},
        }
    ).start()
    _send(node, write_series(tmp_path / "in", 12, rows=64, columns=64), tmp_path)
    worker = subprocess.Popen(
        [sys.executable, "-m", "nnrouter", "worker", "--config", str(node.config_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if [r.state for r in _rows(node.db_url)] == [InstanceState.CLASSIFYING] * 12:
            break
        time.sleep(0.05)
    else:
        worker.kill()
        pytest.fail("worker never claimed the instances")
    claimed_at = time.monotonic()
    worker.send_signal(signal.SIGKILL)
    worker.wait()

    # A second worker, right away: the claims are still leased, nothing to take.
    node.settings["workers"] = {"batch_size": 64, "max_wait_ms": 0, "lease_s": 8, "poll_ms": 50}
    node.write_config()
    assert json.loads(node.cli("worker", "--until-empty").stdout.splitlines()[-1]) == {}
    time.sleep(max(0.0, claimed_at + 8.2 - time.monotonic()))
    totals = json.loads(node.cli("worker", "--until-empty").stdout.splitlines()[-1])
    assert totals["classified"] == 12
    rows = _rows(node.db_url)
    # The batch try is not held against anyone (who was in hand is unknown); the retry, alone, counts.
    assert all(r.state == InstanceState.CLASSIFIED and r.attempts == 1 and len(r.predictions) == 1 for r in rows)


def test_claims_are_exclusive_and_failures_give_up(database_url, tmp_path):
    """Two queues never hold the same instance; inference that keeps failing ends as failed."""
    store = Store(database_url)
    store.upgrade()
    settings = load(None).model_copy(update={"database": load(None).database.model_copy(update={"url": database_url})})
    from nnrouter.core.spool import Spool
    from nnrouter.dicom.receive import Header, Receiver

    receiver = Receiver(settings, store, Spool(tmp_path / "spool"))
    files = write_series(tmp_path / "in", 6, rows=32, columns=32)
    for f in files:
        ds = dcmread(f)
        receiver.keep(
            Header(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SOPClassUID, {}, {}, {}),
            b"\0" * 128 + b"DICM",
            memoryview(f.read_bytes()[132:]),
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

    worker = Worker(
        settings.model_copy(
            update={"workers": settings.workers.model_copy(update={"max_attempts": 2, "max_wait_ms": 0})}
        ),
        store,
        classifier=Exploding(),
    )
    for _ in range(30):  # a batch, then each instance alone, twice
        batch = worker.next_batch()
        if not batch:
            break
        worker.process(batch)
    with store.read() as s:
        rows = s.execute(select(Instance)).scalars().all()
    assert {r.state for r in rows} == {InstanceState.FAILED}
    assert all("gave up after 2 attempts" in r.state_reason and "CUDA error" in r.state_reason for r in rows)
    assert all(r.attempts == 2 for r in rows)  # max_attempts means what it says
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
        settings={
            "models": {"classifier": str(make_model(models))},
            "workers": {"count": 1, "max_wait_ms": 0, "poll_ms": 50, "lease_s": 2},
            # No router or cleaner process: the only children are workers.
            "orders": {"procedures": None},
            "retention": {"enabled": False},
        }
    ).start()
    _send(node, write_series(tmp_path / "a", 3, rows=64, columns=64), tmp_path)
    _wait_states(node, InstanceState.CLASSIFIED, 3)

    (pid,) = _worker_pids(node)
    subprocess.run(["kill", "-9", str(pid)], check=True)
    _send(node, write_series(tmp_path / "b", 3, rows=64, columns=64), tmp_path)
    _wait_states(node, InstanceState.CLASSIFIED, 6)
    assert _worker_pids(node) and _worker_pids(node) != [pid]
    assert any('"worker_died"' in line for line in node.log_lines())


# --- one bad instance, many good ones (issue 11, findings 2 and 3) ---------------


def panicking_rle(folder: Path) -> Path:
    """A real RLE file (pydicom's MR_small_RLE) with one byte of its first segment flipped.

    The first byte of segment 1 is an RLE header byte; 0x80 on it turns a
    literal run into a replicate run that writes past the row, and
    pylibjpeg-rle panics (``index out of bounds``) instead of raising.
    """
    from pydicom.data import get_testdata_file
    from pydicom.encaps import generate_frames

    src = Path(get_testdata_file("MR_small_RLE.dcm"))
    raw = bytearray(src.read_bytes())
    frame = next(generate_frames(dcmread(src).PixelData, number_of_frames=1))
    at = raw.find(frame[:64])  # the 64-byte RLE header, then segment 1
    raw[at + 64] ^= 0x80
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "mr_rle_flipped.dcm"
    out.write_bytes(bytes(raw))
    return out


def test_the_rle_mutation_really_panics(tmp_path):
    from pydicom.pixels import pixel_array

    with pytest.raises(BaseException) as caught:
        pixel_array(dcmread(panicking_rle(tmp_path)), index=0)
    assert type(caught.value).__name__ == "PanicException" and not isinstance(caught.value, Exception)


def test_a_codec_panic_ends_one_instance_undecodable_and_the_batch_goes_on(node_factory, tmp_path):
    node = node_factory(settings={"workers": {"batch_size": 16, "max_wait_ms": 0}}).start()
    bad = panicking_rle(tmp_path / "bad")
    good = write_series(tmp_path / "in", 5, rows=64, columns=64)
    _send(node, [bad, *good], tmp_path)

    res = node.cli("worker", "--until-empty", check=False)
    assert res.returncode == 0, res.stderr[-1500:]
    assert json.loads(res.stdout.splitlines()[-1]) == {"classified": 0, "decoded": 5, "undecodable": 1, "released": 0}
    rows = _rows(node.db_url)
    bad_uid = str(dcmread(bad, stop_before_pixels=True).SOPInstanceUID)
    (culprit,) = [r for r in rows if r.sop_instance_uid == bad_uid]
    assert culprit.state == InstanceState.UNDECODABLE
    assert "RLE code stream is corrupt" in culprit.state_reason and "PanicException" in culprit.state_reason
    assert sorted(r.state for r in rows if r is not culprit) == [InstanceState.DECODED] * 5
    assert all(r.attempts == 0 for r in rows)  # nothing crashed: no try counted against anyone


# A worker whose process dies (SIGSEGV, as a native codec would) whenever a
# given instance is in its batch: the supervisor's part (start it again) is
# played by the test.
_CRASHING_WORKER = """
import os, signal, sys
from nnrouter.pixels.classify import Worker
from nnrouter.core.config import load
from nnrouter.core.store import Store

settings = load(sys.argv[1])
culprit = sys.argv[2]

class Crashing(Worker):
    def process(self, batch):
        if any(c.sop_instance_uid == culprit for c in batch):
            os.kill(os.getpid(), signal.SIGSEGV)
        return super().process(batch)

store = Store(settings.database.url)
print(Crashing(settings, store).run(until_empty=True))
"""


def test_a_crash_counts_only_against_the_instance_in_hand(node_factory, tmp_path):
    node = node_factory(
        settings={"workers": {"batch_size": 16, "max_wait_ms": 0, "lease_s": 1, "max_attempts": 3}}
    ).start()
    files = write_series(tmp_path / "in", 6, rows=64, columns=64)
    _send(node, files, tmp_path)
    culprit = str(dcmread(files[2], stop_before_pixels=True).SOPInstanceUID)

    script = tmp_path / "crashing_worker.py"
    script.write_text(_CRASHING_WORKER)
    exits = []
    for _ in range(8):  # bounded: a batch try, three alone, then the give-up
        res = subprocess.run(
            [sys.executable, str(script), str(node.config_path), culprit], capture_output=True, text=True, timeout=120
        )
        exits.append(res.returncode)
        if res.returncode == 0 and res.stdout.strip() == "{}":
            break
        time.sleep(1.1)  # the dead worker's lease runs out
    rows = _rows(node.db_url)
    (bad,) = [r for r in rows if r.sop_instance_uid == culprit]
    innocent = [r for r in rows if r is not bad]
    assert exits.count(-signal.SIGSEGV) == 4, exits  # one in the batch, three alone
    assert bad.state == InstanceState.FAILED and bad.attempts == 3, (bad.state, bad.attempts)
    assert "gave up after 3 attempts" in bad.state_reason
    assert [r.state for r in innocent] == [InstanceState.DECODED] * 5
    assert all(r.attempts <= 1 for r in innocent)
