"""DIMSE response statuses that say what is wrong, shared by every service nnrouter answers."""

from __future__ import annotations

from pydicom import Dataset

# C-FIND statuses (PS3.4 C.4.1.1.4), for the query and the Hanging Protocol FIND services.
PENDING = 0xFF00
CANCEL = 0xFE00
IDENTIFIER_DOES_NOT_MATCH = 0xA900
UNABLE_TO_PROCESS = 0xC000
DATABASE_ERROR = 0xC001


def status(code: int, comment: str) -> Dataset:
    """A response status with an Error Comment (LO: at most 64 characters) naming the problem."""
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds
