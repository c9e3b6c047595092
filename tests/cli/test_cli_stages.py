"""A stage run alone from the command line: `nnrouter forward` delivers the outbox and stops on SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import yaml
from conftest import needs
from dicomfiles import by_sop_uid
from pydicom import dcmread
from routing.test_forward import queue
from sqlalchemy import select

from nnrouter.core import config
from nnrouter.core.store import Outbox, OutboxState, Store
from nnrouter.routing.router import Router
from nnrouter.testing.synthetic import write_series

pytestmark = needs("storescp")


def test_forward_delivers_the_outbox_and_stops_on_sigterm(node_factory, storescp, tmp_path):
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(
        yaml.safe_dump(
            {
                "destinations": [
                    {"name": "pacs", "ae_title": storescp.aet, "host": "127.0.0.1", "port": storescp.port}
                ],
                "rules": [{"name": "all", "then": {"forward": ["pacs"]}}],
            }
        )
    )
    node = node_factory(settings={"routing": {"rules": str(rules_file), "tick_s": 0.2}})
    node.write_config()
    node.cli("db", "upgrade")
    files = write_series(node.spool / "in", 3, rows=32, columns=32)
    store = Store(node.db_url)
    try:
        # The forwarder delivers with the rule version this node's router loaded (kept in the store).
        assert Router(config.load(node.config_path), store).reload()
        queue(store, files, ["pacs"])

        with open(tmp_path / "forward.log", "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "nnrouter", "forward", "--config", str(node.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            deadline, states = time.monotonic() + 60, []
            while time.monotonic() < deadline and proc.poll() is None:
                with store.read() as s:
                    states = list(s.execute(select(Outbox.state)).scalars())
                if states == [OutboxState.SENT] * 3:
                    break
                time.sleep(0.2)
            assert states == [OutboxState.SENT] * 3, (tmp_path / "forward.log").read_text()[-3000:]
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    finally:
        store.dispose()
    assert sorted(by_sop_uid(storescp.folder)) == sorted(str(dcmread(f).SOPInstanceUID) for f in files)

    # What an operator sees of it, and the clean-up, as JSON.
    sent = json.loads(node.cli("outbox", "list", "--state", "sent", "--json").stdout)
    assert [(r["destination"], r["state"]) for r in sent] == [("pacs", "sent")] * 3
    assert json.loads(node.cli("outbox", "retry", "--json").stdout) == {
        "queued": 0,
        "states": ["dead", "failed", "held"],
        "ids": [],
    }
    purged = json.loads(node.cli("outbox", "purge", "--json").stdout)
    assert purged["removed"] == 3 and sorted(purged["ids"]) == sorted(r["id"] for r in sent)
    assert json.loads(node.cli("outbox", "list", "--json").stdout) == []
