"""DIMSE statuses: the ones nnrouter answers, by name, and how to read the ones it is sent.

pynetdicom names only Success, Pending and Cancel (``pynetdicom.status.Status``);
the failure codes nnrouter answers are named here once, after the service
class tables of PS3.4 and PS3.7 (pynetdicom's tables hold the same codes, a
test checks them), so that no handler spells a status as a bare number.
Reading a status that came back (a C-FIND's, a C-STORE's) goes through
``pynetdicom.status.code_to_category`` rather than hand-written ranges.
"""

from __future__ import annotations

from pydicom import Dataset
from pynetdicom.status import (
    STATUS_CANCEL,
    STATUS_FAILURE,
    STATUS_PENDING,
    STATUS_SUCCESS,
    STATUS_WARNING,
    Status,
    code_to_category,
)

__all__ = [
    "CANCEL",
    "CANNOT_UNDERSTAND",
    "DATABASE_ERROR",
    "DATASET_DOES_NOT_MATCH",
    "IDENTIFIER_DOES_NOT_MATCH",
    "NOT_AUTHORIZED",
    "OUT_OF_RESOURCES",
    "PENDING",
    "PROCESSING_FAILURE",
    "STATUS_CANCEL",
    "STATUS_FAILURE",
    "STATUS_PENDING",
    "STATUS_SUCCESS",
    "STATUS_WARNING",
    "SUCCESS",
    "UNABLE_TO_PROCESS",
    "category",
    "pending",
    "stored",
    "with_comment",
]

SUCCESS = Status.SUCCESS
PENDING = Status.PENDING
CANCEL = Status.CANCEL

# General failures (PS3.7 C.4).
PROCESSING_FAILURE = 0x0110
NOT_AUTHORIZED = 0x0124  # Refused: Not Authorized - the peer may not use this service

# C-STORE failures (PS3.4 B.2.3).
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH = 0xA900  # Data Set Does Not Match SOP Class
CANNOT_UNDERSTAND = 0xC000

# C-FIND failures (PS3.4 C.4.1.1.4), for the query and the Hanging Protocol FIND services.
IDENTIFIER_DOES_NOT_MATCH = 0xA900  # Identifier Does Not Match SOP Class
UNABLE_TO_PROCESS = 0xC000
DATABASE_ERROR = 0xC001  # an Unable to Process code of our own: the store failed, not the identifier


def with_comment(code: int, comment: str) -> Dataset:
    """A response status with an Error Comment (LO: at most 64 characters) naming the problem."""
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds


def category(code: int) -> str:
    """Success, Warning, Failure, Cancel, Pending or Unknown, as PS3.7 Annex C classes the code."""
    return code_to_category(code)


def stored(code: int) -> bool:
    """Whether a C-STORE response means the peer kept the instance: success, or a warning
    (coercion 0xB000, elements discarded 0xB006, data set does not match 0xB007, 0x0001, 0x0107, 0x0116)."""
    return code_to_category(code) in (STATUS_SUCCESS, STATUS_WARNING)


def pending(code: int) -> bool:
    """Whether a C-FIND response is one more match (0xFF00, or 0xFF01 with optional keys unsupported)."""
    return code_to_category(code) == STATUS_PENDING
