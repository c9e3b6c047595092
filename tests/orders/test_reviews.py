"""A person's review of a flag: kept across re-checks, shown, and a resolved flag releases what a rule held for it."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import yaml
from sqlalchemy import delete, select

from nnrouter.core.config import Settings
from nnrouter.core.store import Flag, Instance, Outbox, OutboxState, RoutingDecision, Series, Store, Study, utcnow
from nnrouter.orders import reviews
from nnrouter.routing.router import Router

RULES = {
    "destinations": [{"name": "PACS", "ae_title": "PACS", "host": "127.0.0.1", "port": 11199}],
    "rules": [
        {"name": "hold-mismatches", "continue": True, "when": {"mismatch": "any"}, "then": {"hold": True}},
        {"name": "everything", "then": {"forward": ["PACS"]}},
    ],
}


@pytest.fixture
def site(tmp_path: Path, database_url: str):  # type: ignore[no-untyped-def]
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(yaml.safe_dump(RULES, sort_keys=False))
    settings = Settings(
        database={"url": database_url},
        storage={"path": str(tmp_path / "spool")},
        routing={"rules": str(rules_file)},
        models={"classifier": None, "detector": None},
        orders={"procedures": None},
    )
    store = Store(database_url)
    store.upgrade()
    yield settings, store
    store.dispose()


def _flagged_study(store: Store, kinds: tuple[str, ...]) -> Study:
    with store.write() as s:
        study = Study(study_uid="1.2.3.9", accession_number="A9")
        series = Series(study=study, series_uid="1.2.3.9.1", modality="DX")
        s.add_all([study, series])
        s.add(
            Instance(
                series=series,
                sop_instance_uid="1.2.3.9.1.1",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                path="/nonexistent",
                size_bytes=1,
                sha256="1" * 64,
                state="decoded",
            )
        )
        s.flush()
        for kind in kinds:
            s.add(Flag(study_id=study.id, kind=kind, severity="error", reason=kind, evidence={}))
        return study


def _states(store: Store) -> list[str]:
    with store.read() as s:
        return list(s.execute(select(Outbox.state)).scalars())


def test_a_resolved_flag_releases_the_study_a_mismatch_rule_held(site) -> None:  # type: ignore[no-untyped-def]
    settings, store = site
    study = _flagged_study(store, ("wrong_body_part", "missing_view"))
    router = Router(settings, store)
    assert router.reload()
    now = utcnow()
    with store.read() as s:
        router.decide(study, router.facts(s, study, now))
    assert _states(store) == [OutboxState.HELD]

    reviews.review(store, "1.2.3.9", "wrong_body_part", None, "acknowledged", None, "qa")
    assert router.redecide_reviewed(now) == 0  # seen is not resolved
    reviews.review(store, "1.2.3.9", "wrong_body_part", None, "resolved", "ordered knee, knee was imaged", "qa")
    assert router.redecide_reviewed(now) == 0  # missing_view still holds it
    assert _states(store) == [OutboxState.HELD]
    with store.read() as s:
        assert s.execute(select(RoutingDecision.hold)).scalar_one() is True

    reviews.review(store, "1.2.3.9", "missing_view", None, "resolved", "lateral not needed", "qa")
    assert router.redecide_reviewed(now) == 1
    assert _states(store) == [OutboxState.PENDING]
    with store.read() as s:
        assert s.execute(select(RoutingDecision.hold)).scalar_one() is False
    assert router.redecide_reviewed(now) == 0  # decided again once, not on every tick


def test_a_review_holds_for_the_same_finding_after_a_re_check_not_for_another(site) -> None:  # type: ignore[no-untyped-def]
    _, store = site
    study = _flagged_study(store, ("wrong_body_part",))
    with pytest.raises(reviews.ReviewError, match="no missing_view flag"):
        reviews.review(store, "1.2.3.9", "missing_view", None, "acknowledged", None, "qa")
    with pytest.raises(reviews.ReviewError, match="state must be"):
        reviews.review(store, "1.2.3.9", "wrong_body_part", None, "ignored", None, "qa")
    reviews.review(store, "1.2.3.9", "wrong_body_part", None, "resolved", "fine", "qa")

    def recheck(reason: str) -> None:  # the order check runs again and writes its finding anew
        with store.write() as s:
            s.execute(delete(Flag).where(Flag.study_id == study.id))
            s.add(
                Flag(
                    study_id=study.id,
                    kind="wrong_body_part",
                    severity="error",
                    reason=reason,
                    evidence={},
                    created_at=utcnow() + dt.timedelta(seconds=1),
                )
            )

    recheck("wrong_body_part")  # what _flagged_study wrote: the same finding
    with store.read() as s:
        assert reviews.open_kinds(s, study.id) == frozenset()
    recheck("ordered KNEE, the image looks like ankle_ap (0.97)")  # something else: nobody has seen it yet
    with store.read() as s:
        assert reviews.open_kinds(s, study.id) == {"wrong_body_part"}
