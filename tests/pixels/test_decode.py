"""The decode stage against real files, DCMTK's rendering and hand-made data sets.

Real files come from ../shared (CI only; skipped elsewhere with the reason) and
from pydicom-data (installed with the test extras, so those run anywhere).
DCMTK renders the reference pictures: the same window goes to both, and the
two must agree (Pearson r >= 0.99 at 256x256).
"""

from __future__ import annotations

import importlib.resources
import math
import shutil
import struct
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

import nnrouter.pixels.decode as decode_module
from nnrouter.pixels.decode import Decoded, DecodeError, decode_dataset, decode_file

# pydicom warns (and we do not care here) about files that are odd but readable.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SHARED_DICOM = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "dicom"
NO_SHARED = f"{SHARED_DICOM} is absent (it is present in CI, not on users' machines)"
PYDICOM_DATA = Path(str(importlib.resources.files("data_store") / "data"))

DCMTK_TOOLS = ("dcmj2pnm", "dcm2pnm", "dcml2pnm", "gdcmconv")
_missing_tools = [t for t in DCMTK_TOOLS if shutil.which(t) is None]
needs_dcmtk = pytest.mark.skipif(
    bool(_missing_tools),
    reason=f"reference renderers missing: {', '.join(_missing_tools)} (apt: dcmtk, libgdcm-tools)",
)


def shared(kind: str) -> list:
    """Parameters for every file in shared dicom/<kind>, or one skipped placeholder."""
    files = sorted((SHARED_DICOM / kind).glob("*.dcm"))
    if not files:
        return [pytest.param(None, id=f"{kind}-absent", marks=pytest.mark.skip(reason=NO_SHARED))]
    return [pytest.param(f, id=f.stem) for f in files]


# --------------------------------------------------------------------------
# Reference rendering with DCMTK


_J2K = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"}
_JPEG_LS = {"1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"}


def dcmtk_render(path: Path, decoded: Decoded, tmp: Path, extra: tuple[str, ...] = ()) -> np.ndarray:
    """DCMTK's 8-bit grey rendering of ``path`` with the window our decoder used.

    DCMTK has no JPEG 2000 codec, so such files go through ``gdcmconv --raw``
    first; JPEG-LS needs dcml2pnm. MONOCHROME1 comes out of DCMTK already
    inverted for display, i.e. in the same sense as ours.
    """
    meta = pydicom.dcmread(path, force=True, stop_before_pixels=True)
    ts = str(meta.file_meta.get("TransferSyntaxUID", "")) if hasattr(meta, "file_meta") else ""
    args: list[str] = list(extra)
    if decoded.window_source in ("window", "voi_lut_function", "percentile"):
        args += ["+Ww", repr(decoded.window[0]), repr(decoded.window[1])]
        args += ["+Wfs"] if "SIGMOID" in str(meta.get("VOILUTFunction", "")).upper() else []
    elif decoded.window_source == "voi_lut_sequence":
        args += ["+Wl", "1"]
    out = tmp / "reference.pnm"

    def run(tool: str, src: Path) -> subprocess.CompletedProcess:
        return subprocess.run([tool, *args, str(src), str(out)], capture_output=True, text=True, timeout=60)

    result = None if ts in _J2K else run("dcml2pnm" if ts in _JPEG_LS else "dcmj2pnm", path)
    if result is None or result.returncode != 0:
        raw = tmp / "raw.dcm"
        subprocess.run(["gdcmconv", "--raw", str(path), str(raw)], check=True, capture_output=True, timeout=60)
        result = run("dcm2pnm", raw)
    assert result.returncode == 0, f"DCMTK could not render {path.name}: {result.stderr}"
    image = cv2.imread(str(out), cv2.IMREAD_UNCHANGED)
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    return image


def agreement(ours: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(Pearson r, mean absolute difference in grey levels) at 256x256."""
    a = cv2.resize(ours, (256, 256), interpolation=cv2.INTER_AREA).astype(np.float64).ravel()
    b = cv2.resize(reference, (256, 256), interpolation=cv2.INTER_AREA).astype(np.float64).ravel()
    return float(np.corrcoef(a, b)[0, 1]), float(np.abs(a - b).mean())


# --------------------------------------------------------------------------
# Shared good files: all decode, all agree with DCMTK

# What each known file does; a file added to the folder later still gets the
# generic checks.
GOOD = {
    "cr_chest_mono1_no_meta": ("pydicom", "window", "MONOCHROME1"),
    # Its stated window (2725/5310) lies ~30 000 below all of its pixels.
    "dx_chest_j2k_no_bodypart": ("pydicom", "percentile", "MONOCHROME2"),
    "nema_MG1_J2KI": ("pydicom", "window", "MONOCHROME2"),
    "nema_RG1_J2KI": ("pydicom", "window", "MONOCHROME1"),
    "nema_RG1_JLSN": ("pydicom", "window", "MONOCHROME1"),
    "nema_RG2_J2KR": ("pydicom", "window", "MONOCHROME2"),
    "nema_RG2_JLSL": ("pydicom", "window", "MONOCHROME2"),
    "nema_RG2_JPLL": ("pydicom", "window", "MONOCHROME2"),
    # Refused by every pydicom plugin; GDCM's own reader decodes it.
    "nema_RG2_JPLY": ("gdcm", "window", "MONOCHROME2"),
    "nema_RG2_JPLY_fixed": ("pydicom", "window", "MONOCHROME2"),
    "nema_RG2_RLE": ("pydicom", "window", "MONOCHROME2"),
    "nema_RG3_J2KR": ("pydicom", "window", "MONOCHROME1"),
    "nema_RG3_JPLL": ("pydicom", "window", "MONOCHROME1"),
    "nema_RG3_RLE": ("pydicom", "window", "MONOCHROME1"),
    "vet_dx_jpeg_baseline_ybr": ("pydicom", "none", "YBR_FULL_422"),
}


@needs_dcmtk
@pytest.mark.parametrize("path", shared("good"))
def test_shared_good_file_decodes_like_dcmtk(path: Path, tmp_path: Path) -> None:
    decoded = decode_file(path)
    assert decoded.image.dtype == np.uint8 and decoded.image.ndim == 2
    assert decoded.image.shape == (decoded.rows, decoded.columns)
    assert decoded.image.std() > 10, "a flat picture is no picture"
    if path.stem in GOOD:
        assert (decoded.decoder, decoded.window_source, decoded.photometric) == GOOD[path.stem]

    r, mean_abs = agreement(decoded.image, dcmtk_render(path, decoded, tmp_path))
    assert r >= 0.99, f"r={r:.4f} against DCMTK"
    assert mean_abs < 3, f"mean |difference| {mean_abs:.2f} grey levels against DCMTK"


@pytest.mark.skipif(not SHARED_DICOM.is_dir(), reason=NO_SHARED)
def test_shared_metadata_and_max_side() -> None:
    mammo = decode_file(SHARED_DICOM / "good" / "nema_MG1_J2KI.dcm", max_side=512)
    assert (mammo.rows, mammo.columns) == (4664, 3064)
    assert mammo.image.shape == (512, round(3064 * 512 / 4664))
    assert mammo.modality == "RG"

    rg2 = decode_file(SHARED_DICOM / "good" / "nema_RG2_RLE.dcm")
    assert rg2.pixel_spacing_mm == (0.2, 0.2)
    assert rg2.window == (511.0, 1024.0)
    # PixelSpacing 0\0 is no spacing, and there is no ImagerPixelSpacing.
    assert decode_file(SHARED_DICOM / "good" / "nema_RG1_J2KI.dcm").pixel_spacing_mm is None
    # Only ImagerPixelSpacing.
    assert decode_file(SHARED_DICOM / "good" / "dx_chest_j2k_no_bodypart.dcm").pixel_spacing_mm == (0.4, 0.4)


@pytest.mark.skipif(not SHARED_DICOM.is_dir(), reason=NO_SHARED)
def test_no_meta_file_decodes_from_disk_and_in_memory() -> None:
    path = SHARED_DICOM / "good" / "cr_chest_mono1_no_meta.dcm"
    from_file = decode_file(path)
    ds = pydicom.dcmread(path, force=True)
    from_memory = decode_dataset(ds)
    np.testing.assert_array_equal(from_file.image, from_memory.image)
    assert "TransferSyntaxUID" not in ds.file_meta, "the caller's dataset was modified"


@pytest.mark.skipif(not SHARED_DICOM.is_dir(), reason=NO_SHARED)
def test_jply_gdcm_fallback_matches_the_repaired_file() -> None:
    broken = decode_file(SHARED_DICOM / "good" / "nema_RG2_JPLY.dcm")
    fixed = decode_file(SHARED_DICOM / "good" / "nema_RG2_JPLY_fixed.dcm")
    assert broken.decoder == "gdcm" and fixed.decoder == "pydicom"
    # Two JPEG decoders, one stream: at most an IDCT rounding step apart.
    assert np.abs(broken.image.astype(int) - fixed.image.astype(int)).max() <= 2


# --------------------------------------------------------------------------
# Shared bad files: each a specific, known outcome

BAD = {
    "dx_chest_j2k_corrupt_codestream": ("rejects", "JPEG 2000 code stream is corrupt: "),
    "wrong_transfer_syntax": (
        "rejects",
        "transfer syntax 1.2.840.10008.1.2.4.80 does not match the encoded pixel data",
    ),
    # File meta written implicit: pydicom reads it; the CT decodes with its first window.
    "implicit_file_meta": ("decodes", (40.0, 400.0)),
    # Lossless JPEG, predictor 6, written by an encoder that overflowed in 16 bits;
    # decoded as DCMTK's +w6 workaround does.
    "jpeg_lossless_bad": ("decodes", (550.0, 2000.0)),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("path", shared("bad"))
def test_shared_bad_file_has_a_clear_outcome(path: Path) -> None:
    try:
        decoded = decode_file(path)
    except DecodeError as exc:
        assert exc.reason.strip()
        outcome = ("rejects", exc.reason)
    else:
        assert decoded.image.dtype == np.uint8 and decoded.image.ndim == 2
        outcome = ("decodes", decoded.window)
    if path.stem in BAD:
        expected_kind, detail = BAD[path.stem]
        assert outcome[0] == expected_kind, outcome
        if expected_kind == "rejects":
            assert outcome[1].startswith(detail), outcome[1]
        else:
            assert outcome[1] == detail


@needs_dcmtk
@pytest.mark.parametrize("name, dcmtk_options", [("implicit_file_meta", ()), ("jpeg_lossless_bad", ("+w6",))])
def test_shared_bad_but_decodable_files_match_dcmtk(name: str, dcmtk_options: tuple[str, ...], tmp_path: Path) -> None:
    path = SHARED_DICOM / "bad" / f"{name}.dcm"
    if not path.exists():
        pytest.skip(NO_SHARED)
    decoded = decode_file(path)
    r, mean_abs = agreement(decoded.image, dcmtk_render(path, decoded, tmp_path, dcmtk_options))
    assert r >= 0.99 and mean_abs < 3, (r, mean_abs)


@pytest.mark.skipif(not SHARED_DICOM.is_dir(), reason=NO_SHARED)
def test_predictor6_repair_is_what_turns_noise_into_a_picture(monkeypatch: pytest.MonkeyPatch) -> None:
    path = SHARED_DICOM / "bad" / "jpeg_lossless_bad.dcm"
    repaired = decode_file(path)
    monkeypatch.setattr(decode_module, "_repair_predictor6", lambda ds, ts, arr: arr)
    conforming = decode_file(path)
    # The conforming reading wraps by 32768 and drifts: most of the head is lost
    # (test_shared_bad_but_decodable_files_match_dcmtk shows the repair is DCMTK's +w6).
    changed = repaired.image != conforming.image
    assert changed.mean() > 0.3
    assert repaired.image.mean() > 3 * conforming.image.mean()


# --------------------------------------------------------------------------
# pydicom-data: transfer syntaxes, colour, LUTs (runs anywhere)


def refuse(*args, **kwargs):
    """Stands in for pydicom's pixel_array when every plugin refuses a stream."""
    raise RuntimeError("plugin refused the stream")


def pdd(name: str) -> Path:
    return PYDICOM_DATA / name


# Each group: one picture in several transfer syntaxes; lossless => identical output.
# (pydicom-data's *_UNCR is the J2KR stream decompressed, *_UNCI the J2KI one.)
SAME_PICTURE = [
    [
        "emri_small.dcm",
        "emri_small_big_endian.dcm",
        "emri_small_RLE.dcm",
        "emri_small_jpeg_2k_lossless.dcm",
        "emri_small_jpeg_ls_lossless.dcm",
    ],
    ["RG1_UNCR.dcm", "RG1_J2KR.dcm"],
    ["RG1_UNCI.dcm", "RG1_J2KI.dcm"],
    ["RG3_UNCR.dcm", "RG3_J2KR.dcm"],
    ["MR2_UNCR.dcm", "MR2_J2KR.dcm"],
    ["US1_UNCR.dcm", "US1_J2KR.dcm"],
    ["SC_rgb.dcm", "SC_rgb_expb.dcm", "SC_rgb_2frame.dcm", "SC_rgb_expb_2frame.dcm"],
    ["SC_rgb_16bit.dcm", "SC_rgb_expb_16bit.dcm", "SC_rgb_16bit_2frame.dcm"],
    ["OBXXXX1A.dcm", "OBXXXX1A_expb.dcm", "OBXXXX1A_rle.dcm", "OBXXXX1A_2frame.dcm"],
]


@pytest.mark.parametrize("group", SAME_PICTURE, ids=[g[0].removesuffix(".dcm") for g in SAME_PICTURE])
def test_every_lossless_encoding_gives_the_same_picture(group: list[str]) -> None:
    first = decode_file(pdd(group[0]))
    for name in group[1:]:
        other = decode_file(pdd(name))
        np.testing.assert_array_equal(other.image, first.image, err_msg=name)
        assert other.window == first.window


def test_lossy_encodings_are_close() -> None:
    for lossless, lossy in [
        ("RG1_UNCR.dcm", "RG1_J2KI.dcm"),
        ("MR2_UNCR.dcm", "MR2_J2KI.dcm"),
        ("SC_rgb.dcm", "SC_rgb_dcmtk_ebcr_dcmd.dcm"),
    ]:
        a, b = decode_file(pdd(lossless)).image, decode_file(pdd(lossy)).image
        assert np.abs(a.astype(int) - b.astype(int)).mean() < 2


@needs_dcmtk
@pytest.mark.parametrize(
    "name",
    [
        "mlut_18.dcm",
        "vlut_04.dcm",
        "OBXXXX1A_expb.dcm",
        "US1_J2KI.dcm",
        "SC_ybr_full_uncompressed.dcm",
        "emri_small_big_endian.dcm",
        "eCT_Supplemental.dcm",
        "color3d_jpeg_baseline.dcm",
    ],
)
def test_pydicom_data_agrees_with_dcmtk(name: str, tmp_path: Path) -> None:
    decoded = decode_file(pdd(name))
    r, mean_abs = agreement(decoded.image, dcmtk_render(pdd(name), decoded, tmp_path))
    assert r >= 0.99 and mean_abs < 3, (r, mean_abs)


def test_enhanced_multiframe_takes_window_and_rescale_from_functional_groups() -> None:
    decoded = decode_file(pdd("eCT_Supplemental.dcm"))
    assert (decoded.window, decoded.window_source) == ((49.0, 102.0), "window")
    assert decoded.pixel_spacing_mm == (0.388672, 0.388672)


@pytest.mark.parametrize(
    "name",
    [
        "RG1_J2KR.dcm",
        "JPEG-LL.dcm",
        "emri_small_RLE.dcm",
        "emri_small_jpeg_ls_lossless.dcm",
        "US1_J2KR.dcm",
        "color3d_jpeg_baseline.dcm",
        "OBXXXX1A_rle.dcm",
    ],
)
def test_gdcm_fallback_gives_the_same_picture(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = decode_file(pdd(name))
    assert expected.decoder == "pydicom"

    monkeypatch.setattr(decode_module, "pixel_array", refuse)
    from_file = decode_file(pdd(name))
    from_memory = decode_dataset(pydicom.dcmread(pdd(name)))  # via a temporary file
    for got in (from_file, from_memory):
        assert got.decoder == "gdcm"
        np.testing.assert_array_equal(got.image, expected.image)


# --------------------------------------------------------------------------
# Hand-made data sets


def make(
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    *,
    bits_stored: int | None = None,
    signed: bool | None = None,
    frames: int | None = None,
    ts: str = ExplicitVRLittleEndian,
    **attrs,
) -> Dataset:
    """An uncompressed little endian image; ``pixels`` is (rows, cols[, 3]) or (frames, rows, cols)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Modality = "OT"
    colour = photometric in ("RGB", "YBR_FULL")
    shape = pixels.shape[1:] if frames else pixels.shape
    ds.Rows, ds.Columns = shape[0], shape[1]
    if frames:
        ds.NumberOfFrames = frames
    ds.SamplesPerPixel = 3 if colour else 1
    if colour:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(pixels.dtype.kind == "i" if signed is None else signed)
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    return ds


def test_monochrome1_is_inverted() -> None:
    pixels = np.array([[0, 1000], [1000, 0]], dtype=np.uint16)
    mono2 = decode_dataset(make(pixels, WindowCenter=500, WindowWidth=1000)).image
    mono1 = decode_dataset(make(pixels, "MONOCHROME1", WindowCenter=500, WindowWidth=1000)).image
    assert mono2[0, 1] == 255 and mono2[0, 0] == 0
    assert mono1[0, 1] == 0 and mono1[0, 0] == 255  # bright in -> dark out


def test_rescale_then_window_gives_known_grey_levels() -> None:
    # value = 2 * stored - 1000; LINEAR window 0/401 spans -200.5 .. 199.5.
    stored = np.array([[0, 450, 500, 550, 1000]], dtype=np.uint16)
    ds = make(stored, RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=0, WindowWidth=401)
    decoded = decode_dataset(ds)
    # ((v + 0.5) / 400 + 0.5) * 255 for v = -100, 0, 100
    assert decoded.image.tolist() == [[0, 64, 128, 192, 255]]
    assert (decoded.window, decoded.window_source) == ((0.0, 401.0), "window")


def test_signed_ct_with_multiple_windows_uses_the_first() -> None:
    stored = np.array([[-1024, 0, 1064, 1400]], dtype=np.int16)  # HU -2048, -1024, 40, 376
    ds = make(stored, RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=[40, -600], WindowWidth=[400, 1200])
    decoded = decode_dataset(ds)
    assert decoded.window == (40.0, 400.0)
    assert decoded.image.tolist() == [[0, 0, 128, 255]]


def _voi_formula(x: float, c: float, w: float, function: str) -> int:
    """PS3.3 C.11.2.1.2, written out independently of the module."""
    if function == "SIGMOID":
        y = 255 / (1 + math.exp(-4 * (x - c) / w))
    elif function == "LINEAR_EXACT":
        y = 0 if x <= c - w / 2 else 255 if x > c + w / 2 else ((x - c) / w + 0.5) * 255
    else:
        lo, hi = c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2
        y = 0 if x <= lo else 255 if x > hi else ((x - (c - 0.5)) / (w - 1) + 0.5) * 255
    return int(np.rint(y))


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_voi_lut_function_follows_the_standard(function: str) -> None:
    c, w = 1000.0, 400.0
    xs = [0, 600, 800, 900, 1000, 1100, 1200, 1400, 2000]
    ds = make(np.array([xs], dtype=np.uint16), WindowCenter=c, WindowWidth=w, VOILUTFunction=function)
    decoded = decode_dataset(ds)
    assert decoded.image[0].tolist() == [_voi_formula(x, c, w, function) for x in xs]
    assert decoded.window_source == ("window" if function == "LINEAR" else "voi_lut_function")


def test_sigmoid_and_linear_differ_as_the_standard_says() -> None:
    xs = np.array([[800, 1000, 1200, 1400]], dtype=np.uint16)
    linear = decode_dataset(make(xs, WindowCenter=1000, WindowWidth=400)).image[0]
    sigmoid = decode_dataset(make(xs, WindowCenter=1000, WindowWidth=400, VOILUTFunction="SIGMOID")).image[0]
    # LINEAR clips at c -+ w/2; SIGMOID is 255/(1+e^2) = 30.4 and 255/(1+e^-2) = 224.6
    # there and keeps climbing beyond (255/(1+e^-4) = 250.3).
    assert linear.tolist() == [0, 128, 255, 255]
    assert sigmoid.tolist() == [30, 128, 225, 250]


def test_pixel_padding_is_black_and_not_in_the_percentile_window() -> None:
    rng = np.random.default_rng(1)
    pixels = rng.integers(100, 1101, size=(64, 64)).astype(np.int16)
    pixels[:, :32] = -2000
    decoded = decode_dataset(make(pixels, PixelPaddingValue=-2000))
    assert decoded.window_source == "percentile"
    center, width = decoded.window
    assert center - width / 2 > 90, "padding pulled the window down"
    assert (decoded.image[:, :32] == 0).all()
    assert decoded.image[:, 32:].max() == 255 and decoded.image[:, 32:].mean() > 100

    # MONOCHROME1: the picture inverts, the padding stays black.
    mono1 = decode_dataset(make(pixels, "MONOCHROME1", PixelPaddingValue=-2000)).image
    assert (mono1[:, :32] == 0).all()
    np.testing.assert_array_equal(mono1[:, 32:], 255 - decoded.image[:, 32:])


def test_pixel_padding_range_limit() -> None:
    pixels = np.tile(np.arange(0, 1000, dtype=np.uint16), (4, 1))
    decoded = decode_dataset(make(pixels, PixelPaddingValue=10, PixelPaddingRangeLimit=0))
    assert (decoded.image[:, :11] == 0).all()
    assert decoded.window[0] - decoded.window[1] / 2 >= 10


def test_pixel_padding_value_read_as_unsigned_or_beyond_bits_stored() -> None:
    pixels = np.array([[-2000, 0, 100, 200]], dtype=np.int16)
    # -2000 as the US an ambiguous VR gives.
    as_us = decode_dataset(make(pixels, PixelPaddingValue=63536, WindowCenter=100, WindowWidth=200)).image
    assert as_us[0, 0] == 0 and as_us[0, 1] == 0 and as_us[0, 3] == 255
    # 12-bit unsigned data padded with 0xFFFF, which Bits Stored cuts to 4095.
    unsigned = np.array([[0xFFFF, 0, 2000, 4000]], dtype=np.uint16)
    image = decode_dataset(make(unsigned, bits_stored=12, PixelPaddingValue=0xFFFF)).image
    assert image[0, 0] == 0 and image[0, 3] == 255


def test_bits_stored_masks_garbage_high_bits() -> None:
    clean = np.array([[0, 1000, 2048, 4095]], dtype=np.uint16)
    dirty = clean | np.uint16(0xA000)
    window = {"WindowCenter": 2048, "WindowWidth": 4096}
    expected = decode_dataset(make(clean, bits_stored=12, **window)).image
    got = decode_dataset(make(dirty, bits_stored=12, **window)).image
    np.testing.assert_array_equal(got, expected)
    assert got.tolist() == [[0, 62, 128, 255]]


def test_bits_stored_sign_extends_signed_data() -> None:
    # 12-bit two's complement: 0x0FFF is -1, 0x0800 is -2048; 0xB000 is garbage.
    dirty = np.array([[0x0FFF, 0x0800, 0x07FF, 0x0000]], dtype=np.uint16) | np.uint16(0xB000)
    ds = make(dirty.view(np.int16), bits_stored=12, signed=True, WindowCenter=0, WindowWidth=4096)
    image = decode_dataset(ds).image
    assert image.tolist() == [[_voi_formula(v, 0, 4096, "LINEAR") for v in (-1, -2048, 2047, 0)]]


def _packbits_literal(data: bytes) -> bytes:
    out = bytearray()
    for i in range(0, len(data), 128):
        chunk = data[i : i + 128]
        out += bytes([len(chunk) - 1]) + chunk
    if len(out) % 2:
        out.append(0x80)  # PackBits no-op, keeps the segment even
    return bytes(out)


def _rle_frame(pixels: np.ndarray) -> bytes:
    """RLE Lossless for 16-bit samples, high bits and all (pydicom's encoder masks them)."""
    big = pixels.astype(">u2").tobytes()
    msb, lsb = _packbits_literal(big[0::2]), _packbits_literal(big[1::2])
    header = struct.pack("<16I", 2, 64, 64 + len(msb), *([0] * 13))
    return header + msb + lsb


@pytest.mark.parametrize("signed", [False, True])
def test_bits_stored_masking_through_gdcm(signed: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    values = (np.arange(16 * 16, dtype=np.uint32).reshape(16, 16) * 997 % 65536).astype(np.uint16)
    center = 0 if signed else 2048
    ds = make(values, bits_stored=12, signed=signed, ts=RLELossless, WindowCenter=center, WindowWidth=4096)
    ds.PixelData = encapsulate([_rle_frame(values)])
    ds["PixelData"].VR = "OB"
    path = tmp_path / "rle.dcm"
    ds.save_as(path, enforce_file_format=True)
    via_pydicom = decode_file(path)

    monkeypatch.setattr(decode_module, "pixel_array", refuse)
    via_gdcm = decode_file(path)
    assert (via_pydicom.decoder, via_gdcm.decoder) == ("pydicom", "gdcm")
    np.testing.assert_array_equal(via_gdcm.image, via_pydicom.image)
    masked = values & 0x0FFF
    if signed:
        masked = np.where(masked >= 2048, masked.astype(np.int32) - 4096, masked)
    expected = [_voi_formula(int(v), center, 4096, "LINEAR") for v in masked.ravel()[:20]]
    assert via_gdcm.image.ravel()[:20].tolist() == expected


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("via", ["pydicom", "gdcm"])
def test_bits_stored_masks_what_jpeg2000_codecs_leave(signed: bool, via: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Neither openjpeg (pylibjpeg) nor GDCM drops bits above Bits Stored when the
    # code stream carries 16 bits: only the decode stage does.
    values = ((np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 13) % 4096 | 0xA000).astype(np.uint16)
    pixels = values.view(np.int16) if signed else values
    ds = make(pixels, WindowCenter=0 if signed else 2048, WindowWidth=4096)
    ds.compress(JPEG2000Lossless)
    ds.BitsStored, ds.HighBit = 12, 11
    if via == "gdcm":
        monkeypatch.setattr(decode_module, "pixel_array", refuse)
    decoded = decode_dataset(ds)
    assert decoded.decoder == via
    masked = (values & 0x0FFF).astype(np.int32)
    if signed:
        masked = np.where(masked >= 2048, masked - 4096, masked)
    expected = [_voi_formula(int(v), 0 if signed else 2048, 4096, "LINEAR") for v in masked.ravel()[:300]]
    assert decoded.image.ravel()[:300].tolist() == expected


def test_multiframe_takes_frame_zero_only(monkeypatch: pytest.MonkeyPatch) -> None:
    ramp = np.tile(np.arange(0, 4000, 40, dtype=np.uint16), (50, 1))
    frames = np.stack([ramp, ramp[:, ::-1], ramp // 2])
    ds = make(frames, frames=3, WindowCenter=2000, WindowWidth=4000)
    seen = []
    real = decode_module.pixel_array

    def spy(src, **kwargs):
        seen.append(kwargs.get("index"))
        return real(src, **kwargs)

    monkeypatch.setattr(decode_module, "pixel_array", spy)
    decoded = decode_dataset(ds)
    single = decode_dataset(make(ramp, WindowCenter=2000, WindowWidth=4000))
    np.testing.assert_array_equal(decoded.image, single.image)
    assert seen and all(index == 0 for index in seen)


def test_rgb_and_ybr_become_luminance() -> None:
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255], [0, 0, 0]]], dtype=np.uint8)
    decoded = decode_dataset(make(rgb, "RGB"))
    assert decoded.image.tolist() == [[76, 150, 29, 255, 0]]  # 0.299 R + 0.587 G + 0.114 B
    assert decoded.window_source == "none"

    ybr = np.array([[[100, 128, 128], [200, 128, 128]]], dtype=np.uint8)  # grey: Y is the luminance
    assert decode_dataset(make(ybr, "YBR_FULL")).image.tolist() == [[100, 200]]


def test_eight_bit_grey_without_window_passes_through() -> None:
    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    decoded = decode_dataset(make(pixels))
    np.testing.assert_array_equal(decoded.image, pixels)
    assert (decoded.window, decoded.window_source) == ((128.0, 256.0), "none")


def test_modality_lut_sequence_then_window() -> None:
    item = Dataset()
    item.LUTDescriptor = [4, 0, 16]
    item.LUTData = [0, 100, 200, 4000]
    item.ModalityLUTType = "US"
    stored = np.array([[0, 1, 2, 3, 9]], dtype=np.uint16)
    ds = make(stored, WindowCenter=100.5, WindowWidth=201, ModalityLUTSequence=[item])
    assert decode_dataset(ds).image.tolist() == [[0, 128, 255, 255, 255]]


def test_voi_lut_sequence() -> None:
    item = Dataset()
    item.LUTDescriptor = [4, 10, 8]
    item.LUTData = [0, 51, 102, 255]
    stored = np.array([[0, 10, 11, 12, 13, 99]], dtype=np.uint16)
    decoded = decode_dataset(make(stored, VOILUTSequence=[item]))
    assert decoded.image.tolist() == [[0, 0, 51, 102, 255, 255]]
    assert (decoded.window_source, decoded.window) == ("voi_lut_sequence", (12.0, 4.0))


def test_window_that_paints_everything_one_grey_falls_back_to_percentile() -> None:
    rng = np.random.default_rng(2)
    pixels = rng.integers(33000, 46000, size=(64, 64)).astype(np.uint16)
    decoded = decode_dataset(make(pixels, WindowCenter=2725, WindowWidth=5310))
    assert decoded.window_source == "percentile"
    assert decoded.image.std() > 50


def test_pixel_spacing_falls_back_to_imager_pixel_spacing() -> None:
    pixels = np.zeros((4, 4), dtype=np.uint16)
    assert decode_dataset(make(pixels, PixelSpacing=[0.1, 0.2])).pixel_spacing_mm == (0.1, 0.2)
    imager_only = make(pixels, PixelSpacing=[0, 0], ImagerPixelSpacing=[0.3, 0.3])
    assert decode_dataset(imager_only).pixel_spacing_mm == (0.3, 0.3)
    assert decode_dataset(make(pixels)).pixel_spacing_mm is None


def test_max_side_keeps_the_aspect() -> None:
    pixels = np.tile(np.arange(300, dtype=np.uint16), (200, 1))
    decoded = decode_dataset(make(pixels, WindowCenter=150, WindowWidth=300), max_side=150)
    assert decoded.image.shape == (100, 150)
    assert (decoded.rows, decoded.columns) == (200, 300)
    assert decode_dataset(make(pixels), max_side=1000).image.shape == (200, 300)
    with pytest.raises(ValueError):
        decode_dataset(make(pixels), max_side=0)


def test_uncompressed_encodings_from_disk(tmp_path: Path) -> None:
    pixels = (np.arange(64 * 48, dtype=np.uint16).reshape(64, 48) * 7) % 4096
    reference = decode_dataset(make(pixels, bits_stored=12)).image

    deflated = make(pixels, bits_stored=12, ts=DeflatedExplicitVRLittleEndian)
    deflated.save_as(tmp_path / "deflated.dcm", enforce_file_format=True)
    np.testing.assert_array_equal(decode_file(tmp_path / "deflated.dcm").image, reference)

    # No file meta at all, implicit VR: how a modality's raw dataset looks.
    bare = make(pixels, bits_stored=12)
    del bare.file_meta
    bare.save_as(tmp_path / "bare.dcm", implicit_vr=True, little_endian=True, enforce_file_format=False)
    np.testing.assert_array_equal(decode_file(tmp_path / "bare.dcm").image, reference)


def test_dataset_without_file_meta_in_memory_is_left_untouched() -> None:
    ds = make(np.arange(16, dtype=np.uint16).reshape(4, 4))
    del ds.file_meta
    decoded = decode_dataset(ds)
    assert decoded.image.shape == (4, 4)
    assert not hasattr(ds, "file_meta") or "TransferSyntaxUID" not in ds.file_meta


# --------------------------------------------------------------------------
# Failures: always DecodeError, always a reason


def test_missing_pixel_data() -> None:
    ds = make(np.zeros((4, 4), dtype=np.uint16))
    del ds.PixelData
    with pytest.raises(DecodeError) as info:
        decode_dataset(ds)
    assert info.value.reason == "no Pixel Data"


def test_transfer_syntax_that_contradicts_the_bytes() -> None:
    native = make(np.zeros((8, 8), dtype=np.uint16), ts=JPEG2000Lossless)
    with pytest.raises(DecodeError) as info:
        decode_dataset(native)
    assert info.value.reason.startswith("transfer syntax 1.2.840.10008.1.2.4.90 does not match the encoded pixel data")

    # A JPEG lossless stream labelled JPEG-LS.
    jpeg = pydicom.dcmread(pdd("JPEG-LL.dcm"))
    jpeg.file_meta.TransferSyntaxUID = JPEGLSLossless
    with pytest.raises(DecodeError) as info:
        decode_dataset(jpeg)
    assert "names JPEG-LS but the first frame is a JPEG stream" in info.value.reason


def test_corrupt_jpeg2000_stream() -> None:
    ds = pydicom.dcmread(pdd("emri_small_jpeg_2k_lossless.dcm"))
    frames = list(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))
    frames[0] = frames[0][: len(frames[0]) // 3]
    ds.PixelData = encapsulate(frames)
    with pytest.raises(DecodeError) as info:
        decode_dataset(ds)
    assert info.value.reason.startswith("JPEG 2000 code stream is corrupt: ")
    assert "GDCM" in info.value.reason


def test_unknown_and_undecodable_transfer_syntaxes() -> None:
    ds = make(np.zeros((8, 8), dtype=np.uint16), ts="1.2.3.4.5")
    with pytest.raises(DecodeError) as info:
        decode_dataset(ds)
    assert info.value.reason == "transfer syntax 1.2.3.4.5 is not a known transfer syntax"

    # MPEG2 has no codec here: "cannot be decoded", not "corrupt".
    ds = make(np.zeros((8, 8), dtype=np.uint16), ts="1.2.840.10008.1.2.4.100")
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(60)])
    with pytest.raises(DecodeError) as info:
        decode_dataset(ds)
    assert info.value.reason.startswith("pixel data in transfer syntax 1.2.840.10008.1.2.4.100 (MPEG2 ")


def test_native_pixels_that_look_like_an_item_tag_still_decode() -> None:
    pixels = np.array([[0xFFFE, 0xE000], [0, 4095]], dtype=np.uint16)
    decoded = decode_dataset(make(pixels, WindowCenter=32768, WindowWidth=65536))
    assert decoded.image.tolist() == [[255, 223], [0, 16]]


def test_short_native_pixel_data() -> None:
    ds = make(np.zeros((8, 8), dtype=np.uint16))
    ds.PixelData = ds.PixelData[:10]
    with pytest.raises(DecodeError) as info:
        decode_dataset(ds)
    assert info.value.reason.startswith("Pixel Data cannot be read: ")


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(DecodeError) as info:
        decode_file(tmp_path / "absent.dcm")
    assert info.value.reason.startswith("cannot read the file")
    text = tmp_path / "notes.txt"
    text.write_text("not a DICOM file\n" * 20)
    with pytest.raises(DecodeError) as info:
        decode_file(text)
    assert info.value.reason


def test_unexpected_exceptions_become_decode_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args, **kwargs):
        raise KeyError("surprise")

    monkeypatch.setattr(decode_module, "_render_grey", boom)
    with pytest.raises(DecodeError) as info:
        decode_dataset(make(np.zeros((4, 4), dtype=np.uint16)))
    assert "KeyError" in info.value.reason and "surprise" in info.value.reason
