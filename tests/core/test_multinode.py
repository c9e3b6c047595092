"""Several nodes on one database, each with its own spool: a node works only on the files it holds.

An instance row's path is readable only on the node that received it. A node
that claimed another's instance would find no file: classify would mark it
undecodable, forward would retry it until it is dead. The row names its node
(``node.name``); classify and forward claim only their own node's rows and
the unnamed ones from before nodes had names, unless ``storage.shared``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import subprocess
import sys
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from alembic import command
from conftest import _new_pg_database, needs
from dicomfiles import wait_for
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import inspect, select, text, update

from nnrouter.core.config import Settings
from nnrouter.core.spool import Spool
from nnrouter.core.store import (
    Instance,
    InstanceState,
    Outbox,
    OutboxState,
    RoutingDecision,
    Series,
    Store,
    Study,
    utcnow,
)
from nnrouter.dicom.receive import Header, Receiver
from nnrouter.pixels.classify import Queue
from nnrouter.routing.forward import Forwarder
from nnrouter.service.clean import Cleaner
from nnrouter.testing import peers
from nnrouter.testing.synthetic import write_series

CR = "1.2.840.10008.5.1.4.1.1.1.1"
EXPLICIT = "1.2.840.10008.1.2.1"


@pytest.fixture
def store(database_url):  # type: ignore[no-untyped-def]
    s = Store(database_url)
    s.upgrade()
    yield s
    s.dispose()


def _instances(
    store: Store, spool: Path, nodes: list[str | None], *, state: str = InstanceState.RECEIVED, days_ago: float = 0
) -> dict[int, str | None]:
    """One study with an instance (and its file) per entry of ``nodes``; the ids and the node each names."""
    then = utcnow() - dt.timedelta(days=days_ago)
    out: dict[int, str | None] = {}
    study_uid, series_uid = generate_uid(), generate_uid()
    with store.write() as s:
        study = Study(study_uid=study_uid, created_at=then, last_received_at=then)
        series = Series(study=study, series_uid=series_uid, modality="DX", created_at=then)
        s.add_all([study, series])
        for node in nodes:
            sop, data = generate_uid(), os.urandom(256)
            path = Spool(spool).path_for(study_uid, series_uid, sop, 1)
            size = Spool(spool).keep([data], path)
            inst = Instance(
                series=series,
                sop_instance_uid=sop,
                sop_class_uid=CR,
                transfer_syntax_uid=EXPLICIT,
                path=str(path),
                size_bytes=size,
                sha256=hashlib.sha256(data).hexdigest(),
                state=state,
                node=node,
                received_at=then,
                updated_at=then,
            )
            s.add(inst)
            s.flush()
            out[inst.id] = node
    return out


def _of(ids: dict[int, str | None], *nodes: str | None) -> set[int]:
    return {i for i, n in ids.items() if n in nodes}


# --- the claims, on SQLite and PostgreSQL -------------------------------------------


def test_classify_claims_only_this_nodes_and_unnamed_instances(store, tmp_path):
    ids = _instances(store, tmp_path / "spool", ["a", "a", "b", "b", None])
    a = Queue(store, "a:1", lease_s=60, max_attempts=3, node="a")
    b = Queue(store, "b:1", lease_s=60, max_attempts=3, node="b")
    assert {c.id for c in a.claim(10)} == _of(ids, "a", None)
    assert a.claim(10) == []  # b's are there, and not a's to take
    got_b = b.claim(10)
    assert {c.id for c in got_b} == _of(ids, "b")
    # b's claims run out (b died): only a node named b retries them.
    with store.write() as s:
        s.execute(
            update(Instance)
            .where(Instance.id.in_(_of(ids, "b")))
            .values(lease_until=utcnow() - dt.timedelta(seconds=1))
        )
    assert a.claim(10) == []
    (retry,) = b.claim(10)
    assert retry.retry and retry.id in _of(ids, "b")


def test_a_shared_spool_lets_any_node_claim_any_instance(store, tmp_path):
    ids = _instances(store, tmp_path / "spool", ["a", "b", None])
    shared = Queue(store, "c:1", lease_s=60, max_attempts=3, node=None)
    assert {c.id for c in shared.claim(10)} == set(ids)


def _queued(store: Store, ids: dict[int, str | None], destination: str = "pacs") -> None:
    with store.write() as s:
        for i in ids:
            s.execute(update(Instance).where(Instance.id == i).values(state=InstanceState.DECODED))
            s.add(
                Outbox(
                    instance_id=i,
                    destination=destination,
                    rule="all",
                    state=OutboxState.PENDING,
                    next_attempt_at=utcnow() - dt.timedelta(seconds=1),
                )
            )


def _forwarder(store: Store, **settings: dict) -> Forwarder:
    return Forwarder(Settings(database={"url": store.url}, **settings), store, worker_id="fwd")


def test_forward_claims_only_deliveries_of_this_nodes_and_unnamed_instances(store, tmp_path):
    ids = _instances(store, tmp_path / "spool", ["a", "a", "b", None])
    _queued(store, ids)
    a = _forwarder(store, node={"name": "a"})
    b = _forwarder(store, node={"name": "b"})
    now = utcnow()
    assert {j.instance_id for j in a.claim("pacs", 10, now)} == _of(ids, "a", None)
    # What is left waiting is b's: due now for b, for a only its own leases' end.
    assert a.due_in("pacs", now) > 0
    assert b.due_in("pacs", now) == 0.0
    assert a.claim("pacs", 10, now) == []
    assert {j.instance_id for j in b.claim("pacs", 10, now)} == _of(ids, "b")
    # Every lease runs out (both died): b takes back its own, never a's (the unnamed one is anyone's).
    later = now + dt.timedelta(seconds=a.settings.routing.lease_s + 1)
    assert {j.instance_id for j in b.claim("pacs", 10, later)} == _of(ids, "b", None)
    assert {j.instance_id for j in a.claim("pacs", 10, later)} == _of(ids, "a")


def test_forward_on_a_shared_spool_takes_any_delivery(store, tmp_path):
    ids = _instances(store, tmp_path / "spool", ["a", "b"])
    _queued(store, ids)
    shared = _forwarder(store, node={"name": "c"}, storage={"shared": True})
    assert {j.instance_id for j in shared.claim("pacs", 10, utcnow())} == set(ids)


def test_the_receiver_records_its_node_name(store, tmp_path):
    settings = Settings(node={"name": "node-7"}, storage={"path": tmp_path / "spool"})
    receiver = Receiver(settings, store, Spool(tmp_path / "spool"))
    header = Header(generate_uid(), generate_uid(), generate_uid(), CR, {}, {"modality": "DX"}, {})
    kept = receiver.keep(header, b"META", memoryview(b"DATA"), {"transfer_syntax_uid": EXPLICIT})
    with store.read() as s:
        assert s.get(Instance, kept.instance_id).node == "node-7"


def test_node_name_defaults_to_the_host_name_and_is_checked():
    import socket

    assert Settings().node.name == socket.gethostname()
    assert Settings(node={"name": None}).node.name == socket.gethostname()
    with pytest.raises(ValueError, match=r"node\.name"):
        Settings(node={"name": "x" * 65})
    with pytest.raises(ValueError, match="control characters"):
        Settings(node={"name": "a\tb"})


def test_rows_from_before_the_migration_belong_to_any_node(database_url, tmp_path):
    """An install upgraded from 0006 keeps working: its rows name no node, so every node may claim them."""
    store = Store(database_url)
    try:
        command.upgrade(store._alembic(), "0006")
        now = utcnow()
        with store.engine.begin() as conn:
            conn.execute(
                text("INSERT INTO study (study_uid, created_at, last_received_at) VALUES ('1.2.3', :t, :t)"), {"t": now}
            )
            conn.execute(
                text("INSERT INTO series (study_id, series_uid, created_at) VALUES (1, '1.2.3.1', :t)"), {"t": now}
            )
            conn.execute(
                text(
                    "INSERT INTO instance (series_id, sop_instance_uid, version, sop_class_uid, transfer_syntax_uid, path, "
                    "size_bytes, sha256, state, received_at, updated_at, attempts) "
                    "VALUES (1, '1.2.3.1.1', 1, :cr, :ts, '/nowhere', 1, 'x', 'received', :t, :t, 0)"
                ),
                {"cr": CR, "ts": EXPLICIT, "t": now},
            )
        store.upgrade()
        with store.read() as s:
            assert s.execute(select(Instance.node)).scalar_one() is None
        (claim,) = Queue(store, "n:1", lease_s=60, max_attempts=3, node="any-node").claim(10)
        assert claim.sop_instance_uid == "1.2.3.1.1"
        with store.engine.connect() as conn:
            assert "node" in {c["name"] for c in inspect(conn).get_columns("instance")}
    finally:
        store.dispose()


def test_a_short_spool_cleans_early_only_studies_held_here(tmp_path):
    """A node short of space frees its own spool; another node's delivered studies are not its to cut short."""
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    settings = Settings(
        node={"name": "a"},
        database={"url": url},
        routing={"rules": tmp_path / "rules.yaml"},
        storage={"path": tmp_path / "spool", "derived_path": tmp_path / "derived", "min_free_mb": 0},
        retention={"clean_below_free_mb": 10**9},
    )  # always short
    store = Store(url)
    store.upgrade()
    try:
        studies = {}
        for node in ("a", "b"):
            ids = _instances(store, tmp_path / "spool", [node, node], state=InstanceState.DECODED, days_ago=1)
            with store.write() as s:
                study_id = s.get(Instance, next(iter(ids))).series.study_id
                for i in ids:
                    s.add(
                        Outbox(instance_id=i, destination="pacs", rule="all", state=OutboxState.SENT, sent_at=utcnow())
                    )
                s.add(
                    RoutingDecision(
                        study_id=study_id,
                        rules_digest="x",
                        outcomes=[],
                        hold=False,
                        discard=False,
                        deliveries=[{"destination": "pacs", "rule": "all", "coerce": None}],
                    )
                )
                studies[node] = s.get(Study, study_id).study_uid
        done = Cleaner(settings, store).run()
        assert [c.study_uid for c in done.studies] == [studies["a"]]
        assert done.kept == {"kept_delivered": 1}
    finally:
        store.dispose()


# --- two real nodes on one PostgreSQL ------------------------------------------------


def _log_events(node: peers.Node, event: str) -> list[dict]:
    """The node's JSON log records of one event; its stage processes share the file, so two may share a line."""
    text = "\n".join(node.log_lines())
    decoder, out, i = json.JSONDecoder(), [], 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        try:
            rec, i = decoder.raw_decode(text, i)
        except ValueError:  # not JSON (a traceback): on to the next line
            nl = text.find("\n", i)
            i = len(text) if nl < 0 else nl + 1
            continue
        if isinstance(rec, dict) and rec.get("event") == event:
            out.append(rec)
    return out


# Run a command in a mount namespace of its own (as root, or in a user namespace where allowed).
_UNSHARE = (
    ["unshare", "--mount", "--propagation", "private"],
    ["unshare", "--user", "--map-root-user", "--mount", "--propagation", "private"],
)
# sh -c SCRIPT sh OWN AT CMD...: bind OWN over AT, then become CMD.
_BIND_AND_RUN = 'mount --bind "$1" "$2" && shift 2 && exec "$@"'


def _isolation(tmp: Path) -> list[str] | None:
    """How to give each node a spool that the others cannot see at the same path; None where this machine cannot."""
    own, at = tmp / "probe-own", tmp / "probe-at"
    own.mkdir(), at.mkdir()
    (own / "here").touch()
    for prefix in _UNSHARE:
        try:
            res = subprocess.run(
                [*prefix, "sh", "-c", _BIND_AND_RUN, "sh", str(own), str(at), "test", "-e", str(at / "here")],
                check=False,
                capture_output=True,
                timeout=30,
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if res.returncode == 0:
            return prefix
    return None


@dataclass
class OwnMachine(peers.Node):
    """A node as on a machine of its own: its spool folder is mounted at ``spool_at``, a path every node names.

    That is ``deploy/compose.yaml``: each node's own volume at one path. A
    row then names a file by a path that, on another node, holds no such
    file. Without a mount namespace (``isolate`` None) each node keeps its
    spool in its own folder under its own path instead.
    """

    spool_at: Path | None = None
    isolate: list[str] | None = None

    def start(self, upgrade: bool = True) -> OwnMachine:
        if self.isolate is not None and self.spool_at is not None:
            self.settings.setdefault("storage", {})["path"] = str(self.spool_at)
        self.write_config()
        if upgrade:
            self.cli("db", "upgrade")
        serve = [sys.executable, "-m", "nnrouter", "serve", "--config", str(self.config_path)]
        if self.isolate is not None and self.spool_at is not None:
            self.spool.mkdir(parents=True, exist_ok=True)
            self.spool_at.mkdir(parents=True, exist_ok=True)
            serve = [*self.isolate, "sh", "-c", _BIND_AND_RUN, "sh", str(self.spool), str(self.spool_at), *serve]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                serve, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
            )
        peers.wait_port(self.port, proc=self.proc)
        return self


@pytest.mark.slow
@needs("storescu", "storescp")
def test_two_nodes_on_one_postgresql_each_classify_and_forward_what_they_hold(postgres_server, tmp_path):
    url = _new_pg_database(postgres_server)
    scp = peers.StoreSCP(tmp_path / "pacs").start(["+uf"])  # +uf: a second copy of an instance is a second file
    nodes: dict[str, OwnMachine] = {}
    isolate = _isolation(tmp_path)
    try:
        rules_file = tmp_path / "routes.yaml"
        rules_file.write_text(
            yaml.safe_dump(
                {
                    "settings": {"quiet_s": 0.5},
                    # Quick retries: on a node that took another's delivery the failure shows as attempts, not a timeout.
                    "destinations": [
                        {
                            "name": "archive",
                            "ae_title": scp.aet,
                            "host": "127.0.0.1",
                            "port": scp.port,
                            "retry": {"first_delay_s": 0.2, "multiplier": 1, "max_retries": 20},
                        }
                    ],
                    # A tag test over every image and the SR's evidence need the headers of all the
                    # study's images, also those held by the other node.
                    "rules": [
                        {
                            "name": "every image a DX",
                            "when": {"tag": {"keyword": "Modality", "equals": "DX", "of": "all"}},
                            "then": {"forward": ["archive"], "report": True},
                        }
                    ],
                }
            )
        )
        for name in ("node-a", "node-b"):
            nodes[name] = OwnMachine(
                tmp_path / name,
                database_url=url,
                spool_at=tmp_path / "spool",
                isolate=isolate,
                settings={
                    "node": {"name": name},
                    "workers": {"count": 1, "max_wait_ms": 0, "poll_ms": 50},
                    "routing": {"rules": str(rules_file), "tick_s": 0.2},
                    "retention": {"enabled": False},
                },
            ).start()
        # A study for each node, and one whose images reach both (a balancer in front).
        mixed = write_series(tmp_path / "mixed", 8, rows=64, columns=64)
        sent = {
            "node-a": write_series(tmp_path / "a", 12, rows=64, columns=64) + mixed[:4],
            "node-b": write_series(tmp_path / "b", 12, rows=64, columns=64) + mixed[4:],
        }
        held = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID): name for name, fs in sent.items() for f in fs}
        results: dict[str, subprocess.CompletedProcess] = {}

        def send(name: str) -> None:
            results[name] = peers.storescu(nodes[name].port, sent[name])

        threads = [threading.Thread(target=send, args=(name,)) for name in sent]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for name, res in results.items():
            assert res.stderr.count("Received Store Response (Success)") == len(sent[name]), (name, res.stderr[-2000:])

        store = Store(url)
        try:

            def outbox() -> list[tuple[Outbox, Instance]]:
                with store.read() as s:
                    return [(o, i) for o, i in s.execute(select(Outbox, Instance).join(Instance)).all()]

            def decided() -> list[RoutingDecision]:
                with store.read() as s:
                    return list(s.execute(select(RoutingDecision)).scalars())

            wait_for(lambda: len(decided()) == 3 or len(decided()), timeout=180)
            # The three studies, the split one too, matched on every image's header.
            assert sorted(len(d.deliveries) for d in decided()) == [1, 1, 1], [d.outcomes for d in decided()]
            done = (OutboxState.SENT, OutboxState.DEAD)
            wait_for(
                lambda: (
                    (len(outbox()) == len(held) + 3 and all(o.state in done for o, _ in outbox()))
                    or sorted(Counter(o.state for o, _ in outbox()).items())
                ),
                timeout=180,
            )
            rows = outbox()
            with store.read() as s:
                instances = s.execute(select(Instance)).scalars().all()
        finally:
            store.dispose()
        reports = [i for i in instances if i.state == InstanceState.CREATED]
        instances = [i for i in instances if i.state != InstanceState.CREATED]
        assert len(reports) == 3
        # Every row names the node that received it.
        assert {i.sop_instance_uid: i.node for i in instances} == held
        # Classified once, by its node: none taken by a node without the file.
        assert [
            (i.sop_instance_uid, i.state, i.state_reason) for i in instances if i.state != InstanceState.DECODED
        ] == []
        for name, node in nodes.items():
            looked = sum(rec["size"] for rec in _log_events(node, "batch"))
            assert looked == list(held.values()).count(name), name
            assert not _log_events(node, "spool_file_unreadable"), name
        # Delivered once, by its node, at the first try; each SR by the node that made it.
        assert [
            (i.sop_instance_uid, o.state, o.attempts, o.last_error)
            for o, i in rows
            if (o.state, o.attempts, o.last_error) != (OutboxState.SENT, 1, None)
        ] == []
        made_by = Counter(r.node for r in reports)
        for name, node in nodes.items():
            assert (
                sum(rec.get("sent", 0) for rec in _log_events(node, "forwarded"))
                == list(held.values()).count(name) + made_by[name]
            ), name
        arrived = [dcmread(f, stop_before_pixels=True) for f in scp.folder.iterdir() if f.is_file()]
        got = Counter(str(ds.SOPInstanceUID) for ds in arrived if ds.Modality != "SR")
        assert got == Counter(list(held)), "each instance arrives exactly once"
        # The split study's SR has the evidence of all its eight images, four from each node.
        mixed_study = str(dcmread(mixed[0], stop_before_pixels=True).StudyInstanceUID)
        (sr,) = [ds for ds in arrived if ds.Modality == "SR" and ds.StudyInstanceUID == mixed_study]
        evidence = {
            str(ref.ReferencedSOPInstanceUID)
            for study in sr.CurrentRequestedProcedureEvidenceSequence
            for series in study.ReferencedSeriesSequence
            for ref in series.ReferencedSOPSequence
        }
        assert evidence == {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in mixed}
        # Each file is in the spool of the node that holds it, and only there.
        for name, node in nodes.items():
            here = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in node.spool.rglob("*.dcm")}
            mine = {r.sop_instance_uid for r in reports if r.node == name}
            assert here == {uid for uid, n in held.items() if n == name} | mine, name
    finally:
        for node in nodes.values():
            node.stop()
        scp.stop()
