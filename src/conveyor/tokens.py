"""API tokens: made once, shown once, stored only as a hash, checked in constant time."""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from conveyor.jobs import TokenRecord

PREFIX = "cvy"
_TOKEN = re.compile(rf"^{PREFIX}_(?P<id>[0-9a-f]{{12}})_(?P<secret>[A-Za-z0-9_-]{{43}})$")


class Scope(enum.StrEnum):
    JOBS_READ = "jobs:read"
    """Read jobs, queues and tasks."""
    JOBS_WRITE = "jobs:write"
    """Submit, cancel and retry jobs."""
    ADMIN = "admin"
    """Everything."""


def _hash(secret: str) -> str:
    # The secret is 256 random bits: a fast hash is enough, no key stretching needed.
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class NewToken:
    record: TokenRecord
    plaintext: str
    """The token itself. Shown to its owner once; nothing keeps it."""


def create_token(name: str, scopes: Iterable[Scope | str], *, now: datetime) -> NewToken:
    chosen = tuple(sorted({Scope(scope).value for scope in scopes}))
    if not chosen:
        raise ValueError("a token needs at least one scope: jobs:read, jobs:write or admin")
    token_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    record = TokenRecord(id=token_id, name=name, secret_hash=_hash(secret), scopes=chosen, created_at=now)
    return NewToken(record=record, plaintext=f"{PREFIX}_{token_id}_{secret}")


def parse_token(plaintext: str) -> tuple[str, str] | None:
    """``(id, secret)`` of a well-formed token, else None."""
    match = _TOKEN.match(plaintext)
    return (match["id"], match["secret"]) if match else None


def secret_matches(record: TokenRecord, secret: str) -> bool:
    return hmac.compare_digest(record.secret_hash, _hash(secret))


def grants(record: TokenRecord, needed: Scope) -> bool:
    return Scope.ADMIN.value in record.scopes or needed.value in record.scopes
