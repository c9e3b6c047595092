"""An instance's header (its data set without the pixels), kept in the store at receive.

The file itself is in the spool of the node that received it; only that node
can read it. What later stages need from the header (the rules' tag
conditions, the SR's evidence, the orders written into the images) is read
from the row instead, on whichever node decides the study. Rows from before
the header was kept have none; for those the file is read, where it is here.

The header is kept in the VR and byte order of the instance's transfer
syntax (the row's ``transfer_syntax_uid``), so that on the receive path it
is the received bytes up to the Pixel Data element, cut without decoding or
writing anything (at most 0.15 ms, where writing it again costs 1-4 ms).
Deflated data sets, and data sets that did not come from bytes (a coerced
copy, nnrouter's own SR), are written again. Elements after the pixels
(trailing padding, signatures) are not kept.
"""

from __future__ import annotations

from io import BytesIO
from typing import Protocol

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID

PIXEL_DATA = Tag(0x7FE0, 0x0010)
# Bulk pixel values: the header is everything else.
_BULK = {PIXEL_DATA, Tag(0x7FE0, 0x0008), Tag(0x7FE0, 0x0009)}


def _bulk(tag: BaseTag) -> bool:
    return tag in _BULK or (tag.group & 0xFF00 == 0x6000 and tag.element == 0x3000)  # overlay data


def _encoding(transfer_syntax: str | None) -> tuple[bool, bool]:
    """(implicit VR, little endian) of a header kept for this transfer syntax: explicit little endian when unknown."""
    ts = UID(transfer_syntax or "")
    if not ts.is_transfer_syntax:
        return False, True
    return ts.is_implicit_VR, ts.is_little_endian


def encode(ds: Dataset, transfer_syntax: str | None, data: bytes | memoryview | None = None) -> bytes:
    """The header of ``ds``, encoded as :func:`decode` reads it for ``transfer_syntax``.

    ``data`` is the data set as received, in ``transfer_syntax``, and ``ds``
    what was read from it without touching the pixels: then the header is
    a slice of ``data``. Otherwise it is written again from ``ds``.
    """
    implicit, little = _encoding(transfer_syntax)
    ts = UID(transfer_syntax or "")
    deflated = ts.is_transfer_syntax and ts.is_deflated  # the received bytes are compressed
    if data is not None and not deflated and ds.original_encoding == (implicit, little):
        if PIXEL_DATA not in ds:
            return bytes(data)
        elem = ds.get_item(PIXEL_DATA)
        tell = getattr(elem, "value_tell", None)  # a RawDataElement's: where its value starts in ``data``
        # Before the value: tag and length, and in explicit VR the VR and two reserved bytes.
        start = None if tell is None else tell - (8 if implicit else 12)
        if start is not None and start >= 0:
            return bytes(data[:start])
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = implicit, little
    write_dataset(fp, Dataset({elem.tag: elem for elem in ds if not _bulk(elem.tag)}))
    return bytes(fp.getvalue())


def decode(header: bytes, transfer_syntax: str | None) -> Dataset:
    """A kept header as a data set (no pixels)."""
    implicit, little = _encoding(transfer_syntax)
    return read_dataset(BytesIO(header), is_implicit_VR=implicit, is_little_endian=little)


class HasHeader(Protocol):
    header: bytes | None
    transfer_syntax_uid: str
    path: str


def of(instance: HasHeader) -> Dataset:
    """An instance's header: from its row, or, for a row from before headers were kept, from its file.

    Raises OSError (or a pydicom error) when an old row's file is not on this node or cannot be read.
    """
    if instance.header is not None:
        return decode(instance.header, instance.transfer_syntax_uid)
    return dcmread(instance.path, stop_before_pixels=True, force=True)
