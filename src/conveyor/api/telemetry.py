"""A span and metrics for every HTTP request, named by route template (never the raw path)."""

from __future__ import annotations

import time
from typing import Any

from opentelemetry import context, propagate
from opentelemetry.trace import SpanKind
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from conveyor import tracing
from conveyor.metrics import Metrics


def _route_template(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    # Unmatched paths are user input: they all share one label value.
    return path if isinstance(path, str) else "unmatched"


_fields_of: tuple[object, frozenset[bytes]] | None = None


def _trace_headers(scope: Scope) -> dict[str, str]:
    """The request's headers that the installed propagators read (``traceparent``, ``baggage``...)."""
    global _fields_of  # noqa: PLW0603 - a one-entry cache
    textmap = propagate.get_global_textmap()
    if _fields_of is None or _fields_of[0] is not textmap:
        # A composite propagator builds its set of fields anew on every call: kept per propagator.
        _fields_of = (textmap, frozenset(field.encode("latin-1") for field in textmap.fields))
    fields = _fields_of[1]
    return {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"] if name in fields}


class TelemetryMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics | None) -> None:
        self.app = app
        self.metrics = metrics
        # The labelled children, looked up once per (method, route, status): the labels are
        # bounded, and prometheus_client's lookup takes a lock and builds a key every time.
        self._counted: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = scope["method"]
        status = 500
        started = time.perf_counter()

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        carried = _trace_headers(scope)
        if not tracing.tracing_installed():
            # No tracer provider: the span would record nothing, and building it costs more than
            # the rest of this middleware. What must still happen is the incoming trace context
            # becoming current, so that a job enqueued here continues the caller's trace.
            token = context.attach(propagate.extract(carried)) if carried else None
            try:
                await self.app(scope, receive, recording_send)
            finally:
                if token is not None:
                    context.detach(token)
                self._count(method, _route_template(scope), status, started)
            return
        with tracing.tracer().start_as_current_span(
            method,
            context=propagate.extract(carried),
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": scope["path"]},
        ) as span:
            try:
                await self.app(scope, receive, recording_send)
            finally:
                route = _route_template(scope)
                span.update_name(f"{method} {route}")
                span.set_attribute("http.route", route)
                span.set_attribute("http.response.status_code", status)
                if status >= 500:  # noqa: PLR2004 - HTTP's server-error class
                    tracing.mark_failed(span, "HTTP", str(status))
                self._count(method, route, status, started)

    def _count(self, method: str, route: str, status: int, started: float) -> None:
        if self.metrics is None:
            return
        key = (method, route, status)
        children = self._counted.get(key)
        if children is None:
            children = (
                self.metrics.http_requests.labels(method, route, str(status)),
                self.metrics.http_duration.labels(method, route),
            )
            self._counted[key] = children
        requests, duration = children
        requests.inc()
        duration.observe(time.perf_counter() - started)
