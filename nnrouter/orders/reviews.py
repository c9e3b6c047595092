"""A person's word on a flag: acknowledged (seen, still open) or resolved (with a comment).

The order check replaces a study's flags each time it runs, so a review is
kept apart, by study, kind and instance, and still applies to the same
finding after a re-check. A resolved flag is no longer a mismatch for the
routing rules: a study a rule held for it is decided again by the router
(``Router.redecide_reviewed``) and released when nothing else holds it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from nnrouter.core.store import Flag, FlagReview, Store, Study, utcnow

STATES = ("acknowledged", "resolved")


class ReviewError(ValueError):
    """A review that cannot be kept: no such study or flag, or a state not known."""


def _key(kind: str, sop_instance_uid: str | None) -> tuple[str, str]:
    return kind, sop_instance_uid or ""


def finding_digest(f: Flag) -> str:
    """What the flag says, as a digest: the same finding on a re-check has the same one, another has not."""
    said = json.dumps([f.kind, f.sop_instance_uid or "", f.reason, f.evidence], sort_keys=True, default=str)
    return hashlib.sha256(said.encode()).hexdigest()


def applies(review: FlagReview | None, f: Flag) -> FlagReview | None:
    """The review if it is of this very finding; None for none, or for a review of what the flag said before."""
    return review if review is not None and review.finding == finding_digest(f) else None


def review(
    store: Store, study_uid: str, kind: str, sop_instance_uid: str | None, state: str, comment: str | None, by: str
) -> dict[str, Any]:
    """Keep (or replace) the review of one flag of a study; raises ReviewError for a flag the study does not have."""
    if state not in STATES:
        raise ReviewError(f"state must be one of {', '.join(STATES)}, not {state!r}")
    if state == "resolved" and not (comment or "").strip():
        raise ReviewError("a resolution needs a comment: say what was done or why the flag is wrong")
    with store.write() as s:
        study = s.execute(select(Study).where(Study.study_uid == study_uid)).scalar_one_or_none()
        if study is None:
            raise ReviewError(f"no study {study_uid}")
        flags = {
            _key(f.kind, f.sop_instance_uid): f
            for f in s.execute(select(Flag).where(Flag.study_id == study.id)).scalars()
        }
        key = _key(kind, sop_instance_uid)
        if key not in flags:
            raise ReviewError(
                f"study {study_uid} has no {kind} flag" + (f" on {sop_instance_uid}" if sop_instance_uid else "")
            )
        row = s.execute(
            select(FlagReview).where(
                FlagReview.study_id == study.id, FlagReview.kind == key[0], FlagReview.sop_instance_uid == key[1]
            )
        ).scalar_one_or_none()
        if row is None:
            row = FlagReview(study_id=study.id, kind=key[0], sop_instance_uid=key[1])
            s.add(row)
        row.state, row.comment, row.by, row.at = state, (comment or "").strip() or None, by, utcnow()
        row.finding = finding_digest(flags[key])
        s.flush()
        return review_dict(row)


def review_dict(r: FlagReview) -> dict[str, Any]:
    return {"state": r.state, "comment": r.comment, "by": r.by, "at": r.at}


def of_study(s: Session, study_id: int) -> dict[tuple[str, str], FlagReview]:
    """The reviews of a study's flags, by (kind, SOP Instance UID or "")."""
    rows = s.execute(select(FlagReview).where(FlagReview.study_id == study_id)).scalars()
    return {(r.kind, r.sop_instance_uid): r for r in rows}


def open_kinds(s: Session, study_id: int) -> frozenset[str]:
    """The kinds of the study's flags that are not resolved: what the rules' ``mismatch`` sees."""
    reviews = of_study(s, study_id)
    flags = s.execute(select(Flag).where(Flag.study_id == study_id)).scalars()
    return frozenset(
        f.kind
        for f in flags
        if (r := applies(reviews.get(_key(f.kind, f.sop_instance_uid)), f)) is None or r.state != "resolved"
    )
