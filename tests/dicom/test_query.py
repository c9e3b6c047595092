"""The C-FIND SCP against real query clients (DCMTK findscu, Orthanc): what nnrouter tagged, found.

A node receives real files over C-STORE; the rows a classifier worker and the
mismatch check would write (predictions, flags) are written straight into its
store; then findscu and Orthanc ask.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import _new_pg_database, needs
from dicomfiles import prediction
from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from sqlalchemy import select
from structlog.testing import capture_logs

from nnrouter.core.store import Flag, Instance, Store, Study
from nnrouter.dicom.query import (
    MAX_RESULTS,
    PATIENT_ROOT_FIND,
    STUDY_ROOT_FIND,
    TRANSFER_SYNTAXES,
    Query,
    parse_request,
)
from nnrouter.testing import peers
from nnrouter.testing.synthetic import DXSpec, dx_dataset

CHEST_LATERAL = "399173006"  # SNOMED CT "left lateral", chest_lateral in classes.csv
LATERAL = "399067008"  # "lateral", knee_lateral
PA = "272479007"


# --- the pure parts: no network ----------------------------------------------


def _request(level: str, sop: str = STUDY_ROOT_FIND, **keys) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for k, v in keys.items():
        setattr(ds, k, v)
    return ds


def test_identifier_checks():
    from nnrouter.dicom.query import BadIdentifier

    with pytest.raises(BadIdentifier, match="lacks QueryRetrieveLevel"):
        parse_request(Dataset(), STUDY_ROOT_FIND)
    with pytest.raises(BadIdentifier, match="PATIENT"):
        parse_request(_request("PATIENT"), STUDY_ROOT_FIND)
    with pytest.raises(BadIdentifier):
        parse_request(_request("FRAME"), PATIENT_ROOT_FIND)
    req = parse_request(_request("SERIES", PatientID="X", Rows=None), STUDY_ROOT_FIND)
    # Keys below the level are answered empty, the level's unique key always.
    assert req.keys["Rows"].kind == "unsupported"
    assert "SeriesInstanceUID" in req.keys and req.used() == ["PatientID", "Rows"]


# --- a node with tagged images -----------------------------------------------


@dataclass
class Tagged:
    node: peers.Node
    tmp: Path
    study: dict[str, str] = field(default_factory=dict)  # A, B, C -> Study Instance UID
    series: dict[str, str] = field(default_factory=dict)  # A1.. -> Series Instance UID
    sop: dict[str, str] = field(default_factory=dict)  # A1.. -> SOP Instance UID


# name: (study, series, series number, header body part, header view position, predictions)
IMAGES = {
    "A1": ("A", "A-chest", 1, "CHEST", "PA", ["chest_pa_ap"]),
    # Newest prediction wins: a later model says lateral, the header says PA.
    "A2": ("A", "A-chest", 1, "CHEST", "PA", ["chest_pa_ap", "chest_lateral"]),
    "A3": ("A", "A-chest", 1, "CHEST", "LL", ["unknown"]),
    "A4": ("A", "A-knee", 2, "KNEE", "AP", ["knee_lateral"]),
    # The header says abdomen; the pixels are a chest lateral.
    "B1": ("B", "B-abd", 1, "ABDOMEN", "AP", ["chest_lateral"]),
    "B2": ("B", "B-abd", 1, "ABDOMEN", "AP", []),
    "C1": ("C", "C-pelvis", 1, "PELVIS", "AP", []),
    "D1": ("D", "D-hand", 1, "HAND", "PA", ["hand_ap"]),
}
STUDIES = {
    # study: (patient name, patient id, date, time, accession)
    "A": ("DOE^JANE", "QP001", "20240115", "093000", "QA1"),
    "B": ("Smith^John", "QP002", "20240310", "141500", "QB1"),
    "C": ("DOE^JOHN", "QP003", "20231201", "080000", "QC1"),
    "D": ("Müller^Jörg", "QP004", "20220601", "170000", "QD1"),
}
FLAGS = {"A": ["missing_view", "extra_view"], "B": ["header_conflict", "header_conflict"]}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def tagged(request, tmp_path_factory):  # type: ignore[no-untyped-def]
    if peers.have("storescu", "findscu"):
        pytest.skip("missing tools: storescu, findscu")
    tmp = tmp_path_factory.mktemp(f"query-{request.param}")
    url = _new_pg_database(request.getfixturevalue("postgres_server")) if request.param == "postgresql" else None
    # Queries come only from declared peers (dicom.query_aes): findscu's and Orthanc's AE titles.
    queriers = [{"ae_title": "FINDSCU"}, {"ae_title": "ORTHANC"}]
    node = peers.Node(tmp / "node", database_url=url, settings={"dicom": {"query_aes": queriers}}).start()
    try:
        world = Tagged(node, tmp)
        world.study = {s: generate_uid() for s in STUDIES}
        files = []
        for n, (name, (study, series, number, body_part, view, _preds)) in enumerate(IMAGES.items()):
            world.series.setdefault(series, generate_uid())
            world.sop[name] = generate_uid()
            pname, pid, date, tm, acc = STUDIES[study]
            spec = DXSpec(
                rows=32,
                columns=32,
                body_part=body_part,
                view_position=view,
                patient_name=pname,
                patient_id=pid,
                accession_number=acc,
                study_uid=world.study[study],
                series_uid=world.series[series],
                sop_instance_uid=world.sop[name],
                instance_number=n + 1,
                seed=n,
            )
            ds = dx_dataset(spec)
            ds.StudyDate, ds.StudyTime, ds.SeriesNumber = date, tm, number
            ds.StudyDescription = f"XR {body_part}"
            path = tmp / f"{name}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
        res = peers.storescu(node.port, files)
        assert res.returncode == 0 and res.stderr.count("Store Response (Success)") == len(files), res.stderr[-2000:]
        store = Store(node.db_url)
        try:
            with store.write() as s:
                ids = dict(s.execute(select(Instance.sop_instance_uid, Instance.id)).all())
                for name, (*_, preds) in IMAGES.items():
                    for version, label in enumerate(preds, start=1):
                        s.add(prediction(ids[world.sop[name]], label, version=str(version)))
                by_uid = dict(s.execute(select(Study.study_uid, Study.id)).all())
                for study, kinds in FLAGS.items():
                    for kind in kinds:
                        s.add(
                            Flag(
                                study_id=by_uid[world.study[study]],
                                kind=kind,
                                severity="warning",
                                reason="test",
                                evidence={},
                            )
                        )
        finally:
            store.dispose()
        yield world
    finally:
        node.stop()


def findscu(
    world: Tagged,
    keys: list[str],
    *,
    model: str = "-S",
    query: Dataset | None = None,
    extra: list[str] | None = None,
    port: int | None = None,
    env: dict[str, str] | None = None,
) -> tuple[list[Dataset], subprocess.CompletedProcess]:
    """Ask with DCMTK findscu; the answers as data sets (findscu -X writes them as files)."""
    out = world.tmp / f"find-{uuid.uuid4().hex[:8]}"
    out.mkdir()
    args = [
        "findscu",
        "-v",
        model,
        "-aet",
        "FINDSCU",
        "-aec",
        world.node.ae_title,
        "-X",
        "-od",
        str(out),
        *(extra or []),
    ]
    for k in keys:
        args += ["-k", k]
    args += ["127.0.0.1", str(port or world.node.port)]
    if query is not None:
        qf = out / "query.dcm"
        query.save_as(qf, implicit_vr=False, little_endian=True)
        args.append(str(qf))
    res = subprocess.run(
        args, capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})}, check=False
    )
    return [dcmread(f) for f in sorted(out.glob("rsp*.dcm"))], res


def _uids(answers: list[Dataset], keyword: str) -> set[str]:
    return {str(a.get(keyword)) for a in answers}


def test_study_by_patient_id_and_date_range(tagged):
    w = tagged
    answers, res = findscu(
        w,
        [
            "QueryRetrieveLevel=STUDY",
            "PatientID=QP001",
            "StudyDate=20240101-20240131",
            "StudyInstanceUID",
            "PatientName",
            "ModalitiesInStudy",
            "NumberOfStudyRelatedSeries",
            "NumberOfStudyRelatedInstances",
            "AccessionNumber",
        ],
    )
    assert res.returncode == 0, res.stderr
    assert len(answers) == 1, res.stderr
    a = answers[0]
    assert a.StudyInstanceUID == w.study["A"] and a.QueryRetrieveLevel == "STUDY"
    assert str(a.PatientName) == "DOE^JANE" and a.AccessionNumber == "QA1"
    assert a.ModalitiesInStudy == "DX"
    assert int(a.NumberOfStudyRelatedSeries) == 2 and int(a.NumberOfStudyRelatedInstances) == 4
    # The same patient outside the range: nothing.
    answers, _ = findscu(w, ["QueryRetrieveLevel=STUDY", "PatientID=QP001", "StudyDate=20240201-"])
    assert answers == []
    # Open ranges, a UID list, a time range.
    answers, _ = findscu(w, ["QueryRetrieveLevel=STUDY", "StudyDate=20240201-", "StudyInstanceUID"])
    assert _uids(answers, "StudyInstanceUID") == {w.study["B"]}
    answers, _ = findscu(w, ["QueryRetrieveLevel=STUDY", "StudyDate=-20231231", "StudyInstanceUID"])
    assert _uids(answers, "StudyInstanceUID") == {w.study["C"], w.study["D"]}
    answers, _ = findscu(w, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={w.study['A']}\\{w.study['C']}"])
    assert _uids(answers, "StudyInstanceUID") == {w.study["A"], w.study["C"]}
    answers, _ = findscu(w, ["QueryRetrieveLevel=STUDY", "StudyTime=0800-0930", "StudyInstanceUID"])
    assert _uids(answers, "StudyInstanceUID") == {w.study["A"], w.study["C"]}
    # Strings match case-sensitively.
    answers, _ = findscu(w, ["QueryRetrieveLevel=STUDY", "AccessionNumber=qa1"])
    assert answers == []
    answers, _ = findscu(w, ["QueryRetrieveLevel=STUDY", "AccessionNumber=Q?1"])
    assert len(answers) == 4


def test_series_level(tagged):
    w = tagged
    answers, res = findscu(
        w,
        [
            "QueryRetrieveLevel=SERIES",
            f"StudyInstanceUID={w.study['A']}",
            "SeriesInstanceUID",
            "Modality",
            "SeriesNumber",
            "BodyPartExamined",
            "NumberOfSeriesRelatedInstances",
        ],
    )
    assert res.returncode == 0, res.stderr
    got = {
        a.SeriesInstanceUID: (
            a.Modality,
            int(a.SeriesNumber),
            a.BodyPartExamined,
            int(a.NumberOfSeriesRelatedInstances),
        )
        for a in answers
    }
    assert got == {w.series["A-chest"]: ("DX", 1, "CHEST", 3), w.series["A-knee"]: ("DX", 2, "KNEE", 1)}
    # Body Part Examined matches what any image was found to be: B's abdomen series holds a chest.
    answers, _ = findscu(w, ["QueryRetrieveLevel=SERIES", "BodyPartExamined=CHEST", "SeriesInstanceUID"])
    assert {a.SeriesInstanceUID: a.BodyPartExamined for a in answers} == {
        w.series["A-chest"]: "CHEST",
        w.series["B-abd"]: "CHEST",
    }
    answers, _ = findscu(w, ["QueryRetrieveLevel=SERIES", "BodyPartExamined=ABDOMEN", "SeriesInstanceUID"])
    assert {a.SeriesInstanceUID: a.BodyPartExamined for a in answers} == {w.series["B-abd"]: "ABDOMEN"}
    answers, _ = findscu(w, ["QueryRetrieveLevel=SERIES", "SeriesNumber=2", "PatientID=QP00*"])
    assert _uids(answers, "SeriesInstanceUID") == {w.series["A-knee"]}


def test_image_level_finds_chest_laterals_by_view_code(tagged):
    w = tagged
    answers, res = findscu(
        w,
        [
            "QueryRetrieveLevel=IMAGE",
            "BodyPartExamined=CHEST",
            f"ViewCodeSequence[0].CodeValue={CHEST_LATERAL}",
            "ViewCodeSequence[0].CodingSchemeDesignator",
            "ViewCodeSequence[0].CodeMeaning",
            "ViewPosition",
            "SOPInstanceUID",
        ],
    )
    assert res.returncode == 0, res.stderr
    # A2 (header PA, newest prediction lateral) and B1 (header ABDOMEN): the pixels decide.
    assert _uids(answers, "SOPInstanceUID") == {w.sop["A2"], w.sop["B1"]}
    for a in answers:
        assert a.BodyPartExamined == "CHEST" and a.ViewPosition == "LL"
        code = a.ViewCodeSequence[0]
        assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == (CHEST_LATERAL, "SCT", "left lateral")


def test_image_level_values_found_or_from_the_header(tagged):
    w = tagged
    answers, res = findscu(
        w,
        [
            "QueryRetrieveLevel=IMAGE",
            f"StudyInstanceUID={w.study['A']}",
            "SOPInstanceUID",
            "SOPClassUID",
            "InstanceNumber",
            "BodyPartExamined",
            "ViewPosition",
            "ViewCodeSequence",
            "ImageLaterality",
        ],
    )
    assert res.returncode == 0, res.stderr
    got = {
        a.SOPInstanceUID: (
            a.BodyPartExamined,
            a.ViewPosition,
            a.ViewCodeSequence[0].CodeValue if a.ViewCodeSequence else None,
        )
        for a in answers
    }
    assert got == {
        w.sop["A1"]: ("CHEST", "PA", PA),
        w.sop["A2"]: ("CHEST", "LL", CHEST_LATERAL),
        w.sop["A3"]: ("CHEST", "LL", None),  # unknown: the header's values, no view code
        w.sop["A4"]: ("KNEE", "", LATERAL),  # knee_lateral has no View Position term
    }
    assert {a.SOPClassUID for a in answers} == {"1.2.840.10008.5.1.4.1.1.1.1"}
    assert {a.ImageLaterality for a in answers} == {"U"}
    # ViewPosition matches the found value too; a header PA that is a lateral is not PA.
    answers, _ = findscu(w, ["QueryRetrieveLevel=IMAGE", "ViewPosition=PA", "SOPInstanceUID"])
    assert _uids(answers, "SOPInstanceUID") == {w.sop["A1"], w.sop["D1"]}
    answers, _ = findscu(w, ["QueryRetrieveLevel=IMAGE", "InstanceNumber=7", "SOPInstanceUID"])
    assert _uids(answers, "SOPInstanceUID") == {w.sop["C1"]}


def test_wildcard_and_case_insensitive_names(tagged):
    w = tagged
    answers, _ = findscu(w, ["QueryRetrieveLevel=STUDY", "PatientName=doe*", "StudyInstanceUID"])
    assert _uids(answers, "StudyInstanceUID") == {w.study["A"], w.study["C"]}
    answers, _ = findscu(w, ["QueryRetrieveLevel=STUDY", "PatientName=D?E^J*N", "StudyInstanceUID"])
    assert _uids(answers, "StudyInstanceUID") == {w.study["C"]}
    answers, _ = findscu(w, ["QueryRetrieveLevel=STUDY", "PatientName=SMITH^JOHN^"])
    assert [str(a.PatientName) for a in answers] == ["Smith^John"]
    answers, _ = findscu(w, ["QueryRetrieveLevel=STUDY", "PatientName=*^J*", "StudyDescription=XR*"])
    assert len(answers) == 4
    # Names beyond ASCII come back in UTF-8.
    answers, _ = findscu(w, ["QueryRetrieveLevel=STUDY", "PatientID=QP004", "PatientName"])
    assert [str(a.PatientName) for a in answers] == ["Müller^Jörg"] and answers[0].SpecificCharacterSet == "ISO_IR 192"


def test_names_beyond_ascii_match_without_case(tagged):
    store = Store(tagged.node.db_url)
    try:
        query = Query(store)
        for name in ("müller*", "MÜLLER^JÖRG", "M?LLER^*"):
            answers, truncated = query.find(
                parse_request(_request("STUDY", PatientName=name, StudyInstanceUID=""), STUDY_ROOT_FIND)
            )
            assert [a.StudyInstanceUID for a in answers] == [tagged.study["D"]], name
            assert not truncated
    finally:
        store.dispose()


def _flags_query(value: str | None, level: str = "STUDY") -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    ds.StudyInstanceUID = ""
    block = ds.private_block(0x0075, "NNROUTER", create=True)
    block.add_new(0x10, "CS", value)
    return ds


def _flags(a: Dataset) -> list[str]:
    block = a.private_block(0x0075, "NNROUTER")
    v = block[0x10].value
    if isinstance(v, bytes):
        v = v.decode().strip()
        return v.split("\\") if v else []
    return [] if not v else ([v] if isinstance(v, str) else list(v))


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")
def test_mismatch_flags_private_key(tagged):
    w = tagged
    # Zero-length: returned, no filter.
    answers, res = findscu(w, ["QueryRetrieveLevel=STUDY", "StudyInstanceUID", "0075,0010=NNROUTER", "0075,1010"])
    assert res.returncode == 0, res.stderr
    got = {a.StudyInstanceUID: _flags(a) for a in answers}
    assert got == {
        w.study["A"]: ["EXTRA_VIEW", "MISSING_VIEW"],
        w.study["B"]: ["HEADER_CONFLICT"],
        w.study["C"]: [],
        w.study["D"]: [],
    }
    # A kind, with findscu's -k and the dictionary line the module's docstring gives; either case.
    dic = w.tmp / "nnrouter.dic"
    dic.write_text('(0075,"NNROUTER",10)\tCS\tMismatchFlags\t1-n\tPrivateTag\n')
    dcmtk = Path("/usr/share/libdcmtk17")
    dicts = [str(p) for p in (dcmtk / "dicom.dic", dcmtk / "private.dic") if p.exists()]
    if dicts:
        answers, res = findscu(
            w,
            ["QueryRetrieveLevel=STUDY", "StudyInstanceUID", "0075,0010=NNROUTER", "0075,1010=header_conflict"],
            env={"DCMDICTPATH": ":".join([*dicts, str(dic)])},
        )
        assert _uids(answers, "StudyInstanceUID") == {w.study["B"]}, res.stderr
    # A list and a lone * (as a query file: the key in a block other than 10 works too).
    answers, _ = findscu(w, [], query=_flags_query("MISSING_VIEW\\HEADER_CONFLICT"))
    assert _uids(answers, "StudyInstanceUID") == {w.study["A"], w.study["B"]}
    q = Dataset()
    q.QueryRetrieveLevel = "SERIES"
    q.SeriesInstanceUID = ""
    q.add_new(0x00750011, "LO", "NNROUTER")
    q.add_new(0x00751110, "CS", "*")
    answers, _ = findscu(w, [], query=q)
    assert _uids(answers, "SeriesInstanceUID") == {w.series["A-chest"], w.series["A-knee"], w.series["B-abd"]}
    assert all(_flags(a) for a in answers)
    answers, _ = findscu(w, [], query=_flags_query("WRONG_BODY_PART"))
    assert answers == []


STUDY_KEYS = [
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "StudyDescription",
    "ReferringPhysicianName",
    "ModalitiesInStudy",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
]


def test_universal_matching_returns_the_keys(tagged):
    w = tagged
    answers, res = findscu(w, ["QueryRetrieveLevel=STUDY", *STUDY_KEYS, "InstanceAvailability"])
    assert res.returncode == 0, res.stderr
    assert len(answers) == len(STUDIES)
    for a in answers:
        for k in [*STUDY_KEYS, "InstanceAvailability"]:
            assert k in a, k
    by_uid = {a.StudyInstanceUID: a for a in answers}
    for study, (pname, pid, date, tm, acc) in STUDIES.items():
        a = by_uid[w.study[study]]
        assert (str(a.PatientName), a.PatientID, a.StudyDate, a.StudyTime, a.AccessionNumber) == (
            pname,
            pid,
            date,
            tm,
            acc,
        )
        assert a.PatientBirthDate == "19700101" and a.PatientSex == "O"
    assert int(by_uid[w.study["B"]].NumberOfStudyRelatedInstances) == 2
    # Keys nnrouter does not keep are answered zero-length.
    assert all(a.StudyID == "" and a.InstanceAvailability == "" for a in answers)


def test_patient_root(tagged):
    w = tagged
    answers, res = findscu(
        w,
        [
            "QueryRetrieveLevel=PATIENT",
            "PatientID",
            "PatientName",
            "NumberOfPatientRelatedStudies",
            "NumberOfPatientRelatedSeries",
            "NumberOfPatientRelatedInstances",
        ],
        model="-P",
    )
    assert res.returncode == 0, res.stderr
    got = {
        a.PatientID: (
            str(a.PatientName),
            int(a.NumberOfPatientRelatedStudies),
            int(a.NumberOfPatientRelatedSeries),
            int(a.NumberOfPatientRelatedInstances),
        )
        for a in answers
    }
    assert got == {
        "QP001": ("DOE^JANE", 1, 2, 4),
        "QP002": ("Smith^John", 1, 1, 2),
        "QP003": ("DOE^JOHN", 1, 1, 1),
        "QP004": ("Müller^Jörg", 1, 1, 1),
    }
    answers, _ = findscu(w, ["QueryRetrieveLevel=IMAGE", "PatientID=QP002", "SOPInstanceUID"], model="-P")
    assert _uids(answers, "SOPInstanceUID") == {w.sop["B1"], w.sop["B2"]}


def test_bad_identifiers_are_refused(tagged):
    w = tagged
    # Study Root has no PATIENT level.
    answers, res = findscu(w, ["QueryRetrieveLevel=PATIENT", "PatientID"])
    # DCMTK's name for 0xA900.
    assert answers == [] and "DataSetDoesNotMatchSOPClass" in res.stderr, res.stderr
    q = Dataset()
    q.PatientID = "QP001"
    answers, res = findscu(w, [], query=q)
    assert answers == [] and "DataSetDoesNotMatchSOPClass" in res.stderr, res.stderr


def test_one_info_line_per_query_without_patient_data(tagged):
    w = tagged
    findscu(w, ["QueryRetrieveLevel=STUDY", "PatientID=QP003", "PatientName=DOE*", "StudyInstanceUID"])
    lines = w.node.log_lines()
    events = [json.loads(line) for line in lines if line.startswith("{")]
    queries = [e for e in events if e.get("event") == "query"]
    last = queries[-1]
    assert last["query_level"] == "STUDY" and last["matches"] == 1 and last["model"] == "study"
    assert sorted(last["keys"]) == ["PatientID", "PatientName", "StudyInstanceUID"]
    assert "duration_ms" in last and last["calling_ae"] == "FINDSCU"
    text = "\n".join(lines)
    for secret in ("QP00", "DOE", "Smith", "19700101"):
        assert secret not in text


# --- limits, cancel: an in-process SCP with a small cap -------------------------


def _scp(query: Query):  # type: ignore[no-untyped-def]
    ae = AE(ae_title="NNROUTER")
    for uid in Query.contexts():
        ae.add_supported_context(uid, TRANSFER_SYNTAXES)
    port = peers.free_port()
    return port, ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_FIND, query.handle_find)])


def test_cap_and_cancel(tagged):
    w = tagged
    assert MAX_RESULTS == 1000
    store = Store(w.node.db_url)
    port, server = _scp(Query(store, max_results=2))
    try:
        with capture_logs() as logged:
            answers, res = findscu(w, ["QueryRetrieveLevel=IMAGE", "SOPInstanceUID", "InstanceNumber"], port=port)
        assert res.returncode == 0 and len(answers) == 2, res.stderr
        assert "Final Find Response (Success)" in res.stderr
        assert [
            e for e in logged if e["event"] == "query_truncated" and e["limit"] == 2 and e["log_level"] == "warning"
        ]
        # Python-side matching (IS) streams the rows and stops at the cap too.
        answers, res = findscu(w, ["QueryRetrieveLevel=IMAGE", "SOPInstanceUID", "InstanceNumber=1\\3\\5"], port=port)
        assert [int(a.InstanceNumber) for a in answers] == [1, 3], res.stderr
        answers, res = findscu(w, ["QueryRetrieveLevel=IMAGE", "SOPInstanceUID"], port=port, extra=["--cancel", "1"])
        assert "Cancel" in res.stderr, res.stderr
    finally:
        server.shutdown()
        store.dispose()


def test_database_error_is_unable_to_process(tagged, tmp_path):
    empty = Store(f"sqlite:///{tmp_path / 'empty.db'}")  # no tables
    port, server = _scp(Query(empty))
    try:
        answers, res = findscu(tagged, ["QueryRetrieveLevel=STUDY", "PatientID=QP001"], port=port, extra=["-d"])
    finally:
        server.shutdown()
        empty.dispose()
    assert answers == []
    assert "UnableToProcess" in res.stderr or "c001" in res.stderr.lower(), res.stderr[-3000:]
    assert "database error: OperationalError" in res.stderr and "QP001" not in res.stderr.split("Find Response")[-1]


def test_allowed_calling_aes_apply_to_queries(node_factory, tagged):
    node = node_factory(
        "guarded",
        settings={
            "dicom": {
                "allowed_calling_aes": [{"ae_title": "PACS"}],
                "query_aes": [{"ae_title": "PACS"}, {"ae_title": "FINDSCU"}],
            }
        },
    ).start()
    w = Tagged(node, tagged.tmp)
    answers, res = findscu(w, ["QueryRetrieveLevel=STUDY"])  # calling AE FINDSCU
    assert answers == [] and "Association Rejected" in res.stderr, res.stderr
    answers, res = findscu(w, ["QueryRetrieveLevel=STUDY"], extra=["-aet", "PACS"])
    assert res.returncode == 0 and answers == [], res.stderr


# --- Orthanc as the query client ---------------------------------------------


@needs("Orthanc")
def test_orthanc_finds_what_nnrouter_tagged(tagged):
    w = tagged
    orthanc = peers.Orthanc(
        w.tmp / f"orthanc-{uuid.uuid4().hex[:6]}",
        modalities={"nnrouter": [w.node.ae_title, "127.0.0.1", w.node.port]},
    ).start()
    try:

        def ask(level: str, query: dict, normalize: bool = True) -> list[dict]:
            # Orthanc 1.10 forwards only its "main" tags unless told not to normalize.
            rsp = orthanc.post("/modalities/nnrouter/query", {"Level": level, "Query": query, "Normalize": normalize})
            qid = rsp["ID"]
            n = len(orthanc.get(f"/queries/{qid}/answers"))
            return [orthanc.get(f"/queries/{qid}/answers/{i}/content?simplify") for i in range(n)]

        studies = ask("Study", {"PatientID": "QP00*", "StudyDate": "20240101-", "AccessionNumber": ""})
        assert {s["StudyInstanceUID"]: s["AccessionNumber"] for s in studies} == {
            w.study["A"]: "QA1",
            w.study["B"]: "QB1",
        }
        images = ask(
            "Instance",
            {"StudyInstanceUID": w.study["B"], "SeriesInstanceUID": w.series["B-abd"], "BodyPartExamined": "CHEST"},
        )
        assert [(i["SOPInstanceUID"], i["BodyPartExamined"]) for i in images] == [(w.sop["B1"], "CHEST")]
        images = ask(
            "Instance", {"BodyPartExamined": "CHEST", "ViewPosition": "LL", "SOPInstanceUID": ""}, normalize=False
        )
        assert {i["SOPInstanceUID"] for i in images} == {w.sop["A2"], w.sop["A3"], w.sop["B1"]}
        assert {i["ViewPosition"] for i in images} == {"LL"}
        # The private key: Orthanc sends it when told not to normalize.
        flagged = ask(
            "Study", {"0075,0010": "NNROUTER", "0075,1010": "MISSING_VIEW", "StudyInstanceUID": ""}, normalize=False
        )
        assert [s["StudyInstanceUID"] for s in flagged] == [w.study["A"]]
    finally:
        orthanc.stop()
