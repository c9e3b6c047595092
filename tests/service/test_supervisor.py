"""The supervisor: stages started, a dead one replaced, all stopped within a bound, none outliving it.

The first tests drive ``Supervisor`` itself with stages that only wait (or
refuse to stop); the rest run ``nnrouter serve`` with every stage it has
(a worker, the router, the forwarder, the worklist stage, the cleaner)
against real peers, and signal it as systemd, a terminal or an operator
would.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import children_of, needs

from nnrouter.core.config import Settings
from nnrouter.service.lifecycle import Stop
from nnrouter.service.supervisor import KILL_S, STOP_S, Supervisor, stages
from nnrouter.testing import peers
from nnrouter.testing.stages import spawn_idle, spawn_stubborn

# --- processes, from /proc ----------------------------------------------------------


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


def port_open(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def kill_all(pids: list[int]) -> None:
    """Leave nothing to the rest of the suite, even on failure."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# --- the unit ----------------------------------------------------------------------


def test_which_stages_serve_runs_follows_the_settings(tmp_path):
    rules = tmp_path / "rules.yaml"
    bare = Settings(
        workers={"count": 0}, orders={"procedures": None}, retention={"enabled": False}, http={"enabled": False}
    )
    assert stages(bare) == {}
    full = Settings(
        workers={"count": 2},
        routing={"rules": str(rules)},
        orders={"worklist": {"host": "127.0.0.1", "port": 104, "ae_title": "RIS"}},
    )
    assert sorted(stages(full)) == [
        "nnrouter-cleaner",
        "nnrouter-forwarder",
        "nnrouter-router",
        "nnrouter-web",  # the console: on by default, on loopback
        "nnrouter-worker-0",
        "nnrouter-worker-1",
        "nnrouter-worklist",
    ]
    # Orders checked without rules: a router, nothing to forward.
    alone = Settings(workers={"count": 0}, retention={"enabled": False}, http={"enabled": False})
    assert sorted(stages(alone)) == ["nnrouter-router"]


def test_a_stage_killed_is_replaced_and_stop_ends_every_stage():
    died: list[str] = []
    sup = Supervisor(Settings(), {"a": spawn_idle, "b": spawn_idle}, on_death=lambda proc: died.append(proc.name))
    sup.start()
    try:
        first = sup.alive()
        assert sorted(first) == ["a", "b"]
        os.kill(first["a"], signal.SIGKILL)
        assert wait_gone([first["a"]], 10) == []
        assert sup.replace_dead() == ["a"]
        assert died == ["a"]
        now = sup.alive()
        assert sorted(now) == ["a", "b"] and now["a"] != first["a"] and now["b"] == first["b"]
        assert sup.replace_dead() == []  # nothing else died
        assert sup.stop() == []  # all went on SIGTERM, none had to be killed
        assert wait_gone(list(now.values()), 2) == []
    finally:
        kill_all([p.pid for p in sup.procs.values() if p.pid])


def test_nothing_is_replaced_once_stopping():
    sup = Supervisor(Settings(), {"a": spawn_idle})
    sup.start()
    try:
        pid = sup.alive()["a"]
        stop = Stop()
        stop.set()
        os.kill(pid, signal.SIGTERM)  # as a SIGTERM to the whole group does
        assert wait_gone([pid], 10) == []
        assert sup.replace_dead(stop) == [] and sup.alive() == {}
    finally:
        kill_all([p.pid for p in sup.procs.values() if p.pid])


def test_a_stage_that_ignores_sigterm_is_killed_at_the_deadline():
    sup = Supervisor(Settings(), {"idle": spawn_idle, "stuck": spawn_stubborn}, stop_s=2.0, kill_s=2.0)
    sup.start()
    try:
        pids = sup.alive()
        time.sleep(1.0)  # let the stubborn one get past its start and ignore SIGTERM
        assert sup.stop() == ["stuck"]
        assert wait_gone(list(pids.values()), 2) == []
    finally:
        kill_all([p.pid for p in sup.procs.values() if p.pid])


# --- nnrouter serve with every stage ----------------------------------------------

STAGES = ("nnrouter-worker-0", "nnrouter-router", "nnrouter-forwarder", "nnrouter-worklist", "nnrouter-cleaner")
STARTED = ('"worker_started"', '"router_started"', '"forwarder_started"', '"worklist_started"', '"cleaner_started"')


@pytest.fixture
def full_node(node_factory, tmp_path):  # type: ignore[no-untyped-def]
    """A node configured for every stage, its peers running: a storescp destination, a wlmscpfs worklist."""
    archive = peers.StoreSCP(tmp_path / "archive").start()
    wl = peers.Wlmscpfs(tmp_path / "worklists").start()
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        yaml.safe_dump(
            {
                "destinations": [
                    {"name": "archive", "ae_title": archive.aet, "host": "127.0.0.1", "port": archive.port}
                ],
                "rules": [{"name": "all", "then": {"forward": ["archive"]}}],
            }
        )
    )
    node = node_factory(
        settings={
            "workers": {"count": 1, "poll_ms": 100},
            "routing": {"rules": str(rules), "tick_s": 0.3},
            "orders": {"worklist": {"host": "127.0.0.1", "port": wl.port, "ae_title": wl.aet}},
        }
    )
    yield node
    archive.stop()
    wl.stop()


def serve_in_own_group(node: peers.Node) -> subprocess.Popen:
    """``nnrouter serve`` as systemd or a container runtime runs it: leader of its own process group."""
    node.write_config()
    node.cli("db", "upgrade")
    with open(node.log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nnrouter", "serve", "--config", str(node.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    node.proc = proc
    peers.wait_port(node.port, proc=proc)
    return proc


def events(node: peers.Node, name: str) -> list[dict]:
    out = []
    for line in node.log_lines():
        if f'"{name}"' in line:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def stage_pids(node: peers.Node) -> dict[str, int]:
    """The latest pid of each stage, from the supervisor's log."""
    return {e["stage"]: e["pid"] for e in events(node, "stage_started")}


def wait_started(node: peers.Node, timeout: float = 120) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = node.log_lines()
        if all(any(e in line for line in lines) for e in STARTED):
            pids = stage_pids(node)
            assert sorted(pids) == sorted(STAGES)
            return pids
        time.sleep(0.2)
    pytest.fail(f"not started: {node.log_lines()[-5:]}")


@pytest.mark.slow
@needs("storescp", "wlmscpfs")
def test_serve_replaces_a_stage_killed_by_kill_9(full_node):
    node = full_node.start()
    try:
        pids = wait_started(node)
        os.kill(pids["nnrouter-forwarder"], signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and stage_pids(node)["nnrouter-forwarder"] == pids["nnrouter-forwarder"]:
            time.sleep(0.2)
        now = stage_pids(node)
        assert now["nnrouter-forwarder"] != pids["nnrouter-forwarder"], "the killed forwarder was not replaced"
        assert now["nnrouter-forwarder"] in children_of(node.proc.pid)
        assert {k: v for k, v in now.items() if k != "nnrouter-forwarder"} == {
            k: v for k, v in pids.items() if k != "nnrouter-forwarder"
        }  # the others went on
        assert any(e["worker"] == "nnrouter-forwarder" for e in events(node, "worker_died"))
    finally:
        kids = children_of(node.proc.pid)
        rc = node.stop()
        kill_all(wait_gone(kids, 5))
    assert rc == 0


@pytest.mark.slow
@needs("storescp", "wlmscpfs")
@pytest.mark.parametrize(
    "sig, to", [(signal.SIGTERM, "pid"), (signal.SIGTERM, "group"), (signal.SIGINT, "pid"), (signal.SIGINT, "group")]
)
def test_serve_stops_every_stage_on_a_signal_to_it_or_its_group(full_node, sig, to):
    proc = serve_in_own_group(full_node)
    kids: list[int] = []
    try:
        pids = wait_started(full_node)
        kids = children_of(proc.pid)
        assert set(pids.values()) <= set(kids)
        if to == "group":
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        rc = proc.wait(STOP_S + KILL_S + 5)  # the bound the supervisor promises, and a margin for the exit itself
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        kill_all(wait_gone(kids, 2))
    assert rc == 0
    assert events(full_node, "stopped")[-1]["killed"] == []  # every stage stopped on its own
    assert wait_gone(kids, 2) == []
    assert not events(full_node, "worker_died"), "a stage stopped by the signal was taken for dead and replaced"


@pytest.mark.slow
@needs("storescp", "wlmscpfs")
def test_every_stage_exits_when_serve_is_killed_by_kill_9(full_node):
    node = full_node.start()
    pids = wait_started(node)
    kids = children_of(node.proc.pid)
    assert set(pids.values()) <= set(kids)
    node.kill9()
    left = wait_gone(kids, 15)  # the parent watch's grace (10 s) is the longest path
    kill_all(left)
    assert left == [], "stages of the killed serve live on"


@pytest.mark.slow
def test_an_instance_under_way_at_sigterm_is_stored_and_acknowledged_before_serve_exits(node_factory, tmp_path):
    """A modality in the middle of a C-STORE when serve is told to stop gets its answer, then the association ends."""
    from pydicom import dcmread
    from pynetdicom import AE, evt
    from pynetdicom.pdu import P_DATA_TF
    from sqlalchemy import select

    from nnrouter.core.store import Instance, Store
    from nnrouter.testing.synthetic import write_series

    (f,) = write_series(tmp_path / "in", 1, rows=64, columns=64)
    ds = dcmread(f)
    node = node_factory(
        settings={"workers": {"count": 0}, "orders": {"procedures": None}, "retention": {"enabled": False}}
    )
    proc = serve_in_own_group(node)
    started, go = threading.Event(), threading.Event()

    def slow_modality(event: evt.Event) -> None:
        # The command has gone out; the data set waits: the instance is under way when the signal comes.
        if isinstance(event.pdu, P_DATA_TF) and not started.is_set():
            started.set()
            go.wait(60)

    ae = AE(ae_title="SLOWMOD")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate(
        "127.0.0.1", node.port, ae_title=node.ae_title, evt_handlers=[(evt.EVT_PDU_SENT, slow_modality)]
    )
    assert assoc.is_established
    result: dict = {}
    sender = threading.Thread(target=lambda: result.update(rsp=assoc.send_c_store(ds)), daemon=True)
    sender.start()
    try:
        assert started.wait(30)
        proc.send_signal(signal.SIGTERM)
        # Wait until serve has stopped listening: a serve that does not wait for the instance exits right after.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and port_open(node.port):
            time.sleep(0.05)
        time.sleep(1.0)
        go.set()
        sender.join(30)
        rc = proc.wait(STOP_S + KILL_S + 5)
    finally:
        go.set()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if assoc.is_established:
            assoc.abort()
    rsp = result.get("rsp")
    assert rsp is not None and "Status" in rsp and int(rsp.Status) == 0x0000, rsp
    assert rc == 0
    # Then the association was ended by serve, not left to hang.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and assoc.is_established:
        time.sleep(0.05)
    assert assoc.is_aborted
    store = Store(node.db_url)
    try:
        with store.read() as s:
            assert s.execute(select(Instance.sop_instance_uid)).scalars().all() == [str(ds.SOPInstanceUID)]
    finally:
        store.dispose()
    assert events(node, "associations_ended")[-1] == {**events(node, "associations_ended")[-1], "finished": 1, "cut": 0}


@pytest.mark.slow
def test_an_idle_association_a_modality_keeps_open_does_not_hold_serve_up(node_factory):
    """Modalities keep associations open between studies; serve ends them rather than wait for their timeout."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    node = node_factory(
        settings={
            "workers": {"count": 0},
            "orders": {"procedures": None},
            "retention": {"enabled": False},
            "dicom": {"network_timeout_s": 600},
        }
    )
    proc = serve_in_own_group(node)
    ae = AE(ae_title="IDLEMOD")
    ae.add_requested_context(Verification)
    ae.network_timeout = 600
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    try:
        assert assoc.is_established
        assert int(assoc.send_c_echo().Status) == 0x0000
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(STOP_S + KILL_S + 5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if assoc.is_established:
            assoc.abort()
    assert rc == 0
    assert events(node, "associations_ended")[-1]["idle"] == 1
