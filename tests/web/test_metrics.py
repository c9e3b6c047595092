"""/metrics: the figures read from a real store (SQLite and PostgreSQL), parsed back with prometheus-client's parser."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import generate_uid
from sqlalchemy import insert

from nnrouter.core import config
from nnrouter.core.store import (
    Audit,
    Flag,
    Instance,
    InstanceState,
    Outbox,
    OutboxState,
    Prediction,
    Series,
    StageBeat,
    Store,
    Study,
    utcnow,
)
from nnrouter.service.health import record_beats
from nnrouter.service.status import node_status
from nnrouter.testing import peers
from nnrouter.web.metrics import render

NODE = "n1"


def _settings(tmp_path, url: str, **storage: Any) -> config.Settings:  # type: ignore[no-untyped-def]
    return config.Settings(
        storage={"path": tmp_path / "spool", "min_free_mb": 0, **storage},
        database={"url": url},
        node={"name": NODE},
    )


@pytest.fixture
def store(database_url):  # type: ignore[no-untyped-def]
    st = Store(database_url)
    st.upgrade()
    yield st
    st.dispose()


def _scrape(settings: config.Settings, store: Store) -> dict[str, dict[tuple, float]]:
    """Each sample by name, keyed by its sorted label pairs."""
    body, content_type = render(settings, store)
    assert content_type == CONTENT_TYPE_LATEST
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def _by(samples: dict[tuple, float], label: str) -> dict[str, float]:
    return {dict(k)[label]: v for k, v in samples.items()}


class Rows:
    """Rows of one study, added with the ORM."""

    def __init__(self, store: Store):
        self.store = store
        with store.write() as s:
            study = Study(study_uid=generate_uid())
            s.add(study)
            s.flush()
            series = Series(study_id=study.id, series_uid=generate_uid())
            s.add(series)
            s.flush()
            self.study_id, self.series_id = study.id, series.id

    def instance(self, **kw: Any) -> int:
        kw.setdefault("state", InstanceState.RECEIVED)
        kw.setdefault("size_bytes", 1)
        with self.store.write() as s:
            inst = Instance(
                series_id=self.series_id,
                sop_instance_uid=generate_uid(),
                sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                path="/spool/x.dcm",
                sha256=generate_uid()[-64:],
                **kw,
            )
            s.add(inst)
            s.flush()
            return inst.id

    def add(self, *rows: Any) -> None:
        with self.store.write() as s:
            s.add_all(rows)

    def prediction(self, label: str, decode_ms: float = 1.0, infer_ms: float = 1.0) -> None:
        self.add(
            Prediction(
                instance_id=self.instance(state=InstanceState.CLASSIFIED),
                model_name="m",
                model_version="1",
                provider="cpu",
                label=label,
                score=0.9,
                top5=[[label, 0.9]],
                decode_ms=decode_ms,
                preprocess_ms=1.0,
                infer_ms=infer_ms,
            )
        )

    def delivery(self, destination: str, state: str, **kw: Any) -> None:
        instance = kw.pop("instance_id", None) or self.instance(state=InstanceState.CLASSIFIED)
        self.add(Outbox(instance_id=instance, destination=destination, rule="all", state=state, **kw))

    def refused(self, calling_ae: str, action: str = "instance_refused") -> None:
        self.add(Audit(source="dicom", actor=calling_ae, action=action, result="refused", detail={}))


def test_counts_by_calling_ae_state_label_kind_and_destination(tmp_path, store):
    r = Rows(store)
    for _ in range(3):
        r.instance(calling_ae="CR1", size_bytes=100)
    r.instance(calling_ae="DX2", size_bytes=1000, state=InstanceState.FAILED)
    r.instance(calling_ae=None, size_bytes=7, state=InstanceState.UNDECODABLE)
    r.instance(calling_ae="", size_bytes=3, state=InstanceState.UNDECODABLE)
    r.instance(calling_ae="NNROUTER", size_bytes=5000, state=InstanceState.CREATED)  # our own SR: not received
    r.refused("CR1")
    r.refused("CR1")
    r.refused("BAD")
    r.refused("CR1", action="login")  # another audit row: not a refusal
    r.prediction("chest_pa")
    r.prediction("chest_pa")
    r.prediction("unknown")  # 3 more instances, classified, no calling AE
    for kind in ("laterality", "laterality", "missing_view"):
        r.add(Flag(study_id=r.study_id, kind=kind, severity="warning", reason="x", evidence={}))
    old, recent = utcnow() - dt.timedelta(seconds=7200), utcnow() - dt.timedelta(seconds=100)
    r.delivery("pacs", OutboxState.SENT, sent_at=utcnow())
    r.delivery("pacs", OutboxState.SENT, sent_at=utcnow())
    r.delivery("pacs", OutboxState.PENDING, created_at=old)
    r.delivery("pacs", OutboxState.FAILED, created_at=recent)
    r.delivery("archive", OutboxState.DEAD, created_at=old)
    r.delivery("archive", OutboxState.HELD, created_at=old)

    m = _scrape(_settings(tmp_path, store.url), store)
    assert m["nnrouter_store_up"] == {(): 1}
    received = {
        (dict(k)["calling_ae"], dict(k)["status"]): v for k, v in m["nnrouter_instances_received_total"].items()
    }
    assert received == {
        ("CR1", "stored"): 3,
        ("DX2", "stored"): 1,
        ("", "stored"): 2 + 3 + 6,  # NULL and "" are one label
        ("CR1", "refused"): 2,
        ("BAD", "refused"): 1,
    }
    assert _by(m["nnrouter_received_bytes_total"], "calling_ae") == {"CR1": 300, "DX2": 1000, "": 7 + 3 + 9}
    assert _by(m["nnrouter_instances"], "state") == {
        "received": 3,
        "failed": 1,
        "undecodable": 2,
        "created": 1,
        "classified": 9,
    }
    assert _by(m["nnrouter_predictions_total"], "label") == {"chest_pa": 2, "unknown": 1}
    assert _by(m["nnrouter_flags"], "kind") == {"laterality": 2, "missing_view": 1}
    deliveries = {(dict(k)["destination"], dict(k)["outcome"]): v for k, v in m["nnrouter_deliveries_total"].items()}
    assert deliveries == {
        ("pacs", "sent"): 2,
        ("pacs", "pending"): 1,
        ("pacs", "failed"): 1,
        ("archive", "dead"): 1,
        ("archive", "held"): 1,
    }
    assert _by(m["nnrouter_outbox_depth"], "destination") == {"pacs": 2, "archive": 0}  # pending + failed
    oldest = _by(m["nnrouter_outbox_oldest_pending_seconds"], "destination")
    assert 7200 <= oldest["pacs"] < 7200 + 60 and oldest["archive"] == 0


def test_histograms_bucket_known_latencies(tmp_path, store):
    r = Rows(store)
    t0 = dt.datetime(2026, 1, 5, 8, 0, tzinfo=dt.UTC)
    for latency_s in (0.003, 0.2, 1.0, 90.0):  # 1.0 lies on a bound: buckets are "less or equal"
        r.instance(request_at=t0, received_at=t0 + dt.timedelta(seconds=latency_s))
    no_request = r.instance(received_at=t0)  # received before request_at was recorded: not in the histogram
    r.prediction("chest_pa", decode_ms=4, infer_ms=100)  # 100 ms lies on the 0.1 s bound
    r.prediction("chest_pa", decode_ms=40, infer_ms=70_000)  # past the last bound: only +Inf
    r.prediction("unknown", decode_ms=4000, infer_ms=30)
    r.delivery("pacs", OutboxState.SENT, instance_id=no_request, sent_at=t0 + dt.timedelta(seconds=30))
    late = r.instance(received_at=t0)
    r.delivery("pacs", OutboxState.SENT, instance_id=late, sent_at=t0 + dt.timedelta(hours=2))
    r.delivery("archive", OutboxState.PENDING, instance_id=late)  # not sent: not in the histogram

    m = _scrape(_settings(tmp_path, store.url), store)

    def buckets(name: str) -> dict[str, float]:
        return _by(m[f"{name}_bucket"], "le")

    receive = buckets("nnrouter_receive_seconds")
    assert (receive["0.005"], receive["0.1"], receive["0.25"], receive["1.0"], receive["60.0"]) == (1, 1, 2, 3, 3)
    assert receive["+Inf"] == 4 and m["nnrouter_receive_seconds_count"] == {(): 4}
    assert m["nnrouter_receive_seconds_sum"][()] == pytest.approx(91.203)

    decode = buckets("nnrouter_decode_seconds")
    assert (decode["0.005"], decode["0.025"], decode["0.05"], decode["2.5"], decode["5.0"], decode["+Inf"]) == (
        1,
        1,
        2,
        2,
        3,
        3,
    )
    assert m["nnrouter_decode_seconds_sum"][()] == pytest.approx(4.044)
    infer = buckets("nnrouter_inference_seconds")
    assert (infer["0.05"], infer["0.1"], infer["60.0"], infer["+Inf"]) == (1, 2, 2, 3)
    assert m["nnrouter_inference_seconds_count"] == {(): 3}
    assert m["nnrouter_inference_seconds_sum"][()] == pytest.approx(70.13)

    delivery = buckets("nnrouter_receipt_to_delivery_seconds")
    assert (delivery["10.0"], delivery["30.0"], delivery["3600.0"], delivery["+Inf"]) == (0, 1, 1, 2)
    assert m["nnrouter_receipt_to_delivery_seconds_sum"][()] == pytest.approx(30 + 7200)


def test_stage_up_and_ready_from_the_supervisors_beats(tmp_path, store):
    settings = _settings(tmp_path, store.url)
    m = _scrape(settings, store)
    assert m["nnrouter_ready"] == {(): 0} and "nnrouter_stage_up" not in m  # no supervisor has reported

    record_beats(store, NODE, {"nnrouter-scp": 11, "nnrouter-classifier": 12})
    record_beats(store, "n2", {"nnrouter-forwarder": None})  # another node's: not ours
    m = _scrape(settings, store)
    assert _by(m["nnrouter_stage_up"], "stage") == {"nnrouter-scp": 1, "nnrouter-classifier": 1}
    assert m["nnrouter_ready"] == {(): 1}

    record_beats(store, NODE, {"nnrouter-scp": 11, "nnrouter-classifier": None, "nnrouter-forwarder": 13})
    with store.write() as s:  # a beat the supervisor stopped refreshing
        s.merge(
            StageBeat(
                node=NODE, stage="nnrouter-forwarder", pid=13, alive=True, beat_at=utcnow() - dt.timedelta(seconds=120)
            )
        )
    m = _scrape(settings, store)
    assert _by(m["nnrouter_stage_up"], "stage") == {
        "nnrouter-scp": 1,
        "nnrouter-classifier": 0,
        "nnrouter-forwarder": 0,
    }
    assert m["nnrouter_ready"] == {(): 0}


def test_a_spool_below_its_floor_is_not_ready_and_its_free_bytes_are_told(tmp_path, store):
    record_beats(store, NODE, {"nnrouter-scp": 11})
    assert _scrape(_settings(tmp_path, store.url), store)["nnrouter_ready"] == {(): 1}
    m = _scrape(_settings(tmp_path, store.url, min_free_mb=10**9), store)
    assert m["nnrouter_ready"] == {(): 0}
    assert 0 < m["nnrouter_spool_free_bytes"][()] < 10**9 * 1024 * 1024


def test_what_back_pressure_measures_is_exported(tmp_path, store):
    """What the hand-written text of nnrouter.service.pressure said: instances waiting, deliveries waiting and how long."""
    r = Rows(store)
    for _ in range(3):
        r.instance()
    for _ in range(2):
        r.delivery("pacs", OutboxState.PENDING, created_at=utcnow() - dt.timedelta(seconds=7200))
    m = _scrape(_settings(tmp_path, store.url), store)
    assert _by(m["nnrouter_instances"], "state")["received"] == 3
    assert m["nnrouter_outbox_depth"] == {(("destination", "pacs"),): 2}
    assert m["nnrouter_outbox_oldest_pending_seconds"][(("destination", "pacs"),)] >= 7200


def test_the_counters_agree_with_nnrouter_status(tmp_path, store):
    r = Rows(store)
    for state in (InstanceState.RECEIVED, InstanceState.RECEIVED, InstanceState.DECODED, InstanceState.CREATED):
        r.instance(state=state)
    for dest, state in [("pacs", "sent"), ("pacs", "sent"), ("pacs", "dead"), ("ai", "held"), ("ai", "sending")]:
        r.delivery(dest, state, sent_at=utcnow() if state == "sent" else None)
    settings = _settings(tmp_path, store.url)
    status = node_status(settings, store)
    m = _scrape(settings, store)
    assert _by(m["nnrouter_instances"], "state") == status["instances"]["by_state"]
    deliveries: dict[str, dict[str, float]] = {}
    for labels, n in m["nnrouter_deliveries_total"].items():
        deliveries.setdefault(dict(labels)["destination"], {})[dict(labels)["outcome"]] = n
    assert deliveries == status["outbox"] == {"pacs": {"sent": 2, "dead": 1}, "ai": {"held": 1, "sending": 1}}


def test_a_store_that_is_down_still_answers_store_up_0(tmp_path):
    url = f"postgresql+psycopg://nobody@127.0.0.1:{peers.free_port()}/none"
    down = Store(url)
    try:
        m = _scrape(_settings(tmp_path, url), down)
    finally:
        down.dispose()
    assert m["nnrouter_store_up"] == {(): 0} and m["nnrouter_ready"] == {(): 0}
    assert m["nnrouter_spool_free_bytes"][()] > 0
    assert "nnrouter_instances" not in m and "nnrouter_outbox_depth" not in m


def test_a_dropped_sqlite_file_answers_store_up_0(tmp_path):
    url = f"sqlite:///{tmp_path / 'db' / 'nnrouter.db'}"
    store = Store(url)
    store.upgrade()
    store.dispose()
    (tmp_path / "db" / "nnrouter.db").unlink()  # the next connection opens an empty database
    try:
        m = _scrape(_settings(tmp_path, url), store)
    finally:
        store.dispose()
    assert m["nnrouter_store_up"] == {(): 0} and m["nnrouter_ready"] == {(): 0}
    assert "nnrouter_instances_received_total" not in m


@pytest.mark.slow
def test_a_scrape_of_100000_instances_counts_them_all(tmp_path):
    """At scale the figures are still exact; the time a scrape takes is printed, not asserted (-s shows it)."""
    store = Store(f"sqlite:///{tmp_path / 'nnrouter.db'}")
    store.upgrade()
    r = Rows(store)
    n = 100_000
    now = utcnow()
    with store.write() as s:
        s.execute(
            insert(Instance),
            [
                {
                    "id": i,
                    "series_id": r.series_id,
                    "sop_instance_uid": f"1.2.3.{i}",
                    "sop_class_uid": "1.2",
                    "transfer_syntax_uid": "1.2.840.10008.1.2.1",
                    "path": f"/x/{i}",
                    "size_bytes": 1000,
                    "sha256": f"{i:064d}",
                    "state": InstanceState.CLASSIFIED,
                    "calling_ae": f"AE{i % 7}",
                    "request_at": now,
                    "received_at": now + dt.timedelta(milliseconds=i % 50),
                }
                for i in range(1, n + 1)
            ],
        )
        row = {"model_name": "m", "model_version": "1", "provider": "cpu", "score": 0.9, "top5": [], "preprocess_ms": 1}
        s.execute(
            insert(Prediction),
            [
                {**row, "instance_id": i, "label": f"l{i % 9}", "decode_ms": i % 300, "infer_ms": i % 70}
                for i in range(1, n + 1)
            ],
        )
        s.execute(
            insert(Outbox),
            [
                {
                    "instance_id": i,
                    "destination": f"d{i % 3}",
                    "rule": "all",
                    "state": "sent",
                    "sent_at": now + dt.timedelta(seconds=i % 600),
                }
                for i in range(1, n + 1)
            ],
        )
    settings = _settings(tmp_path, store.url)
    _scrape(settings, store)  # the first scrape also warms SQLite's page cache
    started = time.perf_counter()
    m = _scrape(settings, store)
    took = time.perf_counter() - started
    store.dispose()
    assert m["nnrouter_receive_seconds_count"] == {(): n} and m["nnrouter_receipt_to_delivery_seconds_count"] == {(): n}
    assert sum(m["nnrouter_instances_received_total"].values()) == n
    assert m["nnrouter_decode_seconds_count"] == {(): n}
    # About 0.6 s on a busy 2-core machine; loading ORM objects row by row instead takes several seconds.
    print(f"one scrape of {n} instances took {took:.2f} s")
