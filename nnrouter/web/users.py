"""Console users: argon2id password hashes (argon2-cffi), roles, API tokens.

A viewer sees; an admin also changes rules, retries, purges and pauses. The
hash keeps its own salt and parameters, so raising argon2's cost later
re-hashes each password at its next login (``check_needs_rehash``).
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import secrets
from dataclasses import dataclass
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, select

from nnrouter.core.store import ConsoleSession, ConsoleUser, Store, as_utc, utcnow

ROLES = ("viewer", "admin")
MIN_PASSWORD = 10


class UserError(ValueError):
    """A user that cannot be made or changed as asked: the message says why."""


@dataclass(frozen=True)
class User:
    name: str
    role: str

    @property
    def admin(self) -> bool:
        return self.role == "admin"


def start_session(store: Store, name: str, hours: float, address: str | None) -> str:
    """A new login of ``name`` for ``hours``: the token for the cookie (the store keeps its digest only)."""
    token = secrets.token_urlsafe(32)
    now = utcnow()
    with store.write() as s:
        s.execute(delete(ConsoleSession).where(ConsoleSession.expires_at < now))  # the expired ones, by the way
        s.add(
            ConsoleSession(
                token_sha256=token_digest(token),
                user=name,
                created_at=now,
                expires_at=now + dt.timedelta(hours=hours),
                address=address,
            )
        )
    return token


def session_user(store: Store, token: str) -> User | None:
    """The enabled user of a login that has not expired or ended; None otherwise."""
    with store.read() as s:
        row = s.get(ConsoleSession, token_digest(token))
        if row is None or as_utc(row.expires_at) < utcnow():
            return None
        name = row.user
    return lookup(store, name)


def end_session(store: Store, token: str) -> None:
    with store.write() as s:
        s.execute(delete(ConsoleSession).where(ConsoleSession.token_sha256 == token_digest(token)))


def _end_sessions_of(s: Any, name: str) -> None:
    s.execute(delete(ConsoleSession).where(ConsoleSession.user == name))


def _hasher() -> PasswordHasher:
    return PasswordHasher()


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def add(store: Store, name: str, role: str, password: str, *, replace: bool = False) -> User:
    """Create (or with ``replace`` reset) a user; raises UserError for a bad name, role or password."""
    name = name.strip()
    if not name or len(name) > 64 or not name.isprintable() or " " in name:
        raise UserError("a user name is 1-64 printable characters without spaces")
    if role not in ROLES:
        raise UserError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    if len(password) < MIN_PASSWORD:
        raise UserError(f"a password has at least {MIN_PASSWORD} characters")
    hashed = _hasher().hash(password)
    with store.write() as s:
        row = s.execute(select(ConsoleUser).where(ConsoleUser.name == name)).scalar_one_or_none()
        if row is not None and not replace:
            raise UserError(f"user {name} exists (use --replace to set a new password and role)")
        if row is None:
            s.add(ConsoleUser(name=name, role=role, password_hash=hashed))
        else:
            # A new password ends the old token and every login: whoever had them must log in again.
            row.role, row.password_hash, row.disabled, row.token_sha256 = role, hashed, False, None
            _end_sessions_of(s, name)
    return User(name, role)


def authenticate(store: Store, name: str, password: str) -> User | None:
    """The user if the password is right and the user is enabled; None otherwise (same time either way)."""
    hasher = _hasher()
    with store.read() as s:
        row = s.execute(select(ConsoleUser).where(ConsoleUser.name == name)).scalar_one_or_none()
    stored = row.password_hash if row is not None else _dummy_hash()
    try:
        hasher.verify(stored, password)
    except (VerificationError, InvalidHashError):
        return None
    if row is None or row.disabled:
        return None
    if hasher.check_needs_rehash(stored):
        with store.write() as s:
            s.execute(select(ConsoleUser).where(ConsoleUser.id == row.id)).scalar_one().password_hash = hasher.hash(
                password
            )
    return User(row.name, row.role)


def lookup(store: Store, name: str) -> User | None:
    """The enabled user of this name (a session is only as good as the user behind it now)."""
    with store.read() as s:
        row = s.execute(select(ConsoleUser).where(ConsoleUser.name == name)).scalar_one_or_none()
    return None if row is None or row.disabled else User(row.name, row.role)


def by_token(store: Store, token: str) -> User | None:
    with store.read() as s:
        row = s.execute(select(ConsoleUser).where(ConsoleUser.token_sha256 == token_digest(token))).scalar_one_or_none()
    return None if row is None or row.disabled else User(row.name, row.role)


def new_token(store: Store, name: str) -> str:
    """A new API token for ``name`` (the old one stops working); only its digest is kept."""
    token = secrets.token_urlsafe(32)
    with store.write() as s:
        row = s.execute(select(ConsoleUser).where(ConsoleUser.name == name)).scalar_one_or_none()
        if row is None:
            raise UserError(f"no user {name}")
        row.token_sha256 = token_digest(token)
    return token


def set_disabled(store: Store, name: str, disabled: bool) -> None:
    with store.write() as s:
        row = s.execute(select(ConsoleUser).where(ConsoleUser.name == name)).scalar_one_or_none()
        if row is None:
            raise UserError(f"no user {name}")
        row.disabled = disabled
        if disabled:
            row.token_sha256 = None
            _end_sessions_of(s, name)


def listing(store: Store) -> list[dict[str, object]]:
    with store.read() as s:
        rows = s.execute(select(ConsoleUser).order_by(ConsoleUser.name)).scalars().all()
    return [
        {
            "name": r.name,
            "role": r.role,
            "disabled": r.disabled,
            "token": r.token_sha256 is not None,
            "created_at": r.created_at,
        }
        for r in rows
    ]


@functools.cache
def _dummy_hash() -> str:
    """A hash to verify against when the user does not exist: a wrong name costs as long as a wrong password."""
    return _hasher().hash(secrets.token_hex(16))
