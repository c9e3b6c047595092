"""The header kept in an instance's row reads back as the file's header, and is cut from the received bytes."""

from __future__ import annotations

from io import BytesIO

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import UID
from pynetdicom.dsutils import decode

from nnrouter.core import headers


def _received(name: str) -> tuple[str, bytes]:
    """A test file's transfer syntax and its data set bytes, as a C-STORE request carries them."""
    path = get_testdata_file(name)
    assert path is not None
    raw = open(path, "rb").read()
    meta = dcmread(path, stop_before_pixels=True).file_meta
    # The meta group: its group length element (12 bytes) and the length it gives.
    end = 132 + 12 + int(meta.FileMetaInformationGroupLength)
    return str(meta.TransferSyntaxUID), raw[end:]


def _plain(ds) -> dict[int, str]:  # type: ignore[no-untyped-def]
    return {int(e.tag): repr(e.value) for e in ds if e.tag != headers.PIXEL_DATA}


@pytest.mark.parametrize(
    "name, cut",
    [
        ("CT_small.dcm", True),  # explicit VR little endian
        ("MR_small_implicit.dcm", True),  # implicit VR little endian, the common uncompressed syntax
        ("MR_small_bigendian.dcm", True),  # explicit VR big endian (retired, still sent)
        ("image_dfl.dcm", False),  # deflated: the received bytes are compressed, so it is written again
    ],
)
def test_kept_header_reads_back_as_the_files_header(name: str, cut: bool):
    ts, data = _received(name)
    syntax = UID(ts)
    ds = decode(BytesIO(data), syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated)
    kept = headers.encode(ds, ts, memoryview(data))
    assert data.startswith(kept) is cut
    assert headers.PIXEL_DATA not in headers.decode(kept, ts)
    assert _plain(headers.decode(kept, ts)) == _plain(dcmread(get_testdata_file(name), stop_before_pixels=True))


def test_a_data_set_not_read_from_bytes_is_written_in_its_syntax():
    path = get_testdata_file("MR_small_implicit.dcm")
    ds = dcmread(path)
    ds.PatientName = "CHANGED^ONCE"  # a coerced copy: its offsets are the file's, its values are not
    kept = headers.encode(ds, str(ds.file_meta.TransferSyntaxUID))
    back = headers.decode(kept, str(ds.file_meta.TransferSyntaxUID))
    assert back.PatientName == "CHANGED^ONCE" and headers.PIXEL_DATA not in back
