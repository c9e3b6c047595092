"""The console's application: one FastAPI app for the pages, /api/, /metrics, /healthz and /readyz.

``create_app`` is called once per process with the settings read once and
the process's store; nothing is global. Sessions are signed cookies
(``auth``), every HTML and JSON answer says not to cache or frame it.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.middleware.sessions import SessionMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nnrouter.core.config import Settings
from nnrouter.core.store import Store
from nnrouter.web import api, dicomweb, pages
from nnrouter.web.auth import Forbidden, NotLoggedIn, session_secret
from nnrouter.web.deps import Console

HERE = Path(__file__).parent


class _NoStore:
    """Headers on every answer: no caching of patient pages, no framing (clickjacking), no MIME sniffing."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                extra = [
                    (b"x-frame-options", b"DENY"),
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"same-origin"),
                ]
                if b"cache-control" not in names:
                    extra.append((b"cache-control", b"no-store"))
                message["headers"] = headers + extra
            await send(message)

        await self.app(scope, receive, wrapped)


def create_app(settings: Settings, store: Store, *, expect_stages: bool = True) -> FastAPI:
    """The console for this node. ``expect_stages`` False: ``nnrouter web`` alone, no ``serve`` beside it."""
    from nnrouter.cli.parser import version

    app = FastAPI(
        title="nnrouter",
        version=version(),
        description="The REST API of nnrouter's console: studies, mismatches, rules, outbox, models, audit.",
        openapi_url="/api/openapi.json",
        docs_url="/api/docs",
        redoc_url=None,
    )
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    app.state.console = Console(settings, store, templates, expect_stages)
    app.add_middleware(
        SessionMiddleware,
        secret_key=session_secret(store),
        session_cookie="nnrouter_session",
        max_age=int(settings.http.session_hours * 3600),
        same_site="strict",
        https_only=settings.http.cookies_secure,
    )
    app.add_middleware(_NoStore)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    def for_programs(request: Request) -> bool:
        return request.url.path.startswith(("/api/", "/dicom-web/"))

    @app.exception_handler(NotLoggedIn)
    async def _login_first(request: Request, exc: NotLoggedIn) -> Response:
        if for_programs(request):
            return JSONResponse({"detail": "log in first (session) or send Authorization: Bearer <token>"}, 401)
        from urllib.parse import quote

        return RedirectResponse(f"/login?next={quote(request.url.path)}", status_code=303)

    @app.exception_handler(Forbidden)
    async def _forbidden(request: Request, exc: Forbidden) -> Response:
        if for_programs(request):
            return JSONResponse({"detail": exc.reason}, 403)
        return PlainTextResponse(exc.reason, 403)

    @app.get("/healthz", include_in_schema=True, tags=["health"], summary="the process lives")
    def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz", tags=["health"], summary="database, schema, spool space, every stage alive")
    def readyz() -> Response:
        from nnrouter.service.health import readiness

        r = readiness(settings, store, expect_stages=expect_stages)
        return JSONResponse(r.as_dict(), 200 if r.ready else 503)

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics, read from the store at each scrape")
    def metrics() -> Response:
        from nnrouter.web.metrics import render

        body, content_type = render(settings, store, expect_stages=expect_stages)
        return Response(body, media_type=content_type)

    app.include_router(api.router)
    app.include_router(dicomweb.router)
    app.include_router(pages.router)
    return app
