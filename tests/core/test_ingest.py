"""The store-level ingest: nnrouter's own objects are kept the one way received instances are.

On SQLite and PostgreSQL: the spool file is the Part 10 encoding of the data
set (fsync'd, renamed), the rows are committed, a second copy is a
duplicate, and the C-STORE path (``Receiver.keep``) lands in the same place.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.filewriter import dcmwrite
from sqlalchemy import select

from nnrouter.core import ingest
from nnrouter.core.config import Settings
from nnrouter.core.spool import Spool
from nnrouter.core.store import Instance, InstanceState, Store, Study
from nnrouter.dicom.receive import Receiver
from nnrouter.results.hanging import protocol_for
from nnrouter.testing.synthetic import DXSpec, dx_dataset


@pytest.fixture
def store(database_url):  # type: ignore[no-untyped-def]
    s = Store(database_url)
    s.upgrade()
    yield s
    s.dispose()


def _part10(ds) -> bytes:  # type: ignore[no-untyped-def]
    buf = BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _aware(ts: dt.datetime) -> dt.datetime:
    return ts if ts.tzinfo else ts.replace(tzinfo=dt.UTC)


def test_own_objects_are_kept_like_received_ones(store, tmp_path):
    spool = Spool(tmp_path / "spool")
    image = dx_dataset(DXSpec(rows=16, columns=16))
    first = ingest.keep(store, spool, image, "MODALITY", node="node-a", created=False)
    with store.read() as s:
        arrived = _aware(s.execute(select(Study.last_received_at)).scalar_one())
    # A copy nnrouter made of it (say coerced), in the same study.
    copy = dx_dataset(DXSpec(rows=16, columns=16, study_uid=image.StudyInstanceUID, series_uid=image.SeriesInstanceUID))
    copy.InstitutionName = "CHANGED BY A RULE"
    kept = ingest.keep(store, spool, copy, "NNROUTER", node="node-a")
    again = ingest.keep(store, spool, copy, "NNROUTER", node="node-a")
    assert (first.duplicate, kept.duplicate, again.duplicate) == (False, False, True)
    assert again.instance_id == kept.instance_id and kept.version == 1
    with store.read() as s:
        rows = {r.sop_instance_uid: r for r in s.execute(select(Instance)).scalars()}
        study = s.execute(select(Study)).scalar_one()
    mine, theirs = rows[copy.SOPInstanceUID], rows[image.SOPInstanceUID]
    assert (theirs.state, mine.state) == (InstanceState.RECEIVED, InstanceState.CREATED)
    assert (mine.calling_ae, mine.called_ae, mine.peer_host, mine.node) == ("NNROUTER", None, None, "node-a")
    assert mine.transfer_syntax_uid == str(copy.file_meta.TransferSyntaxUID)
    # Our own object does not restart the quiet period of the study it joins.
    assert _aware(study.last_received_at) == arrived
    # The file is the data set's Part 10 encoding, and the row's digest is of its data set.
    on_disk = Path(mine.path).read_bytes()
    assert on_disk == _part10(copy)
    assert dcmread(mine.path).InstitutionName == "CHANGED BY A RULE"
    meta_len = 132 + 12 + int.from_bytes(on_disk[140:144], "little")
    assert hashlib.sha256(on_disk[meta_len:]).hexdigest() == mine.sha256


def test_the_c_store_path_and_the_ingest_are_one_keep(store, tmp_path):
    """The same bytes through Receiver.keep and ingest.keep are one instance, not two."""
    spool = Spool(tmp_path / "spool")
    settings = Settings(node={"name": "node-b"})
    ds = dx_dataset(DXSpec(rows=16, columns=16))
    raw = _part10(ds)
    meta_len = 132 + 12 + int.from_bytes(raw[140:144], "little")
    received = Receiver(settings, store, spool).keep(
        ingest.parse_header(ds),
        raw[:meta_len],
        memoryview(raw)[meta_len:],
        {"transfer_syntax_uid": str(ds.file_meta.TransferSyntaxUID), "calling_ae": "MODALITY"},
    )
    made = ingest.keep(store, spool, ds, "NNROUTER", node="node-b")
    assert not received.duplicate and made.duplicate and made.instance_id == received.instance_id
    with store.read() as s:
        assert s.execute(select(Instance.node)).scalars().all() == ["node-b"]


def test_a_hanging_protocol_has_no_study_and_is_kept_under_derived_uids(store, tmp_path):
    spool = Spool(tmp_path / "spool")
    protocol = protocol_for("KNEE", version="1")
    kept = ingest.keep(store, spool, protocol, "NNROUTER", node=None)
    again = ingest.keep(
        store,
        spool,
        protocol_for("KNEE", version="1", created=dt.datetime(2024, 5, 1, tzinfo=dt.UTC)),
        "NNROUTER",
        node=None,
    )
    with store.read() as s:
        rows = s.execute(select(Instance).order_by(Instance.version)).scalars().all()
    # The same SOP Instance UID (it follows from the content), other bytes (creation time): a second version.
    assert [r.version for r in rows] == [1, 2] and again.instance_id != kept.instance_id
    assert rows[0].sop_class_uid == "1.2.840.10008.5.1.4.38.1"
    assert "header lacks StudyInstanceUID, SeriesInstanceUID" in rows[0].state_reason
    assert rows[0].path.startswith(str(spool.root))


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # the malformed UID under test
def test_an_object_that_cannot_key_the_store_is_refused_with_nothing_left(store, tmp_path):
    spool = Spool(tmp_path / "spool")
    ds = dx_dataset(DXSpec(rows=16, columns=16))
    ds.SeriesInstanceUID = "1.2..3"
    with pytest.raises(ingest.Inconsistent, match="SeriesInstanceUID is not a valid UID: empty component"):
        ingest.keep(store, spool, ds, "NNROUTER", node=None)
    assert [p for p in spool.root.rglob("*") if p.is_file()] == []
    with store.read() as s:
        assert s.execute(select(Instance)).first() is None
