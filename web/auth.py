"""Bearer-token authentication: API tokens for users, one shared credential for hosts.

Owns token creation (only a sha256 of each token is stored) and the `current` principal of a
request. Tenancy: everything a user sees is filtered by `current().project_id`.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps
from typing import Any

from flask import current_app, g, request
from flask_smorest import abort
from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from fleet.contract import NAME_RE
from fleet.store.models import ApiToken, Project, User

TOKEN_PREFIX = "vf_"


@dataclass(frozen=True)
class Principal:
    """Who is calling: a user of a project, or a host fetching images."""

    user_id: int | None
    name: str
    project_id: int | None
    project: str
    is_admin: bool
    is_host: bool = False


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(session: Session, user: str, project: str, admin: bool = False,
                 name: str = "") -> str:
    """Make (or reuse) the project and user and return a new token, shown only once."""
    for value, what in ((user, "user"), (project, "project")):
        if not NAME_RE.match(value):
            raise ValueError(f"{what} name must match {NAME_RE.pattern}")
    proj = session.scalars(select(Project).where(Project.name == project)).first()
    if proj is None:
        proj = Project(name=project)
        session.add(proj)
        session.flush()
    usr = session.scalars(select(User).where(User.name == user)).first()
    if usr is None:
        usr = User(name=user, project_id=proj.id, is_admin=admin)
        session.add(usr)
        session.flush()
    elif admin and not usr.is_admin:
        usr.is_admin = True
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiToken(user_id=usr.id, token_sha256=hash_token(token), name=name))
    return token


def _bearer() -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def authenticate(allow_host: bool = False) -> Principal:
    token = _bearer()
    if token is None:
        abort(401, message="missing bearer token: send 'Authorization: Bearer <token>'")
    settings = current_app.extensions["virtfleet.settings"]
    if allow_host and settings.host_token and hmac.compare_digest(token, settings.host_token):
        return Principal(None, "host", None, "", False, is_host=True)
    store = current_app.extensions["virtfleet.store"]
    with store.read_engine.connect() as conn:  # every request: one Core statement, no ORM
        row = conn.execute(_WHO, {"sha": hash_token(token)}).first()
    if row is None:
        abort(401, message="invalid or revoked token")
    user_id, name, project_id, project, is_admin = row
    return Principal(user_id, name, project_id, project, bool(is_admin))


_WHO = (select(User.id, User.name, User.project_id, Project.name, User.is_admin)
        .join(ApiToken, ApiToken.user_id == User.id)
        .join(Project, Project.id == User.project_id)
        .where(ApiToken.token_sha256 == bindparam("sha")))
"""The user and project of a token's hash."""


def login_required(allow_host: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        @wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            g.principal = authenticate(allow_host)
            return fn(*args, **kwargs)
        return wrapper
    return deco


def current() -> Principal:
    return g.principal


def require_admin() -> None:
    if not current().is_admin:
        abort(403, message="this needs an admin token")
