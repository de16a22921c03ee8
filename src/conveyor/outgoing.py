"""Outgoing HTTP: the client Conveyor hands to tasks: it carries the job's correlation id and trace along.

    @app.task
    async def notify(url: str, ctx: JobContext = CONTEXT) -> int:
        response = await ctx.http.post(url, json={"ok": True})
        return response.status_code

Every request gets ``X-Correlation-ID`` and W3C trace headers of the running job, and a
timeout (10 s unless the task says otherwise).
"""

from __future__ import annotations

import contextvars
from typing import Any

import httpx
from opentelemetry import propagate

from conveyor.correlation import HEADER, current_correlation_id

DEFAULT_TIMEOUT = httpx.Timeout(10.0)

_client: contextvars.ContextVar[httpx.AsyncClient | None] = contextvars.ContextVar("conveyor_http", default=None)


def outgoing_headers() -> dict[str, str]:
    """Headers that tie an outgoing call to the work in hand; for clients of your own."""
    headers: dict[str, str] = {}
    correlation_id = current_correlation_id()
    if correlation_id:
        headers[HEADER] = correlation_id
    propagate.inject(headers)
    return headers


async def _tag(request: httpx.Request) -> None:
    for name, value in outgoing_headers().items():
        request.headers.setdefault(name, value)


def create_client(**options: Any) -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` that tags every request; options go to httpx."""
    options.setdefault("timeout", DEFAULT_TIMEOUT)
    hooks = options.pop("event_hooks", {})
    hooks.setdefault("request", []).append(_tag)
    return httpx.AsyncClient(event_hooks=hooks, **options)


def current_client() -> httpx.AsyncClient:
    client = _client.get()
    if client is None:
        raise RuntimeError("ctx.http is there while a worker runs the task (async tasks)")
    return client


def use_client(client: httpx.AsyncClient) -> None:
    """Make ``client`` the one ``ctx.http`` gives, in the current context (the attempt's task)."""
    _client.set(client)
