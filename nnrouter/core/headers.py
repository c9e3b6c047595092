"""An instance's header (its data set without the pixels), kept in the store at receive.

The file itself is in the spool of the node that received it; only that node
can read it. What later stages need from the header (the rules' tag
conditions, the SR's evidence, the orders written into the images) is read
from the row instead, on whichever node decides the study. Rows from before
the header was kept have none; for those the file is read, where it is here.

The header is kept as an Explicit VR Little Endian data set: the encoding of
every data set sent in a compressed transfer syntax or in Explicit VR Little
Endian, so for those it is the received bytes up to the Pixel Data element,
cut without decoding anything. Implicit VR, big endian and deflated data sets
are encoded again. Elements after the pixels (trailing padding, signatures)
are not kept.
"""

from __future__ import annotations

from io import BytesIO
from typing import Protocol

from pydicom import dcmread, dcmwrite
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID

PIXEL_DATA = Tag(0x7FE0, 0x0010)
# Bulk pixel values: the header is everything else.
_BULK = {PIXEL_DATA, Tag(0x7FE0, 0x0008), Tag(0x7FE0, 0x0009)}


def _bulk(tag: BaseTag) -> bool:
    return tag in _BULK or (tag.group & 0xFF00 == 0x6000 and tag.element == 0x3000)  # overlay data


def encode(ds: Dataset, data: bytes | memoryview | None = None, transfer_syntax: str | None = None) -> bytes:
    """The header of ``ds`` as Explicit VR Little Endian bytes.

    ``data`` is the data set as received, in ``transfer_syntax``, and ``ds``
    what was read from it without touching the pixels: then the header is
    a slice of ``data``. Otherwise it is written again from ``ds``.
    """
    if data is not None and transfer_syntax is not None:
        ts = UID(transfer_syntax)
        explicit_le = ts.is_transfer_syntax and not ts.is_implicit_VR and ts.is_little_endian and not ts.is_deflated
        if explicit_le and ds.original_encoding == (False, True):
            if PIXEL_DATA not in ds:
                return bytes(data)
            tell = _value_tell(ds.get_item(PIXEL_DATA))
            if tell is not None and tell >= 12:
                return bytes(data[: tell - 12])  # the element's header: tag, VR, reserved, length
    out = Dataset()
    for elem in ds:
        if not _bulk(elem.tag):
            out.add(elem)
    buf = BytesIO()
    dcmwrite(buf, out, implicit_vr=False, little_endian=True)
    return buf.getvalue()


def _value_tell(elem: DataElement | RawDataElement | None) -> int | None:
    """Where an element's value starts in the bytes it was read from; None once it has been converted."""
    if isinstance(elem, RawDataElement):
        return elem.value_tell
    return None


def decode(header: bytes) -> Dataset:
    """A kept header as a data set (no pixels)."""
    return read_dataset(BytesIO(header), is_implicit_VR=False, is_little_endian=True)


class HasHeader(Protocol):
    header: bytes | None
    path: str


def of(instance: HasHeader) -> Dataset:
    """An instance's header: from its row, or, for a row from before headers were kept, from its file.

    Raises OSError (or a pydicom error) when an old row's file is not on this node or cannot be read.
    """
    return read(instance.header, instance.path)


def read(header: bytes | None, path: str) -> Dataset:
    """A header as :func:`of` reads it, from the row's two columns (for callers that closed the session)."""
    if header is not None:
        return decode(header)
    return dcmread(path, stop_before_pixels=True, force=True)
