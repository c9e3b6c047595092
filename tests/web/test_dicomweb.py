"""QIDO-RS: the C-FIND SCP's search over HTTP, in the DICOM JSON model, behind the console's login."""

from __future__ import annotations

from pathlib import Path

import pytest
from dicomfiles import predict_all
from fastapi.testclient import TestClient
from pydicom import Dataset, dcmread

from nnrouter.core.config import Settings
from nnrouter.core.ingest import keep
from nnrouter.core.spool import Spool
from nnrouter.core.store import Store
from nnrouter.testing.synthetic import write_series
from nnrouter.web import users
from nnrouter.web.app import create_app


@pytest.fixture
def site(tmp_path: Path):  # type: ignore[no-untyped-def]
    settings = Settings(
        storage={"path": str(tmp_path / "spool"), "min_free_mb": 1},
        database={"url": f"sqlite:///{tmp_path / 'db.sqlite'}"},
        models={"classifier": None, "detector": None},
    )
    store = Store(settings.database.url)
    store.upgrade()
    files = write_series(tmp_path / "in", 3, rows=32, columns=32)
    for f in files:
        keep(store, Spool(settings.storage.path), dcmread(f), "MODALITY", node=settings.node.name, created=False)
    lateral = str(dcmread(files[2], stop_before_pixels=True).SOPInstanceUID)
    predict_all(store, {lateral: "chest_lateral"}, "knee_ap")  # what a worker found: the third is a chest lateral
    users.add(store, "pacs", "viewer", "a long enough password")
    token = users.new_token(store, "pacs")
    client = TestClient(create_app(settings, store, expect_stages=False), headers={"Authorization": f"Bearer {token}"})
    yield client, files, lateral
    store.dispose()


def _value(answer: dict, tag: str):  # type: ignore[no-untyped-def]
    return (answer.get(tag, {}).get("Value") or [None])[0]


def test_qido_finds_studies_series_and_the_chest_lateral_as_c_find_does(site) -> None:  # type: ignore[no-untyped-def]
    client, files, lateral = site
    first = dcmread(files[0], stop_before_pixels=True)
    r = client.get("/dicom-web/studies", params={"PatientID": str(first.PatientID)})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/dicom+json")
    (study,) = r.json()
    assert _value(study, "0020000D") == str(first.StudyInstanceUID)
    assert _value(study, "00201208") == 3  # NumberOfStudyRelatedInstances
    assert "00080052" not in study  # no QueryRetrieveLevel in a QIDO answer
    series = client.get(f"/dicom-web/studies/{first.StudyInstanceUID}/series").json()
    assert [_value(s, "0020000E") for s in series] == [str(first.SeriesInstanceUID)]
    # nnrouter's findings match as in C-FIND: the classifier's chest lateral, whatever the header said.
    found = client.get("/dicom-web/instances", params={"BodyPartExamined": "CHEST", "ViewPosition": "LL"}).json()
    assert [_value(i, "00080018") for i in found] == [lateral]
    # Paging, and includefield.
    page = client.get(f"/dicom-web/studies/{first.StudyInstanceUID}/instances", params={"limit": 2, "offset": 2})
    assert len(page.json()) == 1
    one = client.get("/dicom-web/instances", params={"SOPInstanceUID": lateral, "includefield": "ImageLaterality"})
    assert "00200062" in one.json()[0]


def test_qido_says_what_is_wrong_and_needs_a_login(site) -> None:  # type: ignore[no-untyped-def]
    client, _, _ = site
    assert client.get("/dicom-web/studies", params={"NotAKeyword": "x"}).status_code == 400
    assert client.get("/dicom-web/studies", params={"limit": "-1"}).status_code == 400
    assert client.get("/dicom-web/studies", params={"SOPInstanceUID": "1.2"}).status_code == 400  # not a study key
    anonymous = TestClient(client.app)
    assert anonymous.get("/dicom-web/studies").status_code == 401


def test_the_dicomweb_client_of_pypi_searches_nnrouter(tmp_path: Path) -> None:
    """A real client (dicomweb-client, over requests) against `nnrouter web` serving a store."""
    import os
    import subprocess
    import sys

    import yaml
    from dicomweb_client.api import DICOMwebClient

    from nnrouter.testing import peers

    port = peers.free_port()
    config = tmp_path / "nnrouter.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "database": {"url": f"sqlite:///{tmp_path / 'db.sqlite'}"},
                "storage": {"path": str(tmp_path / "spool"), "min_free_mb": 1},
                "models": {"classifier": None, "detector": None},
                "http": {"port": port},
                "logging": {"format": "json"},
            }
        )
    )
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    store.upgrade()
    files = write_series(tmp_path / "in", 2, rows=32, columns=32)
    for f in files:
        keep(store, Spool(tmp_path / "spool"), dcmread(f), "MODALITY", node="n", created=False)
    users.add(store, "pacs", "viewer", "a long enough password")
    token = users.new_token(store, "pacs")
    store.dispose()
    log = open(tmp_path / "web.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "nnrouter", "web", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ},
    )
    try:
        peers.wait_port(port, timeout=60, proc=proc)
        client = DICOMwebClient(f"http://127.0.0.1:{port}/dicom-web", headers={"Authorization": f"Bearer {token}"})
        first = dcmread(files[0], stop_before_pixels=True)
        studies = client.search_for_studies(search_filters={"PatientID": str(first.PatientID)})
        assert [Dataset.from_json(s).StudyInstanceUID for s in studies] == [first.StudyInstanceUID]
        got = client.search_for_instances(study_instance_uid=str(first.StudyInstanceUID))
        assert {Dataset.from_json(i).SOPInstanceUID for i in got} == {
            dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files
        }
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
