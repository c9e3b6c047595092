"""The statuses nnrouter answers are the standard's, and statuses it is sent are read by pynetdicom's categories."""

from __future__ import annotations

from pynetdicom.status import (
    GENERAL_STATUS,
    QR_FIND_SERVICE_CLASS_STATUS,
    STORAGE_SERVICE_CLASS_STATUS,
)

from nnrouter.dicom import statuses


def test_named_statuses_mean_what_the_standard_says():
    store = STORAGE_SERVICE_CLASS_STATUS
    find = QR_FIND_SERVICE_CLASS_STATUS
    assert store[statuses.OUT_OF_RESOURCES] == ("Failure", "Refused: Out of Resources")
    assert store[statuses.DATASET_DOES_NOT_MATCH] == ("Failure", "Data Set Does Not Match SOP Class")
    assert store[statuses.CANNOT_UNDERSTAND] == ("Failure", "Cannot Understand")
    assert find[statuses.IDENTIFIER_DOES_NOT_MATCH] == ("Failure", "Identifier Does Not Match SOP Class")
    assert find[statuses.UNABLE_TO_PROCESS][0] == find[statuses.DATABASE_ERROR][0] == "Failure"
    assert find[statuses.UNABLE_TO_PROCESS][1] == find[statuses.DATABASE_ERROR][1] == "Unable to Process"
    assert GENERAL_STATUS[statuses.PROCESSING_FAILURE] == ("Failure", "Processing Failure")
    assert GENERAL_STATUS[statuses.NOT_AUTHORIZED] == ("Failure", "Refused: Not Authorised")
    assert (statuses.SUCCESS, statuses.PENDING, statuses.CANCEL) == (0x0000, 0xFF00, 0xFE00)


def test_stored_is_success_or_a_warning():
    # The classification the forwarder spelled by hand before; every code gets the same answer.
    def by_hand(status: int) -> bool:
        return status == 0x0000 or status in (0x0001, 0x0107, 0x0116) or status & 0xF000 == 0xB000

    assert all(statuses.stored(code) == by_hand(code) for code in range(0x10000))
    assert statuses.pending(0xFF00) and statuses.pending(0xFF01) and not statuses.pending(0x0000)


def test_comment_is_cut_to_lo():
    ds = statuses.with_comment(statuses.NOT_AUTHORIZED, "x" * 100)
    assert ds.Status == 0x0124 and ds.ErrorComment == "x" * 64
