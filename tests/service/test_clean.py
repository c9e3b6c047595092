"""Retention: what the cleaner deletes, what it never deletes, and that a crash leaves nothing pointing to nothing.

The policy is a pure function of what the store says about a study, tested
case by case; the deletion and the sweep run against real files and a real
database (SQLite and PostgreSQL); the stage runs inside ``nnrouter serve``
with real DCMTK peers.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import needs
from dicomfiles import node_rows, wait_for
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from nnrouter.core import config
from nnrouter.core.spool import Spool
from nnrouter.core.store import (
    Instance,
    InstanceState,
    OrderRequest,
    Outbox,
    OutboxState,
    Prediction,
    RoutingDecision,
    Series,
    Store,
    Study,
    utcnow,
)
from nnrouter.service.clean import DAY_S, Cleaner, Policy, StudyView, judge
from nnrouter.testing import peers

NOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)
POLICY = Policy(
    keep_s=7 * DAY_S, keep_s_by_destination={}, keep_s_by_calling_ae={}, not_forwarded_keep_s=None, routing=True
)


def view(
    days_ago: float = 10, states=(InstanceState.DECODED,), outbox=((("pacs", OutboxState.SENT, 10),)), **kw
) -> StudyView:  # type: ignore[no-untyped-def]
    """A study received ``days_ago`` days ago, decided to go to the outbox rows' destinations."""
    rows = tuple((d, st, None if sent is None else NOW - dt.timedelta(days=sent)) for d, st, sent in outbox)
    base = {
        "study_id": 1,
        "study_uid": "1.2.3",
        "last_received_at": NOW - dt.timedelta(days=days_ago),
        "instance_states": tuple(states),
        "calling_aes": frozenset({"MOD1"}),
        "decided": True,
        "destinations": frozenset(d for d, _, _ in outbox),
    }
    base.update(kw)
    return StudyView(outbox=rows, **base)  # type: ignore[arg-type]


# --- the policy: every "never" ---------------------------------------------------


@pytest.mark.parametrize(
    "state", [OutboxState.PENDING, OutboxState.SENDING, OutboxState.FAILED, OutboxState.DEAD, OutboxState.HELD]
)
def test_a_study_with_a_delivery_not_sent_is_never_deleted(state):
    v = view(outbox=(("pacs", OutboxState.SENT, 30), ("ai", state, None)))
    verdict = judge(v, POLICY, NOW)
    assert not verdict.go and not verdict.early, verdict
    assert verdict.code == state


@pytest.mark.parametrize("state", [InstanceState.RECEIVED, InstanceState.CLASSIFYING])
def test_a_study_with_an_image_not_yet_classified_is_never_deleted(state):
    verdict = judge(view(states=(InstanceState.CLASSIFIED, state)), POLICY, NOW)
    assert (verdict.go, verdict.early, verdict.code) == (False, False, "not_classified")


def test_a_study_held_by_a_rule_is_never_deleted():
    verdict = judge(view(outbox=(), hold=True, destinations=frozenset({"pacs"})), POLICY, NOW)
    assert (verdict.go, verdict.early, verdict.code) == (False, False, "held")


def test_a_study_not_yet_routed_is_never_deleted():
    verdict = judge(view(outbox=(), decided=False, destinations=frozenset()), POLICY, NOW)
    assert (verdict.go, verdict.early, verdict.code) == (False, False, "not_routed")


def test_a_late_image_not_yet_queued_keeps_its_study():
    verdict = judge(view(unqueued=1), POLICY, NOW)
    assert (verdict.go, verdict.early, verdict.code) == (False, False, "not_queued")


def test_a_delivered_study_goes_only_after_keep_days_since_the_last_delivery():
    recent = judge(view(days_ago=30, outbox=(("pacs", OutboxState.SENT, 30), ("ai", OutboxState.SENT, 2))), POLICY, NOW)
    assert not recent.go and recent.early and recent.code == "kept_delivered"
    assert recent.keep_until == NOW - dt.timedelta(days=2) + dt.timedelta(days=7)
    old = judge(view(days_ago=30, outbox=(("pacs", OutboxState.SENT, 30), ("ai", OutboxState.SENT, 8))), POLICY, NOW)
    assert old.go and old.code == "delivered" and "ai, pacs" in old.reason


def test_a_late_image_restarts_the_wait():
    # Delivered 10 days ago, but an image came 3 days ago (and was delivered with the decision).
    assert not judge(view(days_ago=3, outbox=(("pacs", OutboxState.SENT, 10),)), POLICY, NOW).go


def test_the_longest_override_that_applies_wins():
    policy = Policy(
        keep_s=7 * DAY_S,
        keep_s_by_destination={"research": 30 * DAY_S},
        keep_s_by_calling_ae={"ED": 1 * DAY_S},
        not_forwarded_keep_s=None,
        routing=True,
    )
    both = view(
        outbox=(("pacs", OutboxState.SENT, 10), ("research", OutboxState.SENT, 10)), calling_aes=frozenset({"ED"})
    )
    assert not judge(both, policy, NOW).go  # research: 30 days
    short = view(days_ago=2, outbox=(("pacs", OutboxState.SENT, 2),), calling_aes=frozenset({"ED"}))
    assert judge(short, policy, NOW).go  # ED: 1 day, shorter than keep_days
    plain = view(days_ago=2, outbox=(("pacs", OutboxState.SENT, 2),))
    assert not judge(plain, policy, NOW).go  # no override: 7 days


def test_a_study_forwarded_nowhere_is_the_only_copy_and_is_kept_by_default():
    no_rules = Policy(
        keep_s=7 * DAY_S, keep_s_by_destination={}, keep_s_by_calling_ae={}, not_forwarded_keep_s=None, routing=False
    )
    undecided = view(days_ago=400, outbox=(), decided=False, destinations=frozenset())
    verdict = judge(undecided, no_rules, NOW)
    assert (verdict.go, verdict.early, verdict.code) == (False, False, "not_forwarded")
    for decided in (
        view(days_ago=400, outbox=(), destinations=frozenset()),  # no rule matched
        view(days_ago=400, outbox=(), destinations=frozenset(), discard=True),
    ):
        verdict = judge(decided, POLICY, NOW)
        assert (verdict.go, verdict.early, verdict.code) == (False, False, "not_forwarded"), verdict


def test_a_study_forwarded_nowhere_goes_after_not_forwarded_keep_days_when_set():
    policy = Policy(
        keep_s=7 * DAY_S,
        keep_s_by_destination={},
        keep_s_by_calling_ae={},
        not_forwarded_keep_s=30 * DAY_S,
        routing=False,
    )
    assert not judge(view(days_ago=29, outbox=(), decided=False, destinations=frozenset()), policy, NOW).go
    old = judge(view(days_ago=31, outbox=(), decided=False, destinations=frozenset()), policy, NOW)
    assert old.go and not old.early  # never early: nothing else has it
    # Still never while an image waits for the classifier.
    assert not judge(
        view(days_ago=31, outbox=(), decided=False, destinations=frozenset(), states=(InstanceState.RECEIVED,)),
        policy,
        NOW,
    ).go


# --- the store: real files, real rows ----------------------------------------------


class Site:
    """A spool, an overlay folder and a database with studies in them, as the stages would leave them."""

    def __init__(self, tmp: Path, url: str, **retention):  # type: ignore[no-untyped-def]
        self.settings = config.Settings(
            storage={"path": tmp / "spool", "derived_path": tmp / "derived", "min_free_mb": 0},
            routing={"rules": tmp / "rules.yaml"},
            database={"url": url},
            retention=retention,
        )
        self.store = Store(url)
        self.store.upgrade()
        self.spool = Spool(self.settings.storage.path)
        self.cam = Path(self.settings.storage.derived_path) / "cam"
        self.cam.mkdir(parents=True, exist_ok=True)

    def study(
        self,
        *,
        n: int = 2,
        days_ago: float = 10,
        state: str = InstanceState.DECODED,
        deliveries: dict[str, str] | None = None,
        sent_days_ago: float = 9,
        decided: bool = True,
    ) -> str:
        """A study of ``n`` images, each with an overlay and one delivery per destination in the given state."""
        deliveries = {"pacs": OutboxState.SENT} if deliveries is None else deliveries
        then = utcnow() - dt.timedelta(days=days_ago)
        sent = utcnow() - dt.timedelta(days=sent_days_ago)
        study_uid, series_uid = generate_uid(), generate_uid()
        with self.store.write() as s:
            st = Study(study_uid=study_uid, created_at=then, last_received_at=then)
            s.add(st)
            s.flush()
            se = Series(study_id=st.id, series_uid=series_uid, created_at=then)
            s.add(se)
            s.flush()
            for _ in range(n):
                sop = generate_uid()
                data = os.urandom(2000)
                dest = self.spool.path_for(study_uid, series_uid, sop, 1)
                size = self.spool.keep([data], dest)
                inst = Instance(
                    series_id=se.id,
                    sop_instance_uid=sop,
                    version=1,
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                    path=str(dest),
                    size_bytes=size,
                    sha256=hashlib.sha256(data).hexdigest(),
                    state=state,
                    calling_ae="MOD1",
                    received_at=then,
                    updated_at=then,
                )
                s.add(inst)
                s.flush()
                overlay = self.cam / f"{inst.id}.png"
                overlay.write_bytes(os.urandom(500))
                s.add(
                    Prediction(
                        instance_id=inst.id,
                        model_name="m",
                        model_version="1",
                        provider="cpu",
                        label="chest_pa_ap",
                        score=0.9,
                        top5=[],
                        decode_ms=1,
                        preprocess_ms=1,
                        infer_ms=1,
                        cam_path=str(overlay),
                    )
                )
                for dest_name, ostate in deliveries.items():
                    s.add(
                        Outbox(
                            instance_id=inst.id,
                            destination=dest_name,
                            rule="all",
                            state=ostate,
                            sent_at=sent if ostate == OutboxState.SENT else None,
                            created_at=then,
                        )
                    )
            if decided:
                s.add(
                    RoutingDecision(
                        study_id=st.id,
                        rules_digest="x",
                        outcomes=[],
                        hold=False,
                        discard=False,
                        deliveries=[{"destination": d, "rule": "all", "coerce": None} for d in deliveries],
                    )
                )
            s.add(OrderRequest(key=f"image:{study_uid}", source="image", study_uid=study_uid, codes=[]))
        return study_uid

    def files(self, study_uid: str) -> list[str]:
        with self.store.read() as s:
            return list(
                s.execute(select(Instance.path).join(Series).join(Study).where(Study.study_uid == study_uid)).scalars()
            )

    def overlays(self, study_uid: str) -> list[str]:
        with self.store.read() as s:
            return list(
                s.execute(
                    select(Prediction.cam_path)
                    .join(Instance)
                    .join(Series)
                    .join(Study)
                    .where(Study.study_uid == study_uid)
                ).scalars()
            )

    def count(self, model) -> int:  # type: ignore[no-untyped-def]
        with self.store.read() as s:
            return s.execute(select(func.count()).select_from(model)).scalar_one()


@pytest.fixture
def site(tmp_path, database_url):  # type: ignore[no-untyped-def]
    s = Site(tmp_path, database_url)
    yield s
    s.store.dispose()


def test_an_expired_delivered_study_goes_with_its_overlays_and_rows_and_nothing_else(site):
    gone = site.study()
    pending = site.study(deliveries={"pacs": OutboxState.SENT, "ai": OutboxState.PENDING})
    recent = site.study(days_ago=1, sent_days_ago=1)
    gone_files, gone_overlays = site.files(gone), site.overlays(gone)
    kept_files = site.files(pending) + site.files(recent)

    preview = Cleaner(site.settings, site.store).run(dry_run=True)
    assert [c.study_uid for c in preview.studies] == [gone]
    row = preview.as_dict()["studies"][0]
    assert row["files"] == 2 and row["bytes"] == sum(os.path.getsize(f) for f in gone_files)
    assert row["overlays"] == 2 and "delivered to pacs" in row["reason"]
    assert preview.kept == {"pending": 1, "kept_delivered": 1}
    assert all(os.path.exists(f) for f in gone_files + gone_overlays)  # a dry run deletes nothing

    done = Cleaner(site.settings, site.store).run()
    assert [c.study_uid for c in done.studies] == [gone]
    assert not any(os.path.exists(f) for f in gone_files + gone_overlays)
    assert site.files(gone) == [] and all(os.path.exists(f) for f in kept_files)
    with site.store.read() as s:
        assert s.execute(select(Study).where(Study.study_uid == gone)).first() is None
        assert s.execute(select(OrderRequest).where(OrderRequest.study_uid == gone)).first() is None
    assert (
        site.count(Study) == 2 and site.count(Instance) == 4 and site.count(Outbox) == 6 and site.count(Prediction) == 4
    )


def test_a_study_that_gets_a_new_image_after_the_judgment_is_left_alone(site):
    uid = site.study()
    cleaner = Cleaner(site.settings, site.store)
    ((v, _, verdict),) = list(cleaner.judge_all(utcnow()))
    assert verdict.go
    with site.store.write() as s:  # a late image arrives between the plan and the delete
        series_id = s.execute(select(Series.id).join(Study).where(Study.study_uid == uid)).scalar_one()
        s.add(
            Instance(
                series_id=series_id,
                sop_instance_uid=generate_uid(),
                version=1,
                sop_class_uid="1.2",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                path="/nowhere.dcm",
                size_bytes=1,
                sha256="0" * 64,
                state=InstanceState.RECEIVED,
            )
        )
    assert cleaner.delete_study(v.study_id, utcnow()) is None
    assert len(site.files(uid)) == 3 and all(os.path.exists(f) for f in site.files(uid)[:2])


def test_a_crash_between_the_rows_and_the_files_leaves_orphans_that_the_sweep_removes(site):
    uid = site.study()
    files, overlays = site.files(uid), site.overlays(uid)
    cleaner = Cleaner(site.settings, site.store)
    ((v, _, _),) = list(cleaner.judge_all(utcnow()))
    assert cleaner.delete_rows(v.study_id, utcnow()) is not None  # rows committed; the process "dies" here
    assert all(os.path.exists(f) for f in files + overlays)  # orphans, no row points to nothing
    assert cleaner.sweep().files == []  # younger than retention.orphan_grace_s: could be a receive in progress
    swept = cleaner.sweep(grace_s=0)
    assert sorted(swept.files) == sorted(files) and sorted(swept.overlays) == sorted(overlays)
    assert not any(os.path.exists(f) for f in files + overlays)
    # An empty folder changed just now (a receive may be about to rename a file into it) is kept for the
    # grace period; then the series folder goes, and the study folder with it.
    series = site.spool.root / "1.2.3" / "4.5"
    series.mkdir(parents=True)
    assert cleaner.sweep().folders == 0 and series.exists()
    old = time.time() - 7200
    for folder in (series, Path(files[0]).parent):
        if folder.exists():
            os.utime(folder, (old, old))
    cleaner.sweep()
    assert not series.parent.exists() and not Path(files[0]).parent.parent.exists()


def test_spool_files_without_a_row_are_swept_after_the_grace_period(site):
    """Finding 8: a crash between the spool's rename and the commit left a file that nothing removed."""
    kept = site.study(deliveries={"pacs": OutboxState.PENDING})
    orphan = site.spool.path_for(generate_uid(), generate_uid(), generate_uid(), 1)
    site.spool.keep([os.urandom(3000)], orphan)  # written, fsync'd, renamed; the row never committed
    fresh = site.spool.path_for(generate_uid(), generate_uid(), generate_uid(), 1)
    site.spool.keep([os.urandom(3000)], fresh)  # a receive in progress
    lone_overlay = site.cam / "999999.png"
    lone_overlay.write_bytes(b"png")
    not_ours = site.spool.root / "README.txt"
    not_ours.write_text("an admin's note")
    incoming = site.spool.tmp / "x.part"
    incoming.write_bytes(b"partial")
    old = time.time() - 7200
    for f in [orphan, lone_overlay, not_ours, incoming, *map(Path, site.files(kept) + site.overlays(kept))]:
        os.utime(f, (old, old))

    preview = Cleaner(site.settings, site.store).sweep(dry_run=True)
    assert preview.files == [str(orphan)] and orphan.exists()
    swept = Cleaner(site.settings, site.store).sweep()
    assert swept.files == [str(orphan)] and swept.bytes == 3000 and swept.overlays == [str(lone_overlay)]
    assert not orphan.exists() and not lone_overlay.exists()
    assert fresh.exists() and not_ours.exists() and incoming.exists()
    assert all(os.path.exists(f) for f in site.files(kept) + site.overlays(kept))


def test_a_row_under_another_spelling_of_the_spool_path_keeps_its_file(site, tmp_path):
    uid = site.study(deliveries={"pacs": OutboxState.PENDING})
    (path,) = site.files(uid)[:1]
    with site.store.write() as s:  # the row names the file through a symlinked spool (another mount)
        s.execute(Instance.__table__.update().where(Instance.path == path).values(path="/mnt/other" + path))
    old = time.time() - 7200
    os.utime(path, (old, old))
    assert Cleaner(site.settings, site.store).sweep().files == [] and os.path.exists(path)


def test_a_spool_short_of_space_cleans_delivered_studies_early_oldest_first_and_never_undelivered(
    tmp_path, database_url
):
    site = Site(tmp_path, database_url, clean_below_free_mb=10**9)  # always short
    older = site.study(days_ago=3, sent_days_ago=3)
    newer = site.study(days_ago=1, sent_days_ago=1)
    failed = site.study(days_ago=5, deliveries={"pacs": OutboxState.FAILED})
    held = site.study(days_ago=5, deliveries={"pacs": OutboxState.HELD})
    undecided = site.study(days_ago=5, deliveries={}, decided=False)
    done = Cleaner(site.settings, site.store).run()
    assert [c.study_uid for c in done.studies] == [older, newer]
    assert all(c.early and "early" in c.reason for c in done.studies)
    for uid in (failed, held, undecided):
        assert site.files(uid) and all(os.path.exists(f) for f in site.files(uid))
    assert done.kept == {"failed": 1, "held": 1, "not_routed": 1}
    site.store.dispose()


def test_without_rules_nothing_is_deleted_unless_not_forwarded_keep_days_is_set(tmp_path, database_url):
    site = Site(tmp_path, database_url)
    site.settings = site.settings.model_copy(update={"routing": config.Routing(rules=None)})
    uid = site.study(days_ago=400, deliveries={}, decided=False)
    assert Cleaner(site.settings, site.store).run().studies == []
    site.settings = site.settings.model_copy(update={"retention": config.Retention(not_forwarded_keep_days=30)})
    done = Cleaner(site.settings, site.store).run()
    assert [c.study_uid for c in done.studies] == [uid] and "forwarded nowhere" in done.studies[0].reason
    site.store.dispose()


def test_clean_dry_run_json_shows_what_would_go_and_why(tmp_path):
    url = f"sqlite:///{tmp_path / 'nnrouter.db'}"
    site = Site(tmp_path, url)
    uid = site.study()
    site.study(deliveries={"pacs": OutboxState.DEAD})
    cfg = tmp_path / "nnrouter.yaml"
    cfg.write_text(yaml.safe_dump(json.loads(site.settings.model_dump_json())))

    def clean(*args: str) -> dict:
        res = subprocess.run(
            [sys.executable, "-m", "nnrouter", "clean", *args, "--json", "--config", str(cfg)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)

    preview = clean("--dry-run")
    assert preview["dry_run"] is True
    (study,) = preview["studies"]
    assert study["study_uid"] == uid and study["files"] == 2 and study["bytes"] == 4000 and study["overlays"] == 2
    assert "delivered to pacs" in study["reason"] and preview["kept"] == {"dead": 1}
    assert all(os.path.exists(f) for f in site.files(uid))
    done = clean()
    assert [s["study_uid"] for s in done["studies"]] == [uid] and site.files(uid) == []
    site.store.dispose()


# --- the stage inside `nnrouter serve`, with real peers ---------------------------------


@needs("storescu", "storescp")
@pytest.mark.slow
@pytest.mark.parametrize(
    "retention", [{"keep_days": 0}, {"keep_days": 7, "clean_below_free_mb": 10**9}], ids=["expired", "short_of_space"]
)
def test_serve_cleans_a_delivered_study_and_it_no_longer_answers_c_find(node_factory, storescp, tmp_path, retention):
    from pydicom import Dataset
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    from nnrouter.testing.synthetic import write_series

    rules_file = tmp_path / "routes.yaml"
    rules_file.write_text(
        yaml.safe_dump(
            {
                "settings": {"quiet_s": 0.5},
                "destinations": [
                    {"name": "archive", "ae_title": storescp.aet, "host": "127.0.0.1", "port": storescp.port}
                ],
                "rules": [{"name": "everything", "then": {"forward": ["archive"]}}],
            }
        )
    )
    node = node_factory(
        settings={
            "workers": {"count": 1, "max_wait_ms": 0, "poll_ms": 100},
            "routing": {"rules": str(rules_file), "tick_s": 0.2},
            "retention": {**retention, "interval_s": 1},
            "dicom": {"query_aes": [{"ae_title": "FINDSCU"}]},
        }
    ).start()
    files = write_series(tmp_path / "in", 4, rows=64, columns=64)
    res = peers.storescu(node.port, files)
    assert res.stderr.count("Received Store Response (Success)") == 4, res.stderr[-2000:]
    assert len(node_rows(node, Instance)) == 4
    wait_for(
        lambda: (
            not node_rows(node, Instance)
            or [
                (i.state, [(o.destination, o.state) for o in node_rows(node, Outbox) if o.instance_id == i.id])
                for i in node_rows(node, Instance)
            ]
        ),
        timeout=90,
    )
    assert not node_rows(node, Study) and not node_rows(node, Outbox)
    assert not list(node.spool.rglob("*.dcm"))
    assert len([f for f in storescp.folder.iterdir() if f.is_file()]) == 4  # delivered before it went
    cleaned = [json.loads(line) for line in node.log_lines() if '"study_cleaned"' in line]
    assert len(cleaned) == 1 and cleaned[0]["files"] == 4
    assert cleaned[0]["early"] is ("clean_below_free_mb" in retention)
    assert ("spool below 1000000000 MB free" if cleaned[0]["early"] else "delivered to archive") in cleaned[0]["reason"]

    ae = AE(ae_title="FINDSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="NNROUTER")
    assert assoc.is_established
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = ""
    replies = list(assoc.send_c_find(q, StudyRootQueryRetrieveInformationModelFind))
    assoc.release()
    answers = [ident for status, ident in replies if status and status.Status in (0xFF00, 0xFF01)]
    assert replies and replies[-1][0].Status == 0x0000  # asked and answered, not refused
    assert answers == []  # its files are gone, so is the study
