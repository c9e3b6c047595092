"""Fuzzed data sets over the network: every one gets a DICOM status or a clean abort.

Real data sets (pydicom-data, ../shared/data/dicom/good, nnrouter.testing.synthetic)
are mutated the ways broken modalities and hostile peers break them: flipped
bytes, truncation, wrong element lengths, UIDs that are paths, deep
sequences, pixel data that does not match its header, unknown VRs. The bytes
go on the wire as made (pynetdicom's chunked send does not re-encode), so
nnrouter sees exactly the damage. Throughout, a good sender (DCMTK storescu)
must keep being served, and nothing may be written outside ``storage.path``.

Seeded and bounded: ``NNROUTER_FUZZ_CASES`` (default 60 random cases, on top
of the fixed ones) and ``NNROUTER_FUZZ_SEED`` (default 11) make a longer or
another run.
"""

from __future__ import annotations

import collections
import hashlib
import os
import random
import struct
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pytest
from conftest import SHARED_DICOM, needs, pydicom_data
from dicomfiles import dataset_bytes, node_rows, write_part10
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import data_element_generator
from pydicom.filewriter import write_dataset
from pydicom.uid import UID, generate_uid
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, VR
from pynetdicom import AE, _config

from nnrouter.core.store import Instance
from nnrouter.testing import peers
from nnrouter.testing.synthetic import DXSpec, write_dx

CASES = int(os.environ.get("NNROUTER_FUZZ_CASES", "60"))
SEED = int(os.environ.get("NNROUTER_FUZZ_SEED", "11"))
BATCH = 10

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(300 + CASES),  # a longer run (NNROUTER_FUZZ_CASES) gets the time it needs
    needs("storescu"),
]


# Small real files, several encodings: J2K radiograph, RLE MR, uncompressed RGB, JPEG baseline.
PYDICOM_SEEDS = ["RG3_J2KI.dcm", "emri_small_RLE.dcm", "SC_rgb.dcm", "liver.dcm"]
SHARED_SEEDS = ["nema_RG2_JPLY.dcm", "vet_dx_jpeg_baseline_ybr.dcm"]

HOSTILE_UIDS = [
    "../../../etc/passwd",
    "..",
    "1.2.840/../../x",
    "1.2.3\x00/../../etc",
    "9" * 200,
    "1." * 100,
    "/tmp/x",
    "1.2.3\\4.5",  # two values
    "C:\\Windows\\x",
    "1.2.3\n4",
    "%2e%2e%2f",
]
UID_KEYWORDS = ["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID"]
_KNOWN_VRS = {v.value for v in VR}


@dataclass
class Case:
    kind: str
    sop_class: str
    affected: str
    ts: str
    raw: bytes
    expect: set[int] | None = None  # statuses allowed; None: any status or a clean abort


@dataclass
class Seed:
    name: str
    sop_class: str
    sop_uid: str
    ts: UID
    raw: bytes
    path: Path


def _seeds(tmp: Path) -> list[Seed]:
    files = [pydicom_data(n) for n in PYDICOM_SEEDS]
    files += [SHARED_DICOM / "good" / n for n in SHARED_SEEDS if (SHARED_DICOM / "good" / n).exists()]
    tmp.mkdir(parents=True, exist_ok=True)
    files.append(write_dx(tmp / "synthetic.dcm", DXSpec(rows=64, columns=64)))
    out = []
    for f in files:
        ds = dcmread(f, force=True, stop_before_pixels=True)
        out.append(
            Seed(
                f.name,
                str(ds.SOPClassUID),
                str(ds.SOPInstanceUID).strip(),
                UID(str(ds.file_meta.TransferSyntaxUID)),
                dataset_bytes(f),
                f,
            )
        )
    return out


def _elements(seed: Seed) -> list[tuple[int, int, int, str]]:
    """Top-level elements: (tag, header offset, value offset, VR) as encoded."""
    fp = BytesIO(seed.raw)
    out = []
    for elem in data_element_generator(fp, seed.ts.is_implicit_VR, seed.ts.is_little_endian, defer_size=256):
        if not isinstance(elem, RawDataElement) or elem.value_tell is None:
            continue
        long_vr = seed.ts.is_implicit_VR or elem.VR in EXPLICIT_VR_LENGTH_32
        head = elem.value_tell - (12 if long_vr and not seed.ts.is_implicit_VR else 8)
        out.append((int(elem.tag), head, elem.value_tell, str(elem.VR)))
    return out


def _fresh(seed: Seed, rnd: random.Random) -> tuple[bytes, str]:
    """The seed's data set with a new SOP Instance UID (so a stored case is new), re-encoded as sent."""
    ds = dcmread(seed.path, force=True)
    uid = generate_uid(entropy_srcs=[str(rnd.random())])
    ds.SOPInstanceUID = uid
    return _encode(ds, seed.ts), uid


def _encode(ds, ts: UID) -> bytes:  # type: ignore[no-untyped-def]
    buf = DicomBytesIO()
    buf.is_little_endian = ts.is_little_endian
    buf.is_implicit_VR = ts.is_implicit_VR
    write_dataset(buf, ds)
    return buf.getvalue()


def _nested(depth: int) -> bytes:
    start = struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF) + struct.pack(
        "<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF
    )
    end = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    leaf = struct.pack("<HH2sH", 0x0008, 0x0100, b"SH", 2) + b"X "
    return start * depth + leaf + end * depth


def _mutate(kind: str, seed: Seed, rnd: random.Random) -> Case:
    raw = seed.raw
    case = Case(kind, seed.sop_class, seed.sop_uid, str(seed.ts), raw)
    elems = _elements(seed)
    if kind == "byte_flip":
        data = bytearray(raw)
        # Mostly in the header, where the parser looks; sometimes anywhere.
        span = min(len(data), 4096) if rnd.random() < 0.8 else len(data)
        for _ in range(rnd.randint(1, 8)):
            data[rnd.randrange(span)] ^= 1 << rnd.randrange(8)
        case.raw = bytes(data)
    elif kind == "truncate":
        case.raw = raw[: rnd.randrange(1, len(raw))]
    elif kind == "bad_length" and elems:
        _, _, value_at, vr = rnd.choice(elems)
        data = bytearray(raw)
        if seed.ts.is_implicit_VR or vr in EXPLICIT_VR_LENGTH_32:
            old = struct.unpack_from("<I" if seed.ts.is_little_endian else ">I", data, value_at - 4)[0]
            new = rnd.choice([0, 1, old + 1, max(old - 1, 0), old * 2 + 2, 0xFFFFFFF0, 0xFFFFFFFE, len(raw) * 4])
            struct.pack_into("<I" if seed.ts.is_little_endian else ">I", data, value_at - 4, new)
        else:
            old = struct.unpack_from("<H" if seed.ts.is_little_endian else ">H", data, value_at - 2)[0]
            new = rnd.choice([0, 1, old + 1, max(old - 1, 0), 0xFFFF, 0xFFFE])
            struct.pack_into("<H" if seed.ts.is_little_endian else ">H", data, value_at - 2, new)
        case.raw = bytes(data)
    elif kind == "unknown_vr" and not seed.ts.is_implicit_VR and elems:
        _, head, _, _ = rnd.choice([e for e in elems if e[3] not in EXPLICIT_VR_LENGTH_32] or elems)
        letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
        new_vr = rnd.choice([a + b for a in letters for b in letters if a + b not in _KNOWN_VRS])
        case.raw = raw[: head + 4] + new_vr.encode() + raw[head + 6 :]
        case.expect = {0xC000}
    elif kind == "hostile_uid":
        keyword = rnd.choice(UID_KEYWORDS)
        value = rnd.choice(HOSTILE_UIDS)
        ds = dcmread(seed.path, force=True)
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[str(rnd.random())])
        setattr(ds, keyword, value)
        case.raw = _encode(ds, seed.ts)
        case.affected = str(ds.SOPInstanceUID)
        case.kind = f"hostile_uid:{keyword}"
        case.expect = {0xA900}
    elif kind == "deep_sequence" and not seed.ts.is_implicit_VR:
        depth = rnd.choice([20, 199, 250, 1000, 5000])
        fresh, uid = _fresh(seed, rnd)
        at = fresh.find(b"\xe0\x7f\x10\x00")
        at = at if at >= 0 else len(fresh)
        case.raw = fresh[:at] + _nested(depth) + fresh[at:]
        case.affected = uid
        case.kind = f"deep_sequence:{depth}"
        # Beyond what the reader can follow: refused; shallow: kept.
        case.expect = {0x0000} if depth < 150 else {0xC000}
    elif kind == "pixel_mismatch":
        ds = dcmread(seed.path, force=True)
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[str(rnd.random())])
        case.affected = str(ds.SOPInstanceUID)
        how = rnd.choice(["rows_double", "pixels_short", "length_claims_more"])
        case.kind = f"pixel_mismatch:{how}"
        if how == "rows_double" and "Rows" in ds:
            ds.Rows = min(int(ds.Rows) * 2, 65535)
            case.raw = _encode(ds, seed.ts)
            case.expect = {0x0000}  # pixels are a worker's business: the bytes are kept as sent
        elif how == "pixels_short" and "PixelData" in ds and not ds["PixelData"].is_undefined_length:
            ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2 & ~1]
            case.raw = _encode(ds, seed.ts)
            case.expect = {0x0000}
        else:
            enc = _encode(ds, seed.ts)
            at = enc.find(b"\xe0\x7f\x10\x00" if seed.ts.is_little_endian else b"\x7f\xe0\x00\x10")
            if at < 0:
                case.raw = enc
            else:
                length_at = at + (4 if seed.ts.is_implicit_VR else 8)
                fmt = "<I" if seed.ts.is_little_endian else ">I"
                declared = struct.unpack_from(fmt, enc, length_at)[0]
                data = bytearray(enc)
                if declared != 0xFFFFFFFF:
                    struct.pack_into(fmt, data, length_at, declared + 1024)
                    case.expect = {0xC000}
                case.raw = bytes(data)
    else:  # the mutation does not apply to this seed: flip a byte instead
        return _mutate("byte_flip", seed, rnd)
    return case


KINDS = ["byte_flip", "truncate", "bad_length", "unknown_vr", "hostile_uid", "deep_sequence", "pixel_mismatch"]


def _cases(seeds: list[Seed], rnd: random.Random, n: int) -> list[Case]:
    synthetic = next(s for s in seeds if s.name == "synthetic.dcm")
    fixed = []
    for value in HOSTILE_UIDS:  # every hostile UID once, as the storage key
        ds = dcmread(synthetic.path)
        ds.SOPInstanceUID = value
        affected = value if len(value) <= 64 else generate_uid()
        fixed.append(
            Case(
                "hostile_uid:SOPInstanceUID",
                synthetic.sop_class,
                affected,
                str(synthetic.ts),
                _encode(ds, synthetic.ts),
                {0xA900},
            )
        )
    for depth in (250, 5000):
        fresh, uid = _fresh(synthetic, rnd)
        at = fresh.find(b"\xe0\x7f\x10\x00")
        fixed.append(
            Case(
                f"deep_sequence:{depth}",
                synthetic.sop_class,
                uid,
                str(synthetic.ts),
                fresh[:at] + _nested(depth) + fresh[at:],
                {0xC000},
            )
        )
    randoms = [_mutate(KINDS[i % len(KINDS)], rnd.choice(seeds), rnd) for i in range(n)]
    return fixed + randoms


def _write(path: Path, case: Case, affected: str) -> Path:
    return write_part10(path, case.sop_class, affected, case.ts, case.raw)


def _send(port: int, cases: list[Case], folder: Path) -> list[tuple[int | None, str]]:
    """One association for the batch; a new one after an abort. (status or None on abort, comment)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [_write(folder / f"{i}.dcm", case, case.affected) for i, case in enumerate(cases)]
    ae = AE(ae_title="FUZZSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for sop, ts in {(c.sop_class, c.ts) for c in cases}:
        ae.add_requested_context(sop, [ts])
    results: list[tuple[int | None, str]] = []
    before = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    assoc = None
    try:
        for i, path in enumerate(paths, start=1):
            if assoc is None or not assoc.is_established:
                assoc = ae.associate("127.0.0.1", port, ae_title="NNROUTER")
                assert assoc.is_established, "nnrouter refused a fresh association"
            try:
                rsp = assoc.send_c_store(path, msg_id=i)
            except (ValueError, TypeError):  # pynetdicom will not put this UID in a request; the data set keeps it
                rsp = assoc.send_c_store(_write(path, cases[i - 1], generate_uid()), msg_id=i)
            if "Status" in rsp:
                results.append((int(rsp.Status), str(rsp.get("ErrorComment", ""))))
            else:
                results.append((None, "abort" if assoc.is_aborted else "no response"))
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = before
        if assoc is not None and assoc.is_established:
            assoc.release()
    return results


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_fuzzed_data_sets_get_answers_and_nothing_escapes_the_spool(node_factory, tmp_path, figures):
    rnd = random.Random(SEED)
    seeds = _seeds(tmp_path / "seeds")
    cases = _cases(seeds, rnd, CASES)
    node = node_factory()
    node.home.mkdir(parents=True)
    passwd = Path("/etc/passwd").stat().st_mtime_ns if Path("/etc/passwd").exists() else None
    node.start()
    before = _files(tmp_path)

    answers: list[tuple[int | None, str]] = []
    good_ok = good_total = 0
    for b in range(0, len(cases), BATCH):
        batch = cases[b : b + BATCH]
        answers += _send(node.port, batch, tmp_path / "sender" / str(b))
        good = write_dx(tmp_path / "sender" / str(b) / "good.dcm", DXSpec(rows=32, columns=32))
        res = peers.storescu(node.port, [good], timeout=60)
        good_total += 1
        good_ok += res.returncode == 0 and "Received Store Response (Success)" in res.stderr
        assert node.proc.poll() is None, f"nnrouter died in batch {b // BATCH}"

    statuses = collections.Counter(f"0x{s:04X}" if s is not None else "abort" for s, _ in answers)
    by_kind: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for case, (status, _) in zip(cases, answers):
        by_kind[case.kind.split(":")[0]][f"0x{status:04X}" if status is not None else "abort"] += 1

    # What was written, and where.
    after = _files(tmp_path)
    allowed = ("node/spool/", "node/nnrouter.db", "node/serve.log", "sender/", "seeds/")
    outside = sorted(f for f in after - before if not f.startswith(allowed))
    spool_files = [p for p in node.spool.rglob("*") if p.is_file()]
    leftovers = [p for p in spool_files if p.parent.name == ".incoming"]
    rows = node_rows(node, Instance)
    stored_digests = {r.sha256 for r in rows}
    acked = [c for c, (s, _) in zip(cases, answers) if s == 0]
    acked_stored = sum(hashlib.sha256(c.raw).hexdigest() in stored_digests for c in acked)
    refused_stored = sum(
        hashlib.sha256(c.raw).hexdigest() in stored_digests for c, (s, _) in zip(cases, answers) if s not in (0, None)
    )
    figures.add(
        "fuzzed data sets",
        cases=len(cases),
        seed=SEED,
        statuses=dict(sorted(statuses.items())),
        by_kind={k: dict(v) for k, v in sorted(by_kind.items())},
        aborts=statuses.get("abort", 0),
        good_sends=f"{good_ok}/{good_total}",
        acknowledged=len(acked),
        stored=acked_stored,
        lost=len(acked) - acked_stored,
        files_outside_spool=len(outside),
    )

    assert node.proc.poll() is None
    assert good_ok == good_total
    assert not outside, outside
    assert passwd is None or Path("/etc/passwd").stat().st_mtime_ns == passwd
    assert not leftovers
    # The spool holds exactly the rows, and the rows only spool files.
    assert sorted(str(p) for p in spool_files) == sorted(r.path for r in rows)
    assert all(Path(r.path).resolve().is_relative_to(node.spool.resolve()) for r in rows)
    assert acked_stored == len(acked) and refused_stored == 0
    for case, (status, comment) in zip(cases, answers):
        if status is None:
            continue  # a clean abort is an answer
        if status != 0:
            assert comment, (case.kind, hex(status), "a failure without an Error Comment")
        assert status != 0x0110, (case.kind, comment, "an internal error where the input should have been named")
        assert "Error" not in comment and "Traceback" not in comment, (case.kind, comment)
        if case.expect is not None:
            assert status in case.expect, (case.kind, hex(status), comment)
