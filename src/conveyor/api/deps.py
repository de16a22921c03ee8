"""Dependencies: the app, the watcher, and who is calling. Read from ``app.state``, never globals."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

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

    async def required(self) -> bool:
        now = time.monotonic()
        if now - self._checked_at > self._ttl:
            # Revoking the last token must not open the server: any token ever made counts.
            self._required = await self._store.count_tokens() > 0
            self._checked_at = now
        return self._required


# Async, though they only read app.state: FastAPI runs a plain-def dependency in its thread pool,
# a thread hop per dependency per request.
async def get_conveyor(request: Request) -> Conveyor:
    return request.app.state.conveyor


async def get_watcher(request: Request) -> JobWatcher:
    return request.app.state.watcher


ConveyorDep = Annotated[Conveyor, Depends(get_conveyor)]
WatcherDep = Annotated[JobWatcher, Depends(get_watcher)]

_bearer = HTTPBearer(auto_error=False, description="An API token from `conveyor tokens create`.")
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


async def authenticate(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Principal:
    conveyor: Conveyor = request.app.state.conveyor
    gate: AuthGate = request.app.state.auth_gate
    if credentials is None:
        if request.headers.get("authorization"):
            raise ApiError(401, "unauthorized", "use 'Authorization: Bearer <token>'", headers=_CHALLENGE)
        if not await gate.required():
            return Principal(ANONYMOUS, (Scope.ADMIN.value,))
        raise ApiError(401, "unauthorized", "this server needs an API token", headers=_CHALLENGE)
    parsed = parse_token(credentials.credentials)
    store = await conveyor.store()
    record = await store.get_token(parsed[0]) if parsed else None
    if parsed is None or record is None or record.revoked_at is not None or not secret_matches(record, parsed[1]):
        raise ApiError(401, "unauthorized", "the token is not valid (unknown, revoked or mistyped)", headers=_CHALLENGE)
    return Principal(record.id, record.scopes)


def require(scope: Scope) -> Callable[..., Awaitable[Principal]]:
    async def check(principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
        if not (Scope.ADMIN.value in principal.scopes or scope.value in principal.scopes):
            raise ApiError(403, "forbidden", f"this token lacks the {scope.value!r} scope", {"needed": scope.value})
        return principal

    return check


CanRead = Annotated[Principal, Depends(require(Scope.JOBS_READ))]
CanWrite = Annotated[Principal, Depends(require(Scope.JOBS_WRITE))]
Authenticated = Annotated[Principal, Depends(authenticate)]
