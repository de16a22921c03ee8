"""Dependencies: the app, the watcher, and who is calling. Read from ``app.state``, never globals."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.openapi.models import HTTPBearer as HTTPBearerModel
from fastapi.security.base import SecurityBase
from fastapi.security.utils import get_authorization_scheme_param

from conveyor.api.errors import ApiError
from conveyor.api.watch import JobWatcher
from conveyor.app import Conveyor
from conveyor.storage import Store
from conveyor.tokens import Scope, parse_token, secret_matches

ANONYMOUS = "anonymous"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who made the request: a token's id, or ``anonymous`` when the server runs open."""

    id: str
    scopes: tuple[str, ...]


class AuthGate:
    """Decides whether requests need a token: yes once any token has been created (even if revoked).

    The answer is cached briefly, so the first ``conveyor tokens create`` on a running
    server closes it within ``ttl`` seconds without a query on every request.
    """

    def __init__(self, store: Store, ttl: float = 2.0) -> None:
        self._store = store
        self._ttl = ttl
        self._checked_at = float("-inf")
        self._required = True
        self._checking: asyncio.Future[bool] | None = None

    async def required(self) -> bool:
        now = time.monotonic()
        if now - self._checked_at <= self._ttl:
            return self._required
        # Requests that find the answer stale together share one query, not one each.
        if self._checking is None:
            self._checking = asyncio.ensure_future(self._check(now))
        return await asyncio.shield(self._checking)

    async def _check(self, now: float) -> bool:
        try:
            # Revoking the last token must not open the server: any token ever made counts.
            self._required = await self._store.count_tokens() > 0
            self._checked_at = now
            return self._required
        finally:
            self._checking = None


# Async, though they only read app.state: FastAPI runs a plain-def dependency in its thread pool,
# a thread hop per dependency per request.
async def get_conveyor(request: Request) -> Conveyor:
    return request.app.state.conveyor


async def get_watcher(request: Request) -> JobWatcher:
    return request.app.state.watcher


ConveyorDep = Annotated[Conveyor, Depends(get_conveyor)]
WatcherDep = Annotated[JobWatcher, Depends(get_watcher)]


def conveyor_of(request: Request) -> Conveyor:
    """The app, for the busiest routes: read in the route, since each dependency FastAPI solves
    costs more per request (about 15 µs) than these routes' own work outside the database."""
    return request.app.state.conveyor


def watcher_of(request: Request) -> JobWatcher:
    return request.app.state.watcher


_CHALLENGE = {"WWW-Authenticate": "Bearer"}


class TokenAuth(SecurityBase):
    """Who is calling, and whether they may: the bearer token read, checked and scoped in one step.

    One security dependency per route rather than a chain (the bearer scheme, then the token
    check, then the scope check): FastAPI solves every level of a dependency tree on every
    request, about 10 µs each. As a security scheme it still puts the bearer scheme in the
    OpenAPI document, under the name ``HTTPBearer`` as before.
    """

    def __init__(self, needed: Scope | None) -> None:
        self.model = HTTPBearerModel(description="An API token from `conveyor tokens create`.")
        self.scheme_name = "HTTPBearer"
        self.needed = needed

    async def __call__(self, request: Request) -> Principal:
        principal = await _authenticate(request)
        needed = self.needed
        if needed is not None and not (Scope.ADMIN.value in principal.scopes or needed.value in principal.scopes):
            raise ApiError(403, "forbidden", f"this token lacks the {needed.value!r} scope", {"needed": needed.value})
        return principal


async def _authenticate(request: Request) -> Principal:
    authorization = request.headers.get("authorization")
    scheme, credentials = get_authorization_scheme_param(authorization)
    state = request.app.state
    if not (scheme and credentials and scheme.lower() == "bearer"):
        if authorization:
            raise ApiError(401, "unauthorized", "use 'Authorization: Bearer <token>'", headers=_CHALLENGE)
        gate: AuthGate = state.auth_gate
        if not await gate.required():
            return _ANONYMOUS
        raise ApiError(401, "unauthorized", "this server needs an API token", headers=_CHALLENGE)
    conveyor: Conveyor = state.conveyor
    parsed = parse_token(credentials)
    store = await conveyor.store()
    record = await store.get_token(parsed[0]) if parsed else None
    if parsed is None or record is None or record.revoked_at is not None or not secret_matches(record, parsed[1]):
        raise ApiError(401, "unauthorized", "the token is not valid (unknown, revoked or mistyped)", headers=_CHALLENGE)
    return Principal(record.id, record.scopes)


_ANONYMOUS = Principal(ANONYMOUS, (Scope.ADMIN.value,))

# Called as dependencies, and directly by the routes that answer without FastAPI's handler.
can_read = TokenAuth(Scope.JOBS_READ)
can_write = TokenAuth(Scope.JOBS_WRITE)
CanRead = Annotated[Principal, Depends(can_read)]
CanWrite = Annotated[Principal, Depends(can_write)]
Authenticated = Annotated[Principal, Depends(TokenAuth(None))]
