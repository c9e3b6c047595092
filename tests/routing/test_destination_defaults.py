"""One home for each routing default: the calling AE title is dicom.ae_title unless a destination names its own.

A site that renames nnrouter (``dicom.ae_title``) renames it towards its
destinations too; before, each destination said NNROUTER unless it was told
otherwise, a second default for the same title.
"""

from __future__ import annotations

import threading
from pathlib import Path

import yaml
from conftest import needs
from dicomfiles import wait_for
from pydicom import dcmread
from test_forwarder_stage import queue, states

from nnrouter.core.config import Dicom, Settings
from nnrouter.core.store import OutboxState, Store
from nnrouter.routing import rules
from nnrouter.routing.forward import run_forwarder
from nnrouter.routing.router import Router
from nnrouter.service.lifecycle import Stop
from nnrouter.testing.synthetic import write_series


def _rules_file(tmp_path: Path, destinations: list[dict]) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "destinations": destinations,
                "rules": [{"name": "all", "then": {"forward": [d["name"] for d in destinations]}}],
            }
        )
    )
    return path


def test_a_destination_without_calling_ae_takes_ours(tmp_path):
    path = _rules_file(
        tmp_path,
        [
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104},
            {"name": "ai", "ae_title": "AI", "host": "127.0.0.1", "port": 105, "calling_ae": "TO_AI"},
            {"name": "old", "ae_title": "OLD", "host": "127.0.0.1", "port": 106, "calling_ae": None},
        ],
    )
    loaded = rules.load_rules(path, calling_ae="SITE_ROUTER")
    assert [d.calling_ae for d in loaded.destinations] == ["SITE_ROUTER", "TO_AI", "SITE_ROUTER"]
    # Without a configuration (rules check of a file alone): dicom.ae_title's own default.
    assert rules.load_rules(path).destination("pacs").calling_ae == Dicom().ae_title


def test_a_bad_calling_ae_is_still_refused(tmp_path):
    import pytest

    from nnrouter.core.yamlfile import FileProblems

    path = _rules_file(
        tmp_path, [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104, "calling_ae": "X" * 17}]
    )
    with pytest.raises(FileProblems, match=r"destinations\[0\]\.calling_ae: an AE title has 1 to 16 characters"):
        rules.load_rules(path, calling_ae="SITE_ROUTER")


def test_without_rules_the_quiet_period_is_the_rule_files_default(tmp_path):
    db = f"sqlite:///{tmp_path / 'db.sqlite'}"
    store = Store(db)
    store.upgrade()
    try:
        router = Router(Settings(database={"url": db}, models={"classifier": None, "detector": None}), store)
        assert router.loaded is None
        assert router.quiet_s({"CR_ROOM1"}) == rules.RouteSettings().quiet_s
    finally:
        store.dispose()


@needs("storescp")
def test_the_forwarder_calls_destinations_by_our_configured_title(tmp_path, storescp):
    """storescp writes the calling AE title it saw into each file's meta header (Source Application Entity Title)."""
    rules_file = _rules_file(
        tmp_path, [{"name": "archive", "ae_title": storescp.aet, "host": "127.0.0.1", "port": storescp.port}]
    )
    db = f"sqlite:///{tmp_path / 'db.sqlite'}"
    settings = Settings(
        dicom={"ae_title": "SITE_ROUTER"},
        database={"url": db},
        storage={"path": str(tmp_path / "spool")},
        models={"classifier": None, "detector": None},
        routing={"rules": str(rules_file), "tick_s": 0.1},
    )
    store = Store(db)
    store.upgrade()
    assert Router(settings, store).reload()  # the forwarder delivers with the version the router loaded
    queue(store, write_series(tmp_path / "in", 1, rows=32, columns=32), "archive")
    stop = Stop()
    stage = threading.Thread(target=run_forwarder, args=(settings,), kwargs={"stop": stop}, daemon=True)
    stage.start()
    try:
        wait_for(lambda: states(store) == [OutboxState.SENT] or states(store), timeout=60, every=0.1)
        (received,) = [f for f in storescp.folder.iterdir() if f.is_file()]
        assert dcmread(received).file_meta.SourceApplicationEntityTitle == "SITE_ROUTER"
    finally:
        stop.set()
        stage.join(30)
        store.dispose()
    assert not stage.is_alive()
