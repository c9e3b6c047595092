"""Modality Worklist C-FIND against a real worklist SCP: DCMTK wlmscpfs on loopback."""

from __future__ import annotations

import subprocess
import time

import pytest
from conftest import needs
from dicomfiles import code_item, worklist_entry

from nnrouter.core import codes
from nnrouter.core.codes import Code
from nnrouter.dicom import worklist
from nnrouter.orders.order import OrderSource
from nnrouter.testing import peers

pytestmark = needs("wlmscpfs")

CALLED = "RISWL"
KNEE_LATERAL = codes.classes()["knee_lateral"].order_codes[0].value
HAND = codes.classes()["hand_ap"].order_codes[0].value
KNEE_STUDY = "1.2.826.0.1.3680043.8.498.300"
HAND_STUDY = "1.2.826.0.1.3680043.8.498.400"


@pytest.fixture
def wlm(tmp_path):
    """wlmscpfs serving a worklist of two orders under the AE title CALLED."""
    scp = peers.Wlmscpfs(tmp_path / "worklists", aet=CALLED)
    scp.folder.mkdir(parents=True)
    worklist_entry(
        scp.folder / "knee.wl",
        accession="ACC1001",
        study_uid=KNEE_STUDY,
        code=code_item(KNEE_LATERAL, "LN", "XR Knee Lateral"),
        description="XR Knee Lateral LEFT",
        modality="CR",
        sps_description="Knee lateral",
        patient_name="TESTPATIENT^ANNA",
        patient_id="PID1001",
        station=["XR1", "XR2"],
    )
    # No Requested Procedure Description: the step's description has to do.
    worklist_entry(
        scp.folder / "hands.wl",
        accession="ACC1002",
        study_uid=HAND_STUDY,
        code=code_item(HAND, "LN", "XR Hand AP"),
        description="",
        modality="DX",
        sps_description="Hands AP, both",
        patient_name="MÜLLER^JÜRGEN",
        patient_id="PID1002",
        station=["XR1"],
    )
    scp.start()
    try:
        yield scp.port
    finally:
        scp.stop()


def _query(port: int, **kwargs):  # type: ignore[no-untyped-def]
    return worklist.query(
        "127.0.0.1",
        port,
        calling_ae="NNROUTER",
        called_ae=kwargs.pop("called_ae", CALLED),
        timeout=kwargs.pop("timeout", 10),
        **kwargs,
    )


def test_query_by_accession_finds_the_order(wlm):
    [order] = _query(wlm, accession_number="ACC1001")
    assert order.source == OrderSource.WORKLIST
    assert order.control == "NW"
    assert order.accession_number == "ACC1001"
    assert order.study_uid == KNEE_STUDY
    assert order.codes == (Code(KNEE_LATERAL, "LN", "XR Knee Lateral"),)
    assert order.description == "XR Knee Lateral LEFT"
    assert order.laterality == "L"
    assert order.modality == "CR"
    assert order.scheduled_at == "20240502091500"
    assert order.requested_procedure_id == "RP-ACC1001"
    assert (order.placer_order_number, order.filler_order_number) == ("PL-ACC1001", "FL-ACC1001")
    assert (order.patient_id, order.patient_name) == ("PID1001", "TESTPATIENT^ANNA")
    assert order.extra["scheduled_station_ae_title"] == "XR1\\XR2"
    assert order.extra["scheduled_protocol_codes"] == (Code("P1", "99LOCAL", "Knee lateral"),)


def test_description_and_laterality_fall_back_to_the_step(wlm):
    [order] = _query(wlm, accession_number="ACC1002")
    assert order.description == "Hands AP, both"
    assert order.codes == (Code(HAND, "LN", "XR Hand AP"),)
    assert order.laterality == "B"
    assert order.modality == "DX"
    assert order.patient_name == "MÜLLER^JÜRGEN"


def test_query_by_study_uid(wlm):
    # wlmscpfs does not match on Study Instance UID and answers with every entry;
    # the query must still return only the order asked for.
    assert [o.accession_number for o in _query(wlm, study_uid=HAND_STUDY)] == ["ACC1002"]


def test_whole_worklist(wlm):
    assert sorted(o.accession_number for o in _query(wlm)) == ["ACC1001", "ACC1002"]


def test_unknown_accession_is_empty(wlm):
    assert _query(wlm, accession_number="NOSUCH") == []


def test_wildcards_are_left_to_the_scp(wlm):
    assert sorted(o.accession_number for o in _query(wlm, accession_number="ACC100*")) == ["ACC1001", "ACC1002"]


def test_failure_status(tmp_path):
    (tmp_path / CALLED).mkdir()  # no lockfile: wlmscpfs fails every query
    port = peers.free_port()
    proc = subprocess.Popen(
        ["wlmscpfs", "-dfp", str(tmp_path), str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        peers.wait_port(port, proc=proc)
        with pytest.raises(
            worklist.WorklistError, match=rf"{CALLED} at 127\.0\.0\.1:{port}: C-FIND failed with status 0xA700"
        ):
            _query(port, accession_number="ACC1001")
    finally:
        proc.terminate()
        proc.wait(10)


def test_unknown_called_ae_is_rejected(wlm):
    with pytest.raises(worklist.WorklistError, match=rf"NOBODY at 127\.0\.0\.1:{wlm}: association rejected"):
        _query(wlm, called_ae="NOBODY", accession_number="ACC1001")


def test_peer_down():
    port = peers.free_port()
    t0 = time.monotonic()
    with pytest.raises(worklist.WorklistError, match=rf"127\.0\.0\.1:{port}.*cannot connect"):
        _query(port, accession_number="ACC1001", timeout=5)
    assert time.monotonic() - t0 < 10


@needs("storescp")
def test_a_peer_without_worklist_says_so(storescp):
    with pytest.raises(worklist.WorklistError, match="does not accept Modality Worklist"):
        worklist.query("127.0.0.1", storescp.port, calling_ae="NNROUTER", called_ae=storescp.aet, timeout=10)
