"""The REST API under /api/: everything the pages show and do, as JSON, for scripts and other systems.

Bodies have the shapes of the CLI's ``--json`` output where the CLI has the
same view (``status``, ``study show``, ``study hang``, ``mismatches``,
``outbox list|retry|purge``), because both call the same functions. The
OpenAPI document is at /api/openapi.json. Patient fields come only with a
login, and a search by patient ID only in a request body.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from pydantic import BaseModel, Field

from nnrouter.core import audit
from nnrouter.core.plain import plain
from nnrouter.web import dashboard, images, studies, users
from nnrouter.web.auth import Principal
from nnrouter.web.deps import admin, audited, console, member, reader

router = APIRouter(prefix="/api", tags=["api"])

Reader = Depends(reader)
Member = Depends(member)
Admin = Depends(admin)


def _json(obj: Any) -> Any:
    return plain(obj)  # the CLI's --json, value for value


# --- the node -----------------------------------------------------------------


@router.get("/status", summary="what `nnrouter status --json` prints")
def status(request: Request, p: Principal = Reader) -> Any:
    from nnrouter.service.status import node_status

    c = console(request)
    return _json(node_status(c.settings, c.store))


@router.get("/dashboard", summary="the dashboard's figures")
def get_dashboard(request: Request, hours: float = 3.0, p: Principal = Reader) -> Any:
    c = console(request)
    return _json(
        dashboard.dashboard(c.settings, c.store, hours=min(max(hours, 0.1), 48), expect_stages=c.expect_stages)
    )


# --- studies --------------------------------------------------------------------


class StudySearch(BaseModel):
    patient_id: str | None = None
    accession_number: str | None = None
    date_from: str | None = None
    date_to: str | None = None
    modality: str | None = None
    calling_ae: str | None = None
    label: str | None = None
    flag: str | None = None
    page: int = Field(1, ge=1)
    per_page: int = Field(50, ge=1, le=500)


@router.get("/studies", summary="studies, newest first (search by patient ID with POST /api/studies/search)")
def list_studies(
    request: Request,
    accession_number: str | None = None,
    date_from: str | None = None,
    date_to: str | None = None,
    modality: str | None = None,
    calling_ae: str | None = None,
    label: str | None = None,
    flag: str | None = None,
    page: int = 1,
    per_page: int = 50,
    p: Principal = Reader,
) -> Any:
    q = studies.StudyQuery(
        None, accession_number, date_from, date_to, modality, calling_ae, label, flag, page, per_page
    )
    return _json(studies.search(console(request).store, q, patients=p.sees_patients))


@router.post("/studies/search", summary="studies by any field, patient ID included (logged in only)")
def search_studies(request: Request, body: StudySearch, p: Principal = Member) -> Any:
    q = studies.StudyQuery(**body.model_dump())
    return _json(studies.search(console(request).store, q, patients=True))


def report_of(request: Request, study_uid: str) -> dict[str, Any]:
    """What `nnrouter study show --json` prints for this study (404 when unknown); the study page shows it too."""
    from nnrouter.pixels.modelcard import ModelCardError
    from nnrouter.results.views import study_report
    from nnrouter.routing import rules

    c = console(request)
    try:
        detector = rules.detector_regions(c.settings.models.detector)
    except ModelCardError:
        detector = None
    report = study_report(c.store, study_uid, detector)
    if report is None:
        raise HTTPException(404, f"no study {study_uid} in the store")
    return report


@router.get("/studies/{study_uid}", summary="what `nnrouter study show --json` prints")
def get_study(request: Request, study_uid: str, p: Principal = Reader) -> Any:
    return _json(redacted(report_of(request, study_uid), p))


@router.get("/studies/{study_uid}/patient", summary="the study's patient fields (logged in only)")
def get_patient(request: Request, study_uid: str, p: Principal = Member) -> Any:
    found = studies.patients_of(console(request).store, study_uid)
    if found is None:
        raise HTTPException(404, f"no study {study_uid} in the store")
    return found


@router.get("/studies/{study_uid}/layout", summary="what `nnrouter study hang` prints")
def get_layout(request: Request, study_uid: str, p: Principal = Reader) -> Any:
    from nnrouter.results.views import StudyNotFound, study_layout

    try:
        return _json(study_layout(console(request).store, study_uid))
    except StudyNotFound as exc:
        raise HTTPException(404, str(exc)) from exc
    except ValueError as exc:
        raise HTTPException(409, str(exc)) from exc


def _png(blob: bytes | None, what: str) -> Response:
    if blob is None:
        raise HTTPException(404, f"no {what}")
    return Response(blob, media_type="image/png")  # no-store, like every answer: patient images stay off disk


def redacted(obj: Any, p: Principal) -> Any:
    """For an anonymous reader, delivery errors go: a peer's or a library's message may quote patient data."""
    if p.sees_patients:
        return obj
    if isinstance(obj, dict):
        return {k: (None if k == "last_error" else redacted(v, p)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redacted(v, p) for v in obj]
    return obj


@router.get("/instances/{sop_instance_uid}/thumbnail.png", summary="the image, small; regions=true draws the boxes")
def thumbnail(request: Request, sop_instance_uid: str, regions: bool = False, p: Principal = Member) -> Response:
    return _png(images.thumbnail(console(request).store, sop_instance_uid, regions=regions), "image")


@router.get("/instances/{sop_instance_uid}/cam.png", summary="the class activation map over the image")
def cam(request: Request, sop_instance_uid: str, p: Principal = Member) -> Response:
    return _png(images.cam(console(request).store, sop_instance_uid), "activation map for this instance")


# --- mismatches -------------------------------------------------------------------


@router.get("/mismatches", summary="what `nnrouter mismatches --json` prints, with each flag's review")
def mismatches(
    request: Request, every: bool = False, unresolved: bool = False, limit: int = 200, p: Principal = Reader
) -> Any:
    from nnrouter.results.views import flagged

    return _json(flagged(console(request).store, every=every, unresolved=unresolved, limit=min(limit, 2000)))


class Review(BaseModel):
    study_uid: str
    kind: str
    sop_instance_uid: str | None = None
    state: str = Field(description="acknowledged | resolved")
    comment: str | None = None


@router.post("/mismatches/review", summary="acknowledge or resolve one flag (a resolved flag holds no study)")
def review(request: Request, body: Review, p: Principal = Member) -> Any:
    from nnrouter.orders.reviews import STATES, ReviewError
    from nnrouter.orders.reviews import review as keep

    c = console(request)
    if body.state not in STATES:
        raise HTTPException(422, f"state must be one of {', '.join(STATES)}")
    try:
        done = keep(c.store, body.study_uid, body.kind, body.sop_instance_uid, body.state, body.comment, p.name)
    except ReviewError as exc:
        audited(request, p, f"flag_{body.state}", body.study_uid, "refused", kind=body.kind, reason=str(exc))
        raise HTTPException(422, str(exc)) from exc
    audited(request, p, f"flag_{body.state}", body.study_uid, kind=body.kind, sop_instance_uid=body.sop_instance_uid)
    return _json(done)


# --- rules and procedures -------------------------------------------------------------


class RulesText(BaseModel):
    text: str
    comment: str | None = None
    base_digest: str | None = Field(None, description="sha256 of the text the edit started from (refused if changed)")


class DryRun(BaseModel):
    text: str
    study_uids: list[str] | None = None
    last: int = Field(20, ge=1, le=500)


def _editable(request: Request, kind: str) -> Any:
    from nnrouter.routing import versions

    try:
        return versions.path_of(console(request).settings, kind)
    except versions.NotEditable as exc:
        raise HTTPException(404, str(exc)) from exc


@router.get("/rules/{kind}", summary="the running rule (or procedures) file: text, problems, load status")
def get_rules(request: Request, kind: str, p: Principal = Reader) -> Any:
    from nnrouter.routing import versions

    c = console(request)
    path = _editable(request, kind)
    text = versions.current_text(c.settings, kind)
    return _json(
        {
            "kind": kind,
            "path": str(path),
            "text": text,
            "digest": versions.digest(text),
            "problems": versions.check(c.settings, kind, text),
            "status": c.store.rules_status(kind),
        }
    )


@router.post("/rules/{kind}/check", summary="validate a text: every problem with its line and column")
def check_rules(request: Request, kind: str, body: RulesText, p: Principal = Reader) -> Any:
    from nnrouter.routing import versions

    _editable(request, kind)
    problems = versions.check(console(request).settings, kind, body.text)
    return {"ok": not problems, "problems": problems}


@router.post(
    "/rules/rules/dryrun", summary="what the edited rules would do with stored studies, against the running ones"
)
def dry_run(request: Request, body: DryRun, p: Principal = Reader) -> Any:
    from nnrouter.routing import versions

    c = console(request)
    _editable(request, "rules")
    try:
        rows = versions.what_would_change(c.settings, c.store, body.text, study_uids=body.study_uids, last=body.last)
    except versions.Invalid as exc:
        raise HTTPException(422, {"problems": [versions.problem_dict(x) for x in exc.problems]}) from exc
    return _json({"studies": rows, "changed": sum(1 for r in rows if r.get("changed"))})


@router.put("/rules/{kind}", summary="save a new version (refused with its problems unless it loads)")
def save_rules(request: Request, kind: str, body: RulesText, p: Principal = Admin) -> Any:
    from nnrouter.routing import versions

    c = console(request)
    _editable(request, kind)
    try:
        saved = versions.save(
            c.settings, c.store, kind, body.text, p.name, comment=body.comment, base_digest=body.base_digest
        )
    except versions.Changed as exc:
        audited(request, p, f"{kind}_save", kind, "refused", reason="changed meanwhile")
        raise HTTPException(409, str(exc)) from exc
    except versions.Invalid as exc:
        problems = [versions.problem_dict(x) for x in exc.problems]
        audited(request, p, f"{kind}_save", kind, "refused", problems=len(problems))
        raise HTTPException(422, {"problems": problems}) from exc
    audited(request, p, f"{kind}_save", kind, version=saved.version["id"], changed=saved.changed)
    return _json({"saved": saved.changed, "version": saved.version})


@router.get("/rules/{kind}/versions", summary="saved versions, newest first, with who, when and the diff")
def list_versions(request: Request, kind: str, p: Principal = Reader) -> Any:
    from nnrouter.routing import versions

    _editable(request, kind)
    return _json(versions.versions(console(request).store, kind))


@router.get("/versions/{version_id}", summary="one saved version with its text")
def get_version(request: Request, version_id: int, p: Principal = Reader) -> Any:
    from nnrouter.routing import versions

    v = versions.version(console(request).store, version_id)
    if v is None:
        raise HTTPException(404, f"no saved version {version_id}")
    return _json(v)


@router.post("/versions/{version_id}/restore", summary="save an earlier version again")
def restore_version(request: Request, version_id: int, p: Principal = Admin) -> Any:
    from nnrouter.routing import versions

    c = console(request)
    try:
        saved = versions.restore(c.settings, c.store, version_id, p.name)
    except versions.NotEditable as exc:
        raise HTTPException(404, str(exc)) from exc
    except versions.Invalid as exc:
        audited(request, p, "version_restore", str(version_id), "refused")
        raise HTTPException(422, {"problems": [versions.problem_dict(x) for x in exc.problems]}) from exc
    audited(request, p, "version_restore", str(version_id), version=saved.version["id"])
    return _json({"saved": saved.changed, "version": saved.version})


# --- outbox -----------------------------------------------------------------------------


class Selection(BaseModel):
    states: list[str] | None = None
    destinations: list[str] | None = None
    study_uid: str | None = None
    ids: list[int] | None = None


@router.get("/outbox", summary="what `nnrouter outbox list --json` prints")
def outbox(
    request: Request,
    state: list[str] | None = None,
    destination: list[str] | None = None,
    study: str | None = None,
    limit: int = 1000,
    p: Principal = Reader,
) -> Any:
    from nnrouter.routing.deliveries import list_deliveries

    return _json(
        redacted(list_deliveries(console(request).store, state, destination, study, limit=min(limit, 10000)), p)
    )


@router.get("/outbox/summary", summary="per destination: rows by state, backlog, paused or not")
def outbox_summary(request: Request, p: Principal = Reader) -> Any:
    from nnrouter.routing.deliveries import paused
    from nnrouter.service import pressure

    c = console(request)
    return _json(
        {
            "by_state": c.store.outbox_counts(),
            "backlog": pressure.measure(c.settings, c.store).as_dict()["outbox"],
            "paused": paused(c.store),
        }
    )


def _by_hand(request: Request, body: Selection, p: Principal, action: str) -> dict[str, Any]:
    """Retry or purge the selected rows, audited; the body `nnrouter outbox retry|purge --json` prints."""
    from nnrouter.routing import deliveries

    do, default, said = (
        (deliveries.retry, deliveries.RETRYABLE, "queued")
        if action == "retry"
        else (deliveries.purge, deliveries.PURGEABLE, "removed")
    )
    states = body.states or list(default)
    ids = do(console(request).store, states, body.destinations, body.study_uid, body.ids)
    detail: dict[str, Any] = {"states": states, said: len(ids)}
    audited(request, p, f"outbox_{action}", ",".join(body.destinations or []) or None, "ok", **detail)
    return {said: len(ids), "states": states, "ids": ids}


@router.post("/outbox/retry", summary="what `nnrouter outbox retry --json` prints")
def retry(request: Request, body: Selection, p: Principal = Admin) -> Any:
    return _by_hand(request, body, p, "retry")


@router.post("/outbox/purge", summary="what `nnrouter outbox purge --json` prints")
def purge(request: Request, body: Selection, p: Principal = Admin) -> Any:
    return _by_hand(request, body, p, "purge")


@router.post("/destinations/{name}/pause", summary="send nothing to this destination until resumed")
def pause(request: Request, name: str, p: Principal = Admin) -> Any:
    from nnrouter.routing.deliveries import pause as do

    changed = do(console(request).store, name, p.name)
    audited(request, p, "destination_pause", name, changed=changed)
    return {"destination": name, "paused": True, "changed": changed}


@router.post("/destinations/{name}/resume", summary="send to this destination again")
def resume(request: Request, name: str, p: Principal = Admin) -> Any:
    from nnrouter.routing.deliveries import resume as do

    changed = do(console(request).store, name)
    audited(request, p, "destination_resume", name, changed=changed)
    return {"destination": name, "paused": False, "changed": changed}


def _destination(request: Request, name: str) -> Any:
    """The destination as the running rules name it (the version the router loaded)."""
    ruleset = console(request).running_rules()
    found = None if ruleset is None else next((d for d in ruleset.destinations if d.name == name), None)
    if found is None:
        raise HTTPException(404, f"no destination {name} in the rules the router runs")
    return found


@router.post("/destinations/{name}/echo", summary="C-ECHO the destination, as the forwarder would call it")
def echo(request: Request, name: str, p: Principal = Member) -> Any:
    from nnrouter.dicom.send import SendError
    from nnrouter.dicom.send import echo as do

    d = _destination(request, name)
    try:
        status = do(d.host, d.port, d.calling_ae, d.ae_title, timeout=10)
    except SendError as exc:
        audited(request, p, "destination_echo", name, "failed", reason=str(exc))
        return {"destination": name, "ok": False, "status": None, "error": str(exc)}
    audited(request, p, "destination_echo", name, "ok" if status == 0 else "failed", status=status)
    return {"destination": name, "ok": status == 0, "status": f"0x{status:04X}", "error": None}


# --- models, audit, users ----------------------------------------------------------------


@router.get("/models", summary="each configured model's card, what it covers and what it does not")
def models(request: Request, p: Principal = Reader) -> Any:
    from nnrouter.web.models import describe

    return _json(describe(console(request).settings))


@router.get("/models/{role}/confusion.png", summary="held-out confusion matrix of a model, from its card")
def confusion(request: Request, role: str, p: Principal = Reader) -> Response:
    from nnrouter.web.models import confusion_png

    return _png(confusion_png(console(request).settings, role), "held-out confusion figures in this model's card")


@router.get("/audit", summary="the audit trail, newest first")
def audit_trail(
    request: Request, action: str | None = None, actor: str | None = None, limit: int = 200, p: Principal = Member
) -> Any:
    return _json(audit.recent(console(request).store, action=action, actor=actor, limit=min(limit, 5000)))


class NewUser(BaseModel):
    name: str
    role: str
    password: str


@router.get("/users", summary="console users (admin only)")
def list_users(request: Request, p: Principal = Admin) -> Any:
    return _json(users.listing(console(request).store))


@router.post("/users", summary="add a user, or set a new password and role (admin only)")
def add_user(request: Request, body: NewUser, p: Principal = Admin) -> Any:
    try:
        made = users.add(console(request).store, body.name, body.role, body.password, replace=True)
    except users.UserError as exc:
        audited(request, p, "user_add", body.name, "refused", reason=str(exc))
        raise HTTPException(422, str(exc)) from exc
    audited(request, p, "user_add", made.name, role=made.role)
    return asdict(made)
