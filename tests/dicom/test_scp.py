"""The one AE: every service on one port, each bound to its own handler, with the right peers let in.

In-process (``scp.serve(block=False)`` on SQLite) with pynetdicom as the
peers, so the associations are real while the checks stay close to the
handlers; the node-level tests (test_receive, test_query, test_netguard)
drive the same AE through ``nnrouter serve``.
"""

from __future__ import annotations

import pytest
from dicomfiles import wait_for
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (
    DigitalXRayImageStorageForPresentation,
    HangingProtocolInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)
from sqlalchemy import select
from structlog.testing import capture_logs

from nnrouter.core.config import Settings
from nnrouter.core.spool import Spool
from nnrouter.core.store import Audit, Instance, Store
from nnrouter.dicom import scp
from nnrouter.testing import peers
from nnrouter.testing.synthetic import DXSpec, dx_dataset

CONTEXTS = (
    Verification,
    DigitalXRayImageStorageForPresentation,
    StudyRootQueryRetrieveInformationModelFind,
    HangingProtocolInformationModelFind,
)


@pytest.fixture
def site(tmp_path):  # type: ignore[no-untyped-def]
    settings = Settings(
        dicom={
            "ae_title": "NNROUTER",
            "bind": "127.0.0.1",
            "port": peers.free_port(),
            "allowed_calling_aes": [{"ae_title": "MODALITY"}, {"ae_title": "VIEWER"}],
            "query_aes": [{"ae_title": "VIEWER"}],
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
        yield settings, store
    finally:
        server.shutdown()
        store.dispose()


def _associate(settings: Settings, calling: str):  # type: ignore[no-untyped-def]
    ae = AE(ae_title=calling)
    for cx in CONTEXTS:
        ae.add_requested_context(cx)
    return ae.associate("127.0.0.1", settings.dicom.port, ae_title=settings.dicom.ae_title)


def _find(assoc, identifier: Dataset, model: str) -> list[tuple[int, Dataset | None, str]]:  # type: ignore[no-untyped-def]
    return [(int(s.Status), i, str(s.get("ErrorComment", ""))) for s, i in assoc.send_c_find(identifier, model)]


def _study_query(**keys: str) -> Dataset:
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = ""
    for k, v in keys.items():
        setattr(q, k, v)
    return q


def _protocol_query() -> Dataset:
    q = Dataset()
    q.HangingProtocolName = "XR KNEE*"
    return q


def test_each_service_on_the_one_ae(site):
    settings, store = site
    ds = dx_dataset(DXSpec(rows=16, columns=16))
    with capture_logs() as logged:
        assoc = _associate(settings, "MODALITY")
        assert assoc.is_established
        assert int(assoc.send_c_echo().Status) == 0x0000
        assert int(assoc.send_c_store(ds).Status) == 0x0000
        # Allowed to store is not allowed to read the index back: both FIND models refuse it.
        refused = _find(assoc, _study_query(), StudyRootQueryRetrieveInformationModelFind)
        refused += _find(assoc, _protocol_query(), HangingProtocolInformationModelFind)
        assoc.release()
    assert [(s, c) for s, _, c in refused] == [(0x0124, "calling AE MODALITY is not allowed to query")] * 2
    (line,) = [e for e in logged if e["event"] == "association"]
    assert (line["calling_ae"], line["instances"], line["statuses"], line["ended"]) == (
        "MODALITY",
        1,
        {"0x0000": 1},
        "released",
    )
    assert len([e for e in logged if e["event"] == "query_refused"]) == 2

    def audited() -> bool | list:
        with store.read() as s:
            rows = [(a.action, a.actor, a.result) for a in s.execute(select(Audit).order_by(Audit.id)).scalars()]
        return rows == [("query", "MODALITY", "refused")] * 2 + [("association", "MODALITY", "ok")] or rows

    wait_for(audited, timeout=20)  # the DICOM events worth auditing are in the store, for the console
    with store.read() as s:
        assert s.execute(select(Audit).where(Audit.action == "association")).scalar_one().detail["instances"] == 1
        row = s.execute(select(Instance)).scalar_one()
    assert (row.sop_instance_uid, row.calling_ae, row.node, row.state) == (
        ds.SOPInstanceUID,
        "MODALITY",
        "node-a",
        "received",
    )

    assoc = _associate(settings, "VIEWER")
    assert assoc.is_established
    studies = _find(
        assoc, _study_query(StudyInstanceUID=ds.StudyInstanceUID), StudyRootQueryRetrieveInformationModelFind
    )
    protocols = _find(assoc, _protocol_query(), HangingProtocolInformationModelFind)
    assoc.release()
    assert [(s, i.StudyInstanceUID if i else None) for s, i, _ in studies] == [
        (0xFF00, ds.StudyInstanceUID),
        (0x0000, None),
    ]
    assert sorted(str(i.HangingProtocolName) for s, i, _ in protocols if s == 0xFF00) == ["XR KNEE", "XR KNEE R+L"]
    assert protocols[-1][0] == 0x0000


def test_unknown_calling_ae_is_rejected(site):
    settings, _ = site
    with capture_logs() as logged:
        assoc = _associate(settings, "STRANGER")
    assert assoc.is_rejected
    assert [e for e in logged if e["event"] == "association_rejected" and e.get("calling_ae") == "STRANGER"]
