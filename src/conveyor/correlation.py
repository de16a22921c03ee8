"""The correlation id of the work in hand: an HTTP request, or the job it became.

Bound at HTTP ingress and again while a job runs; read when enqueueing (a job enqueued by a
job inherits it), when logging, and when a task calls out over HTTP.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Generator

import structlog

HEADER = "X-Correlation-ID"

_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("conveyor_correlation_id", default=None)


def current_correlation_id() -> str | None:
    return _current.get()


def bind_correlation_id(correlation_id: str | None) -> contextvars.Token[str | None]:
    """Make ``correlation_id`` current until ``reset_correlation_id``; the caller binds the log field."""
    return _current.set(correlation_id)


def reset_correlation_id(token: contextvars.Token[str | None]) -> None:
    _current.reset(token)


@contextlib.contextmanager
def correlated(correlation_id: str | None) -> Generator[None]:
    """Make ``correlation_id`` current (and a field of every log line) for the block."""
    token = _current.set(correlation_id)
    try:
        if correlation_id is None:
            yield
        else:
            with structlog.contextvars.bound_contextvars(correlation_id=correlation_id):
                yield
    finally:
        _current.reset(token)
