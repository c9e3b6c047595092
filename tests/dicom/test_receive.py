"""The C-STORE SCP against real DCMTK peers: what is acknowledged is kept, as sent."""

from __future__ import annotations

import copy
import hashlib
import json
import subprocess
from pathlib import Path

from conftest import needs, needs_shared, pydicom_data, shared_files
from dicomfiles import dataset_bytes, node_rows, raw_store, send_as_is
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from nnrouter.core.store import Instance
from nnrouter.testing import peers
from nnrouter.testing.synthetic import DXSpec, dx_dataset, write_dx

pytestmark = needs("storescu", "storescp", "echoscu")

PYDICOM_DATA = ["RG1_UNCI.dcm", "RG1_J2KR.dcm", "RG3_UNCR.dcm", "RG3_J2KI.dcm"]


def _instances(node: peers.Node) -> list[Instance]:
    return node_rows(node, Instance)


def _encode(ds, implicit: bool = False) -> bytes:
    buf = DicomBytesIO()
    buf.is_little_endian = True
    buf.is_implicit_VR = implicit
    write_dataset(buf, ds)
    return buf.getvalue()


def _acked(stderr: str) -> int:
    return stderr.count("Received Store Response (Success)")


def _log_events(node: peers.Node) -> list[dict]:
    out = []
    for line in node.log_lines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def test_real_radiographs_arrive_as_sent(node_factory, database_url, storescp, tmp_path):
    """RG1/RG3 and every shared good file: the spool holds the bytes storescu put on the wire.

    DCMTK storescp with +B writes what it received bit for bit; the same
    storescu run to both receivers must give the same data set bytes.
    """
    files = [pydicom_data(n) for n in PYDICOM_DATA] + shared_files("good")
    node = node_factory(database_url=database_url).start()
    cfg = peers.storescu_config(files, tmp_path / "scu.cfg")

    # +uf: several of these files share a SOP Instance UID with other content.
    bp = peers.StoreSCP(tmp_path / "bitpreserving").start(["+B", "+uf"])
    try:
        ref = peers.storescu(bp.port, files, aec=bp.aet, config=cfg)
        assert _acked(ref.stderr) == len(files), ref.stderr[-2000:]
        res = peers.storescu(node.port, files, config=cfg)
        assert res.returncode == 0 and _acked(res.stderr) == len(files), res.stderr[-3000:]
    finally:
        bp.stop()

    wire_files = [f for f in bp.folder.iterdir() if f.is_file()]
    assert len(wire_files) == len(files)
    wire = {
        (str(dcmread(f, stop_before_pixels=True).SOPInstanceUID), hashlib.sha256(dataset_bytes(f)).hexdigest())
        for f in wire_files
    }
    rows = _instances(node)
    # Same UID and same bytes is one instance; same UID, other bytes, a new version.
    assert {(r.sop_instance_uid, r.sha256) for r in rows} == wire
    assert len(rows) == len(wire)
    for row in rows:
        kept = Path(row.path)
        assert kept.is_file() and kept.is_relative_to(node.spool)
        assert hashlib.sha256(dataset_bytes(kept)).hexdigest() == row.sha256, f"{kept}: spool bytes differ"
        assert row.size_bytes == kept.stat().st_size
        assert row.state == "received"
        assert dcmread(kept, stop_before_pixels=True).file_meta.TransferSyntaxUID == row.transfer_syntax_uid
    assert min(r.version for r in rows if r.sop_instance_uid == rows[0].sop_instance_uid) == 1
    # Compressed files are kept in their own syntax: nothing was transcoded.
    kept_syntaxes = {(r.sop_instance_uid, r.transfer_syntax_uid) for r in rows}
    for f in files:
        ds = dcmread(f, stop_before_pixels=True, force=True)
        if "TransferSyntaxUID" in ds.file_meta:
            assert (str(ds.SOPInstanceUID).strip(), ds.file_meta.TransferSyntaxUID) in kept_syntaxes, f.name

    # One log line for the association, with counts and no patient data.
    assoc = [e for e in _log_events(node) if e.get("event") == "association" and e.get("instances")]
    assert assoc and assoc[-1]["instances"] == len(files) and assoc[-1]["statuses"] == {"0x0000": len(files)}
    assert assoc[-1]["calling_ae"] == "STORESCU"


def test_echo_and_association_checks(node_factory):
    node = node_factory(
        settings={
            "dicom": {"allowed_calling_aes": [{"ae_title": "MODALITY1"}, {"ae_title": "PINNED", "host": "127.0.0.2"}]}
        }
    ).start()

    def echo(aet: str, aec: str = "NNROUTER") -> subprocess.CompletedProcess:
        return subprocess.run(
            ["echoscu", "-v", "-aet", aet, "-aec", aec, "127.0.0.1", str(node.port)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    ok = echo("MODALITY1")
    assert ok.returncode == 0 and "Received Echo Response (Success)" in ok.stderr

    unknown = echo("STRANGER")
    assert unknown.returncode != 0
    assert "Calling AE Title Not Recognized" in unknown.stderr

    # Right AE title, wrong host: PINNED may only call from 127.0.0.2.
    pinned = echo("PINNED")
    assert "Calling AE Title Not Recognized" in pinned.stderr

    wrong_called = echo("MODALITY1", aec="SOMEONE_ELSE")
    assert "Called AE Title Not Recognized" in wrong_called.stderr

    # The node is still serving after the rejections.
    assert echo("MODALITY1").returncode == 0
    rejected = [e for e in _log_events(node) if e.get("event") == "association_rejected"]
    assert {e.get("calling_ae") for e in rejected} >= {"STRANGER", "PINNED"}


def test_full_disk_answers_out_of_resources(node_factory, tmp_path):
    # The association-time floor (limits.refuse_below_free_mb, tests/test_pressure.py) off: this is the C-STORE's own check.
    node = node_factory(settings={"storage": {"min_free_mb": 10**9}, "limits": {"refuse_below_free_mb": 0}}).start()
    f = write_dx(tmp_path / "a.dcm", DXSpec())
    res = peers.storescu(node.port, [f])
    assert "Received Store Response (Refused: OutOfResources)" in res.stderr, res.stderr
    assert _instances(node) == []
    assert not [p for p in node.spool.rglob("*") if p.is_file()], "something was half-written"
    events = [e for e in _log_events(node) if e.get("event") == "store_refused_disk_full"]
    assert events and events[0]["min_free_mb"] == 10**9


def test_malformed_data_sets_get_clear_statuses_and_good_ones_are_kept(node_factory):
    node = node_factory().start()
    good1, good2, broken = (dx_dataset(DXSpec(rows=64, columns=64, seed=i)) for i in range(3))
    sop = good1.SOPClassUID

    truncated = _encode(broken)[:-1000]
    no_uid = copy.deepcopy(broken)
    del no_uid.SOPInstanceUID
    other_uid = generate_uid()

    results = raw_store(
        node.port,
        [
            (sop, good1.SOPInstanceUID, _encode(good1)),
            (sop, broken.SOPInstanceUID, truncated),
            (sop, broken.SOPInstanceUID, _encode(no_uid)),
            # Encoded implicit VR, sent on an explicit VR context: meta and data disagree.
            (sop, broken.SOPInstanceUID, _encode(broken, implicit=True)),
            (sop, other_uid, _encode(broken)),
            (sop, good2.SOPInstanceUID, _encode(good2)),
        ],
        transfer_syntax=ExplicitVRLittleEndian,
    )
    statuses = [s for s, _ in results]
    assert statuses[0] == 0x0000 and statuses[-1] == 0x0000
    assert statuses[1] == 0xC000 and "truncated" in results[1][1]
    assert statuses[2] == 0xA900 and "SOPInstanceUID" in results[2][1]
    assert statuses[3] == 0xC000, results[3]
    assert statuses[4] == 0xA900 and "differs" in results[4][1]

    kept = {i.sop_instance_uid for i in _instances(node)}
    assert kept == {good1.SOPInstanceUID, good2.SOPInstanceUID}
    refused = [e for e in _log_events(node) if e.get("event") == "store_refused"]
    assert len(refused) == 4 and all(e["reason"] for e in refused)
    assert node.proc.poll() is None


@needs_shared
def test_broken_shared_files(node_factory, tmp_path):
    """Each real broken file gets a clear answer; the good file after it is kept.

    At receive time only the header matters: a corrupt code stream is kept
    (the decode stage marks it undecodable); what cannot be parsed is refused.
    """
    node = node_factory().start()
    good = write_dx(tmp_path / "good.dcm", DXSpec(rows=64, columns=64))
    expected = {
        "dx_chest_j2k_corrupt_codestream.dcm": 0x0000,
        "implicit_file_meta.dcm": 0x0000,
        "jpeg_lossless_bad.dcm": 0x0000,
        "wrong_transfer_syntax.dcm": 0x0000,
    }
    assert sorted(expected) == [f.name for f in shared_files("bad")]
    for f, (status, comment) in zip(shared_files("bad"), send_as_is(node.port, shared_files("bad"))):
        assert status == expected[f.name], (f.name, status, comment)
    results = raw_store(
        node.port, [(str(dcmread(good).SOPClassUID), str(dcmread(good).SOPInstanceUID), dataset_bytes(good))]
    )
    assert results == [(0, "")]
    assert len(_instances(node)) == len(expected) + 1
    assert node.proc.poll() is None


def test_resent_instance_is_idempotent_and_changed_content_keeps_both(node_factory, tmp_path):
    node = node_factory().start()
    spec = DXSpec(rows=64, columns=64)
    a = write_dx(tmp_path / "a.dcm", spec)
    for _ in range(2):
        res = peers.storescu(node.port, [a])
        assert _acked(res.stderr) == 1
    assert len(_instances(node)) == 1

    changed = dx_dataset(spec)
    changed.StudyDescription = "XR CHEST PA (corrected)"
    b = tmp_path / "b.dcm"
    changed.save_as(b, enforce_file_format=True)
    assert _acked(peers.storescu(node.port, [b]).stderr) == 1
    rows = _instances(node)
    assert [r.version for r in rows] == [1, 2]
    assert rows[0].path != rows[1].path and all(Path(r.path).exists() for r in rows)
    assert dataset_bytes(Path(rows[1].path)) == dataset_bytes(b)
    assert any(e.get("event") == "instance_changed_content" for e in _log_events(node))


def test_no_patient_data_in_logs(node_factory, tmp_path):
    node = node_factory().start()
    spec = DXSpec(
        rows=64, columns=64, patient_name="DOE^JANE^Q", patient_id="PID-778899", patient_birth_date="19411207"
    )
    f = write_dx(tmp_path / "phi.dcm", spec)
    assert _acked(peers.storescu(node.port, [f]).stderr) == 1
    # A refused instance too: error paths are where data leaks.
    raw_store(node.port, [(dx_dataset(spec).SOPClassUID, generate_uid(), _encode(dx_dataset(spec)))])
    node.stop()
    text = node.log_path.read_text()
    assert "association" in text and "store_refused" in text
    for phi in ("DOE", "JANE", "PID-778899", "19411207"):
        assert phi not in text


def test_refuses_to_start_behind_migrations(node_factory):
    node = node_factory()
    node.write_config()
    res = node.cli("serve", check=False)
    assert res.returncode == 3  # configuration or schema (nnrouter --help)
    assert "nnrouter db upgrade" in res.stderr


def test_association_line_says_how_it_ended(node_factory, tmp_path):
    node = node_factory().start()
    f = write_dx(tmp_path / "a.dcm", DXSpec(rows=32, columns=32))
    assert _acked(peers.storescu(node.port, [f]).stderr) == 1
    assert _acked(peers.storescu(node.port, [f], extra=["--abort"]).stderr) == 1
    node.stop()
    lines = [e for e in _log_events(node) if e.get("event") == "association"]
    assert [e["ended"] for e in lines] == ["released", "aborted"]
    assert all(e["instances"] == 1 and e["bytes"] > 0 and e["duration_s"] >= 0 for e in lines)


# --- what is not DICOM, or not a UID, gets a clear answer (issue 11, finding 8) ---------


def _nested_sequences(depth: int) -> bytes:
    """(0040,A730) Content Sequence nested ``depth`` deep, every level of undefined length."""
    import struct

    start = struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF) + struct.pack(
        "<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF
    )
    end = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    leaf = struct.pack("<HH2sH", 0x0008, 0x0100, b"SH", 2) + b"X "
    return start * depth + leaf + end * depth


def _before_pixels(raw: bytes, insert: bytes) -> bytes:
    at = raw.index(b"\xe0\x7f\x10\x00")
    return raw[:at] + insert + raw[at:]


def test_unknown_vr_and_invalid_uids_get_clear_statuses(node_factory):
    """An unknown VR is 0xC000; a SOP, Study or Series UID that is no UID is 0xA900 naming it.

    UIDs become spool paths and row keys: '/', '..', NUL or more than 64
    characters are refused; a component with a leading zero (sent by
    modalities in service) is kept with a warning.
    """
    node = node_factory().start()
    base = dx_dataset(DXSpec(rows=16, columns=16))
    sop = base.SOPClassUID

    def variant(**uids) -> tuple[str, str, bytes]:  # type: ignore[no-untyped-def]
        ds = copy.deepcopy(base)
        ds.SOPInstanceUID = generate_uid()
        for keyword, value in uids.items():
            setattr(ds, keyword, value)
        return (sop, str(ds.SOPInstanceUID), _encode(ds))

    raw = _encode(base)
    at = raw.index(b"\x08\x00\x30\x10LO")  # (0008,1030) Study Description
    unknown_vr = (sop, base.SOPInstanceUID, raw[: at + 4] + b"ZZ" + raw[at + 6 :])
    deep = variant()
    deep = (sop, deep[1], _before_pixels(deep[2], _nested_sequences(250)))
    leading_zero = variant(SeriesInstanceUID="1.2.826.0.1.3680043.02.7")
    good = variant()
    cases = [
        unknown_vr,
        variant(SOPInstanceUID="../../../etc/passwd"),
        # 199 characters; pynetdicom will not put that in the request, so the request names another UID.
        (sop, generate_uid(), variant(SOPInstanceUID="1." * 99 + "1")[2]),
        variant(SOPInstanceUID="1.2.3\x004.5"),
        variant(StudyInstanceUID="1.2/../3"),
        variant(SeriesInstanceUID="1.2..3"),
        deep,
        leading_zero,
        good,
    ]
    results = raw_store(node.port, cases)
    statuses = [s for s, _ in results]
    comments = [c for _, c in results]
    assert statuses == [0xC000, 0xA900, 0xA900, 0xA900, 0xA900, 0xA900, 0xC000, 0x0000, 0x0000], results
    assert comments[0] == "unknown VR 'ZZ' at (0008,1030)"
    assert comments[1] == "SOPInstanceUID is not a valid UID: not only digits and dots"
    assert comments[2] == "SOPInstanceUID is not a valid UID: more than 64 characters"
    assert comments[3] == "SOPInstanceUID is not a valid UID: not only digits and dots"
    assert comments[4] == "StudyInstanceUID is not a valid UID: not only digits and dots"
    assert comments[5] == "SeriesInstanceUID is not a valid UID: empty component"
    assert comments[6] == "sequences nested too deep to read"

    rows = _instances(node)
    assert {r.sop_instance_uid for r in rows} == {leading_zero[1], good[1]}
    assert {r.sop_instance_uid: r.path for r in rows} and all(Path(r.path).is_relative_to(node.spool) for r in rows)
    assert len([p for p in node.spool.rglob("*") if p.is_file()]) == 2
    warned = [e for e in _log_events(node) if e.get("event") == "header_not_conformant"]
    assert [e["reason"] for e in warned] == ["SeriesInstanceUID has a component with a leading zero"]
    assert node.proc.poll() is None


def test_internal_errors_reach_the_log_not_the_sender(node_factory, tmp_path):
    """A failure inside (here a table gone from under the node) is 0x0110 with a reference, no internal text."""
    import sqlite3

    node = node_factory().start()
    f = write_dx(tmp_path / "a.dcm", DXSpec(rows=16, columns=16))
    ds = dcmread(f)
    item = (str(ds.SOPClassUID), str(ds.SOPInstanceUID), dataset_bytes(f))
    db = sqlite3.connect(node.db_url.split("///", 1)[1])
    db.execute("ALTER TABLE instance RENAME TO instance_away")
    db.commit()
    try:
        [(status, comment)] = raw_store(node.port, [item])
    finally:
        db.execute("ALTER TABLE instance_away RENAME TO instance")
        db.commit()
        db.close()
    assert status == 0x0110
    assert comment.startswith("internal error (ref ") and len(comment) <= 64, comment
    for internal in ("sqlite", "Error", "instance", "table", "SELECT", str(node.home)):
        assert internal not in comment
    ref = comment.removeprefix("internal error (ref ").rstrip(")")
    failed = [e for e in _log_events(node) if e.get("event") == "store_failed"]
    assert failed and failed[-1]["ref"] == ref and "no such table" in failed[-1].get("exception", "")
    # Nothing was half-kept, and with the table back the same instance is stored.
    assert not list(node.spool.rglob("*.dcm"))
    assert raw_store(node.port, [item]) == [(0, "")]
    assert len(_instances(node)) == 1


def test_database_failures_that_pass_are_told_apart_from_bugs(tmp_path):
    """Full, busy or unreachable databases are transient (0xA700 reasons); a missing table is not."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import DBAPIError

    from nnrouter.core.store import unavailable

    def failure(engine, *statements) -> Exception:  # type: ignore[no-untyped-def]
        try:
            with engine.begin() as conn:
                for sql in statements:
                    conn.execute(text(sql), {"x": "a" * 2000})
        except DBAPIError as exc:
            return exc
        raise AssertionError("no failure")

    lite = create_engine(f"sqlite:///{tmp_path / 'full.db'}")
    with lite.begin() as conn:
        conn.execute(text("CREATE TABLE t (x TEXT)"))
    full = failure(lite, "PRAGMA max_page_count = 3", *["INSERT INTO t VALUES (:x)"] * 20)
    assert unavailable(full) == "database disk full"
    assert unavailable(failure(lite, "SELECT * FROM nowhere")) is None
    down = create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{peers.free_port()}/x")
    assert unavailable(failure(down, "SELECT 1")) == "database unavailable"
    assert unavailable(ValueError("x")) is None


def test_resent_instance_restores_a_file_its_row_outlived(node_factory, tmp_path):
    """A row whose file is gone (a commit reported lost that had happened) is healed by the resend."""
    node = node_factory().start()
    f = write_dx(tmp_path / "a.dcm", DXSpec(rows=32, columns=32))
    assert _acked(peers.storescu(node.port, [f]).stderr) == 1
    [row] = _instances(node)
    Path(row.path).unlink()
    assert _acked(peers.storescu(node.port, [f]).stderr) == 1
    assert Path(row.path).is_file() and dataset_bytes(Path(row.path)) == dataset_bytes(f)
    assert len(_instances(node)) == 1
    assert any(e.get("event") == "spool_file_restored" for e in _log_events(node))
