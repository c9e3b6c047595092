"""The decode stage: a received DICOM instance becomes the 8-bit picture a model sees.

Models are trained on display-ready grey images, so a stored instance has to
go through the same chain a viewer uses (PS3.3 C.11 / PS3.4 N.2): stored
values -> Modality LUT -> VOI LUT -> polarity. Whatever the modality sent
(15-bit CR, signed CT, YBR JPEG, MONOCHROME1) the result is one 2-D uint8
array in MONOCHROME2 sense, so that bone is always bright.

Pixels come from pydicom and its pylibjpeg plugins first. Some real streams
(the 12-bit JPEG extended NEMA sample) are refused by every pydicom plugin
but decode in GDCM's own reader, so the fallback calls ``gdcm.ImageReader``
directly instead of going through pydicom's plugin layer.

Every failure is a :class:`DecodeError` whose ``reason`` is a short sentence
about the encoding, never about the patient: the router records it against
the instance and carries on with the next one.
"""

from __future__ import annotations

import math
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import cv2
import gdcm
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import get_frame
from pydicom.pixels import apply_color_lut, convert_color_space, pixel_array
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

__all__ = ["DecodeError", "Decoded", "decode_dataset", "decode_file"]


@dataclass(frozen=True)
class Decoded:
    """The picture plus what a caller needs to trust it and to reproduce it."""

    image: np.ndarray
    """2-D uint8 (H, W), display sense: bone/dense = bright (MONOCHROME2 sense)."""
    rows: int
    columns: int
    photometric: str
    modality: str | None
    pixel_spacing_mm: tuple[float, float] | None
    """(row, col) from Pixel Spacing, else Imager Pixel Spacing, else None."""
    window: tuple[float, float]
    """(center, width) applied, in the values after the Modality LUT.

    For a VOI LUT Sequence this is the LUT's input range (first mapped value
    + entries / 2, entries); for colour and 8-bit passthrough the identity
    window of the stored bit depth.
    """
    window_source: str
    """"voi_lut_function" (window with LINEAR_EXACT or SIGMOID), "window"
    (window, LINEAR), "voi_lut_sequence", "percentile" or "none" (colour or
    8-bit passthrough)."""
    decoder: str
    """"pydicom" or "gdcm": which codec path produced the pixels."""


class DecodeError(Exception):
    """The instance cannot be turned into a picture; ``reason`` says why.

    The reason names the encoding problem only (no patient data), so it can
    go into logs and the database as it is.
    """

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# Transfer syntaxes grouped by the kind of stream their frames must contain,
# so that a label which contradicts the bytes is caught before a codec guesses.
_JPEG_2000 = "JPEG 2000"
_JPEG = "JPEG"
_JPEG_LS = "JPEG-LS"
_RLE = "RLE"
_FAMILY_BY_TS = MappingProxyType(
    {
        "1.2.840.10008.1.2.4.90": _JPEG_2000,
        "1.2.840.10008.1.2.4.91": _JPEG_2000,
        "1.2.840.10008.1.2.4.92": _JPEG_2000,
        "1.2.840.10008.1.2.4.93": _JPEG_2000,
        "1.2.840.10008.1.2.4.201": _JPEG_2000,
        "1.2.840.10008.1.2.4.202": _JPEG_2000,
        "1.2.840.10008.1.2.4.203": _JPEG_2000,
        "1.2.840.10008.1.2.4.50": _JPEG,
        "1.2.840.10008.1.2.4.51": _JPEG,
        "1.2.840.10008.1.2.4.57": _JPEG,
        "1.2.840.10008.1.2.4.70": _JPEG,
        "1.2.840.10008.1.2.4.80": _JPEG_LS,
        "1.2.840.10008.1.2.4.81": _JPEG_LS,
        "1.2.840.10008.1.2.5": _RLE,
    }
)
_JPEG_LOSSLESS_PROCESS_14 = "1.2.840.10008.1.2.4.57"
_ITEM_TAG = b"\xfe\xff\x00\xe0"

_GDCM_DTYPES: MappingProxyType[int, np.dtype[Any]] = MappingProxyType(
    {
        gdcm.PixelFormat.UINT8: np.dtype("u1"),
        gdcm.PixelFormat.INT8: np.dtype("i1"),
        gdcm.PixelFormat.UINT16: np.dtype("=u2"),
        gdcm.PixelFormat.INT16: np.dtype("=i2"),
        gdcm.PixelFormat.UINT32: np.dtype("=u4"),
        gdcm.PixelFormat.INT32: np.dtype("=i4"),
    }
)

# The percentile window: wide enough to ignore a few hot/dead pixels and
# collimator edges, narrow enough to keep the anatomy's full range.
_PERCENTILES = (0.5, 99.5)
# Statistics need a sample, not 14 million mammogram pixels.
_SAMPLE_TARGET = 1_000_000
# A stated window that paints this share of the (non-padding) pixels one grey
# level does not describe these pixels (seen: a DX whose window sits 30 000
# below its data); the percentile window is used instead.
_FLAT_SHARE = 0.99
# The predictor-6 repair runs a Python loop per pixel (~0.4 us); beyond this
# it would hold a worker for many seconds, so such a stream is refused instead.
_PRED6_MAX_PIXELS = 25_000_000


def decode_file(path: str | os.PathLike[str], *, max_side: int | None = None) -> Decoded:
    """Decode the first frame of the DICOM file at ``path``.

    The file is read with ``force=True`` because instances written without
    file meta (implicit VR, straight from a modality's dataset) are real; the
    transfer syntax is then taken from how pydicom managed to read it.
    """
    _check_max_side(max_side)
    try:
        ds = pydicom.dcmread(os.fspath(path), force=True)
    except OSError as exc:
        raise DecodeError(f"cannot read the file: {exc.strerror or type(exc).__name__}") from exc
    except Exception as exc:  # pydicom raises many types on a damaged header
        raise DecodeError(f"not a readable DICOM file: {_describe(exc)}") from exc
    return _guarded(ds, Path(path), max_side)


def decode_dataset(ds: Dataset, *, max_side: int | None = None) -> Decoded:
    """Decode the first frame of a dataset already in memory (e.g. from C-STORE).

    ``ds`` is not modified; when it lacks a Transfer Syntax UID, a view of it
    gets one from how it was read (or explicit VR little endian when it was
    built in memory, since then its pixel bytes are little endian native).
    """
    _check_max_side(max_side)
    return _guarded(ds, None, max_side)


def _check_max_side(max_side: int | None) -> None:
    # A caller's mistake, not a property of the instance: fail loudly.
    if max_side is not None and (not isinstance(max_side, int) or max_side < 1):
        raise ValueError(f"max_side must be a positive int or None, not {max_side!r}")


def _guarded(ds: Dataset, path: Path | None, max_side: int | None) -> Decoded:
    """Only DecodeError may leave: the router must never die on one instance."""
    try:
        return _decode(ds, path, max_side)
    except DecodeError:
        raise
    except MemoryError as exc:
        raise DecodeError("not enough memory to decode the image") from exc
    except Exception as exc:
        raise DecodeError(f"unexpected error while decoding: {_describe(exc)}") from exc
    except _STOP:
        raise
    except BaseException as exc:  # a native codec's panic: pyo3's PanicException is a BaseException
        raise DecodeError(f"decoder crashed: {_describe(exc)}") from exc


# What a decoder must let through: a request to stop, not a codec's crash.
_STOP = (KeyboardInterrupt, SystemExit, GeneratorExit)


def _describe(exc: BaseException, limit: int = 300) -> str:
    """Exception type and message on one line, short enough for a log field."""
    text = " ".join(str(exc).split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --------------------------------------------------------------------------
# The pipeline


def _decode(ds: Dataset, path: Path | None, max_side: int | None) -> Decoded:
    ds = _with_transfer_syntax(ds)
    ts = UID(str(ds.file_meta.TransferSyntaxUID).strip())
    try:
        _ = ts.is_compressed  # pydicom raises for a UID it does not know
    except ValueError:
        raise DecodeError(f"transfer syntax {ts} is not a known transfer syntax") from None
    _check_image_module(ds)
    _check_encoding_matches(ds, ts)

    arr, decoder = _frame0(ds, ts, path)
    if not arr.dtype.isnative:  # explicit VR big endian comes back as '>u2'
        arr = arr.astype(arr.dtype.newbyteorder("="))
    photometric = str(ds.PhotometricInterpretation).strip().upper()
    samples = int(ds.get("SamplesPerPixel") or 1)
    rows, columns = int(ds.Rows), int(ds.Columns)
    if arr.shape[:2] != (rows, columns):
        raise DecodeError(f"decoded frame is {arr.shape[1]}x{arr.shape[0]} but the header says {columns}x{rows}")

    if samples == 1 and photometric in ("MONOCHROME1", "MONOCHROME2"):
        if arr.ndim != 2:
            raise DecodeError(f"grey image decoded with unexpected shape {arr.shape}")
        arr = _repair_predictor6(ds, ts, arr)
        arr = _apply_bits_stored(arr, ds)
        image, window, source = _render_grey(ds, arr, photometric == "MONOCHROME1")
    elif samples == 1 and photometric == "PALETTE COLOR":
        image, window, source = _render_colour(_palette_to_rgb(ds, arr))
    elif samples == 3 and arr.ndim == 3:
        if photometric in ("YBR_PARTIAL_422", "YBR_PARTIAL_420"):
            image, window, source = _render_partial_ybr(arr)
        else:
            image, window, source = _render_colour(arr, int(ds.get("BitsStored") or 8))
    else:
        raise DecodeError(
            f"photometric interpretation {photometric} with {samples} sample(s) per pixel is not supported"
        )

    image = _downscale(image, max_side)
    return Decoded(
        image=image,
        rows=rows,
        columns=columns,
        photometric=photometric,
        modality=(str(ds.get("Modality") or "").strip() or None),
        pixel_spacing_mm=_pixel_spacing(ds),
        window=(float(window[0]), float(window[1])),
        window_source=source,
        decoder=decoder,
    )


def _with_transfer_syntax(ds: Dataset) -> Dataset:
    """A dataset pydicom can decode: one with a Transfer Syntax UID.

    A file without file meta has none, yet its encoding is known from reading
    it. The caller's dataset is left alone: the view shares its elements and
    only gets its own file meta.
    """
    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID"):
        return ds
    implicit, little = ds.original_encoding
    if implicit is None:
        pixels = ds.get("PixelData")
        if isinstance(pixels, (bytes, bytearray)) and bytes(pixels[:4]) == _ITEM_TAG:
            raise DecodeError(
                "dataset has no Transfer Syntax UID and its Pixel Data is compressed, so the codec is unknown"
            )
        tsyntax = ExplicitVRLittleEndian
    elif implicit:
        tsyntax = ImplicitVRLittleEndian
    else:
        tsyntax = ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    view = Dataset(ds)
    view.set_original_encoding(implicit, little)
    view.file_meta = FileMetaDataset()
    if meta is not None:
        for elem in meta:
            view.file_meta.add(elem)
    view.file_meta.TransferSyntaxUID = tsyntax
    return view


def _check_image_module(ds: Dataset) -> None:
    if "PixelData" not in ds:
        other = [k for k in ("FloatPixelData", "DoubleFloatPixelData") if k in ds]
        if other:
            raise DecodeError(f"no Pixel Data ({other[0]} is not supported)")
        raise DecodeError("no Pixel Data")
    needed = ("Rows", "Columns", "BitsAllocated", "PhotometricInterpretation")
    missing = [k for k in needed if ds.get(k) in (None, "")]
    if missing:
        raise DecodeError(f"Image Pixel module incomplete: missing {', '.join(missing)}")
    if int(ds.Rows) < 1 or int(ds.Columns) < 1:
        raise DecodeError(f"image has no pixels (Rows {ds.Rows}, Columns {ds.Columns})")


def _check_encoding_matches(ds: Dataset, ts: UID) -> None:
    """Refuse pixel data whose bytes contradict the transfer syntax.

    A mislabelled instance means the sender is broken; decoding it under a
    guessed encoding could show the model a different picture than the one a
    viewer shows, so it is rejected with the reason instead.
    """
    elem = ds["PixelData"]
    value = elem.value if isinstance(elem.value, (bytes, bytearray)) else b""
    # Native pixels may start with the item tag's bytes by chance; only a
    # dataset built in memory can be encapsulated without undefined length.
    encapsulated = bool(elem.is_undefined_length) or (ts.is_compressed and bytes(value[:4]) == _ITEM_TAG)
    if ts.is_compressed and not encapsulated:
        raise DecodeError(
            f"transfer syntax {ts} does not match the encoded pixel data: "
            f"Pixel Data is not encapsulated ({len(value)} bytes stored as if uncompressed)"
        )
    if not ts.is_compressed and encapsulated:
        raise DecodeError(
            f"transfer syntax {ts} does not match the encoded pixel data: "
            "Pixel Data is encapsulated (compressed) but the transfer syntax is uncompressed"
        )
    family = _FAMILY_BY_TS.get(str(ts))
    if family is None or not value:
        return
    found = _sniff(_first_fragment(value))
    if found is not None and found != family:
        raise DecodeError(
            f"transfer syntax {ts} does not match the encoded pixel data: "
            f"it names {family} but the first frame is a {found} stream"
        )


def _first_fragment(data: bytes | bytearray) -> bytes:
    """The first non-empty fragment after the Basic Offset Table (best effort)."""
    pos = 0
    for _ in range(4):  # BOT, then possibly empty items
        if len(data) < pos + 8 or bytes(data[pos : pos + 4]) != _ITEM_TAG:
            return b""
        length = struct.unpack_from("<I", data, pos + 4)[0]
        start = pos + 8
        if pos > 0 and length:
            return bytes(data[start : start + min(length, 65536)])
        pos = start + length
    return b""


def _sniff(fragment: bytes) -> str | None:
    """Which codec family a frame's first bytes belong to, or None if unsure."""
    if fragment.startswith(b"\xff\x4f\xff\x51") or fragment[4:12] == b"jP  \r\n\x87\n":
        return _JPEG_2000
    if fragment.startswith(b"\xff\xd8"):
        for marker, _segment in _jpeg_segments(fragment):
            if marker == 0xF7:  # SOF55, JPEG-LS
                return _JPEG_LS
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                return _JPEG
        return None
    if len(fragment) >= 64:
        count, first = struct.unpack_from("<II", fragment, 0)
        if 1 <= count <= 15 and first == 64:
            return _RLE
    return None


def _jpeg_segments(stream: bytes):
    """Yield (marker, payload) for the header segments of a JPEG stream, up to SOS."""
    pos = 2
    while pos + 4 <= len(stream):
        if stream[pos] != 0xFF:
            return
        marker = stream[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = struct.unpack_from(">H", stream, pos + 2)[0]
        payload = stream[pos + 4 : pos + 2 + length]
        yield marker, payload
        if marker == 0xDA:
            return
        pos += 2 + length


# --------------------------------------------------------------------------
# Getting frame 0 out of the codecs


def _frame0(ds: Dataset, ts: UID, path: Path | None) -> tuple[np.ndarray, str]:
    """Frame 0 as stored values, from pydicom or, failing that, GDCM."""
    try:
        # index=0: a 300-frame RF run must not be decoded to look at one frame.
        return pixel_array(ds, index=0), "pydicom"
    except _STOP:
        raise
    except BaseException as exc:  # a Rust plugin panics on some corrupt streams (pylibjpeg-rle: index out of bounds)
        first_error = _describe(exc)
        unsupported = isinstance(exc, NotImplementedError)
    if not ts.is_compressed:
        raise DecodeError(f"Pixel Data cannot be read: {first_error}")
    try:
        return _gdcm_frame0(ds, path), "gdcm"
    except _GdcmFailed as exc:
        family = _FAMILY_BY_TS.get(str(ts))
        if family is None or unsupported:
            what = f"pixel data in transfer syntax {ts} ({ts.name}) cannot be decoded"
        else:
            what = f"{family} code stream is corrupt"
        raise DecodeError(f"{what}: {first_error}; GDCM: {exc}") from None


class _GdcmFailed(Exception):
    pass


def _gdcm_frame0(ds: Dataset, path: Path | None) -> np.ndarray:
    """Decode with GDCM's own reader, below pydicom's plugin layer.

    GDCM's ImageReader wants a file: the spool file when there is one, else
    the dataset written to a temporary file.
    """
    if path is not None:
        return _gdcm_read(path, ds)
    with tempfile.TemporaryDirectory(prefix="nnrouter-decode-") as tmp:
        tmp_path = Path(tmp) / "instance.dcm"
        try:
            try:
                pydicom.dcmwrite(tmp_path, ds, enforce_file_format=True)
            except (AttributeError, ValueError):  # file meta pydicom cannot complete
                pydicom.dcmwrite(tmp_path, ds, enforce_file_format=False)
        except Exception as exc:
            raise _GdcmFailed(f"could not write the dataset for GDCM: {_describe(exc)}") from None
        return _gdcm_read(tmp_path, ds)


def _gdcm_read(path: Path, ds: Dataset) -> np.ndarray:
    reader = gdcm.ImageReader()
    reader.SetFileName(str(path))
    if not reader.Read():
        raise _GdcmFailed("GDCM could not parse the file")
    image = reader.GetImage()
    pixel_format = image.GetPixelFormat()
    dtype = _GDCM_DTYPES.get(pixel_format.GetScalarType())
    if dtype is None:
        raise _GdcmFailed(f"GDCM pixel format {pixel_format.GetScalarTypeAsString()} is not supported")
    buffer = image.GetBuffer()
    if buffer is None:
        raise _GdcmFailed("GDCM could not decode the pixel data")
    # The SWIG binding hands the bytes over as a surrogate-escaped str.
    raw = buffer.encode("utf-8", "surrogateescape")
    columns, rows = image.GetDimension(0), image.GetDimension(1)
    samples = pixel_format.GetSamplesPerPixel()
    count = rows * columns * samples
    if len(raw) < count * dtype.itemsize:
        raise _GdcmFailed(f"GDCM returned {len(raw)} bytes, frame 0 needs {count * dtype.itemsize}")
    arr = np.frombuffer(raw, dtype=dtype, count=count).copy()
    if samples == 1:
        arr = arr.reshape(rows, columns)
    elif image.GetPlanarConfiguration():
        arr = arr.reshape(samples, rows, columns).transpose(1, 2, 0).copy()
    else:
        arr = arr.reshape(rows, columns, samples)

    # GDCM may report the codestream's signedness; the header's Pixel
    # Representation is what the Modality LUT expects.
    if arr.dtype.kind in "ui" and samples == 1:
        signed = int(ds.get("PixelRepresentation") or 0) == 1
        arr = arr.view(np.dtype(f"{'i' if signed else 'u'}{arr.dtype.itemsize}"))

    photometric = str(image.GetPhotometricInterpretation()).strip().upper()
    if samples == 3 and photometric in ("YBR_FULL", "YBR_FULL_422"):
        # GDCM leaves JPEG YCbCr as it is (already upsampled to full size).
        arr = convert_color_space(arr, "YBR_FULL", "RGB")
    return arr


def _apply_bits_stored(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """Drop bits above Bits Stored: overlays and garbage live there.

    pydicom and GDCM do this for native and RLE data, but neither does for a
    JPEG 2000 stream that carries more bits than Bits Stored; doing it again
    is harmless. Signed data is sign-extended from the High Bit.
    """
    if arr.dtype.kind not in "ui":
        return arr
    size = arr.dtype.itemsize
    width = size * 8
    bits = int(ds.get("BitsStored") or width)
    signed = int(ds.get("PixelRepresentation") or 0) == 1
    unsigned = arr.view(np.dtype(f"u{size}"))
    if not 0 < bits < width:
        return unsigned.view(np.dtype(f"i{size}")) if signed else unsigned
    if signed:
        shift = width - bits
        return (unsigned << shift).view(np.dtype(f"i{size}")) >> shift
    return unsigned & np.array((1 << bits) - 1, dtype=unsigned.dtype)


# --------------------------------------------------------------------------
# JPEG lossless predictor 6, written by encoders that overflowed


def _repair_predictor6(ds: Dataset, ts: UID, arr: np.ndarray) -> np.ndarray:
    """Undo the 16-bit predictor-6 overflow some lossless JPEG encoders had.

    Those encoders computed Rb + ((Ra - Rc) >> 1) with Ra - Rc wrapped to 16
    bits; a conforming decoder then drifts by 32768 wherever the wrap
    happened (DCMTK offers ``+w6`` for this). Both readings of the stream are
    exactly reconstructible from the conforming decode, so when a wrap could
    have happened the reading that is an image (far smaller total variation)
    is kept.
    """
    if str(ts) != _JPEG_LOSSLESS_PROCESS_14 or arr.ndim != 2 or arr.dtype.itemsize != 2:
        return arr
    if int(ds.get("BitsStored") or 16) != 16:
        return arr  # masked bits would corrupt the recovered differences
    frames = int(ds.get("NumberOfFrames") or 1)
    try:
        frame = get_frame(ds.PixelData, 0, number_of_frames=frames)
    except Exception:
        return arr
    header = _lossless_header(frame)
    if header != (16, 1, 6, 0, 0):  # precision, components, predictor, Pt, restart interval
        return arr

    x = arr.view(np.uint16).astype(np.int64)
    ra, rb, rc = x[1:, :-1], x[:-1, 1:], x[:-1, :-1]
    step = ra - rc
    wraps = (step > 32767) | (step < -32768)  # where int16 arithmetic overflows
    if not wraps.any():
        return arr  # both readings are the same picture
    if x.size > _PRED6_MAX_PIXELS:
        raise DecodeError(
            "JPEG lossless stream uses predictor 6 with 16-bit samples and may carry the "
            "encoder overflow bug; the image is too large to check"
        )

    # The coded differences, recovered from the conforming decode.
    diff = np.empty_like(x)
    diff[1:, 0] = x[1:, 0] - x[:-1, 0]
    diff[1:, 1:] = x[1:, 1:] - (rb + (step >> 1))
    diff &= 0xFFFF
    first_row = int(np.argmax(wraps.any(axis=1))) + 1

    fixed = x.copy()
    prev = fixed[first_row - 1].tolist()
    width = x.shape[1]
    for r in range(first_row, x.shape[0]):
        d = diff[r].tolist()
        row = [0] * width
        a = (prev[0] + d[0]) & 0xFFFF
        row[0] = a
        for c in range(1, width):
            t = a - prev[c - 1]
            if t > 32767:
                t -= 65536
            elif t < -32768:
                t += 65536
            a = (prev[c] + (t >> 1) + d[c]) & 0xFFFF
            row[c] = a
        fixed[r] = row
        prev = row

    repaired = fixed.astype(np.uint16).view(arr.dtype)
    if _total_variation(repaired.astype(np.int64)) < 0.5 * _total_variation(arr.astype(np.int64)):
        return repaired
    return arr


def _lossless_header(frame: bytes) -> tuple[int, int, int, int, int] | None:
    if not frame.startswith(b"\xff\xd8"):
        return None
    precision: int | None = None
    components: int | None = None
    predictor: int | None = None
    point_transform: int | None = None
    restart = 0
    for marker, payload in _jpeg_segments(frame):
        if marker == 0xC3 and len(payload) >= 6:
            precision, components = payload[0], payload[5]
        elif marker == 0xDD and len(payload) >= 2:
            restart = struct.unpack_from(">H", payload, 0)[0]
        elif marker == 0xDA and len(payload) >= 4:
            predictor, point_transform = payload[-3], payload[-1] & 0x0F
    if precision is None or components is None or predictor is None or point_transform is None:
        return None
    return precision, components, predictor, point_transform, restart


def _total_variation(v: np.ndarray) -> float:
    return float(np.abs(np.diff(v, axis=0)).sum() + np.abs(np.diff(v, axis=1)).sum())


# --------------------------------------------------------------------------
# Grey rendering: Modality LUT, VOI, polarity, padding


def _render_grey(ds: Dataset, stored: np.ndarray, monochrome1: bool) -> tuple[np.ndarray, tuple[float, float], str]:
    padding = _padding_mask(ds, stored)
    rescale = _rescale(ds)
    lut_item = _first_item(ds, "ModalityLUTSequence")

    if (
        stored.dtype.kind == "u"
        and int(ds.get("BitsStored") or 8) == 8
        and stored.dtype.itemsize == 1
        and lut_item is None
        and rescale == (1.0, 0.0)
        and _stated_window(ds) is None
        and _first_item(ds, "VOILUTSequence") is None
    ):
        # Already an 8-bit picture with nothing to map: show it as sent.
        out = stored.copy()
        window: tuple[float, float] = (128.0, 256.0)
        source = "none"
    else:
        values = _modality(ds, stored, rescale, lut_item)
        sample = _sample(values, padding)
        out, window, source = _voi(ds, values, sample)

    if monochrome1:
        np.subtract(255, out, out=out)
    if padding is not None:
        out[padding] = 0
    return out, window, source


def _padding_mask(ds: Dataset, stored: np.ndarray) -> np.ndarray | None:
    """Pixels outside the patient (PS3.3 C.7.5.1.1.2): black, and not statistics."""
    value = _int_or_none(ds.get("PixelPaddingValue"))
    if value is None:
        return None
    limit = _int_or_none(ds.get("PixelPaddingRangeLimit"))
    signed = int(ds.get("PixelRepresentation") or 0) == 1
    bits = int(ds.get("BitsStored") or stored.dtype.itemsize * 8)
    # Compare like with like: the pixels have been cut to Bits Stored, and a
    # value read as US (ambiguous VR) may mean a negative number.
    value = _as_stored(value, bits, signed)
    limit = _as_stored(limit, bits, signed) if limit is not None else None
    if limit is None:
        mask = stored == value
    else:
        lo, hi = min(value, limit), max(value, limit)
        mask = (stored >= lo) & (stored <= hi)
    return mask if mask.any() else None


def _as_stored(value: int, bits: int, signed: bool) -> int:
    value &= (1 << bits) - 1
    return value - (1 << bits) if signed and value >= 1 << (bits - 1) else value


def _rescale(ds: Dataset) -> tuple[float, float]:
    slope = _float_or_none(_frame_value(ds, "RescaleSlope"))
    intercept = _float_or_none(_frame_value(ds, "RescaleIntercept"))
    if slope is None or slope == 0:
        slope = 1.0
    return slope, (intercept if intercept is not None else 0.0)


def _modality(ds: Dataset, stored: np.ndarray, rescale: tuple[float, float], lut_item: Dataset | None) -> np.ndarray:
    """Stored values -> modality values (HU, optical density, ...) as float32.

    Written here rather than using pydicom's apply_modality_lut, which builds
    a dtype from the LUT bit depth (``uint12`` fails) and works in float64.
    """
    if lut_item is not None:
        lut = _read_lut(lut_item, ds, signed_input=int(ds.get("PixelRepresentation") or 0) == 1)
        if lut is not None:
            data, first, _bits = lut
            index = np.clip(stored.astype(np.int64) - first, 0, len(data) - 1)
            return data.astype(np.float32)[index]
    slope, intercept = rescale
    values = stored.astype(np.float32)
    if slope != 1.0:
        values *= np.float32(slope)
    if intercept != 0.0:
        values += np.float32(intercept)
    return values


def _sample(values: np.ndarray, padding: np.ndarray | None) -> np.ndarray:
    """A deterministic subsample of the non-padding values, for statistics."""
    step = max(1, values.size // _SAMPLE_TARGET)
    flat = values.reshape(-1)[::step]
    if padding is not None:
        flat = flat[~padding.reshape(-1)[::step]]
    return flat


def _voi(ds: Dataset, values: np.ndarray, sample: np.ndarray) -> tuple[np.ndarray, tuple[float, float], str]:
    """First stated window, else first VOI LUT, else a percentile window.

    The window comes first because it honours VOI LUT Function and is what
    viewers show by default. A stated VOI that would paint nearly every
    pixel one grey is skipped: it was made for other data.
    """
    stated = _stated_window(ds)
    if stated is not None:
        center, width, function = stated
        if not _flat(_window(sample, center, width, function)):
            source = "window" if function == "LINEAR" else "voi_lut_function"
            return _window(values, center, width, function, reuse=True), (center, width), source

    item = _first_item(ds, "VOILUTSequence")
    if item is not None and sample.size:
        lut = _read_lut(item, ds, signed_input=bool(sample.min() < 0))
        if lut is not None and not _flat(_apply_voi_lut(sample, *lut)):
            data, first, _bits = lut
            window = (first + len(data) / 2.0, float(len(data)))
            return _apply_voi_lut(values, *lut), window, "voi_lut_sequence"

    center, width = _percentile_window(sample)
    return _window(values, center, width, "LINEAR", reuse=True), (center, width), "percentile"


def _stated_window(ds: Dataset) -> tuple[float, float, str] | None:
    center = _first_float(_frame_value(ds, "WindowCenter"))
    width = _first_float(_frame_value(ds, "WindowWidth"))
    if center is None or width is None:
        return None
    function = str(_frame_value(ds, "VOILUTFunction") or "LINEAR").strip().upper()
    if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        function = "LINEAR"
    # PS3.3 C.11.2.1.2: LINEAR needs width >= 1, the others width > 0.
    if width <= 0 or (function == "LINEAR" and width < 1):
        return None
    return center, width, function


def _window(values: np.ndarray, center: float, width: float, function: str, *, reuse: bool = False) -> np.ndarray:
    """PS3.3 C.11.2.1.2 windowing onto 0..255, returned as uint8.

    ``reuse`` lets the full-size float32 buffer be overwritten: a mammogram's
    values are 57 MB, and the caller has no further use for them.
    """
    y = values if reuse and values.dtype == np.float32 else values.astype(np.float32)
    if function == "SIGMOID":
        y -= np.float32(center)
        y *= np.float32(-4.0 / width)
        np.clip(y, -80.0, 80.0, out=y)  # exp() stays finite
        np.exp(y, out=y)
        y += 1.0
        np.divide(np.float32(255.0), y, out=y)
    elif function == "LINEAR_EXACT":
        y -= np.float32(center)
        y *= np.float32(1.0 / width)
        y += 0.5
        y *= 255.0
    elif width > 1:
        y -= np.float32(center - 0.5)
        y *= np.float32(1.0 / (width - 1.0))
        y += 0.5
        y *= 255.0
    else:  # width 1: a threshold at center - 0.5
        y = np.where(values > center - 0.5, np.float32(255.0), np.float32(0.0))
    np.clip(y, 0.0, 255.0, out=y)
    np.rint(y, out=y)
    return y.astype(np.uint8)


def _percentile_window(sample: np.ndarray) -> tuple[float, float]:
    """Center/width mapping the 0.5th percentile to 0 and the 99.5th to 255."""
    if sample.size == 0:
        return 0.5, 1.0  # nothing but padding: any window, all black anyway
    lo, hi = (float(v) for v in np.percentile(sample, _PERCENTILES))
    # For LINEAR, c = (lo + hi + 1) / 2 and w = hi - lo + 1 put lo at 0, hi at 255.
    return (lo + hi + 1.0) / 2.0, max(hi - lo + 1.0, 1.0)


def _flat(rendered: np.ndarray) -> bool:
    if rendered.size == 0:
        return False
    counts = np.bincount(rendered.reshape(-1), minlength=256)
    return counts.max() >= _FLAT_SHARE * rendered.size


def _read_lut(item: Dataset, ds: Dataset, *, signed_input: bool) -> tuple[np.ndarray, int, int] | None:
    """(entries, first mapped value, bits) of a Modality or VOI LUT item, or None if unusable.

    Handles what real files do: LUT Data as OW bytes or a US list, 8-bit
    entries packed one per byte, a first mapped value read as US although
    the input is signed, a bit depth smaller than the entries need.
    """
    try:
        descriptor = [int(v) for v in item.LUTDescriptor]
        value = item["LUTData"].value
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    return _lut_from(descriptor, value, ds, signed_input=signed_input)


def _lut_from(descriptor: list[int], value, ds: Dataset, *, signed_input: bool) -> tuple[np.ndarray, int, int] | None:
    if len(descriptor) != 3 or value is None:
        return None
    entries, first, bits = descriptor
    entries = entries or 65536
    if signed_input and first >= 32768:
        first -= 65536
    if isinstance(value, (bytes, bytearray)):
        if bits <= 8 and len(value) == entries:
            data = np.frombuffer(value, dtype=np.uint8)
        else:
            little = ds.file_meta.TransferSyntaxUID != ExplicitVRBigEndian
            data = np.frombuffer(value[: len(value) // 2 * 2], dtype="<u2" if little else ">u2")
    elif isinstance(value, (int, float)):
        data = np.asarray([value])
    else:
        data = np.asarray(list(value))
    data = data[:entries].astype(np.int64)
    if data.size == 0:
        return None
    bits = max(bits, int(data.max()).bit_length(), 1)
    return data, first, bits


def _apply_voi_lut(values: np.ndarray, data: np.ndarray, first: int, bits: int) -> np.ndarray:
    index = np.clip(np.floor(values).astype(np.int64) - first, 0, len(data) - 1)
    scaled = np.rint(data * (255.0 / ((1 << bits) - 1))).clip(0, 255).astype(np.uint8)
    return scaled[index]


# --------------------------------------------------------------------------
# Colour


def _palette_to_rgb(ds: Dataset, stored: np.ndarray) -> np.ndarray:
    """PALETTE COLOR -> 8-bit RGB.

    Done here because pydicom's apply_color_lut reads OW LUT data as little
    endian even in an explicit big endian file (OBXXXX1A_expb comes out
    byte-swapped). Segmented palettes are rare and left to pydicom.
    """
    if "SegmentedRedPaletteColorLookupTableData" in ds:
        rgb = apply_color_lut(stored, ds)
        top = float(np.iinfo(rgb.dtype).max) if rgb.dtype.kind in "ui" else 1.0
        return np.rint(rgb.astype(np.float32) * np.float32(255.0 / top)).clip(0, 255).astype(np.uint8)
    signed = int(ds.get("PixelRepresentation") or 0) == 1
    channels = []
    for colour in ("Red", "Green", "Blue"):
        try:
            descriptor = [int(v) for v in ds[f"{colour}PaletteColorLookupTableDescriptor"].value]
            value = ds[f"{colour}PaletteColorLookupTableData"].value
        except (KeyError, TypeError, ValueError):
            raise DecodeError(f"PALETTE COLOR image without a usable {colour} palette") from None
        lut = _lut_from(descriptor, value, ds, signed_input=signed)
        if lut is None:
            raise DecodeError(f"PALETTE COLOR image without a usable {colour} palette")
        data, first, bits = lut
        scaled = np.rint(data * (255.0 / ((1 << bits) - 1))).clip(0, 255).astype(np.uint8)
        channels.append(scaled[np.clip(stored.astype(np.int64) - first, 0, len(data) - 1)])
    return np.stack(channels, axis=-1)


def _render_colour(rgb: np.ndarray, bits: int | None = None) -> tuple[np.ndarray, tuple[float, float], str]:
    """Colour -> luminance (Rec. 601 weights, as YBR_FULL's Y): a colour
    radiograph (scanned film, veterinary DX) is grey at heart."""
    if bits is None or rgb.dtype.itemsize == 1:
        bits = rgb.dtype.itemsize * 8
    top = float((1 << bits) - 1)
    grey = rgb[..., 0].astype(np.float32) * np.float32(0.299)
    grey += rgb[..., 1].astype(np.float32) * np.float32(0.587)
    grey += rgb[..., 2].astype(np.float32) * np.float32(0.114)
    if bits != 8:
        grey *= np.float32(255.0 / top)
    np.clip(grey, 0, 255, out=grey)
    np.rint(grey, out=grey)
    return grey.astype(np.uint8), (float(1 << (bits - 1)), float(1 << bits)), "none"


def _render_partial_ybr(ybr: np.ndarray) -> tuple[np.ndarray, tuple[float, float], str]:
    """YBR_PARTIAL's Y is luminance in 16..235: stretch it to 0..255."""
    y = (ybr[..., 0].astype(np.float32) - 16.0) * np.float32(255.0 / 219.0)
    np.clip(y, 0, 255, out=y)
    np.rint(y, out=y)
    return y.astype(np.uint8), (128.0, 256.0), "none"


# --------------------------------------------------------------------------
# Small helpers


def _downscale(image: np.ndarray, max_side: int | None) -> np.ndarray:
    """Shrink so the longest side fits max_side; models need a few hundred pixels."""
    image = np.ascontiguousarray(image)
    if max_side is None:
        return image
    rows, columns = image.shape
    longest = max(rows, columns)
    if longest <= max_side:
        return image
    scale = max_side / longest
    size = (max(1, round(columns * scale)), max(1, round(rows * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def _pixel_spacing(ds: Dataset) -> tuple[float, float] | None:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            raw = _frame_value(ds, keyword)
            values = [float(v) for v in raw] if raw is not None else []
        except (TypeError, ValueError):
            continue
        if len(values) == 2 and all(math.isfinite(v) and v > 0 for v in values):
            return values[0], values[1]
    return None


# Enhanced multi-frame IODs (enhanced CT, XA/RF, DX) keep these in functional
# group macros instead of the top level.
_MACRO_OF = MappingProxyType(
    {
        "RescaleSlope": "PixelValueTransformationSequence",
        "RescaleIntercept": "PixelValueTransformationSequence",
        "WindowCenter": "FrameVOILUTSequence",
        "WindowWidth": "FrameVOILUTSequence",
        "VOILUTFunction": "FrameVOILUTSequence",
        "PixelSpacing": "PixelMeasuresSequence",
    }
)


def _frame_value(ds: Dataset, keyword: str):
    """An attribute as it applies to frame 0: per-frame group, shared group, top level."""
    macro = _MACRO_OF.get(keyword)
    if macro is not None:
        for groups in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
            group = _first_item(ds, groups)
            item = _first_item(group, macro) if group is not None else None
            if item is not None and item.get(keyword) not in (None, ""):
                return item.get(keyword)
    return ds.get(keyword)


def _first_item(ds: Dataset, keyword: str) -> Dataset | None:
    try:
        seq = ds.get(keyword)
    except Exception:
        return None
    return seq[0] if seq else None


def _first_float(value) -> float | None:
    if value is None or value == "":
        return None
    if not isinstance(value, (str, bytes, int, float)):
        try:
            value = value[0]
        except (TypeError, IndexError):
            return None
    return _float_or_none(value)


def _float_or_none(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _int_or_none(value) -> int | None:
    number = _first_float(value)
    return int(number) if number is not None else None
