"""The store on SQLite and PostgreSQL: migrations, and the receive path's writes."""

from __future__ import annotations

import threading

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import inspect, select

from nnrouter.core.config import load
from nnrouter.core.spool import Spool
from nnrouter.core.store import (
    Instance,
    SchemaOutOfDate,
    Series,
    Store,
    Study,
    current_instances,
)
from nnrouter.dicom.receive import Header, Receiver


def _header(study: str, series: str, sop: str) -> Header:
    return Header(
        study_uid=study,
        series_uid=series,
        sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
        study={"accession_number": "A1"},
        series={"modality": "DX"},
        instance={"rows": 2, "columns": 2},
    )


@pytest.fixture
def store(database_url):
    s = Store(database_url)
    yield s
    s.dispose()


def test_upgrade_creates_schema_and_service_checks_head(store):
    with pytest.raises(SchemaOutOfDate, match="nnrouter db upgrade"):
        store.require_current()
    head = store.upgrade()
    assert store.current_revision() == head
    store.require_current()
    tables = set(inspect(store.engine).get_table_names())
    assert {"study", "series", "instance", "alembic_version"} <= tables
    assert store.upgrade() == head  # idempotent


def test_keep_is_idempotent_and_versions_changed_content(store, tmp_path):
    store.upgrade()
    receiver = Receiver(load(None), store, Spool(tmp_path / "spool"))
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    origin = {"transfer_syntax_uid": "1.2.840.10008.1.2.1", "calling_ae": "X"}
    first = receiver.keep(_header(study, series, sop), b"META", memoryview(b"DATA-1"), origin)
    again = receiver.keep(_header(study, series, sop), b"META", memoryview(b"DATA-1"), origin)
    changed = receiver.keep(_header(study, series, sop), b"META", memoryview(b"DATA-2"), origin)
    assert (first.duplicate, again.duplicate, changed.duplicate) == (False, True, False)
    assert again.instance_id == first.instance_id
    assert (first.version, changed.version) == (1, 2)
    with store.read() as s:
        rows = s.execute(select(Instance).order_by(Instance.version)).scalars().all()
        assert [open(r.path, "rb").read() for r in rows] == [b"METADATA-1", b"METADATA-2"]
        assert s.execute(select(Study)).scalar_one().accession_number == "A1"
        assert s.execute(select(Series)).scalar_one().modality == "DX"
        # The study is what the newest version says: later stages count each instance once.
        other = receiver.keep(_header(study, series, generate_uid()), b"META", memoryview(b"OTHER"), origin)
        study_id = s.execute(select(Study.id)).scalar_one()
        assert [(i.id, i.version) for i in current_instances(s, study_id)] == [
            (changed.instance_id, 2),
            (other.instance_id, 1),
        ]


def test_concurrent_senders_of_one_study(store, tmp_path):
    """Many associations storing into the same new study at once: one study row, every instance kept."""
    store.upgrade()
    receiver = Receiver(load(None), store, Spool(tmp_path / "spool"))
    study, series = generate_uid(), generate_uid()
    uids = [generate_uid() for _ in range(40)]
    errors: list[BaseException] = []

    def send(chunk: list[str]) -> None:
        try:
            for uid in chunk:
                receiver.keep(
                    _header(study, series, uid),
                    b"M",
                    memoryview(uid.encode()),
                    {"transfer_syntax_uid": "1.2.840.10008.1.2.1"},
                )
                # The same instance from a second sender at the same time.
                receiver.keep(
                    _header(study, series, uid),
                    b"M",
                    memoryview(uid.encode()),
                    {"transfer_syntax_uid": "1.2.840.10008.1.2.1"},
                )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(uids[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    with store.read() as s:
        assert len(s.execute(select(Study)).scalars().all()) == 1
        assert len(s.execute(select(Series)).scalars().all()) == 1
        assert sorted(s.execute(select(Instance.sop_instance_uid)).scalars()) == sorted(uids)
    assert store.state_counts() == {"received": 40}
