"""DIMSE response statuses that say what is wrong, shared by every service nnrouter answers."""

from __future__ import annotations

from pydicom import Dataset


def status(code: int, comment: str) -> Dataset:
    """A response status with an Error Comment (LO: at most 64 characters) naming the problem."""
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds
