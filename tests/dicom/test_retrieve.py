"""C-GET and C-MOVE against DCMTK getscu and movescu: what a PACS fetches after it found nnrouter's views."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import needs
from dicomfiles import predict_all
from pydicom import dcmread
from sqlalchemy import select

from nnrouter.core.config import Settings
from nnrouter.core.spool import Spool
from nnrouter.core.store import Audit, Store
from nnrouter.dicom import scp
from nnrouter.testing import peers
from nnrouter.testing.synthetic import write_series

pytestmark = needs("storescu", "storescp", "getscu", "movescu")


@pytest.fixture
def site(tmp_path: Path):  # type: ignore[no-untyped-def]
    dest = peers.StoreSCP(tmp_path / "pacs", aet="PACS").start()
    settings = Settings(
        dicom={
            "ae_title": "NNROUTER",
            "bind": "127.0.0.1",
            "port": peers.free_port(),
            "query_aes": [{"ae_title": "VIEWER"}],
            "move_destinations": [{"ae_title": "PACS", "host": "127.0.0.1", "port": dest.port}],
        },
        storage={"path": str(tmp_path / "spool"), "min_free_mb": 0},
        limits={"refuse_below_free_mb": 0},
        database={"url": f"sqlite:///{tmp_path / 'nnrouter.db'}"},
        node={"name": "node-a"},
    )
    store = Store(settings.database.url)
    store.upgrade()
    server = scp.serve(settings, store, Spool(settings.storage.path), block=False)
    assert server is not None
    try:
        peers.wait_port(settings.dicom.port)
        files = write_series(tmp_path / "in", 3, rows=64, columns=64)
        sent = peers.storescu(settings.dicom.port, files)
        assert sent.stderr.count("Received Store Response (Success)") == 3, sent.stderr
        yield settings, store, files, dest
    finally:
        server.shutdown()
        store.dispose()
        dest.stop()


def _keys(files: list[Path], level: str) -> list[str]:
    ds = dcmread(files[0], stop_before_pixels=True)
    keys = [f"QueryRetrieveLevel={level}", f"StudyInstanceUID={ds.StudyInstanceUID}"]
    if level in ("SERIES", "IMAGE"):
        keys.append(f"SeriesInstanceUID={ds.SeriesInstanceUID}")
    if level == "IMAGE":
        keys.append(f"SOPInstanceUID={ds.SOPInstanceUID}")
    return [a for k in keys for a in ("-k", k)]


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def _getscu(settings: Settings, aet: str, out: Path, keys: list[str], model: str = "-S") -> subprocess.CompletedProcess:
    out.mkdir()
    return _run(
        [
            "getscu",
            "-v",
            model,
            "-aet",
            aet,
            "-aec",
            "NNROUTER",
            "-od",
            str(out),
            "127.0.0.1",
            str(settings.dicom.port),
            *keys,
        ]
    )


def _sop_uids(folder: Path) -> set[str]:
    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in folder.rglob("*") if p.is_file()}


def test_getscu_retrieves_a_series_as_it_was_received(site, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings, _store, files, _ = site
    out = tmp_path / "got"
    r = _getscu(settings, "VIEWER", out, _keys(files, "SERIES"), model="-S")
    assert r.returncode == 0, r.stderr
    sent = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID): dcmread(f) for f in files}
    assert _sop_uids(out) == set(sent)
    for p in out.iterdir():
        got = dcmread(p)
        assert got.PixelData == sent[str(got.SOPInstanceUID)].PixelData  # the same pixels, not re-rendered
    # One image by its UID, at the IMAGE level, in Patient Root.
    one = tmp_path / "one"
    ds = dcmread(files[1], stop_before_pixels=True)
    keys = [
        "QueryRetrieveLevel=IMAGE",
        f"PatientID={ds.PatientID}",
        f"StudyInstanceUID={ds.StudyInstanceUID}",
        f"SeriesInstanceUID={ds.SeriesInstanceUID}",
        f"SOPInstanceUID={ds.SOPInstanceUID}",
    ]
    r = _getscu(settings, "VIEWER", one, [a for k in keys for a in ("-k", k)], model="-P")
    assert r.returncode == 0 and _sop_uids(one) == {str(ds.SOPInstanceUID)}, r.stderr


def test_movescu_sends_a_study_to_a_named_destination_and_only_there(site, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings, store, files, dest = site
    args = ["movescu", "-v", "-S", "-aet", "VIEWER", "-aec", "NNROUTER", "127.0.0.1", str(settings.dicom.port)]
    r = _run([*args, "-aem", "PACS", *_keys(files, "STUDY")])
    assert r.returncode == 0 and "Received Final Move Response (Success)" in r.stderr, r.stderr
    assert _sop_uids(dest.folder) == {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    r = _run([*args, "-aem", "ELSEWHERE", *_keys(files, "STUDY")])
    assert "movedestinationunknown" in r.stderr.lower(), r.stderr  # 0xA801
    # A study that is not here: nothing to send, and nothing fails.
    r = _run([*args, "-aem", "PACS", "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID=1.2.3.999"])
    assert r.returncode == 0 and "Failed Suboperations" not in r.stderr.replace("Failed Suboperations     : 0", ""), (
        r.stderr
    )
    # A SERIES retrieve without its SeriesInstanceUID does not match the model.
    r = _run([*args, "-aem", "PACS", "-k", "QueryRetrieveLevel=SERIES", "-k", "StudyInstanceUID=1.2.3"])
    assert "datasetdoesnotmatchsopclass" in r.stderr.lower(), r.stderr  # 0xA900
    # The sub-operation counts of the final response, as a SCU reads them.
    final = _move(settings, "PACS", files)
    assert (final.Status, final.NumberOfCompletedSuboperations, final.get("NumberOfFailedSuboperations", 0)) == (
        0x0000,
        3,
        0,
    )
    with store.read() as s:
        audited = [
            (a.action, a.actor, a.result) for a in s.execute(select(Audit).where(Audit.action == "retrieve")).scalars()
        ]
    assert audited and all(a == ("retrieve", "VIEWER", "ok") for a in audited)


def _move(settings: Settings, destination: str, files: list[Path]):  # type: ignore[no-untyped-def]
    from pydicom.dataset import Dataset
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove

    ae = AE(ae_title="VIEWER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate("127.0.0.1", settings.dicom.port, ae_title="NNROUTER")
    assert assoc.is_established
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    try:
        return [st for st, _ in assoc.send_c_move(q, destination, StudyRootQueryRetrieveInformationModelMove)][-1]
    finally:
        assoc.release()


def test_a_peer_not_allowed_to_query_cannot_retrieve(site, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings, _, files, dest = site
    out = tmp_path / "got"
    r = _getscu(settings, "STRANGER", out, _keys(files, "STUDY"), model="-S")
    assert "0x124" in r.stderr.lower(), r.stderr
    assert not list(out.iterdir())
    r = _run(
        [
            "movescu",
            "-v",
            "-S",
            "-aet",
            "STRANGER",
            "-aec",
            "NNROUTER",
            "-aem",
            "PACS",
            "127.0.0.1",
            str(settings.dicom.port),
            *_keys(files, "STUDY"),
        ]
    )
    assert "movedestinationunknown" in r.stderr.lower(), r.stderr  # 0xA801
    assert not _sop_uids(dest.folder)


def test_a_cancel_stops_the_transfer(site, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings, _, _, dest = site
    # Enough instances (and bytes) that the cancel after the first response arrives before the last is sent.
    files = write_series(tmp_path / "many", 30, rows=1024, columns=1024)
    assert peers.storescu(settings.dicom.port, files).stderr.count("(Success)") == 30
    r = _run(
        [
            "movescu",
            "-v",
            "-S",
            "--cancel",
            "1",
            "-aet",
            "VIEWER",
            "-aec",
            "NNROUTER",
            "-aem",
            "PACS",
            "127.0.0.1",
            str(settings.dicom.port),
            *_keys(files, "STUDY"),
        ]
    )
    assert "0xfe00" in r.stderr.lower() or "cancel" in r.stderr.lower(), r.stderr
    assert len(_sop_uids(dest.folder)) < len(files)


@needs("Orthanc")
def test_orthanc_queries_the_chest_laterals_and_moves_them_into_itself(tmp_path: Path) -> None:

    orthanc = peers.Orthanc(tmp_path / "orthanc")
    node = peers.Node(
        tmp_path / "node",
        settings={
            "dicom": {
                "query_aes": [{"ae_title": orthanc.aet}],
                "move_destinations": [{"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.port}],
            }
        },
    )
    orthanc.modalities = {"nnrouter": [node.ae_title, "127.0.0.1", node.port]}
    orthanc.start()
    node.start()
    try:
        files = write_series(tmp_path / "in", 3, rows=64, columns=64)
        assert peers.storescu(node.port, files).stderr.count("(Success)") == 3
        lateral = str(dcmread(files[1], stop_before_pixels=True).SOPInstanceUID)
        store = Store(node.db_url)
        predict_all(store, {lateral: "chest_lateral"}, "knee_ap", score=0.95)  # what a worker would have found
        store.dispose()
        rsp = orthanc.post(
            "/modalities/nnrouter/query",
            {
                "Level": "Instance",
                "Query": {"BodyPartExamined": "CHEST", "ViewPosition": "LL", "SOPInstanceUID": ""},
                "Normalize": False,
            },
        )
        answers = orthanc.get(f"/queries/{rsp['ID']}/answers")
        assert len(answers) == 1
        orthanc.post(f"/queries/{rsp['ID']}/retrieve", {"TargetAet": orthanc.aet, "Synchronous": True})
        held = [orthanc.get(f"/instances/{i}/simplified-tags")["SOPInstanceUID"] for i in orthanc.get("/instances")]
        assert held == [lateral]
    finally:
        node.stop()
        orthanc.stop()
