"""The forwarder as a stage of its own: it reads the outbox and the rule file, nothing of the router's."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import yaml
from conftest import needs
from dicomfiles import wait_for
from pydicom import dcmread
from sqlalchemy import func, select

from nnrouter.core.config import Settings
from nnrouter.core.store import (
    Instance,
    Outbox,
    OutboxState,
    RulesLoad,
    Series,
    Store,
    Study,
)
from nnrouter.routing.forward import run_forwarder
from nnrouter.service.lifecycle import Stop
from nnrouter.testing.synthetic import write_series

pytestmark = needs("storescp")


def queue(store: Store, files: list[Path], destination: str) -> None:
    """Outbox rows as the router writes them, for instances as the receiver keeps them."""
    first = dcmread(files[0], stop_before_pixels=True)
    with store.write() as s:
        study = s.execute(select(Study).where(Study.study_uid == str(first.StudyInstanceUID))).scalar_one_or_none()
        if study is None:
            study = Study(study_uid=str(first.StudyInstanceUID))
            s.add(Series(study=study, series_uid=str(first.SeriesInstanceUID), modality="DX"))
            s.flush()
        series = study.series[0]
        for f in files:
            ds = dcmread(f, stop_before_pixels=True)
            inst = Instance(
                series=series,
                sop_instance_uid=str(ds.SOPInstanceUID),
                sop_class_uid=str(ds.SOPClassUID),
                transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                path=str(f),
                size_bytes=f.stat().st_size,
                sha256=hashlib.sha256(f.read_bytes()).hexdigest(),
                state="decoded",
            )
            s.add(inst)
            s.add(Outbox(instance=inst, destination=destination, rule="all"))


def states(store: Store) -> list[str]:
    with store.read() as s:
        return list(s.execute(select(Outbox.state).order_by(Outbox.id)).scalars())


def test_the_forwarder_stage_delivers_the_outbox_and_keeps_its_destinations_through_a_bad_edit(tmp_path, storescp):
    rules_file = tmp_path / "rules.yaml"
    good = {
        "destinations": [{"name": "archive", "ae_title": storescp.aet, "host": "127.0.0.1", "port": storescp.port}],
        "rules": [{"name": "all", "then": {"forward": ["archive"]}}],
    }
    rules_file.write_text(yaml.safe_dump(good))
    db = f"sqlite:///{tmp_path / 'db.sqlite'}"
    settings = Settings(
        database={"url": db},
        storage={"path": str(tmp_path / "spool")},
        models={"classifier": None, "detector": None},
        routing={"rules": str(rules_file), "tick_s": 0.1},
    )
    store = Store(db)
    store.upgrade()
    files = write_series(tmp_path / "in", 3, rows=32, columns=32)
    queue(store, files[:2], "archive")
    stop = Stop()
    stage = threading.Thread(target=run_forwarder, args=(settings,), kwargs={"stop": stop}, daemon=True)
    stage.start()
    try:
        wait_for(lambda: states(store) == [OutboxState.SENT] * 2 or states(store), timeout=60, every=0.1)
        # An edit that does not validate: the running destinations stay, and the next row goes out.
        rules_file.write_text(yaml.safe_dump(good).replace("forward:", "foward:"))
        queue(store, files[2:], "archive")
        wait_for(lambda: states(store) == [OutboxState.SENT] * 3 or states(store), timeout=60, every=0.1)
        assert len([f for f in storescp.folder.iterdir() if f.is_file()]) == 3
        # Loads are the router's to record: the forwarder leaves no row in `nnrouter status`.
        with store.read() as s:
            assert s.execute(select(func.count()).select_from(RulesLoad)).scalar() == 0
    finally:
        stop.set()
        stage.join(30)
        store.dispose()
    assert not stage.is_alive()
