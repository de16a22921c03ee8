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


class SharedClient:
    """One worker's client for its tasks, made when a task first asks for it.

    Making a client loads the system's certificate store: 0.1 to 0.2 s of CPU for each worker
    process here, paid at start-up by every worker when made eagerly, and by the jobs already
    running in the other processes of ``conveyor worker --processes N``. Most workers' tasks
    never call out.
    """

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._client: httpx.AsyncClient | None = None

    @property
    def made(self) -> bool:
        return self._client is not None

    def get(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = create_client(**self._options)
        return self._client

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()


_client: contextvars.ContextVar[SharedClient | None] = contextvars.ContextVar("conveyor_http", default=None)


def current_client() -> httpx.AsyncClient:
    client = _client.get()
    if client is None:
        raise RuntimeError("ctx.http is there while a worker runs the task (async tasks)")
    return client.get()


def use_client(client: SharedClient) -> None:
    """Make ``client`` the one ``ctx.http`` gives, in the current context (the attempt's task)."""
    _client.set(client)
