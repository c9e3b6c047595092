"""The worklist stage and the router meet only in the store: the poll asks a real wlmscpfs, the router reads.

Each test drives the two ticks by hand, on SQLite and PostgreSQL, against
DCMTK's worklist SCP on loopback: the poll stage's tick, then the router's.
"""

from __future__ import annotations

import datetime as dt
import itertools
from pathlib import Path

import pytest
from conftest import REPO, needs
from dicomfiles import code_item, worklist_entry
from pydicom.uid import generate_uid
from sqlalchemy import select

from nnrouter.core.config import Settings
from nnrouter.core.store import (
    Flag,
    Instance,
    InstanceState,
    Prediction,
    Series,
    Store,
    Study,
    utcnow,
)
from nnrouter.orders import order as orders
from nnrouter.orders.worklist_poll import (
    WORKLIST_AGAIN_S,
    WORKLIST_WAIT_S,
    WorklistPoll,
)
from nnrouter.routing.router import Router
from nnrouter.testing import peers

pytestmark = needs("wlmscpfs")

QUIET_S = 30.0  # the router's quiet period without a rule file
_uids = itertools.count(1)


@pytest.fixture
def wl(tmp_path):  # type: ignore[no-untyped-def]
    """wlmscpfs with the order for a two-view chest study, accession ACC_C."""
    scp = peers.Wlmscpfs(tmp_path / "worklists")
    scp.folder.mkdir(parents=True)
    worklist_entry(
        scp.folder / "c.wl",
        accession="ACC_C",
        study_uid=generate_uid(),
        code=code_item("36643-5", "LN", "XR Chest 2 Views"),
        description="XR Chest 2 Views",
        modality="DX",
        sps_description="Chest PA and lateral",
        patient_name="WL^TEST",
        patient_id="WL1",
        station=["DX1"],
    )
    scp.start()
    yield scp
    scp.stop()


def _settings(tmp_path: Path, database_url: str, port: int) -> Settings:
    return Settings(
        database={"url": database_url},
        storage={"path": str(tmp_path / "spool")},
        models={"classifier": str(REPO / "models" / "nnrouter-view"), "detector": None},
        orders={
            "procedures": str(REPO / "rules" / "procedures.yaml"),
            "worklist": {"host": "127.0.0.1", "port": port, "ae_title": "RISWL", "timeout_s": 5},
        },
    )


@pytest.fixture
def store(database_url):  # type: ignore[no-untyped-def]
    s = Store(database_url)
    s.upgrade()
    yield s
    s.dispose()


def add_study(store: Store, accession: str, labels: list[str], received: dt.datetime | None = None) -> int:
    """A study whose images the workers have looked at (rows only: nothing here reads the files)."""
    received = received or utcnow()
    with store.write() as s:
        study = Study(study_uid=generate_uid(), accession_number=accession, last_received_at=received)
        series = Series(study=study, series_uid=generate_uid(), modality="DX")
        s.add_all([study, series])
        for label in labels:
            n = next(_uids)
            inst = Instance(
                series=series,
                sop_instance_uid=generate_uid(),
                sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                path=f"/nonexistent/{n}.dcm",
                size_bytes=1,
                sha256=f"{n:064x}",
                state=InstanceState.CLASSIFIED,
                rows=64,
                columns=64,
                calling_ae="DX1",
                received_at=received,
            )
            s.add(inst)
            s.add(
                Prediction(
                    instance=inst,
                    model_name="nnrouter-view",
                    model_version="test",
                    provider="cpu",
                    label=label,
                    score=0.99,
                    top5=[[label, 0.99]],
                    decode_ms=0,
                    preprocess_ms=0,
                    infer_ms=0,
                )
            )
        s.flush()
        return study.id


def study_row(store: Store, study_id: int) -> Study:
    with store.read() as s:
        return s.get(Study, study_id)


def test_the_router_waits_for_the_worklist_stage_then_checks_on_its_answer(tmp_path, database_url, store, wl):
    settings = _settings(tmp_path, database_url, wl.port)
    study_id = add_study(store, "ACC_C", ["chest_pa_ap", "chest_lateral"])
    router, poll = Router(settings, store), WorklistPoll(settings, store)

    # The worklist has not been asked: the router makes no network call and does not check the study.
    assert router.tick()["checked"] == 0
    assert study_row(store, study_id).checked_at is None

    assert poll.tick() == {"asked": 1, "orders": 1, "failed": 0, "skipped": 0}
    row = study_row(store, study_id)
    assert row.worklist_asked_at is not None and row.worklist_next_at is None  # found: not asked again
    assert poll.tick()["asked"] == 0

    # Both ordered views are here: checked at once, well inside the quiet period, on the worklist's order.
    assert router.tick()["checked"] == 1
    with store.read() as s:
        kept = orders.stored_for(s, "ACC_C", None)
        flags = s.execute(select(Flag).where(Flag.study_id == study_id)).scalars().all()
    assert [o.source for o in kept] == [orders.OrderSource.WORKLIST]
    assert flags == []


def test_an_empty_answer_is_asked_again_later_and_an_hl7_order_is_never_asked(tmp_path, database_url, store, wl):
    settings = _settings(tmp_path, database_url, wl.port)
    unknown = add_study(store, "ACC_NONE", ["chest_pa_ap"])
    hl7 = add_study(store, "ACC_HL7", ["chest_pa_ap"])
    with store.write() as s:
        orders.save(
            s, orders.Order(source=orders.OrderSource.HL7, accession_number="ACC_HL7", description="XR Chest 2 Views")
        )
    poll = WorklistPoll(settings, store)

    assert poll.tick() == {"asked": 1, "orders": 0, "failed": 0, "skipped": 0}
    assert study_row(store, hl7).worklist_asked_at is None
    assert poll.tick()["asked"] == 0
    assert poll.tick(now=utcnow() + dt.timedelta(seconds=WORKLIST_AGAIN_S + 1))["asked"] == 1

    # The router does not wait for either: one was answered (empty), the other has its order.
    router = Router(settings, store)
    assert router.tick(now=utcnow() + dt.timedelta(seconds=QUIET_S + 1))["checked"] == 2
    assert study_row(store, unknown).checked_at is not None


def test_a_dead_worklist_pauses_for_every_study_and_the_router_does_not_wait_for_it(tmp_path, database_url, store):
    settings = _settings(tmp_path, database_url, peers.free_port())  # nobody listens
    first = add_study(store, "ACC_1", ["chest_pa_ap"], received=utcnow() - dt.timedelta(seconds=1))
    second = add_study(store, "ACC_2", ["chest_pa_ap"])
    poll = WorklistPoll(settings, store)

    # One failure, and the other study is not asked (no timeout per study): both are marked, to be asked again.
    assert poll.tick() == {"asked": 0, "orders": 0, "failed": 1, "skipped": 1}
    later = add_study(store, "ACC_3", ["chest_pa_ap"])
    assert poll.tick() == {"asked": 0, "orders": 0, "failed": 0, "skipped": 1}  # paused: no network call
    for sid in (first, second, later):
        row = study_row(store, sid)
        assert row.worklist_asked_at is not None and row.worklist_next_at is not None

    router = Router(settings, store)
    assert router.tick(now=utcnow() + dt.timedelta(seconds=QUIET_S + 1))["checked"] == 3


def test_without_the_worklist_stage_the_router_waits_a_bounded_time(tmp_path, database_url, store, wl):
    settings = _settings(tmp_path, database_url, wl.port)
    study_id = add_study(store, "ACC_C", ["chest_pa_ap"])
    router = Router(settings, store)

    assert router.tick(now=utcnow() + dt.timedelta(seconds=QUIET_S + 1))["checked"] == 0
    assert study_row(store, study_id).checked_at is None
    assert router.tick(now=utcnow() + dt.timedelta(seconds=QUIET_S + WORKLIST_WAIT_S + 1))["checked"] == 1
    assert study_row(store, study_id).checked_at is not None
