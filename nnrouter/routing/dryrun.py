"""What the rules would do with some studies, without sending or writing anything.

``nnrouter rules test`` asks it of DICOM files on disk (their headers only:
no classifier runs) or of a study in the store (with what the workers found
and the order check as the router would run it now).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from pydicom import dcmread

from nnrouter.core.config import Settings
from nnrouter.core.store import Store
from nnrouter.routing import rules


def from_files(
    paths: Iterable[Path],
    calling_aes: Iterable[str] = (),
    now: dt.datetime | None = None,
) -> tuple[dict[str, rules.StudyFacts], list[str]]:
    """The files' studies as the rules see them, and a line for each file that is not DICOM."""
    from nnrouter.dicom.send import expand
    from nnrouter.routing.router import header_facts

    now = now or dt.datetime.now(dt.UTC)
    grouped: dict[str, list[rules.InstanceFacts]] = {}
    problems: list[str] = []
    for f in expand([Path(p) for p in paths]):
        try:
            h = header_facts(dcmread(f, stop_before_pixels=True, force=True))
        except Exception as exc:
            problems.append(f"{f}: not DICOM ({exc})")
            continue
        inst = rules.InstanceFacts(
            sop_instance_uid=str(h.get("SOPInstanceUID", f.name)),
            header=h,
            modality=h.get("Modality"),
            label=None,
            score=None,
        )
        grouped.setdefault(str(h.get("StudyInstanceUID", "?")), []).append(inst)
    studies = {
        uid: rules.StudyFacts(
            study_uid=uid,
            instances=tuple(insts),
            calling_aes=frozenset(calling_aes),
            called_aes=frozenset(),
            mismatches=frozenset(),
            now=now,
        )
        for uid, insts in grouped.items()
    }
    return studies, problems


def from_store(
    settings: Settings,
    store: Store,
    study_uid: str,
    now: dt.datetime | None = None,
) -> tuple[rules.StudyFacts, list[Any]] | None:
    """A stored study's facts and the order check's findings (orders.Finding) as of now; None if unknown.

    The procedures file is loaded without a trace in ``nnrouter status``: a dry run leaves none.
    """
    from nnrouter.orders.mismatch import OrderCheck
    from nnrouter.results.views import find_study
    from nnrouter.routing.router import Router

    now = now or dt.datetime.now(dt.UTC)
    router = Router(settings, store)
    with store.read() as s:
        study = find_study(s, study_uid)
        if study is None:
            return None
        check = OrderCheck(settings, store, record=False)
        check.reload()
        _, findings = check.findings(s, study)
        facts = replace(router.facts(s, study, now), mismatches=frozenset(f.kind for f in findings))
    return facts, list(findings)


def decision_dict(decision: rules.Decision) -> dict[str, Any]:
    """The decision as plain data: every rule with whether it matched and why, the deliveries, hold and discard."""
    return {
        "rules": [{"rule": o.rule, "matched": o.matched, "why": o.why} for o in decision.outcomes],
        "deliveries": [
            {
                "destination": d.destination,
                "rule": d.rule,
                "report": d.report,
                "coerce": None if d.coerce is None else d.coerce.model_dump(),
            }
            for d in decision.deliveries
        ],
        "hold": decision.hold,
        "hold_rules": list(decision.hold_rules),
        "discard": decision.discard,
        "discard_rules": list(decision.discard_rules),
    }
