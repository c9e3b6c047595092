"""Back-pressure: associations refused, transiently and with the reason logged, before the disk or a queue runs out.

The measures run against a real database (SQLite and PostgreSQL); the
refusal is seen by DCMTK's storescu and echoscu against a real ``nnrouter serve``.
"""

from __future__ import annotations

import datetime as dt
import json

import pytest
from conftest import needs
from pydicom.uid import generate_uid

from nnrouter.core import config
from nnrouter.core.store import (
    Instance,
    InstanceState,
    Outbox,
    OutboxState,
    Series,
    Store,
    Study,
    utcnow,
)
from nnrouter.service.pressure import Pressure, measure, stores
from nnrouter.testing import peers


def _settings(tmp_path, url: str, **limits) -> config.Settings:  # type: ignore[no-untyped-def]
    return config.Settings(storage={"path": tmp_path / "spool", "min_free_mb": 0}, database={"url": url}, limits=limits)


def _fill(store: Store, *, received: int, pending_age_s: float, pending: int = 2) -> None:
    """``received`` instances waiting for the classifier, and ``pending`` deliveries to pacs that old."""
    then = utcnow() - dt.timedelta(seconds=pending_age_s)
    with store.write() as s:
        st = Study(study_uid=generate_uid())
        s.add(st)
        s.flush()
        se = Series(study_id=st.id, series_uid=generate_uid())
        s.add(se)
        s.flush()
        for i in range(received + pending):
            inst = Instance(
                series_id=se.id,
                sop_instance_uid=generate_uid(),
                version=1,
                sop_class_uid="1.2",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                path=f"/x/{i}.dcm",
                size_bytes=1,
                sha256=f"{i:064d}",
                state=InstanceState.RECEIVED if i < received else InstanceState.DECODED,
            )
            s.add(inst)
            s.flush()
            if i >= received:
                s.add(
                    Outbox(
                        instance_id=inst.id, destination="pacs", rule="all", state=OutboxState.PENDING, created_at=then
                    )
                )


@pytest.fixture
def store(database_url):  # type: ignore[no-untyped-def]
    st = Store(database_url)
    st.upgrade()
    yield st
    st.dispose()


def test_each_limit_refuses_with_its_reason_and_an_old_outbox_raises_an_alert(tmp_path, store):
    _fill(store, received=3, pending_age_s=7200)
    calm = measure(_settings(tmp_path, store.url), store)
    assert calm.ready and calm.unclassified == 3 and calm.alerts  # default alert after an hour
    assert calm.outbox[0].destination == "pacs" and calm.outbox[0].waiting == 2 and calm.outbox[0].oldest_age_s >= 7200

    busy = measure(
        _settings(
            tmp_path,
            store.url,
            refuse_below_free_mb=10**9,
            max_unclassified=2,
            max_outbox_pending=1,
            outbox_alert_age_s=3600,
        ),
        store,
    )
    assert not busy.ready
    assert len(busy.refuse) == 3
    assert "below 1000000000 MB (limits.refuse_below_free_mb)" in busy.refuse[0]
    assert "3 instances wait for the classifier, more than 2 (limits.max_unclassified)" in busy.refuse[1]
    assert "2 deliveries wait, more than 1 (limits.max_outbox_pending)" in busy.refuse[2]
    (alert,) = busy.alerts
    assert "pacs" in alert and "limits.outbox_alert_age_s" in alert

    quiet = measure(_settings(tmp_path, store.url, outbox_alert_age_s=None, max_unclassified=None), store)
    assert quiet.ready and not quiet.alerts


def test_a_store_that_is_down_makes_the_node_not_ready_but_refuses_nothing_for_it(tmp_path):
    url = f"postgresql+psycopg://nobody@127.0.0.1:{peers.free_port()}/none"
    down = Store(url)
    health = measure(_settings(tmp_path, url), down)
    assert health.store_error and not health.ready and health.refuse == ()
    assert any("store unreachable" in r for r in health.reasons())
    down.dispose()


def test_the_measure_is_cached_for_check_every_s(tmp_path, store):
    clock = [100.0]
    p = Pressure(_settings(tmp_path, store.url, check_every_s=1.0), store, clock=lambda: clock[0])
    first = p.health()
    _fill(store, received=5, pending_age_s=0)
    assert p.health() is first and p.refreshes == 1  # within the second: no query
    clock[0] += 1.0
    assert p.health().unclassified == 5 and p.refreshes == 2


def test_only_associations_that_would_store_are_refused():
    assert not stores(["1.2.840.10008.1.1"])  # Verification
    assert not stores(
        ["1.2.840.10008.1.1", "1.2.840.10008.5.1.4.1.2.2.1", "1.2.840.10008.5.1.4.38.2"]
    )  # C-FIND, HP FIND
    assert stores(["1.2.840.10008.1.1", "1.2.840.10008.5.1.4.1.1.1.1"])  # DX storage
    assert stores(["1.2.840.10008.5.1.4.38.1"])  # Hanging Protocol storage
    assert stores(["1.2.3.4.5"])  # unknown: may be anything


# --- against a real node -------------------------------------------------------------


def _rejected_transient(stderr: str) -> bool:
    text = stderr.lower()
    return "association rejected" in text and "transient" in text and "local limit exceeded" in text


@needs("storescu", "echoscu")
def test_a_spool_near_its_limit_refuses_storing_associations_but_still_answers_echo(node_factory, tmp_path):
    from nnrouter.testing.synthetic import write_series

    node = node_factory(settings={"limits": {"refuse_below_free_mb": 10**9}}).start()
    files = write_series(tmp_path / "in", 2, rows=64, columns=64)
    res = peers.storescu(node.port, files)
    assert _rejected_transient(res.stderr), res.stderr[-2000:]
    assert "Received Store Response" not in res.stderr
    echo = __import__("subprocess").run(
        ["echoscu", "-aec", "NNROUTER", "127.0.0.1", str(node.port)], capture_output=True, text=True, timeout=60
    )
    assert echo.returncode == 0, echo.stderr
    lines = [json.loads(line) for line in node.log_lines() if '"association_refused_busy"' in line]
    assert lines and "limits.refuse_below_free_mb" in lines[0]["reason"] and lines[0]["level"] == "warning"
    status = json.loads(node.cli("status", "--json").stdout)
    assert status["ready"] is False and "limits.refuse_below_free_mb" in status["not_ready_because"][0]


@needs("storescu")
def test_a_queue_beyond_its_limit_refuses_the_next_association(node_factory, tmp_path):
    from nnrouter.testing.synthetic import write_series

    # No workers: what arrives waits for a classifier that never comes.
    node = node_factory(settings={"limits": {"max_unclassified": 2, "check_every_s": 0}}).start()
    first = peers.storescu(node.port, write_series(tmp_path / "a", 3, rows=64, columns=64))
    assert first.stderr.count("Received Store Response (Success)") == 3  # checked when the association began
    second = peers.storescu(node.port, write_series(tmp_path / "b", 1, rows=64, columns=64))
    assert _rejected_transient(second.stderr), second.stderr[-2000:]
    status = json.loads(node.cli("status", "--json").stdout)
    assert status["ready"] is False and "limits.max_unclassified" in status["not_ready_because"][0]
    assert status["health"]["unclassified"] == 3
