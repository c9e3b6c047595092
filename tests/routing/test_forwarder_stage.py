"""The forwarder as a stage of its own: it reads the outbox, and the destinations of the rule version the router runs."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import yaml
from conftest import needs
from dicomfiles import wait_for
from pydicom import dcmread
from sqlalchemy import select

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
from nnrouter.routing.router import Router
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


def test_the_forwarder_delivers_with_the_version_the_router_runs_even_when_started_after_a_bad_edit(tmp_path, storescp):
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
    router = Router(settings, store)
    assert router.reload()
    # The admin's next edit does not validate, and lands before the forwarder first looks: the forwarder
    # must still know "archive" (reading the file itself, it knew no destination and sent nothing).
    rules_file.write_text(yaml.safe_dump(good).replace("forward:", "foward:"))
    assert not router.reload()
    files = write_series(tmp_path / "in", 3, rows=32, columns=32)
    queue(store, files[:2], "archive")
    stop = Stop()
    stage = threading.Thread(target=run_forwarder, args=(settings,), kwargs={"stop": stop}, daemon=True)
    stage.start()
    try:
        wait_for(lambda: states(store) == [OutboxState.SENT] * 2 or states(store), timeout=60, every=0.1)
        # A fixed edit that renames the destination: once the router runs it, so does the forwarder.
        renamed = yaml.safe_dump(good).replace("archive", "archive_b")
        rules_file.write_text(renamed)
        assert router.reload()
        queue(store, files[2:], "archive_b")
        wait_for(lambda: states(store) == [OutboxState.SENT] * 3 or states(store), timeout=60, every=0.1)
        assert len([f for f in storescp.folder.iterdir() if f.is_file()]) == 3
        # Loads are the router's to record (loaded, refused, loaded): the forwarder adds no row.
        with store.read() as s:
            loads = s.execute(select(RulesLoad.ok, RulesLoad.text).order_by(RulesLoad.id)).all()
        assert [ok for ok, _ in loads] == [True, False, True]
        assert loads[0].text == yaml.safe_dump(good) and loads[1].text is None and loads[2].text == renamed
    finally:
        stop.set()
        stage.join(30)
        store.dispose()
    assert not stage.is_alive()
