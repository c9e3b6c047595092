"""What every route needs: the console (settings, store, templates), who is asking, and the audit of a change.

``reader`` lets in a logged-in user, or anyone for a read where
``http.allow_anonymous_read`` says so; ``member`` is any logged-in user
(reviewing a flag is the technologist's and radiologist's work); ``admin``
changes rules, retries, purges, pauses and users. The last two check the
CSRF token of a session's change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, Request
from fastapi.templating import Jinja2Templates

from nnrouter.core import audit
from nnrouter.core.config import Settings
from nnrouter.core.store import Store
from nnrouter.web.auth import Forbidden, NotLoggedIn, Principal, check_csrf, client_address, identify


@dataclass
class Console:
    settings: Settings
    store: Store
    templates: Jinja2Templates
    expect_stages: bool = True
    _destinations: Any = field(default=None, repr=False)

    def running_rules(self) -> Any:
        """The rule set the router runs (its destinations), read from the store; parsed again only when it changed."""
        from nnrouter.routing.forward import Destinations

        if self._destinations is None:
            self._destinations = Destinations(self.settings, self.store)
        return self._destinations.current()


def console(request: Request) -> Console:
    c: Console = request.app.state.console
    return c


async def reader(request: Request) -> Principal:
    c = console(request)
    p = identify(request, c.store)
    if p is not None:
        await check_csrf(request, p)
        return p
    if c.settings.http.allow_anonymous_read and request.method in ("GET", "HEAD"):
        return Principal(None, "anonymous")
    raise NotLoggedIn()


async def member(request: Request) -> Principal:
    p = identify(request, console(request).store)
    if p is None:
        raise NotLoggedIn()
    await check_csrf(request, p)
    return p


async def admin(request: Request, p: Principal = Depends(member)) -> Principal:  # noqa: B008 - FastAPI's idiom
    if not p.admin:
        raise Forbidden(f"{p.name} is a viewer: only an admin may do this")
    return p


def audited(
    request: Request, p: Principal, action: str, target: str | None = None, result: str = "ok", **detail: Any
) -> None:
    """One audit row for a change made through the console or the API."""
    c = console(request)
    audit.record(
        c.store,
        source="api" if request.url.path.startswith("/api/") else "console",
        actor=p.name,
        address=client_address(request),
        action=action,
        target=target,
        result=result,
        node=c.settings.node.name,
        **detail,
    )
