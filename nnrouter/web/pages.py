"""The console's pages: server-rendered (Jinja2), a form for each change, a little JavaScript for the rules editor.

Each page shows what an API route returns and each form does what an API
route does (``nnrouter.web.api``): the same library calls, the same audit
rows. A form posts, the change is made, and the browser is sent back to the
page with a message (post, redirect, get), so a reload never repeats it.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from nnrouter.core import audit
from nnrouter.web import auth, dashboard, studies
from nnrouter.web.auth import Principal
from nnrouter.web.deps import admin, audited, console, member, reader

router = APIRouter(include_in_schema=False)

Reader = Depends(reader)
Member = Depends(member)
Admin = Depends(admin)


def page(request: Request, template: str, p: Principal | None, **context: Any) -> HTMLResponse:
    c = console(request)
    flash = request.session.pop("flash", None)
    return c.templates.TemplateResponse(
        request,
        template,
        {
            "principal": p,
            "csrf": auth.csrf_token(request),
            "flash": flash,
            "node": c.settings.node.name,
            **context,
        },
    )


def back(request: Request, to: str, message: str) -> RedirectResponse:
    request.session["flash"] = message
    return RedirectResponse(to, status_code=303)


# --- login -----------------------------------------------------------------------


@router.get("/login")
def login_form(request: Request, next: str = "/") -> HTMLResponse:
    return page(request, "login.html", None, next=next if next.startswith("/") else "/", error=None)


@router.post("/login")
async def login(request: Request, name: str = Form(""), password: str = Form(""), next: str = Form("/")) -> Response:
    c = console(request)
    if not await auth.csrf_sent(request):
        return page(request, "login.html", None, next=next, error="the form has expired: try again")
    error = auth.login(request, c.settings, c.store, name, password)
    if error is not None:
        return page(request, "login.html", None, next=next, error=error)
    return RedirectResponse(next if next.startswith("/") and not next.startswith("//") else "/", status_code=303)


@router.post("/logout")
def logout(request: Request, p: Principal = Member) -> Response:
    audited(request, p, "logout")
    auth.logout(request, console(request).store)
    return RedirectResponse("/login", status_code=303)


# --- dashboard ------------------------------------------------------------------------


@router.get("/")
def home(request: Request, p: Principal = Reader) -> HTMLResponse:
    c = console(request)
    figures = dashboard.dashboard(c.settings, c.store, expect_stages=c.expect_stages)
    return page(request, "dashboard.html", p, d=figures, chart=dashboard.chart_svg(figures["activity"]["per_minute"]))


# --- studies -----------------------------------------------------------------------------


def _query(form: dict[str, Any]) -> studies.StudyQuery:
    def val(key: str) -> str | None:
        v = str(form.get(key) or "").strip()
        return v or None

    try:
        pg = max(1, int(str(form.get("page") or 1)))
    except ValueError:
        pg = 1
    return studies.StudyQuery(
        patient_id=val("patient_id"),
        accession_number=val("accession_number"),
        date_from=val("date_from"),
        date_to=val("date_to"),
        modality=val("modality"),
        calling_ae=val("calling_ae"),
        label=val("label"),
        flag=val("flag"),
        page=pg,
    )


def _studies_page(request: Request, p: Principal, q: studies.StudyQuery) -> HTMLResponse:
    from nnrouter.core import codes
    from nnrouter.orders.order import FlagKind

    found = studies.search(console(request).store, q, patients=p.sees_patients)
    return page(
        request,
        "studies.html",
        p,
        q=q,
        found=found,
        labels=[*codes.nncpr_labels(), "unknown"],
        flag_kinds=list(FlagKind.ALL),
    )


@router.get("/studies")
def studies_list(request: Request, p: Principal = Reader) -> HTMLResponse:
    params = dict(request.query_params)
    params.pop("patient_id", None)  # never from a URL
    return _studies_page(request, p, _query(params))


@router.post("/studies")
async def studies_search(request: Request, p: Principal = Member) -> HTMLResponse:
    return _studies_page(request, p, _query(dict(await request.form())))


@router.get("/studies/{study_uid}")
def study_page(request: Request, study_uid: str, p: Principal = Reader) -> HTMLResponse:
    from nnrouter.results.views import StudyNotFound, study_layout
    from nnrouter.web.api import report_of

    c = console(request)
    report = report_of(request, study_uid)
    try:
        layout: dict[str, Any] | None = study_layout(c.store, study_uid)
        layout_error = None
    except (StudyNotFound, ValueError) as exc:
        layout, layout_error = None, str(exc)
    patient = studies.patients_of(c.store, study_uid) if p.sees_patients else None
    return page(request, "study.html", p, r=report, layout=layout, layout_error=layout_error, patient=patient)


# --- mismatches ---------------------------------------------------------------------------


@router.get("/mismatches")
def mismatches(request: Request, every: bool = False, unresolved: bool = False, p: Principal = Reader) -> HTMLResponse:
    from nnrouter.results.views import flagged

    rows = flagged(console(request).store, every=every, unresolved=unresolved, limit=500)
    return page(request, "mismatches.html", p, rows=rows, every=every, unresolved=unresolved)


@router.post("/mismatches/review")
def review(
    request: Request,
    study_uid: str = Form(...),
    kind: str = Form(...),
    sop_instance_uid: str = Form(""),
    state: str = Form(...),
    comment: str = Form(""),
    to: str = Form("/mismatches"),
    p: Principal = Member,
) -> Response:
    from nnrouter.orders.reviews import ReviewError
    from nnrouter.orders.reviews import review as keep

    to = to if to.startswith("/") and not to.startswith("//") else "/mismatches"
    from nnrouter.orders.reviews import STATES

    if state not in STATES:
        return back(request, to, f"not kept: state must be one of {', '.join(STATES)}")
    try:
        keep(console(request).store, study_uid, kind, sop_instance_uid or None, state, comment, p.name)
    except ReviewError as exc:
        audited(request, p, f"flag_{state}", study_uid, "refused", kind=kind, reason=str(exc))
        return back(request, to, f"not kept: {exc}")
    audited(request, p, f"flag_{state}", study_uid, kind=kind, sop_instance_uid=sop_instance_uid or None)
    return back(request, to, f"{kind} {state}")


# --- rules ------------------------------------------------------------------------------------


@router.get("/rules")
def rules_home() -> Response:
    return RedirectResponse("/rules/rules", status_code=303)


@router.get("/rules/{kind}")
def rules_page(request: Request, kind: str, p: Principal = Reader) -> HTMLResponse:
    from nnrouter.routing import versions

    c = console(request)
    try:
        path = versions.path_of(c.settings, kind)
    except versions.NotEditable as exc:
        raise HTTPException(404, str(exc)) from exc
    text = versions.current_text(c.settings, kind)
    with c.store.read() as s:
        from sqlalchemy import select

        from nnrouter.core.store import Study

        recent = list(s.execute(select(Study.study_uid).order_by(Study.last_received_at.desc()).limit(20)).scalars())
    return page(
        request,
        "rules.html",
        p,
        kind=kind,
        path=str(path),
        text=text,
        digest=versions.digest(text),
        problems=versions.check(c.settings, kind, text),
        status=c.store.rules_status(kind),
        versions=versions.versions(c.store, kind),
        recent=recent,
    )


@router.get("/versions/{version_id}")
def version_page(request: Request, version_id: int, p: Principal = Reader) -> HTMLResponse:
    from nnrouter.routing import versions

    v = versions.version(console(request).store, version_id)
    if v is None:
        raise HTTPException(404, f"no saved version {version_id}")
    return page(request, "version.html", p, v=v)


@router.post("/versions/{version_id}/restore")
def restore(request: Request, version_id: int, p: Principal = Admin) -> Response:
    from nnrouter.routing import versions

    c = console(request)
    v = versions.version(c.store, version_id)
    to = f"/rules/{v['kind']}" if v else "/rules"
    try:
        saved = versions.restore(c.settings, c.store, version_id, p.name)
    except (versions.NotEditable, versions.Invalid) as exc:
        audited(request, p, "version_restore", str(version_id), "refused")
        return back(request, to, f"not restored: {exc}")
    audited(request, p, "version_restore", str(version_id), version=saved.version["id"])
    return back(request, to, f"version {version_id} restored as version {saved.version['id']}")


# --- outbox ------------------------------------------------------------------------------------


@router.get("/outbox")
def outbox(request: Request, destination: str | None = None, state: str | None = None, p: Principal = Reader) -> Any:
    from nnrouter.routing.deliveries import list_deliveries, paused
    from nnrouter.service import pressure

    c = console(request)
    ruleset = c.running_rules()
    names = sorted({d.name for d in ruleset.destinations} if ruleset else set())
    counts = c.store.outbox_counts()
    rows = list_deliveries(c.store, [state] if state else None, [destination] if destination else None, None, limit=500)
    return page(
        request,
        "outbox.html",
        p,
        destinations=sorted(set(names) | set(counts)),
        counts=counts,
        backlog=pressure.measure(c.settings, c.store).as_dict()["outbox"],
        paused=paused(c.store),
        rows=rows,
        destination=destination,
        state=state,
        states=["pending", "sending", "sent", "failed", "dead", "held"],
    )


@router.post("/outbox/action")
def outbox_action(
    request: Request,
    action: str = Form(...),
    destination: str = Form(""),
    ids: str = Form(""),
    states: str = Form(""),
    p: Principal = Member,
) -> Response:
    from nnrouter.routing import deliveries

    c = console(request)
    to = "/outbox" + (f"?destination={quote(destination)}" if destination else "")
    if action not in ("echo", "retry", "purge", "pause", "resume"):
        return back(request, to, "unknown action")
    if action == "echo":
        from nnrouter.web.api import echo

        got = echo(request, destination, p)
        return back(
            request,
            to,
            f"C-ECHO {destination}: "
            + (f"status {got['status']}" if got["ok"] else f"failed: {got['error'] or got['status']}"),
        )
    if not p.admin:
        audited(request, p, f"outbox_{action}", destination or None, "refused", reason="viewer")
        raise auth.Forbidden(f"{p.name} is a viewer: only an admin may {action}")
    picked = [int(i) for i in ids.replace(",", " ").split() if i.isdigit()] or None
    dests = [destination] if destination else None
    wanted = [st for st in states.replace(",", " ").split() if st] or None
    if action == "retry":
        done = deliveries.retry(c.store, wanted or list(deliveries.RETRYABLE), dests, None, picked)
        audited(request, p, "outbox_retry", destination or None, queued=len(done), ids=done[:100])
        return back(request, to, f"{len(done)} deliveries queued again")
    if action == "purge":
        done = deliveries.purge(c.store, wanted or list(deliveries.PURGEABLE), dests, None, picked)
        audited(request, p, "outbox_purge", destination or None, removed=len(done), ids=done[:100])
        return back(request, to, f"{len(done)} outbox rows removed")
    if action in ("pause", "resume") and destination:
        changed = (
            deliveries.pause(c.store, destination, p.name)
            if action == "pause"
            else deliveries.resume(c.store, destination)
        )
        audited(request, p, f"destination_{action}", destination, changed=changed)
        return back(request, to, f"{destination} {'paused' if action == 'pause' else 'resumed'}")
    return back(request, to, f"unknown action {action!r}")


# --- models, audit ----------------------------------------------------------------------------------


@router.get("/models")
def models_page(request: Request, p: Principal = Reader) -> HTMLResponse:
    from nnrouter.web.models import describe

    return page(request, "models.html", p, models=describe(console(request).settings))


@router.get("/audit")
def audit_page(request: Request, action: str | None = None, p: Principal = Member) -> HTMLResponse:
    return page(request, "audit.html", p, rows=audit.recent(console(request).store, action=action, limit=300))
