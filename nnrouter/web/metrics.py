"""``/metrics`` in the Prometheus text format, read from the store at each scrape.

Every stage is its own process and the stages meet only in the SQL store, so
no process holds the node's figures in memory: a collector asks the store
when Prometheus scrapes, and any node's web stage answers for what the
store knows. The registry is made per scrape (no global default registry):
nothing is kept between scrapes, and tests need no clean-up.

The counters are counts of rows. Retention (the cleaner) deletes old rows,
and then a counter drops; Prometheus reads a drop as a counter reset, so
``rate()`` and ``increase()`` stay right apart from the scrape where the
cleaner ran. ``nnrouter_deliveries_total`` counts outbox rows by their state
now: only ``sent`` and ``dead`` are final and only grow; a pending, sending,
failed or held row moves on (``nnrouter_outbox_depth`` is the gauge for
those).

Durations between two timestamps are bucketed in Python (SQL date
arithmetic differs between SQLite and PostgreSQL, and SQLite returns naive
datetimes, read here as UTC); durations stored as milliseconds are bucketed
in SQL with CASE sums: a scrape of 100,000 instances (with their predictions
and deliveries) takes under a second on SQLite.
"""

from __future__ import annotations

import bisect
import datetime as dt
import itertools
from collections.abc import Iterable, Sequence
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString
from sqlalchemy import case, func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import InstrumentedAttribute, Session
from sqlalchemy.sql.elements import ColumnElement

from nnrouter.core import logs
from nnrouter.core.config import Settings
from nnrouter.core.store import Audit, Flag, Instance, InstanceState, Outbox, OutboxState, Prediction, Store, as_utc
from nnrouter.service import health, pressure

log = logs.get("nnrouter.web.metrics")

# What the SCP writes to the audit for an instance it would not keep (actor: the calling AE).
REFUSED_ACTION = "instance_refused"

# Receive, decode and inference take milliseconds on a healthy node and seconds
# on a struggling one (a large JPEG 2000 image, a CPU-only model under load);
# past a minute something is wrong, and +Inf says so.
FAST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# From receipt to the destination's answer: the router waits for the study to
# be complete and for the worklist, and a destination that is down is retried
# with back-off, so seconds to an hour; beyond an hour the outbox age gauge and
# its alert matter more than the bucket.
DELIVERY_BUCKETS = (1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


def render(settings: Settings, store: Store, *, expect_stages: bool = True) -> tuple[bytes, str]:
    """The exposition text and its content type (prometheus_client.CONTENT_TYPE_LATEST).

    ``expect_stages`` as for :func:`nnrouter.service.health.readiness` (False
    when ``nnrouter web`` runs without ``serve`` on this node).
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(settings, store, expect_stages=expect_stages))
    return generate_latest(registry), CONTENT_TYPE_LATEST


class StoreCollector(Collector):
    """The node's figures, queried afresh on each ``collect()``; a store that is down gives ``store_up 0``."""

    def __init__(self, settings: Settings, store: Store, *, expect_stages: bool = True):
        self.settings = settings
        self.store = store
        self.expect_stages = expect_stages

    def collect(self) -> Iterable[Metric]:
        # Everything is computed before the first metric is yielded: a failure
        # half-way must not leave a half-written exposition.
        measured = pressure.measure(self.settings, self.store)
        out: list[Metric] = []
        try:
            with self.store.read() as s:
                out += _from_store(s)
            stages = health.stage_liveness(self.store, self.settings.node.name)
        except SQLAlchemyError as exc:  # down, or not at the schema we read: answer what needs no store
            log.warning("metrics_store_unreachable", error=type(exc).__name__)
            up = False
        else:
            up = True
            out += _from_measure(measured) if measured.store_error is None else []
            up_by_stage: dict[tuple[str, ...], float] = {(name,): int(bool(st["alive"])) for name, st in stages.items()}
            out.append(
                _gauge("nnrouter_stage_up", "1 while the stage runs and its beat is fresh.", ["stage"], up_by_stage)
            )
        try:
            ready = health.readiness(self.settings, self.store, expect_stages=self.expect_stages).ready
        except SQLAlchemyError:  # the store went away between its checks
            ready = False
        out.append(_gauge("nnrouter_store_up", "1 when the store answered this scrape's queries.", [], {(): int(up)}))
        out.append(_gauge("nnrouter_ready", "1 when /readyz answers ready.", [], {(): int(ready)}))
        spool = GaugeMetricFamily("nnrouter_spool_free_bytes", "Free space on the spool's file system.")
        if measured.spool_free_mb is not None:
            spool.add_metric([], measured.spool_free_mb * 1024 * 1024)
        out.append(spool)
        return out


def _from_store(s: Session) -> list[Metric]:
    """The store's figures from one session: GROUP BY counts, and only the two timestamps a duration needs."""
    received: dict[tuple[str, ...], float] = {}
    received_bytes: dict[tuple[str, ...], float] = {}
    rows = s.execute(
        select(Instance.calling_ae, func.count(), func.sum(Instance.size_bytes))
        .where(Instance.state != InstanceState.CREATED)  # nnrouter's own objects (its SR) were not received
        .group_by(Instance.calling_ae)
    ).all()
    for ae, n, size in rows:  # NULL and "" are one label
        key = (ae or "",)
        received[(*key, "stored")] = received.get((*key, "stored"), 0) + n
        received_bytes[key] = received_bytes.get(key, 0) + int(size or 0)
    refused = s.execute(
        select(Audit.actor, func.count()).where(Audit.action == REFUSED_ACTION).group_by(Audit.actor)
    ).all()
    for ae, n in refused:
        received[(ae or "", "refused")] = received.get((ae or "", "refused"), 0) + n

    states = s.execute(select(Instance.state, func.count()).group_by(Instance.state)).all()
    labels = s.execute(select(Prediction.label, func.count()).group_by(Prediction.label)).all()
    kinds = s.execute(select(Flag.kind, func.count()).group_by(Flag.kind)).all()
    outbox = s.execute(
        select(Outbox.destination, Outbox.state, func.count()).group_by(Outbox.destination, Outbox.state)
    ).all()

    receive = _histogram(
        "nnrouter_receive_seconds",
        "From the C-STORE request complete to the instance kept (file synced, row committed).",
        FAST_BUCKETS,
        (
            _elapsed(received_at, request_at)
            for request_at, received_at in s.execute(
                select(Instance.request_at, Instance.received_at).where(Instance.request_at.is_not(None))
            )
            if request_at is not None
        ),
    )
    delivery = _histogram(
        "nnrouter_receipt_to_delivery_seconds",
        "From an instance kept to its delivery to a destination confirmed.",
        DELIVERY_BUCKETS,
        (
            _elapsed(sent_at, received_at)
            for sent_at, received_at in s.execute(
                select(Outbox.sent_at, Instance.received_at)
                .join(Instance, Outbox.instance_id == Instance.id)
                .where(Outbox.state == OutboxState.SENT, Outbox.sent_at.is_not(None))
            )
            if sent_at is not None
        ),
    )
    decode, infer = _ms_histograms(
        s,
        FAST_BUCKETS,
        {
            "nnrouter_decode_seconds": (Prediction.decode_ms, "Decoding an instance's pixels for the classifier."),
            "nnrouter_inference_seconds": (Prediction.infer_ms, "The view classifier's inference on one instance."),
        },
    )

    return [
        _counter(
            "nnrouter_instances_received",
            "Instances received, by calling AE: stored (rows in the store), or refused by the SCP (audit).",
            ["calling_ae", "status"],
            received,
        ),
        _counter(
            "nnrouter_received_bytes",
            "Bytes of the instances received and stored, by calling AE.",
            ["calling_ae"],
            received_bytes,
        ),
        _gauge("nnrouter_instances", "Instances in the store, by state.", ["state"], {(st,): n for st, n in states}),
        _counter(
            "nnrouter_predictions",
            "Predictions of the view classifier, by label (unknown: below the model's threshold).",
            ["label"],
            {(label,): n for label, n in labels},
        ),
        _gauge(
            "nnrouter_flags",
            "Flags of the ordered-vs-performed check, by kind; a gauge: a study's flags are replaced on each check.",
            ["kind"],
            {(kind,): n for kind, n in kinds},
        ),
        _counter(
            "nnrouter_deliveries",
            "Deliveries (outbox rows) by destination and state now; only sent and dead are final.",
            ["destination", "outcome"],
            {(dest, state): n for dest, state, n in outbox},
        ),
        receive,
        decode,
        infer,
        delivery,
    ]


def _from_measure(measured: pressure.Health) -> list[Metric]:
    """The outbox figures that back-pressure uses, so that the alert and the graph agree."""
    return [
        _gauge(
            "nnrouter_outbox_depth",
            "Deliveries not yet made (pending, sending, failed), by destination.",
            ["destination"],
            {(b.destination,): b.waiting for b in measured.outbox},
        ),
        _gauge(
            "nnrouter_outbox_oldest_pending_seconds",
            "Age of the oldest delivery not yet made, by destination (0: none waits).",
            ["destination"],
            {(b.destination,): b.oldest_age_s for b in measured.outbox},
        ),
    ]


def _counter(name: str, doc: str, labels: list[str], values: dict[tuple[str, ...], float]) -> Metric:
    family = CounterMetricFamily(name, doc, labels=labels)
    for key, value in sorted(values.items()):
        family.add_metric(list(key), value)
    return family


def _gauge(name: str, doc: str, labels: list[str], values: dict[tuple[str, ...], float]) -> Metric:
    family = GaugeMetricFamily(name, doc, labels=labels)
    for key, value in sorted(values.items()):
        family.add_metric(list(key), value)
    return family


def _elapsed(later: dt.datetime, earlier: dt.datetime) -> float:
    """Seconds between two stored times; never negative (two nodes' clocks may disagree a little)."""
    if (later.tzinfo is None) != (earlier.tzinfo is None):
        later, earlier = as_utc(later), as_utc(earlier)
    return max(0.0, (later - earlier).total_seconds())


def _buckets(bounds: Sequence[float], cumulative: Sequence[float]) -> list[tuple[str, float]]:
    return [(floatToGoString(b), c) for b, c in zip(bounds, cumulative)] + [("+Inf", cumulative[-1])]


def _histogram(name: str, doc: str, bounds: Sequence[float], values: Iterable[float]) -> Metric:
    counts = [0] * (len(bounds) + 1)
    total = 0.0
    for v in values:
        counts[bisect.bisect_left(bounds, v)] += 1  # the first bound >= v: buckets are "less or equal"
        total += v
    return HistogramMetricFamily(
        name, doc, buckets=_buckets(bounds, list(itertools.accumulate(counts))), sum_value=total
    )


def _ms_histograms(
    s: Session, bounds: Sequence[float], columns: dict[str, tuple[InstrumentedAttribute[float], str]]
) -> list[Metric]:
    """Histograms in seconds of prediction columns in milliseconds, from one query of CASE sums.

    Each sum of ``col <= bound`` is already the cumulative count of its bucket.
    """
    exprs: list[ColumnElement[Any]] = [func.count()]
    for col, _doc in columns.values():
        exprs += [func.sum(case((col <= b * 1000, 1), else_=0)) for b in bounds]
        exprs.append(func.sum(col))
    row = list(s.execute(select(*exprs).select_from(Prediction)).one())
    count, step = int(row[0]), len(bounds) + 1
    out: list[Metric] = []
    for i, (name, (_col, doc)) in enumerate(columns.items()):
        part = row[1 + i * step : 1 + (i + 1) * step]
        cumulative = [int(c or 0) for c in part[:-1]] + [count]
        total = float(part[-1] or 0) / 1000
        out.append(HistogramMetricFamily(name, doc, buckets=_buckets(bounds, cumulative), sum_value=total))
    return out
