"""Who is asking, and may they: sessions, API tokens, CSRF, and the brake on password guessing.

A browser logs in once and carries a signed session cookie (Starlette's
SessionMiddleware, key kept in the store so every node's console accepts
it) holding the token of a login kept in the store (``console_session``):
logging out, disabling the user or a new password ends it everywhere, a
copy of the cookie included, and it ends by itself after
``http.session_hours``. A script sends ``Authorization: Bearer <token>`` (``nnrouter users
token``). Every change a session makes carries the session's CSRF token, in
the form (``csrf``) or in the ``X-CSRF-Token`` header, or is refused: a page
of another site cannot make a logged-in admin's browser change the rules.
Failed logins are audited, and counted there: five from one address or for
one name within five minutes (``http.login_failures``, ``login_window_s``)
refuse further tries until the window has passed, on every node.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass

from fastapi import Request

from nnrouter.core import audit, logs
from nnrouter.core.config import Settings
from nnrouter.core.store import ConsoleSecret, Store
from nnrouter.web import users

log = logs.get("nnrouter.web")

UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@dataclass(frozen=True)
class Principal:
    """The one asking: a user (by session or token), or nobody where anonymous reading is allowed."""

    user: users.User | None
    via: str  # session | token | anonymous

    @property
    def name(self) -> str:
        return self.user.name if self.user else "anonymous"

    @property
    def admin(self) -> bool:
        return self.user is not None and self.user.admin

    @property
    def sees_patients(self) -> bool:
        """Patient names and IDs are shown to logged-in users only."""
        return self.user is not None


class NotLoggedIn(Exception):
    """No session or token where one is needed: pages redirect to the login, the API answers 401."""


class Forbidden(Exception):
    """Logged in, but not allowed this (a viewer saving rules, a change without its CSRF token)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def session_secret(store: Store) -> str:
    """The cookie-signing key of this store, made on first use: row 1, so processes starting together agree."""
    from sqlalchemy.exc import IntegrityError

    try:
        with store.write() as s:
            if s.get(ConsoleSecret, 1) is None:
                s.add(ConsoleSecret(id=1, secret=secrets.token_urlsafe(48)))
    except IntegrityError:  # another process made it first: theirs is the one
        pass
    with store.read() as s:
        return s.get_one(ConsoleSecret, 1).secret


def client_address(request: Request) -> str:
    return request.client.host if request.client else "?"


def csrf_token(request: Request) -> str:
    """This session's CSRF token, made with the session (before login, for the login form itself)."""
    token = request.session.get("csrf")
    if not token:
        token = request.session["csrf"] = secrets.token_urlsafe(24)
    return str(token)


def identify(request: Request, store: Store) -> Principal | None:
    """The user behind a bearer token or the session; None when there is neither."""
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        user = users.by_token(store, header[7:].strip())
        return Principal(user, "token") if user else None
    sid = request.session.get("sid")
    if sid:
        user = users.session_user(store, str(sid))
        if user is not None:
            return Principal(user, "session")
        request.session.clear()  # logged out (here or on a copy of the cookie), expired, or the user disabled
    return None


def logout(request: Request, store: Store) -> None:
    """End this login in the store, so a copy of the cookie is worth nothing either."""
    sid = request.session.get("sid")
    if sid:
        users.end_session(store, str(sid))
    request.session.clear()


async def check_csrf(request: Request, principal: Principal) -> None:
    """A session's change must carry its CSRF token; a token-authenticated call needs none (no cookie rides along)."""
    if request.method not in UNSAFE or principal.via != "session":
        return
    if not await csrf_sent(request):
        raise Forbidden("CSRF token missing or wrong: reload the page and try again")


async def csrf_sent(request: Request) -> bool:
    """Whether the request carries this session's CSRF token (header, or the form's ``csrf`` field)."""
    sent = request.headers.get("x-csrf-token")
    if sent is None and request.headers.get("content-type", "").startswith(
        ("application/x-www-form-urlencoded", "multipart/form-data")
    ):
        sent = str((await request.form()).get("csrf") or "")
    expected = request.session.get("csrf")
    return bool(sent and expected and hmac.compare_digest(str(sent), str(expected)))


def login_refused(settings: Settings, store: Store, name: str, address: str) -> bool:
    """Too many failed logins lately for this user or from this address."""
    since = audit.since(settings.http.login_window_s)
    limit = settings.http.login_failures
    return (
        audit.count_since(store, "login", since, result="refused", address=address) >= limit
        or audit.count_since(store, "login", since, result="refused", actor=name[:64]) >= limit
    )


def login(request: Request, settings: Settings, store: Store, name: str, password: str) -> str | None:
    """Log in: None on success (a new session), else the reason to show. Every try is audited."""
    address = client_address(request)
    name = name.strip()
    # A name that is no user's is not written down: it may be a password typed in the wrong field.
    actor = name if users.lookup(store, name) is not None else "(not a user)"

    def tried(result: str) -> None:
        audit.record(
            store,
            source="console",
            actor=actor,
            address=address,
            action="login",
            result=result,
            node=settings.node.name,
        )

    if login_refused(settings, store, actor, address):
        log.warning("login_rate_limited", user=actor, address=address)
        tried("limited")
        return f"too many failed logins: wait {settings.http.login_window_s:.0f} s and try again"
    user = users.authenticate(store, name, password)
    if user is None:
        log.warning("login_failed", user=actor, address=address)
        tried("refused")
        return "wrong user name or password"
    request.session.clear()  # a new session: no fixation of one set before the login
    sid = users.start_session(store, user.name, settings.http.session_hours, address)
    request.session.update(sid=sid, csrf=secrets.token_urlsafe(24))
    log.info("login", user=user.name, address=address)
    audit.record(store, source="console", actor=user.name, address=address, action="login", node=settings.node.name)
    return None
