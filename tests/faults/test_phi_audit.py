"""No patient data where it must not go: the node's log, Error Comments sent to DICOM peers, HL7 ACKs.

A node with a worker (a toy classifier), a router forwarding to a real
storescp (and to a destination that is down), the HL7 listener and C-FIND
is driven with one distinctive patient (name, ID, birth date) in DICOM
headers and HL7 PID segments: good stores, refused data sets of many
kinds, a changed re-send, queries good and bad (and one from an AE not
declared for queries), orders good and bad. Then every log line (the node
runs at info), every Error Comment and every ACK is searched for the
patient's values. Before that, the values are shown to have gone through
(the query answers carry them), so finding nothing means something.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from conftest import needs
from dicomfiles import dataset_bytes, raw_store, wait_for
from pixels.test_runtime import make_model
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from nnrouter.orders import hl7
from nnrouter.testing import peers
from nnrouter.testing.synthetic import DX_FOR_PRESENTATION, DXSpec, dx_dataset

pytestmark = [pytest.mark.slow, needs("storescp")]

FAMILY, GIVEN = "ZZPHIFAMILY", "QQPHIGIVEN"
PATIENT_ID = "PHIID7731"
BIRTH = "19230817"
NAME = f"{FAMILY}^{GIVEN}"
# Every form the values could take in a text: as sent, ISO date, PN components apart.
NEEDLES = (FAMILY, GIVEN, PATIENT_ID, BIRTH, "1923-08-17")
QUERY_AE = "PHIFIND"


def leaks(text: str) -> list[str]:
    low = text.lower()
    return [n for n in NEEDLES if n.lower() in low]


# --- DICOM ------------------------------------------------------------------------------


def spec(study_uid: str, series_uid: str, n: int, **over) -> DXSpec:  # type: ignore[no-untyped-def]
    return DXSpec(
        rows=64,
        columns=64,
        patient_name=NAME,
        patient_id=PATIENT_ID,
        patient_birth_date=BIRTH,
        accession_number="ACCPHI1",
        study_uid=study_uid,
        series_uid=series_uid,
        instance_number=n,
        seed=n,
        **over,
    )


def encoded(ds: Dataset, path: Path, syntax: str = ExplicitVRLittleEndian) -> bytes:
    ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(path, implicit_vr=syntax == ImplicitVRLittleEndian, little_endian=True, enforce_file_format=True)
    return dataset_bytes(path)


def bad_data_sets(tmp: Path, study_uid: str, series_uid: str) -> list[tuple[str, str, bytes, str]]:
    """(what, SOP Instance UID in the request, bytes on the wire, transfer syntax): each one damaged near the patient data."""
    out = []

    def fresh(n: int) -> tuple[Dataset, str]:
        ds = dx_dataset(spec(study_uid, series_uid, n))
        return ds, str(ds.SOPInstanceUID)

    ds, uid = fresh(101)
    raw = encoded(ds, tmp / "t.dcm")
    name_at, birth_at = raw.index(FAMILY.encode()), raw.index(BIRTH.encode())
    out += [
        ("truncated in PatientName", uid, raw[: name_at + 6], ExplicitVRLittleEndian),
        ("truncated in PatientBirthDate", uid, raw[: birth_at + 4], ExplicitVRLittleEndian),
        ("truncated in PixelData", uid, raw[:-1000], ExplicitVRLittleEndian),
    ]
    bad_len = bytearray(raw)  # PatientName's length field far beyond the data set
    bad_len[name_at - 2 : name_at] = b"\xf0\xff"
    out.append(("PatientName length past the end", uid, bytes(bad_len), ExplicitVRLittleEndian))
    unknown_vr = raw.replace(b"\x10\x00\x10\x00PN", b"\x10\x00\x10\x00ZZ", 1)
    out.append(("unknown VR on PatientName", uid, unknown_vr, ExplicitVRLittleEndian))
    odd_vr = raw.replace(b"\x10\x00\x30\x00DA", b"\x10\x00\x30\x00SQ", 1)  # birth date claimed a sequence
    out.append(("PatientBirthDate as SQ", uid, odd_vr, ExplicitVRLittleEndian))

    ds, uid = fresh(102)
    out.append(
        (
            "implicit VR sent as explicit",
            uid,
            encoded(ds, tmp / "i.dcm", ImplicitVRLittleEndian),
            ExplicitVRLittleEndian,
        )
    )
    ds, uid = fresh(103)
    out.append(("explicit VR sent as implicit", uid, encoded(ds, tmp / "e.dcm"), ImplicitVRLittleEndian))
    ds, uid = fresh(104)
    del ds.SOPInstanceUID
    out.append(("no SOPInstanceUID", uid, encoded(ds, tmp / "n.dcm"), ExplicitVRLittleEndian))
    ds, _ = fresh(105)
    out.append(("SOPInstanceUID not the request's", generate_uid(), encoded(ds, tmp / "m.dcm"), ExplicitVRLittleEndian))
    ds, uid = fresh(106)
    ds.StudyInstanceUID = "1.2.3.abc/../x"  # a UID that is not one
    out.append(("invalid Study Instance UID", uid, encoded(ds, tmp / "u.dcm"), ExplicitVRLittleEndian))
    ds, uid = fresh(107)
    ds.PatientBirthDate = BIRTH + "XYZ"  # not a DA
    ds.PatientName = NAME + "\x00\x00"  # NUL in the name (PostgreSQL refuses NUL in text)
    out.append(
        ("PatientBirthDate not a date, NUL in PatientName", uid, encoded(ds, tmp / "d.dcm"), ExplicitVRLittleEndian)
    )
    ds, uid = fresh(108)
    ds.SpecificCharacterSet = "ISO_IR 192"
    raw = encoded(ds, tmp / "c.dcm").replace(GIVEN.encode(), GIVEN.encode()[:-2] + b"\xff\xfe", 1)
    out.append(("PatientName not UTF-8 as declared", uid, raw, ExplicitVRLittleEndian))
    ds, uid = fresh(109)
    ds.PatientID = PATIENT_ID * 10  # longer than LO allows
    out.append(("PatientID too long", uid, encoded(ds, tmp / "l.dcm"), ExplicitVRLittleEndian))
    return out


def store_all(port: int, datasets: list[Dataset]) -> list[tuple[int, str]]:
    ae = AE(ae_title="PHISCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(DX_FOR_PRESENTATION, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="NNROUTER")
    assert assoc.is_established
    out = []
    try:
        for ds in datasets:
            rsp = assoc.send_c_store(ds)
            out.append((int(rsp.Status), str(rsp.get("ErrorComment", ""))))
    finally:
        assoc.release()
    return out


def find(port: int, calling: str, model: str, identifier: Dataset) -> tuple[list[Dataset], list[tuple[int, str]]]:
    """The answers and every status (with its Error Comment) of one C-FIND."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", port, ae_title="NNROUTER")
    if not assoc.is_established:
        return [], [(-1, "association not established")]
    answers, statuses = [], []
    try:
        for status, ident in assoc.send_c_find(identifier, model):
            if "Status" not in status:
                statuses.append((-1, "no response"))
                continue
            statuses.append((int(status.Status), str(status.get("ErrorComment", ""))))
            if ident is not None and int(status.Status) in (0xFF00, 0xFF01):
                answers.append(ident)
    finally:
        assoc.release()
    return answers, statuses


def identifier(level: str | None, **keys: str) -> Dataset:
    ds = Dataset()
    if level is not None:
        ds.QueryRetrieveLevel = level
    for k, v in keys.items():
        setattr(ds, k, v)
    return ds


# --- HL7 ----------------------------------------------------------------------------------


def orm(
    n: int, *, pid: str | None = None, obr: bool = True, control: str = "NW", kind: str = "ORM^O01", study_uid: str = ""
) -> str:
    segs = [
        f"MSH|^~\\&|RIS|HOSP|NNROUTER|HOSP|20260101080000||{kind}|PHIMSG{n:03d}|P|2.5",
        pid if pid is not None else f"PID|1||{PATIENT_ID}^^^HOSP^MR||{FAMILY}^{GIVEN}||{BIRTH}|F",
        f"ORC|{control}|PHIPL{n}|PHIFL{n}||SC",
    ]
    if obr:
        segs.append(f"OBR|1|PHIPL{n}|PHIFL{n}|36643-5^XR Chest 2 Views^LN||||||||||||||ACCPHI{n}")
    if study_uid:
        segs.append(f"ZDS|{study_uid}^RIS^Application^DICOM")
    return "\r".join(segs) + "\r"


def raw_mllp(port: int, data: bytes) -> list[bytes]:
    """Bytes as given, then the ACKs that come before the server or we close."""
    frames = hl7._Frames(1 << 24)
    got: list[bytes] = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        try:
            while chunk := sock.recv(65536):
                got += [f.payload for f in frames.feed(chunk)]
        except OSError:
            pass
    return got


def hl7_cases(port: int, study_uid: str) -> list[tuple[str, bytes]]:
    acks = [("good order", hl7.send("127.0.0.1", port, orm(1, study_uid=study_uid), timeout=15))]
    bad = {
        "no OBR": orm(2, obr=False),
        "empty ORC-1": orm(3, control=""),
        "not an order type": orm(4, kind="ADT^A08"),
        "no MSH": orm(5).split("\r", 1)[1],
        "PID fields malformed": orm(
            6, pid=f"PID|1||{PATIENT_ID}\\X00\\^^^&&&~~~||{FAMILY}^^^^^^^^^^^{GIVEN}||{BIRTH}ZZZ"
        ),
        "NUL in the name": orm(7, pid=f"PID|1||{PATIENT_ID}||{FAMILY}\x00^{GIVEN}||{BIRTH}"),
        "names too long for their columns": orm(8, pid=f"PID|1||{PATIENT_ID * 30}||{FAMILY * 40}^{GIVEN}||{BIRTH}"),
        "cancel": orm(1, control="CA"),
    }
    for what, message in bad.items():
        acks.append((what, hl7.send("127.0.0.1", port, message, timeout=15)))
    big = orm(9) + "NTE|1||" + "x" * (1 << 20) + "\r"
    for what, data in {
        "oversized": b"\x0b" + big.encode() + b"\x1c\r",
        "cut short by a start block": b"\x0b" + orm(10).encode()[:150] + b"\x0b" + orm(11).encode() + b"\x1c\r",
        "no end block": b"\x0b" + orm(12).encode(),
    }.items():
        acks += [(what, a) for a in raw_mllp(port, data)]
    return acks


# --- the audit ------------------------------------------------------------------------------


def test_no_patient_data_in_logs_comments_or_acks(node_factory, database_url, tmp_path, figures):
    from sqlalchemy import select

    from nnrouter.core.store import Instance, InstanceState, Store

    models = tmp_path / "models"
    models.mkdir()
    classifier = make_model(models, cam=True, unknown_threshold=0.0, scores_are="logits")
    dest = peers.StoreSCP(tmp_path / "dest", aet="DEST").start()
    down_port = peers.free_port()  # nothing listens: deliveries there fail and are retried
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "settings:\n  quiet_s: 1\n"
        "destinations:\n"
        f"  - {{name: dest, ae_title: DEST, host: 127.0.0.1, port: {dest.port}}}\n"
        f"  - {{name: down, ae_title: DOWN, host: 127.0.0.1, port: {down_port}}}\n"
        "rules:\n  - {name: everything, then: {forward: [dest, down]}}\n"
    )
    hl7_port = peers.free_port()
    node = node_factory(
        database_url=database_url,
        settings={
            "dicom": {"query_aes": [{"ae_title": QUERY_AE}]},
            "workers": {"count": 1, "batch_size": 4, "max_wait_ms": 0, "poll_ms": 100},
            "models": {"classifier": str(classifier)},
            "routing": {"rules": str(rules), "tick_s": 0.3},
            "orders": {"hl7": {"bind": "127.0.0.1", "port": hl7_port}},
            "logging": {"level": "info", "format": "json"},
        },
    )
    comments: list[tuple[str, int, str]] = []  # (what, status, Error Comment)
    try:
        node.start()
        peers.wait_port(hl7_port, proc=node.proc)
        study_uid, series_uid = generate_uid(), generate_uid()

        # HL7: the order first, as a RIS would send it, then broken ones.
        acks = hl7_cases(hl7_port, study_uid)
        codes = [a.split(b"MSA|")[1][:2].decode() for _, a in acks]
        assert codes[0] == "AA" and "AE" in codes and "AR" in codes, codes

        # DICOM: good instances, the same SOP Instance UID with other content, then refusals.
        good = [dx_dataset(spec(study_uid, series_uid, n)) for n in range(1, 4)]
        changed = dx_dataset(spec(study_uid, series_uid, 1, sop_instance_uid=str(good[0].SOPInstanceUID)))
        changed.PixelData = bytes(len(changed.PixelData))
        results = store_all(node.port, good + [changed])
        assert [s for s, _ in results] == [0, 0, 0, 0], results
        comments += [("good store", s, c) for s, c in results]
        bad = bad_data_sets(tmp_path, study_uid, series_uid)
        for what, uid, raw, syntax in bad:
            [(status, comment)] = raw_store(node.port, [(DX_FOR_PRESENTATION, uid, raw)], transfer_syntax=syntax)
            comments.append((what, -1 if status is None else status, comment))
        refused = [c for c in comments if c[1] not in (0, -1)]
        assert len(refused) >= 8, comments  # most of the damage is refused, with a comment to grep

        # C-FIND by the patient's values, at both roots; broken identifiers; an AE not declared for queries.
        study_root, patient_root = (
            StudyRootQueryRetrieveInformationModelFind,
            PatientRootQueryRetrieveInformationModelFind,
        )
        answers: list[Dataset] = []
        for what, calling, model, ident in [
            (
                "by name",
                QUERY_AE,
                study_root,
                identifier("STUDY", PatientName=FAMILY + "*", PatientID="", StudyInstanceUID=""),
            ),
            (
                "by ID",
                QUERY_AE,
                study_root,
                identifier("STUDY", PatientID=PATIENT_ID, PatientName="", PatientBirthDate=""),
            ),
            ("by birth date", QUERY_AE, study_root, identifier("STUDY", PatientBirthDate=BIRTH, PatientID="")),
            ("patient root", QUERY_AE, patient_root, identifier("PATIENT", PatientID=PATIENT_ID, PatientName="")),
            ("series", QUERY_AE, study_root, identifier("SERIES", StudyInstanceUID=study_uid, PatientID=PATIENT_ID)),
            ("no level", QUERY_AE, study_root, identifier(None, PatientName=NAME, PatientID=PATIENT_ID)),
            ("bad level", QUERY_AE, study_root, identifier("XYZ", PatientName=NAME)),
            (
                "bad date range",
                QUERY_AE,
                study_root,
                identifier("STUDY", PatientBirthDate=f"{BIRTH}-{BIRTH}-x", PatientID=""),
            ),
            ("patient level at study root", QUERY_AE, study_root, identifier("PATIENT", PatientID=PATIENT_ID)),
            ("undeclared AE", "NOTDECLARED", study_root, identifier("STUDY", PatientID=PATIENT_ID)),
        ]:
            got, statuses = find(node.port, calling, model, ident)
            answers += got
            comments += [(f"C-FIND {what}", s, c) for s, c in statuses]
        # The values went through: what we grep for is really in the node.
        assert any(str(a.get("PatientID", "")) == PATIENT_ID for a in answers), answers

        # The worker classifies, the router decides and forwards.
        store = Store(node.db_url)
        try:
            uids = [str(ds.SOPInstanceUID) for ds in good]

            def classified() -> bool | list:
                with store.read() as s:
                    states = [
                        r.state
                        for r in s.execute(select(Instance).where(Instance.sop_instance_uid.in_(uids))).scalars()
                    ]
                return (len(states) >= 4 and all(st == InstanceState.CLASSIFIED for st in states)) or states

            wait_for(classified, timeout=120)
        finally:
            store.dispose()

        def delivered() -> bool | int:
            n = sum(1 for f in dest.folder.rglob("*") if f.is_file())
            return n >= 4 or n

        wait_for(delivered, timeout=120)
        time.sleep(2)  # a retry or two towards the destination that is down
    finally:
        node.stop()
        dest.stop()

    log_lines = node.log_lines()
    assert any('"association"' in line for line in log_lines)  # the log is the node's, at info
    found = []
    for n, line in enumerate(log_lines, 1):
        if leaks(line):
            found.append(f"log line {n}: {line[:300]}")
    for what, status, comment in comments:
        if leaks(comment):
            found.append(f"Error Comment ({what}, status 0x{status & 0xFFFF:04X}): {comment!r}")
    for what, ack in acks:
        if leaks(ack.decode("latin-1")):
            found.append(f"HL7 ACK ({what}): {ack!r}")
    figures.add(
        "PHI audit: log, Error Comments, HL7 ACKs",
        cases=len(bad) + 4 + 10 + len(acks),
        log_lines=len(log_lines),
        error_comments=sum(1 for c in comments if c[2]),
        acks=len(acks),
        refused_stores=len(refused),
        leaks=len(found),
    )
    assert not found, "\n".join(found)
