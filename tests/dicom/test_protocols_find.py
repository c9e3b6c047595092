"""Hanging Protocol FIND: matching over the generic protocols, on the wire, and from the running node."""

from __future__ import annotations

import datetime as dt

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pynetdicom import AE, evt
from pynetdicom.sop_class import HangingProtocolInformationModelFind

from nnrouter.dicom.protocols_find import QueryError, find, handle_find
from nnrouter.results.hanging import generic_protocols
from nnrouter.testing import peers

CREATED = dt.datetime(2024, 5, 1, 12, 0, 0, tzinfo=dt.UTC)


def _query(**keys) -> Dataset:  # type: ignore[no-untyped-def]
    q = Dataset()
    for k, v in keys.items():
        setattr(q, k, v)
    return q


def _anatomy_query(code: str) -> Dataset:
    code_item = _query(CodeValue=code, CodingSchemeDesignator="SCT", CodeMeaning="")
    return _query(AnatomicRegionSequence=Sequence([code_item]))


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # the wildcard UID is the malformed query under test
def test_find_matching_rules():
    protocols = generic_protocols(version="1", created=CREATED)

    def names(q):
        return [str(r.HangingProtocolName) for r in find(q, protocols)]

    assert names(_query(HangingProtocolName="XR K*")) == ["XR KNEE", "XR KNEE R+L"]
    assert names(_query(HangingProtocolName="XR ?SPINE")) == ["XR CSPINE", "XR LSPINE", "XR TSPINE"]
    assert names(_query(HangingProtocolName="xr knee")) == []  # case-sensitive
    assert len(names(_query(HangingProtocolName=""))) == len(protocols)
    assert len(names(_query(HangingProtocolName="*"))) == len(protocols)
    assert names(_query(HangingProtocolName="XR CHEST", HangingProtocolLevel="USER")) == []
    assert names(_query(HangingProtocolName="XR CHEST", HangingProtocolCreator="NNROUTER")) == ["XR CHEST"]
    uids = [protocols[0].SOPInstanceUID, protocols[3].SOPInstanceUID]
    assert names(_query(SOPInstanceUID=uids, HangingProtocolName="")) == [
        str(protocols[0].HangingProtocolName),
        str(protocols[3].HangingProtocolName),
    ]
    assert names(_query(HangingProtocolName="", NumberOfPriorsReferenced=2)) == []
    assert len(names(_query(HangingProtocolName="", NumberOfPriorsReferenced=1))) == len(protocols)
    assert len(names(_query(HangingProtocolName="", HangingProtocolCreationDateTime="20240101-20241231"))) == len(
        protocols
    )
    assert names(_query(HangingProtocolName="", HangingProtocolCreationDateTime="2025-")) == []
    knee = names(
        _query(HangingProtocolName="", HangingProtocolDefinitionSequence=Sequence([_anatomy_query("64234005")]))
    )
    assert knee == ["XR KNEE", "XR KNEE R+L"]
    # Only the requested keys come back, with the character set to decode them.
    (r,) = find(_query(HangingProtocolName="XR JAW", NumberOfScreens=None, QueryRetrieveLevel="HANGING"), protocols)
    assert sorted(e.keyword for e in r) == [
        "HangingProtocolName",
        "NumberOfScreens",
        "QueryRetrieveLevel",
        "SpecificCharacterSet",
    ]
    assert r.NumberOfScreens == 2
    with pytest.raises(QueryError):
        list(find(_query(SOPInstanceUID="1.2.*"), protocols))
    with pytest.raises(QueryError):
        list(find(_query(HangingProtocolDefinitionSequence=Sequence([Dataset(), Dataset()])), protocols))


@pytest.fixture
def hp_scp():  # type: ignore[no-untyped-def]
    protocols = generic_protocols(version="1", created=CREATED)
    ae = AE(ae_title="HPSCP")
    ae.add_supported_context(HangingProtocolInformationModelFind)
    port = peers.free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_FIND, handle_find, [protocols])]
    )
    try:
        peers.wait_port(port)
        yield port, protocols
    finally:
        server.shutdown()


def _scu_find(port: int, identifier: Dataset, aec: str = "HPSCP") -> list[tuple[int, Dataset | None]]:
    ae = AE(ae_title="VIEWER")
    ae.add_requested_context(HangingProtocolInformationModelFind)
    assoc = ae.associate("127.0.0.1", port, ae_title=aec)
    assert assoc.is_established
    try:
        return [
            (int(status.Status), ident)
            for status, ident in assoc.send_c_find(identifier, HangingProtocolInformationModelFind)
        ]
    finally:
        assoc.release()


def test_find_on_the_wire_by_name_wildcard(hp_scp):
    # DCMTK findscu knows only the worklist and patient/study root models, not
    # the Hanging Protocol model, so the viewer here is pynetdicom.
    port, protocols = hp_scp
    q = _query(
        SpecificCharacterSet="ISO_IR 100",
        HangingProtocolName="XR *SPINE",
        HangingProtocolDescription="",
        SOPInstanceUID="",
        NumberOfPriorsReferenced=None,
    )
    rsp = _scu_find(port, q)
    assert [s for s, _ in rsp] == [0xFF00] * 4 + [0x0000]
    pending = [ident for s, ident in rsp if s == 0xFF00]
    # The whole-spine survey (nnrouter's own class, Body Part SPINE) has a protocol of its own.
    assert [str(i.HangingProtocolName) for i in pending] == ["XR CSPINE", "XR LSPINE", "XR TSPINE", "XR SPINE"]
    by_name = {str(p.HangingProtocolName): p for p in protocols}
    for ident in pending:
        assert sorted(e.keyword for e in ident) == sorted(
            [
                "SpecificCharacterSet",
                "HangingProtocolName",
                "HangingProtocolDescription",
                "SOPInstanceUID",
                "NumberOfPriorsReferenced",
            ]
        )
        p = by_name[str(ident.HangingProtocolName)]
        assert ident.SOPInstanceUID == p.SOPInstanceUID
        assert ident.HangingProtocolDescription == p.HangingProtocolDescription
        assert ident.NumberOfPriorsReferenced == 1


def test_find_on_the_wire_by_anatomic_region(hp_scp):
    port, _ = hp_scp
    item = _anatomy_query("72696002")
    item.Laterality = ""
    q = _query(HangingProtocolName="", HangingProtocolDefinitionSequence=Sequence([item]))
    rsp = _scu_find(port, q)
    pending = [ident for s, ident in rsp if s == 0xFF00]
    assert rsp[-1][0] == 0x0000
    assert [str(i.HangingProtocolName) for i in pending] == ["XR KNEE", "XR KNEE R+L"]
    for ident in pending:
        (d,) = ident.HangingProtocolDefinitionSequence  # only the matching item, only the requested keys
        assert sorted(e.keyword for e in d) == ["AnatomicRegionSequence", "Laterality"]
        (code,) = d.AnatomicRegionSequence
        assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == ("72696002", "SCT", "Knee")


def test_find_on_the_wire_malformed_identifier(hp_scp):
    port, _ = hp_scp
    q = _query(
        HangingProtocolName="", HangingProtocolDefinitionSequence=Sequence([_anatomy_query("1"), _anatomy_query("2")])
    )
    rsp = _scu_find(port, q)
    assert [s for s, _ in rsp] == [0xA900]


def test_serve_answers_hanging_protocol_queries(node_factory):
    """The running node serves the generic protocols on its own AE title and port, to a declared viewer."""
    node = node_factory(settings={"dicom": {"query_aes": [{"ae_title": "VIEWER"}]}}).start()
    rsp = _scu_find(node.port, _query(HangingProtocolName="XR KNEE*", SOPInstanceUID=""), aec=node.ae_title)
    names = sorted(str(i.HangingProtocolName) for s, i in rsp if s == 0xFF00)
    assert names == ["XR KNEE", "XR KNEE R+L"] and rsp[-1][0] == 0x0000
