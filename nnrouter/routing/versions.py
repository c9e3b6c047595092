"""Editing the rule and procedures files from the console: check, try, save, keep every version, restore.

A save is refused unless the text loads (the same validation the router
runs, with file line and column for each problem). A saved text replaces
the file atomically; the router notices the new digest and loads it the way
it loads any edit, so a save takes effect within one router tick and a
file that would not load never replaces running rules. Each saved version
is kept in the store with who saved it, when, and the diff against what it
replaced; the first save also keeps the text the file had before, so even
the shipped rules can be brought back.
"""

from __future__ import annotations

import datetime as dt
import difflib
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select

from nnrouter.core import yamlfile
from nnrouter.core.config import Settings
from nnrouter.core.store import RoutingDecision, RulesVersion, Store, Study

KINDS = ("rules", "procedures")


class NotEditable(ValueError):
    """This kind of file is not configured on this node, or is not known."""


class Changed(ValueError):
    """The file is not the text the edit started from: someone saved (or edited it by hand) meanwhile."""


class Invalid(ValueError):
    """The text does not load: ``problems`` say where and why."""

    def __init__(self, problems: list[yamlfile.Problem]):
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


def problem_dict(p: yamlfile.Problem) -> dict[str, Any]:
    return {"file": p.file, "line": p.line, "column": p.column, "field": p.field, "reason": p.reason}


def path_of(settings: Settings, kind: str) -> Path:
    """The file of ``kind`` this node runs; NotEditable where there is none."""
    if kind not in KINDS:
        raise NotEditable(f"no such file kind {kind!r}: {', '.join(KINDS)}")
    path = settings.routing.rules if kind == "rules" else settings.orders.procedures
    if path is None:
        key = "routing.rules" if kind == "rules" else "orders.procedures"
        raise NotEditable(f"{key} is not set in the config: there is no {kind} file to edit")
    return Path(path)


def current_text(settings: Settings, kind: str) -> str:
    path = path_of(settings, kind)
    return path.read_text(encoding="utf-8") if path.exists() else ""


def load(settings: Settings, kind: str, text: str) -> Any:
    """The loaded rule set or procedure book of ``text``; raises Invalid with every problem."""
    path = path_of(settings, kind)
    try:
        if kind == "rules":
            from nnrouter.routing import rules

            return rules.load_rules(
                path,
                text,
                detector=rules.detector_regions(settings.models.detector),
                calling_ae=settings.dicom.ae_title,
            )
        from nnrouter.orders.procedures import load_procedures

        return load_procedures(path, text)
    except yamlfile.FileProblems as exc:
        raise Invalid(exc.problems) from exc


def check(settings: Settings, kind: str, text: str) -> list[dict[str, Any]]:
    """Every problem of ``text`` (empty when it would load)."""
    try:
        load(settings, kind, text)
    except Invalid as exc:
        return [problem_dict(p) for p in exc.problems]
    return []


def digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _diff(old: str, new: str, name: str) -> str:
    return "".join(
        difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True), f"a/{name}", f"b/{name}")
    )


def version_dict(v: RulesVersion, *, text: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": v.id,
        "kind": v.kind,
        "path": v.path,
        "digest": v.digest,
        "saved_by": v.saved_by,
        "saved_at": v.saved_at,
        "restored_from": v.restored_from,
        "comment": v.comment,
        "diff": v.diff,
    }
    if text:
        out["text"] = v.text
    return out


@dataclass(frozen=True)
class Saved:
    version: dict[str, Any]
    changed: bool  # False: the text was the file's already; nothing was written


def save(
    settings: Settings,
    store: Store,
    kind: str,
    text: str,
    by: str,
    *,
    comment: str | None = None,
    restored_from: int | None = None,
    base_digest: str | None = None,
) -> Saved:
    """Validate, write the file atomically, keep the version; raises Invalid (nothing written) for a bad text.

    ``base_digest``: the digest of the text the edit started from; Changed
    if the file is no longer that (a second admin, a hand edit), rather
    than silently replacing their change. The file is written last in the
    transaction, and put back if the commit then fails: no file without its
    version.
    """
    path = path_of(settings, kind)
    load(settings, kind, text)
    old = current_text(settings, kind)
    if base_digest is not None and base_digest != digest(old):
        raise Changed(f"{path} changed since the editor loaded it: reload the page to see the change, then edit again")
    written = False
    try:
        with store.write() as s:
            newest = s.execute(
                select(RulesVersion)
                .where(RulesVersion.kind == kind, RulesVersion.path == str(path))
                .order_by(RulesVersion.id.desc())
                .limit(1)
            ).scalar_one_or_none()
            found = None
            if newest is None or newest.digest != digest(old):
                # The file as it was before the console (shipped, or edited by hand since): kept, to come back.
                found = RulesVersion(
                    kind=kind,
                    path=str(path),
                    text=old,
                    digest=digest(old),
                    diff=_diff(newest.text if newest else "", old, path.name),
                    saved_by="(file)",
                    comment="the file as found before this save",
                )
                s.add(found)
            if text == old:  # nothing to write; the version in force is known now
                s.flush()
                kept = found or newest
                assert kept is not None
                return Saved(version_dict(kept), changed=False)
            row = RulesVersion(
                kind=kind,
                path=str(path),
                text=text,
                digest=digest(text),
                diff=_diff(old, text, path.name),
                saved_by=by,
                comment=comment,
                restored_from=restored_from,
            )
            s.add(row)
            s.flush()
            saved = Saved(version_dict(row), changed=True)
            yamlfile.write_atomically(path, text.encode("utf-8"))
            written = True
    except BaseException:
        if written:  # the version did not commit: the file goes back to what it was
            yamlfile.write_atomically(path, old.encode("utf-8"))
        raise
    return saved


def versions(store: Store, kind: str, limit: int = 100) -> list[dict[str, Any]]:
    """The saved versions of ``kind``, newest first."""
    with store.read() as s:
        rows = s.execute(
            select(RulesVersion).where(RulesVersion.kind == kind).order_by(RulesVersion.id.desc()).limit(limit)
        ).scalars()
        return [version_dict(v) for v in rows]


def version(store: Store, version_id: int) -> dict[str, Any] | None:
    with store.read() as s:
        v = s.get(RulesVersion, version_id)
        return None if v is None else version_dict(v, text=True)


def restore(settings: Settings, store: Store, version_id: int, by: str) -> Saved:
    """Save an earlier version again (validated again: the config around it may have changed since)."""
    v = version(store, version_id)
    if v is None:
        raise NotEditable(f"no saved version {version_id}")
    return save(
        settings, store, v["kind"], v["text"], by, comment=f"restored version {version_id}", restored_from=version_id
    )


def what_would_change(
    settings: Settings,
    store: Store,
    text: str,
    *,
    study_uids: list[str] | None = None,
    last: int = 20,
    now: dt.datetime | None = None,
) -> list[dict[str, Any]]:
    """The edited rules against the running file on stored studies: destinations, hold and discard, each way.

    Each study's facts are taken as the router would take them now (what
    the workers found, the order check as of now); ``changed`` marks the
    studies whose outcome differs. Nothing is sent or written.
    """
    from nnrouter.routing import dryrun, rules

    edited = load(settings, "rules", text)
    running_text = current_text(settings, "rules")
    try:
        running = load(settings, "rules", running_text)
    except Invalid:
        running = None
    if study_uids is None:
        with store.read() as s:
            study_uids = list(
                s.execute(select(Study.study_uid).order_by(Study.last_received_at.desc()).limit(last)).scalars()
            )
    out: list[dict[str, Any]] = []
    for uid in study_uids:
        got = dryrun.from_store(settings, store, uid, now)
        if got is None:
            out.append({"study_uid": uid, "error": "no such study in the store"})
            continue
        facts, _ = got
        after = _outcome(rules.decide(edited, facts))
        before = _outcome(rules.decide(running, facts)) if running is not None else None
        with store.read() as s:
            accession, deliveries, hold = s.execute(
                select(Study.accession_number, RoutingDecision.deliveries, RoutingDecision.hold)
                .outerjoin(RoutingDecision, RoutingDecision.study_id == Study.id)
                .where(Study.study_uid == uid)
            ).one()
        out.append(
            {
                "study_uid": uid,
                "accession_number": accession,
                "decided": None
                if deliveries is None
                else {"destinations": sorted({d["destination"] for d in deliveries}), "hold": hold},
                "now": before,
                "edited": after,
                "changed": before != after,
            }
        )
    return out


def _outcome(decision: Any) -> dict[str, Any]:
    return {
        "destinations": sorted({d.destination for d in decision.deliveries}) if not decision.discard else [],
        "hold": decision.hold,
        "discard": decision.discard,
        "matched": [o.rule for o in decision.outcomes if o.matched],
    }
