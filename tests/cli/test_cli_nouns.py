"""Commands grouped by noun (study show|hang|report, protocols write|send), and the old names for one release."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml
from conftest import needs
from pydicom import dcmread

from nnrouter.core.store import (
    Instance,
    InstanceState,
    Prediction,
    Series,
    Store,
    Study,
)
from nnrouter.results import hanging
from nnrouter.testing.synthetic import write_series


def nnrouter(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nnrouter", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env=None if env is None else {**os.environ, **env},
    )


def deprecated(res: subprocess.CompletedProcess, old: str, new: str) -> bool:
    """One line on stderr naming the new command."""
    notes = [line for line in res.stderr.splitlines() if f"`{old}` is now `nnrouter {new}`" in line]
    return len(notes) == 1


def _stored(node, tmp_path) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    """Two knee studies of one patient, classified, with files on disk: (current, prior) Study Instance UIDs."""
    node.write_config()
    node.cli("db", "upgrade")
    store = Store(node.db_url)
    uids = []
    try:
        with store.write() as s:
            for n, (date, labels) in enumerate((("20261127", ["knee_lateral", "knee_ap"]), ("20250101", ["knee_ap"]))):
                files = write_series(tmp_path / f"study{n}", len(labels), rows=32, columns=32)
                first = dcmread(files[0], stop_before_pixels=True)
                study = Study(
                    study_uid=str(first.StudyInstanceUID), study_date=date, patient_id="P1", accession_number=f"ACC{n}"
                )
                series = Series(study=study, series_uid=str(first.SeriesInstanceUID), modality="DX")
                s.add_all([study, series])
                for i, (f, label) in enumerate(zip(files, labels), 1):
                    ds = dcmread(f, stop_before_pixels=True)
                    inst = Instance(
                        series=series,
                        sop_instance_uid=str(ds.SOPInstanceUID),
                        sop_class_uid=str(ds.SOPClassUID),
                        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                        path=str(f),
                        size_bytes=1,
                        sha256=f"{n}{i}",
                        state=InstanceState.CLASSIFIED,
                        instance_number=str(i),
                        image_laterality="L",
                    )
                    s.add(inst)
                    s.add(
                        Prediction(
                            instance=inst,
                            model_name="test",
                            model_version="1",
                            provider="CPU",
                            label=label,
                            score=0.97,
                            top5=[[label, 0.97]],
                            decode_ms=1,
                            preprocess_ms=1,
                            infer_ms=1,
                        )
                    )
                uids.append(study.study_uid)
    finally:
        store.dispose()
    return uids[0], uids[1]


def test_study_hang_and_report_and_their_old_names(node_factory, tmp_path):
    node = node_factory()
    current, prior = _stored(node, tmp_path)

    new = node.cli("study", "hang", current)
    old = node.cli("hang", current)
    assert json.loads(new.stdout) == json.loads(old.stdout)
    assert json.loads(new.stdout)["prior"]["study_uid"] == prior
    assert not new.stderr and deprecated(old, "hang", "study hang")
    missing = node.cli("study", "hang", "9.9.9", check=False)
    assert missing.returncode == 1 and "no study 9.9.9" in missing.stderr

    res = node.cli("study", "report", current, "--out", str(tmp_path / "new.dcm"), "--json")
    assert json.loads(res.stdout) == {"path": str(tmp_path / "new.dcm"), "images": 2, "flags": 0}
    old = node.cli("report", current, "--out", str(tmp_path / "old.dcm"))
    assert "wrote " in old.stdout and "2 images, 0 flags" in old.stdout and deprecated(old, "report", "study report")
    for name in ("new.dcm", "old.dcm"):
        sr = dcmread(tmp_path / name)
        assert sr.Modality == "SR" and sr.StudyInstanceUID == current
    missing = node.cli("study", "report", "9.9.9", "--out", str(tmp_path / "x.dcm"), check=False)
    assert missing.returncode == 1 and not (tmp_path / "x.dcm").exists()


def test_protocols_write_and_the_old_name(tmp_path):
    res = nnrouter("protocols", "write", "--out", str(tmp_path / "new"), "--json")
    assert res.returncode == 0 and not res.stderr
    written = json.loads(res.stdout)["written"]
    assert len(written) == len(hanging.generic_protocols())
    assert sorted(written) == sorted(str(p) for p in (tmp_path / "new").glob("*.dcm"))

    old = nnrouter("hang-protocols", "--out", str(tmp_path / "old"))
    assert old.returncode == 0 and f"wrote {len(written)} Hanging Protocol instances" in old.stdout
    assert deprecated(old, "hang-protocols", "protocols write|send")
    assert sorted(p.name for p in (tmp_path / "old").glob("*.dcm")) == sorted(
        p.name for p in (tmp_path / "new").glob("*.dcm")
    )


@needs("storescu")
def test_protocols_send_stores_them_at_a_destination(tmp_path, node_factory):
    """Another nnrouter is the PACS here (DCMTK's storescp and Orthanc 1.10 refuse Hanging Protocol Storage)."""
    pacs = node_factory("pacs", ae_title="PACS").start()
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(
        yaml.safe_dump(
            {
                "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}],
                "rules": [{"name": "all", "then": {"forward": ["pacs"]}}],
            }
        )
    )
    n = len(hanging.generic_protocols())
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    # A destination without calling_ae is called as the configuration's dicom.ae_title.
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump({"dicom": {"ae_title": "SITEROUTER"}}))
    res = nnrouter(
        "protocols",
        "send",
        "pacs",
        "--rules",
        str(rules_file),
        "--config",
        str(site),
        "--json",
        env={"TMPDIR": str(tmp)},
    )
    assert res.returncode == 0, res.stderr
    answer = json.loads(res.stdout)
    assert (answer["stored"], answer["of"], answer["failed"], answer["written"]) == (n, n, [], [])
    assert answer["destination"] == {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}
    assert not list(tmp.iterdir())  # no --out: the files went to a temporary folder, removed afterwards

    old = nnrouter("hang-protocols", "--out", str(tmp_path / "hp"), "--send", "pacs", "--rules", str(rules_file))
    assert old.returncode == 0 and f"stored {n} of {n} at PACS@127.0.0.1:{pacs.port}" in old.stdout
    assert deprecated(old, "hang-protocols", "protocols write|send") and len(list((tmp_path / "hp").glob("*.dcm"))) == n
    store = Store(pacs.db_url)
    try:
        with store.read() as s:
            rows = s.query(Instance.sop_class_uid, Instance.calling_ae).order_by(Instance.id).all()
    finally:
        store.dispose()
    assert [c for c, _ in rows] == [hanging.HANGING_PROTOCOL_STORAGE] * 2 * n  # both sends arrived, whole
    assert [ae for _, ae in rows] == ["SITEROUTER"] * n + ["NNROUTER"] * n  # without --config: the default title

    unknown = nnrouter("protocols", "send", "archive", "--rules", str(rules_file))
    assert unknown.returncode == 3 and "no destination 'archive'" in unknown.stderr
